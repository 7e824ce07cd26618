"""DeepSpeed configs from [backend.deepspeed]: generated for ZeRO 0-3 with offload and ZeRO++, accepted by
DeepSpeed's own parser (real deepspeed, on CPU), filled by the HF Trainer's own "auto" logic, and every
unsupported combination or bad user file refused with the key or file named."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from llmforge.errors import UsageError
from llmforge_plugins.backends.dsconfig import (
    build_deepspeed_config,
    load_user_config,
    parse_deepspeed_config,
    validate_deepspeed_config,
)

# The real parser is the point of these tests (deepspeed is in the `test` extra).
pytest.importorskip("deepspeed")


def ds(**settings) -> SimpleNamespace:
    """A [backend.deepspeed] section: the given keys, the rest left to the contract's defaults."""
    return SimpleNamespace(**settings)


def test_module_imports_neither_deepspeed_nor_torch():
    code = (
        "import sys, llmforge_plugins.backends.dsconfig\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'deepspeed', 'torch', 'transformers'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_each_zero_stage_is_generated_and_accepted(stage):
    config = build_deepspeed_config(ds(zero_stage=stage), precision="bf16")
    assert config["train_micro_batch_size_per_gpu"] == config["gradient_accumulation_steps"] == "auto"
    assert config["train_batch_size"] == config["gradient_clipping"] == "auto"
    parsed = parse_deepspeed_config(config, micro_batch=4, grad_accum=2, world_size=2)
    assert parsed.zero_config.stage == stage
    assert parsed.zero_enabled is (stage > 0)
    # the batch layout of a 2-process launch, not DeepSpeed's single-process fallback
    assert parsed.world_size == 2
    assert (parsed.train_micro_batch_size_per_gpu, parsed.gradient_accumulation_steps, parsed.train_batch_size) == (
        4,
        2,
        16,
    )
    assert parsed.bfloat16_config.enabled and not parsed.float16_config.enabled
    if stage >= 1:
        assert parsed.zero_config.overlap_comm and parsed.zero_config.contiguous_gradients
    # ZeRO-3 must gather the shards on save, or the model artifact is an empty shell
    assert parsed.zero_config.gather_16bit_weights_on_model_save is (stage == 3)
    assert "optimizer" not in config  # without offload the Trainer's own optimizer is kept
    validate_deepspeed_config(config, micro_batch=4, grad_accum=2, world_size=2)


def test_zero3_with_cpu_offload_and_zero_plus_plus_is_accepted():
    config = build_deepspeed_config(
        ds(
            zero_stage=3,
            offload_optimizer="cpu",
            offload_params="cpu",
            zero_quantized_weights=True,
            zero_quantized_gradients=True,
            zero_hpz_partition_size=2,
        ),
        precision="fp16",
    )
    parsed = parse_deepspeed_config(config, micro_batch=2, grad_accum=4, world_size=4)
    zero = parsed.zero_config
    assert zero.stage == 3
    assert zero.offload_param.device == "cpu" and zero.offload_optimizer.device == "cpu"
    assert zero.zero_quantized_weights and zero.zero_quantized_gradients
    assert zero.zero_hpz_partition_size == 2
    assert parsed.float16_config.enabled and not parsed.bfloat16_config.enabled
    # optimizer offload brings DeepSpeed's CPU AdamW, its hyper-parameters left to the Trainer
    assert parsed.optimizer_name == "adamw"
    assert config["optimizer"]["params"]["lr"] == "auto"
    assert parsed.train_batch_size == 2 * 4 * 4


def test_nvme_offload_at_stage_3_carries_the_path(tmp_path):
    config = build_deepspeed_config(
        ds(zero_stage=3, offload_optimizer="nvme", offload_params="nvme", nvme_path=str(tmp_path)), precision="bf16"
    )
    zero = parse_deepspeed_config(config, micro_batch=1, grad_accum=1, world_size=1).zero_config
    assert zero.offload_optimizer.device == zero.offload_param.device == "nvme"
    assert Path(zero.offload_optimizer.nvme_path) == Path(zero.offload_param.nvme_path) == tmp_path


@pytest.mark.parametrize("stage", [1, 2])
def test_optimizer_offload_to_cpu_below_stage_3(stage):
    config = build_deepspeed_config(ds(zero_stage=stage, offload_optimizer="cpu"), precision="bf16")
    parsed = parse_deepspeed_config(config, micro_batch=1, grad_accum=1, world_size=1)
    assert parsed.zero_config.offload_optimizer.device == "cpu"
    assert parsed.zero_config.offload_param is None


@pytest.mark.parametrize("precision,bf16,fp16", [("bf16", True, False), ("fp16", False, True), ("fp32", False, False)])
def test_precision_sections(precision, bf16, fp16):
    config = build_deepspeed_config(ds(zero_stage=2), precision=precision)
    parsed = parse_deepspeed_config(config, micro_batch=1, grad_accum=1, world_size=1)
    assert parsed.bfloat16_config.enabled is bf16
    assert parsed.float16_config.enabled is fp16


@pytest.mark.parametrize(
    "settings,key",
    [
        (dict(zero_stage=3, offload_params="nvme"), "backend.deepspeed.nvme_path"),
        (dict(zero_stage=3, offload_optimizer="nvme", nvme_path=""), "backend.deepspeed.nvme_path"),
        (dict(zero_stage=2, zero_quantized_weights=True), "backend.deepspeed.zero_quantized_weights"),
        (dict(zero_stage=2, zero_quantized_gradients=True), "backend.deepspeed.zero_quantized_gradients"),
        (dict(zero_stage=1, zero_hpz_partition_size=8), "backend.deepspeed.zero_hpz_partition_size"),
        (dict(zero_stage=3, zero_hpz_partition_size=0), "backend.deepspeed.zero_hpz_partition_size"),
        (dict(zero_stage=2, offload_params="cpu"), "backend.deepspeed.offload_params"),
        (dict(zero_stage=0, offload_optimizer="cpu"), "backend.deepspeed.offload_optimizer"),
        (dict(zero_stage=2, offload_optimizer="nvme", nvme_path="/nvme"), "backend.deepspeed.offload_optimizer"),
        (dict(zero_stage=3, offload_optimizer="gpu"), "backend.deepspeed.offload_optimizer"),
        (dict(zero_stage=4), "backend.deepspeed.zero_stage"),
    ],
)
def test_unsupported_combinations_name_the_key(settings, key):
    with pytest.raises(UsageError) as err:
        build_deepspeed_config(ds(**settings), precision="bf16")
    assert err.value.message.startswith(key + ":"), err.value.message


def test_generated_autos_are_exactly_what_the_hf_trainer_fills(tmp_path):
    """The HF Trainer's own fill (TrainingArguments + a model) leaves no "auto" behind, and its result
    parses like ours."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig, unset_hf_deepspeed_config

    config = build_deepspeed_config(ds(zero_stage=3, offload_optimizer="cpu", offload_params="cpu"), precision="fp32")
    args = TrainingArguments(
        output_dir=str(tmp_path),
        use_cpu=True,
        per_device_train_batch_size=3,
        gradient_accumulation_steps=2,
        learning_rate=5e-4,
        max_grad_norm=0.5,
        weight_decay=0.1,
        report_to="none",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            intermediate_size=64,
            vocab_size=64,
        )
    )
    try:
        hf = HfTrainerDeepSpeedConfig(json.loads(json.dumps(config)))
        hf.trainer_config_process(args)
        hf.trainer_config_finalize(args, model, num_training_steps=10)
        filled = hf.config
    finally:
        unset_hf_deepspeed_config()  # the Trainer's global "ZeRO-3 is on" flag must not leak into other tests
    assert "auto" not in json.dumps(filled)
    assert filled["zero_optimization"]["reduce_bucket_size"] == 32 * 32
    assert filled["gradient_clipping"] == 0.5 and filled["optimizer"]["params"]["lr"] == 5e-4
    parsed = parse_deepspeed_config(filled, micro_batch=3, grad_accum=2, world_size=1)
    assert parsed.train_batch_size == 6 and parsed.zero_config.stage == 3


HF_STYLE = {
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "bf16": {"enabled": "auto"},
    "zero_optimization": {
        "stage": 3,
        "offload_param": {"device": "cpu", "pin_memory": True},
        "overlap_comm": True,
        "reduce_bucket_size": "auto",
        "stage3_prefetch_bucket_size": "auto",
        "stage3_param_persistence_threshold": "auto",
        "stage3_gather_16bit_weights_on_model_save": True,
    },
}


def test_a_user_file_is_loaded_and_validated(tmp_path):
    path = tmp_path / "ds_zero3.json"
    path.write_text(json.dumps(HF_STYLE, indent=2))
    config = load_user_config(path)
    assert config == HF_STYLE
    validate_deepspeed_config(config, micro_batch=2, grad_accum=1, world_size=2, source=path)
    parsed = parse_deepspeed_config(config, micro_batch=2, grad_accum=1, world_size=2, source=path)
    assert parsed.zero_config.stage == 3 and parsed.zero_config.offload_param.device == "cpu"
    assert parsed.train_batch_size == 4
    assert config["train_batch_size"] == "auto", "validation fills a copy, never the caller's dict"


def test_a_user_file_with_a_syntax_error_names_file_line_and_column(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text('{\n  "zero_optimization": {\n    "stage": 2,\n  }\n}\n')  # trailing comma
    with pytest.raises(UsageError) as err:
        load_user_config(path)
    assert err.value.message.startswith(f"{path}:4:3: invalid JSON"), err.value.message


@pytest.mark.parametrize(
    "text,what",
    [
        ("[1, 2]", "an array"),
        ('{"zero_optimization": {"stage": 2, "stage": 3}}', "'stage' appears twice"),
    ],
)
def test_a_user_file_that_is_not_one_config_object_is_refused(tmp_path, text, what):
    path = tmp_path / "ds.json"
    path.write_text(text)
    with pytest.raises(UsageError) as err:
        load_user_config(path)
    assert str(path) in err.value.message and what in err.value.message


def test_a_missing_user_file_is_named(tmp_path):
    with pytest.raises(UsageError) as err:
        load_user_config(tmp_path / "nope.json")
    assert str(tmp_path / "nope.json") in err.value.message and "not found" in err.value.message


@pytest.mark.parametrize(
    "change,key",
    [
        ({"zero_optimization": {"stage": -1}}, "zero_optimization.stage"),
        (
            {"zero_optimization": {"stage": 3, "offload_param": {"device": "gpu"}}},
            "zero_optimization.offload_param.device",
        ),
        ({"zero_optimization": {"stage": 3, "bucket_size": 5}}, "zero_optimization.bucket_size"),
        ({"bf16": {"enabled": "maybe"}}, "bf16.enabled"),
        ({"bf16": {"enabled": True}, "fp16": {"enabled": True}}, "fp16.enabled"),
        ({"zero_optimization": 3}, "zero_optimization"),
    ],
)
def test_values_deepspeed_rejects_are_named_with_the_file(tmp_path, change, key):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({**HF_STYLE, **change}))
    with pytest.raises(UsageError) as err:
        validate_deepspeed_config(load_user_config(path), micro_batch=2, grad_accum=1, world_size=1, source=path)
    assert err.value.message.startswith(f"{path}: {key}:"), err.value.message


def test_fixed_batch_sizes_must_match_the_launch():
    config = {**HF_STYLE, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2, "train_batch_size": 32}
    parsed = parse_deepspeed_config(config, micro_batch=4, grad_accum=2, world_size=4)
    assert parsed.train_batch_size == 32
    with pytest.raises(UsageError) as err:  # the same file on 2 processes: the Trainer would refuse it
        validate_deepspeed_config(config, micro_batch=4, grad_accum=2, world_size=2)
    assert err.value.message.startswith("DeepSpeed config: train_batch_size: 32 differs from 16")
    with pytest.raises(UsageError) as err:
        validate_deepspeed_config(config, micro_batch=2, grad_accum=2, world_size=4)
    assert err.value.message.startswith("DeepSpeed config: train_micro_batch_size_per_gpu: 4 differs from 2")


def test_a_config_without_batch_keys_is_refused_with_the_fix():
    config = {"zero_optimization": {"stage": 2}}
    with pytest.raises(UsageError) as err:
        validate_deepspeed_config(config, micro_batch=2, grad_accum=1, world_size=1)
    assert "train_micro_batch_size_per_gpu: missing" in err.value.message
    assert '"auto"' in err.value.hint


def test_hpz_partition_must_divide_the_processes():
    config = build_deepspeed_config(ds(zero_stage=3, zero_hpz_partition_size=4), precision="bf16")
    parse_deepspeed_config(config, micro_batch=1, grad_accum=1, world_size=8)
    with pytest.raises(UsageError) as err:
        validate_deepspeed_config(config, micro_batch=1, grad_accum=1, world_size=6)
    assert "zero_optimization.zero_hpz_partition_size: 4 does not divide the 6 processes" in err.value.message


def test_without_deepspeed_the_error_says_how_to_install(monkeypatch):
    # Python's own way of making a module unimportable: a None entry in sys.modules.
    for name in [m for m in sys.modules if m == "deepspeed" or m.startswith("deepspeed.")] + ["deepspeed"]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(UsageError) as err:
        validate_deepspeed_config(
            build_deepspeed_config(ds(), precision="bf16"), micro_batch=1, grad_accum=1, world_size=1
        )
    assert "not installed" in err.value.message
    assert err.value.hint == "pip install 'llmforge[deepspeed]'"
