"""The built-in eval models (plugins/eval/hf_model.py, gguf_model.py) against plain transformers and llama.cpp.

A tiny Llama whose tokenizer adds a BOS (as Llama's does) and carries a ChatML template, saved as an HF folder and
exported to an F32 GGUF; a LoRA adapter on it. Log-likelihoods are checked against one transformers forward per
request computed here by hand (lm-eval's token bookkeeping spelled out), so that batching, sorting and the packed
shared-context rows can change nothing but the speed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from llmforge.errors import UsageError  # noqa: E402
from llmforge_plugins.eval.hf_model import HFEvalModel  # noqa: E402
from llmforge_plugins.eval.models import (  # noqa: E402
    cut_at_stop,
    encode_pairs,
    fit_request,
    open_model,
    rolling_windows,
)

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
STEPS = 60
CORPUS = [f"What is the capital of Land{i}? The capital of Land{i} is Town{i}." for i in range(200)]


def _tokenizer(folder: Path):
    """Byte-level BPE with a BOS its post-processor adds (Llama-style), ChatML markers and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<s>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
    tok.train_from_iterator(
        CORPUS,
        trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=specials,
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>", pad_token="<|pad|>")
    fast.chat_template = CHATML
    fast.save_pretrained(folder)
    return fast


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("eval-tiny")
    tok = _tokenizer(folder)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=48,  # small, so that truncation and rolling windows are exercised
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        # a few seconds of training on the corpus: answers that mean something (greedy continuations that are
        # right, stop strings that appear), not a random model's repetitions
        batch = tok(CORPUS, padding=True, return_tensors="pt")
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for _ in range(STEPS):
            rows = torch.randint(0, len(CORPUS), (32,))
            loss = model(
                input_ids=batch["input_ids"][rows], attention_mask=batch["attention_mask"][rows], labels=labels[rows]
            ).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def hf(tiny):
    model = HFEvalModel(tiny, batch_size=4)
    yield model
    model.close()


@pytest.fixture(scope="module")
def reference(tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(tiny)


def by_hand(reference, context: str, continuation: str, max_length: int = 48) -> tuple[float, bool]:
    """lm-eval's HFLM for one request, written out: trailing spaces moved, whole and context encoded with the
    tokenizer's BOS, the last max_length + 1 tokens kept, one forward, the continuation's log-probs summed."""
    model, tok = reference
    if context:
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        ctx = tok(context)["input_ids"]
        cont = tok(context + continuation)["input_ids"][len(ctx) :]
    else:
        ctx, cont = [tok.bos_token_id], tok(continuation, add_special_tokens=False)["input_ids"]
    inp = (ctx + cont)[-(max_length + 1) :][:-1]
    with torch.no_grad():
        logits = model(torch.tensor([inp])).logits[0, -len(cont) :]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    target = torch.tensor(cont)
    return float(logprobs.gather(1, target[:, None]).sum()), bool((logits.argmax(-1) == target).all())


REQUESTS = [
    ("What is the capital of Land3? The capital of Land3 is", " Town3."),
    ("What is the capital of Land3? The capital of Land3 is", " Town4."),
    ("What is the capital of Land3? The capital of Land3 is", " Town3"),
    ("What is the capital of Land3? The capital of Land3 is ", "Town12, of course."),
    ("What is the capital of Land7?", " The"),
    ("", "The capital"),
    # longer than the context (48): cut from the left
    (" ".join(CORPUS[:4]), " The capital of Land9 is Town9."),
    (" ".join(CORPUS[:4]), " Town"),
]


# ------------------------------------------------------------------------------------------------
# helpers (no model)


def test_encode_pairs_moves_trailing_spaces_and_splits_the_whole():
    calls = []

    def enc(texts, special):  # a tokenizer that merges " T" and adds a BOS (9) with special tokens
        calls.append(len(texts))
        return [([9] if special else []) + [ord(c) for c in t.replace(" T", "\x01")] for t in texts]

    requests = [("ab ", "Tc"), ("ab ", "Td"), ("", "xy"), ("", "\tz"), ("\tq", "r")]
    assert encode_pairs(enc, requests, 9, "\t") == [
        ([9, 97, 98], [1, 99]),
        ([9, 97, 98], [1, 100]),
        ([9], [120, 121]),  # an empty context is the prefix token
        ([9], [122]),  # ... unless the continuation starts with it
        ([9, 113], [114]),  # a text that starts with the prefix token's text gets no second one
    ]
    assert calls == [3, 4]  # one call per kind; "ab" encoded once for both choices


def test_fit_request_and_rolling_windows():
    assert fit_request([1, 2, 3, 4], [5, 6], 4) == [2, 3, 4]
    assert fit_request([1], [5, 6], 4) == [1]
    with pytest.raises(UsageError, match="does not fit"):
        fit_request([1], [5, 6, 7], 2)
    tokens = list(range(10, 20))
    windows = rolling_windows(tokens, 0, 4)
    assert windows == [([0], [10, 11, 12, 13]), ([13], [14, 15, 16, 17]), ([15, 16, 17], [18, 19])]
    assert [t for _, cont in windows for t in cont] == tokens
    assert all(len(c) + len(x) <= 5 for c, x in windows)
    # no prefix token: the first token is context, not scored
    assert rolling_windows([5, 6, 7], None, 4) == [([5], [6, 7])]


def test_cut_at_stop():
    assert cut_at_stop("a\n\nQ: b", ["Q:", "\n\n"]) == ("a", True)
    assert cut_at_stop("abc", ["x"]) == ("abc", False)


# ------------------------------------------------------------------------------------------------
# hf


def test_refuse_is_cheap_and_clear(tmp_path):
    assert HFEvalModel.refuse(tmp_path) is not None
    with pytest.raises(UsageError, match="no eval model opens it"):
        open_model(tmp_path, {"hf": HFEvalModel})
    with pytest.raises(UsageError, match="no such file"):
        open_model(tmp_path / "nope", {"hf": HFEvalModel})


def test_loglikelihood_equals_one_forward_per_request(hf, reference):
    got = hf.loglikelihood(REQUESTS)
    for (context, continuation), (logprob, greedy) in zip(REQUESTS, got):
        want, want_greedy = by_hand(reference, context, continuation)
        assert logprob == pytest.approx(want, abs=1e-4), (context, continuation)
        assert greedy == want_greedy
    assert hf.share_prefix  # the packed rows passed their own check against plain rows
    assert {greedy for _, greedy in got} == {True, False}


def test_prefix_sharing_changes_nothing(hf):
    shared = hf.loglikelihood(REQUESTS)
    hf.share_prefix = False
    try:
        plain = hf.loglikelihood(REQUESTS)
    finally:
        hf.share_prefix = True
    for a, b in zip(shared, plain):
        assert a[0] == pytest.approx(b[0], abs=1e-4) and a[1] == b[1]


def test_split_rows_change_nothing(hf, monkeypatch):
    """A packed row over the token budget, or over a sliding attention window, is split: same scores."""
    import llmforge_plugins.eval.hf_model as hf_model

    many = [(REQUESTS[0][0], f" Town{i}.") for i in range(12)]
    want = hf.loglikelihood(many)
    monkeypatch.setattr(hf_model, "TOKEN_BUDGET", 30)
    for a, b in zip(hf.loglikelihood(many), want):
        assert a[0] == pytest.approx(b[0], abs=1e-4)
    monkeypatch.setattr(hf, "_window", 8)
    for a, b in zip(hf.loglikelihood(many), want):
        assert a[0] == pytest.approx(b[0], abs=1e-4)


def test_is_greedy_on_the_models_own_answer(hf, reference):
    model, tok = reference
    ctx = tok("What is the capital of Land5?")["input_ids"]
    with torch.no_grad():
        out = model.generate(torch.tensor([ctx]), max_new_tokens=3, do_sample=False)[0, len(ctx) :].tolist()
    # token ids as generated (a decoded answer may tokenize differently after the context)
    [(_, is_greedy), (_, other)] = hf.score_tokens([(ctx, out), (ctx, [*out[:2], (out[2] + 1) % 400])])
    assert is_greedy is True and other is False


def test_rolling_on_a_text_longer_than_the_context(hf, reference):
    model, tok = reference
    text = " ".join(CORPUS[:6])
    tokens = tok(text, add_special_tokens=False)["input_ids"]
    assert len(tokens) > 2 * 48
    [(total, count)] = hf.loglikelihood_rolling([text])
    assert count == len(tokens)
    want = 0.0
    for ctx, cont in rolling_windows(tokens, tok.bos_token_id, 48):
        with torch.no_grad():
            logits = model(torch.tensor([(ctx + cont)[:-1]])).logits[0, -len(cont) :]
        want += float(torch.log_softmax(logits, -1).gather(1, torch.tensor(cont)[:, None]).sum())
    assert total == pytest.approx(want, abs=1e-3)
    assert math.isfinite(math.exp(-total / count))


def test_generate_greedy_equals_model_generate(hf, reference):
    model, tok = reference
    prompts = ["What is the capital of Land1?", "The capital", hf.prompt([{"role": "user", "content": "Land2?"}])]
    got = hf.generate(prompts, max_new_tokens=6)
    for prompt, answer in zip(prompts, got):
        ids = hf._encode(prompt)
        with torch.no_grad():
            out = model.generate(
                torch.tensor([ids]), max_new_tokens=6, do_sample=False, eos_token_id=sorted(hf.engine.stops)
            )[0, len(ids) :].tolist()
        cut = next((k for k, t in enumerate(out) if t in hf.engine.stops), len(out))
        assert answer == tok.decode(out[:cut], skip_special_tokens=True), prompt


def test_generate_cuts_at_stop_strings(hf):
    [full] = hf.generate(["What is the capital of Land1?"], max_new_tokens=8)
    assert full.startswith(" The capital of Land")  # what the corpus taught it
    [cut] = hf.generate(["What is the capital of Land1?"], max_new_tokens=8, stop=["XYZ", " of"])
    assert cut == " The capital"


def test_chat_prompt_uses_the_template(hf):
    assert hf.has_chat_template
    text = hf.prompt([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_embed_is_mask_aware(hf):
    a, b, a_again = hf.embed(["The capital of Land1 is Town1.", "Town", "The capital of Land1 is Town1."])
    assert len(a) == 32 and a == pytest.approx(a_again, abs=1e-5)
    [alone] = hf.embed(["Town"])
    assert b == pytest.approx(alone, abs=1e-5)  # padding in its batch changed nothing


def test_lora_adapter_opens_and_differs_from_its_base(tiny, hf, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    peft = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapter = tmp_path / "adapter"
    peft.save_pretrained(adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tiny)
    model = open_model(adapter, {"hf": HFEvalModel}, label="lora")
    try:
        assert model.label == "lora" and model.has_chat_template  # the base's tokenizer and template
        [(lora, _)] = model.loglikelihood([REQUESTS[0]])
        [(plain, _)] = hf.loglikelihood([REQUESTS[0]])
        assert abs(lora - plain) > 1e-3
    finally:
        model.close()


# ------------------------------------------------------------------------------------------------
# gguf


@pytest.fixture(scope="module")
def gguf(tiny, tmp_path_factory):
    from llmforge_plugins.eval.gguf_model import GGUFEvalModel
    from llmforge_plugins.gguf.export import export_gguf

    out = tmp_path_factory.mktemp("eval-gguf") / "tiny-f32.gguf"
    export_gguf(tiny, out, "f32")
    model = GGUFEvalModel(out, threads=1)
    yield model
    model.close()


def test_registry_opens_folders_with_hf_and_gguf_files_with_gguf(tiny, gguf):
    from llmforge.testing import load_test_registry

    registry = load_test_registry()
    model = open_model(gguf.path, registry, label="f32")
    try:
        assert (model.name, model.label, model.context) == ("gguf", "f32", 48)
    finally:
        model.close()
    with pytest.raises(UsageError, match=r"hf: not a model directory.*gguf: not a GGUF file"):
        open_model(tiny / "config.json", registry)


def test_gguf_f32_scores_like_the_hf_model(hf, gguf):
    assert gguf._encode(REQUESTS[0][0]) == hf._encode(REQUESTS[0][0])  # llama.cpp adds the same BOS
    for (a, ga), (b, gb) in zip(gguf.loglikelihood(REQUESTS), hf.loglikelihood(REQUESTS)):
        # float32 in both, summed in another order: 1e-3 absolute, or 1e-4 of an unlikely answer's large sum
        assert a == pytest.approx(b, rel=1e-4, abs=1e-3) and ga == gb
    text = " ".join(CORPUS[:6])
    [(a, n)], [(b, m)] = gguf.loglikelihood_rolling([text]), hf.loglikelihood_rolling([text])
    assert n == m and a == pytest.approx(b, rel=1e-4)


def test_gguf_generates_and_prompts_like_the_hf_model(hf, gguf):
    messages = [{"role": "user", "content": "Land2?"}]
    assert gguf.has_chat_template and gguf.prompt(messages) == hf.prompt(messages)
    prompts = ["What is the capital of Land1?", gguf.prompt(messages)]
    assert gguf.generate(prompts, max_new_tokens=6) == hf.generate(prompts, max_new_tokens=6)
    with pytest.raises(NotImplementedError, match="embed"):
        gguf.embed(["x"])


def test_modules_import_nothing_heavy(tmp_path):
    import subprocess
    import sys

    tiny = tmp_path / "model"
    tiny.mkdir()
    (tiny / "config.json").write_text("{}")

    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from llmforge_plugins.eval import gguf_model, hf_model, models\n"
        f"assert hf_model.HFEvalModel.refuse(Path({str(tiny)!r})) is None\n"
        f"assert gguf_model.GGUFEvalModel.refuse(Path({str(tiny)!r})) is not None\n"
        "heavy = sorted({'torch', 'transformers', 'llama_cpp', 'numpy'} & set(sys.modules))\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
