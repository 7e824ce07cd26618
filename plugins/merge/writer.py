"""Writing safetensors files tensor by tensor.

The header of a safetensors file lists every tensor's dtype, shape and byte range, and all of that is
known before the first tensor is computed (a merge's output shapes come from its inputs). So the
header is written first, then each tensor's bytes as soon as it is computed: nothing accumulates in
memory, not even the shard being written. The format: an 8-byte little-endian header length, the
JSON header (padded with spaces to a multiple of 8), then the tensors' bytes, back to back in header
order.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

#: torch dtype name -> (safetensors dtype, bytes per element)
DTYPES = {
    "float64": ("F64", 8),
    "float32": ("F32", 4),
    "float16": ("F16", 2),
    "bfloat16": ("BF16", 2),
    "int64": ("I64", 8),
    "int32": ("I32", 4),
    "int16": ("I16", 2),
    "int8": ("I8", 1),
    "uint8": ("U8", 1),
    "bool": ("BOOL", 1),
    "float8_e4m3fn": ("F8_E4M3", 1),
    "float8_e5m2": ("F8_E5M2", 1),
}


def nbytes(dtype: str, shape: Iterable[int]) -> int:
    n = DTYPES[dtype][1]
    for d in shape:
        n *= d
    return n


def header_bytes(entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None = None) -> bytes:
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, dtype, shape in entries:
        size = nbytes(dtype, shape)
        header[name] = {"dtype": DTYPES[dtype][0], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    return raw + b" " * (-len(raw) % 8)


def write_safetensors(
    path: Path,
    entries: list[tuple[str, str, tuple[int, ...]]],
    produce: Callable[[str], Any],
    metadata: dict[str, str] | None = None,
) -> int:
    """Write `entries` (name, torch dtype name, shape) to `path`, calling `produce(name)` for each tensor
    in order. Returns the number of bytes written. The file is fsynced before returning."""
    import torch

    head = header_bytes(entries, metadata)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(head)))
        fh.write(head)
        for name, dtype, shape in entries:
            t = produce(name)
            if str(t.dtype).removeprefix("torch.") != dtype or tuple(t.shape) != tuple(shape):
                raise RuntimeError(f"{name}: produced {t.dtype} {list(t.shape)}, planned {dtype} {list(shape)}")
            data = t.detach().contiguous().reshape(-1)
            if data.numel():
                fh.write(memoryview(data.view(torch.uint8).numpy()))
            del t, data
        fh.flush()
        os.fsync(fh.fileno())
        return fh.tell()
