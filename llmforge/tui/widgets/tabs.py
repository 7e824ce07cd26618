"""The tab-like header every area screen gets: `1 Project  2 Monitor ...`, the current one highlighted.

A Static with clickable markup rather than textual's Tabs: it never takes focus, so arrow keys stay
with the screen's own widgets, and keys 1..7 (app bindings) do the switching.
"""

from __future__ import annotations

from textual.widgets import Static


class AreaTabs(Static):
    DEFAULT_CSS = """
    AreaTabs {
        dock: top;
        height: 1;
        width: 100%;
        background: $panel;
        color: $text-muted;
    }
    """

    def __init__(self, areas: list[tuple[str, str]], active: str, title: str = "llmforge") -> None:
        # areas: (name, label) in key order; key i+1 shows areas[i]
        self.areas = areas
        self.active = active
        super().__init__(self._markup(title), markup=True)

    def _markup(self, title: str) -> str:
        parts = [f"[b]{title}[/b] "]
        for i, (name, label) in enumerate(self.areas, start=1):
            text = f" {i} {label} "
            if name == self.active:
                parts.append(f"[reverse b]{text}[/]")
            else:
                parts.append(f"[@click=app.show('{name}')]{text}[/]")
        return "".join(parts)
