"""`llmforge plan` and the fit check of `llmforge run`: the arithmetic against real models, the command
on real pipelines, refusal and its override (also through a detached run and the TUI's launcher), and
the estimates against the measured peak memory of real CPU training runs."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import _env
from training_data import DPO, PRETRAIN, SFT, write_data

# Llama-2-7B's config.json (the fields the estimate reads); its weights are not needed to plan.
LLAMA2_7B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "rms_norm_eps": 1e-5,
}


def _fake_model(root: Path, config: dict = LLAMA2_7B) -> Path:
    """A model folder with only its config.json: enough to plan, not to train."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(config))
    return root


def _big_sft_project(project) -> None:
    write_data(project.root)
    _fake_model(project.root / "llama2-7b")
    project.write("""
        [[stages]]
        name = "big"
        uses = "sft"
        model = "llama2-7b"
        data = { path = "data/chat.jsonl" }
        max_steps = 1
    """)


# ----------------------------------------------------------------------------------------------
# the arithmetic, against the real libraries


@pytest.mark.parametrize(
    "cfg",
    [
        dict(
            model_type="llama",
            vocab_size=1000,
            hidden_size=256,
            num_hidden_layers=3,
            num_attention_heads=8,
            num_key_value_heads=2,
            intermediate_size=688,
            tie_word_embeddings=True,
        ),
        dict(
            model_type="llama",
            vocab_size=1000,
            hidden_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            intermediate_size=512,
            tie_word_embeddings=False,
        ),
        dict(
            model_type="qwen2",
            vocab_size=1200,
            hidden_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=320,
            tie_word_embeddings=True,
        ),
        dict(
            model_type="mistral",
            vocab_size=900,
            hidden_size=192,
            num_hidden_layers=2,
            num_attention_heads=6,
            num_key_value_heads=2,
            intermediate_size=400,
            head_dim=48,
            tie_word_embeddings=False,
        ),
    ],
)
def test_parameter_counts_match_transformers_models(cfg):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from llmforge.planning import shape_from_config

    config = AutoConfig.for_model(**cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    real = sum(p.numel() for p in model.parameters())
    assert shape_from_config(config.to_dict()).params() == real


def test_lora_parameter_count_matches_peft():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmforge.planning import shape_from_config

    config = LlamaConfig(
        vocab_size=500,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=352,
    )
    shape = shape_from_config(config.to_dict())
    for targets in ("all-linear", ["q_proj", "v_proj"]):
        model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=8, target_modules=targets, task_type="CAUSAL_LM"))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert shape.lora_params(8, targets) == trainable


@pytest.mark.parametrize("mode", ["fp32", "pure16"])
@pytest.mark.parametrize("lora", [False, True])
def test_activation_bytes_match_what_autograd_keeps(mode, lora):
    """Per decoder layer, the activation estimate against the bytes autograd really saves in a forward pass
    of transformers' Llama (torch's saved-tensor hooks), for full training and LoRA, fp32 and bf16 weights."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmforge.planning import Training, activation_bytes, shape_from_config

    def saved(layers: int) -> tuple[int, int]:
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=512,
            hidden_size=192,
            num_hidden_layers=layers,
            num_attention_heads=6,
            num_key_value_heads=2,
            intermediate_size=512,
        )
        model = LlamaForCausalLM(config)
        if mode == "pure16":
            model = model.to(torch.bfloat16)
        if lora:
            model = get_peft_model(
                model, LoraConfig(r=8, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
            )
        model.train()
        params = {p.data_ptr() for p in model.parameters()}
        kept: dict[int, int] = {}

        def pack(t):
            storage = t.untyped_storage()
            if storage.data_ptr() not in params:
                kept[storage.data_ptr()] = max(kept.get(storage.data_ptr(), 0), storage.nbytes())
            return t

        ids = torch.randint(0, 512, (2, 96))
        with (
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "pure16"),
        ):
            model(input_ids=ids, labels=ids)
        t = Training(2, 96, lora=lora, lora_r=8, lora_dropout=0.05)
        return sum(kept.values()), activation_bytes(shape_from_config(config.to_dict()), t, mode)[0]

    (m2, e2), (m4, e4) = saved(2), saved(4)
    assert (e4 - e2) == pytest.approx(m4 - m2, rel=0.05)


def test_memory_terms_follow_the_training_setup():
    from llmforge.planning import (
        Backend,
        Training,
        estimate_training,
        shape_from_config,
    )

    shape = shape_from_config(LLAMA2_7B)
    P = shape.params()
    assert 6.7e9 < P < 6.8e9  # Llama-2-7B has 6.74B parameters
    bf16 = Training(micro_batch=1, seq=2048, precision="bf16")

    full = estimate_training(shape, bf16, device="cuda")
    # 16-bit weights trained as they are: weights, gradients and AdamW's two states, 2 bytes each
    assert full.parts["weights"] == full.parts["gradients"] == 2 * P
    assert full.parts["optimizer states"] == 4 * P and "master weights (fp32)" not in full.parts
    amp = estimate_training(shape_from_config({**LLAMA2_7B, "torch_dtype": "float32"}), bf16, device="cuda")
    assert amp.parts["weights"] + amp.parts["gradients"] + amp.parts["optimizer states"] == 16 * P
    lion = estimate_training(shape, Training(1, 2048, precision="bf16", optimizer="lion"), device="cuda")
    assert lion.parts["optimizer states"] == full.parts["optimizer states"] / 2

    ckpt = estimate_training(shape, Training(1, 2048, precision="bf16", checkpointing=True), device="cuda")
    assert ckpt.parts["activations"] < full.parts["activations"] / 5
    two = estimate_training(shape, Training(2, 2048, precision="bf16"), device="cuda")
    assert two.parts["activations"] == pytest.approx(2 * full.parts["activations"], rel=0.01)

    lora = estimate_training(shape, Training(1, 2048, precision="bf16", lora=True, lora_r=16), device="cuda")
    T = shape.lora_params(16)
    assert lora.parts["gradients"] == 4 * T and lora.parts["optimizer states"] == 8 * T  # fp32 adapters
    qlora = estimate_training(
        shape, Training(1, 2048, precision="bf16", lora=True, lora_r=16, qlora=True), device="cuda"
    )
    lin = shape.linear_params()
    assert qlora.parts["weights"] == pytest.approx(lin * 0.516 + (P - lin) * 2 + 4 * T, rel=0.01)
    assert qlora.peak < lora.peak < full.peak

    dpo = estimate_training(shape, Training(1, 2048, precision="bf16", pairs=True, reference_copy=True), device="cuda")
    assert dpo.parts["reference model"] == 2 * P
    assert dpo.parts["activations"] == pytest.approx(2 * full.parts["activations"], rel=0.01)

    # Sharding over 8 processes, and offload to host RAM
    z3 = estimate_training(shape, bf16, Backend("deepspeed", procs_per_node=8, zero_stage=3), device="cuda")
    assert z3.parts["weights"] == pytest.approx(2 * P / 8) and z3.parts["gradients"] == pytest.approx(2 * P / 8)
    assert z3.parts["master weights (fp32)"] + z3.parts["optimizer states"] == pytest.approx(12 * P / 8)
    z1 = estimate_training(shape, bf16, Backend("deepspeed", procs_per_node=8, zero_stage=1), device="cuda")
    assert z1.parts["weights"] == 2 * P and z1.parts["gradients"] == 2 * P
    off = estimate_training(
        shape,
        bf16,
        Backend("deepspeed", procs_per_node=8, zero_stage=3, offload_optimizer="cpu", offload_params="cpu"),
        device="cuda",
    )
    assert "optimizer states" not in off.parts and "weights" not in off.parts
    assert off.host_parts["optimizer (offloaded)"] > 12 * P / 8
    assert off.host > 8 * (off.host_parts["optimizer (offloaded)"] + off.host_parts["weights (offloaded)"])
    fsdp = estimate_training(shape, bf16, Backend("accelerate", procs_per_node=4, fsdp=True), device="cuda")
    assert fsdp.parts["weights"] == pytest.approx(2 * P / 4) and fsdp.parts["optimizer states"] == pytest.approx(P)
    ddp = estimate_training(shape, bf16, Backend("accelerate", procs_per_node=4), device="cuda")
    assert ddp.parts["DDP gradient buckets"] == 2 * P and ddp.peak > full.peak
    # Disk: keep_last checkpoints (+1 being written) of weights and optimizer, then the model
    assert full.disk_parts["checkpoints (2+1 kept)"] == 3 * (2 * P + 4 * P) and full.disk_parts["model"] == 2 * P
    assert lora.disk_parts["adapter"] == 4 * T and lora.disk < full.disk / 50


def test_gguf_sizes_follow_bits_per_weight():
    from llmforge.planning import shape_from_config
    from llmforge_plugins.gguf.estimate import GGUF_BPW, gguf_estimate

    shape = shape_from_config(
        {**LLAMA2_7B, "vocab_size": 128256, "num_key_value_heads": 8, "intermediate_size": 14336}
    )  # Llama-3-8B's shape
    est = gguf_estimate(shape, "f16", ["Q4_K_M", "Q8_0"], check=False, imatrix=False)
    # llama-quantize's own table: Llama-3-8B is 4.58 GiB in Q4_K_M and 7.96 GiB in Q8_0
    assert est.disk_parts["Q4_K_M"] / 2**30 == pytest.approx(4.58, rel=0.01)
    assert est.disk_parts["Q8_0"] / 2**30 == pytest.approx(7.96, rel=0.01)
    assert est.disk_parts["export (F16)"] == shape.params() * 2
    assert 4.8 < GGUF_BPW["Q4_K_M"] < 5.0


# ----------------------------------------------------------------------------------------------
# the command


def test_plan_estimates_every_stage_of_a_pipeline(project):
    write_data(project.root)
    project.write(
        PRETRAIN.format(steps=2)
        + SFT.format(steps=2).replace("log_every = 2", "log_every = 2\nlora = { enabled = true, r = 8 }\nmerge = true")
        + DPO.format(steps=2)
        + """
[[stages]]
name = "gguf"
uses = "gguf"
model = "@dpo"
quantize = ["Q4_K_M"]

[[stages]]
name = "note"
uses = "shell"
command = "echo done"
"""
    )
    res = project.run("plan", "--json")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    stages = {s["stage"]: s for s in data["stages"]}
    assert list(stages) == ["pretrain", "sft", "dpo", "gguf", "note"]
    # The shape comes from the pretrain stage's preset and travels through the @references
    params = {n: stages[n]["model"]["parameters"] for n in ("pretrain", "sft", "dpo", "gguf")}
    assert len(set(params.values())) == 1 and params["pretrain"] > 0
    assert stages["pretrain"]["model"]["source"] == "pretrain: preset tiny"
    assert stages["sft"]["training"]["lora"] and stages["sft"]["training"]["lora_r"] == 8
    assert set(stages["sft"]["estimate"]["disk_parts_gib"]) == {"checkpoints (2+1 kept)", "adapter", "merged model"}
    assert stages["dpo"]["training"]["pairs"] and stages["dpo"]["training"]["lora"]
    disk = stages["gguf"]["estimate"]["disk_bytes"]
    assert disk > 0 and set(stages["gguf"]["estimate"]["disk_parts_gib"]) == {"export (F16)", "Q4_K_M"}
    assert stages["note"]["estimate"] is None and "no estimate" in stages["note"]["note"]
    for name in ("pretrain", "sft", "dpo", "gguf"):
        est = stages[name]["estimate"]
        assert stages[name]["verdict"] == "fits" and not stages[name]["problems"]
        assert est["device"] == "cpu" and 0 < est["peak_bytes"] < 2**31  # a tiny model: well under 2 GiB
    assert data["machine"]["ram_total_gib"] > 1

    pretty = project.run("plan")
    assert pretty.returncode == 0, pretty.stderr
    for text in (
        "pretrain (pretrain)",
        "sft (sft)",
        "LoRA r=8",
        "peak per process (RAM)",
        "disk: Q4_K_M",
        "note (shell): no estimate",
        "disk for the whole pipeline",
    ):
        assert text in pretty.stdout, text


def test_plan_reads_a_model_folder_and_suggests_what_fits(project):
    _big_sft_project(project)
    res = project.run("plan", "--json", "--set", "big.micro_batch_size=8", "--set", "big.max_length=2048")
    assert res.returncode == 0, res.stderr  # advice only
    st = json.loads(res.stdout)["stages"][0]
    assert st["verdict"] == "does not fit" and st["problems"]
    assert st["model"]["parameters"] == pytest.approx(6.74e9, rel=0.01)
    assert st["model"]["source"].endswith("llama2-7b/config.json")
    peak = st["estimate"]["peak_gib"]
    assert peak > st["device_limit_gib"]
    texts = [s["text"] for s in st["suggestions"]]
    assert any(t.startswith("micro_batch_size 1") for t in texts) and any("LoRA" in t for t in texts)
    for s in st["suggestions"]:
        assert s["peak_gib"] < peak and s["change"]  # each lowers the estimate and says what to set
    combined = st["suggestions"][-1]
    assert combined["text"].startswith("all of") and combined["fits"]
    assert combined["change"]["big.lora.enabled"] is True and combined["change"]["big.micro_batch_size"] == 1


def test_plan_against_a_gpu_machine_suggests_qlora_zero_and_offload(project, llmforge_registry):
    """The same stage planned for a machine with GPUs (described, not probed): per-GPU limits, host RAM."""
    from llmforge.hardware import Machine
    from llmforge.pipeline import load_pipeline
    from llmforge.planning import plan

    _big_sft_project(project)
    gpu = {
        "index": 0,
        "name": "test GPU",
        "memory_total_bytes": 24 * 2**30,
        "memory_free_bytes": 23 * 2**30,
        "compute_capability": "8.9",
        "bf16": True,
        "driver": "x",
    }
    machine = Machine(ram_total=64 * 2**30, ram_available=60 * 2**30, disk_free=10**13, gpus=[gpu, {**gpu, "index": 1}])
    pipe = load_pipeline(
        project.config,
        ["backend.type=accelerate", "backend.num_processes=2", "big.max_length=2048", "big.micro_batch_size=1"],
        registry=llmforge_registry(),
    )
    sp = plan(pipe, machine=machine).stages[0]
    assert sp.estimate.device == "cuda" and sp.training.precision == "bf16"  # auto on a bf16 GPU
    assert sp.backend.describe() == "accelerate DDP x2" and "DDP gradient buckets" in sp.estimate.parts
    assert sp.verdict == "does not fit" and "GiB of GPU memory" in sp.problems[0]
    assert sp.device_limit == 24 * 2**30
    assert sp.estimate.host_parts["loading the model"] == 2 * sp.shape.params()
    by_text = {s.text.split(":")[0].split(" (")[0]: s for s in sp.suggestions}
    qlora = by_text["QLoRA"]
    assert qlora.peak < sp.estimate.peak and qlora.change == {"big.lora.enabled": True, "big.lora.qlora": True}
    zero3 = next(s for s in sp.suggestions if s.text.startswith("DeepSpeed ZeRO-3"))
    assert zero3.change == {"backend.type": "deepspeed", "backend.deepspeed.zero_stage": 3}
    assert zero3.peak < sp.estimate.peak
    offload = next(s for s in sp.suggestions if "offloaded" in s.text)
    assert offload.change["backend.deepspeed.offload_optimizer"] == "cpu" and offload.host > 0
    assert sp.suggestions[-1].fits and sp.suggestions[-1].text.startswith("all of")


def test_a_third_party_stage_estimates_itself(project, plugin_site):
    """A plugin's stage with `Stage.estimate` shows its figures in `llmforge plan` (its model's shape read
    through @pretrain), one without shows "no estimate", and `llmforge run` refuses one that cannot fit."""
    site = plugin_site("estimate-plugin")
    write_data(project.root)
    _fake_model(project.root / "huge", {**LLAMA2_7B, "num_hidden_layers": 640})  # ~130B parameters
    project.write(
        PRETRAIN.format(steps=2)
        + """
[[stages]]
name = "score"
uses = "score"
model = "@pretrain"
batch = 16

[[stages]]
name = "quiet"
uses = "quiet"

[[stages]]
name = "huge"
uses = "score"
model = "huge"
"""
    )
    res = project.run("plan", "--json", plugins=[site])
    assert res.returncode == 0, res.stderr
    stages = {s["stage"]: s for s in json.loads(res.stdout)["stages"]}
    score, pretrain = stages["score"], stages["pretrain"]
    assert score["model"] == pretrain["model"]  # the shape the pretrain stage's preset gives, through @pretrain
    est = score["estimate"]
    assert est["peak_bytes"] == 2**29 + 4 * pretrain["model"]["parameters"] + 16 * 2**20  # the stage's own sum
    assert list(est["parts_gib"]) == ["runtime", "model (fp32)", "score buffer"]
    assert est["disk_bytes"] == 4096 and est["notes"] == ["scored one batch at a time"]
    assert score["verdict"] == "fits" and "training" not in score
    assert stages["quiet"]["estimate"] is None and stages["quiet"]["note"] == "no estimate for stage kind 'quiet'"
    assert stages["huge"]["verdict"] == "does not fit" and "GiB of RAM" in stages["huge"]["problems"][0]

    text = project.run("plan", plugins=[site])
    assert text.returncode == 0, text.stderr
    params = f"{pretrain['model']['parameters'] / 1e6:,.1f}M parameters (float32)"
    for line in (
        f"score (score): {params}",
        "  model (fp32)",
        "  score buffer",
        "disk: report",
        "note: scored one batch at a time",
        "quiet (quiet): no estimate for stage kind 'quiet'",
    ):
        assert line in text.stdout, line

    # The fit check of `llmforge run` holds a third-party stage to its own estimate, as it does a built-in
    res = project.run("run", "--stage", "huge", plugins=[site])
    assert res.returncode == 2 and "stage 'huge' cannot fit on this machine" in res.stderr, res.stderr
    assert not project.runs.exists()


@pytest.mark.parametrize("device, bf16", [("cpu", False), ("cpu", True), ("cuda", True), ("cuda", False)])
def test_plan_and_training_choose_the_same_precision(project, llmforge_registry, monkeypatch, device, bf16):
    """`precision = "auto"` as `llmforge plan` shows it (the stage's estimate, on a described machine) and as
    the training plugin sets up the Trainer (on the same device facts), for models below and above the size
    where bf16 pays off on a CPU: the one decision, llmforge.precision.choose_precision."""
    import torch

    import llmforge.hardware
    from llmforge.hardware import Machine
    from llmforge.pipeline import load_pipeline
    from llmforge.planning import plan
    from llmforge_plugins.training.precision import resolve_precision

    write_data(project.root)
    project.write(
        "".join(
            PRETRAIN.format(steps=1)
            .replace('name = "pretrain"', f'name = "{size}"')
            .replace('size = "tiny"', f'size = "{size}"')
            for size in ("tiny", "small", "smollm-135m")
        )
    )
    gpu = {
        "index": 0,
        "name": "test GPU",
        "memory_total_bytes": 80 * 2**30,
        "memory_free_bytes": 80 * 2**30,
        "compute_capability": "8.0" if bf16 else "7.0",
        "bf16": bf16,
        "driver": "x",
    }
    machine = Machine(
        ram_total=64 * 2**30,
        ram_available=60 * 2**30,
        disk_free=10**13,
        gpus=[gpu] if device == "cuda" else [],
        cpu_bf16_fast=device == "cpu" and bf16,
    )
    planned = plan(load_pipeline(project.config, registry=llmforge_registry()), machine=machine)

    # The same facts as torch and the CPU probe would report them to the training plugin.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: device == "cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    real = llmforge.hardware.cpu_features
    monkeypatch.setattr(llmforge.hardware, "cpu_features", lambda *a: {**real(*a), "bf16_fast": bf16})
    chosen = set()
    for sp in planned.stages:
        trainer = resolve_precision("auto", sp.shape.params())
        assert sp.training.precision == trainer["_name"], (sp.name, sp.shape.params())
        assert trainer["bf16"] == (trainer["_name"] == "bf16") and trainer["fp16"] == (trainer["_name"] == "fp16")
        chosen.add(trainer["_name"])
    # the cases cover each answer: fp32 and bf16 by size on a fast-bf16 CPU, bf16/fp16 by GPU
    expected = {
        ("cpu", False): {"fp32"},
        ("cpu", True): {"fp32", "bf16"},
        ("cuda", True): {"bf16"},
        ("cuda", False): {"fp16"},
    }[(device, bf16)]
    assert chosen == expected


def test_planning_imports_no_torch(project):
    write_data(project.root)
    project.write(PRETRAIN.format(steps=2) + SFT.format(steps=2))
    code = (
        "import sys; from llmforge.pipeline import load_pipeline; from llmforge.planning import plan; "
        "from llmforge.plugins import load_registry; "
        "p = plan(load_pipeline('forge.toml', registry=load_registry())); assert p.stages[1].estimate.peak > 0; "
        "print(sorted(m for m in ('torch', 'transformers', 'trl', 'peft') if m in sys.modules))"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=project.root, capture_output=True, text=True, env=_env())
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


# ----------------------------------------------------------------------------------------------
# the fit check of `llmforge run`


def test_run_refuses_a_stage_that_cannot_fit_and_the_flag_overrides(project):
    _big_sft_project(project)
    res = project.run("run")
    assert res.returncode == 2, res.stderr
    assert "stage 'big' cannot fit on this machine" in res.stderr
    assert "GiB of RAM" in res.stderr and "this machine has" in res.stderr
    assert "--no-fit-check" in res.stderr  # the hint names the override
    assert "try all of" in res.stderr and "--set big.lora.enabled=true" in res.stderr
    assert not project.runs.exists()  # refused before any run folder

    # Selecting only another stage does not check this one
    project.write(
        project.config.read_text()
        + """
[[stages]]
name = "hello"
uses = "shell"
command = "echo hello"
"""
    )
    assert project.run("run", "--stage", "hello").returncode == 0

    # With the override the stage starts, and fails for what it really lacks: the weights
    res = project.run("run", "--stage", "big", "--no-fit-check")
    assert res.returncode == 1, res.stderr
    assert "cannot fit" not in res.stderr


def test_detached_runs_and_the_tui_launcher_get_the_same_check(project):
    from llmforge.detach import Launch
    from llmforge.errors import ForgeError
    from llmforge.tui.launch import start_detached

    _big_sft_project(project)
    res = project.run("run", "--detach")
    assert res.returncode == 2 and "stage 'big' cannot fit" in res.stderr
    assert not project.runs.exists()

    # The TUI starts runs as a detached `llmforge run`: the child refuses, the launcher reports why.
    with pytest.raises(ForgeError) as err:
        start_detached(Launch(project.config), wait_s=120)
    assert "cannot fit" in str(err.value)

    # --no-fit-check reaches the detached child: it starts the stage (which fails: no weights)
    res = project.run("run", "--detach", "--no-fit-check", "--run", "forced")
    assert res.returncode == 0, res.stderr
    manifest = project.runs / "forced" / "manifest.json"
    deadline = time.time() + 120
    while time.time() < deadline:
        status = json.loads(manifest.read_text()).get("status") if manifest.exists() else None
        if status not in (None, "running"):
            break
        time.sleep(0.5)
    data = json.loads(manifest.read_text())
    assert data["stages"]["big"]["status"] == "failed", data
    log = (project.runs / "forced" / "process.log").read_text()
    assert "cannot fit" not in log


# ----------------------------------------------------------------------------------------------
# estimates against measured peak memory

# Runs one pipeline in this fresh interpreter and reports (peak RSS - RSS just before the run) next to the
# plan's estimate minus its "runtime" part. Both leave out what the process holds before the model exists:
# Python with torch, transformers, TRL, peft and datasets imported (imported here first, so that the
# baseline includes them).
MEASURE = r"""
import gc, json, sys
import psutil

def hwm():
    # this process's own high-water mark (VmHWM: the memory map's, new at exec). Not ru_maxrss: Linux carries
    # that over exec from the forked parent, so a test process grown to 2 GB hid the run's peak
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))

import datasets, peft, torch, transformers, trl  # noqa: F401
from llmforge_plugins.training import common, loop, models, tokenized  # noqa: F401
from llmforge.pipeline import load_pipeline
from llmforge.planning import plan
from llmforge.plugins import load_registry
from llmforge.runner import RunRequest, run_pipeline

registry = load_registry()
pipe = load_pipeline("forge.toml", registry=registry)
est = plan(pipe).stages[0].estimate
gc.collect()
base = psutil.Process().memory_info().rss
before = hwm()
result = run_pipeline(pipe, RunRequest(), registry=registry)
peak = hwm()
print(json.dumps({"status": result.status, "baseline": base, "peak_before": before, "measured": peak - base,
                  "estimate": est.peak - est.parts["runtime"], "parts": est.parts}))
"""


def _measure(root: Path) -> dict:
    res = subprocess.run(
        [sys.executable, "-c", MEASURE], cwd=root, capture_output=True, text=True, env=_env(), timeout=600
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["status"] == "done", out
    # The high-water mark before the run (imports) must be well below the run's, or it would hide it
    assert out["measured"] > out["peak_before"] - out["baseline"] + 256 * 2**20, out
    return out


def _synthetic_text(root: Path) -> None:
    """Text made of a few thousand made-up words: enough distinct words for a 4096-token vocabulary."""
    rng = random.Random(0)
    syl = [
        "ka",
        "lo",
        "mi",
        "ren",
        "tor",
        "vas",
        "pel",
        "qui",
        "zan",
        "dor",
        "fe",
        "gu",
        "hal",
        "jin",
        "nor",
        "ost",
        "pra",
        "sel",
        "tu",
        "wex",
        "yil",
        "bra",
        "cle",
        "dro",
        "esk",
        "fin",
        "gra",
        "hum",
    ]
    words = ["".join(rng.choice(syl) for _ in range(rng.randint(1, 4))) for _ in range(6000)]
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    with open(data / "corpus.txt", "w") as f:
        for _ in range(1500):
            f.write(" ".join(rng.choice(words) for _ in range(rng.randint(20, 60))) + ".\n\n")
    with open(data / "chat.jsonl", "w") as f:
        for _ in range(600):
            q = " ".join(rng.choice(words) for _ in range(rng.randint(5, 30)))
            a = " ".join(rng.choice(words) for _ in range(rng.randint(20, 80)))
            f.write(
                json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n"
            )


@pytest.mark.slow
def test_estimates_match_measured_peak_memory_of_cpu_runs(tmp_path):
    """Full training (pretrain, 35M parameters) and LoRA (sft on that model), 2 steps of 4 x 256 tokens in
    fp32: the estimate (without the runtime baseline) is within 25% of the measured rise of peak RSS."""
    full, lora = tmp_path / "full", tmp_path / "lora"
    _synthetic_text(full)
    (full / "forge.toml").write_text("""
[[stages]]
name = "pretrain"
uses = "pretrain"
data = { path = "data/corpus.txt" }
vocab_size = 4096
model = { size = "smollm-135m", num_hidden_layers = 10 }
max_steps = 2
max_length = 256
micro_batch_size = 4
precision = "fp32"
""")
    got = _measure(full)
    assert 30e6 < got["parts"]["weights"] / 4 < 40e6  # the model measured is a ~35M-parameter one
    assert got["estimate"] == pytest.approx(got["measured"], rel=0.25), got

    model = next(full.glob("runs/*/stages/pretrain/artifacts/model"))
    _synthetic_text(lora)
    (lora / "forge.toml").write_text(f"""
[[stages]]
name = "sft"
uses = "sft"
model = "{model}"
data = {{ path = "data/chat.jsonl" }}
max_steps = 2
max_length = 256
micro_batch_size = 4
precision = "fp32"
lora = {{ enabled = true, r = 16 }}
""")
    got = _measure(lora)
    assert got["parts"]["activations"] > got["parts"]["weights"]  # LoRA: the activations dominate
    assert got["estimate"] == pytest.approx(got["measured"], rel=0.25), got


# ----------------------------------------------------------------------------------------------
# real models' config.json files (tests/fixtures/configs: the published files, no weights)

CONFIGS = Path(__file__).parent / "fixtures" / "configs"
# Published parameter counts (model cards); MoE: (total, active).
PUBLISHED = {
    "Qwen3-0.6B": 0.6e9,
    "Qwen3-1.7B": 1.7e9,
    "Llama-3.2-1B": 1.24e9,
    "Llama-3.2-3B": 3.2e9,
    "Gemma-3-1B": 1.0e9,
    "SmolLM2-360M": 360e6,
    "Mistral-7B-v0.3": 7.25e9,
    "Phi-3-mini-4k-instruct": 3.8e9,
    "Qwen3-30B-A3B": (30.5e9, 3.3e9),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_real_configs_give_the_published_parameter_counts(name):
    """Every family's config.json read by its own keys (explicit head_dim, GQA, tied embeddings, Gemma's
    four norms and q/k norms, Phi-3's fused projections, MoE experts): the count equals the model transformers
    builds from the same file (on the meta device: no memory), and is within 2% of the published size."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from llmforge.planning import shape_from_dir

    shape = shape_from_dir(CONFIGS / name)
    total, active = PUBLISHED[name] if isinstance(PUBLISHED[name], tuple) else (PUBLISHED[name], PUBLISHED[name])
    assert shape.params() == pytest.approx(total, rel=0.02)
    assert shape.active_params() == pytest.approx(active, rel=0.02)
    assert shape.moe == (name == "Qwen3-30B-A3B")
    config = AutoConfig.for_model(**json.loads((CONFIGS / name / "config.json").read_text()))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert shape.params() == sum(p.numel() for p in model.parameters())
    assert shape.tied == config.tie_word_embeddings


@pytest.mark.parametrize(
    "cfg",
    [
        # Phi-3: the fused qkv_proj and gate_up_proj are what "all-linear" adapts
        dict(model_type="phi3", vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, intermediate_size=96, pad_token_id=0),
        # Gemma 3: explicit head_dim, q/k norms, four norms a layer
        dict(model_type="gemma3_text", vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=1, head_dim=32, intermediate_size=96),
        # Qwen3-MoE: experts are stacked parameters, not linears; one dense layer (mlp_only_layers)
        dict(model_type="qwen3_moe", vocab_size=300, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, intermediate_size=96, moe_intermediate_size=32, num_experts=4,
             num_experts_per_tok=2, mlp_only_layers=[1], tie_word_embeddings=False),
        # Gemma 2: four norms a layer, no q/k norms
        dict(model_type="gemma2", vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, intermediate_size=96),
        # Qwen2-MoE: attention biases, a shared expert and its one-output gate (both linears)
        dict(model_type="qwen2_moe", vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=48,
             num_experts=4, num_experts_per_tok=2),
        # Mixtral: every layer MoE, experts named num_local_experts
        dict(model_type="mixtral", vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, intermediate_size=96, num_local_experts=4, num_experts_per_tok=2),
    ],
    ids=["phi3", "gemma3", "qwen3_moe", "gemma2", "qwen2_moe", "mixtral"],
)  # fmt: skip
def test_family_parameter_and_lora_counts_match_transformers_and_peft(cfg):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from llmforge.planning import shape_from_config

    config = AutoConfig.for_model(**cfg)
    shape = shape_from_config(config.to_dict())
    model = AutoModelForCausalLM.from_config(config)
    assert shape.params() == sum(p.numel() for p in model.parameters())
    model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    assert shape.lora_params(4) == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_moe_weights_count_every_expert_and_activations_the_active_ones():
    """Qwen3-30B-A3B: weights, gradients and optimizer states on its 30.5B parameters; the activations of a
    micro-batch those of the 8 experts a token goes through, as a dense model of that MLP width would keep."""
    from dataclasses import replace

    from llmforge.planning import Training, activation_bytes, estimate_training, shape_from_dir

    moe = shape_from_dir(CONFIGS / "Qwen3-30B-A3B")
    full = estimate_training(moe, Training(1, 2048, precision="bf16"), device="cuda")
    assert full.parts["weights"] == full.parts["gradients"] == 2 * moe.params()
    assert full.parts["optimizer states"] == 4 * moe.params()
    dense = replace(moe, experts=0, intermediate=8 * 768)  # 8 active experts of 768 wide
    t = Training(1, 2048, precision="bf16")
    assert activation_bytes(moe, t, "pure16") == activation_bytes(dense, t, "pure16")
    assert moe.active_intermediate == 8 * 768 < moe.intermediate * 2
    # a merge restacking layers (passthrough slices) keeps a MoE model MoE: 24 of its 48 layers, half the experts
    half = replace(moe, layers=24)
    assert half.moe_layers == 24 and half.dense_layers == 0
    assert half.params() - 2 * moe.vocab * moe.hidden == pytest.approx(
        (moe.params() - 2 * moe.vocab * moe.hidden) / 2, rel=1e-3
    )


def _recipe_like_project(project, model: str, body: str) -> None:
    import shutil

    write_data(project.root)
    shutil.copytree(CONFIGS / model, project.root / "models" / model)
    project.write(f'[[stages]]\nname = "sft"\nuses = "sft"\nmodel = "models/{model}"\n' + body)


def test_plan_reports_total_and_active_parameters_of_a_moe_model(project):
    _recipe_like_project(
        project,
        "Qwen3-30B-A3B",
        'data = { path = "data/chat.jsonl" }\nmicro_batch_size = 1\nmax_length = 2048\n'
        "gradient_checkpointing = true\nlora = { enabled = true }\n",
    )
    res = project.run("plan", "--json", "--gpu", "80GB", "--ram", "256GB")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    st = data["stages"][0]
    assert st["model"]["parameters"] == pytest.approx(30.5e9, rel=0.02)
    assert st["model"]["active_parameters"] == pytest.approx(3.3e9, rel=0.02)
    assert (st["model"]["experts"], st["model"]["experts_per_tok"], st["model"]["model_type"]) == (128, 8, "qwen3_moe")
    assert data["machine"]["described"] and data["machine"]["gpus"][0]["memory_gib"] == 80.0
    assert st["estimate"]["device"] == "cuda" and st["verdict"] == "fits"  # LoRA on 61 GB of bf16 weights
    text = project.run("plan", "--gpu", "80GB", "--ram", "256GB")
    assert text.returncode == 0, text.stderr
    assert "30,532.1M parameters (bfloat16); 3,353.0M active (8 of 128 experts a token)" in text.stdout
    assert "machine (described): 256.00 GiB RAM, 1 GPU of 80.00 GiB" in text.stdout


def test_plan_for_a_described_machine(project):
    """--gpu/--ram plan for another machine than this one: the verdict follows the described memory."""
    _recipe_like_project(
        project,
        "Qwen3-0.6B",
        'data = { path = "data/chat.jsonl" }\nmicro_batch_size = 4\nmax_length = 2048\nlora = { enabled = true }\n'
        "gradient_checkpointing = true\n",
    )
    verdict = {}
    for gpu in ("4GB", "24GB"):
        res = project.run("plan", "--json", "--gpu", gpu, "--ram", "32GB")
        assert res.returncode == 0, res.stderr
        verdict[gpu] = json.loads(res.stdout)["stages"][0]
    assert verdict["4GB"]["verdict"] == "does not fit" and verdict["24GB"]["verdict"] == "fits"
    assert verdict["4GB"]["estimate"]["peak_bytes"] == verdict["24GB"]["estimate"]["peak_bytes"]
    cpu = project.run("plan", "--json", "--ram", "16GB")
    cpu_stage = json.loads(cpu.stdout)["stages"][0]
    assert cpu_stage["estimate"]["device"] == "cpu" and cpu_stage["device_limit_gib"] == 16.0
    bad = project.run("plan", "--gpu", "lots")
    assert bad.returncode == 2 and "--gpu" in bad.stderr and "Traceback" not in bad.stderr


def test_pretrain_with_a_models_tokenizer_plans_its_vocabulary_from_config_json(project):
    """A `tokenizer` folder holding only a config.json (no tokenizer.json): the plan takes the vocabulary
    from its `vocab_size`, and a qwen3 architecture counts Qwen3's q/k norms."""
    _recipe_like_project(project, "Qwen3-0.6B", "")
    project.write(
        PRETRAIN.format(steps=2).replace(
            'model = { size = "tiny" }',
            'tokenizer = "models/Qwen3-0.6B"\nmodel = { architecture = "qwen3", size = "tiny" }',
        )
    )
    res = project.run("plan", "--json")
    assert res.returncode == 0, res.stderr
    model = json.loads(res.stdout)["stages"][0]["model"]
    assert model["vocab"] == 151936 and model["model_type"] == "qwen3"
    tiny = 64 * 151936 + 2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 176 + 2 * 64 + 2 * 16) + 64
    assert model["parameters"] == tiny
