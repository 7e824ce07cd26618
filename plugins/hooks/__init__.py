"""The entry points of the single-module built-in plugins, kept light.

Every plugin module named in the `llmforge` entry-point group is imported at every start-up, so that
`llmforge --help` can list the commands plugins add. The built-in stages, data formats and trackers
are defined with pydantic models, whose import alone costs about a tenth of a second (the chat
templates need llmforge.chat); their entry points are therefore these small modules, which register the
real classes from inside the hooks, on first use of a registry table. (The packaged built-ins, demo/,
merge/ and gguf/, keep their light hooks in their own `__init__`.)
"""
