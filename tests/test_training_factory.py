"""The trainer factory (plugins/training/factory.py): every training stage's trainer comes from
build_trainer, and the TRL arguments it produces are the ones the stages produced before the factory
existed (captured from that code on a tiny Llama: SFTTrainer's for sft and pretrain, DPOTrainer's for
dpo, with defaults and with non-default options, evaluation and LoRA)."""

from __future__ import annotations

import json

import pytest
import torch

# Values every case shares, then each case's own. Machine-dependent fields (use_cpu, bf16, fp16) are the
# precision decision's and are checked against it below.
SHARED = {
    "activation_checkpointing": False,
    "dataloader_num_workers": 0,
    "dataset_num_proc": None,
    "disable_tqdm": True,
    "gradient_accumulation_steps": 1,
    "gradient_checkpointing": False,
    "logging_steps": 5,
    "max_grad_norm": 1.0,
    "max_length": 512,
    "num_train_epochs": 1.0,
    "per_device_eval_batch_size": 4,
    "per_device_train_batch_size": 4,
    "report_to": [],
    "save_total_limit": 2,
    "warmup_steps": 0.03,
    "weight_decay": 0.0,
}
SFT_SHARED = {
    "assistant_only_loss": False,
    "completion_only_loss": None,
    "packing_strategy": "bfd",
    "shuffle_dataset": False,
}
EXPECTED = {
    "sft": {
        **SFT_SHARED,
        "data_seed": 7,
        "eval_steps": None,
        "eval_strategy": "no",
        "learning_rate": 0.0001,
        "lr_scheduler_type": "cosine",
        "max_steps": -1,
        "packing": True,
        "padding_free": True,
        "save_steps": 500,
        "save_strategy": "no",
        "seed": 7,
    },
    "sft_eval_lora": {
        **SFT_SHARED,
        "data_seed": 3,
        "do_eval": True,
        "eval_steps": 3,
        "eval_strategy": "steps",
        "learning_rate": 0.0001,
        "lr_scheduler_type": "constant_with_warmup",
        "max_steps": 9,
        "packing": False,
        "padding_free": False,
        "save_steps": 4,
        "save_strategy": "steps",
        "seed": 3,
    },
    "pretrain": {
        **SFT_SHARED,
        "data_seed": 7,
        "eval_steps": None,
        "eval_strategy": "no",
        "learning_rate": 0.001,
        "lr_scheduler_type": "cosine",
        "max_steps": -1,
        "packing": True,
        "padding_free": True,
        "save_steps": 500,
        "save_strategy": "no",
        "seed": 7,
    },
    "dpo": {
        "beta": 0.1,
        "data_seed": 7,
        "eval_steps": None,
        "eval_strategy": "no",
        "learning_rate": 5e-06,
        "loss_type": ["sigmoid"],
        "lr_scheduler_type": "cosine",
        "max_steps": -1,
        "save_steps": 500,
        "save_strategy": "no",
        "seed": 7,
    },
    "dpo_eval_lora": {
        "beta": 0.2,
        "data_seed": 7,
        "do_eval": True,
        "eval_steps": 2,
        "eval_strategy": "steps",
        "learning_rate": 5e-06,
        "loss_type": ["ipo"],
        "lr_scheduler_type": "cosine",
        "max_steps": 5,
        "save_steps": 500,
        "save_strategy": "no",
        "seed": 7,
    },
}
MACHINE = ("use_cpu", "bf16", "fp16")


def _ctx(tmp_path, name, **kw):
    from llmforge.stage import StageContext

    return StageContext(
        stage_name=name,
        run_id="t",
        run_dir=tmp_path / "run",
        stage_dir=tmp_path / "run" / name,
        inputs={},
        emit=lambda *a, **k: None,
        stop_check=lambda: False,
        checkpoint_check=lambda: False,
        project_dir=tmp_path,
        seed=7,
        **kw,
    )


def _options(case):
    from llmforge.data import DataOptions
    from llmforge_plugins.dpo import DpoOptions
    from llmforge_plugins.pretrain import PretrainOptions
    from llmforge_plugins.sft import SftOptions

    data = DataOptions(path="x.jsonl")
    return {
        "sft": lambda: SftOptions(model="m", data=data),
        "sft_eval_lora": lambda: SftOptions(
            model="m",
            data=data,
            eval_split=0.2,
            eval_every=3,
            save_every=4,
            max_steps=9,
            lr_schedule="constant",
            lora={"enabled": True},
            packing=False,
            seed=3,
        ),
        "pretrain": lambda: PretrainOptions(data=data),
        "dpo": lambda: DpoOptions(model="m", data=data),
        "dpo_eval_lora": lambda: DpoOptions(
            model="m",
            data=data,
            eval_split=0.2,
            eval_every=2,
            beta=0.2,
            loss_type="ipo",
            lora={"enabled": True},
            max_steps=5,
        ),
    }[case]()


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tokenizer_dir):
    """A tiny Llama saved as a model folder (full DPO loads its reference copy from the model's folder)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmforge_plugins.training import models

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
        )
    )
    out = tmp_path_factory.mktemp("base")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.mark.parametrize("case", list(EXPECTED))
def test_trainer_arguments_are_the_ones_the_stages_used_before_the_factory(case, tmp_path, base_dir):
    from trl import DPOConfig, SFTConfig

    from llmforge_plugins.training import factory, models
    from llmforge_plugins.training.precision import resolve_precision

    opts = _options(case)
    dpo = case.startswith("dpo")
    tok = models.load_tokenizer(base_dir)
    model = models.load_model(str(base_dir))
    if dpo:
        rows = [{"prompt": f"Capital of Land{i}?", "chosen": f"Town{i}", "rejected": "no"} for i in range(8)]
    else:
        rows = [{"input_ids": [1, 2, 3, 4], "labels": [-100, 2, 3, 4]}] * 8
    evals = rows[:2] if "eval" in case else None
    training = factory.build_trainer(
        factory.DPO if dpo else factory.SFT,
        ctx=_ctx(tmp_path, case),
        opts=opts,
        model=model,
        tokenizer=tok,
        train_rows=rows,
        eval_rows=evals,
        lora=getattr(opts, "lora", None),
    )
    got = json.loads(training.trainer.args.to_json_string())
    assert type(training.trainer).__name__ == ("ForgeDPOTrainer" if dpo else "ForgeSFTTrainer")

    expected = {**SHARED, **EXPECTED[case]}
    prec = resolve_precision(opts.precision, model.num_parameters())
    expected.update({key: prec[key] for key in MACHINE})
    assert {key: got.get(key) for key in expected} == expected
    assert got["output_dir"] == str(tmp_path / "run" / case / "work" / "checkpoints")
    # ... and nothing else was changed from TRL's defaults
    defaults = json.loads((DPOConfig if dpo else SFTConfig)(output_dir="x", use_cpu=True, bf16=False).to_json_string())
    changed = {key for key, value in got.items() if defaults.get(key) != value}
    assert changed <= set(expected) | {"output_dir"}, changed - set(expected)
    assert training.precision.startswith(prec["_name"])
    assert training.callback.trainer is training.trainer


def test_a_fresh_start_clears_old_checkpoints_in_one_process_only(tmp_path):
    """Not resumed: rank 0 deletes the checkpoints of an earlier attempt, the other ranks leave them (they
    wait for rank 0 instead); resumed: they stay for run_trainer to pick the latest complete one."""
    from llmforge_plugins.training.factory import clear_checkpoints

    folder = tmp_path / "checkpoints"
    (folder / "checkpoint-4").mkdir(parents=True)
    clear_checkpoints(_ctx(tmp_path, "s", rank=1, world_size=2), folder)
    assert (folder / "checkpoint-4").is_dir()
    clear_checkpoints(_ctx(tmp_path, "s", resume=True), folder)
    assert (folder / "checkpoint-4").is_dir()
    clear_checkpoints(_ctx(tmp_path, "s"), folder)
    assert not folder.exists()
