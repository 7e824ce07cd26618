"""GGUF export and import per model family (plugins/gguf/arch/): Qwen2 and Qwen3 here; the helpers in
tests/gguf_families.py serve every family's tests.

Each family's tiny random model (built by transformers from its config, saved with a tokenizer trained here with
the family's pre-tokenizer) is exported and checked by behaviour: F32 in llama.cpp gives transformers' logits on the
same token ids (mean KL < 1e-3, top-1 >= 0.98, llama.cpp's KV cache in F32), F16 / Q8_0 / a K-quant load and
generate, `llmforge import` back to HF gives the same logits, and what is particular to the family is in the file
(Qwen2's q/k/v biases, Qwen3's q/k norms and key/value length).

The comparison with llama.cpp's own converter (tensor-for-tensor byte identity, same metadata) covers every family
the export supports in the default run (test_every_family_...: F16, tiny vocabularies, the converter run once for
all of them in one child process): a new family adds its name to EVERY_FAMILY and its model to `vs_converter`.
The slow pass repeats it with real vocabularies (Qwen2's 152k tokens here, FAMILIES_VS_CONVERTER) and, in the other
families' files, other output types.
"""

from __future__ import annotations

import json
import shutil

import pytest

from gguf_families import (
    EXTRA_KEYS,
    FAMILIES,
    MULTILINGUAL,
    Family,
    assert_generates,
    assert_parity,
    assert_round_trip,
    assert_same_as_converter,
    assert_same_gguf,
    converter_batch,
    export,
    family_builder,
    fields,
    gguf_logits,
    gpt2_vocab_tokenizer,
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
#: families compared byte for byte with llama.cpp's converter on Qwen2's real vocabulary (slow)
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

#: the families beyond this file's, for the comparison of every family with the converter
OTHER_FAMILIES = {
    "llama": Family("llama", "LlamaForCausalLM", "LlamaConfig", "llama"),
    "mistral": Family("mistral", "MistralForCausalLM", "MistralConfig", "llama", config={"sliding_window": None}),
}
#: every family the export supports, F16 against the converter in the default run (test_every_family_...)
EVERY_FAMILY = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi", "qwen3moe", "mixtral"]


@pytest.fixture(scope="module")
def vs_converter(tmp_path_factory):
    """A tiny model of every family with a tokenizer the converter reads without a hash, and the converter's F16 of
    each, converted in one child process (converter_batch). -> {name: (model folder, its file, its error or None)}

    The converter names a byte-level BPE pre-tokenizer only by hashing a real vocabulary's token ids, and real
    vocabularies are large (Qwen2's 152k tokens made each case ~190 s); but every family's converter class except
    Qwen3-MoE's reads a SentencePiece tokenizer.model first, which needs no hash: those get the 500-piece one trained
    here (Gemma's own kind for Gemma). Qwen3-MoE's reads byte-level BPE only, so it gets GPT-2's real vocabulary,
    the smallest the converter and the export both know (built in about a second by gpt2_vocab_tokenizer)."""
    pytest.importorskip("sentencepiece")  # the converter imports it for every SentencePiece vocabulary
    from test_gguf_export import hf_tokenizer, sentencepiece_model
    from test_gguf_gemma import GEMMA, sentencepiece_gemma
    from test_gguf_moe import FAMILIES as MOE_FAMILIES

    src = llama_cpp_src_or_skip()
    root = tmp_path_factory.mktemp("vs-converter")
    families = {**OTHER_FAMILIES, **FAMILIES, **MOE_FAMILIES}
    sp = sentencepiece_model(root / "sp")
    sp_tok = hf_tokenizer(sp)
    models = {}
    for name in ("llama", "mistral", "qwen2", "qwen3", "phi", "mixtral"):
        model = make_family_model(families[name], root / name, tokenizer=sp_tok, seed=1)
        shutil.copy(sp / "tokenizer.model", model / "tokenizer.model")
        if name == "phi":
            # The converter's Phi-3 gives every token transformers lists in tokenizer_config.json / tokenizer.json
            # (<unk>, <s>, </s> here) score -1000 and its own type; the export keeps SentencePiece's. Without those
            # files both read tokenizer.model alone (test_gguf_moe's slow comparison has Phi-3's BPE vocabulary).
            for file in ("tokenizer.json", "special_tokens_map.json", "chat_template.jinja"):
                (model / file).unlink(missing_ok=True)
            shutil.copy(sp / "tokenizer_config.json", model / "tokenizer_config.json")
        models[name] = model
    for name in GEMMA:
        models[name] = sentencepiece_gemma(name, root, transformers_files=False)
    # the converter writes no per-layer pattern for Gemma 3: give it llama.cpp's default (both layers sliding here)
    config = json.loads((models["gemma3"] / "config.json").read_text())
    config["layer_types"] = ["sliding_attention", "sliding_attention"]
    (models["gemma3"] / "config.json").write_text(json.dumps(config))
    models["qwen3moe"] = make_family_model(
        families["qwen3moe"], root / "qwen3moe", tokenizer=gpt2_vocab_tokenizer(src), seed=1
    )
    assert sorted(models) == sorted(EVERY_FAMILY)
    theirs = {name: root / f"theirs-{name}.gguf" for name in models}
    failed = converter_batch(src, [(models[name], theirs[name], "f16") for name in models])
    return {name: (models[name], theirs[name], failed.get(str(theirs[name]))) for name in models}


@pytest.mark.parametrize("name", EVERY_FAMILY)
def test_every_family_f16_byte_identical_to_llama_cpp_converter(vs_converter, tmp_path, name):
    """F16 export tensor for tensor identical to convert_hf_to_gguf.py's (unmodified, its own gguf-py) on the same
    folder, with the same metadata. We may add EXTRA_KEYS; and where the folder has no tokenizer.json (Phi-3 and
    Gemma here) the unknown token's id too, which we read from tokenizer_config.json and the converter then looks
    for in config.json only (for Gemma 2 also its RoPE base: GEMMA_EXTRA_KEYS says why)."""
    from test_gguf_gemma import GEMMA_EXTRA_KEYS

    model, theirs, error = vs_converter[name]
    assert error is None, error
    ours = tmp_path / f"ours-{name}.gguf"
    export(model, ours, "f16")
    extra = GEMMA_EXTRA_KEYS if name.startswith("gemma") else EXTRA_KEYS
    if name == "phi":
        extra = {*EXTRA_KEYS, "tokenizer.ggml.unknown_token_id"}
    assert_same_gguf(ours, theirs, extra)


@pytest.mark.slow
@pytest.mark.timeout(900)  # ~190 s on a quiet 2-core machine; past 300 s under load (gguf's reader on 152k tokens)
@pytest.mark.parametrize("name", FAMILIES_VS_CONVERTER)
def test_byte_identical_to_llama_cpp_converter_per_family(tmp_path, name):
    """F16 export tensor for tensor identical to convert_hf_to_gguf.py's on a tiny model of the family with a real
    vocabulary (the converter names the pre-tokenizer by hashing token ids, which only a real vocabulary passes):
    Qwen2's 152k tokens, the tokenizer these families ship with (the default run compares them on SentencePiece)."""
    src = llama_cpp_src_or_skip()
    model = real_vocab_model(FAMILIES[name], src, tmp_path)
    assert_same_as_converter(src, model, tmp_path, "f16")
