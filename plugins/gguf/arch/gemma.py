"""Gemma 2 and Gemma 3 (text): llama.cpp's `gemma2` and `gemma3` architectures.

What differs from a Llama-shaped decoder, and how each difference is written:

* Gemma's RMS norms multiply by (1 + weight): 1 is added to every `*norm.weight` (Gemma 3's per-head q/k norms
  too), since llama.cpp multiplies by the stored weight (`norm_offset`).
* The embedding is multiplied by sqrt(hidden_size) inside the model: llama.cpp's graphs do that themselves, so the
  embedding is written as stored. The head is the embedding (no `output.weight`); llama.cpp's gemma2 has no place
  for an untied head (refused), its gemma3 takes one.
* Each block has four norms: `attn_norm`, `post_attention_norm`, `ffn_norm` (HF pre_feedforward_layernorm) and
  `post_ffw_norm`, all required; the MLP is GeGLU with the tanh-approximated GELU (`gelu_pytorch_tanh`).
* Soft-capping: Gemma 2 caps attention logits and final logits (tanh(x / cap) * cap). llama.cpp's gemma2 always
  caps both and silently assumes 50 and 30 when the keys are absent, so both values are written, and a config that
  turns either off is refused. Gemma 3 has no attention cap in llama.cpp (refused when config.json sets one); its
  final cap is written when set.
* Sliding-window layers: llama.cpp applies the window (`attention.sliding_window`), on the layers its own pattern
  names (gemma2: every other layer from the first, gemma3: five of every six). When config.json's `layer_types`
  (or v4's `sliding_window_pattern`) names other layers, the per-layer pattern is written as an array of booleans,
  which llama.cpp reads instead.
* RoPE: Gemma 3's global layers use `rope_theta` (and its scaling), its sliding layers their own base
  (`rope_parameters.sliding_attention.rope_theta`, v4's `rope_local_base_freq`): written as `rope.freq_base_swa`.
  llama.cpp never scales the sliding layers' RoPE, so a scaled sliding entry is refused.
* Attention scale: transformers scales queries by query_pre_attn_scalar ** -0.5. llama.cpp ignores that key and
  derives the scale from the model's size: 1 / sqrt(head_dim), or 1 / sqrt(hidden_size / heads) for a 27B-sized
  model (recognised by its layer count: 46 for Gemma 2, 62 for Gemma 3). Every released Gemma agrees with that
  rule; a config where the two differ would compute something else in llama.cpp, so it is refused with both values.
* Keys a config.json leaves out are read with transformers' Gemma defaults (tied embeddings, head_dim 256, ...),
  which is what the HF model runs with, not the generic readers' Llama-minded ones.

`hf_config` at the end goes the other way, for `llmforge import`: the config values transformers' GGUF reader
leaves at its defaults, read from the file's metadata.

The converter writes `tokenizer.ggml.add_space_prefix = false` for a SentencePiece Gemma tokenizer: Gemma's
SentencePiece model adds no dummy prefix, while llama.cpp's default for that tokenizer type is to add one. Written
here too (unless tokenizer_config.json states add_prefix_space itself, which the vocabulary writer then writes).
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

from llmforge.errors import UsageError
from llmforge_plugins.gguf.arch.base import LLAMA_LAYER_PARTS, Arch, HParams, Log, config_path, need_float


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class _Gemma(Arch):
    """What Gemma 2 and Gemma 3 share. `swa_period` is llama.cpp's default pattern for the architecture (layer i
    slides when i % period < period - 1); `big_layers` is the layer count llama.cpp takes for the 27B model, whose
    attention scale is 1 / sqrt(hidden_size / heads)."""

    activations = ("gelu_pytorch_tanh",)
    rope_types: tuple[str, ...] = ("default", "linear")
    norm_offset = 1.0
    layer_parts: tuple[str, ...] = (*LLAMA_LAYER_PARTS, "post_attention_norm.weight", "post_ffw_norm.weight")
    swa_period = 2
    big_layers = 0
    #: transformers' config-class defaults for keys a config.json may leave out: what the HF model then runs with
    #: (the generic readers' defaults, e.g. untied embeddings or head_dim = hidden / heads, are not Gemma's)
    config_defaults: dict = {
        "head_dim": 256,
        "query_pre_attn_scalar": 256,
        "sliding_window": 4096,
        "tie_word_embeddings": True,
        "rms_norm_eps": 1e-6,
    }

    # -- config ------------------------------------------------------------------------------------

    def hparams(self, config: dict, where: Path) -> HParams:
        hp = super().hparams({**self.config_defaults, **config}, where)
        hp.explicit_head_dim = True  # always written, as the converter does for Gemma
        hp.extra["sliding"] = self.sliding_layers(hp)
        hp.extra["swa_theta"] = self.sliding_rope(hp)
        return hp

    def sliding_layers(self, hp: HParams) -> list[bool]:
        """Which layers transformers runs with the sliding window: `layer_types` (transformers 5), else v4's
        `sliding_window_pattern` (every pattern-th layer global), else the family's default."""
        types = hp.config.get("layer_types")
        if types is not None:
            if not isinstance(types, list) or len(types) != hp.n_layers:
                raise UsageError(
                    f"{config_path(hp.where)}: layer_types should list one type per layer ({hp.n_layers}), "
                    f"found {types!r}"
                )
            unknown = sorted({t for t in types if t not in ("sliding_attention", "full_attention")}, key=str)
            if unknown:
                raise UsageError(
                    f"{config_path(hp.where)}: layer_types has {unknown[0]!r}; Gemma layers are "
                    f"sliding_attention or full_attention"
                )
            return [t == "sliding_attention" for t in types]
        period = hp.config.get("sliding_window_pattern") or hp.config.get("_sliding_window_pattern")
        if not isinstance(period, int) or isinstance(period, bool) or period <= 0:
            period = self.swa_period
        return [(i + 1) % period != 0 for i in range(hp.n_layers)]

    def llama_cpp_sliding(self, n_layers: int) -> list[bool]:
        """The layers llama.cpp slides when the file names no pattern (llama_hparams::set_swa_pattern)."""
        p = self.swa_period
        return [i % p < p - 1 for i in range(n_layers)]

    def sliding_rope(self, hp: HParams) -> float | None:
        """The sliding layers' RoPE base when config.json gives one of their own (None: the global one)."""
        params = hp.config.get("rope_parameters") or hp.config.get("rope_scaling") or {}
        local = params.get("sliding_attention") if isinstance(params, dict) else None
        if isinstance(local, dict):
            kind = str(local.get("rope_type", local.get("type", "default"))).lower()
            factor = local.get("factor", 1.0)
            if kind != "default" and not (kind == "linear" and factor == 1.0):
                raise UsageError(
                    f"{config_path(hp.where)}: rope_parameters.sliding_attention has RoPE scaling {kind!r}; "
                    f"llama.cpp's {self.gguf_name} architecture scales only the global layers' RoPE"
                )
            if _number(local.get("rope_theta")):
                return float(local["rope_theta"])
        if _number(hp.config.get("rope_local_base_freq")):
            return float(hp.config["rope_local_base_freq"])
        return None

    def window(self, hp: HParams) -> int | None:
        value = hp.config.get("sliding_window")
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None

    def sliding_window(self, hp: HParams) -> int | None:
        return None  # llama.cpp applies Gemma's window itself: no warning from the base check

    def check(self, hp: HParams, log: Log) -> None:
        # transformers' Gemma MLPs read hidden_activation; an older hidden_act next to it is ignored by them
        act = hp.config.get("hidden_activation") or hp.config.get("hidden_act") or "gelu_pytorch_tanh"
        super().check(replace(hp, config={**hp.config, "hidden_act": act}), log)
        if hp.config.get("attention_bias"):
            raise UsageError(
                f"{config_path(hp.where)}: attention_bias = true; llama.cpp's {self.gguf_name} architecture has "
                f"no attention biases"
            )
        if hp.config.get("use_bidirectional_attention"):
            raise UsageError(
                f"{config_path(hp.where)}: use_bidirectional_attention = true (an embedding model); GGUF export "
                f"writes causal language models"
            )
        self.check_attention_scale(hp)

    def check_attention_scale(self, hp: HParams) -> None:
        """Refuse a query_pre_attn_scalar llama.cpp would not reproduce (see the module docstring)."""
        scalar = hp.config.get("query_pre_attn_scalar")
        if isinstance(scalar, bool) or not isinstance(scalar, (int, float)) or scalar <= 0:
            raise UsageError(f"{config_path(hp.where)}: query_pre_attn_scalar is {scalar!r}, not a positive number")
        big = hp.n_layers == self.big_layers
        theirs = hp.hidden / hp.n_head if big else float(hp.head_dim)
        if not math.isclose(float(scalar), theirs, rel_tol=1e-6):
            rule = (
                f"hidden_size / num_attention_heads = {theirs:g}, because {hp.n_layers} layers is the 27B model's "
                f"layer count"
                if big
                else f"head_dim = {hp.head_dim}"
            )
            raise UsageError(
                f"{config_path(hp.where)}: query_pre_attn_scalar is {scalar:g}, but llama.cpp's {self.gguf_name} "
                f"architecture ignores that key and scales attention by 1/sqrt({rule}): the GGUF would compute "
                f"different attention",
                hint="GGUF export needs query_pre_attn_scalar equal to that value (as in every released Gemma)",
            )

    # -- metadata ----------------------------------------------------------------------------------

    def write_sliding(self, writer, hp: HParams, window: int) -> None:
        writer.add_sliding_window(window)
        if hp.extra["sliding"] != self.llama_cpp_sliding(hp.n_layers):
            # llama.cpp reads a boolean per layer in place of its fixed pattern
            writer.add_sliding_window_pattern(list(hp.extra["sliding"]))

    def space_prefix(self, writer, hp: HParams) -> None:
        from llmforge.runs import read_json_object

        if not (hp.where / "tokenizer.model").is_file():
            return
        tok_config = hp.where / "tokenizer_config.json"
        if tok_config.is_file() and isinstance(
            read_json_object(tok_config, "tokenizer config").get("add_prefix_space"), bool
        ):
            return  # the vocabulary writer states it
        writer.add_add_space_prefix(False)


class Gemma2(_Gemma):
    hf_names = ("Gemma2ForCausalLM",)
    gguf_arch = "GEMMA2"
    swa_period = 2
    big_layers = 46
    config_defaults = {
        **_Gemma.config_defaults,
        "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0,
        "max_position_embeddings": 8192,
    }

    def hparams(self, config: dict, where: Path) -> HParams:
        hp = super().hparams(config, where)
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            value = hp.config.get(key)  # absent: transformers' default (above); null: no cap
            if value is None or (_number(value) and value <= 0):
                raise UsageError(
                    f"{config_path(where)}: {key} is {value!r}; llama.cpp's gemma2 architecture always "
                    f"soft-caps (and takes 50 for attention, 30 for the final logits when no value is given)",
                    hint="GGUF export needs both attn_logit_softcapping and final_logit_softcapping set",
                )
            hp.extra[key] = need_float(hp.config, key, where)
        return hp

    def check(self, hp: HParams, log: Log) -> None:
        super().check(hp, log)
        if not hp.tied:
            raise UsageError(
                f"{config_path(hp.where)}: tie_word_embeddings = false; llama.cpp's gemma2 architecture always "
                f"uses the token embedding as the output head"
            )

    def metadata(self, writer, hp: HParams, log: Log) -> None:
        writer.add_attn_logit_softcapping(hp.extra["attn_logit_softcapping"])
        writer.add_final_logit_softcapping(hp.extra["final_logit_softcapping"])
        # No window (null) means full attention in transformers; llama.cpp's gemma2 always slides (4096 by
        # default), so a window as long as the context is the same thing.
        self.write_sliding(writer, hp, self.window(hp) or hp.context)
        theta = hp.extra["swa_theta"]
        if theta is not None and theta != float(hp.rope["rope_theta"]):
            writer.add_rope_freq_base_swa(theta)  # llama.cpp's default for gemma2 is the global base
        self.space_prefix(writer, hp)


class Gemma3(_Gemma):
    hf_names = ("Gemma3ForCausalLM",)
    gguf_arch = "GEMMA3"
    layer_parts: tuple[str, ...] = (*_Gemma.layer_parts, "attn_q_norm.weight", "attn_k_norm.weight")
    swa_period = 6
    big_layers = 62
    config_defaults = {
        **_Gemma.config_defaults,
        "max_position_embeddings": 131072,
        "rope_theta": 1_000_000.0,  # v4 spelling; a v5 rope_parameters entry takes precedence
        "rope_local_base_freq": 10000.0,
    }

    def hparams(self, config: dict, where: Path) -> HParams:
        hp = super().hparams(config, where)
        if config.get("attn_logit_softcapping") is not None:
            raise UsageError(
                f"{config_path(where)}: attn_logit_softcapping is {config['attn_logit_softcapping']!r}; llama.cpp's "
                f"gemma3 architecture does not soft-cap attention (released Gemma 3 models set null)"
            )
        final = config.get("final_logit_softcapping")
        hp.extra["final_logit_softcapping"] = need_float(config, "final_logit_softcapping", where) if final else None
        return hp

    def metadata(self, writer, hp: HParams, log: Log) -> None:
        if hp.extra["final_logit_softcapping"]:
            writer.add_final_logit_softcapping(hp.extra["final_logit_softcapping"])
        window = self.window(hp)
        if window is not None:
            self.write_sliding(writer, hp, window)
        elif any(hp.extra["sliding"]):
            log(
                "config.json names sliding_attention layers but no sliding_window: every layer attends to the "
                "whole context, in transformers and in llama.cpp",
                "info",
            )
        if hp.extra["swa_theta"] is not None:
            writer.add_rope_freq_base_swa(hp.extra["swa_theta"])
        self.space_prefix(writer, hp)


def hf_config(arch: str, meta: dict) -> dict:
    """config.json values for `llmforge import` of a gemma2 / gemma3 GGUF that transformers' GGUF reader leaves at its
    config class's defaults (soft-caps 50/30, query_pre_attn_scalar 256, the default layer pattern, one RoPE base):
    what llama.cpp computes with, read from the file's metadata (`meta`: key -> value, keys without the
    architecture prefix). Empty for other architectures."""
    family = {"gemma2": Gemma2, "gemma3": Gemma3}.get(arch)
    if family is None:
        return {}
    n_layers, hidden, n_head = meta["block_count"], meta["embedding_length"], meta["attention.head_count"]
    head_dim = meta.get("attention.key_length") or hidden // n_head
    out: dict = {
        # llama.cpp's rule (see the module docstring), written as the scalar transformers takes the root of
        "query_pre_attn_scalar": hidden // n_head if n_layers == family.big_layers else head_dim,
    }
    if family is Gemma2:
        out["attn_logit_softcapping"] = float(meta.get("attn_logit_softcapping", 50.0))  # llama.cpp's defaults
        out["final_logit_softcapping"] = float(meta.get("final_logit_softcapping", 30.0))
        window = meta.get("attention.sliding_window", 4096)
    else:
        out["attn_logit_softcapping"] = None
        out["final_logit_softcapping"] = meta.get("final_logit_softcapping") or None
        window = meta.get("attention.sliding_window")
    pattern = meta.get("attention.sliding_window_pattern")
    if isinstance(pattern, list):
        sliding = [bool(x) for x in pattern][:n_layers]
    else:
        period = pattern if isinstance(pattern, int) and pattern > 0 else family.swa_period
        sliding = [i % period < period - 1 for i in range(n_layers)]
    if not window:
        sliding = [False] * n_layers
    out["sliding_window"] = window or None
    out["layer_types"] = ["sliding_attention" if s else "full_attention" for s in sliding]
    full: dict = {"rope_type": "default", "rope_theta": float(meta.get("rope.freq_base", 10000.0))}
    if meta.get("rope.scaling.type") == "linear" and meta.get("rope.scaling.factor"):
        full.update(rope_type="linear", factor=float(meta["rope.scaling.factor"]))
    if family is Gemma2:
        out["rope_parameters"] = full
    else:
        local = float(meta.get("rope.freq_base_swa", 10000.0))  # llama.cpp's default for gemma3's sliding layers
        out["rope_parameters"] = {
            "full_attention": full,
            "sliding_attention": {"rope_type": "default", "rope_theta": local},
        }
    return out
