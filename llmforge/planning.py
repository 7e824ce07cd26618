"""Memory and disk estimates for each stage of a pipeline, before anything runs: `llmforge plan`, and
the fit check a run makes first (`fit_check`, asked for by `RunRequest.fit`).

Each stage estimates itself (`Stage.estimate(options, env)`, llmforge/stage.py); this module knows no
stage kind. It is the library those estimates use and the driver that asks them:

* the model's shape: `Shape`, `shape_from_config`, `shape_from_dir`; a stage's model input through
  `PlanEnv.shape_of`, which follows `@stage` references to the `Stage.output_shape` of the stage that
  writes the model (the pretrain plugin answers from its size presets, merge from its first source);
* the arithmetic of training with the HF Trainer: `Training`, `estimate_training`, `activation_bytes`
  (weights, gradients, optimizer states, activations, LoRA/QLoRA, ZeRO/FSDP sharding and offload);
* the driver: `plan()` asks every stage, judges each `Estimate` against the machine, and for a training
  stage that does not fit suggests changes (`suggest`) re-estimated with the same arithmetic.

Pure arithmetic on shapes and options; no torch import, so it answers in milliseconds. docs/plan.md
explains every term and compares the figures with measured runs and with published numbers.

The peak memory of one training process is modelled as

    persistent  = weights + optimizer states (+ fp32 master weights, reference model, DDP buckets)
    forward     = saved activations + the loss's working tiles (+ bf16 weight copies under autocast)
                  (+ gradients, when accumulation keeps them across micro-batches)
    step        = gradients (torch's fused AdamW, the Trainer's default, needs no full-size scratch)
    peak        = runtime + buffers + persistent + max(forward, step) x (1 + allocator slack)

because gradients are allocated while the backward pass frees activations, and are freed
(`set_to_none`) after each optimizer step. ZeRO / FSDP divide the persistent terms by the number of
processes they shard over; offload moves them to host RAM (reported separately).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

GIB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


# Bytes autograd keeps per token and per decoder layer in transformers' Llama implementation with SDPA
# attention, as (per hidden unit, per KV unit, per MLP unit). Counted with torch's saved-tensor hooks over
# models of several widths (docs/plan.md): fp32 training; bf16 autocast over fp32 weights; 16-bit weights.
ACT_COEF = {
    ("fp32", False): (32, 8, 16),
    ("autocast", False): (30, 4, 8),
    ("pure16", False): (20, 4, 8),
    ("fp32", True): (24, 8, 16),
    ("autocast", True): (24, 4, 8),
    ("pure16", True): (25, 4, 8),
}
# LoRA dropout > 0 keeps a dropped-out copy of each adapted layer's input.
LORA_DROPOUT_COEF = {"fp32": (40, 0, 4), "autocast": (24, 0, 4), "pure16": (24, 0, 4)}
# TRL (1.16) computes the loss through a fused LM head that never holds the whole logits: it projects
# tiles of at most 4096 tokens x 32768 vocabulary entries and keeps per-token sums. Its working set is a
# few such tiles (the product, its exponentials, in the backward the gradient tile): we count four in fp32.
LOSS_TILE_TOKENS, LOSS_TILE_VOCAB, LOSS_TILES = 4096, 32768, 4
# Bytes per element of what a training mode keeps between layers (the residual stream).
RESIDUAL_BYTES = {"fp32": 4, "autocast": 4, "pure16": 2}
# NF4 with double quantization: 4 bits + one 8-bit scale per 64 weights + one fp32 per 256 scales.
NF4_BYTES = (4 + 8 / 64 + 32 / (64 * 256)) / 8
# Optimizer states per trainable parameter (count, bytes each; None = the parameter's own dtype).
OPTIMIZERS = {"adamw": (2, None), "lion": (1, None), "adamw_8bit": (2, 1)}
# Memory a process has before the model exists: Python with torch, transformers and TRL imported on the
# CPU (~0.47 GiB measured here); the CUDA context and cuBLAS workspaces on a GPU.
RUNTIME_BYTES = {"cpu": int(0.5 * GIB), "cuda": int(0.75 * GIB)}
# The tokenized data, the trainer's state, thread pools: ~0.09 GiB in the measured CPU runs.
BUFFERS_BYTES = int(0.1 * GIB)
# Memory an allocator holds beyond the live tensors, as a fraction of the memory that comes and goes in a
# step. glibc's heap keeps freed activation blocks (in the CPU runs of docs/plan.md it held 0.3-0.5x the
# step's memory without gradient checkpointing, up to 2x with it); the CUDA caching allocator fragments less.
SLACK = {"cpu": 0.6, "cuda": 0.1}


def gib(n: int | float | None) -> float | None:
    return None if n is None else round(n / GIB, 2)


# ----------------------------------------------------------------------------------------------
# the model's shape


@dataclass(frozen=True)
class Shape:
    """A decoder-only transformer as transformers builds it from a config.json: the Llama family (Llama,
    Mistral, SmolLM), Qwen2/Qwen3 (attention biases, q/k norms), Gemma 2/3 (four norms a layer, an explicit
    head_dim), Phi-3 (fused qkv and gate/up projections) and mixture-of-experts models (Qwen3-MoE, Qwen2-MoE,
    Mixtral: `experts` feed-forward blocks a MoE layer, `experts_per_tok` of them active for each token).

    Weights, gradients and optimizer states are counted on every parameter (`params`); the activations a
    token leaves behind follow the experts it goes through (`active_intermediate`), so a MoE model's memory
    for a micro-batch is that of its active parameters (`active_params`)."""

    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int  # the MLP width of a dense layer
    head_dim: int
    tied: bool
    dtype: str = "float32"  # what the weights load as
    attn: str = "sdpa"
    qkv_bias: bool = False
    source: str = ""
    model_type: str = "llama"
    qk_norm: bool = False  # Qwen3, Gemma 3: an RMSNorm over head_dim on queries and keys
    layer_norms: int = 2  # RMSNorms a layer holds besides the q/k norms (Gemma 2/3: 4)
    fused: bool = False  # Phi-3: one qkv_proj and one gate_up_proj linear
    experts: int = 0  # MoE: experts in a MoE layer (0: a dense model)
    experts_per_tok: int = 0  # MoE: experts each token goes through
    expert_intermediate: int = 0  # MoE: one expert's MLP width
    shared_intermediate: int = 0  # Qwen2-MoE: the shared expert's width (with its one-output gate)
    # MoE: how many layers keep a dense MLP (Qwen-MoE's mlp_only_layers, decoder_sparse_step); the others are
    # MoE layers. Counted from the dense side so that a merge restacking layers keeps the model MoE.
    dense_in_moe: int = 0

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def moe(self) -> bool:
        return self.experts > 0 and self.moe_layers > 0

    @property
    def moe_layers(self) -> int:
        return max(0, self.layers - self.dense_in_moe) if self.experts > 0 else 0

    def attention_linears(self) -> dict[str, tuple[int, int]]:
        h = self.hidden
        if self.fused:
            return {"qkv_proj": (h, self.q_dim + 2 * self.kv_dim), "o_proj": (self.q_dim, h)}
        return {
            "q_proj": (h, self.q_dim),
            "k_proj": (h, self.kv_dim),
            "v_proj": (h, self.kv_dim),
            "o_proj": (self.q_dim, h),
        }

    def mlp_linears(self, width: int) -> dict[str, tuple[int, int]]:
        h = self.hidden
        if self.fused:
            return {"gate_up_proj": (h, 2 * width), "down_proj": (width, h)}
        return {"gate_proj": (h, width), "up_proj": (h, width), "down_proj": (width, h)}

    def linears(self, moe_layer: bool = False) -> dict[str, tuple[int, int]]:
        """A decoder layer's `nn.Linear` layers (what LoRA's "all-linear" and QLoRA's 4 bit reach): (in, out)
        features, keyed by module name. A MoE layer's experts are not among them: transformers 5 keeps each
        layer's experts as stacked parameters, not linears; its shared expert (Qwen2-MoE) is."""
        out = self.attention_linears()
        if not moe_layer:
            out.update(self.mlp_linears(self.intermediate))
        elif self.shared_intermediate:  # Qwen2-MoE: a shared expert, weighted by a one-output gate
            out.update({f"shared_expert.{k}": v for k, v in self.mlp_linears(self.shared_intermediate).items()})
            out["shared_expert_gate"] = (self.hidden, 1)
        return out

    def _layer_extra(self) -> int:
        """A layer's parameters outside its linears' weights: norms and attention biases."""
        n = self.layer_norms * self.hidden + (2 * self.head_dim if self.qk_norm else 0)
        if self.qkv_bias:
            n += self.q_dim + 2 * self.kv_dim
        return n

    def _experts(self, count: int) -> int:
        """Parameters of `count` experts of a MoE layer, plus its router."""
        h = self.hidden
        return count * 3 * h * self.expert_intermediate + h * self.experts

    def layer_params(self, moe_layer: bool | None = None) -> int:
        """One decoder layer's parameters (by default the largest kind of layer the model has)."""
        if moe_layer is None:
            moe_layer = self.moe
        n = sum(a * b for a, b in self.linears(moe_layer).values()) + self._layer_extra()
        return n + (self._experts(self.experts) if moe_layer else 0)

    @property
    def dense_layers(self) -> int:
        return self.layers - self.moe_layers

    def linear_params(self) -> int:
        """The decoder layers' `nn.Linear` weights: what QLoRA stores in 4 bit."""
        lin = lambda moe: sum(a * b for a, b in self.linears(moe).values())  # noqa: E731
        return self.dense_layers * lin(False) + (self.moe_layers * lin(True) if self.moe else 0)

    def _total(self, moe_experts: int) -> int:
        emb = self.vocab * self.hidden
        n = emb + self.hidden + (0 if self.tied else emb) + self.dense_layers * self.layer_params(False)
        if self.moe:
            moe_layer = self.layer_params(True) - self._experts(self.experts) + self._experts(moe_experts)
            n += self.moe_layers * moe_layer
        return n

    def params(self) -> int:
        """Every parameter: what weights, gradients and optimizer states are counted on."""
        return self._total(self.experts)

    def active_params(self) -> int:
        """The parameters one token goes through: all of a dense model; a MoE model's attention, embeddings,
        routers and its `experts_per_tok` experts a layer."""
        return self._total(self.experts_per_tok) if self.moe else self.params()

    @property
    def active_intermediate(self) -> int:
        """The MLP width a token's activations go through in a layer: a MoE layer's active experts (and its
        shared expert), else the dense MLP."""
        if not self.moe:
            return self.intermediate
        return self.experts_per_tok * self.expert_intermediate + self.shared_intermediate

    def lora_params(self, r: int, targets: Any = "all-linear") -> int:
        """LoRA's parameters of rank `r` on the layers' linears (named by their last component) and, in a MoE
        layer, on its router and stacked experts, which PEFT 0.22 reaches as parameters ("all-linear" includes
        them): per expert one rank-r adapter on down_proj, and one each for the gate and the up halves of
        gate_up_proj (the sizes PEFT builds, checked in tests/test_plan.py)."""
        wanted = None if targets == "all-linear" else {str(t).rsplit(".", 1)[-1] for t in targets}

        def count(names: dict[str, tuple[int, int]]) -> int:
            if wanted is not None:
                names = {k: v for k, v in names.items() if k.rsplit(".", 1)[-1] in wanted}
            return sum(r * (a + b) for a, b in names.values())

        n = self.dense_layers * count(self.linears(False))
        if self.moe:
            h, e, ei = self.hidden, self.experts, self.expert_intermediate
            per = count(self.linears(True))
            if wanted is None or "gate" in wanted:  # the router: hidden -> experts
                per += r * (h + e)
            if wanted is None or wanted & {"gate_up_proj", "gate_proj", "up_proj", "w1", "w3"}:
                per += 2 * r * e * (h + 2 * ei)
            if wanted is None or wanted & {"down_proj", "w2"}:
                per += r * e * (ei + h)
            n += self.moe_layers * per
        return n


# Families whose config class defaults to separate input and output embeddings when a config.json leaves
# `tie_word_embeddings` out (transformers' own defaults; Gemma's and most others' tie them).
_UNTIED_BY_DEFAULT = ("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi3")


def shape_from_config(cfg: dict, source: str = "") -> Shape:
    """A Shape from a transformers config.json dict: the families of `Shape`, read by their own keys."""
    text: dict = cfg["text_config"] if isinstance(cfg.get("text_config"), dict) else cfg  # multimodal wrappers
    try:
        h = int(text.get("hidden_size") or text["n_embd"])
        layers = int(text.get("num_hidden_layers") or text["n_layer"])
        heads = int(text.get("num_attention_heads") or text["n_head"])
        vocab = int(text["vocab_size"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{source or 'config'}: no {exc} in the model config") from None
    kind = str(text.get("model_type") or cfg.get("model_type") or "llama")
    kv = int(text.get("num_key_value_heads") or heads)
    head_dim = int(text.get("head_dim") or h // heads)  # explicit in Qwen3, Gemma, Mistral: not always h / heads
    inter = int(text.get("intermediate_size") or text.get("n_inner") or 4 * h)
    dtype = str(cfg.get("dtype") or cfg.get("torch_dtype") or text.get("dtype") or "float32")
    attn = str(cfg.get("_attn_implementation") or cfg.get("attn_implementation") or "sdpa")
    bias = bool(text.get("attention_bias", False)) or kind in ("qwen2", "qwen2_moe")
    tied = cfg.get("tie_word_embeddings", text.get("tie_word_embeddings"))
    if tied is None:
        tied = kind not in _UNTIED_BY_DEFAULT
    family = kind.split("_")[0]
    # MoE: Qwen-MoE names its experts num_experts, Mixtral num_local_experts. Qwen-MoE may keep some layers
    # dense (mlp_only_layers, decoder_sparse_step); Mixtral's are all MoE.
    experts = int(text.get("num_experts") or text.get("num_local_experts") or 0)
    dense_in_moe, expert_inter, shared = 0, 0, 0
    if experts:
        step = int(text.get("decoder_sparse_step") or 1)
        dense = {int(i) for i in text.get("mlp_only_layers") or []}
        dense_in_moe = sum(1 for i in range(layers) if i in dense or (i + 1) % step != 0)
        expert_inter = int(text.get("moe_intermediate_size") or inter)
        shared = int(text.get("shared_expert_intermediate_size") or 0)
    return Shape(
        vocab,
        h,
        layers,
        heads,
        kv,
        inter,
        head_dim,
        bool(tied),
        dtype if dtype in DTYPE_BYTES else "float32",
        attn,
        bias,
        source,
        model_type=kind,
        qk_norm=family in ("qwen3", "gemma3"),
        layer_norms=4 if family in ("gemma2", "gemma3") else 2,
        fused=family == "phi3",
        experts=experts,
        experts_per_tok=int(text.get("num_experts_per_tok") or 0) if experts else 0,
        expert_intermediate=expert_inter,
        shared_intermediate=shared,
        dense_in_moe=dense_in_moe,
    )


def shape_from_dir(path: Path) -> Shape:
    """A model folder's config.json, or for a LoRA adapter folder, its base model's."""
    path = Path(path)
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base:
            raise ValueError(f"{path}: adapter without base_model_name_or_path")
        return shape_from_dir(Path(base))
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise ValueError(f"{path}: no config.json")
    return shape_from_config(json.loads(cfg_path.read_text()), str(cfg_path))


# ----------------------------------------------------------------------------------------------
# how a stage trains, and on what


@dataclass(frozen=True)
class Backend:
    """What the estimate needs to know of the `[backend]` launch: processes and how they shard weights,
    gradients and optimizer states (ZeRO, FSDP, tensor parallel), and what they offload. A summary read
    from the configuration, not the llmforge.backend.Backend that launches the processes."""

    kind: str = "local"
    procs_per_node: int = 1
    nodes: int = 1
    zero_stage: int = 2  # deepspeed
    offload_optimizer: str = "none"
    offload_params: str = "none"
    fsdp: bool = False
    fsdp_strategy: str = "FULL_SHARD"
    fsdp_cpu_offload: bool = False
    fsdp_checkpointing: bool = False
    tp: int = 1

    @property
    def world(self) -> int:
        return max(1, self.procs_per_node) * max(1, self.nodes)

    @classmethod
    def from_config(cls, section: Any) -> Backend:
        """Read `[backend]` by attribute with defaults: the schema grows while this reads it."""
        ds = getattr(section, "deepspeed", None)
        fs = getattr(section, "fsdp", None)
        kind = str(getattr(section, "type", "local"))
        return cls(
            kind=kind,
            procs_per_node=int(getattr(section, "num_processes", 1) or 1) if kind != "local" else 1,
            nodes=int(getattr(section, "num_nodes", 1) or 1) if kind != "local" else 1,
            zero_stage=int(getattr(ds, "zero_stage", 2)),
            offload_optimizer=str(getattr(ds, "offload_optimizer", "none")),
            offload_params=str(getattr(ds, "offload_params", "none")),
            fsdp=kind == "accelerate" and bool(getattr(fs, "enabled", False)),
            fsdp_strategy=str(getattr(fs, "sharding_strategy", "FULL_SHARD")),
            fsdp_cpu_offload=bool(getattr(fs, "cpu_offload", False)),
            fsdp_checkpointing=bool(getattr(fs, "activation_checkpointing", False)),
            tp=int(getattr(section, "tp_size", 1) or 1),
        )

    def describe(self) -> str:
        if self.kind == "deepspeed":
            extra = "".join(
                f", offload {k} {v}"
                for k, v in (("optimizer", self.offload_optimizer), ("params", self.offload_params))
                if v != "none"
            )
            return f"deepspeed ZeRO-{self.zero_stage} x{self.world}{extra}"
        if self.kind == "accelerate":
            how = (
                f"FSDP {self.fsdp_strategy}" + (" + CPU offload" if self.fsdp_cpu_offload else "")
                if self.fsdp and self.fsdp_strategy != "NO_SHARD"
                else "DDP"
            )
            return f"accelerate {how} x{self.world}"
        return self.kind


@dataclass(frozen=True)
class Training:
    """How a stage trains, as `estimate_training` needs it (a training stage reads its options into this)."""

    micro_batch: int
    seq: int
    grad_accum: int = 1
    precision: str = "fp32"  # resolved: fp32 | bf16 | fp16
    checkpointing: bool = False
    optimizer: str = "adamw"
    lora: bool = False
    lora_r: int = 16
    lora_dropout: float = 0.05
    lora_targets: Any = "all-linear"
    qlora: bool = False
    pairs: bool = False  # DPO: chosen and rejected go through the model together
    reference_copy: bool = False  # DPO without LoRA: a frozen copy of the model is the reference
    keep_last: int = 2
    merge: bool = False


def resolve_precision(precision: str, device: str, gpu_bf16: bool, cpu_bf16: bool, params: int | None) -> str:
    """What `precision = "auto"` becomes: the training loop's own decision (llmforge.precision), from
    the machine as llmforge.hardware sees it and the model's parameter count."""
    from llmforge.precision import choose_precision

    return choose_precision(precision, device=device, gpu_bf16=gpu_bf16, cpu_bf16_fast=cpu_bf16, params=params).name


@dataclass
class Estimate:
    """What one stage needs, as `Stage.estimate` returns it: peak memory of one process on its device,
    host RAM beyond that, disk, each with the parts it is made of (the names `llmforge plan` prints).

    `shape`, `training` and `backend` say what the figures were computed for: the plan shows the
    model's parameter count and the training setup, and offers changes (smaller micro-batches, LoRA,
    ZeRO, ...) re-estimated with `estimate_training` when `training` is given. `estimate_training`
    fills all three; a stage that counts its own parts may leave them None."""

    device: str  # "cuda" or "cpu"
    peak: int  # bytes one process needs on its device at its peak
    parts: dict[str, int]  # what the peak is made of (see the module docstring for how they combine)
    host: int = 0  # host RAM per node beyond what the device figure covers (offload, loading, runtimes)
    host_parts: dict[str, int] = field(default_factory=dict)
    disk: int = 0
    disk_parts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    shape: Shape | None = None  # the model the stage works on
    training: Training | None = None  # how it trains (a training stage)
    backend: Backend | None = None  # the launch it trains under (a training stage)

    def to_json(self) -> dict:
        return {
            "device": self.device,
            "peak_bytes": self.peak,
            "peak_gib": gib(self.peak),
            "parts_gib": {k: gib(v) for k, v in self.parts.items()},
            "host_bytes": self.host,
            "host_gib": gib(self.host),
            "host_parts_gib": {k: gib(v) for k, v in self.host_parts.items()},
            "disk_bytes": self.disk,
            "disk_gib": gib(self.disk),
            "disk_parts_gib": {k: gib(v) for k, v in self.disk_parts.items()},
            "notes": self.notes,
        }


def activation_bytes(shape: Shape, t: Training, mode: str) -> tuple[int, int]:
    """(saved activations, loss-region tensors) for one micro-batch on one process."""
    tokens = t.micro_batch * t.seq * (2 if t.pairs else 1)
    a_h, a_kv, a_i = ACT_COEF[(mode, t.lora)]
    # A MoE layer keeps the activations of the experts each token went through, not of all of them.
    inter = shape.active_intermediate
    per = a_h * shape.hidden + a_kv * shape.kv_dim + a_i * inter
    if t.lora and t.lora_dropout > 0:
        d_h, d_kv, d_i = LORA_DROPOUT_COEF[mode]
        per += d_h * shape.hidden + d_kv * shape.kv_dim + d_i * inter
    if shape.attn == "eager":  # the attention matrix itself, and K/V repeated to every head
        act = 4 if mode == "fp32" else 2
        per += shape.heads * t.seq * (4 + (0 if mode == "fp32" else 2)) + 2 * (shape.q_dim - shape.kv_dim) * act
    if t.checkpointing:  # each layer keeps its input; one layer at a time is recomputed in full
        saved = tokens * (shape.layers * shape.hidden * RESIDUAL_BYTES[mode] + per)
    else:
        saved = tokens * shape.layers * per
    saved += tokens * 12 * shape.hidden  # embeddings and the final norm
    loss = LOSS_TILES * min(tokens, LOSS_TILE_TOKENS) * min(shape.vocab, LOSS_TILE_VOCAB) * 4
    if not t.lora:  # the fused head's fp32 gradient of the output embedding
        loss += shape.vocab * shape.hidden * 4
    return saved, loss


def estimate_training(shape: Shape, t: Training, backend: Backend = Backend(), device: str = "cpu") -> Estimate:
    """Peak memory of one training process, host RAM beyond it, and disk, for a training stage."""
    notes: list[str] = []
    P = shape.params()
    base_b = DTYPE_BYTES[shape.dtype]
    ds = backend.kind == "deepspeed"
    ds16 = ds and t.precision in ("bf16", "fp16")
    if ds16:
        base_b = 2  # DeepSpeed casts the model to the training precision and keeps fp32 masters itself
    lin = shape.linear_params()
    base_w = lin * NF4_BYTES + (P - lin) * 2 if t.qlora else P * base_b
    T = shape.lora_params(t.lora_r, t.lora_targets) if t.lora else P
    train_b = (2 if ds16 else 4) if t.lora else base_b  # PEFT keeps adapters in fp32
    # Byte counts below are floats: sharding divides them; the parts are rounded to ints at the end.
    weights: float = base_w + (T * train_b if t.lora else 0)
    mode = "pure16" if (base_b == 2 or t.qlora) else ("autocast" if t.precision in ("bf16", "fp16") else "fp32")
    n_states, state_b = OPTIMIZERS.get(t.optimizer, (2, None))
    grads: float = T * train_b
    master: float
    optim: float
    if ds16:
        master, optim = T * 4, T * n_states * 4
    else:
        master, optim = 0, T * n_states * (state_b or train_b)
    ref: float = P * base_b if t.reference_copy else 0

    checkpointing = t.checkpointing or (backend.fsdp and backend.fsdp_checkpointing)
    acts: float
    acts, loss = activation_bytes(shape, replace(t, checkpointing=checkpointing), mode)
    casts = 2 * (lin + shape.vocab * shape.hidden) if mode == "autocast" else 0

    # sharding and offload: which persistent terms each process holds, and which go to host RAM
    world, host, work, buckets = backend.world, 0, 0, 0
    host_parts: dict[str, int] = {}
    # accelerate shards with FSDP on GPUs only; on CPUs its processes train as plain data parallel
    sharded_fsdp = (
        backend.kind == "accelerate" and backend.fsdp and backend.fsdp_strategy != "NO_SHARD" and device == "cuda"
    )
    largest_unit = max(shape.layer_params(), shape.vocab * shape.hidden)
    if ds:
        z = backend.zero_stage
        if z >= 1:
            master, optim = master / world, optim / world
        if z >= 2:
            grads = grads / world
        if z >= 3:
            weights, ref = weights / world, ref / world
            work = 2 * largest_unit * base_b  # the layer being gathered and the prefetched next one
        else:
            buckets = 2 * shape.hidden**2 * 4  # reduce buckets ("auto" = hidden² elements)
        if backend.offload_optimizer == "cpu":
            host_parts["optimizer (offloaded)"] = int(master + optim + (T * 4 / world if ds16 else 0))
            master = optim = 0
        if backend.offload_params == "cpu" and z == 3:
            host_parts["weights (offloaded)"] = int(weights)
            weights = 0
        if "nvme" in (backend.offload_optimizer, backend.offload_params):
            notes.append("nvme offload: the offloaded states go to nvme_path (disk), not RAM")
            if backend.offload_optimizer == "nvme":
                master = optim = 0
            if backend.offload_params == "nvme" and z == 3:
                weights = 0
    elif sharded_fsdp:
        n = backend.procs_per_node if backend.fsdp_strategy == "HYBRID_SHARD" else world
        grads, optim = grads / n, optim / n
        if backend.fsdp_strategy != "SHARD_GRAD_OP":
            weights, ref = weights / n, ref / n
            work = 2 * largest_unit * (2 if t.precision in ("bf16", "fp16") else base_b)
        if backend.fsdp_cpu_offload:
            host_parts["weights, gradients, optimizer (offloaded)"] = int(weights + grads + optim)
            weights = grads = optim = 0
    ddp = grads if backend.kind == "accelerate" and world > 1 and not sharded_fsdp else 0
    if backend.tp > 1:  # tensor parallelism splits the layers' weights and most activations
        weights, grads, optim, master, acts = (x / backend.tp for x in (weights, grads, optim, master, acts))
        notes.append(f"tensor parallel x{backend.tp}: weights and activations divided evenly (approximate)")

    runtime = RUNTIME_BYTES[device]
    buffers = BUFFERS_BYTES if device == "cpu" else 0
    offloaded = 0
    if device == "cpu" and host_parts:  # training on the CPU: "offloaded" states stay in the same RAM
        offloaded, host_parts = sum(host_parts.values()), {}
    persistent = weights + optim + master + ref + ddp + buckets + work + offloaded
    forward = acts + loss + casts + (grads if t.grad_accum > 1 else 0)
    step = grads  # the Trainer's default AdamW is torch's fused one: no full-size scratch
    slack = SLACK[device] * max(forward, step)
    peak = runtime + buffers + persistent + max(forward, step) + slack
    terms = {
        "runtime": runtime,
        "data and buffers": buffers,
        "weights": weights,
        "gradients": grads,
        "optimizer states": optim,
        "master weights (fp32)": master,
        "activations": acts,
        "loss (fused LM head)": loss,
        "bf16 weight copies (autocast)": casts,
        "reference model": ref,
        "DDP gradient buckets": ddp,
        "ZeRO buckets": buckets,
        "gathered layers": work,
        "offloaded (same RAM on CPU)": offloaded,
        "allocator slack": slack,
    }
    parts = {k: int(v) for k, v in terms.items() if v}

    if device == "cuda":
        # Loading happens in host RAM before the model moves to the GPU; each process also has its runtime.
        # The offloaded partitions come after: DeepSpeed partitions the loaded model parameter by parameter,
        # freeing each full tensor as its shard lands in RAM, so a process holds the larger of the two.
        offloaded_host = sum(host_parts.values())
        loading = int(P * DTYPE_BYTES[shape.dtype])
        host_parts["loading the model"] = loading
        host_parts["process runtimes"] = RUNTIME_BYTES["cpu"]
        host = int((max(loading, offloaded_host) + RUNTIME_BYTES["cpu"]) * backend.procs_per_node)
        if offloaded_host and loading:
            notes.append(
                "host RAM: the offloaded states replace the loaded model as it is partitioned; the peak "
                "holds the larger of the two, not both"
            )

    # disk: checkpoints (weights + optimizer) kept keep_last at a time, +1 while a new one is written
    ckpt_w = T * train_b if t.lora else P * base_b
    ckpt_opt = (T * 4 + T * n_states * 4) if ds16 else T * n_states * (state_b or train_b)
    disk_parts = {f"checkpoints ({t.keep_last}+1 kept)": int((ckpt_w + ckpt_opt) * (t.keep_last + 1))}
    if t.lora:
        disk_parts["adapter"] = int(T * 4)
        if t.merge:
            disk_parts["merged model"] = int(P * (2 if t.qlora else DTYPE_BYTES[shape.dtype]))
    else:
        disk_parts["model"] = int(P * base_b)
    return Estimate(
        device,
        int(peak),
        parts,
        host,
        host_parts,
        sum(disk_parts.values()),
        disk_parts,
        notes,
        shape=shape,
        training=t,
        backend=backend,
    )


# ----------------------------------------------------------------------------------------------
# what a stage's estimate may ask (Stage.estimate and Stage.output_shape get a PlanEnv)


class ShapeUnknown(Exception):
    """The shape of a model input cannot be known before the run (no config.json, a stage upstream that
    does not say what it writes, ...). Raised by `PlanEnv.shape_of`; the plan shows the stage as "model
    shape unknown: <the message>" instead of an estimate."""


def tokenizer_vocab(folder: Path) -> int | None:
    """The vocabulary size of a tokenizer folder's tokenizer.json (its model's entries plus the added
    tokens outside it); without one, a model folder's config.json `vocab_size` (the embedding rows, which
    cover the tokenizer); None when neither can be read."""
    try:
        data = json.loads((Path(folder) / "tokenizer.json").read_text())
        vocab = data["model"]["vocab"]
        return len(vocab) + sum(1 for t in data.get("added_tokens", []) if t.get("content") not in vocab)
    except (OSError, KeyError, TypeError, ValueError):
        pass
    try:
        return shape_from_dir(Path(folder)).vocab
    except (OSError, ValueError, KeyError, TypeError):
        return None


@dataclass(frozen=True)
class PlanEnv:
    """What `plan()` tells a stage's `estimate` and `output_shape`: the machine, the device a training
    process gets, the `[backend]` launch (its sharding summary), and the stage's model inputs.

    `shape_of("model")` follows an `@stage` reference to the stage that writes the model (asking its
    `output_shape`), and reads a path's config.json; it raises ShapeUnknown when neither says."""

    machine: Any  # llmforge.hardware.Machine (or one described by a test)
    backend: Backend
    pipeline: Any  # llmforge.pipeline.Pipeline: the stage's inputs and the stages they refer to
    stage: str  # the name of the stage asking
    seen: frozenset[str] = frozenset()  # stages already asked on the way here (a reference cycle guard)

    @property
    def device(self) -> str:
        """Where a training process runs: "cuda" on a machine with NVIDIA GPUs, else "cpu"."""
        return "cuda" if self.machine.gpus else "cpu"

    def precision(self, requested: str, params: int | None) -> str:
        """What a training stage's `precision` becomes on this machine for a model of `params`
        parameters: the same decision the training loop takes (llmforge.precision)."""
        return resolve_precision(requested, self.device, self.machine.gpu_bf16, self.machine.cpu_bf16_fast, params)

    def input(self, field: str) -> Any | None:
        """The stage's input at this options field (`model`, `models[0].model`; llmforge.pipeline.InputUse:
        `.ref_stage` for an @reference, else `.path`), or None when that field is not set."""
        return next((u for u in self.pipeline.inputs.get(self.stage, []) if u.key == field), None)

    def shape_of(self, *fields: str) -> Shape:
        """The shape of the model at the first of these input fields that is set: for `@stage`, what that
        stage says it writes (`Stage.output_shape`); for a path, its config.json (an adapter's: its base's)."""
        use = next((u for u in map(self.input, fields) if u is not None), None)
        if use is None:
            raise ShapeUnknown("no model input")
        if use.ref_stage is None:
            try:
                return shape_from_dir(use.path)
            except (ValueError, OSError) as exc:
                raise ShapeUnknown(str(exc)) from None
        if use.ref_stage in self.seen or use.ref_stage == self.stage:
            raise ShapeUnknown("reference cycle")
        spec = self.pipeline.stage(use.ref_stage)
        upstream = replace(self, stage=use.ref_stage, seen=self.seen | {self.stage})
        shape = spec.cls().output_shape(spec.options, upstream)
        if shape is None:
            raise ShapeUnknown(f"stage '{spec.name}' ({spec.uses}) does not say what model it writes")
        return shape

    def vocab_of(self, field: str) -> int | None:
        """The vocabulary size of the tokenizer (or model) at this input field, or None when unknown."""
        use = self.input(field)
        if use is None:
            return None
        if use.ref_stage is None:
            return tokenizer_vocab(use.path)
        try:
            return self.shape_of(field).vocab
        except ShapeUnknown:
            return None


# ----------------------------------------------------------------------------------------------
# a pipeline's stages


@dataclass
class Suggestion:
    change: dict[str, Any]  # --set keys (stage options under the stage's name) -> value
    text: str
    peak: int
    host: int
    fits: bool

    def to_json(self) -> dict:
        return {
            "change": self.change,
            "text": self.text,
            "peak_gib": gib(self.peak),
            "host_gib": gib(self.host),
            "fits": self.fits,
        }

    def set_args(self) -> str:
        """The change as `llmforge run` arguments: `--set stage.key=value ...` (values in TOML syntax)."""
        return " ".join(f"--set {k}={_toml(v)}" for k, v in self.change.items())


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return str(value)


@dataclass
class StagePlan:
    name: str
    kind: str
    estimate: Estimate | None = None
    shape: Shape | None = None
    training: Training | None = None
    backend: Backend | None = None
    device_limit: int | None = None  # what one process may use: a GPU's memory, or RAM / processes on CPU
    device_free: int | None = None
    host_limit: int | None = None
    verdict: str = "not estimated"  # fits | tight | does not fit | not estimated
    problems: list[str] = field(default_factory=list)  # clear excesses: `run` refuses the stage for these
    suggestions: list[Suggestion] = field(default_factory=list)
    note: str = ""

    def to_json(self) -> dict:
        out = {
            "stage": self.name,
            "kind": self.kind,
            "verdict": self.verdict,
            "note": self.note,
            "problems": self.problems,
            "device_limit_gib": gib(self.device_limit),
            "device_free_gib": gib(self.device_free),
            "host_limit_gib": gib(self.host_limit),
            "estimate": self.estimate.to_json() if self.estimate else None,
            "suggestions": [s.to_json() for s in self.suggestions],
        }
        if self.shape is not None:
            model: dict[str, Any] = {
                "parameters": self.shape.params(),
                "active_parameters": self.shape.active_params(),
                "model_type": self.shape.model_type,
                "hidden": self.shape.hidden,
                "layers": self.shape.layers,
                "vocab": self.shape.vocab,
                "dtype": self.shape.dtype,
                "source": self.shape.source,
            }
            if self.shape.moe:
                model["experts"] = self.shape.experts
                model["experts_per_tok"] = self.shape.experts_per_tok
            out["model"] = model
        if self.training is not None:
            out["training"] = {k: v for k, v in self.training.__dict__.items()}
        if self.backend is not None:
            out["backend"] = self.backend.describe()
        return out


@dataclass
class Plan:
    stages: list[StagePlan]
    machine: Any
    disk_total: int = 0
    described: bool = False  # planned for a machine described on the command line, not this one

    @property
    def refused(self) -> list[StagePlan]:
        return [s for s in self.stages if s.problems]

    def to_json(self) -> dict:
        m = self.machine
        return {
            "machine": {
                "ram_total_gib": gib(m.ram_total),
                "ram_available_gib": gib(m.ram_available),
                "disk_free_gib": gib(m.disk_free),
                "gpus": [{"name": g["name"], "memory_gib": gib(g["memory_total_bytes"])} for g in m.gpus],
                "described": self.described,
            },
            "stages": [s.to_json() for s in self.stages],
            "disk_total_gib": gib(self.disk_total),
        }


def plan_stage(pipe: Any, spec: Any, backend: Backend, machine: Any) -> StagePlan:
    """One stage's plan: its own estimate (`Stage.estimate`), judged against the machine, with the changes
    that would make a training stage fit."""
    sp = StagePlan(spec.name, spec.uses)
    env = PlanEnv(machine, backend, pipe, spec.name)
    try:
        est = spec.cls().estimate(spec.options, env)
    except ShapeUnknown as exc:
        sp.note = f"model shape unknown: {exc}"
        return sp
    if est is None:
        sp.note = f"no estimate for stage kind '{spec.uses}'"
        return sp
    sp.estimate, sp.shape, sp.training, sp.backend = est, est.shape, est.training, est.backend
    _judge(sp, est, machine)
    if sp.training is not None and sp.verdict != "fits":
        sp.suggestions = suggest(sp, machine)
    return sp


def _limits(est: Estimate, procs: int, machine: Any) -> tuple[int, int | None, int]:
    """(what one process may use at most, what it may use now, the node's RAM) for this estimate."""
    if est.device == "cuda" and machine.gpus:
        free = min((g["memory_free_bytes"] for g in machine.gpus if g["memory_free_bytes"] is not None), default=None)
        return machine.vram_per_gpu, free, machine.ram_total
    # On CPU every process of the node shares the RAM.
    return machine.ram_total // procs, machine.ram_available // procs, machine.ram_total


def _judge(sp: StagePlan, est: Estimate, machine: Any) -> None:
    """Set the stage's limits, problems and verdict for its estimate `est` on this machine."""
    procs = sp.backend.procs_per_node if sp.backend else 1
    sp.device_limit, sp.device_free, sp.host_limit = _limits(est, procs, machine)
    if est.peak > sp.device_limit:
        if est.device == "cuda":
            sp.problems.append(
                f"needs about {gib(est.peak)} GiB of GPU memory per process; the smallest GPU here "
                f"has {gib(sp.device_limit)} GiB"
            )
        else:
            per = f" per process ({procs} share this node's RAM)" if procs > 1 else ""
            sp.problems.append(
                f"needs about {gib(est.peak)} GiB of RAM{per}; this machine has "
                f"{gib(sp.device_limit)} GiB{per and ' per process'}"
            )
    if est.device == "cuda" and est.host > sp.host_limit:
        sp.problems.append(
            f"needs about {gib(est.host)} GiB of host RAM (offload, loading); this machine has {gib(sp.host_limit)} GiB"
        )
    if sp.problems:
        sp.verdict = "does not fit"
    elif sp.device_free is not None and est.peak > sp.device_free:
        sp.verdict = "tight"
    else:
        sp.verdict = "fits"


def suggest(sp: StagePlan, machine: Any) -> list[Suggestion]:
    """Changes that lower the peak of a training stage (one whose estimate came with its `Training`),
    each with its new estimate: the gentlest first."""
    t, b, est, shape, n = sp.training, sp.backend, sp.estimate, sp.shape, sp.name
    if t is None or b is None or est is None or shape is None:
        return []
    out: list[Suggestion] = []

    def variant(change: dict[str, Any], text: str, t2: Training = t, b2: Backend = b) -> Suggestion:
        new = estimate_training(shape, t2, b2, est.device)
        probe = StagePlan(sp.name, sp.kind, new, shape, t2, b2)
        _judge(probe, new, machine)
        return Suggestion(change, text, new.peak, new.host, not probe.problems)

    if t.micro_batch > 1:
        mb = t.micro_batch
        while mb > 1:
            mb //= 2
            acc = math.ceil(t.grad_accum * t.micro_batch / mb)
            s = variant(
                {f"{n}.micro_batch_size": mb, f"{n}.gradient_accumulation": acc},
                f"micro_batch_size {mb} with gradient_accumulation {acc} (same batch per step)",
                replace(t, micro_batch=mb, grad_accum=acc),
            )
            if s.fits or mb == 1:
                out.append(s)
                break
    if not t.checkpointing:
        out.append(
            variant(
                {f"{n}.gradient_checkpointing": True},
                "gradient_checkpointing (recompute activations; ~30% slower)",
                replace(t, checkpointing=True),
            )
        )
    if not t.lora:
        out.append(
            variant(
                {f"{n}.lora.enabled": True},
                "LoRA r=16 instead of training every weight",
                replace(t, lora=True, lora_r=16, lora_dropout=0.05, reference_copy=False),
            )
        )
    if est.device == "cuda" and not t.qlora:
        out.append(
            variant(
                {f"{n}.lora.enabled": True, f"{n}.lora.qlora": True},
                "QLoRA: the base in 4 bit, LoRA on top",
                replace(
                    t, lora=True, qlora=True, lora_r=t.lora_r if t.lora else 16, lora_dropout=0.05, reference_copy=False
                ),
            )
        )
    if est.device == "cuda":
        if b.world > 1 and not (b.kind == "deepspeed" and b.zero_stage >= 3):
            out.append(
                variant(
                    {"backend.type": "deepspeed", "backend.deepspeed.zero_stage": 3},
                    f"DeepSpeed ZeRO-3 over the {b.world} processes (weights, gradients and optimizer states sharded)",
                    b2=replace(b, kind="deepspeed", zero_stage=3, fsdp=False),
                )
            )
        if not (b.kind == "deepspeed" and b.offload_optimizer == "cpu"):
            stage = max(b.zero_stage if b.kind == "deepspeed" else 2, 2)
            out.append(
                variant(
                    {
                        "backend.type": "deepspeed",
                        "backend.deepspeed.zero_stage": stage,
                        "backend.deepspeed.offload_optimizer": "cpu",
                    },
                    f"DeepSpeed ZeRO-{stage} with the optimizer offloaded to CPU RAM",
                    b2=replace(
                        b,
                        kind="deepspeed",
                        zero_stage=stage,
                        offload_optimizer="cpu",
                        fsdp=False,
                        procs_per_node=b.procs_per_node,
                        nodes=b.nodes,
                    ),
                )
            )
    # LoRA's dropout copies can outweigh the gradients and optimizer states it saves: keep what helps.
    out = [s for s in out if s.peak < est.peak]
    # Everything gentle at once, when no single change is enough.
    if not any(s.fits for s in out) and (t.micro_batch > 1 or not t.checkpointing or not t.lora):
        both = replace(
            t,
            micro_batch=1,
            grad_accum=t.grad_accum * t.micro_batch,
            checkpointing=True,
            lora=True,
            lora_r=t.lora_r if t.lora else 16,
            reference_copy=False,
            lora_dropout=t.lora_dropout if t.lora else 0.05,
        )
        change = {
            f"{n}.micro_batch_size": 1,
            f"{n}.gradient_accumulation": both.grad_accum,
            f"{n}.gradient_checkpointing": True,
            f"{n}.lora.enabled": True,
        }
        out.append(variant(change, "all of: micro_batch_size 1, gradient checkpointing, LoRA", both))
        if not out[-1].fits and est.device == "cuda" and not t.qlora:
            out.append(
                variant(
                    {**change, f"{n}.lora.qlora": True},
                    "all of: micro_batch_size 1, gradient checkpointing, QLoRA",
                    replace(both, qlora=True),
                )
            )
    return out


_UNITS = {"": GIB, "G": GIB, "GB": GIB, "GIB": GIB, "M": 2**20, "MB": 2**20, "MIB": 2**20, "T": 2**40, "TB": 2**40}


def parse_size(text: str, what: str = "size") -> int:
    """Bytes from a size as people write a machine's memory: `24GB`, `24 GiB`, `512MB`, `24` (GiB). GB is
    read as GiB: a "24 GB" GPU or a "32 GB" laptop has 24 or 32 GiB."""
    import re

    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"{what}: {text!r} is not a size (like 24GB, 512MB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def described_machine(gpu: str | None = None, ram: str | None = None, cpu_bf16: bool = False) -> Any:
    """A machine to plan for instead of this one (`llmforge plan --gpu 2x24GB --ram 64GB`): `gpu` is
    `[N x]SIZE` (N identical GPUs with bf16, as every NVIDIA GPU since Ampere has), `ram` the host's memory
    (default: this machine's). Its disk is unknown, so the plan checks no disk space."""
    from llmforge.hardware import Machine, memory

    gpus: list[dict] = []
    if gpu:
        count, _, size = str(gpu).lower().rpartition("x")
        try:
            n = int(count) if count.strip() else 1
        except ValueError:
            raise ValueError(f"--gpu: {gpu!r} is not [N x]SIZE (like 24GB or 2x24GB)") from None
        if n < 1:
            raise ValueError(f"--gpu: {gpu!r}: at least one GPU")
        total = parse_size(size, "--gpu")
        name = f"described GPU ({gib(total)} GiB)"
        gpus = [
            {
                "index": i,
                "name": name,
                "memory_total_bytes": total,
                "memory_free_bytes": None,
                "compute_capability": None,
                "bf16": True,
                "driver": None,
            }
            for i in range(n)
        ]
    ram_total = parse_size(ram, "--ram") if ram else int(memory()["total_bytes"])
    return Machine(ram_total=ram_total, ram_available=ram_total, disk_free=None, gpus=gpus, cpu_bf16_fast=cpu_bf16)


def plan(pipe: Any, machine: Any = None, only: list[str] | None = None) -> Plan:
    """Estimate every stage of a validated pipeline (or those named in `only`) against this machine."""
    from llmforge.hardware import machine as probe

    cfg = pipe.config
    machine = machine or probe(cfg.runs_dir)
    backend = Backend.from_config(cfg.backend)
    stages = []
    for spec in pipe.stages:
        if only is not None and spec.name not in only:
            continue
        try:
            stages.append(plan_stage(pipe, spec, backend, machine))
        except Exception as exc:  # noqa: BLE001 - an estimate must never be the reason a run cannot start
            stages.append(StagePlan(spec.name, spec.uses, note=f"no estimate: {type(exc).__name__}: {exc}"))
    total = sum(s.estimate.disk for s in stages if s.estimate)
    result = Plan(stages, machine, total)
    if machine.disk_free is not None and total > machine.disk_free and stages:
        # Outputs and checkpoints accumulate over the run: name the stage where the disk runs out.
        running = 0
        for s in stages:
            running += s.estimate.disk if s.estimate else 0
            if running > machine.disk_free:
                s.problems.append(
                    f"the run's files reach about {gib(running)} GiB by the end of this stage "
                    f"(checkpoints and outputs); {gib(machine.disk_free)} GiB free in {cfg.runs_dir}"
                )
                s.verdict = "does not fit"
                break
    return result


def fit_check(pipe: Any, only: list[str], from_stage: str | None, machine: Any = None) -> None:
    """The fit check a run makes before it starts (RunRequest.fit = "check"): refuse, with a UsageError
    (exit code 2), a selected stage whose estimate clearly exceeds what this machine has, naming the changes
    that would fit. Estimates near the limit pass: the check only stops runs that cannot succeed.

    `only` (--stage) checks just those stages (their upstream is usually cached); `from_stage` (--from)
    adds it and everything downstream; neither checks every stage."""
    from llmforge.errors import UsageError
    from llmforge.formatting import fmt_bytes

    names = set(pipe.names)
    chosen = set(only) & names if only else set(names)
    if from_stage in names:
        chosen |= pipe.downstream({from_stage})
    bad = plan(pipe, machine, only=sorted(chosen)).refused
    if not bad:
        return
    lines = []
    for sp in bad:
        lines.append(f"stage '{sp.name}' cannot fit on this machine: " + "; ".join(sp.problems))
        lines += [
            f"  try {s.text}: about {fmt_bytes(s.peak, digits=2)}  ({s.set_args()})" for s in sp.suggestions if s.fits
        ]
    raise UsageError("\n".join(lines), hint="`llmforge plan` shows the whole estimate; run anyway with --no-fit-check")
