"""The `hello` stage kind: writes greetings into a `files` artifact.

Small on purpose, but it does what a real stage has to do: declare its options once, take an
input that may be a path or another stage's artifact, estimate what it needs for `llmforge plan`,
report progress, stop when asked, keep a checkpoint that `llmforge run --resume` continues from,
and publish its output atomically.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

from pydantic import Field

from llmforge.errors import DataError, Problem
from llmforge.stage import Input, Produced, Stage, StageContext, StageOptions

if TYPE_CHECKING:
    from llmforge.planning import Estimate, PlanEnv

OUTPUT_FILE = "greetings.txt"
CHECKPOINT_FILE = "greetings.partial"
# What the plan assumes for names it cannot see before the run (bytes of a long name; a long names file).
NAME_BYTES, NAMES_GUESS = 32, 1000


class HelloOptions(StageOptions):
    # Descriptions and constraints are not decoration: `llmforge stages show hello` prints them,
    # and forge.toml errors quote the constraint (`stages[1].times: must be >= 1 (got 0)`).
    greeting: str = Field("Hello", min_length=1, description="The word to greet with.")
    name: str = Field("world", min_length=1, description="Who to greet when `names` is not set.")
    names: Annotated[str | None, Input("files")] = Field(
        None,
        description="Who to greet instead: a text file with one name per line, a folder of .txt files, "
        "or a reference to another stage's files artifact (@stage). Lines starting with # "
        "are skipped.",
    )
    times: int = Field(1, ge=1, le=1000, description="How many times to greet each name.")
    delay: float = Field(
        0.0,
        ge=0,
        le=10,
        description="Seconds to wait after each greeting, to watch progress or try `llmforge stop` and `--resume`.",
    )


def greetings(greeting: str, names: list[str], times: int) -> list[str]:
    """The lines the stage writes; shared with the `llmforge hello` command so both agree."""
    return [f"{greeting}, {name}!" for name in names for _ in range(times)]


def read_names(path: Path) -> list[str]:
    """Names from a file, or from every .txt file of a folder (an artifact is a folder)."""
    files = sorted(path.rglob("*.txt")) if path.is_dir() else [path]
    names: list[str] = []
    for file in files:
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            # DataError, not a bare exception: the user sees one line naming the file, exit code 2.
            raise DataError(f"{file}: not UTF-8 text (byte {exc.start})") from None
        names += [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not names:
        where = f"{path} (searched {len(files)} .txt file{'s' if len(files) != 1 else ''})" if path.is_dir() else path
        raise DataError(f"{where}: no names found", hint="write one name per line")
    return names


class HelloStage(Stage):
    """Greets a name, or every name of a file or of another stage's output."""

    kind = "hello"
    summary = "Write greetings (one line per name and repetition) to a files artifact."
    Options = HelloOptions
    produces = ("files",)
    # Part of the cache key: bump it when the output for the same options changes, so results
    # cached by an older version of this plugin are not reused.
    version = "1"

    def check(self, options: HelloOptions, inputs) -> list[Problem]:
        # Runs at `llmforge validate`, before anything executes. A reference to another stage has no
        # path yet; only a plain path can be looked at now. The core places problems under this
        # stage's key path, so "names" is reported as `stages[i].names`.
        names = inputs.get("names")
        if names is not None and names.stage is None and names.path.exists():
            try:
                read_names(names.path)
            except DataError as exc:
                return [Problem("names", exc.message)]
        return []

    def estimate(self, options: HelloOptions, env: PlanEnv) -> Estimate:
        # `llmforge plan` prints this next to the built-in stages' figures, and `llmforge run` refuses
        # a stage whose estimate exceeds the machine. Arithmetic only: it runs on every plan, before any
        # input exists (names from another stage are not written yet), so no file is read here.
        from llmforge.planning import Estimate

        names = NAMES_GUESS if options.names else 1
        line = len(options.greeting) + NAME_BYTES + 4  # "<greeting>, <name>!\n"
        text = names * options.times * line
        # The lines are held as Python strings (~50 bytes of overhead each), then joined into the file's text.
        memory = {"greetings (strings and the joined text)": 2 * text + names * options.times * 50}
        notes = [f"names read at run time: counted as {NAMES_GUESS:,}"] if options.names else []
        return Estimate("cpu", sum(memory.values()), memory, disk=text, disk_parts={OUTPUT_FILE: text}, notes=notes)

    def run(self, options: HelloOptions, ctx: StageContext) -> Produced | None:
        # `options.names` arrives resolved: an @reference has become the artifact's folder.
        names = read_names(Path(options.names)) if options.names else [options.name]
        lines = greetings(options.greeting, names, options.times)

        # The work folder survives an interrupted run, and only then is ctx.resume True: a changed
        # option changes the cache key, and the core starts such a stage in a fresh folder.
        checkpoint = ctx.work_dir / CHECKPOINT_FILE
        done = _saved_prefix(checkpoint, lines) if ctx.resume else []
        if done:
            ctx.log(f"resuming after {len(done)} of {len(lines)} greetings")
        # Rewrite the checkpoint with only what is trustworthy (a crash can tear the last line).
        checkpoint.write_text("".join(line + "\n" for line in done), encoding="utf-8")

        with checkpoint.open("a", encoding="utf-8") as saved:
            for i in range(len(done), len(lines)):
                if ctx.should_stop():
                    ctx.log(f"stopping after {i} of {len(lines)} greetings; --resume continues from here")
                    return
                saved.write(lines[i] + "\n")
                saved.flush()  # every line is a checkpoint: a stop or a kill loses nothing written
                ctx.progress(i + 1, len(lines), unit="greeting")
                if ctx.checkpoint_requested():
                    ctx.log(f"checkpoint: {i + 1} greetings saved")
                if options.delay:
                    time.sleep(options.delay)

        # Only now does the output appear, all at once: a later stage (or a cache lookup) can never
        # see half the greetings.
        with ctx.artifact("files") as out:
            (out / OUTPUT_FILE).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        ctx.metric(step=len(lines), greetings=float(len(lines)), names=float(len(names)))
        ctx.log(f"wrote {len(lines)} greetings for {len(names)} name{'s' if len(names) != 1 else ''}")
        return ctx.published


def _saved_prefix(checkpoint: Path, lines: list[str]) -> list[str]:
    """The checkpointed lines that still agree with what this run would write."""
    if not checkpoint.is_file():
        return []
    saved = checkpoint.read_text(encoding="utf-8").split("\n")
    done = []
    for old, new in zip(saved, lines):
        if old != new:
            break
        done.append(old)
    return done
