"""Entry point of `data_formats`: the built-in readers and row formats (defined in
llmforge_plugins.data_formats)."""

from __future__ import annotations

from llmforge import hookimpl


@hookimpl
def register_readers(register):
    from llmforge_plugins.data_formats import READERS

    for reader in READERS:
        register(reader)


@hookimpl
def register_row_formats(register):
    from llmforge_plugins.data_formats import ROW_FORMATS

    for fmt in ROW_FORMATS:
        register(fmt)
