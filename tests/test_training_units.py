"""Pieces of the training loop on their own: Lion, packing without leakage, precision, profiling."""

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


def test_packed_sequences_do_not_attend_across_samples():
    """Position ids that restart per sample (what padding-free packing feeds the model) give each
    sample exactly the logits it gets alone: no attention or position leakage. This holds without a
    KV cache (transformers then builds per-sample masks), which is why training turns use_cache off."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                                         attn_implementation="sdpa"))
    model.config.use_cache = False  # as build_sft_trainer does
    a, b = torch.randint(0, 100, (1, 7)), torch.randint(0, 100, (1, 5))
    packed = torch.cat([a, b], dim=1)
    pos = torch.cat([torch.arange(7), torch.arange(5)]).unsqueeze(0)
    with torch.no_grad():  # train mode, as in training (dropout is 0 in this config)
        together = model(input_ids=packed, position_ids=pos).logits
        alone_a = model(input_ids=a).logits
        alone_b = model(input_ids=b).logits
    assert torch.allclose(together[:, :7], alone_a, atol=1e-5)
    assert torch.allclose(together[:, 7:], alone_b, atol=1e-5)


def test_auto_precision_follows_the_hardware():
    from llmforge_plugins.training.loop import cpu_supports_bf16, resolve_precision

    got = resolve_precision("auto")
    if torch.cuda.is_available():
        assert got["bf16"] or got["fp16"]
    else:
        assert got["use_cpu"] and got["bf16"] == cpu_supports_bf16() and not got["fp16"]
    assert resolve_precision("fp32")["bf16"] is False
    if not torch.cuda.is_available():
        from llmforge.errors import UsageError

        with pytest.raises(UsageError, match="fp16"):
            resolve_precision("fp16")


def test_lion_and_profiling_in_a_real_stage(project):
    """An in-process pretrain stage with optimizer = lion and profile = true: loss falls, trace written."""
    from training_data import PRETRAIN, write_data

    from llmforge.pipeline import load_pipeline
    from llmforge.runner import RunRequest, run_pipeline

    write_data(project.root)
    project.write(PRETRAIN.format(steps=12) + 'optimizer = "lion"\nprofile = true\nlearning_rate = 3e-3\n'
                  'precision = "fp32"\n')
    result = run_pipeline(load_pipeline(project.config), RunRequest())
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

    cfg = _sft_project(tmp_path, 'template = "my.jinja"')
    (tmp_path / "my.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    before = compute_keys(load_pipeline(cfg))["sft"]
    assert compute_keys(load_pipeline(cfg))["sft"] == before
    (tmp_path / "my.jinja").write_text("{% for m in messages %}[{{ m.role }}] {{ m.content }}{% endfor %}")
    assert compute_keys(load_pipeline(cfg))["sft"] != before
