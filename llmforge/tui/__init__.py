"""The Textual TUI: a front end over the core, like `llmforge.cli` (`llmforge tui`; see app.py)."""
