"""First-party llmforge plugins, installed as the `llmforge_plugins` package.

Each module registers through the `llmforge` entry-point group in pyproject.toml, exactly like a
third-party plugin would.
"""
