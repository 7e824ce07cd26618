"""Models and tokenizers: size presets, a BPE tokenizer trained on the corpus, loading a model (or
a base plus adapter) safely, and saving a complete HF directory that carries the chat template."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from llmforge.errors import DataError, UsageError
from llmforge_plugins.training.presets import PRESETS  # noqa: F401 - the stage's sizes (its plan reads them too)


def train_tokenizer(texts, vocab_size: int, template, min_frequency: int = 2):
    """A byte-level BPE tokenizer trained on `texts`, reserving the template's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from llmforge.chat import DEFAULT_PAD

    specials = list(template.required_tokens)
    if not template.pad and DEFAULT_PAD not in specials:
        specials.append(DEFAULT_PAD)
    tok = Tokenizer(models.BPE())
    # ByteLevel with the GPT-2 regex: every byte is representable (no unknown token), and llama.cpp's
    # "gpt-2" pre-tokenizer matches it.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=template.bos, eos_token=template.eos, pad_token=template.pad or DEFAULT_PAD
    )
    fast.chat_template = template.source
    return fast


def model_config(preset: str, vocab_size: int, max_length: int, overrides: dict, tokenizer):
    """The transformers config of the pretrain stage's model: its `architecture` (llama or qwen3), the size
    preset's dimensions and the `model` table's overrides."""
    from transformers import LlamaConfig, Qwen3Config

    if preset not in PRESETS:
        raise UsageError(f"unknown model size preset '{preset}' (known: {', '.join(PRESETS)})")
    dims = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
    arch = dims.pop("architecture", "llama")
    classes = {"llama": LlamaConfig, "qwen3": Qwen3Config}
    if arch not in classes:
        raise UsageError(f"unknown architecture '{arch}' (known: {', '.join(classes)})")
    if arch == "qwen3":
        # Qwen3Config defaults head_dim to 128 (Qwen3-8B's), not hidden / heads: set it, as its released
        # configs do. No sliding window and no attention biases, like every released Qwen3.
        dims.setdefault("head_dim", dims["hidden_size"] // dims["num_attention_heads"])
        dims.update(use_sliding_window=False, attention_bias=False)
    return classes[arch](
        vocab_size=vocab_size,
        max_position_embeddings=max(max_length, 128),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=dims.pop("tie_embeddings", True),
        # transformers 5 spelling (its legacy rope_theta keyword builds the same config, untyped)
        rope_parameters={"rope_type": "default", "rope_theta": dims.pop("rope_theta", 10000.0)},
        **dims,
    )


def is_adapter(path: Path) -> bool:
    return (Path(path) / "adapter_config.json").exists()


def load_model(path: str | Path, trust_remote_code: bool = False, dtype=None, **kwargs):
    """An HF model directory, or a PEFT adapter directory (its base is loaded and the adapter merged).
    `kwargs` go to from_pretrained (QLoRA passes its 4-bit quantization_config here)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # events report loading; the bar would only clutter logs
    from llmforge.chatter import cover_late_handlers

    cover_late_handlers()  # loading logs chatter through transformers' own handler (see llmforge/chatter.py)

    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: model directory not found")
    if is_adapter(path):
        from peft import PeftModel

        base_path = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if kwargs.get("quantization_config") is not None:
            raise UsageError("QLoRA on top of an adapter: merge it first (merge = true on the stage that made it)")
        if tensor_parallel_kwargs(Path(base_path), trust_remote_code):
            raise UsageError(
                f"{path}: tensor parallelism (tp_size > 1) needs a model folder, not an adapter",
                hint="merge the adapter first (merge = true on the stage that made it)",
            )
        base = AutoModelForCausalLM.from_pretrained(base_path, trust_remote_code=trust_remote_code, dtype=dtype)
        return PeftModel.from_pretrained(base, str(path)).merge_and_unload()
    if not (path / "config.json").exists():
        raise DataError(f"{path}: not a model directory (no config.json)")
    kwargs.update(tensor_parallel_kwargs(path, trust_remote_code))
    return AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=trust_remote_code, dtype=dtype, **kwargs)


TP_ENV = "LLMFORGE_TP_SIZE"  # set by the launch worker from [backend] tp_size


def tensor_parallel_kwargs(path: Path, trust_remote_code: bool = False) -> dict:
    """from_pretrained arguments that shard the model over the launch's processes (transformers' own
    tensor parallelism: the plan the model's config declares), when [backend] tp_size > 1."""
    import os

    tp = int(os.environ.get(TP_ENV, "1") or 1)
    if tp <= 1:
        return {}
    from transformers import AutoConfig
    from transformers.distributed import DistributedConfig

    if not torch.cuda.is_available():
        # transformers shards the model on CPUs too, but accelerate trains tensor-parallel models only on GPUs.
        raise UsageError(f"tp_size = {tp} needs GPUs; this machine has none", hint="use tp_size = 1")
    config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if not getattr(config, "base_model_tp_plan", None):
        raise UsageError(
            f"{path}: tp_size = {tp}, but this model's config ({config.model_type}) declares no "
            "tensor-parallel plan (base_model_tp_plan)",
            hint="use tp_size = 1 (data parallel, or FSDP to shard it) for this model",
        )
    world = int(os.environ.get("WORLD_SIZE", "1"))
    # tp_plan="auto" is the plan of the model's config; the processes beyond one TP group shard it (FSDP2).
    return {"distributed_config": DistributedConfig(tp_plan="auto", tp_size=tp, fsdp_size=max(1, world // tp))}


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)


def prepare_tokenizer(model, tokenizer, template) -> None:
    """Make the tokenizer carry the template (tokens, EOS, pad) and grow the embeddings if it added tokens."""
    from llmforge.chat import apply_template

    added = apply_template(tokenizer, template)
    if added or len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def save_model_dir(
    model, tokenizer, out: Path, template=None, extra: dict | None = None, state_dict: dict | None = None
) -> None:
    """A complete HF directory: safetensors weights, config, tokenizer with its chat template.
    `state_dict`: the full weights when the model's own are sharded across processes (FSDP, ZeRO-3)."""
    model.config.use_cache = True  # training turned it off; generation wants it back
    model.save_pretrained(str(out), safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(str(out))
    if template is not None:
        meta = {"name": template.name, "hash": template.hash, "eos": template.eos, **(extra or {})}
        (out / "llmforge.json").write_text(json.dumps({"chat_template": meta}, indent=2))


def set_seed(seed: int) -> None:
    from transformers import set_seed as hf_set_seed

    hf_set_seed(seed)
    torch.manual_seed(seed)
