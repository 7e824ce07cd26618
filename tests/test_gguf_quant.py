"""GGUF quantization, importance matrices and the parity scorecard (plugins/gguf: quantize, imatrix, check).

One small Llama is built with real transformers (hidden 256 and intermediate 512, so that rows are multiples
of 256 and llama.cpp really produces K-quants and IQ types instead of falling back), trained for a few steps
on a little text so its predictions are not uniform, saved with save_pretrained and exported to an F32 GGUF.
Everything downstream is real: llama.cpp's quantizer through llama-cpp-python, llama.cpp loading and
generating, transformers for the reference logits.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from llmforge.errors import UsageError

HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, VOCAB = 256, 512, 2, 4, 2, 400

CORPUS = [
    "The harbour town woke slowly. Fishing boats came back before sunrise and the market opened at seven.",
    "An old man sold coffee from a cart; he knew which customers wanted sugar before they said a word.",
    "A girl taught her brother to count the waves: one, two, three, and the seventh is the biggest.",
    "In the afternoon the wind rose, shutters banged and the café owner carried her chairs inside.",
    "def mean(values):\n    return sum(values) / len(values) if values else 0.0",
    "Résumé: opened in 1987, about 300 guests a day. 東京から来た旅行者もいます。 Merci! Danke! 😀",
    "By evening the storm had passed and the lights of the town came on one window after another.",
]


# ------------------------------------------------------------------------------------------------
# the model and its exports (built once for the module)


def _train_a_little(model, tokenizer, steps: int = 60) -> None:
    """A few optimizer steps on the corpus: a random model predicts an almost uniform distribution, which
    hides quantization error; a slightly trained one has peaked predictions that quantization can disturb."""
    ids = torch.tensor(tokenizer("\n".join(CORPUS * 4))["input_ids"])
    chunk = 64
    batch = torch.stack([ids[i : i + chunk] for i in range(0, len(ids) - chunk, chunk)][:4])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # ops this small run many times faster on one thread than on contended cores
    try:
        model.train()
        for _ in range(steps):
            model(input_ids=batch, labels=batch).loss.backward()
            opt.step()
            opt.zero_grad()
        model.eval()
    finally:
        torch.set_num_threads(threads)


def _export(model_dir: Path, out: Path, outtype: str) -> Path:
    from llmforge_plugins.gguf.export import export_gguf

    export_gguf(model_dir, out, outtype)
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmforge.chat import resolve_template
    from llmforge.plugins import load_registry
    from llmforge_plugins.gguf.check import TOKENIZER_PROBE
    from llmforge_plugins.training.models import train_tokenizer

    root = tmp_path_factory.mktemp("gguf_quant")
    tokenizer = train_tokenizer(
        CORPUS * 20 + [TOKENIZER_PROBE] * 5, VOCAB, resolve_template("chatml", load_registry(env="").chat_templates)
    )
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    _train_a_little(model, tokenizer)
    model_dir = root / "model"
    model.save_pretrained(str(model_dir))
    tokenizer.save_pretrained(str(model_dir))
    f32 = _export(model_dir, root / "model-f32.gguf", "f32")
    return {"root": root, "model": model_dir, "f32": f32, "net": model, "tokenizer": tokenizer}


@pytest.fixture(scope="module")
def imatrix_file(tiny):
    from llmforge_plugins.gguf.imatrix import compute_imatrix

    return compute_imatrix(tiny["model"], CORPUS * 10, tiny["root"] / "imatrix.safetensors", max_tokens=2000)


def _greedy(path: Path, prompt: list[int], n: int = 8) -> list[int]:
    # llama.cpp in its child process, with the machine's probe applied (on a CPU whose AMX kernels fault, an
    # in-process Llama would kill pytest with SIGILL on the first batch).
    from llmforge.native import LlamaModel

    with LlamaModel(path, n_ctx=128, logits_all=True) as llm:
        assert np.isfinite(llm.logits(prompt)).all()
        out = []
        for token in llm.generate(prompt, temp=0.0, seed=0):
            out.append(token)
            if len(out) == n:
                break
        return out


def _file_type(path: Path) -> int:
    from llmforge_plugins.gguf.quantize import gguf_field, read_gguf

    return gguf_field(read_gguf(path), "general.file_type")


# ------------------------------------------------------------------------------------------------
# the type table


def test_quant_types_are_llama_cpps_own():
    import llama_cpp

    from llmforge_plugins.gguf.quantize import QUANT_TYPES, needs_imatrix

    for name, value in QUANT_TYPES.items():
        constant = "LLAMA_FTYPE_ALL_F32" if name == "F32" else f"LLAMA_FTYPE_MOSTLY_{name}"
        assert getattr(llama_cpp, constant) == value, name
    offered = {n[len("LLAMA_FTYPE_MOSTLY_") :] for n in dir(llama_cpp) if n.startswith("LLAMA_FTYPE_MOSTLY_")}
    assert offered - set(QUANT_TYPES) == {"NVFP4"}  # the one this quantizer refuses (no default tensor type)

    assert needs_imatrix("iq2_xxs") and needs_imatrix("IQ1_S") and needs_imatrix("q2_k_s")
    assert not needs_imatrix("Q4_K_M") and not needs_imatrix("iq4_xs") and not needs_imatrix("Q2_K")


def test_unknown_type_is_refused_with_the_valid_ones(tiny):
    from llmforge_plugins.gguf.quantize import needs_imatrix, quantize_gguf

    out = tiny["root"] / "bad-type.gguf"
    with pytest.raises(UsageError) as err:
        quantize_gguf(tiny["f32"], out, "Q4_KM")
    assert "unknown quantization type 'Q4_KM'" in err.value.message
    assert "did you mean 'Q4_K_M'" in err.value.message
    assert "Q6_K" in err.value.hint and "IQ2_XXS" in err.value.hint
    assert not out.exists()
    with pytest.raises(UsageError):
        needs_imatrix("Q9")


# ------------------------------------------------------------------------------------------------
# quantizing


@pytest.mark.parametrize("qtype, tensor_type", [("Q4_K_M", "Q4_K"), ("q6_k", "Q6_K"), ("IQ4_XS", "IQ4_XS")])
def test_quantized_file_loads_and_generates(tiny, qtype, tensor_type):
    from llmforge_plugins.gguf.quantize import QUANT_TYPES, quantize_gguf

    out = tiny["root"] / f"model-{qtype}.gguf"
    summary = quantize_gguf(tiny["f32"], out, qtype)
    assert summary["qtype"] == qtype.upper() and summary["bytes"] == out.stat().st_size
    assert summary["bytes"] < summary["src_bytes"] / 4
    # the real type, not a fallback: the rows are multiples of 256
    assert summary["tensor_types"].get(tensor_type, 0) >= LAYERS * 4
    assert _file_type(out) == QUANT_TYPES[qtype.upper()]
    assert not list(out.parent.glob(f".{out.name}*"))  # no temporary left

    prompt = tiny["tokenizer"](CORPUS[0][:40])["input_ids"]
    tokens = _greedy(out, prompt)
    assert len(tokens) == 8 and all(0 <= t < len(tiny["tokenizer"]) for t in tokens)


def test_importance_matrix_is_the_mean_squared_input_of_each_weight(tiny, imatrix_file):
    from llmforge_plugins.gguf.imatrix import load_imatrix

    matrix = load_imatrix(imatrix_file)
    expected = {
        f"blk.{i}.{n}.weight"
        for i in range(LAYERS)
        for n in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
    }
    assert set(matrix) == expected | {"output.weight"}
    assert matrix["blk.1.ffn_down.weight"].shape == (INTER,) and matrix["blk.0.attn_q.weight"].shape == (HIDDEN,)
    assert all(v.dtype == np.float32 and (v > 0).all() for v in matrix.values())

    # recompute two entries by hand: q/k/v of layer 0 all read input_layernorm(embeddings)
    net, tok = tiny["net"], tiny["tokenizer"]
    ids = []
    for text in CORPUS * 10:
        ids.extend(tok(text)["input_ids"])
        if len(ids) >= 2000:
            break
    ids = ids[:2000]
    windows = [ids[i : i + 512] for i in range(0, len(ids), 512)]
    with torch.no_grad():
        xs = [net.model.layers[0].input_layernorm(net.model.embed_tokens(torch.tensor(w))) for w in windows]
        x = torch.cat(xs).double()
        # LlamaModel's output is already through the final norm: it is what lm_head reads
        normed_last = torch.cat([net.model(input_ids=torch.tensor([w])).last_hidden_state[0] for w in windows]).double()
    np.testing.assert_allclose(matrix["blk.0.attn_k.weight"], (x * x).mean(0).numpy(), rtol=1e-4)
    np.testing.assert_allclose(matrix["output.weight"], (normed_last * normed_last).mean(0).numpy(), rtol=1e-3)


def test_iq2_is_refused_without_an_importance_matrix(tiny):
    from llmforge_plugins.gguf.quantize import quantize_gguf

    out = tiny["root"] / "model-IQ2_XXS-no-imatrix.gguf"
    with pytest.raises(UsageError) as err:
        quantize_gguf(tiny["f32"], out, "iq2_xxs")
    assert err.value.message.startswith("IQ2_XXS needs an importance matrix: give calibration text (--calibration")
    assert not out.exists() and not list(out.parent.glob(f".{out.name}*"))


def test_iq2_with_the_computed_importance_matrix(tiny, imatrix_file):
    from llmforge_plugins.gguf.quantize import quantize_gguf

    out = tiny["root"] / "model-IQ2_XXS.gguf"
    summary = quantize_gguf(tiny["f32"], out, "IQ2_XXS", imatrix=imatrix_file)
    assert summary["imatrix_entries"] == LAYERS * 7 + 1
    assert summary["tensor_types"].get("IQ2_XXS", 0) >= LAYERS * 4
    assert summary["bytes"] < summary["src_bytes"] / 10
    prompt = tiny["tokenizer"](CORPUS[1][:40])["input_ids"]
    assert len(_greedy(out, prompt)) == 8


def test_importance_matrix_that_does_not_fit_the_model(tiny, imatrix_file):
    from safetensors.numpy import save_file

    from llmforge_plugins.gguf.imatrix import load_imatrix
    from llmforge_plugins.gguf.quantize import quantize_gguf

    matrix = load_imatrix(imatrix_file)
    matrix["blk.1.ffn_down.weight"] = np.ones(HIDDEN, dtype=np.float32)  # the tensor has INTER columns
    wrong = tiny["root"] / "wrong-size.safetensors"
    save_file(matrix, str(wrong))
    out = tiny["root"] / "model-wrong.gguf"
    with pytest.raises(UsageError) as err:
        quantize_gguf(tiny["f32"], out, "IQ2_XS", imatrix=wrong)
    assert "'blk.1.ffn_down.weight' has 256 values, the tensor has 512 columns" in err.value.message
    assert not out.exists()

    del matrix["blk.1.ffn_down.weight"]
    partial = tiny["root"] / "partial.safetensors"
    save_file(matrix, str(partial))
    with pytest.raises(UsageError, match="no entry for blk.1.ffn_down.weight"):
        quantize_gguf(tiny["f32"], out, "IQ2_XS", imatrix=partial)

    matrix["blk.0.attn_q.weight"] = np.full(HIDDEN, np.nan, dtype=np.float32)
    save_file(matrix, str(wrong))
    with pytest.raises(UsageError, match="'blk.0.attn_q.weight' has negative, NaN or infinite values"):
        load_imatrix(wrong)
    garbage = tiny["root"] / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(UsageError, match="not an importance matrix"):
        quantize_gguf(tiny["f32"], out, "IQ2_XS", imatrix=garbage)
    assert not out.exists()


def test_bad_inputs_are_refused_before_any_work(tiny):
    from llmforge_plugins.gguf.quantize import quantize_gguf

    root = tiny["root"]
    data = tiny["f32"].read_bytes()
    truncated = root / "truncated.gguf"
    truncated.write_bytes(data[: len(data) * 2 // 3])
    cut_header = root / "cut-header.gguf"
    cut_header.write_bytes(data[:200])
    not_gguf = root / "notes.gguf"
    not_gguf.write_text("hello, not a model\n")
    out = root / "out.gguf"

    for bad in (truncated, cut_header):
        with pytest.raises(UsageError, match="truncated") as err:
            quantize_gguf(bad, out, "Q4_K_M")
        assert str(bad) in err.value.message
    with pytest.raises(UsageError, match="not a GGUF file"):
        quantize_gguf(not_gguf, out, "Q4_K_M")
    with pytest.raises(UsageError, match="GGUF file not found"):
        quantize_gguf(root / "missing.gguf", out, "Q4_K_M")
    assert not out.exists()

    q8 = root / "model-q8-for-requant.gguf"
    quantize_gguf(tiny["f32"], q8, "Q8_0")
    with pytest.raises(UsageError, match=r"already quantized \(Q8_0 tensors\)"):
        quantize_gguf(q8, out, "Q4_K_M")
    with pytest.raises(UsageError, match="overwrite the input"):
        quantize_gguf(tiny["f32"], tiny["f32"], "Q8_0")
    assert not out.exists()


# ------------------------------------------------------------------------------------------------
# the scorecard


def test_scorecard(tiny):
    from llmforge_plugins.gguf.check import check_gguf, scorecard_markdown
    from llmforge_plugins.gguf.quantize import quantize_gguf

    q8, q4 = tiny["root"] / "card-Q8_0.gguf", tiny["root"] / "card-Q4_K_M.gguf"
    quantize_gguf(tiny["f32"], q8, "Q8_0")
    quantize_gguf(tiny["f32"], q4, "Q4_K_M")
    card = check_gguf(tiny["model"], [tiny["f32"], q8, q4])
    f32, r8, r4 = card["rows"]
    assert [r["type"] for r in card["rows"]] == ["F32", "Q8_0", "Q4_K_M"]
    assert card["tokens"] > 200 and card["probe_tokens"] > 50

    # the F32 export is the HF model (up to llama.cpp's F16 KV cache and summation order)
    assert f32["top1"] == 1.0 and f32["mean_kld"] < 1e-5 and f32["max_rel_logit_error"] < 1e-2
    assert abs(f32["delta_ppl"]) < 1e-3 * card["hf_ppl"]
    # quantization costs something, more at 4 bits than at 8
    assert r8["mean_kld"] < r4["mean_kld"] < 0.5 and r4["top1"] > 0.5
    assert r4["bytes"] < r8["bytes"] < f32["bytes"]
    assert 30 < f32["bpw"] < 34 and 8 < r8["bpw"] < 10 and 4 < r4["bpw"] < 7
    for r in card["rows"]:
        assert r["tokenization_ok"], r["tokenization_diff"]
        assert all(math.isfinite(r[k]) for k in ("ppl", "delta_ppl", "mean_kld", "top1", "bpw"))

    table = scorecard_markdown(card)
    assert "| model-f32.gguf | F32 |" in table and "| card-Q4_K_M.gguf | Q4_K_M |" in table
    assert "| 100.0% |" in table and table.count("| ok |") == 3

    # against a reference GGUF: ΔPPL is the quantization's own cost
    card = check_gguf(tiny["model"], [q4], reference=tiny["f32"], text="\n".join(CORPUS))
    assert card["hf_ppl"] < len(tiny["tokenizer"]) / 8  # the text it was trained on: it has learnt some of it
    assert card["reference_ppl"] == pytest.approx(card["hf_ppl"], rel=1e-3)
    assert card["rows"][0]["delta_ppl"] == pytest.approx(card["rows"][0]["ppl"] - card["reference_ppl"])
    assert "reference model-f32.gguf" in scorecard_markdown(card)


def test_scorecard_refuses_a_bad_file_first(tiny):
    from llmforge_plugins.gguf.check import check_gguf

    bad = tiny["root"] / "not-a-model.gguf"
    bad.write_bytes(b"GGML" + b"\x00" * 100)
    with pytest.raises(UsageError, match="not-a-model.gguf: not a GGUF file"):
        check_gguf(tiny["model"], [tiny["f32"], bad])
    with pytest.raises(UsageError, match="no GGUF file"):
        check_gguf(tiny["model"], [])


def test_modules_import_nothing_heavy():
    code = (
        "import sys; import llmforge_plugins.gguf.quantize, llmforge_plugins.gguf.imatrix, "
        "llmforge_plugins.gguf.check; "
        "print(sorted(m for m in ('torch', 'transformers', 'llama_cpp', 'gguf', 'numpy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
