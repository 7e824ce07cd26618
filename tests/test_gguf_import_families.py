"""`llmforge import` (plugins/gguf/importer.py) of the families beyond Llama, and what it must refuse.

transformers reads GGUF itself and, where the file lacks a weight its model class has, initialises that weight at
random and only warns. So the importer refuses rather than save such a model: anything transformers reports as
missing from the file through its loading info, and stacked experts of an architecture transformers would read as
a dense model. A Mixtral GGUF (llama.cpp's "llama" with stacked experts, which transformers reads as a dense Llama)
is loaded that way for all but its experts, which the importer reads from the file: the original logits, and an
export of the result has the original file's tensors. What transformers' reader leaves out of the config is rebuilt
from the file: Phi-3's partial rotary factor (from the rotated dimensions), Qwen3-MoE's expert FFN length, Mixtral's
expert counts; all come back with the original logits.

Also the gguf stage's `model_name` option (not `name`, which a stage's table already uses for the stage), set in
forge.toml: the files' stem and the GGUF's general.name.

The models are the tiny random ones of tests/test_gguf_moe.py's families (transformers builds them from a config).
"""

from __future__ import annotations

import json

import pytest

from conftest import run_cli
from gguf_families import (
    MULTILINGUAL,
    assert_round_trip,
    export,
    fields,
    gguf_logits,
    hf_ids,
    hf_logits,
    kl_top1,
    llama,
    make_family_model,
    quiet_log,
    tensors,
)
from llmforge.errors import UsageError
from test_gguf_moe import FAMILIES


@pytest.fixture(scope="module")
def f32(tmp_path_factory):
    """Each family's tiny model and its F32 export, built on first use."""
    root = tmp_path_factory.mktemp("import-families")
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            model = make_family_model(FAMILIES[name], root / name)
            export(model, root / f"{name}.f32.gguf", "f32")
            cache[name] = (model, root / f"{name}.f32.gguf")
        return cache[name]

    return get


def test_mixtral_round_trip(f32, tmp_path):
    """transformers reads a Mixtral GGUF (llama.cpp's "llama" with stacked experts) as a dense Llama; the import loads
    the rest that way and the experts and routers from the file: the original logits, the config of a Mixtral, the
    per-expert tensors save_pretrained writes, and an export of the result with the original file's tensors."""
    from safetensors import safe_open

    model, gguf = f32("mixtral")
    back = tmp_path / "back"
    config = assert_round_trip(gguf, model, back)
    assert config["architectures"] == ["MixtralForCausalLM"] and config["model_type"] == "mixtral"
    assert (config["intermediate_size"], config["num_local_experts"], config["num_experts_per_tok"]) == (176, 4, 2)
    with safe_open(str(back / "model.safetensors"), "np") as f:
        names = set(f.keys())
    assert "model.layers.1.block_sparse_moe.gate.weight" in names
    assert {f"model.layers.0.block_sparse_moe.experts.3.{w}.weight" for w in ("w1", "w2", "w3")} <= names
    assert not any(".mlp." in n for n in names), sorted(names)
    # its tokenizer is Llama 3's kind (llama-bpe): whole words looked up before merging, as in llama.cpp, which
    # transformers' rebuild from a GGUF leaves out (and the export then refuses the folder)
    assert json.loads((back / "tokenizer.json").read_text())["model"]["ignore_merges"] is True
    again = tmp_path / "again.gguf"
    export(back, again, "f32")
    a, b = tensors(gguf), tensors(again)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].tensor_type == b[name].tensor_type and bytes(a[name].data) == bytes(b[name].data), name
    meta = fields(again)
    assert (meta["llama.expert_count"], meta["llama.expert_used_count"]) == (4, 2)


def test_quantized_mixtral_imports_as_llama_cpp_runs_it(f32, tmp_path):
    """Q8_0 experts (gate/up; down's rows of 176 fall back to F16) are dequantized as they are read: the imported
    model computes what llama.cpp computes from the same file (not the original's logits: on a tiny random MoE,
    Q8_0 alone moves them by units and flips some experts' routing; KL 0.03 here)."""
    model, _ = f32("mixtral")
    q8 = tmp_path / "m.q8_0.gguf"
    export(model, q8, "q8_0")
    assert tensors(q8)["blk.0.ffn_gate_exps.weight"].tensor_type.name == "Q8_0"
    res = run_cli("import", str(q8), str(tmp_path / "back"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "MISSING" not in res.stdout + res.stderr  # transformers' report on the dense MLP the experts replace
    ids = hf_ids(model, MULTILINGUAL)
    kl, top1 = kl_top1(gguf_logits(llama(q8), ids), hf_logits(tmp_path / "back", ids))
    assert kl < 3e-3 and top1 >= 0.95, (kl, top1)  # 6e-4 and 0.98 here: llama.cpp quantizes activations too


def test_experts_of_another_architecture_are_refused_by_the_cli(f32, tmp_path):
    """Stacked experts in a GGUF whose architecture transformers reads as a dense model (qwen2 here: the Mixtral file
    with its architecture renamed, keys and all) would import with random MLP weights: refused, with the reason."""
    _, gguf = f32("mixtral")
    other = tmp_path / "other.gguf"
    other.write_bytes(gguf.read_bytes().replace(b"llama", b"qwen2"))
    res = run_cli("import", str(other), str(tmp_path / "back"))
    assert res.returncode == 2, res.stdout + res.stderr
    assert res.stderr.startswith("error: ") and "Traceback" not in res.stderr, res.stderr
    for needle in ("mixture-of-experts", "ffn_*_exps", "'qwen2'", "random"):
        assert needle in res.stderr, res.stderr
    assert not (tmp_path / "back").exists()


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        # past the experts, the loading info still catches what transformers would have made up
        ("blk.1.attn_k.weight", "no weights in this GGUF for model.layers.1.self_attn.k_proj.weight"),
        ("blk.1.ffn_up_exps.weight", "no blk.1.ffn_up_exps.weight"),
    ],
)
def test_mixtral_missing_a_tensor_is_refused_not_initialised(f32, tmp_path, tensor, message):
    from llmforge_plugins.gguf.importer import import_gguf

    _, gguf = f32("mixtral")
    data = gguf.read_bytes()
    name = tensor.encode()
    assert data.count(name) == 1
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(data.replace(name, name[:-8] + b"X.weight"))
    with pytest.raises(UsageError) as err:
        import_gguf(broken, tmp_path / "back", log=quiet_log)
    assert message in err.value.message, err.value.message
    assert not (tmp_path / "back").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".back")]


def test_a_renamed_tensor_is_refused(f32, tmp_path):
    """A dense model whose file lacks one weight under the name transformers looks for."""
    from llmforge_plugins.gguf.importer import import_gguf

    _, gguf = f32("phi")
    data = gguf.read_bytes()
    name = b"blk.1.ffn_down.weight"
    assert data.count(name) == 1
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(data.replace(name, b"blk.1.ffn_dowX.weight"))
    with pytest.raises(UsageError) as err:
        import_gguf(broken, tmp_path / "back", log=quiet_log)
    assert "model.layers.1.mlp.down_proj.weight" in err.value.message, err.value.message


def test_phi3_round_trip_keeps_the_partial_rotary_factor(f32, tmp_path):
    model, gguf = f32("phi")
    config = assert_round_trip(gguf, model, tmp_path / "back")
    assert config["rope_parameters"]["partial_rotary_factor"] == 0.5


def test_qwen3moe_round_trip(f32, tmp_path):
    model, gguf = f32("qwen3moe")
    config = assert_round_trip(gguf, model, tmp_path / "back")
    assert config["architectures"] == ["Qwen3MoeForCausalLM"]
    assert (config["moe_intermediate_size"], config["num_local_experts"], config["num_experts_per_tok"]) == (32, 4, 2)


def test_gguf_stage_model_name_from_forge_toml(f32, tmp_path):
    """The stage's table already has `name` (the stage's own), so the model's name is `model_name`: the files'
    stem and the GGUF's general.name."""
    from llmforge.pipeline import load_pipeline
    from llmforge.plugins import load_registry
    from llmforge.runner import RunRequest, run_pipeline

    model, _ = f32("phi")
    (tmp_path / "forge.toml").write_text(
        f'[project]\nname = "named"\n\n[[stages]]\nname = "gguf"\nuses = "gguf"\nmodel = "{model}"\n'
        'model_name = "Tiny-Phi.v2"\ncheck = false\n'
    )
    registry = load_registry(env="")
    result = run_pipeline(load_pipeline(tmp_path / "forge.toml", registry=registry), RunRequest(), registry=registry)
    assert result.exit_code == 0, result.stages
    art = result.run_dir / "stages" / "gguf" / "artifacts" / "gguf"
    assert sorted(p.name for p in art.iterdir()) == ["Tiny-Phi.v2-f16.Modelfile", "Tiny-Phi.v2-f16.gguf"]
    assert fields(art / "Tiny-Phi.v2-f16.gguf")["general.name"] == "Tiny-Phi.v2"
