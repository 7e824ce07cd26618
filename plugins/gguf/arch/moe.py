"""Mixture-of-experts families: Qwen3-MoE (`Qwen3MoeForCausalLM`, llama.cpp's `qwen3moe`) and Mixtral
(`MixtralForCausalLM`, which llama.cpp runs as its `llama` architecture with experts).

llama.cpp keeps each layer's experts as three 3-D tensors, `ffn_gate_exps`, `ffn_up_exps` and `ffn_down_exps`
(numpy shape experts x rows x columns: each expert's matrix as transformers stores it, stacked), and the router as
`ffn_gate_inp` (kept in F32 by the export). Checkpoints come in two layouts, both accepted:

* per expert, as `save_pretrained` writes them (transformers 5 converts back to the published names):
  `mlp.experts.E.{gate,up,down}_proj.weight` (Qwen3-MoE) or `block_sparse_moe.experts.E.w{1,3,2}.weight`
  (Mixtral: w1 gate, w3 up, w2 down);
* fused, as transformers 5 holds them in memory (a state dict saved directly): `mlp.experts.gate_up_proj`
  (experts x 2*ff x hidden, gate rows first) and `mlp.experts.down_proj` (experts x hidden x ff).

Memory stays about one stacked tensor: each (layer, projection) is built when it is written, experts copied one at a
time into a preallocated array (a fused gate_up is read whole, then its half is copied out).

What each family needs besides the experts:

* Qwen3-MoE: Qwen3's attention (q/k norms, explicit head_dim, no biases), the expert FFN length
  (`moe_intermediate_size` -> `expert_feed_forward_length`; `intermediate_size` is only the dense FFN length),
  experts in every layer. llama.cpp always renormalises the chosen experts' weights to sum to one, so
  `norm_topk_prob = false` (transformers' default when absent) cannot be represented and is refused; so are dense
  layers between the sparse ones (`mlp_only_layers`, `decoder_sparse_step` > 1), which llama.cpp's qwen3moe lacks;
* Mixtral: a Llama (q/k rows regrouped for llama.cpp's RoPE, k by the key/value head count; vocab_size and
  rope.dimension_count written) whose FFN is the experts, `intermediate_size` being each expert's length.
Both get `expert_count` and `expert_used_count`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from llmforge.errors import UsageError
from llmforge_plugins.gguf.arch.base import Arch, HParams, Log, Planned, Read, config_path, need_int
from llmforge_plugins.gguf.arch.llama import Llama
from llmforge_plugins.gguf.arch.qwen import Qwen3

if TYPE_CHECKING:
    from llmforge_plugins.gguf.export import ModelFiles

#: HF projection name -> the GGUF stack it belongs to (Qwen3-MoE's and Mixtral's spellings)
PROJECTIONS = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down"}
PARTS = ("gate", "up", "down")
_PER_EXPERT = re.compile(
    r"^model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w2|w3)\.weight$"
)
_FUSED = re.compile(
    r"^model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(gate_up_proj|gate_proj|up_proj|down_proj)(?:\.weight)?$"
)
#: transformers 5's in-memory layout of one layer's router and experts (Mixtral's and Qwen3-MoE's alike), which _FUSED
#: reads for the export and `llmforge import` writes for a Mixtral GGUF (plugins/gguf/importer.py)
FUSED_LAYOUT = {
    "router": "model.layers.{layer}.mlp.gate.weight",
    "gate_up": "model.layers.{layer}.mlp.experts.gate_up_proj",  # experts x 2*ff x hidden, gate rows first
    "down": "model.layers.{layer}.mlp.experts.down_proj",  # experts x hidden x ff
}
LAYER_PARTS_EXPERTS = (
    "ffn_gate_inp.weight",
    "ffn_gate_exps.weight",
    "ffn_up_exps.weight",
    "ffn_down_exps.weight",
)
_ATTENTION = (
    "attn_q.weight",
    "attn_k.weight",
    "attn_v.weight",
    "attn_output.weight",
    "attn_norm.weight",
    "ffn_norm.weight",
)


@dataclass(frozen=True)
class _Source:
    """Where one (layer, projection) stack comes from: the per-expert tensors in order, or one fused tensor and
    the rows of it that are this projection."""

    names: tuple[str, ...]
    rows: slice | None = None  # fused: the rows (of each expert's matrix) that are this projection


def _stack_experts(names: tuple[str, ...], shape: tuple[int, ...]) -> Callable[[Read], object]:
    def make(read: Read):
        import numpy as np

        out = np.empty(shape, dtype=np.float32)
        for i, name in enumerate(names):
            out[i] = read(name)  # one expert at a time: peak is the stack plus one expert
        return out

    return make


def _slice_fused(name: str, rows: slice) -> Callable[[Read], object]:
    def make(read: Read):
        import numpy as np

        return np.ascontiguousarray(read(name)[:, rows, :])

    return make


class MoE(Arch):
    """What Qwen3-MoE and Mixtral share: expert and router counts from config.json, expert tensors gathered per
    (layer, projection) from either checkpoint layout, the expert metadata."""

    #: config.json keys naming the number of experts, in the order they are looked up
    expert_count_keys: tuple[str, ...] = ("num_local_experts", "num_experts")

    def expert_ff(self, hp: HParams) -> int:
        """Each expert's FFN length (rows of gate/up, columns of down)."""
        return hp.ff

    def moe_hparams(self, hp: HParams) -> HParams:
        config, where = hp.config, hp.where
        key = next((k for k in self.expert_count_keys if config.get(k) is not None), self.expert_count_keys[0])
        hp.extra["n_expert"] = need_int(config, key, where)
        hp.extra["n_expert_used"] = need_int(config, "num_experts_per_tok", where)
        if hp.extra["n_expert_used"] > hp.extra["n_expert"]:
            raise UsageError(
                f"{config_path(where)}: num_experts_per_tok {hp.extra['n_expert_used']} is more than the "
                f"{hp.extra['n_expert']} experts ({key})"
            )
        return hp

    def metadata(self, writer, hp: HParams, log: Log) -> None:
        super().metadata(writer, hp, log)
        writer.add_expert_count(hp.extra["n_expert"])
        writer.add_expert_used_count(hp.extra["n_expert_used"])

    # -- tensors -----------------------------------------------------------------------------------

    def plan(self, files: ModelFiles, hp: HParams) -> list[Planned]:
        import gguf

        sources = self._expert_sources(files, hp)
        taken = {name for src in sources.values() for name in src.names}
        rest = [name for name in files.tensors if name not in taken]
        out = [*self._plan_rest(files, hp, rest)]
        n_exp, ff = hp.extra["n_expert"], self.expert_ff(hp)
        shapes = {"gate": (n_exp, ff, hp.hidden), "up": (n_exp, ff, hp.hidden), "down": (n_exp, hp.hidden, ff)}
        kinds = {"gate": gguf.MODEL_TENSOR.FFN_GATE_EXP, "up": gguf.MODEL_TENSOR.FFN_UP_EXP}
        kinds["down"] = gguf.MODEL_TENSOR.FFN_DOWN_EXP
        for (layer, part), src in sorted(sources.items()):
            name = gguf.TENSOR_NAMES[kinds[part]].format(bid=layer) + ".weight"
            shape = shapes[part]
            make = _slice_fused(src.names[0], src.rows) if src.rows is not None else _stack_experts(src.names, shape)
            out.append(Planned(name, src.names, shape, make=make))
        return out

    def _plan_rest(self, files: ModelFiles, hp: HParams, names: list[str]) -> list[Planned]:
        """Everything but the experts, one to one as the base plans it."""
        out = []
        for hf_name in names:
            if hf_name.endswith(self.skip_suffixes):
                continue
            if hp.tied and hf_name == "lm_head.weight":
                continue
            out.append(self.planned(files, hp, hf_name))
        return out

    def _expert_sources(self, files: ModelFiles, hp: HParams) -> dict[tuple[int, str], _Source]:
        """(layer, gate/up/down) -> where its experts are; every shape checked against config.json."""
        n_exp, ff, hidden = hp.extra["n_expert"], self.expert_ff(hp), hp.hidden
        per_expert: dict[tuple[int, str], dict[int, str]] = {}
        out: dict[tuple[int, str], _Source] = {}
        for name, ref in files.tensors.items():
            m = _PER_EXPERT.match(name)
            if m:
                layer, expert, part = int(m[1]), int(m[2]), PROJECTIONS[m[3]]
                if expert >= n_exp:
                    raise UsageError(
                        f"{files.path}: {name} is expert {expert}, config.json says {n_exp} experts per layer"
                    )
                want = (hidden, ff) if part == "down" else (ff, hidden)
                if tuple(ref.shape) != want:
                    raise UsageError(f"{files.path}: {name} is {list(ref.shape)}, config.json says {list(want)}")
                per_expert.setdefault((layer, part), {})[expert] = name
                continue
            m = _FUSED.match(name)
            if m:
                layer, kind = int(m[1]), m[2]
                fused_ff = 2 * ff if kind == "gate_up_proj" else ff
                stacked = (n_exp, hidden, ff) if kind == "down_proj" else (n_exp, fused_ff, hidden)
                if tuple(ref.shape) != stacked:
                    raise UsageError(
                        f"{files.path}: {name} is {list(ref.shape)}, config.json says {list(stacked)} "
                        f"(experts x rows x columns)"
                    )
                if kind == "gate_up_proj":  # transformers 5 fuses gate then up along the rows
                    out[(layer, "gate")] = _Source((name,), slice(0, ff))
                    out[(layer, "up")] = _Source((name,), slice(ff, 2 * ff))
                else:
                    out[(layer, PROJECTIONS[kind])] = _Source((name,), slice(None))
        for (layer, part), experts in per_expert.items():
            if (layer, part) in out:
                raise UsageError(f"{files.path}: layer {layer}'s {part} experts are stored both fused and per expert")
            missing = [e for e in range(n_exp) if e not in experts]
            if missing:
                raise UsageError(
                    f"{files.path}: layer {layer} has no {part} projection for expert {missing[0]} "
                    f"(config.json says {n_exp} experts)"
                )
            out[(layer, part)] = _Source(tuple(experts[e] for e in range(n_exp)))
        for layer, _part in out:
            if layer >= hp.n_layers:
                raise UsageError(f"{files.path}: experts for layer {layer}, config.json says {hp.n_layers} layers")
        return out


class Qwen3Moe(MoE, Qwen3):
    hf_names: tuple[str, ...] = ("Qwen3MoeForCausalLM",)
    gguf_arch = "QWEN3MOE"
    layer_parts = (*_ATTENTION, "attn_q_norm.weight", "attn_k_norm.weight", *LAYER_PARTS_EXPERTS)

    def hparams(self, config: dict, where) -> HParams:
        hp = self.moe_hparams(super().hparams(config, where))
        hp.extra["expert_ff"] = need_int(config, "moe_intermediate_size", where)
        return hp

    def expert_ff(self, hp: HParams) -> int:
        return hp.extra["expert_ff"]

    def check(self, hp: HParams, log: Log) -> None:
        super().check(hp, log)
        config, where = hp.config, config_path(hp.where)
        if not config.get("norm_topk_prob", False):
            # transformers' default when the key is absent is false
            value = "absent (false)" if "norm_topk_prob" not in config else json.dumps(config["norm_topk_prob"])
            raise UsageError(
                f"{where}: norm_topk_prob is {value}: llama.cpp's qwen3moe "
                f"always renormalises the chosen experts' weights to sum to one, so a model that does not cannot "
                f"be represented",
                hint="released Qwen3-MoE models set norm_topk_prob = true",
            )
        if config.get("mlp_only_layers") or (config.get("decoder_sparse_step") or 1) != 1:
            raise UsageError(
                f"{where}: dense layers among the expert layers (mlp_only_layers "
                f"{config.get('mlp_only_layers')}, decoder_sparse_step {config.get('decoder_sparse_step')}): "
                f"llama.cpp's qwen3moe has experts in every layer"
            )

    def metadata(self, writer, hp: HParams, log: Log) -> None:
        super().metadata(writer, hp, log)
        writer.add_expert_feed_forward_length(hp.extra["expert_ff"])


class Mixtral(MoE, Llama):
    hf_names: tuple[str, ...] = ("MixtralForCausalLM",)
    layer_parts = (*_ATTENTION, *LAYER_PARTS_EXPERTS)

    def hparams(self, config: dict, where) -> HParams:
        return self.moe_hparams(super().hparams(config, where))
