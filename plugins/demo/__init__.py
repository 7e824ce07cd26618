"""`demo`: the `llmforge demo` command and the `demo_eval` stage kind.

`llmforge demo` writes a small self-contained project (a generated world of facts and sums, chat
and preference data derived from it, and a documented forge.toml), runs curate -> pretrain -> SFT ->
DPO -> merge (SFT and DPO models, halfway) -> GGUF -> evaluation on CPU, and ends with a summary table and the
evaluation: held-out accuracy before and after SFT, direct (unhedged) answers before and after DPO.

Imported at every `llmforge` start-up: only light modules at the top; the command and the stage
import torch and transformers when they run.
"""

from __future__ import annotations

from llmforge import hookimpl


@hookimpl
def register_stages(register):
    from llmforge_plugins.demo.eval_stage import DemoEvalStage

    register(DemoEvalStage)


@hookimpl
def register_commands(cli):
    from llmforge_plugins.demo.command import demo

    cli.command(name="demo")(demo)
