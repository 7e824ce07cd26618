"""Opening the model a synth or rlaif stage generates with: a declared judge, or a model by path.

    teacher = "local"            # a [judges.NAME] table of forge.toml (gguf, hf, openai or a plugin's backend)
    model = "@sft.model"         # or a model: an HF folder, a LoRA adapter, a .gguf file, a gguf artifact

A model by path is opened with the judges plugin's backends, so every engine (llama.cpp's parallel sequences,
transformers' batches, an endpoint's concurrent requests) serves teachers, judges and policies alike:
a .gguf file (or a gguf artifact's file, ``quant`` choosing which) through ``gguf``, a folder through ``hf``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmforge.errors import UsageError
from llmforge_plugins.synth.api import Teacher


@dataclass(frozen=True)
class EngineSettings:
    """How a model named by path is run (a declared judge brings its own settings)."""

    concurrency: int = 4
    n_ctx: int = 2048
    threads: int | None = None
    batch_size: int = 8
    quant: str | None = None  # which file of a gguf artifact (its type: Q8_0, F16); default: the first by name


def gguf_file(path: Path, quant: str | None) -> Path | None:
    """The .gguf file ``path`` means: itself, or the file of a folder (a gguf artifact) whose type is
    ``quant`` (``model-Q8_0.gguf`` for ``Q8_0``), else its first by name. None: not a GGUF."""
    if path.is_file():
        return path if path.suffix.lower() == ".gguf" else None
    files = sorted((p for p in path.glob("*.gguf") if p.is_file()), key=lambda p: p.name.lower())
    if not files:
        return None
    if quant is None:
        return files[0]
    for f in files:
        if f.stem.lower().endswith("-" + quant.lower()) or f.stem.lower() == quant.lower():
            return f
    names = ", ".join(f.name for f in files)
    raise UsageError(f"quant: no {quant} file in {path} (it holds {names})")


def open_teacher(
    *,
    teacher: str | None,
    model: str | Path | None,
    judges: dict[str, Any],
    base_dir: Path,
    settings: EngineSettings = EngineSettings(),
    log: Callable[[str], Any] | None = None,
    registry: Any = None,
) -> Teacher:
    """The :class:`Teacher` for a stage's ``teacher`` (a declared judge's name) or ``model`` (a resolved path).
    Exactly one of them is given (the stage's check says so first)."""
    if teacher is not None:
        spec = judges.get(teacher)
        if spec is None:
            declared = ", ".join(sorted(judges)) or "none"
            raise UsageError(
                f"teacher: no [judges.{teacher}] in forge.toml (declared: {declared})",
                hint='declare the model once, e.g. [judges.teacher] backend = "gguf", model = "teacher.gguf"',
            )
        return Teacher(spec.open(log=log), label=teacher)
    if model is None:
        raise UsageError("teacher: name a [judges.NAME] with teacher = ..., or a model with model = ...")
    path = Path(model)
    path = path if path.is_absolute() else base_dir / path
    backends = registry.table("judge_backends") if registry is not None else {}
    gguf = gguf_file(path, settings.quant) if path.exists() else None
    if gguf is not None:
        cls = backends.get("gguf") or _builtin("GgufJudge")
        opts = cls.Options(
            backend="gguf",
            model=str(gguf),
            concurrency=settings.concurrency,
            n_ctx=settings.n_ctx,
            threads=settings.threads,
        )
        return Teacher(cls(opts, base_dir=base_dir, log=log), label=str(gguf))
    if path.is_dir():
        cls = backends.get("hf") or _builtin("HfJudge")
        opts = cls.Options(backend="hf", model=str(path), batch_size=settings.batch_size)
        return Teacher(cls(opts, base_dir=base_dir, log=log), label=str(path))
    raise UsageError(f"model: {path} is neither a model folder nor a .gguf file")


def _builtin(name: str) -> Any:
    from llmforge_plugins.judges import backends

    return getattr(backends, name)
