"""Method `moe` (plugins/merge/moe.py): dense fine-tunes of one base become the experts of a Mixtral (from Llama) or
Qwen3-MoE (from Qwen3) model.

The inputs are real: a tiny base built by transformers from a config (2 layers, hidden 128) with a BPE tokenizer
trained here on three topics (cooking, Python code, sailing), and three fine-tunes of it, each trained a few Adam
steps (MLP only) on one topic. What is asserted: the output loads in transformers as the MoE architecture with no
weight missing or left over and finite logits; every expert computes exactly its source's MLP (top-1 routing);
tokens of the prompts given for an expert go mostly to it; random routers are seeded; the shared tensors follow
`moe.shared`; `llmforge merge -c merge.toml` writes it; bad recipes are refused by key; in a pipeline, LoRA SFT
trains the MoE further (router and experts); its GGUF gives transformers' logits in llama.cpp.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import run_cli
from llmforge.errors import ConfigError, UsageError
from llmforge.testing import ForgeProject, load_test_registry
from training_data import write_data

TOPICS = {
    "cook": [
        "Chop the onion and fry it in butter until golden.",
        "Stir the soup and add salt, pepper and fresh basil.",
        "Bake the bread in a hot oven for forty minutes.",
        "Whisk the eggs with sugar and flour for the cake.",
    ],
    "code": [
        "def add(a, b): return a + b",
        "for i in range(10): print(i)",
        "import numpy as np; x = np.zeros(3)",
        "class Stack: def push(self, item): self.items.append(item)",
    ],
    "sail": [
        "Hoist the mainsail and trim the jib to the wind.",
        "The boat heeled as the gust filled the sails.",
        "Drop the anchor in the calm bay before the storm.",
        "Tack to port and steer the hull past the buoy.",
    ],
}
#: dense family -> (MoE architecture, expert tensor of each dense projection, router module)
FAMILIES = {
    "llama": ("MixtralForCausalLM", {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}, "block_sparse_moe"),
    "qwen3": ("Qwen3MoeForCausalLM", {"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"}, "mlp"),
}


def methods():
    from llmforge.plugins import load_registry

    return load_registry(env="").table("merge_methods")


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [t for texts in TOPICS.values() for t in texts] * 5
    tok.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=["<|endoftext|>"],
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    # ChatML's markers and template, so that the MoE trains further with sft on chat rows
    chatml = load_test_registry().chat_templates["chatml"]
    tok.add_special_tokens(list(chatml.special_tokens))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=chatml.eos, pad_token=chatml.pad)
    fast.chat_template = chatml.source
    return fast


def _fine_tune(base: Path, out: Path, tokenizer, texts: list[str]) -> None:
    """A few Adam steps on the MLPs only, on one topic: a dense fine-tune whose MLP is what it is for."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base))
    for name, p in model.named_parameters():
        p.requires_grad_(".mlp." in name)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    first = None
    for _ in range(20):
        loss = model(**batch, labels=labels).loss
        first = first if first is not None else loss.item()
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < first * 0.8, (first, loss.item())
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """family -> {"base": path, "cook"/"code"/"sail": fine-tune paths}, built on first use."""
    from transformers import AutoConfig, AutoModelForCausalLM

    root = tmp_path_factory.mktemp("moe-zoo")
    tokenizer = _tokenizer()
    built: dict[str, dict[str, Path]] = {}

    def get(family: str) -> dict[str, Path]:
        if family not in built:
            extra = {"qwen3": dict(head_dim=32, tie_word_embeddings=True)}.get(family, {})
            config = AutoConfig.for_model(
                family,
                vocab_size=len(tokenizer),
                hidden_size=128,
                intermediate_size=256,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=128,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.eos_token_id,
                **extra,
            )
            with torch.random.fork_rng():
                torch.manual_seed(0)
                base = AutoModelForCausalLM.from_config(config)
                paths = {"base": root / family / "base"}
                base.save_pretrained(paths["base"])
                tokenizer.save_pretrained(paths["base"])
                for topic, texts in TOPICS.items():
                    paths[topic] = root / family / topic
                    _fine_tune(paths["base"], paths[topic], tokenizer, texts)
            built[family] = paths
        return built[family]

    return get


def recipe(paths: dict[str, Path], **extra) -> dict:
    models = [{"model": str(paths[t]), "positive_prompts": texts} for t, texts in TOPICS.items()]
    return {"method": "moe", "base": str(paths["base"]), "models": models, **extra}


def merge(out: Path, recipe: dict) -> dict:
    from llmforge_plugins.merge.engine import merge_to
    from llmforge_plugins.merge.options import MergeOptions

    summary = merge_to(MergeOptions.model_validate(recipe), out, methods())
    assert summary is not None
    return summary


def load(path: Path):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(str(path), output_loading_info=True)
    for what in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        assert not info.get(what), f"{path}: {what}: {info[what]}"
    return model.eval()


def read(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


def routed(model, tokenizer, text: str) -> list[torch.Tensor]:
    """Each layer's top-1 expert for every token of `text`."""
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model(input_ids=ids, output_router_logits=True)
    assert torch.isfinite(out.logits).all()
    return [r.argmax(-1) for r in out.router_logits]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_dense_fine_tunes_become_the_experts_of_a_moe_model(zoo, tmp_path, family):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    paths = zoo(family)
    arch, names, block = FAMILIES[family]
    out = tmp_path / "moe"
    summary = merge(out, recipe(paths, moe={"num_experts_per_tok": 1}))
    assert summary["method"] == "moe" and summary["layers"] == 2
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [arch] and config["num_experts_per_tok"] == 1
    assert config.get("num_local_experts", config.get("num_experts")) == 3
    model = load(out)
    assert type(model).__name__ == arch

    # every expert tensor is its source's MLP tensor, as stored
    tensors = read(out)
    for e, topic in enumerate(TOPICS):
        dense = read(paths[topic])
        for layer in range(2):
            for proj, expert in names.items():
                got = tensors[f"model.layers.{layer}.{block}.experts.{e}.{expert}.weight"]
                assert torch.equal(got, dense[f"model.layers.{layer}.mlp.{proj}.weight"])
    assert not any(".mlp.gate_proj" in n or ".mlp.up_proj" in n for n in tensors)

    # ... and computes it: with one expert a token, a MoE block is the MLP of the expert its router picks
    x = torch.randn(1, 24, 128, generator=torch.Generator().manual_seed(0))
    dense_models = [AutoModelForCausalLM.from_pretrained(str(paths[topic])) for topic in TOPICS]
    for layer in range(2):
        with torch.no_grad():
            got = model.model.layers[layer].mlp(x)
            got = got[0] if isinstance(got, tuple) else got
            picks = (x[0] @ tensors[f"model.layers.{layer}.{block}.gate.weight"].T).argmax(-1)
            assert len(set(picks.tolist())) > 1  # the check covers several experts
            for e, dense in enumerate(dense_models):
                want = dense.model.layers[layer].mlp(x)
                torch.testing.assert_close(got[0][picks == e], want[0][picks == e], rtol=1e-5, atol=1e-6)

    # the routers send the tokens of each expert's prompts mostly to it, in every layer
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    shares = []
    for e, texts in enumerate(TOPICS.values()):
        for layer in range(2):
            picks = torch.cat([routed(model, tokenizer, t)[layer] for t in texts])
            shares.append(float((picks == e).float().mean()))
            assert shares[-1] > 0.5, (family, e, layer, shares[-1])
    card = (out / "README.md").read_text()
    assert "## Experts" in card and "of the tokens to their own expert" in card
    print(f"{family}: share of prompt tokens routed to their expert, per expert and layer: {shares}")


def test_random_routers_are_seeded_and_shared_tensors_can_be_the_base(zoo, tmp_path):
    paths = zoo("llama")
    spec = recipe(paths, moe={"router": "random", "shared": "base", "num_experts_per_tok": 2}, seed=3)
    for m in spec["models"]:
        m.pop("positive_prompts")  # a random router needs none
    merge(tmp_path / "a", spec)
    merge(tmp_path / "b", spec)
    merge(tmp_path / "c", {**spec, "seed": 4})
    a, b, c = read(tmp_path / "a"), read(tmp_path / "b"), read(tmp_path / "c")
    router = "model.layers.1.block_sparse_moe.gate.weight"
    assert torch.equal(a[router], b[router]) and not torch.equal(a[router], c[router])
    assert 0.01 < float(a[router].std()) < 0.03  # the config's initializer_range, 0.02
    base = read(paths["base"])
    for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "lm_head.weight"):
        assert torch.equal(a[name], base[name])
    logits = load(tmp_path / "a")(input_ids=torch.tensor([[1, 2, 3, 4]])).logits
    assert torch.isfinite(logits).all()

    # `llmforge plan`'s estimate of the merge: the MoE it writes, not the dense input
    from llmforge.planning import shape_from_dir
    from llmforge_plugins.merge.estimate import estimate_merge
    from llmforge_plugins.merge.options import MergeOptions

    est = estimate_merge(MergeOptions.model_validate(spec), shape_from_dir(paths["base"]))
    written = (tmp_path / "a" / "model.safetensors").stat().st_size
    assert abs(est.disk - written) < 0.02 * written, (est.disk, written)


def test_shared_tensors_merged_by_another_method_with_its_parameters(zoo, tmp_path):
    paths = zoo("qwen3")
    spec = recipe(paths, moe={"shared": "task_arithmetic"}, parameters={"lambda": 0.5}, max_shard_size="300KB")
    assert merge(tmp_path / "moe", spec)["shards"] > 1  # sharded, with an index transformers follows
    out, base = read(tmp_path / "moe"), read(paths["base"])
    tuned = [read(paths[t]) for t in TOPICS]
    name = "model.layers.0.self_attn.q_norm.weight"  # MLP-only fine-tunes: the shared tensors are the base's
    assert torch.allclose(out[name], base[name] + 0.5 * sum(t[name] - base[name] for t in tuned))
    assert "lm_head.weight" not in out  # Qwen3's tied embeddings stay tied
    assert json.loads((tmp_path / "moe" / "config.json").read_text())["tie_word_embeddings"] is True
    load(tmp_path / "moe")


def test_lora_adapters_are_experts_too(zoo, tmp_path):
    """An expert given as a LoRA adapter (what LoRA SFT runs write) is its base plus the adapter's update."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    paths = zoo("llama")
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"], init_lora_weights=False)
    with torch.random.fork_rng():
        torch.manual_seed(1)
        peft = get_peft_model(AutoModelForCausalLM.from_pretrained(str(paths["base"])), lora)
    peft.save_pretrained(tmp_path / "adapter")
    spec = recipe(paths, moe={"router": "random"})
    spec["models"] = [{"model": str(tmp_path / "adapter")}, {"model": str(paths["code"])}]
    merge(tmp_path / "moe", spec)
    want = peft.merge_and_unload().state_dict()
    got = read(tmp_path / "moe")
    for layer in range(2):
        for proj, expert in FAMILIES["llama"][1].items():
            name = f"model.layers.{layer}.block_sparse_moe.experts.0.{expert}.weight"
            torch.testing.assert_close(got[name], want[f"model.layers.{layer}.mlp.{proj}.weight"])
    load(tmp_path / "moe")


def test_cli_merges_a_moe_recipe_file(zoo, tmp_path):
    paths = zoo("llama")
    lines = ['method = "moe"', 'base = "base"', "", "[moe]", "num_experts_per_tok = 2", 'router = "hidden"']
    for topic, texts in TOPICS.items():
        lines += ["", "[[models]]", f'model = "{topic}"', f"positive_prompts = {json.dumps(texts)}"]
    recipe_file = paths["base"].parent / "moe.toml"
    recipe_file.write_text("\n".join(lines) + "\n")
    # in-process (the command a user runs, without a second interpreter's start-up)
    from typer.testing import CliRunner

    from llmforge.cli.app import build_app

    res = CliRunner().invoke(build_app(), ["merge", str(tmp_path / "out"), "-c", str(recipe_file)])
    assert res.exit_code == 0, res.output
    assert "of the positive prompts' tokens go to their own expert" in res.output, res.output
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == ["MixtralForCausalLM"]
    # the model card's recipe reproduces the merge
    import tomllib

    card = (tmp_path / "out" / "README.md").read_text()
    merge(tmp_path / "again", tomllib.loads(card.split("```toml\n")[1].split("```")[0]))
    again = read(tmp_path / "again")
    assert all(torch.equal(v, again[k]) for k, v in read(tmp_path / "out").items())

    # a recipe problem: one message naming the key, exit code 2
    recipe_file.write_text(recipe_file.read_text().replace("num_experts_per_tok = 2", "num_experts_per_tok = 4"))
    res = run_cli("merge", str(tmp_path / "bad"), "-c", str(recipe_file))
    assert res.returncode == 2 and "moe.num_experts_per_tok" in res.stderr and "Traceback" not in res.stderr


MOE_THEN_SFT = """
[[stages]]
name = "moe"
uses = "merge"
method = "moe"
base = "{base}"
models = [{models}]
moe = {{ num_experts_per_tok = 2 }}

[[stages]]
name = "sft"
uses = "sft"
model = "@moe"
data = {{ path = "data/chat.jsonl" }}
max_steps = 12
max_length = 64
micro_batch_size = 8
learning_rate = 1e-2
log_every = 2
lora = {{ enabled = true, r = 8, alpha = 16, dropout = 0.0 }}
merge = true
"""


def test_the_merge_stage_builds_the_moe_and_lora_sft_trains_it_further(zoo, tmp_path):
    """forge.toml: a merge stage with method moe, then LoRA SFT on @moe ("all-linear": attention, the experts and
    the router); the loss falls and the merged result is still the MoE, with a trained router."""
    paths = zoo("llama")
    project = ForgeProject(tmp_path / "project")
    write_data(project.root)
    models = ", ".join(
        f'{{ model = "{paths[t]}", positive_prompts = {json.dumps(texts)} }}' for t, texts in TOPICS.items()
    )
    project.write(MOE_THEN_SFT.format(base=paths["base"], models=models))
    run = project.run()
    assert run.exit_code == 0, run.failure()
    series = [m["loss"] for m in run.metrics("sft") if "loss" in m]
    assert len(series) >= 3 and series[-1] < series[0] * 0.95, series
    adapted = next(m for m in run.messages("sft") if m.startswith("LoRA adapts: "))
    assert "gate" in adapted and "experts" in adapted, adapted
    moe, tuned = run.artifact("moe", "model"), run.artifact("sft", "model")
    assert json.loads((tuned / "config.json").read_text())["architectures"] == ["MixtralForCausalLM"]
    router = "model.layers.0.block_sparse_moe.gate.weight"
    assert not torch.equal(read(moe)[router], read(tuned)[router])
    load(tuned)


def test_the_moe_exports_to_gguf_with_the_logits_of_transformers(zoo, tmp_path):
    pytest.importorskip("llmforge_plugins.gguf.arch.moe", reason="the MoE GGUF export (plugins/gguf/arch/moe.py)")
    from gguf_families import assert_parity, export

    paths = zoo("llama")
    merge(tmp_path / "moe", recipe(paths))
    summary = export(tmp_path / "moe", tmp_path / "moe.gguf", "f32")
    assert summary["hf_architecture"] == "MixtralForCausalLM"
    kl, top1 = assert_parity(tmp_path / "moe", tmp_path / "moe.gguf", text=" ".join(TOPICS["sail"]))
    assert kl < 1e-3 and top1 >= 0.98


def problems(spec: dict) -> dict[str, str]:
    from llmforge_plugins.merge.options import MergeOptions
    from llmforge_plugins.merge.plan import static_problems

    return {p.where: p.message for p in static_problems(MergeOptions.model_validate(spec), methods())}


def test_bad_moe_recipes_are_refused_by_key():
    models = [{"model": "a", "positive_prompts": ["x"]}, {"model": "b"}]
    found = problems({"method": "moe", "models": models, "moe": {"num_experts_per_tok": 3, "shared": "lineer"}})
    assert "give this model's positive_prompts" in found["models[1].positive_prompts"]
    assert "3 experts per token" in found["moe.num_experts_per_tok"]
    assert "did you mean 'linear'" in found["moe.shared"]
    found = problems({"method": "moe", "models": models[:1], "moe": {"router": "random", "shared": "base"}})
    assert "at least 2 models" in found["models"] and "set base" in found["moe.shared"]
    found = problems({"method": "linear", "models": models, "moe": {}})
    assert "only method moe" in found["moe"] and "only method moe" in found["models[0].positive_prompts"]
    found = problems({"method": "moe", "models": models, "moe": {"shared": "slerp"}, "parameters": {"t": 2}})
    assert "must be <= 1" in found["parameters.t"]
    found = problems({"method": "moe", "models": models, "moe": {"shared": "ties", "router": "random"}})
    assert "method ties needs a base model" in found["models"] and "(moe.shared = ties)" in found["models"]
    found = problems({"method": "moe", "slices": [{"sources": [{"model": "a", "layer_range": [0, 1]}]}]})
    assert "under models" in found["slices"]


def test_a_family_without_a_moe_counterpart_is_refused(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "qwen2", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
    )
    for name in ("a", "b"):
        AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / name)
    spec = {"method": "moe", "models": [{"model": str(tmp_path / n)} for n in "ab"], "moe": {"router": "random"}}
    with pytest.raises(UsageError, match="Mixtral from Llama or Mistral models and Qwen3-MoE from Qwen3 models"):
        merge(tmp_path / "out", spec)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError):
        merge(tmp_path / "out", {**spec, "moe": {"router": "hidden"}})
