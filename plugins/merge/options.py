"""The merge recipe: one schema for the `merge` stage's options, for `llmforge merge -c merge.toml` and
for what `llmforge merge --method ... --model ...` builds. Light on purpose: pydantic only.

A parameter value is a number (or true/false), a list of numbers spread evenly over the layers
(first value at the first layer, last at the last, linear in between), or a list of
``{filter = "...", value = ...}`` tables: the first entry whose filter is a substring of the tensor's
name gives the value, an entry without ``filter`` matches every tensor.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import Field, field_validator

from llmforge.stage import Input, StageOptions

Scalar = float | bool


class FilterValue(StageOptions):
    filter: str | None = Field(
        None,
        description="Substring of the tensor name (self_attn, mlp, embed_tokens, ...); unset matches every tensor.",
    )
    value: Scalar | list[float] = Field(description="A number, or a list interpolated across layers.")


ParamValue = Scalar | list[float] | list[FilterValue]
Parameters = dict[str, ParamValue]

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text: str) -> int:
    """'2GB' -> 2_000_000_000, '500MiB' -> 524_288_000, '1000' -> 1000 bytes."""
    m = _SIZE.match(str(text))
    if not m:
        raise ValueError(f"expected a size like 2GB, 500MB or 1GiB (got {text!r})")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "B").lower()])


class ModelEntry(StageOptions):
    model: Annotated[str, Input("model", "adapter")] = Field(
        description="A model directory (HF, safetensors), a LoRA adapter directory, or @stage."
    )
    parameters: Parameters = Field(
        default_factory=dict,
        description="This model's parameters (weight, density, ...); unset ones come from the recipe's.",
    )
    lora_base: Annotated[str | None, Input("model")] = Field(
        None, description="For an adapter: the model it applies to (default: the one in adapter_config.json)."
    )
    positive_prompts: list[str] = Field(
        default_factory=list,
        description="Method moe: a few texts this model (one expert) is for; the router sends such text to it.",
    )


class SliceSource(StageOptions):
    model: Annotated[str, Input("model", "adapter")] = Field(description="A model directory, adapter or @stage.")
    layer_range: list[int] = Field(
        min_length=2, max_length=2, description="[start, end): the layers taken from this model, end excluded."
    )
    parameters: Parameters = Field(default_factory=dict, description="Per-model parameters for this slice.")


class Slice(StageOptions):
    sources: list[SliceSource] = Field(
        min_length=1,
        description="The models (and layer ranges, all of the same length) merged into this run of output layers.",
    )
    parameters: Parameters = Field(default_factory=dict, description="Parameters for this slice's layers.")


class MoeOptions(StageOptions):
    """Method moe: dense fine-tunes of one base become the experts of a mixture-of-experts model (moe.py)."""

    num_experts_per_tok: int = Field(2, ge=1, description="Experts each token goes through (top-k routing).")
    router: Literal["hidden", "random"] = Field(
        "hidden",
        description="How the routers start: hidden (from the base model's hidden states on each expert's "
        "positive_prompts) or random (seeded).",
    )
    shared: str = Field(
        "linear",
        description="How the shared tensors (attention, norms, embeddings, head) are merged: a merge method "
        "(its parameters are the recipe's parameters), or base (taken from the base model).",
    )


class MergeOptions(StageOptions):
    method: str = Field(
        description="The merge method: linear, slerp, task_arithmetic, ties, dare_linear, "
        "dare_ties, model_stock, passthrough, moe, or one a plugin adds."
    )
    models: list[ModelEntry] = Field(
        default_factory=list, description="The models to merge, each a table {model = ..., parameters = {...}}."
    )
    base: Annotated[str | None, Input("model", "adapter")] = Field(
        None,
        description="The base model: task vectors are taken against it (needed by task_arithmetic, ties, "
        "dare_*, model_stock; an endpoint for slerp).",
    )
    slices: list[Slice] = Field(
        default_factory=list,
        description="Instead of models: output layers built slice by slice (layer stacking, depth up-scaling).",
    )
    parameters: Parameters = Field(
        default_factory=dict,
        description="The method's parameters: a number, a list across layers, or [{filter, value}, ...].",
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="Output dtype; auto keeps each tensor's dtype in the config source model."
    )
    compute_dtype: Literal["float32", "float64", "float16", "bfloat16"] = Field(
        "float32", description="Dtype the arithmetic is done in."
    )
    seed: int | None = Field(
        None, ge=0, description="Seed of the random drops of dare_* (default: [project].seed, 0 on the command line)."
    )
    config_from: Annotated[str | None, Input("model", "adapter")] = Field(
        None,
        description="Model whose config, tokenizer, chat template and generation config the output carries "
        "(default: the base, else the first model).",
    )
    max_shard_size: str = Field(
        "2GB", description="Largest output safetensors file; bigger outputs are sharded with an index."
    )
    moe: MoeOptions | None = Field(
        None, description="Method moe: experts per token, router initialisation, how shared tensors are merged."
    )

    @field_validator("max_shard_size")
    @classmethod
    def _size(cls, value: str) -> str:
        if parse_size(value) < 1:
            raise ValueError("must be at least 1 byte")
        return value
