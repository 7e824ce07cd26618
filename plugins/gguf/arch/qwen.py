"""Qwen2 / Qwen2.5 and Qwen3: llama.cpp's `qwen2` and `qwen3` architectures.

Both rotate halves of each head as transformers does (NeoX-style RoPE), so q/k rows are written as stored, and
neither gets `vocab_size` nor `rope.dimension_count` (llama.cpp's converter writes those for `llama` only).

* Qwen2: q/k/v projections carry biases (required in every layer);
* Qwen3: per-head RMS norms on queries and keys (`attn_q_norm`, `attn_k_norm`, required), no biases
  (`attention_bias = true` is refused: llama.cpp's qwen3 has none), and an explicit `head_dim` that need not be
  hidden_size / heads: it becomes the key/value length (written by the common metadata whenever config.json
  names head_dim).

Their sliding window applies only when `use_sliding_window` is true (then a warning: llama.cpp attends to the
whole context).
"""

from __future__ import annotations

from llmforge.errors import UsageError
from llmforge_plugins.gguf.arch.base import LLAMA_LAYER_PARTS, Arch, HParams, Log, config_path


class Qwen2(Arch):
    hf_names: tuple[str, ...] = ("Qwen2ForCausalLM",)
    gguf_arch = "QWEN2"
    layer_parts: tuple[str, ...] = (*LLAMA_LAYER_PARTS, "attn_q.bias", "attn_k.bias", "attn_v.bias")

    def sliding_window(self, hp: HParams) -> int | None:
        if not hp.config.get("use_sliding_window"):
            return None  # Qwen configs name a window they do not use
        return super().sliding_window(hp)


class Qwen3(Qwen2):
    hf_names: tuple[str, ...] = ("Qwen3ForCausalLM",)
    gguf_arch = "QWEN3"
    layer_parts: tuple[str, ...] = (*LLAMA_LAYER_PARTS, "attn_q_norm.weight", "attn_k_norm.weight")

    def check(self, hp: HParams, log: Log) -> None:
        super().check(hp, log)
        if hp.config.get("attention_bias"):
            # llama.cpp's qwen3 graph has no attention biases: it refuses such a file ("wrong number of tensors")
            raise UsageError(
                f"{config_path(hp.where)}: attention_bias = true; llama.cpp's qwen3 architecture has no "
                f"attention biases"
            )
