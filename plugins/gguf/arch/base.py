"""The `Arch` interface: what the export needs to know about one model family. See `llmforge_plugins.gguf.arch`
(the package docstring) for the contract and how to add a family.

Nothing heavy is imported at module level: numpy and gguf are imported inside the functions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import lru_cache, partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmforge.errors import UsageError

if TYPE_CHECKING:
    from llmforge_plugins.gguf.export import ModelFiles

Log = Callable[..., None]
#: reads one Hugging Face tensor by name: a private float32 numpy array in its HF shape
Read = Callable[[str], Any]
#: one per-tensor transform: values in, values out (numpy arrays)
Step = Callable[[Any], Any]

#: The parts every transformer block of a Llama-shaped model has (GGUF names after `blk.N.`).
LLAMA_LAYER_PARTS = (
    "attn_q.weight",
    "attn_k.weight",
    "attn_v.weight",
    "attn_output.weight",
    "ffn_gate.weight",
    "ffn_up.weight",
    "ffn_down.weight",
    "attn_norm.weight",
    "ffn_norm.weight",
)


# ------------------------------------------------------------------------------------------------
# config.json readers whose errors name the file and the key


def config_path(where: Path) -> Path:
    return where / "config.json"


def need_int(config: dict, key: str, where: Path) -> int:
    """A positive integer the export cannot do without."""
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise UsageError(f"{config_path(where)}: {key} is missing or not a positive integer")
    return value


def opt_int(config: dict, key: str, where: Path, default: int | None = None) -> int | None:
    """A positive integer that may be absent (or null): `default` then."""
    value = config.get(key)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise UsageError(f"{config_path(where)}: {key} is {value!r}, not a positive integer")
    return value


def need_float(config: dict, key: str, where: Path, default: float | None = None) -> float:
    """A number (`default` when absent; a UsageError naming the key when absent without a default)."""
    value = config.get(key, default)
    if value is None:
        raise UsageError(f"{config_path(where)}: {key} is missing")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UsageError(f"{config_path(where)}: {key} is {value!r}, not a number")
    return float(value)


def rope_parameters(config: dict) -> dict:
    """RoPE settings from either spelling: transformers v5's `rope_parameters` (possibly per layer type)
    or v4's `rope_theta` plus `rope_scaling` (whose type key was once `type`). The full-attention entry."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    if isinstance(params.get("full_attention"), dict):
        params = dict(params["full_attention"])
    if "rope_type" not in params and "type" in params:
        params["rope_type"] = params["type"]
    if "rope_theta" not in params and config.get("rope_theta") is not None:
        params["rope_theta"] = config["rope_theta"]
    params.setdefault("rope_theta", 10000.0)  # transformers' Llama default
    params.setdefault("rope_type", "default")
    return params


# ------------------------------------------------------------------------------------------------
# the model's shape


@dataclass
class HParams:
    """The hyperparameters every family has, read from config.json by `Arch.hparams`. Family-specific values go
    in `extra` (set by the family's own `hparams`), or are read from `config` by its hooks."""

    architecture: str  # config.json architectures[0]
    n_layers: int
    n_head: int
    n_kv_head: int
    hidden: int
    ff: int
    context: int
    rms_eps: float
    vocab_size: int
    head_dim: int
    tied: bool
    rope: dict  # rope_type, rope_theta, factor, ... (the full-attention entry, v4 or v5 spelling)
    explicit_head_dim: bool  # config.json names head_dim: key/value lengths are written, as the converter does
    config: dict = field(default_factory=dict, repr=False)  # the whole config.json
    where: Path = Path(".")  # the model folder, for messages
    extra: dict = field(default_factory=dict)  # family-specific values


# ------------------------------------------------------------------------------------------------
# the plan: every GGUF tensor, its sources and transforms, known before anything is written


@dataclass
class Planned:
    """One GGUF tensor: its name, what it is made from, its shape and type. The values are produced only while the
    file is written (`values`), one tensor at a time, so peak memory stays about one tensor."""

    name: str  # GGUF name
    sources: tuple[str, ...]  # Hugging Face tensors it is made from; () for a generated tensor
    shape: tuple[int, ...]  # numpy order (rows, columns), after make and steps
    qtype: Any = None  # gguf.GGMLQuantizationType; the export sets it from the output type
    steps: tuple[Step, ...] = ()  # applied in order to the values (RoPE permute, +1 on a norm, ...)
    make: Callable[[Read], Any] | None = None  # builds the values from several sources (stacked experts, a slice)
    data: Any = None  # a generated tensor's values
    f32: bool = False  # always F32 whatever the output type (as llama.cpp's converter keeps routers)

    @property
    def source(self) -> str | None:
        return self.sources[0] if self.sources else None

    def values(self, read: Read):
        if self.data is not None:
            values = self.data
        elif self.make is not None:
            values = self.make(read)
        else:
            values = read(self.sources[0])
        for step in self.steps:
            values = step(values)
        return values

    @property
    def nbytes(self) -> int:
        import gguf

        block, size = gguf.GGML_QUANT_SIZES[self.qtype]
        return math.prod(self.shape) // block * size


def rope_permute(w, n_head: int):
    """transformers rotates the two halves of each head's dimensions; llama.cpp's `llama` architecture rotates
    adjacent pairs. Interleave each head's two halves of rows so that llama.cpp's pairs are transformers' pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def add_offset(w, offset: float):
    """Gemma-style norms multiply by (1 + weight); llama.cpp multiplies by the stored weight."""
    return w + offset


# ------------------------------------------------------------------------------------------------
# the interface


class Arch:
    """One model family as llama.cpp's converter writes it. Subclass, set the class attributes, override the
    hooks that differ from a Llama-shaped decoder, and add an instance to `ARCHES` in arch/__init__.py."""

    #: config.json `architectures[0]` values this family exports
    hf_names: tuple[str, ...] = ()
    #: the gguf.MODEL_ARCH member name ("LLAMA", "QWEN2", ...): tensor names and metadata keys come from gguf's tables
    gguf_arch: str = ""
    #: config.json `hidden_act` values llama.cpp computes for this architecture
    activations: tuple[str, ...] = ("silu",)
    #: RoPE types written (or generated as tensors) for this architecture; others are refused
    rope_types: tuple[str, ...] = ("default", "linear", "yarn")
    #: regroup q/k rows (weights and biases) for llama.cpp's RoPE: only its `llama` architecture rotates pairs
    permute_rope: bool = False
    #: added to every `*norm.weight` (Gemma stores weight - 1); 0 leaves norms as they are
    norm_offset: float = 0.0
    #: what every block must hold (GGUF names after `blk.N.`); a missing one is a UsageError naming the layer
    layer_parts: tuple[str, ...] = LLAMA_LAYER_PARTS
    #: HF tensor name endings that are dropped (computed by llama.cpp)
    skip_suffixes: tuple[str, ...] = ("rotary_emb.inv_freq",)

    @property
    def gguf_name(self) -> str:
        """The architecture as GGUF spells it (general.architecture): "llama", "qwen2", ..."""
        import gguf

        return gguf.MODEL_ARCH_NAMES[self.model_arch]

    @property
    def model_arch(self):
        import gguf

        return getattr(gguf.MODEL_ARCH, self.gguf_arch)

    # -- reading the config ------------------------------------------------------------------------

    def hparams(self, config: dict, where: Path) -> HParams:
        """The common hyperparameters (a UsageError naming the key when one is missing or wrong). Families with
        more call super() and fill `hp.extra`, or read more keys in their own hooks."""
        arch = (config.get("architectures") or [None])[0]
        n_head = need_int(config, "num_attention_heads", where)
        hidden = need_int(config, "hidden_size", where)
        head_dim = opt_int(config, "head_dim", where) or hidden // n_head
        return HParams(
            architecture=str(arch),
            n_layers=need_int(config, "num_hidden_layers", where),
            n_head=n_head,
            n_kv_head=opt_int(config, "num_key_value_heads", where) or n_head,
            hidden=hidden,
            ff=need_int(config, "intermediate_size", where),
            context=need_int(config, "max_position_embeddings", where),
            rms_eps=need_float(config, "rms_norm_eps", where, 1e-6),
            vocab_size=need_int(config, "vocab_size", where),
            head_dim=int(head_dim),
            tied=bool(config.get("tie_word_embeddings", False)),
            rope=rope_parameters(config),
            explicit_head_dim=config.get("head_dim") is not None,
            config=config,
            where=where,
        )

    def check(self, hp: HParams, log: Log) -> None:
        """Refuse (UsageError) or warn (log(..., "warning")) about what llama.cpp cannot represent. The base
        checks the activation, the RoPE type and a sliding window this architecture does not apply."""
        act = hp.config.get("hidden_act") or hp.config.get("hidden_activation") or "silu"
        if act not in self.activations:
            raise UsageError(
                f"{config_path(hp.where)}: hidden_act {act!r}; llama.cpp's {self.gguf_name} architecture computes "
                f"{' / '.join(self.activations)}"
            )
        kind = str(hp.rope.get("rope_type", "default")).lower()
        if kind == "dynamic":
            log(
                "RoPE scaling 'dynamic' (NTK) has no llama.cpp equivalent: the GGUF matches the model up to "
                f"{hp.context} tokens of context",
                "warning",
            )
        elif kind not in self.rope_types:
            raise UsageError(
                f"{config_path(hp.where)}: RoPE scaling type {kind!r} is not supported by llama.cpp's "
                f"{self.gguf_name} architecture",
                hint=f"supported: {', '.join(self.rope_types)}",
            )
        window = self.sliding_window(hp)
        if window is not None and window < hp.context:
            log(
                f"sliding_window {window}: llama.cpp's {self.gguf_name} architecture attends to the whole context, "
                f"so outputs differ from transformers beyond {window} tokens",
                "warning",
            )

    def sliding_window(self, hp: HParams) -> int | None:
        """The window the HF model applies (None: full attention). The base reads `sliding_window`."""
        window = hp.config.get("sliding_window")
        return window if isinstance(window, int) and not isinstance(window, bool) else None

    # -- metadata ----------------------------------------------------------------------------------

    def metadata(self, writer, hp: HParams, log: Log) -> None:
        """Family keys, written after the common ones (block/context/embedding/feed-forward lengths, head counts,
        RoPE scaling and base, RMS epsilon, key/value lengths when config.json names head_dim, file type).
        The base writes nothing more."""

    # -- tensors -----------------------------------------------------------------------------------

    def plan(self, files: ModelFiles, hp: HParams) -> list[Planned]:
        """Every GGUF tensor but generated ones, qtype left unset. The base maps each HF tensor one to one through
        gguf's name map (`planned`), skipping `skip_suffixes` and a tied lm_head. Families that combine tensors
        (stacked experts) override this, take their groups out, and hand the rest to super()."""
        out = []
        for hf_name in files.tensors:
            if hf_name.endswith(self.skip_suffixes):
                continue
            if hp.tied and hf_name == "lm_head.weight":
                continue  # tied: transformers ignores a stored head and uses the embedding, so does llama.cpp
            out.append(self.planned(files, hp, hf_name))
        return out

    def planned(self, files: ModelFiles, hp: HParams, hf_name: str) -> Planned:
        """One HF tensor as one GGUF tensor: named by gguf's map, transformed by `steps`."""
        gguf_name = self.map_name(files, hf_name)
        shape = files.tensors[hf_name].shape
        return Planned(gguf_name, (hf_name,), shape, steps=self.steps(hp, hf_name, gguf_name, shape))

    def map_name(self, files: ModelFiles, hf_name: str) -> str:
        n_layers = files.config.get("num_hidden_layers")
        name = self.name_map(n_layers if isinstance(n_layers, int) else 0).get_name(
            hf_name, try_suffixes=(".weight", ".bias")
        )
        if name is None:
            raise UsageError(
                f"{files.path}: tensor {hf_name} has no place in llama.cpp's {self.gguf_name} architecture",
                hint=f"{', '.join(self.hf_names)} checkpoints with the standard layout can be exported",
            )
        return name

    def name_map(self, n_layers: int):
        """gguf's HF -> GGUF tensor name map for this architecture (built once per layer count)."""
        return _name_map(self.gguf_arch, n_layers)

    def steps(self, hp: HParams, hf_name: str, gguf_name: str, shape: tuple[int, ...]) -> tuple[Step, ...]:
        """The per-tensor transforms: RoPE regrouping of q/k (when `permute_rope`), the norm offset."""
        out: list[Step] = []
        if self.permute_rope:
            heads = 0
            if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
                heads = hp.n_head
            elif hf_name.endswith(("k_proj.weight", "k_proj.bias")):
                heads = hp.n_kv_head
            if heads:
                if shape[0] % (2 * heads):
                    raise UsageError(f"{hp.where}: {hf_name} has {shape[0]} rows, not a multiple of 2 x {heads} heads")
                out.append(partial(rope_permute, n_head=heads))
        if self.norm_offset and hf_name.endswith("norm.weight"):
            out.append(partial(add_offset, offset=self.norm_offset))
        return tuple(out)

    def extra_tensors(self, hp: HParams) -> list[Planned]:
        """Generated tensors (data set, no sources), e.g. Llama 3.1's rope_freqs. The base has none."""
        return []

    def check_tensors(self, files: ModelFiles, hp: HParams, by_name: dict[str, Planned]) -> None:
        """Everything llama.cpp will look up is there: the embedding with the config's shape, the head when
        untied, and `layer_parts` in every layer."""
        embd = by_name.get("token_embd.weight")
        if embd is None:
            raise UsageError(f"{files.path}: no token embedding (model.embed_tokens.weight)")
        if embd.shape != (hp.vocab_size, hp.hidden):
            raise UsageError(
                f"{files.path}: the token embedding is {list(embd.shape)}, config.json says "
                f"vocab_size {hp.vocab_size} x hidden_size {hp.hidden}"
            )
        if not hp.tied and "output.weight" not in by_name:
            raise UsageError(
                f"{files.path}: no lm_head.weight, and config.json says the embeddings are not tied "
                f"(tie_word_embeddings = false)"
            )
        for layer in range(hp.n_layers):
            for part in self.layer_parts:
                if f"blk.{layer}.{part}" not in by_name:
                    kind = part.rsplit(".", 1)
                    raise UsageError(
                        f"{files.path}: layer {layer} has no {kind[0]} {kind[1]} "
                        f"(config.json says {hp.n_layers} layers; {hp.architecture} needs it)"
                    )


@lru_cache(maxsize=8)
def _name_map(gguf_arch: str, n_layers: int):
    import gguf

    return gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, gguf_arch), n_layers)


def supported_names(arches: Iterable[Arch]) -> list[str]:
    return [name for arch in arches for name in arch.hf_names]
