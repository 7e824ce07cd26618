"""Training and merging on a tiny random model of each family llmforge supports beyond Llama: Qwen2, Qwen3,
Gemma 2, Gemma 3 (text), Phi-3, Qwen3-MoE and Mixtral, built by transformers from a config (2 layers, hidden
size 64) with a byte-level BPE tokenizer trained on the spot, and run through the real pipeline (forge.toml,
the runner, TRL, PEFT, the merge engine).

What is asserted: LoRA SFT adapts the modules `lora.target_modules = "all-linear"` means for that family
(fused projections, MoE experts and router included), its loss falls and the merged model loads in
transformers with the adapter's logits; full SFT, DPO and continued pretraining run and their outputs load;
every merge of two fine-tunes of one base loads, with finite logits that differ from both inputs.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from llmforge.testing import ForgeProject, llmforge_tokenizer_dir  # noqa: F401 - fixture used by name
from training_data import write_data

FAMILIES = ["qwen2", "qwen3", "gemma2", "gemma3", "phi3", "qwen3_moe", "mixtral"]
MOE = {"qwen3_moe", "mixtral"}


def family_config(family: str, tokenizer):
    """A tiny config of `family` (2 layers, hidden 64, 4 query / 2 key-value heads) for `tokenizer`'s vocabulary."""
    from transformers import AutoConfig

    ids = dict(
        vocab_size=len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id,
    )
    dims = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        **ids,
    )
    extra: dict = {
        "qwen2": dict(tie_word_embeddings=False),
        "qwen3": dict(head_dim=16, tie_word_embeddings=True),
        # Gemma: tied embeddings and soft-capping as released; a window shorter than the samples so that the
        # sliding-window layers really slide.
        "gemma2": dict(head_dim=16, sliding_window=16, query_pre_attn_scalar=16),
        "gemma3_text": dict(head_dim=16, sliding_window=16, query_pre_attn_scalar=16),
        "phi3": dict(),
        "qwen3_moe": dict(head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
        "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    }
    model_type = "gemma3_text" if family == "gemma3" else family
    return AutoConfig.for_model(model_type, **dims, **extra[model_type])


_built: dict[str, Path] = {}


@pytest.fixture(scope="session")
def family_dir(tmp_path_factory, llmforge_tokenizer_dir):  # noqa: F811 - the fixture imported above
    """family name -> a folder with a tiny random model of that family and the test tokenizer (built once)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def get(family: str) -> Path:
        if family not in _built:
            tokenizer = AutoTokenizer.from_pretrained(llmforge_tokenizer_dir)
            config = family_config(family, tokenizer)
            with torch.random.fork_rng():
                torch.manual_seed(0)
                model = AutoModelForCausalLM.from_config(config)
            out = tmp_path_factory.mktemp(f"family-{family}")
            model.save_pretrained(out)
            tokenizer.save_pretrained(out)
            _built[family] = out
        return _built[family]

    return get


def project_for(tmp_path: Path) -> ForgeProject:
    project = ForgeProject(tmp_path / "project")
    write_data(project.root)
    return project


def losses(run, stage: str, key: str = "loss") -> list[float]:
    return [m[key] for m in run.metrics(stage) if key in m]


def falls(series: list[float]) -> None:
    assert len(series) >= 3, series
    assert series[-1] < series[0] * 0.9, f"loss did not fall: {series}"


def load(path: Path):
    """The model in a folder, loaded by transformers, which must find every weight it expects there and no
    other (a weight it misses is initialised at random, and the model would still "load")."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(str(path), output_loading_info=True)
    for what in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        assert not info.get(what), f"{path}: {what}: {info[what]}"
    return model


def logits(path: Path, ids):
    import torch

    with torch.no_grad():
        return load(path)(input_ids=ids).logits


SFT_LORA = """
[[stages]]
name = "sft"
uses = "sft"
model = "{model}"
data = {{ path = "data/chat.jsonl" }}
max_steps = {steps}
max_length = 64
micro_batch_size = 8
learning_rate = 1e-2
log_every = 2
lora = {{ enabled = true, r = 8, alpha = 16 }}
merge = true
"""

DENSE = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
#: What "all-linear" adapts in each family, as the stage logs it: Phi-3's fused projections fused; for MoE,
#: the router (`gate`) and the experts' fused 3-D weights through PEFT's target_parameters.
ADAPTED = {
    "qwen2": DENSE,
    "qwen3": DENSE,
    "gemma2": DENSE,
    "gemma3": DENSE,
    "phi3": ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"],
    "qwen3_moe": ["experts.down_proj", "experts.gate_up_proj", "gate", "k_proj", "o_proj", "q_proj", "v_proj"],
    "mixtral": ["experts.down_proj", "experts.gate_up_proj", "gate", "k_proj", "o_proj", "q_proj", "v_proj"],
}


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_sft_adapts_all_linear_and_merges(family, family_dir, tmp_path):
    """LoRA SFT with merge = true: "all-linear" adapts the family's projections (fused ones, experts and
    router included), every adapter matrix trained, the loss fell, and the merged model loads in
    transformers with the logits of the base plus the adapter as PEFT applies it."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file

    base = family_dir(family)
    project = project_for(tmp_path)
    project.write(SFT_LORA.format(model=base, steps=16))
    run = project.run()
    assert run.exit_code == 0, run.failure()
    falls(losses(run, "sft"))
    assert f"LoRA adapts: {', '.join(ADAPTED[family])}" in run.messages("sft")
    if family in MOE:  # PEFT's parameter wrapper has no dropout: the stage says it trained without
        assert any("lora.dropout = 0.05 not applied" in m for m in run.messages("sft", "warning"))
    adapter = run.artifact("sft", "adapter")
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    lora_b = {n: t for n, t in weights.items() if "lora_B" in n}
    assert lora_b and all(t.abs().max() > 0 for t in lora_b.values()), "an adapter matrix still at its zero init"
    ids = torch.tensor([[5, 17, 42, 99, 7, 250, 3]])
    got, before = logits(run.artifact("sft", "model"), ids), logits(base, ids)
    assert torch.isfinite(got).all()
    assert (got - before).abs().max() > 1e-3
    with torch.no_grad():
        peft = PeftModel.from_pretrained(load(base), str(adapter))(input_ids=ids).logits
    torch.testing.assert_close(got, peft, atol=1e-4, rtol=1e-4)


FULL_SFT = """
[[stages]]
name = "{name}"
uses = "sft"
model = "{model}"
data = {{ path = "data/chat.jsonl" }}
max_steps = {steps}
max_length = 64
micro_batch_size = 8
learning_rate = {lr}
seed = {seed}
log_every = 2
"""

MERGES = """
[[stages]]
name = "linear"
uses = "merge"
method = "linear"
models = [{{ model = "@a", parameters = {{ weight = 0.6 }} }}, {{ model = "@b", parameters = {{ weight = 0.4 }} }}]

[[stages]]
name = "slerp"
uses = "merge"
method = "slerp"
base = "@a"
models = [{{ model = "@b" }}]
parameters = {{ t = 0.5 }}

[[stages]]
name = "ties"
uses = "merge"
method = "ties"
base = "{model}"
models = [{{ model = "@a" }}, {{ model = "@b" }}]
parameters = {{ density = 0.5, weight = 1.0 }}
"""


@pytest.mark.parametrize("family", FAMILIES)
def test_full_sft_then_merges_of_two_fine_tunes(family, family_dir, tmp_path):
    """Two full fine-tunes of one base (different seeds and rates), then linear, SLERP and TIES merges of them:
    the fine-tunes' loss falls, and every merge loads in transformers with finite logits that differ from
    each input's."""
    import torch

    base = family_dir(family)
    project = project_for(tmp_path)
    project.write(
        FULL_SFT.format(name="a", model=base, steps=12, lr=3e-3, seed=1)
        + FULL_SFT.format(name="b", model=base, steps=12, lr=2e-3, seed=2)
        + MERGES.format(model=base)
    )
    run = project.run()
    assert run.exit_code == 0, run.failure()
    falls(losses(run, "a"))
    ids = torch.tensor([[5, 17, 42, 99, 7, 250, 3]])
    inputs = {"base": logits(base, ids), "a": logits(run.artifact("a", "model"), ids)}
    inputs["b"] = logits(run.artifact("b", "model"), ids)
    # The linear merge, weight by weight as transformers holds them (MoE experts fused into 3-D tensors,
    # Phi-3's fused projections, Gemma's tied head): 0.6·a + 0.4·b.
    a, b = (load(run.artifact(n, "model")).state_dict() for n in ("a", "b"))
    for name, tensor in load(run.artifact("linear", "model")).state_dict().items():
        torch.testing.assert_close(tensor, 0.6 * a[name] + 0.4 * b[name], msg=name)
    for method in ("linear", "slerp", "ties"):
        got = logits(run.artifact(method, "model"), ids)
        assert torch.isfinite(got).all(), method
        for name, other in inputs.items():
            assert (got - other).abs().max() > 1e-4, f"{method} merge equals {name}"
