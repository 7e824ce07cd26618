"""`merge`: model merging as a first-party plugin.

* the stage kind `merge` (plugins/merge/stage.py), whose options are the merge recipe (options.py);
* the command `llmforge merge OUT ...` and `llmforge merge-lora ADAPTER OUT` (command.py);
* the extension point `register_merge_methods` (api.py: `MERGE_METHODS`, with the `MergeMethod` and
  `Param` a method is written against): the merge plugin declares it, so the core knows nothing of
  merging; the built-in merge methods (methods.py) are registered through it exactly as a third-party
  plugin's method would be.

The engine: plan.py checks a recipe and its inputs and plans every output tensor; sources.py reads
model directories and LoRA adapters tensor by tensor; writer.py streams safetensors shards; engine.py
runs the plan and writes the rest of the model directory.

Imported at every `llmforge` start-up: nothing heavy here. torch and safetensors are imported inside
the functions that merge.
"""

from __future__ import annotations

from llmforge import hookimpl


@hookimpl
def extension_points():
    # api.py imports nothing heavy (no torch): declaring the point costs nothing at start-up.
    from llmforge_plugins.merge.api import MERGE_METHODS

    return [MERGE_METHODS]


@hookimpl
def register_stages(register):
    from llmforge_plugins.merge.stage import MergeStage

    register(MergeStage)


@hookimpl
def register_merge_methods(register):
    from llmforge_plugins.merge.methods import BUILTIN
    from llmforge_plugins.merge.moe import Moe

    for method in BUILTIN:
        register(method)
    register(Moe)  # plans its own merge (experts and routers), on top of the other methods


@hookimpl
def register_commands(cli):
    from llmforge_plugins.merge.command import register

    register(cli)
