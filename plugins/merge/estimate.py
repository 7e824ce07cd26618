"""The merge stage's estimate for `llmforge plan`: the shape of the merged model (layer slices change its
depth, `dtype` its bytes) and the memory of a merge that works tensor by tensor.

Arithmetic on the input model's shape (llmforge.planning); no torch, no safetensors read.
"""

from __future__ import annotations

from dataclasses import replace

from llmforge.planning import DTYPE_BYTES, RUNTIME_BYTES, Estimate, Shape
from llmforge_plugins.merge.options import MergeOptions

# The merge's model inputs in the order its shape is read from: the base, the model whose config the
# output carries, the first model, the first slice's source (a stack of slices keeps their architecture).
SHAPE_FIELDS = ("base", "config_from", "models[0].model", "slices[0].sources[0].model")


def merged_shape(options: MergeOptions, shape: Shape) -> Shape:
    """What the merge writes, given its input's shape: the slices' layers stacked, in the output dtype."""
    if options.slices:
        layers = sum(abs(s.sources[0].layer_range[1] - s.sources[0].layer_range[0]) for s in options.slices)
        shape = replace(shape, layers=layers)
    if options.method == "moe" and not shape.experts:  # each model's MLP one expert of every layer
        per_token = options.moe.num_experts_per_tok if options.moe else 2
        shape = replace(
            shape,
            experts=len(options.models),
            experts_per_tok=per_token,
            expert_intermediate=shape.intermediate,
            model_type={"qwen3": "qwen3_moe"}.get(shape.model_type, "mixtral"),
        )
    return replace(shape, dtype=options.dtype) if options.dtype in DTYPE_BYTES else shape


def merge_estimate(shape: Shape, n_inputs: int, out_dtype: str, compute_dtype: str) -> Estimate:
    """Merging works tensor by tensor: every input's copy of the largest tensor, the result, a scratch.
    `shape` is the merged model's; the disk is the merged model in `out_dtype`."""
    largest = max(shape.vocab * shape.hidden, shape.intermediate * shape.hidden)
    parts = {
        "runtime": RUNTIME_BYTES["cpu"],
        "tensors in flight": (n_inputs + 2) * largest * DTYPE_BYTES.get(compute_dtype, 8),
    }
    disk = {"merged model": shape.params() * DTYPE_BYTES.get(out_dtype, 4)}
    return Estimate(
        "cpu",
        int(sum(parts.values())),
        {k: int(v) for k, v in parts.items()},
        0,
        {},
        int(sum(disk.values())),
        {k: int(v) for k, v in disk.items()},
        shape=shape,
    )


def estimate_merge(options: MergeOptions, shape: Shape) -> Estimate:
    """The merge stage's estimate from its input's shape (which the plan shows as the stage's model)."""
    n = max(len(options.models) + (1 if options.base else 0), len(options.slices), 1)
    dtype = options.dtype if options.dtype in DTYPE_BYTES else shape.dtype
    est = merge_estimate(merged_shape(options, shape), n, dtype, options.compute_dtype)
    if options.method == "moe" and (options.moe is None or options.moe.router == "hidden"):
        # the router pass holds the base (or first model) whole, in float32, beside the tensors in flight
        est.parts["router prompts model"] = shape.params() * 4
        est.peak = int(sum(est.parts.values()))
    est.shape = shape
    return est
