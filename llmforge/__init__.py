"""llmforge: a local-first workbench for training language models.

Importing this package is cheap on purpose: no torch, transformers or UI library is imported here.
"""

from llmforge.hookspecs import hookimpl

__version__ = "0.1.0"
__all__ = ["__version__", "hookimpl"]
