"""`demo`: the `llmforge demo` command, the eval task kinds `demo_qa` and `demo_margin`, the verifier
`demo_world` (the rule judge of the demo's RLAIF step, registered through the synth plugin's
`register_verifiers`), and the older `demo_eval` stage kind.

`llmforge demo` writes a small self-contained project (a generated world of facts and sums, chat
and preference data derived from it, and a documented forge.toml), runs curate -> pretrain -> SFT ->
DPO -> RLAIF (pairs of the SFT model's own answers, judged by demo_world, then DPO) -> merge (SFT and DPO
models, halfway) -> GGUF -> eval on CPU, and ends with a summary table and the evaluation: held-out accuracy
before and after SFT, direct (unhedged) answers before and after DPO and RLAIF. The
evaluation is the `eval` stage (the eval plugin) running the demo's own task kinds (tasks.py), registered
through `register_eval_tasks` as a third-party plugin registers its own. `demo_eval`, the stage that measured
the same before the eval stage existed, stays registered for projects written by an older `llmforge demo`.

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
def register_eval_tasks(register):
    from llmforge_plugins.demo.tasks import DEMO_TASKS

    for task in DEMO_TASKS:
        register(task)


@hookimpl
def register_commands(cli):
    from llmforge_plugins.demo.command import demo

    cli.command(name="demo")(demo)


@hookimpl
def register_verifiers(register):
    from llmforge_plugins.demo.verifier import DemoWorldVerifier

    register(DemoWorldVerifier)
