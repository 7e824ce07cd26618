"""plugins/gguf/metadata.py: the GGUF header reader the Ollama Modelfile uses instead of gguf's GGUFReader.

Every check compares with GGUFReader on the same file: tiny models of each family exported here, and a real
vocabulary GGUF llama.cpp ships. A truncated or foreign file is a UsageError naming it, as before.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gguf_families import FAMILIES, export, llama_cpp_src_or_skip, make_family_model
from llmforge.errors import UsageError
from llmforge_plugins.gguf.metadata import read_metadata
from llmforge_plugins.gguf.modelfile import ChatInfo, read_chat_info
from test_gguf_gemma import GEMMA
from test_gguf_moe import FAMILIES as MOE_FAMILIES

FAMILY = {**FAMILIES, **GEMMA, **MOE_FAMILIES}


def reference_chat_info(path: Path) -> ChatInfo:
    """What read_chat_info returned when it read the file with gguf's GGUFReader."""
    import gguf

    reader = gguf.GGUFReader(str(path))

    def value(key):
        field = reader.fields.get(key)
        return None if field is None else field.contents()

    tokens = reader.fields.get("tokenizer.ggml.tokens")

    def token(key):
        idx = value(key)
        return None if tokens is None or idx is None else tokens.contents(int(idx))

    return ChatInfo(
        template=value("tokenizer.chat_template"),
        bos=token("tokenizer.ggml.bos_token_id"),
        eos=token("tokenizer.ggml.eos_token_id"),
        eot=token("tokenizer.ggml.eot_token_id"),
        add_bos=bool(value("tokenizer.ggml.add_bos_token")),
    )


def reference_metadata(path: Path) -> dict:
    import gguf

    # GGUFReader adds the header counts as pseudo-keys "GGUF.version", ...
    return {k: f.contents() for k, f in gguf.GGUFReader(str(path)).fields.items() if not k.startswith("GGUF.")}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One f32 GGUF per family (qwen2, qwen3, gemma2, gemma3, phi3, qwen3-MoE, Mixtral), exported once."""
    root = tmp_path_factory.mktemp("families")
    out = {}
    for name, family in FAMILY.items():
        model = make_family_model(family, root / name)
        out[name] = root / f"{name}.gguf"
        export(model, out[name])
    return out


@pytest.mark.parametrize("name", sorted(FAMILY))
def test_every_key_and_the_chat_info_match_gguf_reader(exported, name):
    path = exported[name]
    expected = reference_metadata(path)
    assert read_metadata(path, expected) == expected  # float32 values widen to the same floats both ways
    # only what is asked for is returned; an absent key is left out
    assert read_metadata(path, ["general.architecture", "no.such.key"]) == {
        "general.architecture": expected["general.architecture"]
    }
    # or a test of the name, for keys named after the architecture (what `chat` and `gguf check` read)
    context = f"{expected['general.architecture']}.context_length"
    assert read_metadata(path, lambda key: key.endswith(".context_length")) == {context: expected[context]}
    info = read_chat_info(path)
    assert info == reference_chat_info(path)
    assert info.template and info.eos, info  # the tiny models carry a chat template and an EOS


def test_a_real_vocabulary_gguf_matches_gguf_reader():
    """Phi-3's vocabulary-only GGUF from llama.cpp: 32k SentencePiece tokens, a chat template, no tensors."""
    path = llama_cpp_src_or_skip() / "models" / "ggml-vocab-phi-3.gguf"
    if not path.is_file():
        pytest.skip(f"{path} is not in this llama.cpp source")
    info = read_chat_info(path)
    assert info == reference_chat_info(path)
    assert (info.bos, info.eos, info.add_bos) == ("<s>", "<|endoftext|>", True)


def _expect_usage_error(path: Path, *words: str) -> None:
    with pytest.raises(UsageError) as err:
        read_chat_info(path)
    message = err.value.render()
    for word in (str(path), *words):
        assert word in message, message


def test_truncated_and_foreign_files_are_usage_errors_naming_them(exported, tmp_path):
    import gguf

    data = exported["qwen2"].read_bytes()
    header_end = min(t.data_offset for t in gguf.GGUFReader(str(exported["qwen2"])).tensors)
    # cut in the tensor data (the header is whole), in the vocabulary, and in the first bytes
    for name, size in (("data", (header_end + len(data)) // 2), ("vocab", header_end // 2), ("start", 10)):
        cut = tmp_path / f"cut-{name}.gguf"
        cut.write_bytes(data[:size])
        _expect_usage_error(cut, "truncated")
    foreign = tmp_path / "model.gguf"
    foreign.write_bytes(b"PK\x03\x04" + data[4:200])
    _expect_usage_error(foreign, "not a GGUF file")
    _expect_usage_error(tmp_path / "missing.gguf", "not found")
