"""Pieces of the training loop on their own: Lion, the SFT stage's packed batches, precision, profiling."""

from __future__ import annotations

import json

import pytest
import torch


def test_lion_step_matches_its_definition():
    from llmforge_plugins.training.lion import Lion

    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    opt = Lion([p], lr=0.1, betas=(0.9, 0.99), weight_decay=0.01)
    m = torch.zeros(3)
    expected = p.detach().clone()
    for grad in (torch.tensor([0.3, -0.1, 0.0]), torch.tensor([-0.2, -0.4, 0.7])):
        p.grad = grad.clone()
        opt.step()
        # by hand: decoupled decay, sign of the beta1 interpolation, then the beta2 momentum update
        expected = expected * (1 - 0.1 * 0.01)
        expected = expected - 0.1 * torch.sign(0.9 * m + 0.1 * grad)
        m = 0.99 * m + 0.01 * grad
        assert torch.allclose(p.detach(), expected, atol=1e-7)
    assert torch.allclose(opt.state[p]["exp_avg"], m)


def _sft_trainer_on_chat_rows(tmp_path, tokenizer_dir, packing: bool):
    """llmforge's own SFT path, short of training: the stage's tokenization (chatml, loss on the
    assistant turns), its options and `factory.build_trainer(factory.SFT, ...)`, on a tiny Llama. Returns
    the trainer, the tokenized rows and the model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmforge.chat import resolve_template
    from llmforge.data import DataOptions, load_data
    from llmforge.stage import StageContext
    from llmforge.testing import load_test_registry
    from llmforge_plugins.sft import SftOptions
    from llmforge_plugins.training import factory, models, tokenized

    words = [
        "the",
        "capital",
        "of",
        "Land3",
        "is",
        "Town3",
        "and",
        "the",
        "flag",
        "is",
        "red",
        "while",
        "rivers",
        "run",
        "past",
        "old",
        "mills",
    ]
    with open(tmp_path / "chat.jsonl", "w") as f:
        for i in range(12):  # answers of very different lengths, so packing has something to do
            answer = " ".join(words[: 2 + (5 * i) % len(words)])
            f.write(
                json.dumps(
                    {
                        "messages": [
                            {"role": "user", "content": f"What is the capital of Land{i}?"},
                            {"role": "assistant", "content": answer},
                        ]
                    }
                )
                + "\n"
            )
    tok = models.load_tokenizer(tokenizer_dir)
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            attn_implementation="sdpa",
        )
    )
    registry = load_test_registry()
    template = resolve_template("chatml", registry.chat_templates, tok)
    models.prepare_tokenizer(model, tok, template)
    ds = load_data(
        DataOptions(path=str(tmp_path / "chat.jsonl")), registry.readers, registry.row_formats, expect=("chat",)
    )
    rows = tokenized.tokenize(ds.rows, "chat", tok, template, max_length=64, train_on="assistant").rows
    opts = SftOptions(
        model=str(tokenizer_dir),
        data=DataOptions(path="chat.jsonl"),
        packing=packing,
        micro_batch_size=6,
        max_length=64,
        max_steps=1,
        precision="fp32",
        eval_split=0.0,
    )
    ctx = StageContext(
        stage_name="sft",
        run_id="t",
        run_dir=tmp_path / "run",
        stage_dir=tmp_path / "run" / "sft",
        inputs={},
        emit=lambda *a, **k: None,
        stop_check=lambda: False,
        checkpoint_check=lambda: False,
        project_dir=tmp_path,
    )
    training = factory.build_trainer(
        factory.SFT, ctx=ctx, opts=opts, model=model, tokenizer=tok, train_rows=rows, eval_rows=None
    )
    return training.trainer, rows, model


def test_sft_stage_packs_each_sample_whole_with_its_own_positions_and_loss(tmp_path, tokenizer_dir):
    """A batch as llmforge's SFT stage builds it (TRL's best-fit packing, padding-free): every packed
    sample is one of the tokenized rows, whole, with position ids restarting at 0 and its own loss mask;
    and the trainer's loss on the packed batch equals the loss of the same samples run one by one."""
    trainer, rows, model = _sft_trainer_on_chat_rows(tmp_path, tokenizer_dir, packing=True)
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch  # one row, no padding
    pos, ids, labels = batch["position_ids"][0], batch["input_ids"][0], batch["labels"][0]
    starts = (pos == 0).nonzero().flatten().tolist()
    assert len(starts) == 6, starts  # micro_batch_size samples packed into one row
    by_ids = {tuple(r["input_ids"]): r for r in rows}
    ends = starts[1:] + [len(ids)]
    samples = []
    for a, b in zip(starts, ends):
        seg = tuple(ids[a:b].tolist())
        assert seg in by_ids, "a packed sample is not one whole tokenized row"
        assert pos[a:b].tolist() == list(range(b - a))  # positions restart for every sample
        row = by_ids[seg]
        # the row's loss mask, except the first token, which must not be predicted from the previous sample
        assert labels[a].item() == -100 and labels[a + 1 : b].tolist() == row["labels"][1:]
        samples.append(row)
    assert len({len(r["input_ids"]) for r in samples}) > 1  # samples of different lengths were packed

    model.eval()
    with torch.no_grad():
        packed_loss = trainer.compute_loss(model, {k: v for k, v in batch.items()})
        total, count = 0.0, 0
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
        for (a, b), row in zip(zip(starts, ends), samples):
            one = torch.tensor([row["input_ids"]])
            out = model(input_ids=one, labels=torch.tensor([row["labels"]]))
            n = sum(1 for x in row["labels"][1:] if x != -100)
            total, count = total + float(out.loss) * n, count + n
            # each sample's logits inside the packed row are the ones it gets alone: nothing leaks across
            assert torch.allclose(logits[a:b], out.logits[0], atol=1e-4), (a, b)
    assert float(packed_loss) == pytest.approx(total / count, rel=1e-4)


@pytest.mark.parametrize(
    "case, kw, expected",
    [
        (
            "CPU without native bf16 (AMD EPYC, AVX2)",
            dict(device="cpu", cpu_bf16_fast=False, params=135_000_000),
            "fp32",
        ),
        ("CPU with AMX, the demo's 3 M model", dict(device="cpu", cpu_bf16_fast=True, params=3_200_000), "fp32"),
        ("CPU with AMX, a tiny test model", dict(device="cpu", cpu_bf16_fast=True, params=200_000), "fp32"),
        ("CPU with AMX, size unknown", dict(device="cpu", cpu_bf16_fast=True, params=None), "fp32"),
        ("CPU with AMX, just below the threshold", dict(device="cpu", cpu_bf16_fast=True, params=19_999_999), "fp32"),
        ("CPU with AMX, at the threshold", dict(device="cpu", cpu_bf16_fast=True, params=20_000_000), "bf16"),
        ("CPU with AMX, a 135 M model", dict(device="cpu", cpu_bf16_fast=True, params=135_000_000), "bf16"),
        ("CUDA with bf16", dict(device="cuda", gpu_bf16=True, params=1_000_000), "bf16"),
        ("CUDA without bf16", dict(device="cuda", gpu_bf16=False, params=7_000_000_000), "fp16"),
        ("Apple MPS", dict(device="mps", cpu_bf16_fast=True, params=135_000_000), "fp32"),
    ],
)
def test_auto_precision_decision(case, kw, expected):
    from llmforge.precision import choose_precision

    got = choose_precision("auto", **kw)
    assert got.name == expected, case
    assert got.reason.startswith("auto: ")


@pytest.mark.parametrize("forced", ["bf16", "fp32", "fp16"])
def test_forced_precision_is_kept_whatever_the_machine(forced):
    from llmforge.precision import choose_precision

    for kw in (
        dict(device="cpu", cpu_bf16_fast=False, params=1000),
        dict(device="cpu", cpu_bf16_fast=True, params=10**9),
        dict(device="cuda", gpu_bf16=True, params=10**6),
    ):
        got = choose_precision(forced, **kw)
        assert (got.name, got.reason) == (forced, "")


def test_training_loop_and_plan_take_the_same_decision():
    """The training plugin's precision.resolve_precision (what training uses) and planning.resolve_precision
    (what `llmforge plan` shows) are both llmforge.precision's decision on this machine, for a small and a
    large model."""
    from llmforge.hardware import cpu_features
    from llmforge.planning import resolve_precision as plan_precision
    from llmforge_plugins.training.precision import resolve_precision

    bf16_fast = cpu_features()["bf16_fast"]
    for params in (3_200_000, 135_000_000):
        got = resolve_precision("auto", params)
        if torch.cuda.is_available():
            assert got["bf16"] or got["fp16"]
            continue
        assert got["use_cpu"] and not got["fp16"]
        assert got["_name"] == plan_precision("auto", "cpu", False, bf16_fast, params)
        assert got["bf16"] == (bf16_fast and params >= 20_000_000)
    assert resolve_precision("fp32", 10**9)["bf16"] is False
    if not torch.cuda.is_available():
        from llmforge.errors import UsageError

        with pytest.raises(UsageError, match="fp16"):
            resolve_precision("fp16")


def test_lion_and_profiling_in_a_real_stage(project):
    """An in-process pretrain stage with optimizer = lion and profile = true: loss falls, trace written."""
    from llmforge.pipeline import load_pipeline
    from llmforge.runner import RunRequest, run_pipeline
    from llmforge.testing import load_test_registry
    from training_data import PRETRAIN, write_data

    write_data(project.root)
    project.write(
        PRETRAIN.format(steps=12) + 'optimizer = "lion"\nprofile = true\nlearning_rate = 3e-3\nprecision = "fp32"\n'
    )
    registry = load_test_registry()
    result = run_pipeline(load_pipeline(project.config, registry=registry), RunRequest(), registry=registry)
    assert result.status == "done", result.stages
    events = [json.loads(x) for x in (result.run_dir / "events.jsonl").read_text().splitlines()]
    loss = [e["values"]["loss"] for e in events if e["type"] == "metric" and "loss" in e["values"]]
    assert loss[-1] < loss[0]
    prof = [e for e in events if e["type"] == "profile"]
    assert prof and prof[0]["top"], "the profile event lists the top operators"
    stage_dir = result.run_dir / "stages" / "pretrain" / "profile"
    trace = json.loads((stage_dir / "trace.json").read_text())
    assert trace["traceEvents"]
    assert "Self CPU" in (stage_dir / "top-operators.txt").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error a machine without CUDA gets")
def test_qlora_without_cuda_is_a_clear_usage_error():
    from llmforge.errors import UsageError
    from llmforge_plugins.training.common import check_qlora
    from llmforge_plugins.training.options import LoraOptions

    check_qlora(LoraOptions(enabled=True))  # plain LoRA is fine on CPU
    with pytest.raises(UsageError, match="needs a CUDA GPU") as err:
        check_qlora(LoraOptions(enabled=True, qlora=True))
    assert err.value.exit_code == 2 and "lora.qlora = false" in err.value.hint


def _sft_project(root, template_line: str):
    from training_data import write_data

    write_data(root)
    (root / "model").mkdir(exist_ok=True)  # validation only needs the input to exist
    (root / "forge.toml").write_text(f"""
[[stages]]
name = "sft"
uses = "sft"
model = "model"
data = {{ path = "data/chat.jsonl" }}
{template_line}
""")
    return root / "forge.toml"


def test_unknown_template_name_is_a_validation_error(project):
    _sft_project(project.root, 'template = "chatlm"')
    res = project.run("validate")
    assert res.returncode == 2
    assert "stages[0].template: unknown chat template 'chatlm'; did you mean 'chatml'?" in res.stderr


def test_editing_a_jinja_template_file_changes_the_cache_key(tmp_path):
    from llmforge.pipeline import compute_keys, load_pipeline
    from llmforge.testing import load_test_registry

    cfg = _sft_project(tmp_path, 'template = "my.jinja"')
    (tmp_path / "my.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    registry = load_test_registry()
    before = compute_keys(load_pipeline(cfg, registry=registry), registry)["sft"]
    assert compute_keys(load_pipeline(cfg, registry=registry), registry)["sft"] == before
    (tmp_path / "my.jinja").write_text("{% for m in messages %}[{{ m.role }}] {{ m.content }}{% endfor %}")
    assert compute_keys(load_pipeline(cfg, registry=registry), registry)["sft"] != before
