"""Merge methods: the API a plugin implements to add a way of merging models (`register_merge_methods`).

This module belongs to the merge plugin, which also declares the extension point (``MERGE_METHODS``,
below): the core knows nothing of merging. A third-party method imports its base class from here.

A merge method combines, one tensor at a time, the same tensor of several models (and of a base model,
for the methods that work on task vectors δᵢ = θᵢ − b). The merge engine (the first-party `merge`
plugin) does everything around it: it reads the inputs tensor by tensor from safetensors files,
resolves the method's parameters for each tensor (a scalar, a list interpolated across layers, or
values chosen by a tensor-name filter), calls :meth:`MergeMethod.merge`, and writes the result. So a
method is only the formula::

    from llmforge_plugins.merge.api import MergeMethod, Param

    class Mean(MergeMethod):
        name = "mean"
        summary = "Elementwise mean of the models."
        base = "none"                       # "required", "optional" or "none"
        min_models = 2
        params = (Param("scale", 1.0, "Multiply the result by this."),)

        def merge(self, models, base, params, info):
            out = models[0]
            for m in models[1:]:
                out.add_(m)
            return out.mul_(params["scale"] / len(models))

No torch at import time: this module is imported when the plugin registry is built, at every start-up.
The helpers below take tensors and import torch only when called.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from llmforge.extension import ExtensionPoint, subclass_of

#: Elements per chunk for the chunked elementwise helpers: bounds the temporaries of a merge to a few
#: times this many elements, whatever the tensor's size. Also fixes the random streams of DARE (a
#: generator draws chunk after chunk), so it must not change between releases without bumping the
#: merge stage's version.
CHUNK = 1 << 20


@dataclass(frozen=True)
class Param:
    """One parameter of a merge method.

    ``per_model`` parameters (``weight``, ``density``) may be given for each model (``[[models]]``
    ``parameters``) and fall back to the recipe-wide value; the others only recipe-wide. ``default``
    None makes the parameter required. Bounds (``ge``, ``gt``, ``le``, ``lt``) are checked on every
    value before any work starts, each list element and filter value included. ``kind`` is ``float``
    or ``bool``.
    """

    name: str
    default: float | bool | None
    description: str
    per_model: bool = False
    kind: Literal["float", "bool"] = "float"
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def check(self, value: Any) -> str | None:
        """None if ``value`` is acceptable, else why not (``must be <= 1 (got 1.5)``)."""
        if self.kind == "bool":
            return None if isinstance(value, bool) else f"must be true or false (got {value!r})"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"must be a number (got {value!r})"
        if not math.isfinite(value):
            return f"must be a finite number (got {value!r})"
        for bound, ok, word in (
            (self.ge, lambda v, b: v >= b, ">="),
            (self.gt, lambda v, b: v > b, ">"),
            (self.le, lambda v, b: v <= b, "<="),
            (self.lt, lambda v, b: v < b, "<"),
        ):
            if bound is not None and not ok(value, bound):
                return f"must be {word} {_num(bound)} (got {_num(value)})"
        return None

    def describe_range(self) -> str:
        parts = []
        for bound, word in ((self.ge, ">="), (self.gt, ">"), (self.le, "<="), (self.lt, "<")):
            if bound is not None:
                parts.append(f"{word} {_num(bound)}")
        return ", ".join(parts)


def _num(x: float) -> str:
    return str(int(x)) if isinstance(x, float) and x.is_integer() else str(x)


@dataclass
class TensorInfo:
    """What a method knows about the tensor being merged.

    ``name`` is the output tensor's name, ``layer`` its layer index in the output (None for
    embeddings, final norm, output head), ``num_layers`` the output's layer count, ``sources`` the
    names of the input models (same order as ``models``), ``seed`` the recipe's seed.
    """

    name: str
    layer: int | None
    num_layers: int
    sources: list[str] = field(default_factory=list)
    seed: int = 0

    def generator(self, index: int = 0):
        """A torch.Generator seeded from (seed, tensor name, model index): the same recipe and seed give
        the same random draws, whatever the order tensors are merged in."""
        import torch

        digest = hashlib.sha256(f"{self.seed}\0{self.name}\0{index}".encode()).digest()
        gen = torch.Generator(device="cpu")
        gen.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
        return gen


class MergeMethod:
    """Base class of merge methods. Registered (as a class) through ``register_merge_methods``.

    Class attributes:

    * ``name``: what ``method = "<name>"`` / ``--method`` selects; ``summary``: one line.
    * ``base``: ``"required"`` (task-vector methods), ``"optional"`` or ``"none"`` (refused if given).
    * ``min_models`` / ``max_models``: how many models besides the base (None: no limit).
    * ``params``: the :class:`Param` s it reads (others are refused, with a suggestion).
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    base: ClassVar[Literal["required", "optional", "none"]] = "optional"
    min_models: ClassVar[int] = 1
    max_models: ClassVar[int | None] = None
    params: ClassVar[tuple[Param, ...]] = ()

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    def check(self, n_models: int, has_base: bool) -> list[str]:
        """Problems with the number of inputs (before any work). Override for other rules, calling super()."""
        problems = []
        if self.base == "required" and not has_base:
            problems.append(f"method {self.name} needs a base model (base = ..., or --base)")
        if self.base == "none" and has_base:
            problems.append(f"method {self.name} does not use a base model; list it under models instead")
        if n_models < self.min_models:
            problems.append(
                f"method {self.name} needs at least {self.min_models} model"
                f"{'s' if self.min_models != 1 else ''} besides the base (got {n_models})"
            )
        if self.max_models is not None and n_models > self.max_models:
            problems.append(
                f"method {self.name} takes at most {self.max_models} model"
                f"{'s' if self.max_models != 1 else ''} besides the base (got {n_models})"
            )
        return problems

    def check_tensor(self, params: dict[str, Any], info: TensorInfo) -> str | None:
        """Called for every output tensor before any work, with its resolved parameters: return why they
        cannot work (``the weights sum to 0``), or None. Cheap: no tensor data is available here."""
        return None

    def merge(self, models: list, base: Any, params: dict[str, Any], info: TensorInfo) -> Any:
        """Merge one tensor and return the result.

        ``models``: the tensor of each model (torch tensors, all of the same shape, in the compute
        dtype); ``base``: the base model's tensor or None. The method owns them: it may modify them
        in place, return one of them, and drop entries (``models[i] = None``) to free memory early.
        ``params``: this tensor's parameter values: name -> value for recipe-wide parameters,
        name -> list of values (one per model) for ``per_model`` ones. ``info``: a :class:`TensorInfo`.
        """
        raise NotImplementedError


def _method_rules(cls: Any) -> None:
    """What the engine relies on beyond the base class: a known ``base`` policy and ``Param`` entries
    (checked at registration, so a bad method is a load error naming it, not a crash mid-merge)."""
    if cls.base not in ("required", "optional", "none"):
        raise TypeError(f"{cls.__qualname__}.base must be 'required', 'optional' or 'none', not {cls.base!r}")
    if not all(isinstance(p, Param) for p in cls.params):
        raise TypeError(f"{cls.__qualname__}.params must be a tuple of llmforge_plugins.merge.api.Param")


#: The extension point other plugins add merge methods through; the merge stage and commands read the
#: table with ``registry.table(MERGE_METHODS)`` (name -> MergeMethod instance, built-ins first).
MERGE_METHODS = ExtensionPoint(
    hook="register_merge_methods",
    table="merge_methods",
    label="merge method",
    doc="""Register model-merging methods: :class:`llmforge_plugins.merge.api.MergeMethod` subclasses.

    The name is what ``method = "<name>"`` (the ``merge`` stage, a merge recipe) and
    ``llmforge merge --method <name>`` select. A method only computes one merged tensor from the
    same tensor of each model (and of the base); reading, parameters per layer or per tensor-name
    filter, and writing are the merge engine's. The built-in methods (``linear``, ``slerp``,
    ``task_arithmetic``, ``ties``, ``dare_linear``, ``dare_ties``, ``model_stock``, ``passthrough``, and
    ``moe``, which plans an output of other tensors itself) are registered through this hook too. (Declared
    by the merge plugin.)
    """,
    validate=subclass_of(MergeMethod, instantiate=True, check=_method_rules),
)


# ------------------------------------------------------------------------------------------------
# helpers for methods: elementwise work in bounded memory


def chunks(numel: int, size: int = CHUNK) -> Iterator[slice]:
    """Slices covering ``range(numel)`` in pieces of ``size`` elements (for flat views of tensors)."""
    for start in range(0, numel, size):
        yield slice(start, min(start + size, numel))


def flat(t: Any) -> Any:
    """A flat view of a contiguous tensor (a copy only if it is not contiguous)."""
    return t.contiguous().view(-1)


def dot(a: Any, b: Any) -> float:
    """Σ a·b over all elements, accumulated in float64 chunk by chunk."""
    fa, fb = flat(a), flat(b)
    total = 0.0
    for s in chunks(fa.numel()):
        total += float((fa[s].double() * fb[s].double()).sum())
    return total


def kth_largest_abs(t: Any, k: int, bins: int = 4096, limit: int = CHUNK) -> float:
    """The k-th largest |x| of tensor ``t`` (k >= 1), exactly, in memory bounded by ``limit`` elements.

    Small tensors are selected directly. For large ones, a strided sample brackets the value, and one
    pass over the tensor counts what lies above the bracket and collects what lies inside it; the
    answer is exact whenever the bracket holds it (nearly always), otherwise counting passes narrow
    the range bucket by bucket (:func:`_kth_by_buckets`). Keeping ``|x| >= result`` keeps at least k
    entries (more only when values tie at the threshold).
    """
    import torch

    x = flat(t)
    n = x.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    if n <= limit:
        return float(x.abs().kthvalue(n - k + 1).values)
    step = max(1, n // (1 << 18))
    sample = x[::step].abs().sort(descending=True).values
    m = sample.numel()
    q = k / n
    margin = 6 * math.sqrt(m * q * (1 - q)) + 32
    r_hi, r_lo = int(q * m - margin), int(q * m + margin) + 1  # sample ranks (1 = largest) around the target
    hi_v = float(sample[r_hi - 1]) if r_hi >= 1 else math.inf
    lo_v = float(sample[r_lo - 1]) if r_lo <= m else 0.0
    del sample
    above = at = kept = 0
    inside = []
    for s in chunks(n):
        a = x[s].abs()
        above += int(torch.count_nonzero(a > hi_v))
        if lo_v == hi_v:  # the bracket is one value (often 0): count it, collect nothing
            at += int(torch.count_nonzero(a == hi_v))
            continue
        mid = a[(a >= lo_v) & (a <= hi_v)]
        kept += mid.numel()
        if kept > limit:
            return _kth_by_buckets(x, k, bins, limit)
        inside.append(mid)
    need = k - above
    if lo_v == hi_v:
        if 1 <= need <= at:
            return hi_v
    elif need >= 1 and inside:
        mid = torch.cat(inside)
        if need <= mid.numel():
            return float(mid.kthvalue(mid.numel() - need + 1).values)
    return _kth_by_buckets(x, k, bins, limit)


def _kth_by_buckets(x: Any, k: int, bins: int, limit: int) -> float:
    """The exact k-th largest |x| by counting passes: the value range is cut into buckets, the bucket
    holding the k-th value is kept, until its values fit in ``limit`` elements (then they are sorted)."""
    import torch

    n = x.numel()
    lo: float | None = None
    hi: float | None = None
    for s in chunks(n):
        a = x[s].abs()
        lo = float(a.min()) if lo is None else min(lo, float(a.min()))
        hi = float(a.max()) if hi is None else max(hi, float(a.max()))
    assert lo is not None and hi is not None  # called for n > limit elements: at least one chunk
    rank = k  # the wanted value is the rank-th largest among values in [lo, hi]
    while True:
        if hi <= lo:
            return lo
        width = (hi - lo) / bins
        if width <= 0 or not math.isfinite(width):
            return hi
        counts = torch.zeros(bins, dtype=torch.int64)
        for s in chunks(n):
            a = x[s].abs().double()
            a = a[(a >= lo) & (a <= hi)]
            idx = ((a - lo) / width).floor().clamp_(0, bins - 1).long()
            counts += torch.bincount(idx, minlength=bins)
        above = torch.flip(counts, [0]).cumsum(0)  # above[j] = count in the top j+1 buckets
        j_top = int(torch.searchsorted(above, torch.tensor([rank]), side="left")[0])
        bucket = bins - 1 - j_top
        before = int(above[j_top - 1]) if j_top > 0 else 0
        in_bucket = int(counts[bucket])
        rank -= before
        if in_bucket <= limit:
            picked = []
            for s in chunks(n):
                a = x[s].abs().double()
                a = a[(a >= lo) & (a <= hi)]
                idx = ((a - lo) / width).floor().clamp_(0, bins - 1).long()
                picked.append(a[idx == bucket])
            vals = torch.cat(picked).sort(descending=True).values
            return float(vals[rank - 1].to(x.dtype))
        # Too many candidates: zoom into the bucket. Values are selected by the same bucket formula, so
        # the new range [min, max] of the bucket's values holds exactly them.
        lo, hi = _bucket_range(x, lo, hi, width, bins, bucket)


def _bucket_range(x: Any, lo: float, hi: float, width: float, bins: int, bucket: int) -> tuple[float, float]:
    """The exact min and max of the values that fall in ``bucket`` (so the next pass's range holds
    exactly those values, and no value is counted twice)."""
    b_min: float | None = None
    b_max: float | None = None
    for s in chunks(x.numel()):
        a = x[s].abs().double()
        a = a[(a >= lo) & (a <= hi)]
        idx = ((a - lo) / width).floor().clamp_(0, bins - 1).long()
        a = a[idx == bucket]
        if a.numel():
            b_min = float(a.min()) if b_min is None else min(b_min, float(a.min()))
            b_max = float(a.max()) if b_max is None else max(b_max, float(a.max()))
    # The counting pass found values in this bucket, with the same formula over the same tensor.
    assert b_min is not None and b_max is not None
    return b_min, b_max


def interpolate(values: list[float], position: float) -> float:
    """A value from a list spread evenly over [0, 1] (first value at 0, last at 1), linearly between."""
    if len(values) == 1:
        return values[0]
    x = min(max(position, 0.0), 1.0) * (len(values) - 1)
    i = min(int(math.floor(x)), len(values) - 2)
    frac = x - i
    return values[i] * (1 - frac) + values[i + 1] * frac
