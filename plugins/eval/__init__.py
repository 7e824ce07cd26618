"""`eval`: evaluation as a first-party plugin.

* the extension points `register_eval_tasks` and `register_eval_models` (api.py: ``EVAL_TASKS``,
  ``EVAL_MODELS``, with the base classes a task kind or a model runner is written against);
* the built-in task kinds (tasks.py) and model runners (hf_model.py, gguf_model.py), registered through them
  exactly as a third-party plugin's would be;
* the stage kind `eval` (stage.py) and the command `llmforge eval` (command.py).

Imported at every `llmforge` start-up: nothing heavy here.
"""

from __future__ import annotations

from llmforge import hookimpl


@hookimpl
def extension_points():
    from llmforge_plugins.eval.api import EVAL_MODELS, EVAL_TASKS

    return [EVAL_TASKS, EVAL_MODELS]


@hookimpl
def register_eval_models(register):
    # neither module imports torch or llama.cpp until a model is opened; each refuses what it cannot open
    from llmforge_plugins.eval.gguf_model import GGUFEvalModel
    from llmforge_plugins.eval.hf_model import HFEvalModel

    register(HFEvalModel)
    register(GGUFEvalModel)


@hookimpl
def register_eval_tasks(register):
    from llmforge_plugins.eval.tasks import BUILTIN_TASKS

    for task in BUILTIN_TASKS:
        register(task)


@hookimpl(specname="register_eval_tasks")
def register_lmeval_task(register):
    # lmeval.py imports lm_eval only when a task runs: registering the kind costs nothing without the extra
    from llmforge_plugins.eval.lmeval import LmEvalTask

    register(LmEvalTask)


@hookimpl
def register_stages(register):
    from llmforge_plugins.eval.stage import EvalStage

    register(EvalStage)


@hookimpl
def register_commands(cli):
    from llmforge_plugins.eval.command import register

    register(cli)
