"""`accelerate`: training stages run on `num_processes` processes per node and `num_nodes` nodes through
`accelerate launch` (or torchrun), replicated (DDP) or sharded (FSDP, from `[backend.fsdp]`).

The accelerate config is written into the stage folder as accelerate.yaml. FSDP uses accelerate's FSDP2
(`fully_shard`) for FULL_SHARD (reshard after forward) and SHARD_GRAD_OP (keep the weights gathered for
the whole step); HYBRID_SHARD and NO_SHARD exist only as FSDP1 sharding strategies, so they use FSDP1.
Auto-wrap leaves the class list empty: accelerate then wraps the model's own `_no_split_modules`, the
decoder layer class of any transformers model. Checkpoints are sharded (each rank writes its shard).
"""

from __future__ import annotations

from typing import Any

from llmforge.errors import Problem
from llmforge_plugins.backends.launch import LaunchingBackend, base_accelerate_config
from llmforge_plugins.backends.options import AccelerateBackendOptions

FSDP2_STRATEGIES = ("FULL_SHARD", "SHARD_GRAD_OP")


def fsdp_config(f: Any) -> dict:
    """accelerate 1.x `fsdp_config` keys for a `[backend.fsdp]` table."""
    v2 = f.sharding_strategy in FSDP2_STRATEGIES
    out: dict[str, Any] = {
        "fsdp_version": 2 if v2 else 1,
        # FSDP2 takes a bool; FSDP1 takes the strategy name under the same key (accelerate >= 1.6).
        "fsdp_reshard_after_forward": (f.sharding_strategy == "FULL_SHARD") if v2 else f.sharding_strategy,
        "fsdp_offload_params": f.cpu_offload,
        "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP" if f.auto_wrap else "NO_WRAP",
        "fsdp_state_dict_type": "SHARDED_STATE_DICT",
        # Every rank loads the weights: simple and right for the models llmforge starts from; the
        # rank-0-only loading saves host memory only for very large models.
        "fsdp_cpu_ram_efficient_loading": False,
        "fsdp_activation_checkpointing": f.activation_checkpointing,
    }
    if not v2:
        out.update(
            fsdp_backward_prefetch="BACKWARD_PRE",
            fsdp_forward_prefetch=False,
            fsdp_use_orig_params=True,
            fsdp_sync_module_states=True,
        )
    return out


class AccelerateBackend(LaunchingBackend):
    name = "accelerate"
    summary = "N processes per node on M nodes with accelerate (or torchrun): DDP, or FSDP from [backend.fsdp]."
    Options = AccelerateBackendOptions
    settings: AccelerateBackendOptions  # Backend(settings) is handed its own Options (the type narrowed)

    @property
    def fsdp(self):
        return self.settings.fsdp

    def accelerate_config(self) -> dict:
        if not self.fsdp.enabled:
            return base_accelerate_config(self.settings, "MULTI_GPU")
        return {**base_accelerate_config(self.settings, "FSDP"), "fsdp_config": fsdp_config(self.fsdp)}

    def torchrun_env(self) -> dict[str, str]:
        # What `accelerate launch` exports from fsdp_config, so that the Trainer's accelerator inside each
        # torchrun process builds the same FSDP plugin.
        if not self.fsdp.enabled:
            return {}
        env = {"ACCELERATE_USE_FSDP": "true"}
        for key, value in fsdp_config(self.fsdp).items():
            env["FSDP_" + key.removeprefix("fsdp_").upper()] = (
                str(value).lower() if isinstance(value, bool) else str(value)
            )
        return env

    def trainer_args(self, ctx: Any) -> dict[str, Any]:
        if self.fsdp.enabled and self.fsdp.activation_checkpointing:
            # FSDP checkpoints each wrapped layer itself; the Trainer refuses its own on top.
            return {"activation_checkpointing": False}
        return {}

    def check(self, cfg: Any) -> list[Problem]:
        problems = super().check(cfg)
        if self.fsdp.enabled and self.settings.tp_size > 1:
            problems.append(
                Problem(
                    "backend.fsdp.enabled",
                    "FSDP and tensor parallelism (tp_size > 1) are not "
                    "combined here: transformers shards the model itself under tp_size",
                )
            )
        return problems

    def check_stage(self, spec: Any, cfg: Any) -> list[Problem]:
        lora = getattr(spec.options, "lora", None)
        if self.fsdp.enabled and getattr(lora, "enabled", False) and getattr(spec.options, "merge", False):
            return [
                Problem(
                    f"{spec.where}.merge",
                    "merging the LoRA adapter needs the whole base model in one "
                    "process, which FSDP shards: leave merge = false and add a `merge` stage after it",
                )
            ]
        return []
