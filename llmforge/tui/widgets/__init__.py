"""Widgets of the TUI shared by its screens (the area tabs, charts, panels)."""
