"""GGUF export and import (plugins/gguf/export.py, vocab.py, importer.py) against real llama.cpp.

Tiny random Llamas (hidden 64, 2 layers, 4 heads over 2 KV heads) are built with transformers and
saved with a byte-level BPE tokenizer trained here, tied and untied. Each export is loaded by
llama.cpp (llama-cpp-python) and checked by behaviour: the same token ids give the same logits as
transformers, a multilingual text tokenizes to the same ids on both sides, the quantized types load
and generate, and a GGUF imported back gives transformers the same logits. Bad inputs raise a
UsageError that names the problem and leave no file behind.

The comparison with llama.cpp's own converter (byte-identical tensors, same metadata keys) is marked
slow and needs its source: set LLMFORGE_LLAMA_CPP_SRC to the llama.cpp folder holding
convert_hf_to_gguf.py (e.g. the vendor/llama.cpp of the llama-cpp-python source distribution).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from llmforge.errors import UsageError

HIDDEN, LAYERS, HEADS, KV_HEADS, FF = 64, 2, 4, 2, 176

# Latin with diacritics, Cyrillic, CJK, emoji, digits, apostrophes and runs of whitespace: the places
# where pre-tokenizers differ.
MULTILINGUAL = (
    "Grüße aus Köln! Ça va? It's 3.14, isn't it — 12345 items.\n\n  Привет, мир.\t東京は晴れ。 🙂🦙 ok\n   end"
)
CORPUS = [
    "Grüße aus Köln! Ça va très bien, merci. Die Straße ist schön.",
    "Привет, мир. Как дела? Всё хорошо, спасибо.",
    "東京は晴れ。今日はいい天気ですね。日本語の文章です。",
    "It's 3.14, isn't it? We've got 12345 items and 678 boxes; they'll ship on 2024-05-06.",
    "The quick brown fox jumps over the lazy dog.\n\n  Indented line\twith a tab.",
    "🙂 emoji 🦙 llama 🚀 rocket; ok, fine.   end",
]


def corpus():
    return [f"{line} {i}" for i in range(40) for line in CORPUS]


def quiet_log(message, level="info"):
    pass


# ------------------------------------------------------------------------------------------------
# building models and tokenizers


def chatml():
    from llmforge.plugins import load_registry

    return load_registry(env="").chat_templates["chatml"]


def gpt2_tokenizer():
    """llmforge's own tokenizer, as the pretrain stage trains it (GPT-2 split byte-level BPE)."""
    from llmforge_plugins.training.models import train_tokenizer

    return train_tokenizer(corpus(), 500, chatml())


LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)


def pre_tokenizer(kind: str):
    """The pre-tokenizers (and normalizer) of the published tokenizer.json files of each family."""
    from tokenizers import Regex, normalizers
    from tokenizers import pre_tokenizers as pt

    if kind == "gpt-2":
        return pt.ByteLevel(add_prefix_space=False, use_regex=True), None
    if kind == "llama-bpe":
        return pt.Sequence(
            [
                pt.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
                pt.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
            ]
        ), None
    if kind == "smollm":
        return pt.Sequence(
            [pt.Digits(individual_digits=True), pt.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)]
        ), None
    if kind == "qwen2":
        return pt.Sequence(
            [
                pt.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
                pt.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
            ]
        ), normalizers.NFC()
    if kind == "gpt-2-prefix-space":  # GPT-2's split with a space added in front: llama.cpp has no such mode
        return pt.ByteLevel(add_prefix_space=True, use_regex=True), None
    raise AssertionError(kind)


def bpe_tokenizer(kind: str, ignore_merges: bool = False):
    """A byte-level BPE tokenizer trained here with the pre-tokenizer of `kind`, ChatML's tokens reserved."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    tok.pre_tokenizer, normalizer = pre_tokenizer(kind)
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        min_frequency=2,
        show_progress=False,
        special_tokens=["<|im_end|>", "<|im_start|>", "<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = chatml().source
    return fast


def llama_config(vocab_size: int, tied: bool, tokenizer=None, **kw):
    from transformers import LlamaConfig

    cfg = dict(
        vocab_size=vocab_size,
        hidden_size=HIDDEN,
        intermediate_size=FF,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
        rms_norm_eps=1e-5,
    )
    if tokenizer is not None:
        cfg.update(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    cfg.update(kw)
    return LlamaConfig(**cfg)


def make_model(path: Path, tokenizer, tied: bool = True, seed: int = 0, dtype=None, save_kw=None, **cfg) -> Path:
    """A random Llama with weights large enough that logits vary by several units, saved with its tokenizer."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(len(tokenizer), tied, tokenizer, **cfg))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0, 0.15)
            else:
                p.uniform_(0.5, 1.5)  # norms that are not all ones catch a norm written in the wrong place
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(str(path), **(save_kw or {}))
    tokenizer.save_pretrained(str(path))
    return path


def export(model: Path, out: Path, outtype: str = "f32") -> dict:
    from llmforge_plugins.gguf.export import export_gguf

    return export_gguf(model, out, outtype, log=quiet_log)


# ------------------------------------------------------------------------------------------------
# reading results


def llama(path: Path, n_ctx: int = 256):
    import llama_cpp

    from llmforge.native import load_llama

    # An F32 KV cache: llama.cpp's default F16 cache alone costs ~1e-4 relative error, which would hide
    # what is being measured here (the export).
    # load_llama applies the machine's probe: where llama.cpp's AMX kernels fault, a q8_0 export evaluated in this
    # process would otherwise kill pytest with SIGILL.
    return load_llama(
        path,
        logits_all=True,
        n_ctx=n_ctx,
        seed=0,
        n_threads=2,
        type_k=llama_cpp.GGML_TYPE_F32,
        type_v=llama_cpp.GGML_TYPE_F32,
    )


def gguf_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float64)


def hf_logits(model_dir: Path, ids: list[int], dtype=torch.float32) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().numpy()


def hf_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def hf_ids(model_dir: Path, text: str) -> list[int]:
    return hf_tokenizer(model_dir)(text, add_special_tokens=False)["input_ids"]


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def fields(path: Path) -> dict:
    import gguf

    reader = gguf.GGUFReader(str(path))
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def tensors(path: Path) -> dict:
    import gguf

    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """A tied and an untied model sharing one llmforge-trained tokenizer, and their F32 exports."""
    root = tmp_path_factory.mktemp("gguf")
    tok = gpt2_tokenizer()
    out = {"root": root, "tokenizer": tok}
    for tied in (True, False):
        key = "tied" if tied else "untied"
        model = make_model(root / key, tok, tied=tied, seed=int(tied))
        out[key] = model
        out[f"{key}.f32"] = root / f"{key}.f32.gguf"
        out[f"{key}.summary"] = export(model, out[f"{key}.f32"], "f32")
    return out


@pytest.fixture(scope="module")
def sample_ids(zoo):
    return hf_ids(zoo["tied"], MULTILINGUAL)


# ------------------------------------------------------------------------------------------------
# F32: llama.cpp computes what transformers computes


@pytest.mark.parametrize("kind", ["tied", "untied"])
def test_f32_logits_and_tokenization_match_transformers(zoo, kind):
    model, path = zoo[kind], zoo[f"{kind}.f32"]
    llm = llama(path)
    # tokenization of a multilingual text: identical ids on both sides
    ours = llm.tokenize(MULTILINGUAL.encode(), add_bos=False, special=False)
    assert ours == hf_ids(model, MULTILINGUAL)
    assert len(ours) > 30
    # logits on those ids
    err = rel_err(gguf_logits(llm, ours), hf_logits(model, ours))
    assert err < 1e-3, f"llama.cpp vs transformers relative error {err:.2e}"
    summary = zoo[f"{kind}.summary"]
    assert summary["outtype"] == "f32" and summary["arch"] == "llama" and summary["tensors"] == len(tensors(path))
    assert summary["bytes"] == path.stat().st_size and summary["seconds"] >= 0


@pytest.mark.parametrize("kind", ["tied", "untied"])
def test_f32_metadata_and_tensors(zoo, kind):
    path = zoo[f"{kind}.f32"]
    tok = zoo["tokenizer"]
    meta = fields(path)
    assert meta["general.architecture"] == "llama"
    assert meta["llama.block_count"] == LAYERS and meta["llama.embedding_length"] == HIDDEN
    assert meta["llama.attention.head_count"] == HEADS and meta["llama.attention.head_count_kv"] == KV_HEADS
    assert meta["llama.feed_forward_length"] == FF and meta["llama.context_length"] == 256
    assert meta["llama.rope.dimension_count"] == HIDDEN // HEADS and meta["llama.rope.freq_base"] == 10000.0
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert meta["llama.vocab_size"] == len(tok) and len(meta["tokenizer.ggml.tokens"]) == len(tok)
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert meta["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
    assert meta["tokenizer.ggml.padding_token_id"] == tok.pad_token_id
    assert meta["tokenizer.ggml.add_bos_token"] is False and meta["tokenizer.ggml.add_eos_token"] is False
    assert meta["tokenizer.chat_template"] == tok.chat_template
    assert len(meta["tokenizer.ggml.merges"]) > 100
    names = tensors(path)
    # tied: no output.weight, llama.cpp falls back to the embedding; untied: the head is there
    assert ("output.weight" in names) is (kind == "untied")
    assert names["blk.1.attn_k.weight"].shape.tolist() == [HIDDEN, HIDDEN // HEADS * KV_HEADS]
    assert {t.tensor_type.name for t in names.values()} == {"F32"}


def test_chat_markers_are_single_control_tokens(zoo):
    """The template's markers stay whole tokens when llama.cpp parses specials, as transformers does."""
    llm = llama(zoo["tied.f32"])
    tok = zoo["tokenizer"]
    text = "<|im_start|>user\nHallo Köln<|im_end|>\n"
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok(text, add_special_tokens=False)["input_ids"]
    types = fields(zoo["tied.f32"])["tokenizer.ggml.token_type"]
    assert types[tok.convert_tokens_to_ids("<|im_end|>")] == 3  # CONTROL


# ------------------------------------------------------------------------------------------------
# the other output types


# Tolerances: measured errors are ~1.5e-3 (f16), ~1.3e-2 (bf16) and ~5e-2 (q8_0, where llama.cpp also
# quantizes the activations to 8 bits) on these deliberately large random weights.
@pytest.mark.parametrize(
    "outtype,expected,tol",
    [("f16", {"F16", "F32"}, 5e-3), ("bf16", {"BF16", "F32"}, 3e-2), ("q8_0", {"Q8_0", "F16", "F32"}, 1e-1)],
)
def test_f16_bf16_q8_0_load_and_generate(zoo, tmp_path, sample_ids, outtype, expected, tol):
    out = tmp_path / f"m.{outtype}.gguf"
    summary = export(zoo["untied"], out, outtype)
    names = tensors(out)
    assert {t.tensor_type.name for t in names.values()} == expected
    assert names["blk.0.attn_norm.weight"].tensor_type.name == "F32"  # norms stay F32
    if outtype == "q8_0":
        # rows of 64 values are whole 32-value blocks; ffn_down's rows of 176 are not: F16, like llama.cpp's converter
        assert names["blk.0.attn_q.weight"].tensor_type.name == "Q8_0"
        assert names["blk.0.ffn_down.weight"].tensor_type.name == "F16"
        assert summary["f16_fallbacks"] == LAYERS
    assert fields(out)["general.file_type"] == {"f16": 1, "bf16": 32, "q8_0": 7}[outtype]
    llm = llama(out)
    ours, reference = gguf_logits(llm, sample_ids), hf_logits(zoo["untied"], sample_ids)
    err = rel_err(ours, reference)
    assert err < tol, f"{outtype}: relative error {err:.2e}"
    assert np.corrcoef(ours.ravel(), reference.ravel())[0, 1] > 0.999
    llm.reset()
    generated = list(zip(range(8), llm.generate(sample_ids[:10], temp=0.0)))
    assert len(generated) == 8 and all(0 <= t < len(zoo["tokenizer"]) for _, t in generated)


# ------------------------------------------------------------------------------------------------
# inputs: bfloat16 shards, RoPE scaling, an adapter


def test_sharded_bfloat16_input(zoo, tmp_path, sample_ids):
    """Shards with an index, stored in bfloat16: read tensor by tensor, widened exactly."""
    model = make_model(
        tmp_path / "bf16",
        zoo["tokenizer"],
        tied=False,
        seed=3,
        dtype=torch.bfloat16,
        save_kw={"max_shard_size": "40KB"},
    )
    assert (model / "model.safetensors.index.json").exists() and len(list(model.glob("*.safetensors"))) > 2
    out = tmp_path / "bf16.f32.gguf"
    export(model, out, "f32")
    err = rel_err(gguf_logits(llama(out), sample_ids), hf_logits(model, sample_ids, dtype=torch.float32))
    assert err < 1e-3


def test_llama3_rope_scaling_writes_rope_freqs(zoo, tmp_path, sample_ids):
    """Llama-3.1-style RoPE scaling: llama.cpp reads the per-frequency factors from a rope_freqs tensor.
    An original context of 64 puts the 8 frequencies of a 16-wide head in all three bands."""
    rope = {
        "rope_type": "llama3",
        "rope_theta": 10000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    model = make_model(tmp_path / "l3", zoo["tokenizer"], tied=True, seed=4, rope_parameters=rope)
    out = tmp_path / "l3.gguf"
    export(model, out, "f32")
    factors = tensors(out)["rope_freqs.weight"].data
    assert factors.shape == (HIDDEN // HEADS // 2,)
    # wavelengths 2*pi*10000^(i/8): i=0 is under 64/4 (kept), i=1,2 between (blended), i>=3 over 64 (divided by 8)
    assert factors[0] == 1.0 and all(1.0 < f < 8.0 for f in factors[1:3]) and all(factors[3:] == 8.0)
    err = rel_err(gguf_logits(llama(out), sample_ids), hf_logits(model, sample_ids))
    assert err < 1e-3


def test_lora_adapter_is_merged_then_exported(zoo, tmp_path, sample_ids):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(zoo["untied"]))
    torch.manual_seed(5)
    peft_model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "down_proj"], init_lora_weights=False)
    )
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(str(adapter))
    zoo["tokenizer"].save_pretrained(str(adapter))
    with torch.no_grad():
        expected = peft_model.merge_and_unload()(torch.tensor([sample_ids])).logits[0].double().numpy()
    out = tmp_path / "adapter.gguf"
    summary = export(adapter, out, "f32")
    assert summary["adapter"] == str(adapter)
    assert fields(out)["general.name"].lower() == "adapter"
    err = rel_err(gguf_logits(llama(out), sample_ids), expected)
    assert err < 1e-3
    assert leftovers(tmp_path) == []  # the merged copy is gone


def test_mistral_architecture(zoo, tmp_path, sample_ids):
    from transformers import MistralConfig, MistralForCausalLM

    tok = zoo["tokenizer"]
    torch.manual_seed(6)
    model = MistralForCausalLM(
        MistralConfig(
            vocab_size=len(tok),
            hidden_size=HIDDEN,
            intermediate_size=FF,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            num_key_value_heads=KV_HEADS,
            max_position_embeddings=256,
            sliding_window=None,
            eos_token_id=tok.eos_token_id,
        )
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0, 0.15)
    folder = tmp_path / "mistral"
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    out = tmp_path / "mistral.gguf"
    assert export(folder, out, "f32")["hf_architecture"] == "MistralForCausalLM"
    assert fields(out)["general.architecture"] == "llama"  # llama.cpp runs Mistral as a Llama
    assert rel_err(gguf_logits(llama(out), sample_ids), hf_logits(folder, sample_ids)) < 1e-3


# ------------------------------------------------------------------------------------------------
# pre-tokenizers: named by the split of llama.cpp's check text, and tokenizing identically


def test_split_table_matches_the_pre_tokenizers():
    """Every known hash is recomputed from the pre-tokenizer it names; the check text is llama.cpp's."""
    from tokenizers import Tokenizer, models

    from llmforge_plugins.gguf.vocab import CHECK_TEXT, KNOWN_SPLITS, split_hash

    # sha256 of the chktxt in llama.cpp's convert_hf_to_gguf.py (get_vocab_base_pre)
    assert (
        hashlib.sha256(CHECK_TEXT.encode()).hexdigest()
        == "a36179c1e2b1cfcfbfad1dc779addad2ffc778201e4cf0d538bddeafa2c526da"
    )
    for digest, split in KNOWN_SPLITS.items():
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer, normalizer = pre_tokenizer(split.pre)
        if normalizer is not None:
            tok.normalizer = normalizer
        assert split_hash(tok) == digest, split.pre
    assert {s.pre for s in KNOWN_SPLITS.values()} >= {"gpt-2", "llama-bpe"}


@pytest.mark.parametrize("kind", ["llama-bpe", "smollm", "qwen2"])
def test_other_pre_tokenizers_tokenize_like_transformers(zoo, tmp_path, kind):
    from llmforge_plugins.gguf.vocab import CHECK_TEXT

    tok = bpe_tokenizer(kind, ignore_merges=(kind == "llama-bpe"))
    model = make_model(tmp_path / kind, tok, tied=True)
    out = tmp_path / f"{kind}.gguf"
    export(model, out, "f32")
    assert fields(out)["tokenizer.ggml.pre"] == kind
    llm = llama(out)
    for text in (MULTILINGUAL, CHECK_TEXT):
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == hf_ids(model, text), kind
    ids = hf_ids(model, MULTILINGUAL)
    assert rel_err(gguf_logits(llm, ids), hf_logits(model, ids)) < 1e-3


def test_gpt2_split_tokenizes_the_check_text_like_transformers(zoo):
    from llmforge_plugins.gguf.vocab import CHECK_TEXT

    llm = llama(zoo["tied.f32"])
    assert llm.tokenize(CHECK_TEXT.encode(), add_bos=False, special=False) == hf_ids(zoo["tied"], CHECK_TEXT)


def sentencepiece_model(folder: Path) -> Path:
    """A SentencePiece BPE model (byte fallback, digits split) trained here, saved as Llama 2 ships it."""
    import io

    spm = pytest.importorskip("sentencepiece")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()),
        model_writer=buf,
        vocab_size=500,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        split_digits=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes(buf.getvalue())
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})
    )
    return folder


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    folder = sentencepiece_model(tmp_path_factory.mktemp("sp") / "model")
    return make_model(folder, hf_tokenizer(folder), tied=False)


def test_sentencepiece_tokenizer(sp_model, tmp_path):
    model = sp_model
    tok = hf_tokenizer(model)
    out = tmp_path / "sp.gguf"
    export(model, out, "f32")
    meta = fields(out)
    assert meta["tokenizer.ggml.model"] == "llama" and len(meta["tokenizer.ggml.scores"]) == len(tok)
    assert meta["tokenizer.ggml.bos_token_id"] == 1 and meta["tokenizer.ggml.unknown_token_id"] == 0
    adds_bos = tok("x")["input_ids"][0] == tok.bos_token_id
    assert meta["tokenizer.ggml.add_bos_token"] is adds_bos
    llm = llama(out)
    assert llm.tokenize(MULTILINGUAL.encode(), add_bos=False, special=False) == hf_ids(model, MULTILINGUAL)
    ids = hf_ids(model, MULTILINGUAL)
    assert rel_err(gguf_logits(llm, ids), hf_logits(model, ids)) < 1e-3


# ------------------------------------------------------------------------------------------------
# import: GGUF -> Hugging Face


def test_round_trip_through_import(zoo, tmp_path, sample_ids):
    from llmforge_plugins.gguf.importer import import_gguf

    out = tmp_path / "back"
    summary = import_gguf(zoo["untied.f32"], out, log=quiet_log)
    assert summary["arch"] == "llama" and summary["dtype"] == "float32"
    assert (out / "model.safetensors").exists() and (out / "config.json").exists()
    np.testing.assert_allclose(hf_logits(out, sample_ids), hf_logits(zoo["untied"], sample_ids), rtol=0, atol=1e-5)
    back = hf_tokenizer(out)
    assert back(MULTILINGUAL, add_special_tokens=False)["input_ids"] == sample_ids
    assert back.chat_template == zoo["tokenizer"].chat_template
    assert leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------------------
# bad inputs: a UsageError that names the problem, nothing written


def expect_usage_error(fn, *words, folder: Path):
    before = sorted(p.name for p in folder.iterdir())
    with pytest.raises(UsageError) as info:
        fn()
    message = info.value.render()
    for word in words:
        assert word in message, f"{word!r} not in: {message}"
    assert sorted(p.name for p in folder.iterdir()) == before, "something was left behind"
    return message


def test_not_a_model_dir(tmp_path):
    out = tmp_path / "x.gguf"
    expect_usage_error(lambda: export(tmp_path / "missing", out), "not found", folder=tmp_path)
    (tmp_path / "empty").mkdir()
    expect_usage_error(lambda: export(tmp_path / "empty", out), "no config.json", folder=tmp_path)
    (tmp_path / "file.txt").write_text("hi")
    expect_usage_error(lambda: export(tmp_path / "file.txt", out), "not a model directory", folder=tmp_path)


def test_config_without_safetensors(zoo, tmp_path):
    d = tmp_path / "noweights"
    d.mkdir()
    (d / "config.json").write_text((zoo["tied"] / "config.json").read_text())
    (d / "pytorch_model.bin").write_bytes(b"x")
    expect_usage_error(lambda: export(d, tmp_path / "x.gguf"), "no *.safetensors", "pytorch_model.bin", folder=tmp_path)


def test_unsupported_architecture(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    d = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32)).save_pretrained(str(d))
    message = expect_usage_error(
        lambda: export(d, tmp_path / "x.gguf"), "GPT2LMHeadModel", "LlamaForCausalLM", folder=tmp_path
    )
    assert "MistralForCausalLM" in message


def test_unknown_pre_tokenizer(tmp_path):
    tok = bpe_tokenizer("gpt-2-prefix-space")
    model = make_model(tmp_path / "odd", tok)
    message = expect_usage_error(
        lambda: export(model, tmp_path / "x.gguf"), "unknown BPE pre-tokenizer", "tokenizer.json", folder=tmp_path
    )
    assert "gpt-2" in message and "llama-bpe" in message  # the hint lists what is supported


def test_pre_tokenizer_with_other_merge_rule(tmp_path):
    tok = bpe_tokenizer("llama-bpe", ignore_merges=False)
    model = make_model(tmp_path / "l3", tok)
    expect_usage_error(lambda: export(model, tmp_path / "x.gguf"), "ignore_merges", folder=tmp_path)


def test_bad_outtype_and_truncated_weights(zoo, tmp_path):
    expect_usage_error(lambda: export(zoo["tied"], tmp_path / "x.gguf", "q4_k"), "q4_k", "f16", folder=tmp_path)
    d = tmp_path / "cut"
    d.mkdir()
    for f in zoo["tied"].iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    weights = d / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    expect_usage_error(lambda: export(d, tmp_path / "x.gguf"), "model.safetensors", "truncated", folder=tmp_path)


def test_import_rejects_corrupt_and_truncated_gguf(zoo, tmp_path):
    from llmforge_plugins.gguf.importer import import_gguf

    data = zoo["tied.f32"].read_bytes()
    for name, blob in (
        ("cut.gguf", data[: len(data) // 2]),
        ("tail.gguf", data[:-64]),
        ("junk.gguf", b"not a gguf file at all" * 10),
    ):
        (tmp_path / name).write_bytes(blob)
        expect_usage_error(
            lambda name=name: import_gguf(tmp_path / name, tmp_path / "out", log=quiet_log),
            name,
            "not a valid GGUF",
            folder=tmp_path,
        )
    expect_usage_error(lambda: import_gguf(tmp_path / "nope.gguf", tmp_path / "out"), "not found", folder=tmp_path)


def test_modules_import_nothing_heavy():
    code = textwrap.dedent("""
        import sys
        import llmforge_plugins.gguf.export, llmforge_plugins.gguf.vocab, llmforge_plugins.gguf.importer
        heavy = [m for m in ("torch", "transformers", "llama_cpp", "gguf", "numpy", "tokenizers") if m in sys.modules]
        print(heavy)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


# ------------------------------------------------------------------------------------------------
# fidelity: the same bytes as llama.cpp's converter


#: keys we write that the converter leaves to llama.cpp's defaults: the defaults depend on the
#: pre-tokenizer, so the export states the tokenizer's own behaviour.
EXTRA_KEYS = {"tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token"}


@pytest.fixture(scope="session")
def llama_cpp_src(tmp_path_factory) -> Path:
    """llama.cpp's converter as users get it: from the installed llama-cpp-python's source distribution (downloaded
    once into llmforge's cache; $LLMFORGE_LLAMA_CPP_SRC may name a llama.cpp checkout instead)."""
    from llmforge.errors import UsageError
    from llmforge_plugins.gguf.converter import llama_cpp_source

    if os.environ.get("LLMFORGE_LLAMA_CPP_SRC"):
        return Path(os.environ["LLMFORGE_LLAMA_CPP_SRC"])
    try:
        return llama_cpp_source()
    except UsageError as exc:
        pytest.skip(f"no package index reachable for llama.cpp's converter: {exc.message}")


@pytest.fixture(scope="module")
def real_vocab_models(llama_cpp_src, tmp_path_factory) -> dict:
    """Tiny Llamas with the tokenizers of real models (GPT-2, Qwen2), rebuilt from the vocabulary-only GGUFs llama.cpp
    ships for its tokenizer tests. The rebuilt tokenizers give the original token ids on llama.cpp's test texts,
    so the converter's hash-based pre-tokenizer detection recognises them by itself."""
    from llmforge_plugins.gguf.converter import vocab_tokenizer

    root = tmp_path_factory.mktemp("real-vocab")
    out = {}
    for name, tied in (("gpt-2", False), ("qwen2", True)):
        tok, cases = vocab_tokenizer(llama_cpp_src, name, root / f"{name}-tok")
        assert len(cases) > 40 and all(tok(t, add_special_tokens=False)["input_ids"] == ids for t, ids in cases), name
        out[name] = make_model(root / name, tok, tied=tied, seed=3)
    return out


@pytest.mark.slow
@pytest.mark.timeout(900)  # f16 adds Qwen2's 152k vocabulary: ~230 s under load, near the default 300 s limit
@pytest.mark.parametrize("outtype", ["f32", "f16", "bf16", "q8_0"])
def test_byte_identical_to_llama_cpp_converter(llama_cpp_src, real_vocab_models, sp_model, tmp_path, outtype):
    """The export writes the same tensors (bytes, types, shapes) and the same metadata as llama.cpp's own
    convert_hf_to_gguf.py, run unmodified from llama-cpp-python's source distribution with its own gguf-py.

    Nothing overrides the converter's pre-tokenizer detection: it names a BPE pre-tokenizer by hashing the token ids
    of a fixed text, and only a real model's vocabulary gives a hash it knows (a tokenizer trained here never does,
    and the converter refuses it). So the BPE models carry the real GPT-2 and Qwen2 tokenizers, and
    `tokenizer.ggml.pre` (which the export chooses by how the tokenizer splits text, not by hash) must equal the
    converter's: a wrong pre-tokenizer fails here. A SentencePiece model (tokenizer.model) has no pre-tokenizer to
    detect and is compared too. (Qwen2, tied embeddings, is compared in f16 only: its vocabulary is large.)"""
    pytest.importorskip("sentencepiece")  # the converter imports it for every Llama
    from llmforge_plugins.gguf.converter import converter_command

    models = [("gpt-2", real_vocab_models["gpt-2"]), ("sentencepiece", sp_model)]
    if outtype == "f16":  # the default type; Qwen2's 152k vocabulary makes each conversion slow, so once is enough
        models.append(("qwen2", real_vocab_models["qwen2"]))
    for kind, model in models:
        ours = tmp_path / f"ours-{kind}.gguf"
        export(model, ours, outtype)
        theirs = tmp_path / f"theirs-{kind}.gguf"
        cmd, env = converter_command(llama_cpp_src, model, theirs, outtype)
        run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        fa, fb = fields(ours), fields(theirs)
        if kind != "sentencepiece":
            assert fb["tokenizer.ggml.pre"] == kind and fa["tokenizer.ggml.pre"] == kind
        a, b = tensors(ours), tensors(theirs)
        assert sorted(a) == sorted(b)
        for name in a:
            assert a[name].tensor_type == b[name].tensor_type, name
            assert a[name].shape.tolist() == b[name].shape.tolist(), name
            assert bytes(a[name].data) == bytes(b[name].data), f"{kind}: {name} differs"
        assert set(fa) - set(fb) <= EXTRA_KEYS and set(fb) <= set(fa), kind
        for key in fb:
            assert fa[key] == fb[key], (kind, key)


@pytest.mark.slow
def test_the_converter_refuses_a_tokenizer_trained_here(llama_cpp_src, zoo, tmp_path):
    """Why the comparison above needs real vocabularies: on llmforge's own trained tokenizer the converter's hash is
    unknown and it refuses ("BPE pre-tokenizer was not recognized"); llmforge names the pre-tokenizer by how it
    splits text (GPT-2's here), which the tokenization tests check against transformers."""
    from llmforge_plugins.gguf.converter import converter_command

    cmd, env = converter_command(llama_cpp_src, zoo["tied"], tmp_path / "theirs.gguf", "f32")
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode != 0 and "BPE pre-tokenizer was not recognized" in run.stderr, run.stderr[-2000:]
    assert fields(zoo["tied.f32"])["tokenizer.ggml.pre"] == "gpt-2"
