"""The TUI's area screens, one module each, found by `llmforge.tui.app.SCREENS`.

Contract for a screen module (`llmforge/tui/screens/<area>.py`):

* a `textual.screen.Screen` subclass, constructed as `Screen(app_state)` where `app_state` is the
  app's `llmforge.tui.state.AppState` (`config_path`, `runs_dir`, `selected_run`);
* `BINDINGS` for its own keys (the Footer shows them; `?` lists them with the class docstring);
* it is created once, on first show, and kept: refresh what may have changed in `on_screen_resume`;
* the app adds the area tabs (docked top) and a Footer if the screen composed none;
* heavy imports (torch, transformers, llama_cpp, even the pipeline) inside workers or actions, never
  at module level: importing `llmforge.tui.app` must stay light;
* an exception raised in an action (`action_*`, what BINDINGS call) or a worker is shown by the app as
  an error notification (a ForgeError with its message and hint) and the app keeps running. Event
  handlers (`on_*`) must catch their own: textual stops the message loop of a widget whose handler
  raised. `self.app.show_error(exc)` shows one you caught.
"""

from __future__ import annotations  # noqa: E402 - after the docstring, before the helpers

import asyncio  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any


async def read_runs_dir(screen: Any, read: Callable[[Path], Any], runs_dir: Path) -> Any | None:
    """`read(runs_dir)` in a thread, for a screen's worker. A ForgeError is shown like any other error, an
    unreadable folder as one notification; either gives None, and the screen keeps what it shows."""
    from llmforge.errors import ForgeError

    try:
        return await asyncio.to_thread(read, runs_dir)
    except ForgeError as exc:
        show = getattr(screen.app, "show_error", None)
        if callable(show):
            show(exc)
        else:
            screen.notify(exc.render(), title="error", severity="error", markup=False)
    except OSError as exc:
        screen.notify(f"cannot read {runs_dir}: {exc}", severity="error", markup=False)
    return None
