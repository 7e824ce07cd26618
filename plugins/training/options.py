"""Options shared by the training stages: one schema, used by forge.toml validation, `stages show`,
`--set` and the TUI. Light on purpose: no torch here."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from llmforge.stage import StageOptions

if TYPE_CHECKING:
    from pathlib import Path

    from llmforge.errors import Problem
    from llmforge.plugins import Registry
    from llmforge.stage import Artifact


class LoraOptions(StageOptions):
    enabled: bool = Field(False, description="Train a LoRA adapter instead of all weights.")
    r: int = Field(16, gt=0, description="Adapter rank.")
    alpha: float = Field(32.0, gt=0, description="Scaling numerator (the update is scaled by alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names to adapt, or all-linear for every linear layer but the output."
    )
    qlora: bool = Field(False, description="Load the base in 4 bit (bitsandbytes, CUDA only) and train LoRA on it.")


class TrainOptions(StageOptions):
    """Knobs every training stage has. Defaults suit a small model on a laptop."""

    epochs: float = Field(1.0, gt=0, description="Passes over the data (ignored when max_steps is set).")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps.")
    micro_batch_size: int = Field(4, gt=0, description="Sequences per forward pass (per device).")
    gradient_accumulation: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    max_length: int = Field(512, gt=8, description="Longest sequence in tokens; longer ones are truncated.")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Fraction of steps spent warming up.")
    lr_schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay after warm-up.")
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay.")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping norm (0 = off).")
    optimizer: Literal["adamw", "lion"] = Field("adamw", description="AdamW (torch), or Lion (llmforge's own).")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto: bf16 on GPUs and CPUs that support it (autocast), fp16 on older GPUs, else fp32."
    )
    packing: bool = Field(True, description="Pack short samples into full sequences (no attention across samples).")
    gradient_checkpointing: bool = Field(False, description="Recompute activations: less memory, ~30% slower.")
    seed: int | None = Field(None, ge=0, description="Random seed (default: [project].seed).")
    eval_split: float = Field(0.0, ge=0, lt=1, description="Fraction of rows held out for evaluation.")
    eval_every: int | None = Field(None, gt=0, description="Evaluate every N steps (default: at the end only).")
    save_every: int | None = Field(
        None, gt=0, description="Checkpoint every N steps (default: by time, see save_minutes)."
    )
    save_minutes: float = Field(
        10.0,
        gt=0,
        description="Checkpoint when this much time passed since the last one "
        "(also on stop and on `llmforge checkpoint`).",
    )
    keep_last: int = Field(2, ge=1, description="Checkpoints kept on disk.")
    log_every: int = Field(5, gt=0, description="Emit metrics every N steps.")
    profile: bool = Field(False, description="Profile a few steps with the PyTorch profiler; trace in the stage dir.")
    trust_remote_code: bool = Field(False, description="Run code shipped with the model. Off unless you trust it.")


def adapter_outputs(options, *always: str) -> tuple[str, ...]:
    """What a stage that can train LoRA writes: the adapter (and the merged model when asked), or the
    model for full training; plus the kinds it always writes (a report)."""
    if options.lora.enabled:
        kinds = ("adapter", "model") if options.merge else ("adapter",)
    else:
        kinds = ("model",)
    return kinds + always


def _is_template_path(value: str) -> bool:
    return value.endswith((".jinja", ".j2")) or "/" in value


def template_problems(value: str | None, templates: Mapping[str, Any]) -> list:
    """Preflight for a `template` option: a name must be one of `templates` (the registry's installed
    chat templates); a path is read at run time."""
    from llmforge.errors import Problem
    from llmforge.schema import did_you_mean

    if value is None or value == "auto" or _is_template_path(value):
        return []
    names = templates
    if value in names:
        return []
    return [
        Problem(
            "template",
            f"unknown chat template '{value}'{did_you_mean(value, names)} "
            f"(installed: {', '.join(sorted(names)) or 'none'}; or a .jinja file)",
        )
    ]


def template_cache_extra(value: str | None, project_dir) -> dict:
    """A template given as a file: its content decides the tokenization, so it enters the cache key."""
    from pathlib import Path

    if value is None or not _is_template_path(value):
        return {}
    path = Path(value) if Path(value).is_absolute() else Path(project_dir) / value
    if not path.is_file():
        return {"template_file": None}
    import hashlib

    return {"template_file": hashlib.sha256(path.read_bytes()).hexdigest()[:16]}


class TemplateChecks:
    """Mixed into stages with a `template` option: validate checks the name, the cache sees file edits."""

    # The same signature as Stage.check and Stage.cache_key_extra: the mixin comes first in the stages' bases.
    def check(self, options: Any, inputs: dict[str, Artifact], registry: Registry | None = None) -> list[Problem]:
        if registry is None:
            # No table to look the name up in (the runner and validate always pass one); a name
            # that is not installed still fails when the stage resolves it at run time.
            return []
        return template_problems(options.template, registry.chat_templates)

    def cache_key_extra(self, options: Any, project_dir: Path) -> dict[str, Any]:
        return template_cache_extra(options.template, project_dir)
