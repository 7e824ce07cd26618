"""The built-in merge methods, each registered through `register_merge_methods` like a plugin's would be.

Notation (docs/merge.md): base b, models θᵢ, task vectors δᵢ = θᵢ − b, weights wᵢ. Every method works
on one tensor at a time, in place where it can and chunk by chunk for the elementwise parts, so the
memory of a merge stays near (number of inputs × the tensor) however large the tensor is.

Imported at start-up: torch only inside `merge()`.
"""

from __future__ import annotations

import math
from typing import Any

from llmforge_plugins.merge.api import CHUNK, MergeMethod, Param, TensorInfo, chunks, dot, flat, kth_largest_abs

WEIGHT = Param("weight", 1.0, "Weight of the model.", per_model=True)
DENSITY = Param(
    "density", 1.0, "Fraction of each task vector's entries kept (1 keeps all).", per_model=True, gt=0, le=1
)
LAMBDA = Param("lambda", 1.0, "Scale of the merged task vector added to the base.")


def _normalize(default: bool, what: str) -> Param:
    return Param("normalize", default, what, kind="bool")


def _weighted_sum_into(acc, others, weights) -> None:
    """acc = w₀·acc + Σ wᵢ·othersᵢ, in place."""
    acc.mul_(weights[0])
    for i, t in enumerate(others, start=1):
        acc.add_(t, alpha=weights[i])


def _zero_weight_sum(params: dict[str, Any]) -> str | None:
    """The check of every method that may divide by the sum of the weights (normalize)."""
    if params["normalize"] and abs(sum(params["weight"])) < 1e-12:
        return "the weights sum to 0 (set normalize = false, or change the weights)"
    return None


class Linear(MergeMethod):
    name = "linear"
    summary = "Weighted average of the models: Σwᵢθᵢ / Σwᵢ (normalize = false: Σwᵢθᵢ)."
    base = "none"
    min_models = 1
    params = (WEIGHT, _normalize(True, "Divide by the sum of the weights."))

    def check_tensor(self, params: dict[str, Any], info: TensorInfo) -> str | None:
        return _zero_weight_sum(params)

    def merge(self, models, base, params, info):
        w = params["weight"]
        out = models[0]
        _weighted_sum_into(out, models[1:], w)
        if params["normalize"]:
            out.div_(sum(w))
        return out


class TaskArithmetic(MergeMethod):
    name = "task_arithmetic"
    summary = "Add the weighted task vectors to the base: b + λ·Σwᵢδᵢ."
    base = "required"
    min_models = 1
    params = (WEIGHT, LAMBDA, _normalize(False, "Divide the sum of task vectors by the sum of the weights."))

    def check_tensor(self, params: dict[str, Any], info: TensorInfo) -> str | None:
        return _zero_weight_sum(params)

    def merge(self, models, base, params, info):
        for m in models:
            m.sub_(base)
        acc = models[0]
        _weighted_sum_into(acc, models[1:], params["weight"])
        if params["normalize"]:
            acc.div_(sum(params["weight"]))
        return base.add_(acc, alpha=params["lambda"])


def _trim(delta, density: float) -> None:
    """Keep the ⌈density·n⌉ entries of largest magnitude (ties at the threshold all kept), zero the rest."""
    n = delta.numel()
    k = min(n, math.ceil(density * n - 1e-9))
    if n == 0 or k >= n:
        return
    fd = flat(delta)
    if k <= 0:
        fd.zero_()
        return
    threshold = kth_largest_abs(fd, k)
    for s in chunks(n):
        c = fd[s]
        c.masked_fill_(c.abs() < threshold, 0)


def _drop_and_rescale(delta, density: float, generator) -> None:
    """DARE: drop each entry with probability 1 − density, multiply the survivors by 1/density. The draws
    come from `generator`, chunk after chunk (CHUNK elements), in float32 whatever the compute dtype."""
    import torch

    if density >= 1:
        return
    fd = flat(delta)
    for s in chunks(fd.numel(), CHUNK):
        c = fd[s]
        keep = torch.rand(c.numel(), generator=generator, dtype=torch.float32) < density
        c.mul_(keep).div_(density)


def _sign_consensus(base, deltas, weights, lam: float, normalize: bool):
    """TIES merging of (already trimmed or dropped) task vectors into `base`, in place: elect a sign per
    entry (the sign of Σwᵢδᵢ), keep the entries that agree with it, combine them weighted (divided by
    the agreeing weights with normalize), and add λ times the result to the base."""
    import torch

    fb = flat(base)
    fds = [flat(d) for d in deltas]
    for s in chunks(fb.numel()):
        total = fds[0][s] * weights[0]
        for w, d in zip(weights[1:], fds[1:]):
            total.add_(d[s], alpha=w)
        sign = torch.sign(total)
        num = torch.zeros_like(total)
        den = torch.zeros_like(total) if normalize else None
        for w, d in zip(weights, fds):
            c = d[s]
            agree = (torch.sign(c) == sign) & (c != 0)
            num.add_(c * agree, alpha=w)
            if den is not None:  # normalize
                den.add_(agree.to(den.dtype), alpha=w)
        if den is not None:
            num = torch.where(den != 0, num / torch.where(den != 0, den, torch.ones_like(den)), torch.zeros_like(num))
        fb[s].add_(num, alpha=lam)
    return base


class Ties(MergeMethod):
    name = "ties"
    summary = "TIES: trim each task vector to its top density, elect signs, average the agreeing entries."
    base = "required"
    min_models = 1
    params = (
        WEIGHT,
        DENSITY,
        LAMBDA,
        _normalize(True, "Divide by the sum of the weights that agree with the elected sign, per entry."),
    )

    def merge(self, models, base, params, info):
        for m, density in zip(models, params["density"]):
            m.sub_(base)
            _trim(m, density)
        return _sign_consensus(base, models, params["weight"], params["lambda"], params["normalize"])


class DareLinear(MergeMethod):
    name = "dare_linear"
    summary = "DARE: drop task-vector entries at random (keep density), rescale by 1/density, add linearly."
    base = "required"
    min_models = 1
    params = (WEIGHT, DENSITY, LAMBDA, _normalize(False, "Divide the sum of task vectors by the sum of the weights."))

    def check_tensor(self, params: dict[str, Any], info: TensorInfo) -> str | None:
        return _zero_weight_sum(params)

    def merge(self, models, base, params, info):
        for i, (m, density) in enumerate(zip(models, params["density"])):
            m.sub_(base)
            _drop_and_rescale(m, density, info.generator(i))
        acc = models[0]
        _weighted_sum_into(acc, models[1:], params["weight"])
        if params["normalize"]:
            acc.div_(sum(params["weight"]))
        return base.add_(acc, alpha=params["lambda"])


class DareTies(MergeMethod):
    name = "dare_ties"
    summary = "DARE drops and rescaling, then TIES sign election and averaging of the agreeing entries."
    base = "required"
    min_models = 1
    params = Ties.params

    def merge(self, models, base, params, info):
        for i, (m, density) in enumerate(zip(models, params["density"])):
            m.sub_(base)
            _drop_and_rescale(m, density, info.generator(i))
        return _sign_consensus(base, models, params["weight"], params["lambda"], params["normalize"])


class Slerp(MergeMethod):
    name = "slerp"
    summary = "Spherical interpolation between two models by t (linear when they are nearly colinear)."
    base = "optional"
    min_models = 1
    max_models = 2
    params = (
        Param(
            "t", None, "Position between the two models: 0 is the first (the base, if given), 1 the second.", ge=0, le=1
        ),
    )
    #: |cos| above which the two tensors count as colinear and are interpolated linearly
    COLINEAR = 0.9995

    def check(self, n_models, has_base):
        problems = super().check(n_models, has_base)
        if not problems and n_models + has_base != 2:
            problems.append(
                "method slerp interpolates between exactly two models: give two models, or a base "
                f"and one model (got {n_models} model{'s' if n_models != 1 else ''}"
                f"{' and a base' if has_base else ''})"
            )
        return problems

    def merge(self, models, base, params, info):
        a, b = (base, models[0]) if base is not None else (models[0], models[1])
        t = params["t"]
        na, nb = math.sqrt(dot(a, a)), math.sqrt(dot(b, b))
        cos = dot(a, b) / (na * nb) if na > 0 and nb > 0 else 1.0
        if abs(cos) > self.COLINEAR:
            return a.mul_(1 - t).add_(b, alpha=t)
        theta = math.acos(max(-1.0, min(1.0, cos)))
        sin = math.sin(theta)
        return a.mul_(math.sin((1 - t) * theta) / sin).add_(b, alpha=math.sin(t * theta) / sin)


class ModelStock(MergeMethod):
    name = "model_stock"
    summary = (
        "Model Stock: move from the base towards the models' average by a t set per tensor from the "
        "angle between the task vectors."
    )
    base = "required"
    min_models = 2
    params = ()

    @staticmethod
    def ratio(deltas) -> float:
        """t = N·cosθ / (1 + (N − 1)·cosθ), cosθ the mean pairwise cosine of the task vectors, t in [0, 1]."""
        n = len(deltas)
        norms = [math.sqrt(dot(d, d)) for d in deltas]
        cosines = [
            dot(deltas[i], deltas[j]) / (norms[i] * norms[j])
            for i in range(n)
            for j in range(i + 1, n)
            if norms[i] > 0 and norms[j] > 0
        ]
        if not cosines:
            return 0.0
        cos = sum(cosines) / len(cosines)
        den = 1 + (n - 1) * cos
        if den <= 1e-12:
            return 0.0
        return min(1.0, max(0.0, n * cos / den))

    def merge(self, models, base, params, info):
        for m in models:
            m.sub_(base)
        t = self.ratio(models)
        acc = models[0]
        for m in models[1:]:
            acc.add_(m)
        return base.add_(acc, alpha=t / len(models))


class Passthrough(MergeMethod):
    name = "passthrough"
    summary = "Copy each tensor from its one source (with slices: layer stacking, depth up-scaling)."
    base = "none"
    min_models = 1
    max_models = 1
    params = (Param("scale", 1.0, "Multiply the tensor by this (e.g. per filter, to damp stacked layers)."),)

    def merge(self, models, base, params, info):
        out = models[0]
        if params["scale"] != 1.0:
            out.mul_(params["scale"])
        return out


BUILTIN = (Linear, Slerp, TaskArithmetic, Ties, DareLinear, DareTies, ModelStock, Passthrough)
