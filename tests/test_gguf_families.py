"""GGUF export and import per model family (plugins/gguf/arch/): Qwen2 and Qwen3 here; the helpers in
tests/gguf_families.py serve every family's tests.

Each family's tiny random model (built by transformers from its config, saved with a tokenizer trained here with
the family's pre-tokenizer) is exported and checked by behaviour: F32 in llama.cpp gives transformers' logits on the
same token ids (mean KL < 1e-3, top-1 >= 0.98, llama.cpp's KV cache in F32), F16 / Q8_0 / a K-quant load and
generate, `llmforge import` back to HF gives the same logits, and what is particular to the family is in the file
(Qwen2's q/k/v biases, Qwen3's q/k norms and key/value length). The comparison with llama.cpp's own converter
(tensor-for-tensor byte identity, same metadata) is marked slow and parametrised over FAMILIES_VS_CONVERTER: a new
family adds its name there.
"""

from __future__ import annotations

import json

import pytest

from gguf_families import (
    FAMILIES,
    MULTILINGUAL,
    assert_generates,
    assert_parity,
    assert_round_trip,
    assert_same_as_converter,
    export,
    family_builder,
    fields,
    gguf_logits,
    hf_ids,
    hf_logits,
    kl_top1,
    llama,
    llama_cpp_src_or_skip,
    log_to,
    make_family_model,
    quantize,
    real_vocab_model,
    tensors,
)
from llmforge.errors import UsageError

QWEN = ["qwen2", "qwen3"]
#: families compared byte for byte with llama.cpp's converter (slow): add yours
FAMILIES_VS_CONVERTER = ["qwen2", "qwen3"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Each family's tiny model and its F32 export, built on first use."""
    return family_builder(tmp_path_factory.mktemp("families"))


@pytest.mark.parametrize("name", QWEN)
def test_f32_matches_transformers(built, name):
    b = built(name)
    fam, path = b["family"], b["f32"]
    assert b["summary"]["arch"] == fam.gguf_arch and b["summary"]["hf_architecture"] == fam.model_class
    meta = fields(path)
    assert meta["general.architecture"] == fam.gguf_arch
    assert meta["tokenizer.ggml.pre"] == "qwen2"
    names = tensors(path)
    assert all(n in names for n in fam.must_have), sorted(names)
    assert not any(n in names for n in fam.must_lack), sorted(names)
    kl, top1 = assert_parity(b["model"], path)
    assert kl < 1e-3 and top1 >= 0.98


def test_qwen2_metadata(built):
    meta = fields(built("qwen2")["f32"])
    assert meta["qwen2.block_count"] == 2 and meta["qwen2.attention.head_count_kv"] == 2
    # llama.cpp's converter writes these for its llama architecture only; qwen2 derives them
    assert "qwen2.vocab_size" not in meta and "qwen2.rope.dimension_count" not in meta
    names = tensors(built("qwen2")["f32"])
    assert names["blk.0.attn_q.bias"].tensor_type.name == "F32" and names["blk.0.attn_k.bias"].shape.tolist() == [32]


def test_qwen3_head_dim_is_the_key_length(built):
    """Qwen3 names head_dim (32 here, not 64 / 4 heads): it is written as the key/value length, and the q/k norms
    are one head wide."""
    path = built("qwen3")["f32"]
    meta = fields(path)
    assert meta["qwen3.attention.key_length"] == 32 and meta["qwen3.attention.value_length"] == 32
    names = tensors(path)
    assert names["blk.0.attn_q_norm.weight"].shape.tolist() == [32]
    assert names["blk.0.attn_q.weight"].shape.tolist() == [64, 4 * 32]  # GGUF shapes are (columns, rows)


@pytest.mark.parametrize("name", QWEN)
def test_f16_q8_0_and_a_k_quant_load_and_generate(built, tmp_path, name):
    b = built(name)
    ids = hf_ids(b["model"], MULTILINGUAL)
    n_vocab = len(fields(b["f32"])["tokenizer.ggml.tokens"])
    f16 = tmp_path / "m.f16.gguf"
    export(b["model"], f16, "f16")
    q8 = tmp_path / "m.q8_0.gguf"
    export(b["model"], q8, "q8_0")
    k = quantize(f16, tmp_path / "m.Q4_K_M.gguf", "Q4_K_M")
    assert {t.tensor_type.name for t in tensors(q8).values()} >= {"Q8_0", "F32"}
    # rows of 64, 128 and 176 values are not whole 256-value super-blocks: llama.cpp falls back per tensor
    assert fields(k)["general.file_type"] == 15  # MOSTLY_Q4_K_M
    assert {t.tensor_type.name for t in tensors(k).values()} - {"F32", "F16"}
    reference = hf_logits(b["model"], ids)
    for path, max_kl in ((f16, 1e-3), (q8, 5e-2), (k, 5e-1)):
        assert_generates(path, ids, n_vocab)
        kl, _ = kl_top1(reference, gguf_logits(llama(path), ids))
        assert kl < max_kl, f"{path.name}: KL {kl:.3e}"


@pytest.mark.parametrize("name", QWEN)
def test_import_back_to_hf(built, tmp_path, name):
    b = built(name)
    config = assert_round_trip(b["f32"], b["model"], tmp_path / "back")
    original = json.loads((b["model"] / "config.json").read_text())
    assert config["architectures"] == [b["family"].model_class]
    assert config["tie_word_embeddings"] is b["family"].tied
    if name == "qwen3":
        assert config["head_dim"] == original["head_dim"] == 32


@pytest.mark.parametrize("name", QWEN)
def test_importance_matrix_names_are_the_exported_tensors(built, name):
    """The importance matrix is keyed by GGUF tensor names: for each family they are the export's names."""
    from transformers import AutoModelForCausalLM

    from llmforge_plugins.gguf.imatrix import gguf_tensor_names

    b = built(name)
    names = gguf_tensor_names(AutoModelForCausalLM.from_pretrained(str(b["model"])))
    exported = set(tensors(b["f32"]))
    assert len(names) == 2 * 7 + 1  # seven linears per layer, and the head (the embedding's statistics when tied)
    assert names["lm_head"] == ("token_embd.weight" if b["family"].tied else "output.weight")
    assert set(names.values()) <= exported, set(names.values()) - exported


def test_gguf_check_scores_a_family_export(built):
    """`llmforge gguf check` (the stage's scorecard) on a Qwen3 export: same tokens, same distribution."""
    from llmforge_plugins.gguf.check import check_gguf

    b = built("qwen3")
    (row,) = check_gguf(b["model"], [b["f32"]])["rows"]
    assert row["tokenization_ok"] and row["mean_kld"] < 1e-3 and row["top1"] >= 0.98, row


def test_cli_export_and_import_a_family(built, tmp_path, cli):
    """The commands users run: `llmforge gguf export` of a Qwen3 folder (with its Modelfile), `llmforge import` back;
    an unsupported architecture exits 2 listing the supported ones."""
    b = built("qwen3")
    out = tmp_path / "q3-f16.gguf"
    res = cli("gguf", "export", str(b["model"]), str(out))
    assert res.returncode == 0, res.stderr
    assert "Qwen3ForCausalLM" in res.stdout + res.stderr and (tmp_path / "q3-f16.Modelfile").is_file()
    back = tmp_path / "back"
    res = cli("import", str(out), str(back))
    assert res.returncode == 0, res.stderr
    config = json.loads((back / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"] and config["head_dim"] == 32
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text(json.dumps({"architectures": ["FalconForCausalLM"]}))
    res = cli("gguf", "export", str(tmp_path / "odd"), str(tmp_path / "odd.gguf"))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "FalconForCausalLM" in res.stderr + res.stdout and "Qwen3ForCausalLM" in res.stderr + res.stdout


def test_qwen3_attention_bias_is_refused(tmp_path):
    model = make_family_model(FAMILIES["qwen3"], tmp_path / "b", attention_bias=True)
    with pytest.raises(UsageError) as info:
        export(model, tmp_path / "x.gguf")
    assert "attention_bias" in info.value.render() and "config.json" in info.value.render()
    assert not (tmp_path / "x.gguf").exists()


def test_qwen2_sliding_window_warns_only_when_used(tmp_path):
    from llmforge_plugins.gguf.export import export_gguf

    fam = FAMILIES["qwen2"]
    for used in (False, True):
        model = make_family_model(fam, tmp_path / f"w{used}", use_sliding_window=used, sliding_window=32)
        messages: list = []
        export_gguf(model, tmp_path / f"w{used}.gguf", "f16", log=log_to(messages))
        warned = [m for level, m in messages if level == "warning" and "sliding_window" in m]
        assert bool(warned) is used, messages


def test_gpt2_tokenizer_in_a_qwen2_folder_follows_transformers(tmp_path):
    """transformers 5 loads its own Qwen2Tokenizer (Qwen2 split, NFC) for a model_type qwen2 folder whatever
    tokenizer.json says: the GGUF follows what transformers tokenizes with, so llama.cpp agrees with it."""
    from gguf_families import tokenizer_for
    from llmforge_plugins.gguf.vocab import CHECK_TEXT

    model = make_family_model(FAMILIES["qwen2"], tmp_path / "m", tokenizer=tokenizer_for("gpt-2"))
    out = tmp_path / "m.gguf"
    assert export(model, out, "f32")["pre"] == "qwen2"
    llm = llama(out)
    for text in (MULTILINGUAL, CHECK_TEXT):
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == hf_ids(model, text)


def test_unsupported_architecture_lists_the_families(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from llmforge_plugins.gguf.arch import supported

    d = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32)).save_pretrained(str(d))
    with pytest.raises(UsageError) as info:
        export(d, tmp_path / "x.gguf")
    message = info.value.render()
    assert "GPT2LMHeadModel" in message
    for name in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        assert name in message and name in supported()


def test_missing_family_tensor_names_the_layer(built, tmp_path):
    """A Qwen3 checkpoint without a layer's k_norm: refused before writing, naming the layer and the part."""
    from safetensors.torch import load_file, save_file

    src = built("qwen3")["model"]
    d = tmp_path / "cut"
    d.mkdir()
    for f in src.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    state = load_file(str(d / "model.safetensors"))
    del state["model.layers.1.self_attn.k_norm.weight"]
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UsageError) as info:
        export(d, tmp_path / "x.gguf")
    assert "layer 1 has no attn_k_norm weight" in info.value.render()


# ------------------------------------------------------------------------------------------------
# the same bytes as llama.cpp's converter


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES_VS_CONVERTER)
def test_byte_identical_to_llama_cpp_converter_per_family(tmp_path, name):
    """F16 export tensor for tensor identical to convert_hf_to_gguf.py's on a tiny model of the family with a real
    vocabulary (the converter names the pre-tokenizer by hashing token ids, which only a real vocabulary passes)."""
    src = llama_cpp_src_or_skip()
    model = real_vocab_model(FAMILIES[name], src, tmp_path)
    assert_same_as_converter(src, model, tmp_path, "f16")
