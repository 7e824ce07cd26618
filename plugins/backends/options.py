"""The `[backend]` schemas of the built-in backends: the shared keys (llmforge.config.BackendSection)
plus `[backend.fsdp]` for accelerate and `[backend.deepspeed]` for deepspeed. Pydantic only."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from llmforge.config import BackendSection


class _Table(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FsdpOptions(_Table):
    enabled: bool = Field(False, description="Shard the model with FSDP instead of replicating it (DDP).")
    sharding_strategy: Literal["FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "NO_SHARD"] = Field(
        "FULL_SHARD",
        description="FULL_SHARD: weights, gradients and optimizer states sharded (least memory); "
        "SHARD_GRAD_OP: weights gathered for the whole step; HYBRID_SHARD: full "
        "sharding inside a node, replicas across nodes; NO_SHARD: like DDP.",
    )
    cpu_offload: bool = Field(False, description="Keep sharded weights and gradients in CPU memory between uses.")
    auto_wrap: bool = Field(
        True, description="Wrap each decoder layer (the model's _no_split_modules) as its own FSDP unit."
    )
    activation_checkpointing: bool = Field(
        False, description="Recompute each wrapped layer's activations in the backward pass (FSDP's own checkpointing)."
    )


class DeepSpeedOptions(_Table):
    zero_stage: int = Field(
        2,
        ge=0,
        le=3,
        description="ZeRO stage: 1 shards optimizer states, 2 also "
        "gradients, 3 also weights (0 = plain data parallel).",
    )
    offload_optimizer: Literal["none", "cpu", "nvme"] = Field("none", description="Where optimizer states live.")
    offload_params: Literal["none", "cpu", "nvme"] = Field(
        "none", description="Where weights live between uses (zero_stage 3 only)."
    )
    nvme_path: str = Field("", description="Folder on a fast local NVMe drive, for an nvme offload.")
    zero_quantized_weights: bool = Field(False, description="ZeRO++ qwZ: gather int8 weights (zero_stage 3).")
    zero_quantized_gradients: bool = Field(False, description="ZeRO++ qgZ: reduce int4 gradients (zero_stage 3).")
    zero_hpz_partition_size: int = Field(
        1,
        ge=1,
        description="ZeRO++ hpZ: a secondary weight partition of this many GPUs (usually GPUs per node; zero_stage 3).",
    )
    config_file: str = Field(
        "",
        description="Your own DeepSpeed JSON (relative to forge.toml) instead of the "
        "generated one; the other keys of this table are then ignored.",
    )


class AccelerateBackendOptions(BackendSection):
    fsdp: FsdpOptions = Field(default_factory=FsdpOptions, description="Fully sharded data parallelism.")


class DeepSpeedBackendOptions(BackendSection):
    deepspeed: DeepSpeedOptions = Field(default_factory=DeepSpeedOptions, description="ZeRO, offload, ZeRO++.")
