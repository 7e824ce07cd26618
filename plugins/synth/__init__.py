"""`synth`: synthetic data and AI feedback as a first-party plugin.

* the extension points `register_generators` and `register_verifiers` (api.py: ``GENERATORS``, ``VERIFIERS``,
  with the base classes a generator or a verifier is written against);
* the built-in generators (generators.py: self_instruct, from_documents, evolve, answer; preferences.py:
  preferences, a policy's own samples judged into pairs) and verifiers (verifiers.py, with the code sandbox in
  sandbox.py), registered through them exactly as a third-party plugin's would be;
* the stage kinds `synth` (stage.py), `rlaif` (rlaif.py: sample, judge, DPO, for several rounds) and
  `reward_model` (reward_model.py: TRL's reward trainer), and the command `llmforge synth` (command.py).

Imported at every `llmforge` start-up: nothing heavy here.
"""

from __future__ import annotations

from llmforge import hookimpl


@hookimpl
def extension_points():
    from llmforge_plugins.synth.api import GENERATORS, VERIFIERS

    return [GENERATORS, VERIFIERS]


@hookimpl
def register_generators(register):
    from llmforge_plugins.synth.generators import BUILTIN_GENERATORS
    from llmforge_plugins.synth.preferences import PreferencesGenerator

    for generator in BUILTIN_GENERATORS:
        register(generator)
    register(PreferencesGenerator)


@hookimpl
def register_verifiers(register):
    from llmforge_plugins.synth.verifiers import BUILTIN_VERIFIERS

    for verifier in BUILTIN_VERIFIERS:
        register(verifier)


@hookimpl
def register_stages(register):
    from llmforge_plugins.synth.reward_model import RewardModelStage
    from llmforge_plugins.synth.rlaif import RlaifStage
    from llmforge_plugins.synth.stage import SynthStage

    register(SynthStage)
    register(RlaifStage)
    register(RewardModelStage)


@hookimpl
def register_commands(cli):
    from llmforge_plugins.synth.command import register

    register(cli)
