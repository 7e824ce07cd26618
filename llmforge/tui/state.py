"""What every screen of the TUI shares: which forge.toml, which runs folder, which run is selected.

Screens take an `AppState` and read it when they are shown; the Runs screen sets `selected_run`, the
Monitor follows it. Nothing here imports pydantic, textual or the pipeline: building a state is part
of the app's start-up, which must paint in well under a second.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmforge.runs import MANIFEST, RunInfo, RunStore, resolve_runs_dir

if TYPE_CHECKING:
    from llmforge.plugins import Registry

DEFAULT_CONFIG = "forge.toml"


@dataclass
class AppState:
    config_path: Path | None  # the forge.toml, absolute; None when there is none
    runs_dir: Path
    selected_run: str | None = None  # a run id, set by the Runs screen, read by the Monitor
    #: the app's plugin registry (the TUI is an edge: it builds one and hands it down); None: built on
    #: first use by registry(), in a screen's worker thread, never while the app paints its first frame
    plugin_registry: Any = field(default=None, repr=False, compare=False)
    _plugins_lock: Any = field(default_factory=threading.Lock, init=False, repr=False, compare=False)
    # manifest path -> (mtime_ns, size, parsed): see runs()
    _manifests: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def discover(cls, config: Path | str | None = None, runs_dir: Path | str | None = None) -> AppState:
        """The state for `llmforge tui [-c CONFIG] [--runs-dir DIR]`: an explicit config is kept even if
        missing (the Project screen says so); without one, ./forge.toml if present."""
        if config is not None:
            cfg: Path | None = Path(config).absolute()  # absolute() as the runner records it, not resolve()
        else:
            cfg = Path(DEFAULT_CONFIG).absolute() if Path(DEFAULT_CONFIG).is_file() else None
        return cls(cfg, resolve_runs_dir(Path(runs_dir).resolve() if runs_dir else None, cfg))

    def registry(self) -> Registry:
        """The plugin registry every screen shares, loaded on first call (call it from a worker thread)."""
        with self._plugins_lock:  # two screens' workers may ask at once: one registry per app
            if self.plugin_registry is None:
                from llmforge.plugins import load_registry

                registry = load_registry()
                # Declare the extension points and fill the tables now, under the lock (under a second, in a
                # worker): the registry does both lazily on first use, and two screens' workers using it at
                # once would otherwise see a half-built one ("no extension point 'judge_backends'", "unknown
                # stage kind 'shell' (installed: none)": a launch failing while the Project area loads).
                registry.collect()
                self.plugin_registry = registry
            return self.plugin_registry

    @property
    def store(self) -> RunStore:
        return RunStore(self.runs_dir)

    def runs(self) -> list[RunInfo]:
        """Like RunStore.list(), oldest first, but a manifest is parsed again only when it changed:
        screens poll this every second, and a runs folder can hold hundreds of runs."""
        out: list[RunInfo] = []
        try:
            entries = list(os.scandir(self.runs_dir))
        except OSError:
            return out
        seen = set()
        for entry in entries:
            path = os.path.join(entry.path, MANIFEST)
            try:
                st = os.stat(path)
            except OSError:
                continue
            seen.add(path)
            cached = self._manifests.get(path)
            if cached is None or cached[:2] != (st.st_mtime_ns, st.st_size):
                try:
                    with open(path, encoding="utf-8") as fh:
                        cached = (st.st_mtime_ns, st.st_size, json.load(fh))
                except (OSError, ValueError):
                    continue  # being replaced right now: next time
                if not isinstance(cached[2], dict):
                    continue  # not a manifest (`llmforge runs list` names it damaged)
                self._manifests[path] = cached
            out.append(RunInfo(entry.name, Path(entry.path), cached[2]))
        for gone in set(self._manifests) - seen:
            del self._manifests[gone]
        out.sort(key=lambda r: (r.record.created or 0, r.id))
        return out

    def latest_run(self, of_config: bool = False) -> RunInfo | None:
        """The newest run of the runs folder (of this forge.toml only, with `of_config`); None if none."""
        runs = self.runs()
        if of_config:
            runs = [r for r in runs if self.is_own(r)]
        return runs[-1] if runs else None

    def is_own(self, run: RunInfo) -> bool:
        """Whether a run was made from this state's forge.toml."""
        if self.config_path is None or not run.config_path:
            return False
        return run.config_path == str(self.config_path) or Path(run.config_path).resolve() == self.config_path.resolve()

    def run_to_follow(self) -> RunInfo | None:
        """The selected run if it still exists, else the latest run."""
        if self.selected_run:
            try:
                return self.store.get(self.selected_run)
            except Exception:  # noqa: BLE001 - deleted since it was selected: fall back to the latest
                pass
        return self.latest_run()
