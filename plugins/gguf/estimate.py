"""The gguf stage's estimate for `llmforge plan`: the files it writes (the export and each quantization,
from bits per weight) and the memory of the export and of the optional check and importance matrix.

Arithmetic on the model's shape (llmforge.planning); no torch, no llama.cpp, no file read.
"""

from __future__ import annotations

from llmforge.planning import GIB, RUNTIME_BYTES, Estimate, Shape

# Bits per weight of llama.cpp's file types, from llama-quantize's own table (sizes of Llama-3-8B files,
# which include the mixed-precision tensors each type keeps) or the type's nominal width.
_LLAMA3_8B_PARAMS = 8.03e9
_SIZES_GIB = {
    "Q2_K": 2.96,
    "Q2_K_S": 2.96,
    "Q3_K_S": 3.41,
    "Q3_K_M": 3.74,
    "Q3_K_L": 4.03,
    "Q4_0": 4.34,
    "Q4_1": 4.78,
    "Q4_K_S": 4.37,
    "Q4_K_M": 4.58,
    "Q5_0": 5.21,
    "Q5_1": 5.65,
    "Q5_K_S": 5.21,
    "Q5_K_M": 5.33,
    "Q6_K": 6.14,
    "Q8_0": 7.96,
}
GGUF_BPW: dict[str, float] = {k: v * GIB * 8 / _LLAMA3_8B_PARAMS for k, v in _SIZES_GIB.items()}
GGUF_BPW.update(
    {
        "F32": 32.0,
        "F16": 16.0,
        "BF16": 16.0,
        "IQ1_S": 1.56,
        "IQ1_M": 1.75,
        "TQ1_0": 1.69,
        "TQ2_0": 2.06,
        "IQ2_XXS": 2.06,
        "IQ2_XS": 2.31,
        "IQ2_S": 2.5,
        "IQ2_M": 2.7,
        "IQ3_XXS": 3.06,
        "IQ3_XS": 3.3,
        "IQ3_S": 3.44,
        "IQ3_M": 3.66,
        "IQ4_XS": 4.25,
        "IQ4_NL": 4.5,
        "Q4_K": GGUF_BPW["Q4_K_M"],
        "Q5_K": GGUF_BPW["Q5_K_M"],
        "Q3_K": GGUF_BPW["Q3_K_M"],
    }
)


def gguf_estimate(shape: Shape, outtype: str, quantize: list[str], check: bool, imatrix: bool) -> Estimate:
    """Disk: the export in `outtype` and one file per quantization type. Memory: the export streams one
    tensor at a time; the check and the importance matrix hold the HF model in fp32 next to the largest
    GGUF file, which llama.cpp maps."""
    P = shape.params()
    files = {f"export ({outtype.upper()})": P * GGUF_BPW.get(outtype.upper(), 16.0) / 8}
    for q in quantize:
        files[q.upper()] = P * GGUF_BPW.get(q.upper(), 8.0) / 8
    parts: dict[str, float] = {
        "runtime": RUNTIME_BYTES["cpu"],
        "one tensor at a time (export)": shape.vocab * shape.hidden * 8,
    }
    if check or imatrix:
        parts["HF model (fp32, for check/imatrix)"] = P * 4
        parts["largest GGUF (llama.cpp)"] = max(files.values())
    mem = {k: int(v) for k, v in parts.items()}
    disk = {k: int(v) for k, v in files.items()}
    return Estimate("cpu", sum(mem.values()), mem, 0, {}, sum(disk.values()), disk, shape=shape)
