"""`copy`: gather files and folders (user paths or other stages' artifacts) into one artifact.

A small, dependency-free stage: handy to bundle outputs, and a worked example of inputs,
atomic artifacts and cooperative stopping.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated

from pydantic import Field

from llmforge.stage import Input, Produced, Stage, StageContext, StageOptions


class CopyOptions(StageOptions):
    sources: list[Annotated[str, Input()]] = Field(
        min_length=1, description="Files or folders to copy: paths (relative to forge.toml) or @stage references."
    )
    flatten: bool = Field(False, description="Copy the contents of folders rather than the folders themselves.")


class CopyStage(Stage):
    kind = "copy"
    summary = "Copy files, folders or other stages' artifacts into one files artifact."
    Options = CopyOptions
    produces = ("files",)

    def run(self, options: CopyOptions, ctx: StageContext) -> Produced | None:
        with ctx.artifact("files") as out:
            total = len(options.sources)
            for i, src in enumerate(options.sources):
                if ctx.should_stop():
                    return None  # stopped: the unfinished files artifact is discarded
                src_path = Path(src)
                if src_path.is_dir():
                    if options.flatten:
                        shutil.copytree(src_path, out, dirs_exist_ok=True)
                    else:
                        shutil.copytree(src_path, out / _name_for(src_path, ctx), dirs_exist_ok=True)
                else:
                    shutil.copy2(src_path, out / src_path.name)
                ctx.progress(i + 1, total, unit="source")
                ctx.log(f"copied {src_path}")
        return ctx.published


def _name_for(path: Path, ctx) -> str:
    # An artifact folder is named after its kind ("files"); name it after its stage instead.
    for art in ctx.inputs.values():
        if art.stage and Path(art.path) == path:
            return art.stage
    return path.name
