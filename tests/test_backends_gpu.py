"""The `deepspeed` backend on real GPUs: a tiny pretrain -> SFT pipeline under ZeRO-2 and ZeRO-3, in one
process and (with two or more GPUs) in two, run with `llmforge run` exactly as a user would. The run must
finish, the loss fall, the DeepSpeed JSON it ran with be stored in the run, and the saved models load in
transformers with their trained weights (under ZeRO-3 a careless save writes an empty shell).

Marked `gpu`: skipped where no CUDA device is visible (tests/conftest.py), and where deepspeed is not
installed.
"""

from __future__ import annotations

import json
import math
import socket
from pathlib import Path

import pytest

from training_data import PRETRAIN, SFT, write_data

pytestmark = pytest.mark.gpu

BACKEND = """
[backend]
type = "deepspeed"
num_processes = {nproc}
main_process_port = {port}

[backend.deepspeed]
zero_stage = {zero_stage}
"""

# One sentence of the training corpus: a model that really learned it scores far below chance.
PROBE = "The capital of Zorvia is Arkel. Arkel is a city in Zorvia."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def events_of(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines() if x.strip()]


def losses(events: list[dict], stage: str) -> list[float]:
    return [
        e["values"]["loss"]
        for e in events
        if e["type"] == "metric" and e.get("stage") == stage and "loss" in e.get("values", {})
    ]


def stored_deepspeed_configs(run_dir: Path) -> list[dict]:
    """Every DeepSpeed JSON kept in the run (the backend stores the one each stage ran with)."""
    found = []
    for path in run_dir.rglob("*.json"):
        try:
            data = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError):
            continue
        if isinstance(data, dict) and isinstance(data.get("zero_optimization"), dict):
            found.append(data)
    return found


def probe_loss(model_dir: str) -> tuple[float, int]:
    """Mean token loss of PROBE under the saved model, and its vocabulary size."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, info = AutoModelForCausalLM.from_pretrained(model_dir, output_loading_info=True)
    # every weight comes from the file: none left at a fresh initialisation, none of the wrong shape
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    assert all(p.numel() > 0 for p in model.parameters()), "a ZeRO-3 shard was saved instead of the full weight"
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok(PROBE, return_tensors="pt").input_ids
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    assert math.isfinite(loss)
    return loss, model.config.vocab_size


@pytest.mark.timeout(1500)
@pytest.mark.parametrize(
    "zero_stage,nproc",
    [(2, 1), (3, 1), (2, 2), (3, 2)],
    ids=["zero2-1proc", "zero3-1proc", "zero2-2proc", "zero3-2proc"],
)
def test_deepspeed_zero_pipeline_trains_and_saves_loadable_models(project, zero_stage, nproc):
    pytest.importorskip("deepspeed")
    import torch

    if torch.cuda.device_count() < nproc:
        pytest.skip(f"needs {nproc} GPUs, {torch.cuda.device_count()} visible")
    write_data(project.root)
    project.write(
        BACKEND.format(nproc=nproc, port=free_port(), zero_stage=zero_stage)
        + PRETRAIN.format(steps=40)
        + SFT.format(steps=30)
    )
    res = project.run("run", timeout=1400)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]

    st = json.loads(project.run("status", "--json").stdout)
    run_dir = Path(st["dir"])
    events = events_of(run_dir)
    for name in ("pretrain", "sft"):
        assert st["stages"][name]["status"] == "done", st["stages"][name]
        series = losses(events, name)
        assert len(series) >= 3, (name, series)
        assert series[-1] < series[0] * 0.9, f"{name}: loss did not fall under ZeRO-{zero_stage}: {series}"

    configs = stored_deepspeed_configs(run_dir)
    assert configs, "the DeepSpeed JSON the run used is not stored in the run"
    assert {c["zero_optimization"]["stage"] for c in configs} == {zero_stage}

    for name in ("pretrain", "sft"):
        loss, vocab = probe_loss(st["stages"][name]["artifacts"]["model"]["path"])
        # chance is ln(vocab) (~6 for the 400-token vocabulary): trained weights score well below it
        assert loss < math.log(vocab) - 1.0, f"{name}: saved model scores {loss:.2f}, chance {math.log(vocab):.2f}"
