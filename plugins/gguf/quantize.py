"""Quantize a GGUF with llama.cpp's own quantizer (through llama-cpp-python's C API).

K-quants and IQ types exist only in llama.cpp's C code, so quantization is a call to
`llama_model_quantize`: this module picks the file type, checks the input and the importance matrix
before any work, hands the matrix over as the C array the API expects, and turns a failure into a
`UsageError` that repeats llama.cpp's reason. The result is written under a temporary name in the
output folder and renamed into place, so a failed or interrupted run leaves no partial file.

No heavy import at module level: llama_cpp, gguf and numpy are imported inside the functions.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from llmforge.errors import UsageError
from llmforge.schema import did_you_mean

# llama.cpp's `enum llama_ftype` (include/llama.h of the llama.cpp vendored by llama-cpp-python 0.3.36, which
# pyproject pins exactly). Written out rather than read from llama_cpp so that listing the types, validating
# a config or `--help` never loads the native library; a test checks every value against
# `llama_cpp.LLAMA_FTYPE_*`. NVFP4 (39) is left out: this release's quantizer has no default tensor type for
# it and refuses it ("invalid output file type").
QUANT_TYPES: dict[str, int] = {
    "F32": 0,
    "F16": 1,
    "BF16": 32,
    "Q8_0": 7,
    "Q6_K": 18,
    "Q5_K_M": 17,
    "Q5_K_S": 16,
    "Q5_1": 9,
    "Q5_0": 8,
    "Q4_K_M": 15,
    "Q4_K_S": 14,
    "Q4_1": 3,
    "Q4_0": 2,
    "IQ4_XS": 30,
    "IQ4_NL": 25,
    "Q3_K_L": 13,
    "Q3_K_M": 12,
    "Q3_K_S": 11,
    "IQ3_M": 27,
    "IQ3_S": 26,
    "IQ3_XS": 22,
    "IQ3_XXS": 23,
    "Q2_K": 10,
    "Q2_K_S": 21,
    "IQ2_M": 29,
    "IQ2_S": 28,
    "IQ2_XS": 20,
    "IQ2_XXS": 19,
    "IQ1_M": 31,
    "IQ1_S": 24,
    "TQ2_0": 37,
    "TQ1_0": 36,
    "Q2_0": 41,
    "Q1_0": 40,
    "MXFP4_MOE": 38,
}

# File types whose main tensor types llama.cpp refuses to produce without an importance matrix
# (`tensor_requires_imatrix` in src/llama-quant.cpp: a tensor whose target type is IQ1_S/M, IQ2_XXS/XS/S or
# IQ3_XXS, or Q2_K inside a Q2_K_S file; token embeddings and output excepted). IQ2_S files use IQ2_XS
# tensors, IQ2_M files IQ2_S ones, and IQ3_XS files put attn_q/attn_k in IQ3_XXS, so all of them need one.
# A model whose rows are not a multiple of 256 falls back to other types and might pass without one, but
# asking for the matrix up front is the rule users can rely on.
IMATRIX_TYPES = frozenset({"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_XS", "Q2_K_S"})

# Tensor types that are plain floats: anything else in an input file is already quantized.
FLOAT_TYPES = frozenset({"F32", "F16", "BF16"})

Log = Callable[..., None]


def _quiet(message: str, level: str = "info") -> None:
    pass


def normalize_qtype(qtype: str) -> str:
    """'q4_k_m' -> 'Q4_K_M'; an unknown name is a UsageError listing the known ones."""
    name = str(qtype).strip().upper().replace("-", "_")
    if name not in QUANT_TYPES:
        raise UsageError(
            f"unknown quantization type '{qtype}'{did_you_mean(name, QUANT_TYPES)}",
            hint="valid types: " + ", ".join(QUANT_TYPES),
        )
    return name


def needs_imatrix(qtype: str) -> bool:
    return normalize_qtype(qtype) in IMATRIX_TYPES


def file_type_name(ftype: int | None) -> str | None:
    """The QUANT_TYPES name of a `general.file_type` value (None when unknown)."""
    for name, value in QUANT_TYPES.items():
        if value == ftype:
            return name
    return None


# ------------------------------------------------------------------------------------------------
# reading a GGUF's header


def read_gguf(path: Path):
    """Open a GGUF with the gguf package's reader (memory-mapped: only the header is parsed), or raise a
    UsageError naming the file and what is wrong with it: missing, not a GGUF, truncated or damaged."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: GGUF file not found")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise UsageError(
            f"{path}: not a GGUF file (it starts with {magic!r}, a GGUF starts with b'GGUF')",
            hint="give the .gguf written by `llmforge gguf export`",
        )
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # the reader fails with numpy/index errors on a cut-off file
        raise UsageError(
            f"{path}: truncated or damaged GGUF ({type(exc).__name__}: {exc})",
            hint="export it again; an interrupted copy or download leaves such a file",
        ) from None
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise UsageError(f"{path}: truncated GGUF: tensor '{t.name}' ends past the end of the file")
    return reader


def gguf_field(reader, key: str):
    """A metadata value (a number, a string, a list), or None when the key is absent."""
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def tensor_types(reader) -> Counter:
    return Counter(t.tensor_type.name for t in reader.tensors)


# ------------------------------------------------------------------------------------------------
# the importance matrix as the C API wants it


def _imatrix_array(imatrix: dict, reader, qtype: str, source: Path):
    """A ctypes array of `llama_model_imatrix_data`, one entry per tensor, ended by an entry whose name is
    NULL (llama-quant.cpp walks the array until `p->name == nullptr`). The quantizer wants, per tensor,
    `ne[0] * ne[2]` floats (columns, times experts for a 3-D expert tensor) and aborts on any other size, so
    sizes are checked here first, naming the tensor. The numpy arrays must outlive the call: they are
    returned with the array."""
    import ctypes

    import llama_cpp
    import numpy as np

    expected = {}
    for t in reader.tensors:
        shape = [int(n) for n in t.shape]  # gguf order: ne[0] (columns) first
        if len(shape) >= 2:
            expected[t.name] = shape[0] * (shape[2] if len(shape) > 2 else 1)
    matched = [name for name in imatrix if name in expected]
    if not matched:
        raise UsageError(
            f"{source}: the importance matrix names none of this model's tensors "
            f"(it has e.g. {', '.join(sorted(imatrix)[:3]) or 'nothing'})",
            hint="compute it from the same model the GGUF was exported from",
        )
    for name in matched:
        if imatrix[name].size != expected[name]:
            raise UsageError(
                f"{source}: importance matrix entry '{name}' has {imatrix[name].size} values, "
                f"the tensor has {expected[name]} columns",
                hint="compute it from the same model the GGUF was exported from",
            )
    if qtype in IMATRIX_TYPES:
        missing = sorted(n for n in expected if n not in imatrix and n != "token_embd.weight" and n != "output.weight")
        if missing:
            raise UsageError(
                f"{source}: the importance matrix has no entry for {missing[0]}"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                + f"; {qtype} needs one for every weight matrix"
            )

    keep = [np.ascontiguousarray(imatrix[name], dtype=np.float32) for name in matched]
    names = [name.encode() for name in matched]
    arr = (llama_cpp.llama_model_imatrix_data * (len(matched) + 1))()  # zero-filled: the last is the end mark
    for i, (name, data) in enumerate(zip(names, keep)):
        arr[i].name = name
        arr[i].data = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        arr[i].size = data.size
    return arr, (keep, names)


# ------------------------------------------------------------------------------------------------
# llama.cpp's log


class _CapturedLog:
    """Routes llama.cpp's log to a list while the quantizer runs (it prints one line per tensor, and the
    reason for a failure only there), then gives the log back to llama-cpp-python's own handler."""

    def __init__(self):
        self.lines: list[tuple[int, str]] = []

    def __enter__(self):
        import ctypes

        import llama_cpp

        def collect(level, text, user_data):
            self.lines.append((level, text.decode("utf-8", errors="replace")))

        self._callback = llama_cpp.llama_log_callback(collect)  # referenced until __exit__: C holds the pointer
        llama_cpp.llama_log_set(self._callback, ctypes.c_void_p(0))
        return self

    def __exit__(self, *exc):
        import ctypes

        import llama_cpp
        from llama_cpp import _logger

        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
        return False

    def errors(self) -> list[str]:
        return [text.strip() for level, text in self.lines if level == 3 and text.strip()]

    def failure(self) -> str:
        """llama.cpp's reason: the text after 'failed to quantize:' when present."""
        for line in reversed(self.errors()):
            if "failed to quantize:" in line:
                return line.split("failed to quantize:", 1)[1].strip()
        errors = [line for line in self.errors() if not set(line) <= set("=")]
        return errors[-1] if errors else "no reason given"


# ------------------------------------------------------------------------------------------------
# quantize


def _check_input(reader, src: Path) -> None:
    # llama.cpp refuses to requantize by default (allow_requantize): quantizing an already quantized file
    # stacks two rounding errors, so the F32/F16/BF16 export is the one to start from.
    quantized = sorted({t.tensor_type.name for t in reader.tensors} - FLOAT_TYPES)
    if quantized:
        raise UsageError(
            f"{src}: already quantized ({', '.join(quantized)} tensors); llama.cpp quantizes from "
            "F32, F16 or BF16 only",
            hint="quantize the F32/F16/BF16 export instead",
        )


def quantize_gguf(
    src: Path, out: Path, qtype: str, *, imatrix: Path | None = None, threads: int = 0, log: Log | None = None
) -> dict:
    """Quantize `src` (an F32/F16/BF16 GGUF) to `out` as `qtype`; with `imatrix` (a file written by
    `compute_imatrix`) the quantizer weighs each column's error by its importance. Returns a summary."""
    log = log or _quiet
    src, out = Path(src), Path(out)
    qtype = normalize_qtype(qtype)
    if imatrix is None and qtype in IMATRIX_TYPES:
        raise UsageError(
            f"{qtype} needs an importance matrix: give calibration text (--calibration FILE) "
            "or an importance matrix (--imatrix FILE)",
            hint="types that need one: " + ", ".join(sorted(IMATRIX_TYPES)),
        )
    reader = read_gguf(src)
    _check_input(reader, src)
    if out.resolve() == src.resolve():
        raise UsageError(f"{out}: the output would overwrite the input", hint="give another output name")

    c_imatrix = None
    if imatrix is not None:
        from llmforge_plugins.gguf.imatrix import load_imatrix

        c_imatrix = _imatrix_array(load_imatrix(imatrix), reader, qtype, Path(imatrix))
    src_types = tensor_types(reader)
    del reader  # closes the memory map before llama.cpp opens the file

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    log(f"quantizing {src.name} -> {out.name} ({qtype}{', with importance matrix' if imatrix else ''})")
    start = time.monotonic()
    try:
        rc, reason = _run_quantizer(src, tmp, QUANT_TYPES[qtype], c_imatrix, threads)
        if rc != 0:
            raise UsageError(f"llama.cpp could not quantize {src} to {qtype}: {reason}")
        out_types = tensor_types(read_gguf(tmp))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    seconds = time.monotonic() - start
    src_bytes, out_bytes = src.stat().st_size, out.stat().st_size

    summary = {
        "src": str(src),
        "out": str(out),
        "qtype": qtype,
        "ftype": QUANT_TYPES[qtype],
        "imatrix": str(imatrix) if imatrix else None,
        "imatrix_entries": len(c_imatrix[1][0]) if c_imatrix else 0,
        "src_bytes": src_bytes,
        "bytes": out_bytes,
        "src_tensor_types": dict(src_types),
        "tensor_types": dict(out_types),
        "seconds": round(seconds, 3),
    }
    log(
        f"{out.name}: {out_bytes / 2**20:.1f} MiB ({out_bytes / src_bytes:.0%} of the "
        f"input) in {seconds:.1f} s; tensor types " + ", ".join(f"{k} x{v}" for k, v in sorted(out_types.items()))
    )
    return summary


def _run_quantizer(src: Path, tmp: Path, ftype: int, c_imatrix, threads: int) -> tuple[int, str]:
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = int(threads)
    if c_imatrix is not None:
        params.imatrix = ctypes.cast(c_imatrix[0], type(params.imatrix))
    with _CapturedLog() as captured:
        rc = llama_cpp.llama_model_quantize(os.fsencode(src), os.fsencode(tmp), ctypes.byref(params))
    return int(rc), captured.failure() if rc else ""
