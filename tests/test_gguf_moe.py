"""GGUF export of Phi-3 (plugins/gguf/arch/phi3.py) and of the mixture-of-experts families Qwen3-MoE and Mixtral
(plugins/gguf/arch/moe.py), with the helpers of tests/gguf_families.py.

Each family's tiny random model (transformers builds it from a config: 2 layers, hidden 64; the MoE ones 4 experts,
top-2) is saved with a tokenizer trained here and exported. F32 in llama.cpp gives transformers' logits on the same
token ids (mean KL < 1e-3, top-1 >= 0.98, KV cache in F32); F16, Q8_0 and a K-quant load and generate; what is
particular to the family is in the file: Phi-3's fused qkv and gate/up and its partial rotary dimensions, the stacked
experts and the router (F32) of the MoE ones. A checkpoint in transformers 5's in-memory layout (fused experts)
exports to the same bytes as the per-expert layout save_pretrained writes. What llama.cpp cannot represent is
refused by name: Qwen3-MoE's `norm_topk_prob = false`, dense layers among its expert layers, and a model named like
Phi-3 whose vocabulary lacks the tokens llama.cpp then looks up. Phi-3's LongRoPE matches transformers where both
pick the same factors (short text, short context; long text, long context). The comparison with llama.cpp's own
converter (F16, tensor for tensor, same metadata) runs for these families in the default run on small vocabularies
(tests/test_gguf_families.py's test_every_family_...); here, in the slow pass, with real vocabularies (GPT-2's,
Qwen2's) and Phi-3's LongRoPE.
"""

from __future__ import annotations

import copy
import json
import shutil

import pytest

from gguf_families import (
    MULTILINGUAL,
    Family,
    assert_generates,
    assert_parity,
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
    tokenizer_for,
)
from llmforge.errors import UsageError

EXPERTS, TOP_K, EXPERT_FF = 4, 2, 32
MOE = {"num_local_experts": EXPERTS, "num_experts_per_tok": TOP_K}

# Family names are also folder names, hence general.name: "phi", not "phi3" (see test_phi3_name_*).
FAMILIES = {
    # half of each 16-wide head rotated: rope.dimension_count 8
    "phi": Family(
        "phi",
        "Phi3ForCausalLM",
        "Phi3Config",
        "phi3",
        config={"partial_rotary_factor": 0.5},
        tokenizer="gpt-2",
        real_vocab="gpt-2",
        must_have=("blk.0.attn_qkv.weight", "blk.1.ffn_up.weight", "output.weight"),
        must_lack=("blk.0.attn_q.weight", "blk.0.ffn_gate.weight"),
    ),
    # released Qwen3-MoE models renormalise the top-k weights (norm_topk_prob = true), as llama.cpp always does
    "qwen3moe": Family(
        "qwen3moe",
        "Qwen3MoeForCausalLM",
        "Qwen3MoeConfig",
        "qwen3moe",
        config={**MOE, "moe_intermediate_size": EXPERT_FF, "head_dim": 32, "norm_topk_prob": True},
        tied=True,
        must_have=("blk.0.ffn_gate_inp.weight", "blk.1.ffn_down_exps.weight", "blk.0.attn_q_norm.weight"),
        must_lack=("output.weight", "blk.0.ffn_gate.weight"),
    ),
    "mixtral": Family(
        "mixtral",
        "MixtralForCausalLM",
        "MixtralConfig",
        "llama",
        config={**MOE, "sliding_window": None},
        tokenizer="llama-bpe",
        real_vocab="gpt-2",  # transformers' rebuild of llama.cpp's llama-bpe vocabulary does not give its test ids
        must_have=("blk.0.ffn_gate_inp.weight", "blk.1.ffn_up_exps.weight", "output.weight"),
        must_lack=("blk.0.ffn_gate.weight",),
    ),
}
NAMES = list(FAMILIES)
MOE_NAMES = ["qwen3moe", "mixtral"]

#: LongRoPE as Phi-3.5 / Phi-4-mini configure it (factors, original context, a longer maximum)
LONGROPE = {
    "rope_parameters": {
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "partial_rotary_factor": 0.5,
        "original_max_position_embeddings": 256,
        "short_factor": [1.0, 1.1, 1.3, 1.6],
        "long_factor": [3.0, 5.0, 9.0, 17.0],
    },
    "max_position_embeddings": 1024,
    "original_max_position_embeddings": 256,
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Each family's tiny model and its F32 export, built on first use."""
    return family_builder(tmp_path_factory.mktemp("phi-moe"), FAMILIES)


def copy_model(src, dest):
    shutil.copytree(src, dest)
    return dest


# ------------------------------------------------------------------------------------------------
# F32: llama.cpp computes what transformers computes


@pytest.mark.parametrize("name", NAMES)
def test_f32_matches_transformers(built, name):
    b = built(name)
    fam, path = b["family"], b["f32"]
    assert b["summary"]["arch"] == fam.gguf_arch and b["summary"]["hf_architecture"] == fam.model_class
    assert fields(path)["general.architecture"] == fam.gguf_arch
    names = tensors(path)
    assert all(n in names for n in fam.must_have), sorted(names)
    assert not any(n in names for n in fam.must_lack), sorted(names)
    kl, top1 = assert_parity(b["model"], path)
    assert kl < 1e-3 and top1 >= 0.98


def test_phi3_fused_projections_and_partial_rotary(built):
    path = built("phi")["f32"]
    meta = fields(path)
    assert meta["phi3.rope.dimension_count"] == 8  # 0.5 x 64 hidden / 4 heads
    assert meta["phi3.attention.sliding_window"] == 0  # none: llama.cpp tells Phi-4 from Phi-3 by the 0
    assert meta["phi3.rope.scaling.original_context_length"] == 4096
    assert "phi3.vocab_size" not in meta
    names = tensors(path)
    # GGUF shapes are (columns, rows): q (4 heads) + k and v (2 KV heads each) of 16 rows; gate then up of 176
    assert names["blk.0.attn_qkv.weight"].shape.tolist() == [64, (4 + 2 + 2) * 16]
    assert names["blk.0.ffn_up.weight"].shape.tolist() == [64, 2 * 176]
    assert names["blk.0.ffn_down.weight"].shape.tolist() == [176, 64]


def test_phi3_sliding_window_is_written_and_warned(tmp_path):
    """llama.cpp reads Phi-3's window and does not apply it: written as it is, with a warning."""
    from llmforge_plugins.gguf.export import export_gguf

    model = make_family_model(FAMILIES["phi"], tmp_path / "w", sliding_window=32)
    messages: list = []
    export_gguf(model, tmp_path / "w.gguf", "f16", log=log_to(messages))
    assert fields(tmp_path / "w.gguf")["phi3.attention.sliding_window"] == 32
    assert any(level == "warning" and "sliding_window 32" in m for level, m in messages), messages


@pytest.mark.parametrize("name", MOE_NAMES)
def test_experts_stacked_per_layer_with_their_counts(built, tmp_path, name):
    b = built(name)
    meta = fields(b["f32"])
    arch = b["family"].gguf_arch
    assert meta[f"{arch}.expert_count"] == EXPERTS and meta[f"{arch}.expert_used_count"] == TOP_K
    ff = EXPERT_FF if name == "qwen3moe" else 176
    if name == "qwen3moe":
        assert meta["qwen3moe.expert_feed_forward_length"] == EXPERT_FF
        assert meta["qwen3moe.feed_forward_length"] == 176  # the dense length, as the converter writes it
    else:
        assert meta["llama.vocab_size"] == len(tokenizer_for("llama-bpe"))
    names = tensors(b["f32"])
    assert names["blk.0.ffn_gate_exps.weight"].shape.tolist() == [64, ff, EXPERTS]
    assert names["blk.0.ffn_up_exps.weight"].shape.tolist() == [64, ff, EXPERTS]
    assert names["blk.1.ffn_down_exps.weight"].shape.tolist() == [ff, 64, EXPERTS]
    assert names["blk.0.ffn_gate_inp.weight"].shape.tolist() == [64, EXPERTS]
    # F16: the experts in F16, the router kept in F32 as llama.cpp's converter keeps it
    f16 = tmp_path / "m.f16.gguf"
    export(b["model"], f16, "f16")
    names = tensors(f16)
    assert names["blk.0.ffn_gate_exps.weight"].tensor_type.name == "F16"
    assert names["blk.0.ffn_gate_inp.weight"].tensor_type.name == "F32"


@pytest.mark.parametrize("name", MOE_NAMES)
def test_fused_expert_layout_exports_the_same_bytes(built, tmp_path, name):
    """A state dict saved as transformers 5 holds it (mlp.experts.gate_up_proj / down_proj, 3-D, gate rows first)
    gives the same file as the per-expert tensors save_pretrained writes."""
    import transformers
    from safetensors.torch import save_file

    b = built(name)
    model = getattr(transformers, b["family"].model_class).from_pretrained(str(b["model"]))
    state = {
        k: v.contiguous() for k, v in model.state_dict().items() if not (b["family"].tied and k == "lm_head.weight")
    }
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)  # the in-memory layout
    fused = copy_model(b["model"], tmp_path / name)
    save_file(state, str(fused / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "fused.gguf"
    export(fused, out, "f32")
    a, ref = tensors(out), tensors(b["f32"])
    assert sorted(a) == sorted(ref)
    for n in a:
        assert bytes(a[n].data) == bytes(ref[n].data), n


# ------------------------------------------------------------------------------------------------
# the other output types


@pytest.mark.parametrize("name", NAMES)
def test_f16_q8_0_and_a_k_quant_load_and_generate(built, tmp_path, name):
    b = built(name)
    ids = hf_ids(b["model"], MULTILINGUAL)
    n_vocab = len(fields(b["f32"])["tokenizer.ggml.tokens"])
    f16, q8 = tmp_path / "m.f16.gguf", tmp_path / "m.q8_0.gguf"
    export(b["model"], f16, "f16")
    export(b["model"], q8, "q8_0")
    k = quantize(f16, tmp_path / "m.Q4_K_M.gguf", "Q4_K_M")
    assert {t.tensor_type.name for t in tensors(q8).values()} >= {"Q8_0", "F32"}
    assert fields(k)["general.file_type"] == 15  # MOSTLY_Q4_K_M
    assert {t.tensor_type.name for t in tensors(k).values()} - {"F32", "F16"}  # something really K-quantized
    reference = hf_logits(b["model"], ids)
    for path, max_kl in ((f16, 1e-3), (q8, 5e-2), (k, 5e-1)):
        assert_generates(path, ids, n_vocab)
        kl, _ = kl_top1(reference, gguf_logits(llama(path), ids))
        assert kl < max_kl, f"{path.name}: KL {kl:.3e}"


def test_phi3_longrope_matches_transformers_short_and_long(tmp_path):
    """LongRoPE (Phi-3.5, Phi-4-mini): short factors for sequences within the original context (256 here), long ones
    beyond it. transformers chooses by the sequence's length, llama.cpp by its context size: a 46-token text in a
    256-token context and a 300-token text in a 512-token context each match transformers; the short text in the long
    context does not (the export's warning says so)."""
    import numpy as np

    from llmforge_plugins.gguf.export import export_gguf

    rope = LONGROPE["rope_parameters"]
    model = make_family_model(FAMILIES["phi"], tmp_path / "m", **LONGROPE)
    out = tmp_path / "m.gguf"
    messages: list = []
    export_gguf(model, out, "f32", log=log_to(messages))
    assert any(level == "warning" and "LongRoPE" in m for level, m in messages), messages
    meta, names = fields(out), tensors(out)
    assert meta["phi3.rope.scaling.attn_factor"] == pytest.approx(np.sqrt(1 + np.log(4) / np.log(256)))
    np.testing.assert_array_equal(names["rope_factors_long.weight"].data, np.float32(rope["long_factor"]))
    np.testing.assert_array_equal(names["rope_factors_short.weight"].data, np.float32(rope["short_factor"]))
    short = hf_ids(model, MULTILINGUAL)
    long = (short * 7)[:300]
    for ids, n_ctx in ((short, 256), (long, 512)):
        kl, top1 = kl_top1(hf_logits(model, ids), gguf_logits(llama(out, n_ctx=n_ctx), ids))
        assert kl < 1e-3 and top1 >= 0.98, (len(ids), n_ctx, kl, top1)
    kl, _ = kl_top1(hf_logits(model, short), gguf_logits(llama(out, n_ctx=512), short))
    assert kl > 1e-3, kl  # the long factors on a short text: not transformers' answer


def test_released_configs_are_read():
    """The real config.json of Phi-3-mini-4k-instruct and Qwen3-30B-A3B (test fixtures): what the export takes from
    them, and that neither is refused (Phi-3's 2047-token window is a warning: llama.cpp does not apply it)."""
    from pathlib import Path

    from llmforge_plugins.gguf.arch import find_arch

    root = Path(__file__).parent / "fixtures" / "configs"
    seen = {}
    for name in ("Phi-3-mini-4k-instruct", "Qwen3-30B-A3B"):
        config = json.loads((root / name / "config.json").read_text())
        arch = find_arch(config, root / name)
        hp = arch.hparams(config, root / name)
        messages: list = []
        arch.check(hp, log_to(messages))
        seen[name] = (arch.gguf_name, hp.extra, messages)
    phi, moe = seen["Phi-3-mini-4k-instruct"], seen["Qwen3-30B-A3B"]
    assert phi[0] == "phi3" and phi[1] == {"rope_dims": 96, "original_context": 4096}
    assert [m for _, m in phi[2]] and all("sliding_window 2047" in m for _, m in phi[2])
    assert moe[0] == "qwen3moe" and moe[1] == {"n_expert": 128, "n_expert_used": 8, "expert_ff": 768} and not moe[2]


# ------------------------------------------------------------------------------------------------
# refusals


def expect_refusal(model, tmp_path, *words):
    out = tmp_path / "x.gguf"
    with pytest.raises(UsageError) as info:
        export(model, out)
    message = info.value.render()
    for word in words:
        assert word in message, message
    assert not out.exists()
    return message


@pytest.mark.parametrize("value", [False, None])
def test_qwen3moe_without_renormalised_top_k_is_refused(tmp_path, value):
    """transformers' default (absent) is false; llama.cpp's qwen3moe always renormalises."""
    model = make_family_model(FAMILIES["qwen3moe"], tmp_path / "m", norm_topk_prob=False)
    if value is None:
        cfg = json.loads((model / "config.json").read_text())
        del cfg["norm_topk_prob"]
        (model / "config.json").write_text(json.dumps(cfg))
    expect_refusal(model, tmp_path, "config.json", "norm_topk_prob", "renormalises")


def test_qwen3moe_dense_layers_are_refused(tmp_path):
    model = make_family_model(FAMILIES["qwen3moe"], tmp_path / "m", mlp_only_layers=[1])
    expect_refusal(model, tmp_path, "mlp_only_layers", "every layer")


def test_missing_expert_names_the_layer_and_expert(built, tmp_path):
    from safetensors.torch import load_file, save_file

    d = copy_model(built("mixtral")["model"], tmp_path / "cut")
    state = load_file(str(d / "model.safetensors"))
    del state["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    expect_refusal(d, tmp_path, "layer 1", "up projection for expert 2")


def test_phi3_name_needs_phi3_tokens(built, tmp_path):
    """llama.cpp applies its Phi-3 tokenizer attributes to any model whose general.name contains "phi3" and fails to
    load it when `</s>`, `<unk>`, `<s>` or `<|endoftext|>` is missing: refused at export with the way out; with those
    tokens in the vocabulary the same name exports and loads."""
    named = copy_model(built("phi")["model"], tmp_path / "phi3-tiny")
    expect_refusal(named, tmp_path, "Phi3 Tiny", "</s>, <unk>, <s>", "rename the model folder")
    tok = copy.deepcopy(tokenizer_for("gpt-2"))
    tok.add_special_tokens({"additional_special_tokens": ["</s>", "<unk>", "<s>"]})
    with_tokens = make_family_model(FAMILIES["phi"], tmp_path / "Phi-3-tiny", tokenizer=tok)
    out = tmp_path / "ok.gguf"
    export(with_tokens, out, "f32")
    assert "phi" in fields(out)["general.name"].lower()
    assert_parity(with_tokens, out)


def test_phi3_with_its_sentencepiece_tokenizer(tmp_path):
    """Phi-3 ships a SentencePiece tokenizer.model with <|endoftext|> and its chat markers added on top. Named like
    Phi-3 (llama.cpp then applies its Phi-3 token attributes, which need those tokens), it exports, loads, tokenizes
    like transformers and gives its logits."""
    from test_gguf_export import hf_tokenizer, sentencepiece_model

    folder = sentencepiece_model(tmp_path / "phi3-sp")
    tok = hf_tokenizer(folder)
    tok.add_special_tokens({"additional_special_tokens": ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|end|>"]})
    model = make_family_model(FAMILIES["phi"], folder, tokenizer=tok)
    out = tmp_path / "phi3-sp.gguf"
    export(model, out, "f32")
    meta = fields(out)
    assert "phi3" in meta["general.name"].lower() and meta["tokenizer.ggml.model"] == "llama"
    kl, top1 = assert_parity(model, out)
    assert kl < 1e-3 and top1 >= 0.98


# ------------------------------------------------------------------------------------------------
# the same bytes as llama.cpp's converter


@pytest.mark.slow
@pytest.mark.timeout(900)  # Qwen3-MoE on Qwen2's 152k tokens and Phi-3 on GPT-2's took 210-220 s under load
@pytest.mark.parametrize("name", [*NAMES, "phi-longrope"])
def test_byte_identical_to_llama_cpp_converter(tmp_path, name):
    """F16 export tensor for tensor identical to convert_hf_to_gguf.py's on a tiny model of the family with a real
    vocabulary (its pre-tokenizer is named by hashing token ids, which only a real vocabulary passes)."""
    src = llama_cpp_src_or_skip()
    family, _, variant = name.partition("-")
    model = real_vocab_model(FAMILIES[family], src, tmp_path, **(LONGROPE if variant == "longrope" else {}))
    if family == "phi":
        # The converter reads a Phi-3 folder's BPE vocabulary only when tokenizer_class says GPT2Tokenizer (Phi-4's),
        # and unlike its llama path it does not carry add_prefix_space over; ours writes it (false here: the BPE
        # default in llama.cpp, so the same behaviour). Without the key both files say the same.
        cfg_path = model / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text())
        assert cfg["tokenizer_class"] == "GPT2Tokenizer" and cfg.pop("add_prefix_space", False) is False
        cfg_path.write_text(json.dumps(cfg))
    assert_same_as_converter(src, model, tmp_path, "f16")
