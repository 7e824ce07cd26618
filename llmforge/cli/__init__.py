"""The `llmforge` command line: a thin Typer layer over the core.

Commands collect options, call the core and render what it returns or emits. A ForgeError raised by
the core becomes one message on stderr and its exit code; a traceback only with --debug.
"""

from __future__ import annotations

import atexit
import os
import sys
import traceback


def main(argv: list[str] | None = None) -> None:
    from llmforge.errors import ForgeError

    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("LLMFORGE_DEBUG") == "1"
    # --debug is accepted anywhere (`llmforge validate --debug`), not only before the command.
    args = [a for a in args if a != "--debug"]
    if debug:
        # also shows debug-level events (library chatter) in `run` and `logs`, here and in detached children
        os.environ["LLMFORGE_DEBUG"] = "1"
    try:
        from llmforge.cli.app import build_app

        build_app()(args=args, prog_name="llmforge")
    except ForgeError as exc:
        if debug:
            traceback.print_exc()
        print(f"error: {exc.render()}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - the last line of defence: no traceback for users
        if debug:
            raise
        print(f"error: {type(exc).__name__}: {exc}\n(run again with --debug to see the traceback)", file=sys.stderr)
        sys.exit(1)
    finally:
        # At exit, not now: whoever called main() in this process (a test, a notebook) may load a model later,
        # and llama_cpp needs these files open for that. Registered once however often main() runs.
        atexit.unregister(_close_library_handles)
        atexit.register(_close_library_handles)


def _close_library_handles() -> None:
    """llama_cpp opens two /dev/null files at import (to silence model loading) and never closes them; at
    interpreter exit that prints "ResourceWarning: unclosed file" under a finished command. Run at exit
    (atexit handlers run before the interpreter collects the modules), when no model loads any more."""
    utils = sys.modules.get("llama_cpp._utils")
    for name in ("outnull_file", "errnull_file"):
        handle = getattr(utils, name, None)
        if handle is not None and not handle.closed:
            handle.close()
