"""Selected metadata keys of a GGUF, read without parsing the rest.

gguf's `GGUFReader` parses every metadata value into numpy views, one per element: for a 152k-token
vocabulary with as many merges (Qwen2) that is ~450k parts, ~10 s and ~230 MB in-process. A caller that needs
a handful of keys (the Ollama Modelfile: the chat template, three token ids and their strings) reads them here
instead: the header is walked once through a memory map, values of unwanted keys are stepped over (numeric
arrays in one jump, string arrays by their lengths, never decoded), and only the wanted keys are decoded.

The layout (GGUF v2/v3, little-endian): magic b"GGUF", version u32, tensor count u64, key count u64; per key
a string (u64 length + UTF-8 bytes), a value type u32 and the value, where an array is an element type u32, a
count u64 and the elements. Then per tensor: name, dimension count u32, dimensions u64 each, ggml type u32 and
data offset u64 (from the start of the data, which begins at the next multiple of `general.alignment`).

A missing, foreign, truncated or damaged file is a UsageError naming it, as with quantize.read_gguf.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from llmforge.errors import UsageError

# value type -> struct format of one scalar; 8 is a string, 9 an array
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_DEFAULT_ALIGNMENT = 32


class _Cut(Exception):
    """The header ends (or claims to end) past the end of the file."""


class _Header:
    def __init__(self, buf: mmap.mmap | bytes):
        self.buf, self.pos, self.size = buf, 0, len(buf)

    def _take(self, n: int) -> int:
        at = self.pos
        if n < 0 or at + n > self.size:
            raise _Cut
        self.pos = at + n
        return at

    def scalar(self, fmt: str) -> Any:
        return struct.unpack_from(fmt, self.buf, self._take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.scalar("<Q")
        at = self._take(n)
        return bytes(self.buf[at : at + n]).decode("utf-8", errors="replace")

    def skip_strings(self, count: int) -> None:
        # Only the lengths are read: no bytes are copied or decoded.
        buf, pos, size = self.buf, self.pos, self.size
        for _ in range(count):
            if pos + 8 > size:
                raise _Cut
            pos += 8 + struct.unpack_from("<Q", buf, pos)[0]
        if pos > size:
            raise _Cut
        self.pos = pos

    def value(self, vtype: int, want: bool) -> Any:
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        if vtype == _STRING:
            if want:
                return self.string()
            self.skip_strings(1)
            return None
        if vtype != _ARRAY:
            raise ValueError(f"unknown metadata value type {vtype}")
        etype, count = self.scalar("<I"), self.scalar("<Q")
        if etype in _SCALARS:
            width = struct.calcsize(_SCALARS[etype])
            at = self._take(width * count)
            if not want:
                return None
            return list(struct.unpack_from(f"<{count}{_SCALARS[etype][1]}", self.buf, at))
        if etype == _STRING:
            if want:
                return [self.string() for _ in range(count)]
            self.skip_strings(count)
            return None
        if etype == _ARRAY and count == 0:
            return [] if want else None
        raise ValueError(f"unsupported metadata array element type {etype}")


def _data_end(h: _Header, n_tensors: int, alignment: int) -> int:
    """Where the last tensor's data ends, from the tensor infos after the metadata."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    end = 0
    for _ in range(n_tensors):
        name = h.string()
        dims = [h.scalar("<Q") for _ in range(h.scalar("<I"))]
        ggml_type, offset = h.scalar("<I"), h.scalar("<Q")
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
        except (ValueError, KeyError):
            raise ValueError(f"tensor '{name}' has unknown ggml type {ggml_type}") from None
        n = 1
        for d in dims:
            n *= d
        end = max(end, offset + n // block * type_size)
    if not n_tensors:  # a vocabulary-only file ends with its header, unpadded
        return h.pos
    return -(-h.pos // alignment) * alignment + end


def read_metadata(
    path: Path, keys: Collection[str] | Callable[[str], bool], *, check_tensors: bool = True
) -> dict[str, Any]:
    """The values of `keys` (names, or a test of a name: a key whose name depends on the architecture) that the
    GGUF at `path` holds (absent keys are left out): numbers, bools, strings, lists. With `check_tensors`, the
    tensor infos are read too and a file too short for its tensor data is a UsageError (what quantize.read_gguf
    checks); the tensor data itself is never touched."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: GGUF file not found")
    wanted = keys if callable(keys) else set(keys).__contains__
    with open(path, "rb") as f:
        magic = f.read(4)
        if magic != b"GGUF":
            raise UsageError(
                f"{path}: not a GGUF file (it starts with {magic!r}, a GGUF starts with b'GGUF')",
                hint="give the .gguf written by `llmforge gguf export`",
            )
        file_size = path.stat().st_size
        # The memory map pages in only the header bytes walked here, whatever the size of the weights after it.
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            h = _Header(buf)
            try:
                h.pos = 4
                version = h.scalar("<I")
                if version not in (2, 3):
                    raise ValueError(f"GGUF version {version}, llmforge reads versions 2 and 3")
                n_tensors, n_keys = h.scalar("<Q"), h.scalar("<Q")
                found: dict[str, Any] = {}
                alignment = _DEFAULT_ALIGNMENT
                for _ in range(n_keys):
                    key = h.string()
                    want = wanted(key)
                    value = h.value(h.scalar("<I"), want or key == "general.alignment")
                    if key == "general.alignment":
                        alignment = int(value) or _DEFAULT_ALIGNMENT
                    if want:
                        found[key] = value
                if check_tensors and _data_end(h, n_tensors, alignment) > file_size:
                    raise _Cut
            except _Cut:
                raise UsageError(
                    f"{path}: truncated GGUF: its header or tensor data ends past the end of the file",
                    hint="export it again; an interrupted copy or download leaves such a file",
                ) from None
            except (ValueError, UnicodeDecodeError, struct.error) as exc:
                raise UsageError(
                    f"{path}: damaged GGUF ({exc})",
                    hint="export it again; an interrupted copy or download leaves such a file",
                ) from None
    return found
