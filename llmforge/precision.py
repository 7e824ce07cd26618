"""What `precision = "auto"` becomes: the one decision the training loop and `llmforge plan` share.

Pure Python (no torch): the training loop passes what torch says about the device, `llmforge plan`
what llmforge.hardware found without torch; both pass the model's parameter count.

Why the model size matters on a CPU. bf16 autocast keeps fp32 weights and casts each matrix to bf16
for every product; that pays off only where the products are large enough for native bf16 (AVX512-BF16
or AMX) to beat the cast and the fp32 kernels. Measured on an Intel Xeon with AMX and AVX512-BF16
(2 cores, December 2026), one training step (forward, backward, AdamW), batch 8 x 128 tokens, bf16
autocast against fp32 eager:

  Llama preset  parameters  hidden  bf16 speed / fp32 speed
  tiny            0.2 M        64   0.61  (slower)
  mini            3.2 M       256   1.09  (and 0.81 for the demo's pretraining at batch 32: 2m56s vs 2m22s)
  small          23.7 M       512   1.76
  base           76.3 M       768   1.85
  SmolLM2-135M-shaped         576   2.5   (334 vs 131 tokens/s, batch 4 x 256)

and the demo (the `mini` preset) also learnt less in bf16 autocast: held-out accuracy 0.03 -> 0.12
(SFT) -> 0.15 (DPO) against 0.10 -> 0.57 -> 0.65 in fp32, knowledge probe 0.62 against 0.93. So on a
CPU, `auto` picks bf16 only with native bf16 AND at least CPU_BF16_MIN_PARAMS parameters, and fp32
otherwise; a CPU without native bf16 (e.g. an AMD EPYC with AVX2 only) always trains in fp32, where
bf16 is emulated and many times slower. On CUDA, bf16 where the GPU supports it (compute capability
8.0 and later), fp16 with loss scaling before that; Apple's MPS is not used for training (fp32 on CPU).
"""

from __future__ import annotations

from dataclasses import dataclass

# Between the `mini` (3.2 M, no faster in bf16, and worse results) and `small` (23.7 M, 1.76x faster)
# presets measured above; below it fp32 is never the wrong choice.
CPU_BF16_MIN_PARAMS = 20_000_000
CHOICES = ("auto", "bf16", "fp16", "fp32")


@dataclass(frozen=True)
class Precision:
    name: str  # "bf16" | "fp16" | "fp32"
    reason: str  # why, for the training log and the plan: "" when the user asked for it


def choose_precision(
    requested: str, *, device: str, gpu_bf16: bool = False, cpu_bf16_fast: bool = False, params: int | None = None
) -> Precision:
    """The precision a training stage runs in.

    `device`: "cuda", "mps" or "cpu"; `gpu_bf16`: every GPU has bf16; `cpu_bf16_fast`: the CPU has
    AVX512-BF16 or AMX (llmforge.hardware.cpu_features()["bf16_fast"]); `params`: the model's parameter
    count (None when unknown: then a CPU trains in fp32). Anything but "auto" is returned as asked."""
    if requested != "auto":
        return Precision(requested, "")
    if device == "cuda":
        return Precision("bf16", "auto: GPU with bf16") if gpu_bf16 else Precision("fp16", "auto: GPU without bf16")
    if device == "mps":
        return Precision("fp32", "auto: trains on the CPU beside Apple's GPU")
    if not cpu_bf16_fast:
        return Precision("fp32", "auto: CPU without native bf16")
    if params is None or params < CPU_BF16_MIN_PARAMS:
        size = "model size unknown" if params is None else f"{params / 1e6:.1f} M parameters"
        return Precision(
            "fp32", f"auto: {size}, below the {CPU_BF16_MIN_PARAMS // 10**6} M where bf16 pays off on a CPU"
        )
    return Precision("bf16", f"auto: {params / 1e6:.0f} M parameters, CPU with native bf16")
