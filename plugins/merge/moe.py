"""Method `moe`: a mixture-of-experts model built from dense fine-tunes of one base.

Each input model's MLP becomes one expert of every layer; the tensors every expert shares (attention, norms,
embeddings, output head) are merged with another method (`moe.shared`, `linear` by default, its parameters
being the recipe's `parameters`) or taken from the base; each layer gets a router. Llama and Mistral
fine-tunes give a Mixtral model (`MixtralForCausalLM`), Qwen3 fine-tunes a Qwen3-MoE one
(`Qwen3MoeForCausalLM`); config.json says so.

This is not a per-tensor formula: the output has tensors no input has (experts, routers) and another
config, so the method plans its own merge (`plan_merge`, which `plan.prepare` calls for a method that has
one) on top of the dense plan of the shared tensors. Execution stays the engine's: tensor by tensor, streamed
into the output shards, each expert tensor a copy of one input's MLP tensor.

Routers (`moe.router`):

* `hidden`: the prompt model (the base, else the first model) runs on each expert's `positive_prompts`, and
  the input of every layer's MLP (what the router sees) is averaged over each prompt's tokens, then over the
  expert's prompts: one mean per expert and layer. A router row is its expert's mean minus the mean of all
  experts (what every expert's text has in common tells none apart), normalised; a second pass over the prompts
  scales each layer's rows so that the router logits on them have unit RMS (transformers computes the
  top-k weights with a softmax over them: too large a scale would make the second expert's weight vanish).
  The prompt model is loaded whole (float32) for this, once, when the first router is written, and freed
  after.
* `random`: normal with the config's `initializer_range` (0.02), drawn from a generator seeded by the seed
  and the tensor's name.

Imported when a merge runs (not at start-up); torch and transformers only inside the functions that use them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmforge.errors import Problem, UsageError
from llmforge_plugins.merge.api import MergeMethod, TensorInfo
from llmforge_plugins.merge.options import MergeOptions, ModelEntry, MoeOptions
from llmforge_plugins.merge.plan import (
    Input,
    OutTensor,
    Plan,
    _check_configs,
    _check_shapes,
    _sort_key,
    check_disk,
    make_shards,
    prepare,
    static_problems,
)
from llmforge_plugins.merge.sources import LAYER_RE, LoraSource, Source, open_source

NAME = "moe"
#: `moe.shared = "base"`: the shared tensors are the base model's
SHARED_BASE = "base"
#: prompt tokens the router pass reads from each positive prompt (the rest is cut off)
MAX_PROMPT_TOKENS = 1024
_MLP = re.compile(r"^(?P<prefix>.*\.layers\.)(?P<layer>\d+)\.mlp\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")


@dataclass(frozen=True)
class Target:
    """The MoE architecture a dense family becomes, as transformers 5's save_pretrained writes it."""

    model_type: str
    architecture: str
    block: str  # the module holding the router and the experts: layers.N.<block>.gate / .experts.E.*
    experts: dict[str, str]  # dense projection -> the expert's tensor of it
    experts_key: str  # config key of the expert count, as the released models spell it
    layer_tensors: frozenset[str]  # what else a layer may hold (the shared tensors)
    drop: tuple[str, ...]  # dense config keys the MoE config does not have

    def expert_name(self, prefix: str, layer: int, expert: int, proj: str) -> str:
        return f"{prefix}{layer}.{self.block}.experts.{expert}.{self.experts[proj]}.weight"

    def router_name(self, prefix: str, layer: int) -> str:
        return f"{prefix}{layer}.{self.block}.gate.weight"


_ATTENTION = tuple(f"self_attn.{p}_proj.weight" for p in "qkvo")
_NORMS = ("input_layernorm.weight", "post_attention_layernorm.weight")

MIXTRAL = Target(
    "mixtral",
    "MixtralForCausalLM",
    "block_sparse_moe",
    {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"},
    "num_local_experts",
    frozenset(_ATTENTION + _NORMS),
    ("attention_bias", "mlp_bias", "pretraining_tp"),
)
QWEN3_MOE = Target(
    "qwen3_moe",
    "Qwen3MoeForCausalLM",
    "mlp",
    {"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"},
    "num_experts",
    frozenset(_ATTENTION + _NORMS + ("self_attn.q_norm.weight", "self_attn.k_norm.weight")),
    ("layer_types", "max_window_layers"),
)
#: dense model_type -> the MoE it becomes
TARGETS = {"llama": MIXTRAL, "mistral": MIXTRAL, "qwen3": QWEN3_MOE}
_OUTSIDE = ("embed_tokens.weight", "norm.weight", "lm_head.weight")


# ------------------------------------------------------------------------------------------------
# the recipe


def _dense_options(options: MergeOptions, methods: dict[str, MergeMethod]) -> MergeOptions:
    """The recipe of the shared tensors: the models merged with `moe.shared` (or the base, copied). A base
    that the shared method does not take (linear) is still the router prompts' model and the config's."""
    mo = options.moe or MoeOptions()
    if mo.shared == SHARED_BASE:
        assert options.base is not None  # recipe_problems requires it
        return options.model_copy(
            update={
                "method": "passthrough",
                "base": None,
                "models": [ModelEntry(model=options.base)],
                "parameters": {},
                "moe": None,
                "config_from": options.config_from or options.base,
            }
        )
    models = [m.model_copy(update={"positive_prompts": []}) for m in options.models]
    update: dict[str, Any] = {"method": mo.shared, "models": models, "moe": None}
    if options.base is not None and methods[mo.shared].base == "none":
        update.update(base=None, config_from=options.config_from or options.base)
    return options.model_copy(update=update)


class Moe(MergeMethod):
    name = NAME
    summary = (
        "Mixture of experts: each model's MLP becomes one expert (Llama/Mistral -> Mixtral, Qwen3 -> Qwen3-MoE), "
        "shared tensors merged with moe.shared, routers from each expert's positive_prompts."
    )
    base = "optional"
    min_models = 2
    params = ()  # the recipe's parameters are the shared method's

    def recipe_problems(self, options: MergeOptions, methods: dict[str, MergeMethod]) -> list[Problem]:
        """What is wrong with a moe recipe, without opening any file (plan.static_problems calls this)."""
        mo = options.moe or MoeOptions()
        problems: list[Problem] = []
        if options.slices:
            problems.append(Problem("slices", "method moe makes each whole model one expert: list them under models"))
            return problems
        for why in self.check(len(options.models), options.base is not None):
            problems.append(Problem("models", why + " (one per expert)"))
        if mo.num_experts_per_tok > max(len(options.models), 1):
            problems.append(
                Problem(
                    "moe.num_experts_per_tok",
                    f"{mo.num_experts_per_tok} experts per token, but there are {len(options.models)} experts",
                )
            )
        if mo.router != "random":
            for i, m in enumerate(options.models):
                if not m.positive_prompts:
                    problems.append(
                        Problem(
                            f"models[{i}].positive_prompts",
                            'moe.router = "hidden" starts the routers from a few prompts per expert: give this '
                            'model\'s positive_prompts (or set moe.router = "random")',
                        )
                    )
                for j, text in enumerate(m.positive_prompts):
                    if not text.strip():
                        problems.append(Problem(f"models[{i}].positive_prompts[{j}]", "an empty prompt"))
        if mo.shared == SHARED_BASE:
            if options.base is None:
                problems.append(Problem("moe.shared", '"base" takes the shared tensors from the base: set base'))
            if options.parameters:
                name = next(iter(options.parameters))
                problems.append(
                    Problem(f"parameters.{name}", 'moe.shared = "base" copies the shared tensors: no parameters')
                )
            for i, m in enumerate(options.models):
                if m.parameters:
                    problems.append(
                        Problem(f"models[{i}].parameters", 'moe.shared = "base" copies the shared tensors: none')
                    )
            return problems
        if mo.shared == NAME or mo.shared not in methods:
            from llmforge.schema import did_you_mean

            known = sorted(n for n in methods if n != NAME)
            problems.append(
                Problem(
                    "moe.shared",
                    f"'{mo.shared}' is not a merge method for the shared tensors{did_you_mean(mo.shared, known)} "
                    f"(known: {', '.join(known)}, or base)",
                )
            )
            return problems
        if problems and any(p.where == "models" for p in problems):
            return problems  # too few models: the shared method would say so again
        for p in static_problems(_dense_options(options, methods), methods):
            problems.append(Problem(p.where, f"{p.message} (moe.shared = {mo.shared})"))
        return problems

    def plan_merge(
        self, options: MergeOptions, methods: dict[str, MergeMethod], out: Path | None, seed: int | None
    ) -> Plan:
        """The plan of a moe merge: the dense plan of the shared tensors, its MLP tensors replaced by the
        experts (one per model) and a router per layer. Raises like plan.prepare."""
        mo = options.moe or MoeOptions()  # plan.prepare has checked the recipe (recipe_problems)
        dense = prepare(_dense_options(options, methods), methods, out=None, seed=seed)
        experts = _expert_sources(options, dense)
        _check_configs(list(dict.fromkeys([*dense.sources, *experts])))
        model_type = dense.config.get("model_type")
        target = TARGETS.get(str(model_type))
        if target is None:
            raise UsageError(
                f"method moe builds Mixtral from Llama or Mistral models and Qwen3-MoE from Qwen3 models; "
                f"{dense.config_source.label} is {model_type or 'of an unknown model_type'}",
                hint="merge fine-tunes of a Llama, Mistral or Qwen3 base",
            )
        _check_layer_types(dense.config, dense.config_source.label)
        tensors: list[OutTensor] = []
        expert_names: set[str] = set()
        prefixes: dict[int, str] = {}
        seen: dict[int, set[str]] = {}
        for t in dense.tensors:
            m = _MLP.match(t.name)
            if m is None:
                _check_shared(t.name, target, dense.config_source.label)
                tensors.append(t)
                continue
            layer, prefix = int(m["layer"]), m["prefix"]
            prefixes[layer] = prefix
            seen.setdefault(layer, set()).add(m["proj"])
            for e, src in enumerate(experts):
                name = target.expert_name(prefix, layer, e, m["proj"])
                inp = Input(src, t.name)
                if not src.has(t.name):
                    raise UsageError(
                        f"tensor {t.name} is in {dense.config_source.label} but not in {src.label}",
                        hint="only models of the same architecture and size can be merged",
                    )
                _check_shapes(t.name, [Input(dense.config_source, t.name), inp])
                tensors.append(OutTensor(name, t.dtype, t.shape, t.layer, [inp], None, {}, copy=t.copy))
                expert_names.add(name)
        layers = sorted(prefixes)
        if layers != list(range(dense.num_layers)) or any(len(seen[i]) != 3 for i in layers):
            missing = next((i for i in range(dense.num_layers) if len(seen.get(i, ())) != 3), 0)
            raise UsageError(
                f"{dense.config_source.label}: layer {missing} has no gate_proj, up_proj and down_proj MLP to "
                "make experts of"
            )
        hidden = int(dense.config["hidden_size"])
        routers: dict[str, int] = {}
        by_name = {t.name: t for t in dense.tensors}
        for layer in layers:
            ref = by_name.get(f"{prefixes[layer]}{layer}.self_attn.q_proj.weight")
            dtype = ref.dtype if ref is not None else "float32"
            name = target.router_name(prefixes[layer], layer)
            tensors.append(OutTensor(name, dtype, (len(experts), hidden), layer, [], None, {}))
            routers[name] = layer
        tensors.sort(key=_sort_key)
        shards = make_shards(tensors, options.max_shard_size)
        total = sum(t.nbytes for t in tensors)
        config = moe_config(dense.config, target, len(experts), mo.num_experts_per_tok)
        prompt_source = _prompt_source(options, dense, experts)
        roles = {prompt_source.label: "base"} if options.base is not None else {}
        for e, src in enumerate(experts):
            roles.setdefault(src.label, f"expert {e}")
        roles.setdefault(dense.config_source.label, "config")
        bound = _MoeRun(
            shared=dense.method,
            experts=expert_names,
            routers=routers,
            options=options,
            expert_sources=experts,
            prompt_source=prompt_source,
            initializer_range=float(dense.config.get("initializer_range") or 0.02),
        )
        notes = list(dense.notes)
        plan = Plan(
            options,
            bound,
            tensors,
            shards,
            dense.num_layers,
            config,
            dense.config_source,
            list(dict.fromkeys([*dense.sources, *experts])),
            roles,
            dense.seed,
            dense.compute_dtype,
            total,
            notes,
        )
        if out is not None:
            check_disk(out, total)
        return plan

    def merge(self, models, base, params, info):
        raise RuntimeError("method moe plans its own merge (plan_merge); its plan holds the method that merges")


def _expert_sources(options: MergeOptions, dense: Plan) -> list[Source]:
    """The models' sources, in recipe order: read off the dense plan (which opened them), or opened here when
    the shared tensors come from the base alone."""
    mo = options.moe or MoeOptions()
    if mo.shared != SHARED_BASE:
        mlp = next((t for t in dense.tensors if _MLP.match(t.name)), None)
        if mlp is None:
            raise UsageError(f"{dense.config_source.label}: no MLP gate_proj/up_proj/down_proj to make experts of")
        return [i.source for i in mlp.models]
    opened: dict[Path, Source] = {s.path.resolve(): s for s in dense.sources}  # the base, opened already
    out = []
    for m in options.models:
        key = Path(m.model).expanduser().resolve()
        if m.lora_base is None and key in opened:
            out.append(opened[key])
            continue
        src = open_source(
            Path(m.model).expanduser(), label=m.model, lora_base=Path(m.lora_base).expanduser() if m.lora_base else None
        )
        out.append(src)
    return out


def _prompt_source(options: MergeOptions, dense: Plan, experts: list[Source]) -> Source:
    """The model the router prompts run through: the base, else the first model."""
    if options.base is not None:
        base = Path(options.base).expanduser().resolve()
        for s in dense.sources:
            if s.path.resolve() == base:
                return s
        return open_source(Path(options.base).expanduser(), label=options.base)
    return experts[0]


def _check_shared(name: str, target: Target, label: str) -> None:
    """Every tensor besides the MLP must be one the MoE architecture has (a Llama with attention or MLP biases
    has no Mixtral counterpart: transformers would drop the biases, silently)."""
    m = LAYER_RE.match(name)
    ok = (m.group(3).lstrip(".") in target.layer_tensors) if m else name.endswith(_OUTSIDE)
    if not ok:
        raise UsageError(
            f"{label}: tensor {name} has no counterpart in a {target.architecture} model",
            hint="method moe merges Llama/Mistral models without biases into Mixtral, Qwen3 models into Qwen3-MoE",
        )


def _check_layer_types(config: dict, label: str) -> None:
    types = config.get("layer_types")
    if config.get("use_sliding_window") or (isinstance(types, list) and any(t != "full_attention" for t in types)):
        raise UsageError(
            f"{label}: sliding-window attention layers (layer_types, use_sliding_window) have no Qwen3-MoE "
            "counterpart here",
            hint="method moe merges Qwen3 models whose layers all use full attention",
        )


def moe_config(dense: dict, target: Target, n_experts: int, per_token: int) -> dict:
    """config.json of the MoE: the dense config (the config source's), relabelled, with the expert keys."""
    cfg = {k: v for k, v in dense.items() if k not in target.drop and k != "transformers_version"}
    cfg["architectures"] = [target.architecture]
    cfg["model_type"] = target.model_type
    cfg[target.experts_key] = n_experts
    cfg["num_experts_per_tok"] = per_token
    cfg["output_router_logits"] = False
    if target is MIXTRAL:
        cfg.update(router_aux_loss_coef=0.02, router_jitter_noise=0.0)  # as Mixtral was released
        cfg.setdefault("sliding_window", None)
    else:
        # every layer a MoE layer, each expert a whole dense MLP; top-k weights renormalised to sum to 1 (as
        # released, and what llama.cpp computes): with one expert per token, the layer is that expert's MLP
        cfg.update(
            decoder_sparse_step=1,
            mlp_only_layers=[],
            moe_intermediate_size=dense["intermediate_size"],
            norm_topk_prob=True,
            router_aux_loss_coef=0.001,
        )
        cfg.pop("use_sliding_window", None)
    return cfg


# ------------------------------------------------------------------------------------------------
# running it


class _MoeRun(Moe):
    """The method a moe plan runs: experts copied, routers computed, shared tensors merged by `shared`."""

    def __init__(
        self,
        *,
        shared: MergeMethod,
        experts: set[str],
        routers: dict[str, int],
        options: MergeOptions,
        expert_sources: list[Source],
        prompt_source: Source,
        initializer_range: float,
    ):
        self.shared = shared
        self.experts = experts
        self.routers = routers
        self.options = options
        self.mo = options.moe or MoeOptions()
        self.expert_sources = expert_sources
        self.prompt_source = prompt_source
        self.initializer_range = initializer_range
        self._hidden: dict[int, Any] | None = None
        self.fit: dict[int, float] = {}  # layer -> share of prompt tokens routed to their own expert

    def merge(self, models, base, params, info: TensorInfo):
        if info.name in self.experts:
            return models[0]
        if info.name in self.routers:
            return self._router(info)
        return self.shared.merge(models, base, params, info)

    def _router(self, info: TensorInfo):
        import torch

        layer = self.routers[info.name]
        if self.mo.router == "random":
            hidden = int(self.prompt_source.config["hidden_size"])
            return torch.randn(len(self.expert_sources), hidden, generator=info.generator()) * self.initializer_range
        if self._hidden is None:
            self._hidden, self.fit = router_weights(
                self.prompt_source, [m.positive_prompts for m in self.options.models], sorted(self.routers.values())
            )
        return self._hidden[layer]

    def run_notes(self) -> list[str]:
        """Logged by the engine once the tensors are written: how well the routers tell the prompts apart."""
        if not self.fit:
            return []
        layers = ", ".join(f"{i}: {share:.0%}" for i, share in sorted(self.fit.items()))
        return [
            f"routers: {sum(self.fit.values()) / len(self.fit):.0%} of the positive prompts' tokens go to their "
            f"own expert (by layer {layers}; {1 / len(self.expert_sources):.0%} would be chance)"
        ]

    def card_section(self) -> str:
        """What the model card says about the experts and the routers (engine.model_card)."""
        rows = ["| expert | model | positive prompts |", "|---|---|---|"]
        for e, (src, m) in enumerate(zip(self.expert_sources, self.options.models)):
            prompts = "; ".join(p.replace("|", "\\|").replace("\n", " ") for p in m.positive_prompts) or "-"
            rows.append(f"| {e} | `{src.label}` | {prompts} |")
        if self.mo.router == "random":
            how = f"Routers: random (normal, std {self.initializer_range}, seeded)."
        else:
            share = sum(self.fit.values()) / len(self.fit) if self.fit else float("nan")
            how = (
                f"Routers: from the hidden states of `{self.prompt_source.label}` on each expert's positive prompts; "
                f"on those prompts they send {share:.0%} of the tokens to their own expert (mean over "
                f"{len(self.fit)} layers)."
            )
        shared = SHARED_BASE if self.mo.shared == SHARED_BASE else self.shared.name
        return "\n".join(
            [
                "## Experts",
                "",
                f"{len(self.expert_sources)} experts a layer, {self.mo.num_experts_per_tok} per token; the shared "
                f"tensors (attention, norms, embeddings, head): {shared}.",
                "",
                *rows,
                "",
                how,
                "",
            ]
        )


def _load_causal_lm(source: Source):
    """The prompt model, whole, in float32 (a LoRA adapter applied by PEFT)."""
    import torch
    from transformers import AutoModelForCausalLM

    if isinstance(source, LoraSource):
        if source.merged is not None:
            return AutoModelForCausalLM.from_pretrained(str(source.merged.path), dtype=torch.float32)
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(str(source.base.path), dtype=torch.float32)
        return PeftModel.from_pretrained(base, str(source.path)).merge_and_unload()
    return AutoModelForCausalLM.from_pretrained(str(source.path), dtype=torch.float32)


def router_weights(
    source: Source, prompts: list[list[str]], layers: list[int]
) -> tuple[dict[int, Any], dict[int, float]]:
    """Router weights (experts × hidden, per layer) from the hidden states of `source` on each expert's
    prompts, and per layer the share of the prompt tokens whose top-1 expert is their own (see the module's
    docstring). Memory: the model in float32, plus one prompt's activations and the per-layer means; the
    model is freed on return."""
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(source.tokenizer_dir))
    encoded: list[list[Any]] = []
    for e, texts in enumerate(prompts):
        encoded.append([])
        for j, text in enumerate(texts):
            ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
            if ids.numel() == 0:
                raise UsageError(f"models[{e}].positive_prompts[{j}]: the tokenizer makes no tokens of {text!r}")
            encoded[-1].append(ids[:, :MAX_PROMPT_TOKENS])
    model = _load_causal_lm(source)
    model.eval()
    decoder = model.get_decoder()
    captured: dict[int, Any] = {}

    def hook(index: int):
        def pre(_module, args):
            captured[index] = args[0].detach()[0].to(torch.float64)  # (tokens, hidden): batch of one

        return pre

    def each_prompt():
        """(expert, every layer's MLP input) for each prompt."""
        for e, batch in enumerate(encoded):
            for ids in batch:
                captured.clear()
                with torch.no_grad():
                    decoder(input_ids=ids, use_cache=False)
                yield e, captured

    n = len(prompts)
    handles = [decoder.layers[i].mlp.register_forward_pre_hook(hook(i)) for i in layers]
    try:
        sums = {i: torch.zeros(n, int(model.config.hidden_size), dtype=torch.float64) for i in layers}
        for e, states in each_prompt():
            for i in layers:
                sums[i][e] += states[i].mean(0)
        counts = torch.tensor([len(b) for b in encoded], dtype=torch.float64)[:, None]
        rows = {}
        for i in layers:
            means = sums[i] / counts
            rel = means - means.mean(0)
            lengths = rel.norm(dim=1)
            weak = int(torch.argmin(lengths))
            if lengths[weak] <= 1e-6 * float(means.norm(dim=1).max()):
                raise UsageError(
                    f"layer {i}: the positive prompts of models[{weak}] give the same mean hidden state as the "
                    f"others': the router cannot tell its expert apart",
                    hint="give each expert prompts about what sets it apart from the others",
                )
            rows[i] = rel / lengths[:, None]
        # second pass: the logits' RMS over the prompt tokens, and how many tokens go to their own expert
        square = dict.fromkeys(layers, 0.0)
        own = dict.fromkeys(layers, 0)
        tokens = 0
        for e, states in each_prompt():
            tokens += next(iter(states.values())).shape[0]
            for i in layers:
                logits = states[i] @ rows[i].T
                square[i] += float((logits**2).sum()) / n
                own[i] += int((logits.argmax(-1) == e).sum())
    finally:  # the model goes with this frame: nothing else holds it
        for h in handles:
            h.remove()
    weights, fit = {}, {}
    for i in layers:
        rms = (square[i] / tokens) ** 0.5
        weights[i] = (rows[i] / rms if rms > 0 else rows[i]).to(torch.float32)
        fit[i] = own[i] / tokens
    return weights, fit
