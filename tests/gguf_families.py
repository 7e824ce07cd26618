"""Shared helpers for the per-family GGUF tests (test_gguf_families.py, test_gguf_gemma.py, test_gguf_moe.py).

A family is described once (`Family`: its transformers classes, the config that makes a tiny model of it, the
tokenizer it is saved with, what its GGUF must contain) and every check takes the description:

    fam = FAMILIES["qwen3"]
    model = make_family_model(fam, tmp_path / "m")            # random weights, saved with its tokenizer
    export(model, tmp_path / "m.gguf", "f32")
    kl, top1 = assert_parity(model, tmp_path / "m.gguf")     # llama.cpp vs transformers, same token ids
    assert_generates(quantize(..., "Q4_K_M"), ids, n_vocab)
    assert_round_trip(tmp_path / "m.gguf", model, tmp_path / "back")
    assert_same_as_converter(llama_cpp_source(), real_vocab_model(fam, ...), tmp_path, "f16")

A new family adds an entry to FAMILIES (or builds its own `Family`) and calls these. Everything is real: the
models are built by transformers from a config, the tokenizers are trained here (or rebuilt from the real
vocabularies llama.cpp ships for its tokenizer tests), llama.cpp evaluates the files.
"""

from __future__ import annotations

import functools
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

from test_gguf_export import (
    EXTRA_KEYS,
    MULTILINGUAL,
    bpe_tokenizer,
    export,
    fields,
    gguf_logits,
    hf_ids,
    hf_logits,
    llama,
    quiet_log,
    tensors,
)

__all__ = [
    "EXTRA_KEYS",
    "FAMILIES",
    "MULTILINGUAL",
    "TINY",
    "Family",
    "assert_generates",
    "assert_parity",
    "assert_round_trip",
    "assert_same_as_converter",
    "assert_same_gguf",
    "converter_batch",
    "export",
    "fields",
    "gpt2_vocab_tokenizer",
    "hf_ids",
    "hf_logits",
    "kl_top1",
    "llama",
    "llama_cpp_src_or_skip",
    "make_family_model",
    "quantize",
    "real_vocab_model",
    "tensors",
    "tokenizer_for",
]

#: the tiny shape every family starts from: 2 layers, 4 query heads over 2 KV heads, hidden 64
TINY = dict(
    hidden_size=64,
    intermediate_size=176,  # rows of 176 are not whole Q8_0 / K-quant blocks: the fallbacks get exercised
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


@dataclass(frozen=True)
class Family:
    """One architecture as the tests build it."""

    name: str  # test id
    model_class: str  # transformers class: "Qwen2ForCausalLM"
    config_class: str  # its config class: "Qwen2Config"
    gguf_arch: str  # the GGUF's general.architecture
    config: dict = field(default_factory=dict)  # config values on top of TINY
    tokenizer: str = "qwen2"  # pre-tokenizer of the tokenizer trained for it (test_gguf_export.pre_tokenizer)
    real_vocab: str = "qwen2"  # llama.cpp's models/ggml-vocab-NAME.gguf for the comparison with its converter
    tied: bool = False
    norm_init: tuple[float, float] = (0.5, 1.5)  # uniform range of every *norm.weight (not all ones: catches misuse)
    must_have: tuple[str, ...] = ()  # GGUF tensors the export must contain ("blk.0.attn_q.bias")
    must_lack: tuple[str, ...] = ()  # and must not


FAMILIES: dict[str, Family] = {
    "qwen2": Family(
        "qwen2",
        "Qwen2ForCausalLM",
        "Qwen2Config",
        "qwen2",
        must_have=("blk.0.attn_q.bias", "blk.1.attn_k.bias", "blk.1.attn_v.bias", "output.weight"),
    ),
    # head_dim 32 with 4 heads over hidden 64: the key/value length is not hidden / heads
    "qwen3": Family(
        "qwen3",
        "Qwen3ForCausalLM",
        "Qwen3Config",
        "qwen3",
        config={"head_dim": 32},
        tied=True,
        must_have=("blk.0.attn_q_norm.weight", "blk.1.attn_k_norm.weight"),
        must_lack=("blk.0.attn_q.bias", "output.weight"),
    ),
}


@functools.cache
def tokenizer_for(kind: str):
    """A byte-level BPE tokenizer trained here with the pre-tokenizer `kind` (ChatML tokens, 500 entries)."""
    return bpe_tokenizer(kind, ignore_merges=(kind == "llama-bpe"))


def make_family_model(
    family: Family, folder: Path, *, tokenizer=None, seed: int = 0, tied: bool | None = None, **config
) -> Path:
    """A tiny random model of `family` built by transformers from its config, weights large enough that logits
    vary by several units, saved with its tokenizer (and that tokenizer's chat template)."""
    import transformers

    tok = tokenizer if tokenizer is not None else tokenizer_for(family.tokenizer)
    values = {
        **TINY,
        "vocab_size": len(tok),
        "tie_word_embeddings": family.tied if tied is None else tied,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
        **family.config,
        **config,
    }
    cfg = getattr(transformers, family.config_class)(**values)
    torch.manual_seed(seed)
    model = getattr(transformers, family.model_class)(cfg)
    low, high = family.norm_init
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(low, high)
            else:
                p.normal_(0, 0.15)
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


# ------------------------------------------------------------------------------------------------
# checks


def kl_top1(reference: np.ndarray, ours: np.ndarray) -> tuple[float, float]:
    """Mean KL(reference || ours) over positions, and how often both pick the same top token."""

    def log_softmax(x):
        x = x - x.max(axis=-1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))

    lp, lq = log_softmax(reference), log_softmax(ours)
    kl = (np.exp(lp) * (lp - lq)).sum(axis=-1)
    top1 = (reference.argmax(-1) == ours.argmax(-1)).mean()
    return float(kl.mean()), float(top1)


def assert_parity(
    model_dir: Path, gguf: Path, *, text: str = MULTILINGUAL, max_kl: float = 1e-3, min_top1: float = 0.98
) -> tuple[float, float]:
    """llama.cpp tokenizes `text` like transformers, and on those ids its logits match transformers' (mean KL,
    top-1 agreement). The KV cache is F32 (the `llama` helper): llama.cpp's F16 default alone adds ~1e-5 KL."""
    llm = llama(gguf)
    ids = hf_ids(model_dir, text)
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids, "tokenization differs"
    kl, top1 = kl_top1(hf_logits(model_dir, ids), gguf_logits(llm, ids))
    assert kl < max_kl and top1 >= min_top1, f"{gguf.name}: mean KL {kl:.2e}, top-1 {top1:.3f}"
    return kl, top1


def assert_generates(gguf: Path, ids: list[int], n_vocab: int, n: int = 8) -> list[int]:
    """The file loads in llama.cpp and greedily generates `n` tokens of the vocabulary."""
    llm = llama(gguf)
    out = [t for _, t in zip(range(n), llm.generate(ids[:10], temp=0.0))]
    assert len(out) == n and all(0 <= t < n_vocab for t in out), out
    return out


def quantize(src: Path, out: Path, qtype: str) -> Path:
    from llmforge_plugins.gguf.quantize import quantize_gguf

    quantize_gguf(src, out, qtype, log=quiet_log)
    return out


def assert_round_trip(gguf: Path, model_dir: Path, out: Path, *, atol: float = 1e-4) -> dict:
    """`llmforge import` of an F32 export gives transformers the original model's logits; returns the new
    config.json."""
    import json

    from llmforge_plugins.gguf.importer import import_gguf

    import_gguf(gguf, out, log=quiet_log)
    ids = hf_ids(model_dir, MULTILINGUAL)
    assert hf_ids(out, MULTILINGUAL) == ids
    np.testing.assert_allclose(hf_logits(out, ids), hf_logits(model_dir, ids), rtol=0, atol=atol)
    return json.loads((out / "config.json").read_text())


# ------------------------------------------------------------------------------------------------
# llama.cpp's own converter


def llama_cpp_src_or_skip() -> Path:
    """llama.cpp's converter from llama-cpp-python's sdist (downloaded once), or skip the test."""
    import os

    from llmforge.errors import UsageError
    from llmforge_plugins.gguf.converter import llama_cpp_source

    if os.environ.get("LLMFORGE_LLAMA_CPP_SRC"):
        return Path(os.environ["LLMFORGE_LLAMA_CPP_SRC"])
    try:
        return llama_cpp_source()
    except UsageError as exc:
        pytest.skip(f"no package index reachable for llama.cpp's converter: {exc.message}")


def real_vocab_model(family: Family, src: Path, root: Path, **config) -> Path:
    """A tiny model of `family` with a real model's tokenizer (rebuilt from llama.cpp's vocabulary-only GGUF
    `family.real_vocab`), so that the converter's hash-based pre-tokenizer detection recognises it by itself."""
    from llmforge_plugins.gguf.converter import vocab_tokenizer

    tok, cases = vocab_tokenizer(src, family.real_vocab, root / f"{family.name}-tok")
    assert cases and all(tok(t, add_special_tokens=False)["input_ids"] == ids for t, ids in cases)
    return make_family_model(family, root / f"{family.name}-real", tokenizer=tok, seed=3, **config)


def assert_same_as_converter(src: Path, model: Path, tmp: Path, outtype: str) -> None:
    """Our export and llama.cpp's convert_hf_to_gguf.py (unmodified, its own gguf-py) on the same folder: the same
    tensors (names, types, shapes, bytes) and the same metadata (we may add EXTRA_KEYS)."""
    from llmforge_plugins.gguf.converter import converter_command

    ours, theirs = tmp / f"ours-{model.name}.gguf", tmp / f"theirs-{model.name}.gguf"
    export(model, ours, outtype)
    cmd, env = converter_command(src, model, theirs, outtype)
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert_same_gguf(ours, theirs)


def assert_same_gguf(ours: Path, theirs: Path, extra_keys: set[str] = EXTRA_KEYS) -> None:
    """The same tensors (names, types, shapes, bytes) and the same metadata; `ours` may add `extra_keys`."""
    import gguf

    # one reader per file: parsing a 50k-token vocabulary's metadata takes gguf's reader ~3 s
    ra, rb = gguf.GGUFReader(str(ours)), gguf.GGUFReader(str(theirs))
    a, b = {t.name: t for t in ra.tensors}, {t.name: t for t in rb.tensors}
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].tensor_type == b[name].tensor_type, name
        assert a[name].shape.tolist() == b[name].shape.tolist(), name
        assert bytes(a[name].data) == bytes(b[name].data), f"{ours.name}: {name} differs"
    fa, fb = ({k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")} for r in (ra, rb))
    assert set(fa) - set(fb) <= extra_keys, set(fa) - set(fb)
    assert set(fb) <= set(fa), set(fb) - set(fa)
    for key in fb:
        assert fa[key] == fb[key], key


#: run in one child process by converter_batch: the converter's own main() once per job, each job's failure kept
_BATCH = """
import json, sys, traceback
sys.path.insert(0, sys.argv[1])
import convert_hf_to_gguf
failed = {}
for model, out, outtype in json.loads(sys.argv[2]):
    sys.argv = ["convert_hf_to_gguf.py", model, "--outfile", out, "--outtype", outtype]
    try:
        convert_hf_to_gguf.main()
    except BaseException as exc:  # SystemExit too: the converter exits 1 on what it refuses
        failed[out] = "".join(traceback.format_exception(exc))[-3000:]
print()  # the result on a line of its own, whatever the converter printed
print(json.dumps(failed))
"""


def converter_batch(src: Path, jobs: list[tuple[Path, Path, str]], timeout: int = 600) -> dict[str, str]:
    """llama.cpp's convert_hf_to_gguf.py, unmodified with its own gguf-py, on several (model folder, out file,
    outtype) jobs in ONE child process: torch and the converter's ~100 modules are imported once rather than once a
    folder, which is most of a tiny model's conversion time. Returns {out file: error} for the jobs that failed."""
    import json
    import sys

    from llmforge_plugins.gguf.converter import converter_command

    _, env = converter_command(src, Path("."), Path("."), "f16")
    spec = json.dumps([[str(m), str(o), t] for m, o, t in jobs])
    run = subprocess.run(
        [sys.executable, "-c", _BATCH, str(src), spec], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def gpt2_vocab_tokenizer(src: Path):
    """GPT-2's real tokenizer (50257 tokens), rebuilt from llama.cpp's vocabulary-only GGUF with the `tokenizers`
    library directly: the converter names a byte-level BPE pre-tokenizer only by hashing a real vocabulary's token
    ids, and this is the smallest real vocabulary both it and the export know. Built this way it takes about a
    second (transformers' GGUF tokenizer reader takes ~10 s on it, gguf's reader parsing 100k strings), and gives
    GPT-2's ids on llama.cpp's tokenizer test texts (checked)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from llmforge_plugins.gguf.metadata import read_metadata

    vocab = src / "models" / "ggml-vocab-gpt-2.gguf"
    keys = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type")
    meta = read_metadata(vocab, keys, check_tensors=False)
    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    bpe = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    (eot,) = [t for t, kind in zip(tokens, meta["tokenizer.ggml.token_type"]) if kind == 3]  # <|endoftext|>
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=eot, eos_token=eot)
    texts = vocab.with_name(vocab.name + ".inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    ids = vocab.with_name(vocab.name + ".out").read_text(encoding="utf-8").split("\n")
    cases = [(t, [int(x) for x in i.split()]) for t, i in zip(texts, ids)]
    assert len(cases) > 40 and all(tok(t, add_special_tokens=False)["input_ids"] == i for t, i in cases)
    return tok


def log_to(messages: list):
    """An export `log` that keeps (level, message) pairs, for tests that assert a warning."""

    def log(message, level="info"):
        messages.append((level, message))

    return log


def family_builder(root: Path, families: dict | None = None):
    """A getter of each family's tiny model and its F32 export under `root`, built on first use (a
    module-scoped fixture returns it); `families` defaults to FAMILIES (a test file may have its own)."""
    families = FAMILIES if families is None else families
    cache: dict = {}

    def get(name: str) -> dict:
        if name not in cache:
            fam = families[name]
            model = make_family_model(fam, root / name)
            f32 = root / f"{name}.f32.gguf"
            cache[name] = {"family": fam, "model": model, "f32": f32, "summary": export(model, f32, "f32")}
        return cache[name]

    return get
