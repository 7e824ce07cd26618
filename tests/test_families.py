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

import json
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
        # Qwen3-MoE as released renormalises the chosen experts' weights (transformers' default does not).
        "qwen3_moe": dict(
            head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True
        ),
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


def falls(series: list[float], by: float = 0.1) -> None:
    """The last logged loss is at least `by` (a fraction) below the first."""
    assert len(series) >= 3, series
    assert series[-1] < series[0] * (1 - by), f"loss did not fall by {by:.0%}: {series}"


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
    falls(losses(run, "sft"), by=0.05)  # 16 LoRA steps take a random model's loss down 12-17% here
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


DPO = """
[[stages]]
name = "dpo"
uses = "dpo"
model = "{model}"
data = {{ path = "data/prefs.jsonl" }}
max_steps = 12
max_length = 64
micro_batch_size = 4
learning_rate = {lr}
log_every = 1
lora = {{ enabled = {lora}, r = 8, alpha = 16 }}
merge = {lora}
"""


#: LoRA DPO on every family (the reference is the base with the adapter off), and full DPO (a frozen copy as the
#: reference) on Phi-3, whose fused projections are trained whole.
DPO_CASES = [(family, True) for family in FAMILIES if family != "phi3"] + [("phi3", True), ("phi3", False)]


@pytest.mark.parametrize(("family", "lora"), DPO_CASES, ids=lambda v: {True: "lora", False: "full"}.get(v, v))
def test_dpo_raises_the_margin_and_its_model_loads(family, lora, family_dir, tmp_path):
    """DPO with LoRA (the reference is the base with the adapter off; "all-linear" adapts what it does for SFT,
    MoE experts and router included) and in full (a frozen copy): the reward margin rises (0 to 0.5-1.4 in
    12 steps here) and the model written loads in transformers with every weight found, differing from its base."""
    import torch

    base = family_dir(family)
    project = project_for(tmp_path)
    project.write(DPO.format(model=base, lora=str(lora).lower(), lr=5e-3 if lora else 5e-4))
    run = project.run()
    assert run.exit_code == 0, run.failure()
    margins = losses(run, "dpo", "rewards/margins")
    assert len(margins) >= 6
    assert sum(margins[-3:]) / 3 > max(0.0, sum(margins[:3]) / 3), margins
    if lora:
        assert f"LoRA adapts: {', '.join(ADAPTED[family])}" in run.messages("dpo")
    ids = torch.tensor([[5, 17, 42, 99, 7, 250, 3]])
    got = logits(run.artifact("dpo", "model"), ids)
    assert torch.isfinite(got).all() and (got - logits(base, ids)).abs().max() > 1e-4


CONTINUED = """
[[stages]]
name = "more"
uses = "continued_pretrain"
model = "{model}"
data = {{ path = "data/corpus.txt" }}
replay = {{ path = "data/general.txt" }}
replay_ratio = 0.3
max_steps = 16
max_length = 64
micro_batch_size = 8
learning_rate = 3e-3
log_every = 2
"""


@pytest.mark.parametrize("family", ["qwen3"])
def test_continued_pretraining_reports_forgetting(family, family_dir, tmp_path):
    project = project_for(tmp_path)
    project.write(CONTINUED.format(model=family_dir(family)))
    run = project.run()
    assert run.exit_code == 0, run.failure()
    falls(losses(run, "more"))
    report = json.loads((run.artifact("more", "report") / "forgetting.json").read_text())
    assert report["ppl_before"] > 1 and report["ppl_after"] > 1
    load(run.artifact("more", "model"))


@pytest.mark.parametrize(
    ("family", "targets", "expected"),
    [
        ("qwen3_moe", '["q_proj", "experts"]', "lora.target_modules: 'experts' is a Qwen3MoeExperts in this model"),
        ("qwen2", '["q_proj", "w1"]', "lora.target_modules: 'w1' names no module of this model (qwen2)"),
    ],
    ids=["moe-experts-container", "unknown-name"],
)
def test_lora_targets_the_model_cannot_take_are_refused_by_name(family, targets, expected, family_dir, tmp_path):
    """A target that names nothing, or the experts' container (3-D parameters, not a layer), is bad input:
    exit 2 and one message naming the option and what the model has, not PEFT's exception from the trainer."""
    project = project_for(tmp_path)
    config = SFT_LORA.format(model=family_dir(family), steps=2)
    project.write(config.replace("r = 8, alpha = 16", f"r = 8, alpha = 16, target_modules = {targets}"))
    run = project.run()
    assert run.exit_code == 2, run.failure()
    error = run.stages["sft"]["error"]
    assert expected in error, error
    assert "q_proj" in error and "all-linear" in error  # the hint: what it can name instead


def test_named_moe_targets_reach_the_router_and_experts(family_dir, tmp_path):
    """Naming the checkpoint's projections works on a fused MoE model: Mixtral's router `gate` and its
    experts' `w1`/`w3` (fused in memory as gate_up_proj) beside attention's q_proj."""
    project = project_for(tmp_path)
    config = SFT_LORA.format(model=family_dir("mixtral"), steps=2)
    project.write(
        config.replace(
            "r = 8, alpha = 16", 'r = 8, alpha = 16, dropout = 0.0, target_modules = ["q_proj", "gate", "w1", "w3"]'
        )
    )
    run = project.run()
    assert run.exit_code == 0, run.failure()
    assert "LoRA adapts: experts.gate_up_proj, gate, q_proj" in run.messages("sft")
    assert not run.messages("sft", "warning")


ADAPTER_MERGE = """
[[stages]]
name = "unfold"
uses = "merge"
method = "passthrough"
models = [{ model = "@sft" }]

[[stages]]
name = "mix"
uses = "merge"
method = "linear"
models = [{ model = "@sft", parameters = { weight = 0.5 } }, { model = "@sft.model", parameters = { weight = 0.5 } }]
"""


@pytest.mark.parametrize("family", ["phi3", "qwen3_moe", "mixtral"])
def test_the_merge_stage_applies_a_family_adapter_as_peft_does(family, family_dir, tmp_path):
    """An adapter as a merge input is applied to its base first: Phi-3's over its fused projections (B·A per
    stored tensor), an MoE adapter over the fused experts and router (PEFT's own merge, saved under the
    checkpoint's per-expert names). Either way the result equals the stage's PEFT-merged model."""
    import torch

    project = project_for(tmp_path)
    project.write(SFT_LORA.format(model=family_dir(family), steps=4) + ADAPTER_MERGE)
    run = project.run()
    assert run.exit_code == 0, run.failure()
    ids = torch.tensor([[5, 17, 42, 99, 7, 250, 3]])
    peft = logits(run.artifact("sft", "model"), ids)
    for stage in ("unfold", "mix"):
        torch.testing.assert_close(logits(run.artifact(stage, "model"), ids), peft, atol=1e-4, rtol=1e-4)


MORE_MERGES = """
[[stages]]
name = "task_arithmetic"
uses = "merge"
method = "task_arithmetic"
base = "{model}"
models = [{{ model = "@a" }}, {{ model = "@b" }}]
parameters = {{ weight = 0.7 }}

[[stages]]
name = "dare_ties"
uses = "merge"
method = "dare_ties"
base = "{model}"
models = [{{ model = "@a" }}, {{ model = "@b" }}]
parameters = {{ density = 0.6, weight = 1.0 }}

[[stages]]
name = "dare_linear"
uses = "merge"
method = "dare_linear"
base = "{model}"
models = [{{ model = "@a" }}, {{ model = "@b" }}]
parameters = {{ density = 0.6, weight = 0.5 }}

[[stages]]
name = "model_stock"
uses = "merge"
method = "model_stock"
base = "{model}"
models = [{{ model = "@a" }}, {{ model = "@b" }}]

[[stages]]
name = "passthrough"
uses = "merge"
method = "passthrough"
slices = [
  {{ sources = [{{ model = "@a", layer_range = [0, 2] }}] }},
  {{ sources = [{{ model = "@b", layer_range = [1, 2] }}] }},
]
"""


@pytest.mark.parametrize("family", ["gemma3", "phi3", "qwen3_moe"])
def test_every_other_merge_method_on_a_family(family, family_dir, tmp_path):
    """The methods beyond linear/SLERP/TIES on two fine-tunes of one base: each output loads with every
    weight found and finite logits differing from the inputs; passthrough stacks three layers out of two
    models' two (the per-layer config, Gemma's sliding/full layer types, follows)."""
    import torch

    base = family_dir(family)
    project = project_for(tmp_path)
    project.write(
        FULL_SFT.format(name="a", model=base, steps=6, lr=3e-3, seed=1)
        + FULL_SFT.format(name="b", model=base, steps=6, lr=2e-3, seed=2)
        + MORE_MERGES.format(model=base)
    )
    run = project.run()
    assert run.exit_code == 0, run.failure()
    ids = torch.tensor([[5, 17, 42, 99, 7, 250, 3]])
    inputs = [logits(p, ids) for p in (base, run.artifact("a", "model"), run.artifact("b", "model"))]
    for method in ("task_arithmetic", "dare_ties", "dare_linear", "model_stock", "passthrough"):
        got = logits(run.artifact(method, "model"), ids)
        assert torch.isfinite(got).all(), method
        assert all((got - other).abs().max() > 1e-4 for other in inputs), method
    assert load(run.artifact("passthrough", "model")).config.num_hidden_layers == 3


GGUF = """
[[stages]]
name = "gguf"
uses = "gguf"
model = "@sft.model"
outtype = "f32"
max_kld = 1e-3
min_top1 = 0.98
"""


@pytest.mark.parametrize("family", FAMILIES)
def test_the_gguf_of_a_fine_tune_matches_it_in_llama_cpp(family, family_dir, tmp_path):
    """LoRA SFT, merged, then the gguf stage with its check at the export bar (F32: mean KL < 1e-3, top-1 ≥ 0.98
    against transformers): the fine-tuned weights (the LoRA-merged experts of an MoE model too) export as
    llama.cpp reads them. Skipped, with the export's own refusal, for a family the GGUF export lacks."""
    from llmforge_plugins.gguf.arch import supported

    base = family_dir(family)
    arch = json.loads((base / "config.json").read_text())["architectures"][0]
    if arch not in supported():
        pytest.skip(f"GGUF export does not support {arch} yet (supported: {', '.join(supported())})")
    project = project_for(tmp_path)
    project.write(SFT_LORA.format(model=base, steps=4) + GGUF)
    run = project.run()
    assert run.exit_code == 0, run.failure()
    assert list(run.artifact("gguf", "gguf").glob("*.gguf"))


def test_an_moe_architecture_peft_does_not_rewrite_gets_its_experts_and_router_adapted():
    """gpt-oss, whose fused experts PEFT does not map for "all-linear": the experts' 3-D weights and the router
    become parameter targets here, every one of them gets a gradient, and merging gives the adapted logits."""
    import torch
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from llmforge_plugins.training.options import LoraOptions
    from llmforge_plugins.training.targets import adapted, lora_config

    config = AutoConfig.for_model(
        "gpt_oss",
        vocab_size=300,
        hidden_size=64,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        pad_token_id=0,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
    logs: list[tuple[str, str]] = []
    peft_config = lora_config(LoraOptions(enabled=True), model, lambda m, level="info": logs.append((level, m)))
    assert logs == [
        (
            "info",
            "LoRA: the experts and router of gpt_oss adapted as parameters "
            "(experts.down_proj, experts.gate_up_proj, router.weight), with dropout 0",
        )
    ]
    peft = get_peft_model(model, peft_config)
    assert adapted(peft) == [
        "experts.down_proj",
        "experts.gate_up_proj",
        "k_proj",
        "o_proj",
        "q_proj",
        "router",
        "v_proj",
    ]
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    peft(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in peft.named_parameters() if "lora_B" in n and ".mlp." in n}
    assert len(grads) == 6 and all(g is not None and g.abs().sum() > 0 for g in grads.values()), grads.keys()
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
        adapted_logits = peft(input_ids=ids).logits
        merged_logits = peft.merge_and_unload()(input_ids=ids).logits
    torch.testing.assert_close(merged_logits, adapted_logits, atol=1e-4, rtol=1e-4)
