"""`curate`: data curation as a first-party plugin.

* the stage kind `curate` (stage.py): one source or a mix, through curation steps, into a dataset
  artifact that training stages read with `data = { path = "@curate" }`, plus a report;
* the built-in curation steps, registered through `register_curation_steps` exactly as a third-party
  plugin's steps would be: `normalize`, `pii` (rewrites), `exact_dedup`, `near_dedup` (dedup),
  `quality`, `language`, `decontaminate`, `lint` (filters);
* a `validate_pipeline` check that the files a curate stage's steps name exist (paths are relative to
  forge.toml, which a stage's own `check()` does not know).

The step API is in llmforge/curation.py (`CurationStep`); the engine (batches through the steps, the books, the reasons file) in
engine.py; reading rows as a stream, by the training data's rules, in source.py. The `llmforge data
stats|lint|dedup|filter|mix` commands (llmforge/cli/data_curate_cmd.py) call into this package.

Imported at every `llmforge` start-up: nothing heavy here (no pydantic, numpy or xxhash at import).
"""

from __future__ import annotations

from llmforge import hookimpl


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
def validate_pipeline(pipeline):
    from llmforge_plugins.curate.checks import file_problems

    return file_problems(pipeline)
