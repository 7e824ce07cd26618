"""GGUF -> a Hugging Face model directory (safetensors, config, tokenizer with its chat template).

transformers reads GGUF itself (`from_pretrained(folder, gguf_file=name)`, dequantizing every tensor
to float32) and rebuilds the tokenizer and chat template from the file's metadata. What it loads is
marked as "quantized with gguf" and refuses `save_pretrained`, so the weights are moved into a plain
model built from the same config (on the meta device, so they are not copied), which saves normally.

The file is checked with gguf's reader first, so a damaged or truncated file is a clear UsageError
rather than a traceback from deep inside transformers. The directory is built under a temporary name
next to `out_dir` and renamed into place: it appears complete or not at all.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmforge.errors import UsageError

DTYPES = ("float32", "float16", "bfloat16")

Log = Callable[..., None]


def _quiet(message: str, level: str = "info") -> None:
    pass


def inspect_gguf(path: Path) -> dict:
    """Architecture, name, tensor count and types of a GGUF file; UsageError if it is not a whole GGUF."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
        arch_field = reader.get_field("general.architecture")
        arch = arch_field.contents() if arch_field is not None else None
        name_field = reader.get_field("general.name")
        tok_field = reader.get_field("tokenizer.ggml.model")
        tokenizer = tok_field.contents() if tok_field is not None else None
        name = name_field.contents() if name_field is not None else None
        size = path.stat().st_size
        for t in reader.tensors:
            # the reader maps what it can; a tensor that ends past the file means a truncated copy
            if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
                raise ValueError(f"tensor {t.name} extends past the end of the file")
        types = sorted({t.tensor_type.name for t in reader.tensors})
        count = len(reader.tensors)
        names = {t.name for t in reader.tensors}
        key_length = reader.get_field(f"{arch}.attention.key_length") if arch else None
        head_dim = int(key_length.contents()) if key_length is not None else None
        prefix = f"{arch}."
        meta = {k[len(prefix) :]: f.contents() for k, f in reader.fields.items() if arch and k.startswith(prefix)}
    except Exception as exc:  # the reader raises ValueError, IndexError, struct errors...: all mean "not valid"
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise UsageError(
            f"{path}: not a valid GGUF file ({reason})",
            hint="the file is damaged or incomplete: export or download it again",
        ) from None
    if not arch:
        raise UsageError(f"{path}: the GGUF has no general.architecture")
    return {
        "arch": arch,
        "name": name,
        "tokenizer": tokenizer,  # tokenizer.ggml.model: "llama" (SentencePiece), "gpt2" (byte-level BPE), ...
        "tensors": count,
        "types": types,
        "head_dim": head_dim,
        "tied": "output.weight" not in names,
        # stacked experts (llama.cpp's ffn_gate_exps, ffn_up_exps, ffn_down_exps): a mixture-of-experts model
        "experts": any("_exps." in n for n in names),
        "meta": meta,  # the architecture's keys, without its prefix
        "tokenizer_pre": _field(reader, "tokenizer.ggml.pre"),
    }


def _field(reader, key: str):
    field = reader.get_field(key)
    return field.contents() if field is not None else None


#: GGUF architectures whose stacked experts transformers' GGUF reader turns back into its MoE model, under the
#: model type it names them by (its supported list spells them the transformers way, "qwen3_moe")
MOE_READERS = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe"}


def _check_supported(path: Path, arch: str, experts: bool = False) -> None:
    if experts and arch not in MOE_READERS:
        # Mixtral is written as llama.cpp's "llama" architecture with expert tensors; transformers reads any
        # "llama" GGUF as a dense LlamaForCausalLM, finds no MLP weights and initialises them at random
        raise UsageError(
            f"{path}: a mixture-of-experts GGUF (ffn_*_exps expert tensors) of architecture '{arch}'"
            + (" (Mixtral)" if arch == "llama" else "")
            + "; transformers reads it as a dense model without its experts, so the import would have random "
            "MLP weights",
            hint=f"transformers reads the experts of: {', '.join(sorted(MOE_READERS))} GGUFs; import Mixtral "
            "from its Hugging Face folder instead",
        )
    try:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
    except ImportError:  # moved in some transformers version: let from_pretrained decide
        return
    if arch not in GGUF_SUPPORTED_ARCHITECTURES and MOE_READERS.get(arch) not in GGUF_SUPPORTED_ARCHITECTURES:
        raise UsageError(
            f"{path}: transformers cannot load GGUF architecture '{arch}'",
            hint=f"it reads: {', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))}",
        )


def _smollm_split():
    from tokenizers import pre_tokenizers

    # llama.cpp's "smollm": every digit a piece of its own, then GPT-2's split (vocab.KNOWN_SPLITS names it)
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )


#: `tokenizer.ggml.pre` names that transformers does not rebuild, and how to. transformers gives a byte-level BPE
#: GGUF GPT-2's split unless it knows the name's regex; SmolLM's it does not know.
PRE_TOKENIZERS = {"smollm": _smollm_split}


def _match_pre_tokenizer(folder: Path, pre: str | None) -> None:
    """Make the saved tokenizer split text the way the GGUF's `tokenizer.ggml.pre` says.

    Without this a SmolLM/SmolLM2 GGUF came back with plain GPT-2 splitting: digit runs split unlike the file
    (whenever the vocabulary has multi-digit tokens), and a GGUF exported from the folder named 'gpt-2' where
    the original named 'smollm'. The split is identified as the export identifies it (vocab.split_hash), so a
    folder that passes here exports under the file's own name."""
    path = folder / "tokenizer.json"
    if pre not in PRE_TOKENIZERS or not path.is_file():
        return
    from tokenizers import Tokenizer

    from llmforge_plugins.gguf.vocab import KNOWN_SPLITS, split_hash

    tokenizer = Tokenizer.from_file(str(path))
    split = KNOWN_SPLITS.get(split_hash(tokenizer))
    if split is None or split.pre != pre:
        tokenizer.pre_tokenizer = PRE_TOKENIZERS[pre]()
        tokenizer.save(str(path))


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists():
        if not out_dir.is_dir():
            raise UsageError(f"{out_dir} exists and is a file; the output is a model directory")
        if any(out_dir.iterdir()):
            raise UsageError(f"{out_dir} exists and is not empty", hint="choose another folder, or remove it first")


def import_gguf(gguf: Path, out_dir: Path, *, dtype: str = "float32", log: Log | None = None) -> dict:
    """Convert the GGUF file `gguf` into a Hugging Face model directory `out_dir` (which must not exist,
    or be empty), with weights saved in `dtype`. Returns a summary."""
    log = log or _quiet
    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}", hint=f"choose one of {', '.join(DTYPES)}")
    path = Path(gguf).expanduser().absolute()
    out_dir = Path(out_dir).expanduser().absolute()
    if not path.is_file():
        raise UsageError(f"GGUF file not found: {gguf}" if not path.exists() else f"{gguf} is not a file")
    _check_out_dir(out_dir)
    started = time.monotonic()
    info = inspect_gguf(path)
    _check_supported(path, info["arch"], info["experts"])
    if info["arch"] in ("gemma2", "gemma3") and info["tokenizer"] not in (None, "llama"):
        # transformers rebuilds every gemma GGUF's tokenizer as SentencePiece: a BPE one would load and then fail
        raise UsageError(
            f"{path}: a {info['arch']} GGUF with a {info['tokenizer']} (byte-level BPE) tokenizer; transformers "
            f"reads a Gemma GGUF's tokenizer as SentencePiece only",
            hint="import needs Gemma's own SentencePiece tokenizer (tokenizer.model when the GGUF was exported)",
        )
    log(
        f"{path.name}: {info['arch']}, {info['tensors']} tensors ({', '.join(info['types'])}); loading with "
        f"transformers"
    )

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{time.monotonic_ns()}"
    try:
        params = _convert(path, tmp, dtype, _config_overrides(info))
        _match_pre_tokenizer(tmp, info.get("tokenizer_pre"))
        from llmforge.stage import replace_dir

        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    seconds = time.monotonic() - started
    log(f"wrote {out_dir} ({params / 1e6:.1f} M parameters, {dtype}) in {seconds:.1f}s")
    return {
        "path": str(out_dir),
        "arch": info["arch"],
        "tensors": info["tensors"],
        "source_types": info["types"],
        "params": params,
        "dtype": dtype,
        "seconds": round(seconds, 3),
    }


def _config_overrides(info: dict) -> dict:
    """What transformers' GGUF config reader leaves out, from the file itself. It maps no key to `head_dim`, so a
    model whose head length is not hidden_size / heads (Qwen3's explicit head_dim, written as the key length) would
    get the config class's default and fail on every attention tensor's shape; and it does not look at whether the
    file has an output head, which is what tied embeddings mean in GGUF."""
    out: dict = {"tie_word_embeddings": info["tied"]}
    if info.get("head_dim"):
        out["head_dim"] = info["head_dim"]
    meta = info.get("meta") or {}
    if info["arch"] in MOE_READERS and meta.get("expert_feed_forward_length"):
        # the reader maps no key to the expert FFN length, so every expert tensor would mismatch the config default
        out["moe_intermediate_size"] = int(meta["expert_feed_forward_length"])
    if info["arch"] == "phi3":
        # Phi-3 rotates part of each head; the reader leaves partial_rotary_factor at 1 (every dimension rotated)
        # and the logits change. The file has the rotated dimensions; the head length is hidden / heads for Phi-3.
        dims, heads, hidden = (
            meta.get(k) for k in ("rope.dimension_count", "attention.head_count", "embedding_length")
        )
        if dims and heads and hidden:
            out["rope_parameters"] = {"partial_rotary_factor": int(dims) * int(heads) / int(hidden)}
    # Gemma: soft-caps, attention scale, sliding layers and RoPE bases, which that reader leaves at their defaults
    from llmforge_plugins.gguf.arch.gemma import hf_config

    out.update(hf_config(info["arch"], info.get("meta") or {}))
    return out


def _convert(path: Path, out: Path, dtype: str, overrides: dict | None = None) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch_dtype = getattr(torch, dtype)
    try:
        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        for key, value in (overrides or {}).items():
            current = getattr(config, key, None)
            # a dict override (rope_parameters) adds to what the reader set rather than replacing it
            setattr(
                config, key, {**current, **value} if isinstance(value, dict) and isinstance(current, dict) else value
            )
        # output_loading_info makes it a (model, info) pair, which the stubs do not say
        pair: Any = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, config=config, output_loading_info=True
        )
        loaded, loading = pair
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (ValueError, KeyError, RuntimeError, OSError, NotImplementedError) as exc:
        raise UsageError(f"{path}: transformers cannot load this GGUF ({' '.join(str(exc).split())[:300]})") from None
    # transformers initialises at random what the file does not give it, and only warns: never save that
    missing = sorted(set(loading.get("missing_keys") or ()) | {str(k) for k in loading.get("mismatched_keys") or ()})
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise UsageError(
            f"{path}: transformers found no weights in this GGUF for {shown}; the import would have random weights "
            "there",
            hint="the file's architecture or tensor names are not what transformers' GGUF reader expects",
        )
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are dequantized already; the new folder is plain
    state = {k: v.to(torch_dtype) for k, v in loaded.state_dict().items()}
    del loaded
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    del state
    params = sum(p.numel() for p in model.parameters())
    out.mkdir()
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    return params
