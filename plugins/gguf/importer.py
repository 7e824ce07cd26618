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
        name = name_field.contents() if name_field is not None else None
        size = path.stat().st_size
        for t in reader.tensors:
            # the reader maps what it can; a tensor that ends past the file means a truncated copy
            if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
                raise ValueError(f"tensor {t.name} extends past the end of the file")
        types = sorted({t.tensor_type.name for t in reader.tensors})
        count = len(reader.tensors)
    except Exception as exc:  # the reader raises ValueError, IndexError, struct errors...: all mean "not valid"
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise UsageError(
            f"{path}: not a valid GGUF file ({reason})",
            hint="the file is damaged or incomplete: export or download it again",
        ) from None
    if not arch:
        raise UsageError(f"{path}: the GGUF has no general.architecture")
    return {"arch": arch, "name": name, "tensors": count, "types": types}


def _check_supported(path: Path, arch: str) -> None:
    try:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
    except ImportError:  # moved in some transformers version: let from_pretrained decide
        return
    if arch not in GGUF_SUPPORTED_ARCHITECTURES:
        raise UsageError(
            f"{path}: transformers cannot load GGUF architecture '{arch}'",
            hint=f"it reads: {', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))}",
        )


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
    _check_supported(path, info["arch"])
    log(
        f"{path.name}: {info['arch']}, {info['tensors']} tensors ({', '.join(info['types'])}); loading with "
        f"transformers"
    )

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{time.monotonic_ns()}"
    try:
        params = _convert(path, tmp, dtype)
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


def _convert(path: Path, out: Path, dtype: str) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch_dtype = getattr(torch, dtype)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (ValueError, KeyError, RuntimeError, OSError, NotImplementedError) as exc:
        raise UsageError(f"{path}: transformers cannot load this GGUF ({' '.join(str(exc).split())[:300]})") from None
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
