"""Which weights a LoRA adapter reaches, per model family, and PEFT's LoraConfig built for them.

`lora.target_modules = "all-linear"` is PEFT's own shorthand: every `nn.Linear` but the output head. On the
dense families that is all there is to it: Llama, Mistral, Qwen2/3 and Gemma 2/3 get q/k/v/o and
gate/up/down; Phi-3's fused `qkv_proj` and `gate_up_proj` are `nn.Linear` too and are adapted fused (one
adapter over the fused output), which is what merging it back into the fused weight needs.

Mixture-of-experts models are different in transformers 5: the experts of a layer are fused in memory into
3-D parameters (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`) and the router is a module of its own
holding a bare `weight`, so none of them is an `nn.Linear`. PEFT 0.22 reaches them through
`target_parameters` (its ParamWrapper) and, for the architectures transformers converts (Mixtral,
Qwen2-MoE, Qwen3-MoE), rewrites "all-linear" and the checkpoint's projection names (`gate_proj`/`up_proj`/
`down_proj`, Mixtral's `w1`/`w3`/`w2`, the router `gate`) into those parameter targets itself. What PEFT
leaves to its caller, and this module does:

* ParamWrapper cannot apply dropout (it adapts a weight, not an input it could drop), and PEFT refuses the
  whole config when `lora_dropout > 0` (the default is 0.05). Such an adapter trains with dropout 0, and a
  warning says so.
* A name that matches no module, or a module LoRA cannot wrap (the experts' container), is refused naming
  `lora.target_modules` and the linear layers the model has, instead of PEFT's exception from inside the
  trainer.
* An MoE architecture PEFT does not rewrite (gpt-oss) gets the same treatment from here: its experts' 3-D
  weights and its router (a non-layer module with one weight row per expert) become `target_parameters`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from llmforge.errors import UsageError

if TYPE_CHECKING:
    from llmforge_plugins.training.options import LoraOptions

Log = Callable[..., Any]


def _wrappable(module: Any) -> bool:
    """A layer type PEFT's LoRA can wrap as a module (its own list of supported layers, the common ones)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, Conv1D))


def _matches(name: str, target: str) -> bool:
    # PEFT's rule for a list entry: the module's full name, or its dotted suffix.
    return name == target or name.endswith("." + target)


def linear_names(model: Any) -> list[str]:
    """The distinct leaf names of the model's linear layers, output head excluded ("q_proj", "qkv_proj", ...)."""
    import torch

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return sorted(
        {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head}
    )


def expert_parameters(model: Any) -> list[str]:
    """Full names of the 3-D parameters held by modules that are not layers (fused MoE experts)."""
    return [
        f"{mod_name}.{p_name}"
        for mod_name, module in model.named_modules()
        if not _wrappable(module)
        for p_name, p in module.named_parameters(recurse=False)
        if p.dim() == 3
    ]


def _peft_resolved(config: Any, model: Any) -> Any:
    """A copy of `config` as PEFT will rewrite it for this model (transformers 5's fused MoE layers), or the
    copy unchanged where this PEFT has no such rewriting."""
    probe = copy.deepcopy(config)
    try:
        from peft.utils.transformers_weight_conversion import convert_peft_config_for_transformers
    except ImportError:  # an older PEFT: it targets modules only
        return probe
    convert_peft_config_for_transformers(probe, model=model, conversions=None)
    return probe


def _check_named_targets(targets: set[str], model: Any) -> None:
    modules = list(model.named_modules())
    for target in sorted(targets):
        hits = [m for n, m in modules if _matches(n, target)]
        if not hits:
            raise UsageError(
                f"lora.target_modules: '{target}' names no module of this model ({model.config.model_type})",
                hint=f'its linear layers: {", ".join(linear_names(model))}; or use "all-linear"',
            )
        bad = [m for m in hits if not _wrappable(m)]
        if bad:
            kind = type(bad[0]).__name__
            has_experts = any(p.dim() == 3 for p in bad[0].parameters(recurse=False))
            why = (
                "it holds the experts as 3-D parameters, not linear layers"
                if has_experts
                else "LoRA adapts linear layers, not whole blocks"
            )
            raise UsageError(
                f"lora.target_modules: '{target}' is a {kind} in this model ({model.config.model_type}); {why}",
                hint=f'name linear layers ({", ".join(linear_names(model))}), or use "all-linear"'
                + (", which reaches the experts and router too" if has_experts else ""),
            )


def lora_config(lora: LoraOptions, model: Any = None, log: Log | None = None) -> Any:
    """PEFT's LoraConfig for the stage's `lora` options and the model about to be adapted (see the module's
    docstring for what the model changes). Without a model: the options as they are."""
    from peft import LoraConfig

    # PEFT annotates lora_alpha as int but computes the scale as alpha / r: a float alpha works as given.
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,  # type: ignore[arg-type]
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )
    if model is None:
        return config
    resolved = _peft_resolved(config, model)
    if isinstance(lora.target_modules, list):
        _check_named_targets(set(resolved.target_modules or ()), model)
    params = sorted(resolved.target_parameters or ())
    if params and lora.dropout > 0:
        # Training goes on without dropout rather than failing every MoE run with the default options: the
        # adapter is the same otherwise, and the warning says what changed.
        config.lora_dropout = 0.0
        if log is not None:
            log(
                f"lora.dropout = {lora.dropout} not applied: PEFT applies no dropout to the MoE weights this "
                f"adapter reaches as parameters ({', '.join(params)}); training with dropout 0",
                level="warning",
            )
    if lora.target_modules == "all-linear" and not params:
        # An MoE architecture PEFT does not rewrite (gpt-oss): its experts and router are reached the same
        # way, named here from the shapes (see moe_parameters).
        params = moe_parameters(model)
        if params:
            config.target_parameters = params
            config.lora_dropout = 0.0
            if log is not None:
                log(
                    f"LoRA: the experts and router of {model.config.model_type} adapted as parameters "
                    f"({', '.join(params)})" + (", with dropout 0" if lora.dropout > 0 else "")
                )
    return config


def moe_parameters(model: Any) -> list[str]:
    """`target_parameters` for the fused experts and the routers of an MoE model: the experts' 3-D weights
    ("experts.gate_up_proj") and the 2-D weight of any other non-layer module with one row per expert (the
    router: "router.weight"). Empty for a dense model."""
    experts = expert_parameters(model)
    if not experts:
        return []
    counts = {model.get_parameter(p).shape[0] for p in experts}
    targets = {".".join(p.split(".")[-2:]) for p in experts}
    for name, module in model.named_modules():
        weight = module._parameters.get("weight") if name and not _wrappable(module) else None
        if weight is not None and weight.dim() == 2 and weight.shape[0] in counts:
            targets.add(f"{name.rsplit('.', 1)[-1]}.weight")
    return sorted(targets)


def adapted(model: Any) -> list[str]:
    """What a PEFT model adapts, by leaf name, for the log: ["q_proj", ..., "experts.gate_up_proj", "gate"]."""
    from peft.tuners.lora import LoraLayer

    names: set[str] = set()
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        leaf = name.rsplit(".", 1)[-1]
        param = getattr(module, "parameter_name", None)
        if leaf == "base_layer":  # a ParamWrapper inside another: the outer one carries the module's name
            leaf = name.rsplit(".", 2)[-2]
        names.add(f"{leaf}.{param}" if param and param != "weight" else leaf)
    return sorted(names)
