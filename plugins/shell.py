"""`shell`: run a command as a pipeline stage.

Useful for glue (fetching data you already have, a custom eval script) and for trying a pipeline
before any training stage. The command runs in the stage's work folder with:

* ``LLMFORGE_OUT``: an empty folder that becomes the stage's ``files`` artifact when the command
  succeeds (renamed into place: a failed or stopped command leaves no artifact);
* ``LLMFORGE_INPUT_<NAME>``: the path of each entry of ``inputs`` (``@stage`` references resolved);
* ``LLMFORGE_RUN_DIR`` and ``LLMFORGE_STAGE_DIR``;
* ``LLMFORGE_RESUME``: ``1`` when the run is resumed and this stage was interrupted before. The work
  folder (the command's current folder) is kept then, so a command can continue from what it saved.

Each output line becomes a log event. A stop request terminates the command.
"""

from __future__ import annotations

import os
import subprocess
import threading
from typing import Annotated

from pydantic import Field

from llmforge.errors import StageFailed
from llmforge.stage import Input, Produced, Stage, StageContext, StageOptions


class ShellOptions(StageOptions):
    command: str | list[str] = Field(
        description="A shell command line (run with sh -c), or an argument list run without a shell."
    )
    inputs: dict[str, Annotated[str, Input()]] = Field(
        default_factory=dict, description="Named inputs: paths or @stage references, given as LLMFORGE_INPUT_<NAME>."
    )
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment variables.")
    timeout: float | None = Field(None, gt=0, description="Seconds before the command is killed.")


class ShellStage(Stage):
    kind = "shell"
    summary = "Run a command; what it writes to $LLMFORGE_OUT becomes the stage's files artifact."
    Options = ShellOptions
    produces = ("files",)

    def run(self, options: ShellOptions, ctx: StageContext) -> Produced | None:
        with ctx.artifact("files") as out:
            env = {
                **os.environ,
                **options.env,
                "LLMFORGE_OUT": str(out),
                "LLMFORGE_RUN_DIR": str(ctx.run_dir),
                "LLMFORGE_STAGE_DIR": str(ctx.stage_dir),
                "LLMFORGE_RESUME": "1" if ctx.resume else "0",
            }
            for name, path in options.inputs.items():
                env[f"LLMFORGE_INPUT_{name.upper().replace('-', '_')}"] = path
            shell = isinstance(options.command, str)
            proc = subprocess.Popen(
                options.command,
                shell=shell,
                cwd=ctx.work_dir,
                env=env,
                text=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                bufsize=1,
            )
            reader = threading.Thread(target=self._pump, args=(proc, ctx), daemon=True)
            reader.start()
            try:
                code = self._wait(proc, ctx, options.timeout)
            finally:
                reader.join(timeout=5)
                # Our end of the command's output pipe: left open, the interpreter reports
                # "ResourceWarning: unclosed file" for every shell stage. A grandchild that still holds
                # the pipe open keeps the reader blocked; closing it ends the reader either way.
                if not reader.is_alive() and proc.stdout is not None:  # always set: stdout=PIPE
                    proc.stdout.close()
            # Ctrl-C in a terminal reaches the command too, which may die before we polled: ask again.
            if ctx.stop_seen or ctx.should_stop():
                return None  # the core discards the unfinished artifact and records the stage as stopped
            if code != 0:
                raise StageFailed(f"command exited with code {code}: {options.command}")
        return ctx.published

    @staticmethod
    def _pump(proc: subprocess.Popen[str], ctx: StageContext) -> None:
        assert proc.stdout is not None  # opened with stdout=PIPE
        for line in proc.stdout:
            ctx.log(line.rstrip("\n"))

    @staticmethod
    def _wait(proc: subprocess.Popen[str], ctx: StageContext, timeout: float | None) -> int:
        waited = 0.0
        while True:
            try:
                return proc.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                waited += 0.2
            if ctx.should_stop():
                # A command has no checkpoint to save: say what a stop does here (training stages say
                # they save one). On --resume the command runs again, with LLMFORGE_RESUME=1.
                ctx.log("stop requested: ending the command (it runs again on --resume)")
                proc.terminate()
                try:
                    return proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    return proc.wait()
            if timeout is not None and waited >= timeout:
                proc.kill()
                proc.wait()
                raise StageFailed(f"command timed out after {timeout:g} s: {proc.args!s}")
