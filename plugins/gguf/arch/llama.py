"""Llama and Mistral: llama.cpp's `llama` architecture, the shape every other family is described against.

What is particular to it:

* q_proj / k_proj rows (and biases) regrouped for llama.cpp's RoPE, which rotates adjacent pairs where
  transformers rotates the two halves of each head (`rope_permute`; the key/value head count for k);
* `vocab_size` and `rope.dimension_count` written, as llama.cpp's converter does for this architecture only;
* Llama-3.1-style RoPE scaling (`rope_type = "llama3"`) as a `rope_freqs` tensor of per-frequency factors;
* Mistral runs as a Llama (its sliding window, when set, is not applied by llama.cpp: a warning).
"""

from __future__ import annotations

import math

from llmforge_plugins.gguf.arch.base import Arch, HParams, Log, Planned


def llama3_rope_factors(rope: dict, head_dim: int):
    """Per-frequency divisors for Llama-3.1-style RoPE scaling (llama.cpp's `rope_freqs` tensor):
    1 for high frequencies (short wavelengths), `factor` for low ones, a smooth blend between."""
    import numpy as np

    base = float(rope.get("rope_theta", 10000.0))
    factor = float(rope.get("factor", 8.0))
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old_context = float(rope.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / freqs
    smooth = (old_context / wavelen - low) / (high - low) if high != low else np.zeros_like(wavelen)
    blended = 1.0 / ((1.0 - smooth) / factor + smooth)
    out = np.where(wavelen < old_context / high, 1.0, np.where(wavelen > old_context / low, factor, blended))
    return out.astype(np.float32)


class Llama(Arch):
    hf_names: tuple[str, ...] = ("LlamaForCausalLM", "MistralForCausalLM")
    gguf_arch = "LLAMA"
    rope_types: tuple[str, ...] = ("default", "linear", "yarn", "llama3")
    permute_rope = True

    def metadata(self, writer, hp: HParams, log: Log) -> None:
        writer.add_vocab_size(hp.vocab_size)
        writer.add_rope_dimension_count(hp.head_dim)

    def extra_tensors(self, hp: HParams) -> list[Planned]:
        import gguf

        if str(hp.rope.get("rope_type", "default")).lower() != "llama3":
            return []
        factors = llama3_rope_factors(hp.rope, hp.head_dim)
        name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
        return [Planned(name, (), factors.shape, data=factors)]
