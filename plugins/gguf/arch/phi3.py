"""Phi-3 / Phi-3.5 / Phi-4 (`Phi3ForCausalLM`): llama.cpp's `phi3` architecture.

What is particular to it:

* the fused projections stay fused: `qkv_proj` becomes `attn_qkv` (q rows, then k, then v, as llama.cpp splits
  them) and `gate_up_proj` becomes `ffn_up`, gate half first, which llama.cpp's SwiGLU takes as the gate;
* RoPE rotates halves of each head (NeoX style, as transformers does): no q/k regrouping; only the first
  `partial_rotary_factor` of each head is rotated, written as `rope.dimension_count`;
* the original context length is written (`rope.scaling.original_context_length`) and the sliding window (0 when
  the model has none: llama.cpp tells Phi-4, which has none, from Phi-3 that way). llama.cpp does not apply Phi's
  sliding window, so a window shorter than the context is a warning (the base check);
* LongRoPE (`rope_type = "longrope"`: Phi-3-128k, Phi-3.5, Phi-4-mini): the short and long per-frequency factors
  become the `rope_factors_short` / `rope_factors_long` tensors and the attention factor (transformers' value: its
  `attention_factor`, else sqrt(1 + ln(factor) / ln(original context))) `rope.scaling.attn_factor`. transformers
  picks the long factors for a sequence longer than the original context, llama.cpp for a context (`n_ctx`) longer
  than it: they agree on short sequences in a short context and on long sequences in a long one, and the export
  says so in a warning.

llama.cpp's loader treats any model whose `general.name` contains "phi3" or "phi-3" as the Phi-3 tokenizer and
looks up `</s>`, `<unk>`, `<s>` and `<|endoftext|>` by text: when one is missing the load fails. A Phi-3 export with
such a name and such a vocabulary is refused, naming the tokens and the way out (`missing_phi3_tokens` says the same
for any family: llama.cpp decides by the name alone).
"""

from __future__ import annotations

import math

from llmforge.errors import UsageError
from llmforge_plugins.gguf.arch.base import Arch, HParams, Log, Planned, config_path

#: the tokens llama.cpp looks up by text for a model named like Phi-3 (llama-vocab.cpp)
PHI3_NAME_TOKENS = ("</s>", "<unk>", "<s>", "<|endoftext|>")
#: substrings of the lowercased general.name that make llama.cpp apply its Phi-3 tokenizer attributes
PHI3_NAME_MARKS = ("phi3", "phi-3")


def missing_phi3_tokens(name: str | None, tokens: list[str]) -> list[str]:
    """The tokens llama.cpp will fail to find when it loads a model called `name` with this vocabulary ([] when the
    name does not trigger its Phi-3 special case, or the vocabulary has them all). Applies to any architecture:
    llama.cpp decides by the name alone."""
    if not name or not any(mark in name.lower() for mark in PHI3_NAME_MARKS):
        return []
    have = set(tokens)
    return [t for t in PHI3_NAME_TOKENS if t not in have]


class Phi3(Arch):
    hf_names = ("Phi3ForCausalLM",)
    gguf_arch = "PHI3"
    # transformers' Phi-3 knows only these two ("su": LongRoPE's old name)
    rope_types = ("default", "longrope", "su")
    layer_parts = (
        "attn_norm.weight",
        "attn_qkv.weight",
        "attn_output.weight",
        "ffn_norm.weight",
        "ffn_up.weight",
        "ffn_down.weight",
    )

    def hparams(self, config: dict, where) -> HParams:
        hp = super().hparams(config, where)
        # transformers 5 keeps these inside rope_parameters and at the top level, v4 at the top level only
        factor = hp.rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor <= 1:
            raise UsageError(f"{config_path(where)}: partial_rotary_factor {factor!r} is not a number in (0, 1]")
        # the converter's formula: the rotated share of the hidden size, per head
        hp.extra["rope_dims"] = int(factor * hp.hidden) // hp.n_head
        original = hp.rope.get("original_max_position_embeddings", config.get("original_max_position_embeddings"))
        hp.extra["original_context"] = original if isinstance(original, int) and original > 0 else hp.context
        if str(hp.rope.get("rope_type", "default")).lower() in ("longrope", "su"):
            hp.extra["longrope"] = self._longrope(hp)
        return hp

    def _longrope(self, hp: HParams) -> dict:
        """The factor lists and the attention factor, as transformers computes them (`_compute_longrope_parameters`)."""
        where, half = config_path(hp.where), hp.extra["rope_dims"] // 2
        out: dict = {}
        for key in ("short_factor", "long_factor"):
            values = hp.rope.get(key)
            if (
                not isinstance(values, list)
                or len(values) != half
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
            ):
                raise UsageError(
                    f"{where}: LongRoPE needs {key}, a list of {half} numbers (half the rotated dimensions)"
                )
            out[key] = values
        original = hp.extra["original_context"]
        factor = hp.rope.get("factor") or hp.context / original
        attention = hp.rope.get("attention_factor")
        if attention is None:
            attention = math.sqrt(1 + math.log(factor) / math.log(original)) if factor > 1 else 1.0
        out["attn_factor"] = float(attention)
        return out

    def check(self, hp: HParams, log: Log) -> None:
        super().check(hp, log)
        if "longrope" in hp.extra:
            n = hp.extra["original_context"]
            log(
                f"LongRoPE: llama.cpp uses the long factors whenever its context (n_ctx) is over {n} tokens, "
                f"transformers only for sequences over {n}: with a longer context, prompts under {n} tokens are "
                f"computed a little differently from transformers",
                "warning",
            )
        if hp.head_dim * hp.n_head != hp.hidden:
            raise UsageError(
                f"{config_path(hp.where)}: head_dim {hp.head_dim} x {hp.n_head} heads is not hidden_size "
                f"{hp.hidden}; llama.cpp's phi3 architecture derives the head size from them"
            )
        dims = hp.extra["rope_dims"]
        if dims % 2 or dims > hp.head_dim:
            raise UsageError(
                f"{config_path(hp.where)}: partial_rotary_factor gives {dims} rotated dimensions per head of "
                f"{hp.head_dim}; llama.cpp needs an even number no larger than the head"
            )

    def metadata(self, writer, hp: HParams, log: Log) -> None:
        writer.add_rope_scaling_orig_ctx_len(hp.extra["original_context"])
        writer.add_rope_dimension_count(hp.extra["rope_dims"])
        window = self.sliding_window(hp)
        writer.add_sliding_window(window if window is not None else 0)
        if "longrope" in hp.extra:
            writer.add_rope_scaling_attn_factors(hp.extra["longrope"]["attn_factor"])
        self._check_name(writer, hp)

    def extra_tensors(self, hp: HParams) -> list[Planned]:
        """LongRoPE's per-frequency factors, one short and one long set shared by every layer."""
        import gguf
        import numpy as np

        if "longrope" not in hp.extra:
            return []
        out = []
        for kind, key in (
            (gguf.MODEL_TENSOR.ROPE_FACTORS_LONG, "long_factor"),
            (gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT, "short_factor"),
        ):
            values = np.asarray(hp.extra["longrope"][key], dtype=np.float32)
            out.append(Planned(gguf.TENSOR_NAMES[kind] + ".weight", (), values.shape, data=values))
        return out

    def _check_name(self, writer, hp: HParams) -> None:
        """Refuse a general.name that makes llama.cpp look for Phi-3's tokens in a vocabulary without them (it
        would fail to load the file). The name is final here: the common metadata has been written."""
        from llmforge_plugins.gguf.vocab import read_vocab

        entry = writer.kv_data[0].get("general.name")
        name = str(entry.value) if entry is not None else None
        if not name or not any(mark in name.lower() for mark in PHI3_NAME_MARKS):
            return
        missing = missing_phi3_tokens(name, read_vocab(hp.where, hp.config).tokens)
        if missing:
            raise UsageError(
                f"{hp.where}: the GGUF would be named {name!r}, and llama.cpp treats any model named like "
                f"Phi-3 as having Phi-3's tokenizer: it looks up {', '.join(PHI3_NAME_TOKENS)} and fails to load "
                f"the file when {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not in the vocabulary",
                hint="rename the model folder (or the model card's name) so that it does not contain 'phi3' or "
                "'phi-3', or keep Phi-3's own tokenizer",
            )
