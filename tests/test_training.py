"""The training stages on a tiny Llama and tokenizers trained on the spot: loss falls, outputs load,
DPO's margin rises, stop + resume reproduces the uninterrupted run, SIGKILL resumes, caches are keyed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import _env
from training_data import DPO, PRETRAIN, SFT, write_data


def events_of(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines() if x.strip()]


def losses(events: list[dict], stage: str, key: str = "loss") -> list[tuple[int, float]]:
    return [
        (e["step"], e["values"][key])
        for e in events
        if e["type"] == "metric" and e.get("stage") == stage and key in e["values"]
    ]


def status(project) -> dict:
    return json.loads(project.run("status", "--json").stdout)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One real pipeline run (pretrain -> full SFT -> LoRA DPO with merge), shared by the tests below."""
    from conftest import Project

    project = Project(tmp_path_factory.mktemp("train"))
    write_data(project.root)
    project.write(PRETRAIN.format(steps=40) + SFT.format(steps=30) + DPO.format(steps=12))
    res = project.run("run", timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    st = status(project)
    return project, st, events_of(Path(st["dir"]))


def _falls(series: list[tuple[int, float]]) -> None:
    assert len(series) >= 3, series
    first, last = series[0][1], series[-1][1]
    assert last < first * 0.9, f"loss did not fall: {series}"


def test_auto_precision_is_one_decision_for_training_and_plan(trained, tmp_path):
    """`precision = "auto"`: what training logged is what `llmforge plan` shows, and a model as small as
    these trains in fp32 on every CPU (bf16 autocast made the demo's 3 M model slower and worse on an
    AMX CPU); a 135 M model gets bf16 where the CPU has native bf16."""
    import torch

    from llmforge.hardware import cpu_features

    if torch.cuda.is_available():
        pytest.skip("checks the CPU decision")
    project, st, events = trained
    logged = {e["stage"]: e["message"] for e in events if e["type"] == "log" and e["message"].startswith("training: ")}
    plan = json.loads(project.run("plan", "--json").stdout)
    for s in plan["stages"]:
        name = s["stage"]
        assert s["training"]["precision"] == "fp32", name
        assert "precision fp32 (auto: " in logged[name], logged[name]
    assert "below the 20 M where bf16 pays off" in logged["pretrain"] or "CPU without native bf16" in logged["pretrain"]
    big = tmp_path / "big"
    write_data(big)
    (big / "forge.toml").write_text(PRETRAIN.format(steps=2).replace('"tiny"', '"smollm-135m"'))
    res = subprocess.run(
        [sys.executable, "-m", "llmforge", "plan", "--json"],
        cwd=big,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)["stages"][0]["training"]["precision"]
    assert got == ("bf16" if cpu_features()["bf16_fast"] else "fp32")


def test_pretrain_trains_a_tokenizer_and_model_that_load(trained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    project, st, events = trained
    _falls(losses(events, "pretrain"))
    path = st["stages"]["pretrain"]["artifacts"]["model"]["path"]
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 2
    assert len(tok) == model.config.vocab_size
    # the chat template's markers are single tokens, reserved at tokenizer training time
    for marker in ("<|im_start|>", "<|im_end|>"):
        assert len(tok(marker, add_special_tokens=False)["input_ids"]) == 1
    assert "im_start" in tok.chat_template
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    assert list(Path(path).glob("*.safetensors")), "weights are written as safetensors"


def test_sft_loss_falls_and_model_carries_the_template(trained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    project, st, events = trained
    _falls(losses(events, "sft"))
    sft = st["stages"]["sft"]
    path = sft["artifacts"]["model"]["path"]
    AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    recorded = sft["info"]["chat_template"]
    assert recorded["hash"] and recorded["eos"] == tok.eos_token == "<|im_end|>"
    assert json.loads((Path(path) / "llmforge.json").read_text())["chat_template"]["hash"] == recorded["hash"]
    msgs = [{"role": "user", "content": "What is the capital of Zorvia?"}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True).endswith("<|im_start|>assistant\n")


def test_dpo_margin_rises_and_adapter_and_merged_model_load(trained):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    project, st, events = trained
    dpo_loss = losses(events, "dpo")
    assert sum(v for _, v in dpo_loss[-3:]) / 3 < sum(v for _, v in dpo_loss[:3]) / 3, dpo_loss
    margins = losses(events, "dpo", "rewards/margins")
    assert len(margins) >= 6
    early = sum(m for _, m in margins[:3]) / 3
    late = sum(m for _, m in margins[-3:]) / 3
    assert late > early and late > 0, margins
    dpo = st["stages"]["dpo"]
    assert set(dpo["artifacts"]) == {"adapter", "model"}
    base = AutoModelForCausalLM.from_pretrained(st["stages"]["sft"]["artifacts"]["model"]["path"])
    peft_model = PeftModel.from_pretrained(base, dpo["artifacts"]["adapter"]["path"])
    merged = AutoModelForCausalLM.from_pretrained(dpo["artifacts"]["model"]["path"])
    ids = torch.tensor([[1, 5, 9, 12, 30]])
    with torch.no_grad():
        a = peft_model(ids).logits
        b = merged(ids).logits
    assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()


@pytest.mark.slow
def test_a_stage_runs_alone_reusing_cached_inputs(trained):
    project, st, _ = trained
    res = project.run("run", "--stage", "sft", "--force", timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    again = status(project)
    assert again["stages"]["pretrain"]["status"] == "cached"
    assert again["stages"]["sft"]["status"] == "done"
    assert again["stages"]["dpo"]["status"] == "skipped"


@pytest.mark.slow  # ~45 s: a second training run; the default run stays under 15 minutes
def test_changed_template_retokenizes_same_template_hits_the_cache(trained):
    project, st, _ = trained
    res = project.run("run", "--stage", "sft", "--force", timeout=600)  # same template: cache hit
    assert res.returncode == 0
    tok_events = [e for e in events_of(Path(status(project)["dir"])) if e["type"] == "tokenized"]
    assert tok_events and tok_events[-1]["cached"] is True
    res = project.run("run", "--stage", "sft", "--set", "sft.template=alpaca", timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    st2 = status(project)
    tok_events = [e for e in events_of(Path(st2["dir"])) if e["type"] == "tokenized"]
    assert tok_events[-1]["cached"] is False, "a new template must never reuse the old tokenization"
    assert st2["stages"]["sft"]["info"]["chat_template"]["name"] == "alpaca"


@pytest.mark.slow
def test_lora_sft_trains_an_adapter_that_peft_loads(trained, tmp_path):
    """LoRA SFT writes only an adapter, and one that was trained: its loss fell, every lora_B (which PEFT
    starts at zero, so an untrained adapter is a no-op) moved, and the adapted model answers differently
    from its base, with a lower loss on the chat data."""
    import torch
    from peft import AutoPeftModelForCausalLM
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    project, st, _ = trained
    res = project.run(
        "run",
        "--stage",
        "sft",
        "--set",
        "sft.lora.enabled=true",
        "--set",
        "sft.max_steps=24",
        "--set",
        "sft.learning_rate=5e-3",
        timeout=600,
    )  # LoRA wants a higher rate than full SFT
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    st2 = status(project)
    sft = st2["stages"]["sft"]
    assert set(sft["artifacts"]) == {"adapter"}
    _falls(losses(events_of(Path(st2["dir"])), "sft"))
    adapter = Path(sft["artifacts"]["adapter"]["path"])
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    lora_b = {n: t for n, t in weights.items() if "lora_B" in n}
    assert lora_b and all(t.abs().max() > 0 for t in lora_b.values()), "an adapter still at its zero init"
    model = AutoPeftModelForCausalLM.from_pretrained(str(adapter))
    base_path = st2["stages"]["pretrain"]["artifacts"]["model"]["path"]
    base = AutoModelForCausalLM.from_pretrained(base_path)
    tok = AutoTokenizer.from_pretrained(str(adapter))
    row = json.loads((project.root / "data" / "chat.jsonl").read_text().splitlines()[0])
    ids = torch.tensor([tok.apply_chat_template(row["messages"], tokenize=True, return_dict=True)["input_ids"]])
    with torch.no_grad():
        tuned, plain = model(input_ids=ids, labels=ids), base(input_ids=ids, labels=ids)
    assert (tuned.logits - plain.logits).abs().max() > 1e-3
    assert tuned.loss < plain.loss


@pytest.mark.slow
def test_continued_pretrain_reports_forgetting(trained):
    project, st, _ = trained
    cfg = (
        project.config.read_text()
        + """
[[stages]]
name = "more"
uses = "continued_pretrain"
model = "@pretrain"
data = { path = "data/chat.jsonl", format = "messages" }
max_steps = 12
max_length = 64
log_every = 2
learning_rate = 2e-3
replay = { path = "data/general.txt" }
replay_ratio = 0.3
"""
    )
    project.write(
        cfg.replace('data = { path = "data/chat.jsonl", format = "messages" }', 'data = { path = "data/corpus.txt" }')
    )
    res = project.run("run", "--stage", "more", timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    s = status(project)
    more = s["stages"]["more"]
    report = json.loads((Path(more["artifacts"]["report"]["path"]) / "forgetting.json").read_text())
    assert report["ppl_before"] > 1 and report["ppl_after"] > 1
    assert report["relative_change"] == pytest.approx(
        (report["ppl_after"] - report["ppl_before"]) / report["ppl_before"]
    )
    _falls(losses(events_of(Path(s["dir"])), "more"))
    assert "forgetting: held-out perplexity" in res.stdout


def test_stop_and_resume_reproduce_the_uninterrupted_loss_curve(tmp_path):
    """Same data order, same RNG: a run stopped midway and resumed logs the same losses at every step."""
    from llmforge.pipeline import load_pipeline
    from llmforge.runner import RunRequest, run_pipeline
    from llmforge.runs import STOP_REQUEST, request
    from llmforge.testing import load_test_registry

    registry = load_test_registry()

    def project(root: Path) -> Path:
        write_data(root)
        (root / "forge.toml").write_text(PRETRAIN.format(steps=16).replace("log_every = 2", "log_every = 1"))
        return root / "forge.toml"

    full = run_pipeline(load_pipeline(project(tmp_path / "a"), registry=registry), registry=registry)
    assert full.status == "done"
    reference = dict(losses(events_of(full.run_dir), "pretrain"))
    assert len(reference) == 16

    cfg = project(tmp_path / "b")

    def stop_at_step_6(event):
        if event["type"] == "progress" and event.get("done") == 6:
            request(event_run_dir[0], STOP_REQUEST)

    event_run_dir: list[Path] = []
    pipe = load_pipeline(cfg, registry=registry)
    req = RunRequest(
        listeners=[
            lambda e: event_run_dir.append(cfg.parent / "runs" / e["run"]) if not event_run_dir else None,
            stop_at_step_6,
        ]
    )
    first = run_pipeline(pipe, req, registry=registry)
    assert first.status == "stopped" and first.exit_code == 130
    assert not (first.run_dir / "stages" / "pretrain" / "artifacts" / "model").exists()
    second = run_pipeline(load_pipeline(cfg, registry=registry), RunRequest(resume=True), registry=registry)
    assert second.status == "done" and second.run_id == first.run_id
    resumed = losses(events_of(second.run_dir), "pretrain")
    steps = [s for s, _ in resumed]
    assert steps == sorted(set(steps)) and steps[-1] == 16 and len(steps) == 16, steps
    for step, loss in resumed:
        assert loss == pytest.approx(reference[step], rel=1e-5, abs=1e-6), (step, loss, reference[step])


@pytest.mark.slow
def test_sigkill_mid_training_resumes_from_the_last_complete_checkpoint(project):
    write_data(project.root)
    project.write(PRETRAIN.format(steps=400).replace("log_every = 2", "log_every = 1\nsave_every = 10"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmforge", "run"],
        cwd=project.root,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 300
    ckpts: list[Path] = []
    while time.time() < deadline:
        ckpts = list(project.runs.glob("*/stages/pretrain/work/checkpoints/checkpoint-*/llmforge-complete"))
        if len(ckpts) >= 2:
            break
        time.sleep(0.2)
    assert ckpts, "no checkpoint was written"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    res = project.run("run", "--resume", "--set", "pretrain.max_steps=400", timeout=900)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "took over the stale lock" in res.stdout
    assert "resuming from checkpoint-" in res.stdout
    st = status(project)
    assert st["stages"]["pretrain"]["status"] == "done"


@pytest.mark.slow  # a pretraining run; Qwen3 models' structure is covered fast by tests/test_families.py
def test_pretrain_builds_a_qwen3_model_that_loads_and_plans_alike(project, llmforge_registry):
    """`model.architecture = "qwen3"`: the size preset as a Qwen3 model (per-head q/k RMSNorms, explicit
    head_dim), trained a few steps; the output loads as Qwen3ForCausalLM, and `llmforge plan` counts the
    parameters the stage built."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3ForCausalLM

    from llmforge.pipeline import load_pipeline
    from llmforge.planning import plan

    write_data(project.root)
    project.write(
        PRETRAIN.format(steps=6)
        .replace('model = { size = "tiny" }', 'model = { architecture = "qwen3", size = "tiny", head_dim = 32 }')
        .replace("log_every = 2", "log_every = 1")
    )
    planned = plan(load_pipeline(project.config, registry=llmforge_registry())).stages[0].to_json()["model"]
    res = project.run("run", timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    st = status(project)
    path = st["stages"]["pretrain"]["artifacts"]["model"]["path"]
    model = AutoModelForCausalLM.from_pretrained(path)
    assert isinstance(model, Qwen3ForCausalLM) and model.config.head_dim == 32
    layer = model.model.layers[0].self_attn
    assert layer.q_norm.weight.shape == (32,) and layer.k_norm.weight.shape == (32,)
    assert planned["model_type"] == "qwen3"
    # the plan reads vocab_size, an upper bound of what the trained BPE tokenizer reaches (tied embeddings)
    unused = 400 - model.config.vocab_size
    assert planned["parameters"] == sum(p.numel() for p in model.parameters()) + unused * model.config.hidden_size
    series = losses(events_of(Path(st["dir"])), "pretrain")
    assert len(series) == 6 and all(torch.isfinite(torch.tensor(v)) for _, v in series)
    assert series[-1][1] < series[0][1]
