"""`llmforge import` (plugins/gguf/importer.py) of the families beyond Llama, and what it must refuse.

transformers reads GGUF itself and, where the file lacks a weight its model class has, initialises that weight at
random and only warns. So the importer refuses rather than save such a model: a Mixtral GGUF (llama.cpp writes it as
the "llama" architecture with stacked experts, which transformers reads as a dense Llama with no MLP weights) by
name, and anything else transformers reports as missing from the file through its loading info. What transformers'
reader leaves out of the config is rebuilt from the file: Phi-3's partial rotary factor (from the rotated dimensions),
Qwen3-MoE's expert FFN length; both come back with the original logits.

Also the gguf stage's `model_name` option (not `name`, which a stage's table already uses for the stage), set in
forge.toml: the files' stem and the GGUF's general.name.

The models are the tiny random ones of tests/test_gguf_moe.py's families (transformers builds them from a config).
"""

from __future__ import annotations

import pytest

from conftest import run_cli
from gguf_families import assert_round_trip, export, fields, make_family_model, quiet_log
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


def test_mixtral_gguf_is_refused_by_the_cli_with_the_reason(f32, tmp_path):
    _, gguf = f32("mixtral")
    res = run_cli("import", str(gguf), str(tmp_path / "back"))
    assert res.returncode == 2, res.stdout + res.stderr
    assert res.stderr.startswith("error: ") and "Traceback" not in res.stderr, res.stderr
    for needle in ("mixture-of-experts", "ffn_*_exps", "Mixtral", "random"):
        assert needle in res.stderr, res.stderr
    assert not (tmp_path / "back").exists()


def test_weights_missing_from_the_file_are_refused_not_initialised(f32, tmp_path, monkeypatch):
    """Past the by-name refusal (as if transformers were said to read Mixtral's experts), the loading info still
    catches the MLP weights transformers would have made up, and nothing is written."""
    from llmforge_plugins.gguf import importer

    _, gguf = f32("mixtral")
    monkeypatch.setattr(importer, "MOE_READERS", {**importer.MOE_READERS, "llama": "llama"})
    with pytest.raises(UsageError) as err:
        importer.import_gguf(gguf, tmp_path / "back", log=quiet_log)
    assert "no weights" in err.value.message and "mlp" in err.value.message, err.value.message
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
