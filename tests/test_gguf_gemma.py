"""GGUF export of Gemma 2 and Gemma 3 text models (plugins/gguf/arch/gemma.py) against real llama.cpp.

Tiny random Gemma2ForCausalLM / Gemma3ForCausalLM models (hidden 64, 2 layers, 4 heads over 2 KV heads, head_dim
16) are built by transformers from a config and saved with a tokenizer trained here. What makes Gemma Gemma is
switched on so that a mistake shows in the logits: norms drawn around 0 (Gemma multiplies by 1 + weight), soft-caps
small enough to bite (Gemma 2: attention 5, final 3; Gemma 3: final 4), a sliding window of 8 tokens on texts of ~45
tokens, and for Gemma 3 a global first layer and a sliding second one (not llama.cpp's default pattern, so the
per-layer pattern has to be written) with a sliding RoPE base of its own. transformers runs with eager attention
(its SDPA path has no soft-capping); llama.cpp with an F32 KV cache.

The comparison with llama.cpp's own converter (byte-identical tensors, same metadata) uses a SentencePiece
tokenizer, since the converter reads Gemma 2's vocabulary from tokenizer.model only: F16 in the default run
(tests/test_gguf_families.py's test_every_family_...), F32, F16 and Q8_0 here in the slow pass.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from gguf_families import (
    EXTRA_KEYS,
    MULTILINGUAL,
    Family,
    assert_generates,
    assert_round_trip,
    export,
    fields,
    gguf_logits,
    kl_top1,
    llama,
    llama_cpp_src_or_skip,
    make_family_model,
    quantize,
    tensors,
)
from llmforge.errors import UsageError
from test_gguf_export import corpus

HEAD_DIM, WINDOW = 16, 8
_GEMMA = dict(head_dim=HEAD_DIM, query_pre_attn_scalar=HEAD_DIM, sliding_window=WINDOW)
_PARTS = ("blk.1.post_attention_norm.weight", "blk.1.post_ffw_norm.weight", "blk.1.ffn_norm.weight")

GEMMA: dict[str, Family] = {
    "gemma2": Family(
        "gemma2",
        "Gemma2ForCausalLM",
        "Gemma2Config",
        "gemma2",
        config={**_GEMMA, "attn_logit_softcapping": 5.0, "final_logit_softcapping": 3.0},
        tokenizer="gpt-2",
        tied=True,
        norm_init=(-0.5, 0.5),
        must_have=_PARTS,
        must_lack=("output.weight", "blk.0.attn_q_norm.weight"),
    ),
    "gemma3": Family(
        "gemma3",
        "Gemma3ForCausalLM",
        "Gemma3TextConfig",
        "gemma3",
        config={
            **_GEMMA,
            "final_logit_softcapping": 4.0,
            "layer_types": ["full_attention", "sliding_attention"],
            "rope_parameters": {
                "full_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
            },
        },
        tokenizer="gpt-2",
        tied=True,
        norm_init=(-0.5, 0.5),
        must_have=(*_PARTS, "blk.0.attn_q_norm.weight", "blk.1.attn_k_norm.weight"),
        must_lack=("output.weight",),
    ),
}
NAMES = list(GEMMA)


def hf_eager_logits(model_dir: Path, ids: list[int]) -> np.ndarray:
    """transformers' logits with eager attention: its SDPA path leaves out Gemma 2's attention soft-cap."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        return model.eval()(torch.tensor([ids])).logits[0].double().numpy()


def hf_ids(model_dir: Path, text: str) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))(text, add_special_tokens=False)["input_ids"]


def parity(model_dir: Path, gguf: Path, text: str = MULTILINGUAL) -> tuple[float, float]:
    """llama.cpp tokenizes like transformers and its logits match (mean KL, top-1 agreement)."""
    llm = llama(gguf)
    ids = hf_ids(model_dir, text)
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids, "tokenization differs"
    assert len(ids) > 4 * WINDOW  # the sliding window cuts in
    kl, top1 = kl_top1(hf_eager_logits(model_dir, ids), gguf_logits(llm, ids))
    assert kl < 1e-3 and top1 >= 0.98, f"{gguf.name}: mean KL {kl:.2e}, top-1 {top1:.3f}"
    return kl, top1


def st_tensor(model_dir: Path, name: str) -> np.ndarray:
    from safetensors.numpy import load_file

    return load_file(str(model_dir / "model.safetensors"))[name]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Each Gemma's tiny model and its F32 export, built on first use."""
    root = tmp_path_factory.mktemp("gemma")
    cache: dict = {}

    def get(name: str) -> dict:
        if name not in cache:
            model = make_family_model(GEMMA[name], root / name)
            f32 = root / f"{name}.f32.gguf"
            cache[name] = {"model": model, "f32": f32, "summary": export(model, f32, "f32")}
        return cache[name]

    return get


# ------------------------------------------------------------------------------------------------
# F32: llama.cpp computes what transformers computes


@pytest.mark.parametrize("name", NAMES)
def test_f32_matches_transformers(built, name):
    b, fam = built(name), GEMMA[name]
    assert b["summary"]["arch"] == fam.gguf_arch and b["summary"]["hf_architecture"] == fam.model_class
    names = tensors(b["f32"])
    assert all(n in names for n in fam.must_have), sorted(names)
    assert not any(n in names for n in fam.must_lack), sorted(names)
    kl, top1 = parity(b["model"], b["f32"])
    assert kl < 1e-3 and top1 >= 0.98


@pytest.mark.parametrize("name", NAMES)
def test_norms_get_one_added_and_the_embedding_is_not_scaled(built, name):
    b = built(name)
    names = tensors(b["f32"])
    pairs = [
        ("blk.0.attn_norm.weight", "model.layers.0.input_layernorm.weight"),
        ("blk.1.post_attention_norm.weight", "model.layers.1.post_attention_layernorm.weight"),
        ("blk.1.ffn_norm.weight", "model.layers.1.pre_feedforward_layernorm.weight"),
        ("blk.1.post_ffw_norm.weight", "model.layers.1.post_feedforward_layernorm.weight"),
        ("output_norm.weight", "model.norm.weight"),
    ]
    if name == "gemma3":
        pairs.append(("blk.1.attn_q_norm.weight", "model.layers.1.self_attn.q_norm.weight"))
    for ours, theirs in pairs:
        np.testing.assert_array_equal(names[ours].data, st_tensor(b["model"], theirs) + 1, err_msg=ours)
    # llama.cpp multiplies the embedding by sqrt(hidden) itself
    np.testing.assert_array_equal(names["token_embd.weight"].data, st_tensor(b["model"], "model.embed_tokens.weight"))


def test_gemma2_metadata(built):
    meta = fields(built("gemma2")["f32"])
    # both caps written: llama.cpp's gemma2 would otherwise assume 50 and 30
    assert meta["gemma2.attn_logit_softcapping"] == 5.0 and meta["gemma2.final_logit_softcapping"] == 3.0
    assert meta["gemma2.attention.sliding_window"] == WINDOW
    assert "gemma2.attention.sliding_window_pattern" not in meta  # sliding, global: llama.cpp's own pattern
    assert meta["gemma2.attention.key_length"] == HEAD_DIM and meta["gemma2.attention.value_length"] == HEAD_DIM
    assert "gemma2.rope.freq_base_swa" not in meta


def test_gemma3_metadata(built):
    meta = fields(built("gemma3")["f32"])
    assert meta["gemma3.final_logit_softcapping"] == 4.0 and "gemma3.attn_logit_softcapping" not in meta
    assert meta["gemma3.attention.sliding_window"] == WINDOW
    # global then sliding: not llama.cpp's default (five sliding of every six), so written per layer
    assert meta["gemma3.attention.sliding_window_pattern"] == [False, True]
    assert meta["gemma3.rope.freq_base"] == 10000.0 and meta["gemma3.rope.freq_base_swa"] == 100.0


def test_gemma3_untied_head(tmp_path):
    """llama.cpp's gemma3 takes an output head of its own (gemma2's does not: refused below)."""
    model = make_family_model(GEMMA["gemma3"], tmp_path / "untied", tied=False, seed=1)
    out = tmp_path / "untied.gguf"
    export(model, out, "f32")
    assert "output.weight" in tensors(out)
    parity(model, out)


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
    assert tensors(q8)["blk.0.post_ffw_norm.weight"].tensor_type.name == "F32"
    assert {t.tensor_type.name for t in tensors(k).values()} - {"F32", "F16"}
    reference = hf_eager_logits(b["model"], ids)
    for path, max_kl in ((f16, 1e-3), (q8, 5e-2), (k, 5e-1)):
        assert_generates(path, ids, n_vocab)
        kl, _ = kl_top1(reference, gguf_logits(llama(path), ids))
        assert kl < max_kl, f"{path.name}: KL {kl:.3e}"


# ------------------------------------------------------------------------------------------------
# a SentencePiece tokenizer, as Gemma checkpoints ship it


def gemma_sentencepiece(folder: Path) -> Path:
    """A SentencePiece BPE model trained here the way Gemma's is built: no dummy prefix, whitespace kept, byte
    fallback, digits split, <pad>/<eos>/<bos>/<unk> at 0-3, then <mask> and the turn markers as user-defined pieces
    (which transformers' GemmaTokenizer treats as special tokens)."""
    spm = pytest.importorskip("sentencepiece")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()),
        model_writer=buf,
        vocab_size=500,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        split_digits=True,
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        user_defined_symbols=["<mask>", "<start_of_turn>", "<end_of_turn>"],
        minloglevel=2,
    )
    folder.mkdir(parents=True)
    (folder / "tokenizer.model").write_bytes(buf.getvalue())
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "GemmaTokenizer",
                "bos_token": "<bos>",
                "eos_token": "<eos>",
                "pad_token": "<pad>",
                "unk_token": "<unk>",
            }
        )
    )
    return folder


def sentencepiece_gemma(name: str, root: Path, *, transformers_files: bool = True) -> Path:
    """A tiny Gemma saved with the SentencePiece tokenizer: transformers' tokenizer.json and tokenizer_config.json
    plus tokenizer.model, as Gemma checkpoints have them; or (transformers_files=False) tokenizer.model and the
    hand-written tokenizer_config.json only."""
    from transformers import AutoTokenizer

    sp = gemma_sentencepiece(root / f"{name}-sp")
    tok = AutoTokenizer.from_pretrained(str(sp))
    assert len(tok) == 500  # <mask> is a piece of the model: transformers adds no token of its own
    model = make_family_model(GEMMA[name], root / f"{name}-spm", tokenizer=tok, seed=2)
    if not transformers_files:
        for file in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
            (model / file).unlink(missing_ok=True)
        shutil.copy(sp / "tokenizer_config.json", model / "tokenizer_config.json")
    shutil.copy(sp / "tokenizer.model", model / "tokenizer.model")
    return model


def test_sentencepiece_tokenizer(tmp_path):
    """Gemma's tokenizer shape: tokenizer.model beside transformers' files. Text and the turn markers tokenize as in
    transformers (each marker one token), and the logits match on them."""
    model = sentencepiece_gemma("gemma3", tmp_path)
    out = tmp_path / "sp.gguf"
    assert export(model, out, "f32")["tokenizer"] == "llama"
    meta = fields(out)
    # Gemma's SentencePiece adds no dummy prefix; llama.cpp's default for this tokenizer type would add one
    assert meta["tokenizer.ggml.add_space_prefix"] is False
    assert meta["tokenizer.ggml.bos_token_id"] == 2 and meta["tokenizer.ggml.eos_token_id"] == 1
    # <mask> is special (CONTROL); the turn markers are tokens transformers matches whole without calling them
    # special: USER_DEFINED, which llama.cpp matches whole too
    assert [meta["tokenizer.ggml.token_type"][i] for i in (4, 5, 6)] == [3, 4, 4]
    kl, top1 = parity(model, out)
    assert kl < 1e-3 and top1 >= 0.98
    chat = "<start_of_turn>user\n  two  spaces, 12345<end_of_turn>\n<start_of_turn>model\n"
    ids = hf_ids(model, chat)
    assert ids[0] == 5 and ids.count(6) == 1
    llm = llama(out)
    # parsing specials, as chat prompts are (llama.cpp itself makes <end_of_turn>, an end-of-generation marker, a
    # control token, matched only then)
    assert llm.tokenize(chat.encode(), add_bos=False, special=True) == ids
    kl, _ = kl_top1(hf_eager_logits(model, ids), gguf_logits(llm, ids))
    assert kl < 1e-3


# ------------------------------------------------------------------------------------------------
# import: GGUF -> Hugging Face


@pytest.mark.parametrize("name", NAMES)
def test_import_back_to_hf(tmp_path, name):
    """`llmforge import` of the F32 export gives transformers the same model: the soft-caps, the attention scale,
    the sliding layers and RoPE bases come from the file's metadata (transformers' own GGUF reader leaves them at
    its config defaults: caps 50/30, query_pre_attn_scalar 256, its default layer pattern, one RoPE base)."""
    model = sentencepiece_gemma(name, tmp_path)
    out = tmp_path / "m.gguf"
    export(model, out, "f32")
    config = assert_round_trip(out, model, tmp_path / "back")
    original = json.loads((model / "config.json").read_text())
    assert config["architectures"] == [GEMMA[name].model_class]
    keys = ["attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar", "sliding_window"]
    keys += ["layer_types", "rope_parameters", "head_dim", "tie_word_embeddings"]
    assert {k: config.get(k) for k in keys} == {k: original.get(k) for k in keys}


def test_import_refuses_a_gemma_gguf_with_a_bpe_tokenizer(built, tmp_path):
    """transformers rebuilds a Gemma GGUF's tokenizer as SentencePiece: a byte-level BPE one would load and then fail
    on the first text, so the import says so instead."""
    from llmforge_plugins.gguf.importer import import_gguf

    with pytest.raises(UsageError) as info:
        import_gguf(built("gemma2")["f32"], tmp_path / "back")
    assert "gpt2" in info.value.render() and "SentencePiece" in info.value.render()
    assert not (tmp_path / "back").exists()


# ------------------------------------------------------------------------------------------------
# what llama.cpp cannot represent: refused before anything is written, naming config.json and the key


def refused(model: Path, tmp_path: Path, *words: str) -> str:
    out = tmp_path / "x.gguf"
    with pytest.raises(UsageError) as info:
        export(model, out)
    message = info.value.render()
    for word in ("config.json", *words):
        assert word in message, f"{word!r} not in: {message}"
    assert not out.exists()
    return message


def with_config(model: Path, folder: Path, **changes) -> Path:
    """A copy of `model` whose config.json has `changes` (None is written as null)."""
    shutil.copytree(model, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_attention_scale_llama_cpp_would_not_use_is_refused(built, tmp_path):
    """transformers scales by query_pre_attn_scalar ** -0.5; llama.cpp by 1/sqrt(head_dim) at this size."""
    message = refused(
        with_config(built("gemma2")["model"], tmp_path / "s", query_pre_attn_scalar=256), tmp_path,
        "query_pre_attn_scalar is 256", "head_dim = 16",
    )  # fmt: skip
    assert "gemma2" in message


def test_gemma2_without_soft_caps_or_with_an_untied_head_is_refused(built, tmp_path):
    model = built("gemma2")["model"]
    refused(with_config(model, tmp_path / "a", attn_logit_softcapping=None), tmp_path, "attn_logit_softcapping")
    refused(with_config(model, tmp_path / "f", final_logit_softcapping=None), tmp_path, "final_logit_softcapping")
    refused(with_config(model, tmp_path / "t", tie_word_embeddings=False), tmp_path, "tie_word_embeddings")


def test_gemma3_attention_soft_cap_is_refused(built, tmp_path):
    refused(
        with_config(built("gemma3")["model"], tmp_path / "a", attn_logit_softcapping=50.0), tmp_path,
        "attn_logit_softcapping", "gemma3",
    )  # fmt: skip


def test_absent_keys_take_transformers_defaults(built):
    """A config.json without the soft-caps, tie_word_embeddings or query_pre_attn_scalar runs in transformers with its
    config class's defaults (50, 30, tied, 256): the export reads them the same way, and so refuses the scale here
    (256 is not this model's head_dim)."""
    from llmforge_plugins.gguf.arch.gemma import Gemma2

    model = built("gemma2")["model"]
    config = json.loads((model / "config.json").read_text())
    for key in ("attn_logit_softcapping", "final_logit_softcapping", "tie_word_embeddings", "query_pre_attn_scalar"):
        del config[key]
    hp = Gemma2().hparams(config, model)
    assert hp.extra["attn_logit_softcapping"] == 50.0 and hp.extra["final_logit_softcapping"] == 30.0 and hp.tied
    with pytest.raises(UsageError, match="query_pre_attn_scalar is 256"):
        Gemma2().check(hp, lambda *a, **k: None)


def test_released_gemma3_config(tmp_path):
    """The real Gemma-3-1B config.json (transformers 4 spelling: rope_local_base_freq, sliding_window_pattern 6):
    accepted as is, with its two RoPE bases and its window, and no per-layer pattern (llama.cpp's default is the
    same); query_pre_attn_scalar 256 = head_dim 256 passes the attention-scale check."""
    import gguf

    from llmforge_plugins.gguf.arch import find_arch

    where = Path(__file__).parent / "fixtures" / "configs" / "Gemma-3-1B"
    config = json.loads((where / "config.json").read_text())
    arch = find_arch(config, where)
    hp = arch.hparams(config, where)
    arch.check(hp, lambda *a, **k: None)
    writer = gguf.GGUFWriter(path=None, arch=arch.gguf_name)
    arch.metadata(writer, hp, lambda *a, **k: None)
    kv = {k: v.value for k, v in writer.kv_data[0].items()}
    assert kv["gemma3.attention.sliding_window"] == 512 and kv["gemma3.rope.freq_base_swa"] == 10000.0
    assert "gemma3.attention.sliding_window_pattern" not in kv and "gemma3.final_logit_softcapping" not in kv
    assert hp.rope["rope_theta"] == 1000000 and hp.head_dim == 256
    assert hp.extra["sliding"] == [(i + 1) % 6 != 0 for i in range(26)]


# ------------------------------------------------------------------------------------------------
# the same bytes as llama.cpp's converter


#: keys llmforge writes that the converter leaves out, and why: the unknown token's id (from tokenizer_config.json;
#: without a tokenizer.json the converter reads special ids from config.json only); Gemma 2's RoPE base (the
#: converter's Gemma 2 writes none and llama.cpp assumes 10000, right only for models trained with it)
GEMMA_EXTRA_KEYS = {*EXTRA_KEYS, "tokenizer.ggml.unknown_token_id", "gemma2.rope.freq_base"}


@pytest.mark.slow
@pytest.mark.parametrize("outtype", ["f32", "f16", "q8_0"])
@pytest.mark.parametrize("name", NAMES)
def test_byte_identical_to_llama_cpp_converter(tmp_path, name, outtype):
    """Exports tensor for tensor identical to convert_hf_to_gguf.py's (unmodified, its own gguf-py), and the same
    metadata (we may add GEMMA_EXTRA_KEYS), on a tiny Gemma with a SentencePiece tokenizer (the converter reads Gemma
    2's vocabulary from tokenizer.model only). Gemma 3 is given llama.cpp's default layer pattern here: the converter
    writes no per-layer pattern."""
    from llmforge_plugins.gguf.converter import converter_command

    src = llama_cpp_src_or_skip()
    # without transformers' tokenizer files: the converter takes the markers' types from tokenizer_config.json's
    # added_tokens_decoder only, and llmforge keeps SentencePiece's own types for <unk>/<bos>/... listed there
    model = sentencepiece_gemma(name, tmp_path, transformers_files=False)
    if name == "gemma3":
        config = json.loads((model / "config.json").read_text())
        config["layer_types"] = ["sliding_attention", "sliding_attention"]
        (model / "config.json").write_text(json.dumps(config))
    ours, theirs = tmp_path / "ours.gguf", tmp_path / "theirs.gguf"
    export(model, ours, outtype)
    cmd, env = converter_command(src, model, theirs, outtype)
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    a, b = tensors(ours), tensors(theirs)
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].tensor_type == b[key].tensor_type, key
        assert a[key].shape.tolist() == b[key].shape.tolist(), key
        assert bytes(a[key].data) == bytes(b[key].data), f"{name}: {key} differs"
    fa, fb = fields(ours), fields(theirs)
    assert set(fa) - set(fb) <= GEMMA_EXTRA_KEYS, set(fa) - set(fb)
    assert set(fb) <= set(fa), set(fb) - set(fa)
    for key in fb:
        assert fa[key] == fb[key], key
