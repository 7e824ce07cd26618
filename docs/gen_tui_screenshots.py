"""Generate the screenshots of docs/tui.md: docs/images/tui-<area>.svg, one per area of `llmforge tui`.

    python docs/gen_tui_screenshots.py                 # rewrite docs/images/tui-*.svg (about 20 s)
    python docs/gen_tui_screenshots.py --out /tmp/x    # somewhere else

The pictures are of the real app, exported by Textual (`App.export_screenshot`), over the snapshot tests'
project (tests/test_tui_snapshots.py): the demo's pipeline with each stage played by a stand-in that reports
and makes what the real stage would, at once, and three runs of it made by the real runner: one failed at
once, one stopped at a checkpoint, one done with the models it made. The runs' numbers are fixed curves
and their times pinned, so the images are the same on every machine; so is the hardware panel (fixed
figures) and the time zone (UTC). Each area is brought to the state its picture shows by the same code the
snapshot tests use.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
OUTPUT = DOCS / "images"
SIZE = (120, 34)  # wide enough for the Runs table's every column; the app works from 80x24


def build_demo(root: Path, fixture) -> None:
    """The snapshot project and its runs (made by the runner), with the demo's full vocabulary size."""
    from llmforge_plugins.demo.project import FULL

    fixture.write_shell_project(root)
    fixture.write_runs(root, vocab=FULL.vocab_size)


async def screenshot(fixture, area: str, size: tuple[int, int], theme: str | None = None) -> str:
    app = fixture.make_app(area)
    async with app.run_test(size=size) as pilot:
        if theme is not None:
            app.theme = theme
        await fixture.READY[area](pilot)
        svg = app.export_screenshot(title=f"llmforge tui: {area}")
        if app.unexpected_errors or app.shown_errors:
            raise RuntimeError(f"{area}: the app reported errors: {app.unexpected_errors or app.shown_errors}")
    return svg


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUTPUT, help="folder for the tui-<area>.svg files")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)

    sys.path.insert(0, str(ROOT / "tests"))
    import test_tui_snapshots as fixture

    os.environ["TZ"] = "UTC"
    time.tzset()
    fixture.pin_live_values(setattr)
    with tempfile.TemporaryDirectory(prefix="llmforge-tui-docs-") as tmp:
        root = Path(tmp) / "demo"
        build_demo(root, fixture)
        os.chdir(root)  # the app shows paths relative to the project, as when opened there
        for area in fixture.READY:
            path = out / f"tui-{area}.svg"
            path.write_text(asyncio.run(screenshot(fixture, area, SIZE)), encoding="utf-8")
            print(path)
        # One area in a light theme (ctrl+p, "Theme"), to show that the colours hold up there too.
        path = out / "tui-runs-light.svg"
        path.write_text(asyncio.run(screenshot(fixture, "runs", SIZE, theme="textual-light")), encoding="utf-8")
        print(path)
        os.chdir(ROOT)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
