"""`curate`: data curation as a first-party plugin.

* the stage kind `curate` (stage.py): one source or a mix, through curation steps, into a dataset
  artifact that training stages read with `data = { path = "@curate" }`, plus a report;
* the extension point `register_curation_steps` (`CURATION_STEPS`, below), declared by this plugin, not
  by the core; the step API a step is written against (`CurationStep`, `Drop`, `StepOptions`, `StepEnv`,
  `row_text`, `map_text`) is in api.py;
* the built-in curation steps, registered through `register_curation_steps` exactly as a third-party
  plugin's steps would be: `normalize`, `pii` (rewrites), `exact_dedup`, `near_dedup` (dedup),
  `quality`, `language`, `decontaminate`, `lint` (filters);
* the `llmforge data stats|lint|dedup|filter|mix|steps` commands (command.py), added to the `data`
  group through `register_commands`;
* a `validate_pipeline` check that the files a curate stage's steps name exist (paths are relative to
  forge.toml, which a stage's own `check()` does not know).

The engine (batches through the steps, the books, the reasons file) is in engine.py; reading rows as a
stream, by the training data's rules, in source.py.

Imported at every `llmforge` start-up: nothing heavy here (no pydantic, numpy or xxhash at import). That
is why the extension point is declared here and validates through a lazy import of api.py (which needs
pydantic for `StepOptions`).
"""

from __future__ import annotations

from typing import Any

from llmforge import hookimpl
from llmforge.extension import ExtensionPoint


def _validate_step(obj: Any) -> Any:
    # Runs when steps are registered (on first use of the table), where pydantic is needed anyway.
    from llmforge.extension import subclass_of
    from llmforge_plugins.curate.api import CurationStep, step_rules

    return subclass_of(CurationStep, check=step_rules)(obj)


#: The extension point other plugins add curation steps through; the curate stage and the `data`
#: commands read the table with ``registry.table(CURATION_STEPS)`` (name -> CurationStep subclass).
CURATION_STEPS = ExtensionPoint(
    hook="register_curation_steps",
    table="curation_steps",
    label="curation step",
    doc="""Register data-curation steps: :class:`llmforge_plugins.curate.api.CurationStep` subclasses.

    The name is what a ``curate`` stage's ``steps = [...]`` and ``llmforge data filter --step <name>``
    select (``llmforge data steps`` lists them). A step has an ``action`` (``filter``, ``dedup`` or
    ``rewrite``; a step written before ``action`` existed sets ``kind``), an ``Options`` model, and
    answers each row (streamed to it in small batches, in order) with the row, a rewritten row, or
    ``Drop(reason, code=...)``; the reasons end up in the per-row reasons file and the curation report.
    The built-in steps (``normalize``, ``pii``, ``exact_dedup``, ``near_dedup``, ``quality``,
    ``language``, ``decontaminate``, ``lint``) are registered through this hook too. (Declared by the
    curate plugin.)
    """,
    validate=_validate_step,
)


@hookimpl
def extension_points():
    return [CURATION_STEPS]


@hookimpl
def register_stages(register):
    from llmforge_plugins.curate.stage import CurateStage

    register(CurateStage)


@hookimpl
def register_curation_steps(register):
    from llmforge_plugins.curate.steps import BUILTIN

    for step in BUILTIN:
        register(step)


@hookimpl
def register_commands(cli):
    from llmforge_plugins.curate.command import register

    register(cli)


@hookimpl
def validate_pipeline(pipeline):
    from llmforge_plugins.curate.checks import file_problems

    return file_problems(pipeline)
