"""GGUF -> a Hugging Face model directory (safetensors, config, tokenizer with its chat template).

transformers reads GGUF itself (`from_pretrained(folder, gguf_file=name)`, dequantizing every tensor
to float32) and rebuilds the tokenizer and chat template from the file's metadata. What it loads is
marked as "quantized with gguf" and refuses `save_pretrained`, so the weights are moved into a plain
model built from the same config (on the meta device, so they are not copied), which saves normally.

A Mixtral GGUF (llama.cpp's "llama" architecture with stacked experts, which transformers' reader takes for a dense
Llama) is loaded the same way for everything but its experts; those and the routers are read from the file here
and the model is saved as transformers' MixtralForCausalLM.

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


#: GGUF architectures whose stacked experts llmforge reads itself, and the model they are: llama.cpp writes Mixtral as
#: its "llama" architecture plus experts, which transformers' reader would load as a dense Llama without its MLP
OWN_MOE = {"llama": "MixtralForCausalLM"}


def _check_supported(path: Path, arch: str, experts: bool = False) -> None:
    if experts and arch not in MOE_READERS and arch not in OWN_MOE:
        # transformers would read the file as the dense model of that architecture, find no MLP weights and
        # initialise them at random
        raise UsageError(
            f"{path}: a mixture-of-experts GGUF (ffn_*_exps expert tensors) of architecture '{arch}'; transformers "
            "reads it as a dense model without its experts, so the import would have random MLP weights",
            hint=f"the import reads the experts of: {', '.join(sorted([*MOE_READERS, *OWN_MOE]))} GGUFs",
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
    folder that passes here exports under the file's own name. Likewise whole-word lookup before merging: llama.cpp's
    'llama-bpe' (Llama 3) does it, transformers' rebuild of such a file does not, so some words tokenized
    differently and the folder's export was refused."""
    import json

    from llmforge_plugins.gguf.vocab import KNOWN_SPLITS, split_hash

    path = folder / "tokenizer.json"
    if not path.is_file():
        return
    if pre in PRE_TOKENIZERS:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(path))
        split = KNOWN_SPLITS.get(split_hash(tokenizer))
        if split is None or split.pre != pre:
            tokenizer.pre_tokenizer = PRE_TOKENIZERS[pre]()
            tokenizer.save(str(path))
    if any(known.pre == pre and known.ignore_merges for known in KNOWN_SPLITS.values()):
        raw = json.loads(path.read_text(encoding="utf-8"))
        model = raw.get("model") or {}
        if model.get("type") == "BPE" and not model.get("ignore_merges"):
            model["ignore_merges"] = True
            path.write_text(json.dumps(raw, ensure_ascii=False, indent=2), encoding="utf-8")


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
        params = _convert(path, tmp, dtype, _config_overrides(info), _own_experts(path, info))
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


def _convert(path: Path, out: Path, dtype: str, overrides: dict | None = None, experts: dict | None = None) -> int:
    """Load the GGUF with transformers and save it as a plain HF folder. `experts` (Mixtral's expert counts, from
    the file's metadata) means a "llama" GGUF with stacked experts: transformers loads all but the experts (the same
    path, RoPE rows and tokenizer as a Llama import), the experts and routers are read from the file here."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch_dtype = getattr(torch, dtype)
    mixtral = experts is not None
    try:
        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        for key, value in (overrides or {}).items():
            current = getattr(config, key, None)
            # a dict override (rope_parameters) adds to what the reader set rather than replacing it
            setattr(
                config, key, {**current, **value} if isinstance(value, dict) and isinstance(current, dict) else value
            )
        # output_loading_info makes it a (model, info) pair, which the stubs do not say
        verbosity = hf_logging.get_verbosity()
        if mixtral:
            # its load report would call the dense MLP "newly initialized": true, and replaced by the experts below
            hf_logging.set_verbosity_error()
        try:
            pair: Any = AutoModelForCausalLM.from_pretrained(
                str(path.parent), gguf_file=path.name, config=config, output_loading_info=True
            )
        finally:
            hf_logging.set_verbosity(verbosity)
        loaded, loading = pair
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (ValueError, KeyError, RuntimeError, OSError, NotImplementedError) as exc:
        raise UsageError(f"{path}: transformers cannot load this GGUF ({' '.join(str(exc).split())[:300]})") from None
    # transformers initialises at random what the file does not give it, and only warns: never save that
    missing_set = set(loading.get("missing_keys") or ()) | {str(k) for k in loading.get("mismatched_keys") or ()}
    dense_mlp: set[str] = set()
    if mixtral:
        # transformers read the file as a dense Llama: its MLP is what the experts replace below, and nothing else
        # may be missing
        n_layers = loaded.config.num_hidden_layers
        dense_mlp = {
            f"model.layers.{i}.mlp.{p}.weight" for i in range(n_layers) for p in ("gate_proj", "up_proj", "down_proj")
        }
        missing_set -= dense_mlp
    missing = sorted(missing_set)
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
    state = dict(loaded.state_dict())
    del loaded
    if experts is not None:
        config = _mixtral_config(config, experts)
        state = {k: v for k, v in state.items() if k not in dense_mlp}
        state.update(_experts_from_file(path, config.num_hidden_layers))
    state = {k: v.to(torch_dtype) for k, v in state.items()}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:  # a tensor of the wrong shape for the config the file's metadata gives
        raise UsageError(f"{path}: the tensors do not fit the model ({' '.join(str(exc).split())[:300]})") from None
    model.tie_weights()
    del state
    params = sum(p.numel() for p in model.parameters())
    out.mkdir()
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    return params


def _own_experts(path: Path, info: dict) -> dict | None:
    """The expert counts of a GGUF whose experts llmforge reads itself (Mixtral), None for every other file."""
    if not (info["experts"] and info["arch"] in OWN_MOE):
        return None
    meta = info.get("meta") or {}
    keys = {"num_local_experts": "expert_count", "num_experts_per_tok": "expert_used_count"}
    absent = [f"{info['arch']}.{key}" for key in keys.values() if not meta.get(key)]
    if absent:
        raise UsageError(f"{path}: expert tensors but no {' or '.join(absent)} in the metadata")
    return {hf_key: int(meta[key]) for hf_key, key in keys.items()}


#: what a Mixtral config takes over from the Llama config transformers read from the file
_MIXTRAL_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",  # llama.cpp's feed_forward_length: each expert's FFN length
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_parameters",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)


def _mixtral_config(llama_config, experts: dict):
    from transformers import MixtralConfig

    values = {key: getattr(llama_config, key) for key in _MIXTRAL_KEYS if getattr(llama_config, key, None) is not None}
    # llama.cpp's llama architecture attends over the whole context: no sliding window
    config = MixtralConfig(
        **values,
        num_local_experts=experts["num_local_experts"],
        num_experts_per_tok=experts["num_experts_per_tok"],
        sliding_window=None,
    )
    config.architectures = [OWN_MOE["llama"]]
    return config


def _experts_from_file(path: Path, n_layers: int) -> dict:
    """Each layer's router and experts from the GGUF, in transformers 5's in-memory MoE layout (the layout the export
    reads too, arch/moe.py): `mlp.gate.weight` (experts x hidden), `mlp.experts.gate_up_proj` (experts x 2*ff x
    hidden, gate rows first) and `mlp.experts.down_proj` (experts x hidden x ff). llama.cpp's stacks are the experts'
    matrices as transformers stores them, so only gate and up are joined; `save_pretrained` then writes the
    per-expert tensors Mixtral checkpoints have (`block_sparse_moe.experts.E.w1/w3/w2`)."""
    import gguf
    import numpy as np
    import torch

    from llmforge_plugins.gguf.arch.moe import FUSED_LAYOUT

    reader = gguf.GGUFReader(str(path))
    by_name = {t.name: t for t in reader.tensors}

    def read(name: str) -> np.ndarray:
        if name not in by_name:
            raise UsageError(f"{path}: no {name} (a mixture-of-experts GGUF has experts and a router in every layer)")
        t = by_name[name]
        return np.asarray(gguf.dequantize(t.data, t.tensor_type), dtype=np.float32)

    out = {}
    for layer in range(n_layers):
        names = {key: pattern.format(layer=layer) for key, pattern in FUSED_LAYOUT.items()}
        out[names["router"]] = torch.from_numpy(read(f"blk.{layer}.ffn_gate_inp.weight").copy())
        gate, up = read(f"blk.{layer}.ffn_gate_exps.weight"), read(f"blk.{layer}.ffn_up_exps.weight")
        out[names["gate_up"]] = torch.from_numpy(np.concatenate([gate, up], axis=1))
        del gate, up
        out[names["down"]] = torch.from_numpy(read(f"blk.{layer}.ffn_down_exps.weight").copy())
    return out
