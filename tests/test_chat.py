"""Chat templates and loss masking, on a real byte-level BPE tokenizer trained here in a second.

The masking tests check the labels against the conversation itself: the trained tokens, decoded,
must be exactly each assistant message followed by its end-of-turn token, and nothing else.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re

import pytest

pytest.importorskip("tokenizers")
pytest.importorskip("transformers")

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

from llmforge.chat import (  # noqa: E402
    DEFAULT_PAD,
    IGNORE_INDEX,
    TOKENIZER_CONFIG_KEY,
    ChatTemplate,
    ChatTemplateError,
    apply_template,
    encode_chat,
    render,
    resolve_template,
)
from llmforge.errors import UsageError  # noqa: E402
from llmforge.plugins import load_registry  # noqa: E402
from llmforge_plugins.chat_templates import BUILTIN_TEMPLATES  # noqa: E402

TEMPLATES = {t.name: t for t in BUILTIN_TEMPLATES}

CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is two plus three?"},
    {"role": "assistant", "content": "Two plus three is five."},
    {"role": "user", "content": "Tell me about the cat, please."},
    # unseen words and multi-byte characters: byte-level pieces must still be labelled whole
    {"role": "assistant", "content": "The cat sat on the mat at the café ☕.\nYes, really."},
]
ANSWERS = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]


@pytest.fixture(scope="module")
def base_tokenizer_json() -> str:
    """A small byte-level BPE trained on synthetic sentences, serialised once for the module."""
    words = [
        "the",
        "a",
        "cat",
        "dog",
        "sat",
        "on",
        "mat",
        "what",
        "is",
        "two",
        "plus",
        "three",
        "five",
        "answer",
        "hello",
        "world",
        "please",
        "tell",
        "me",
        "about",
        "yes",
        "no",
        "you",
        "are",
        "helpful",
        "assistant",
        "really",
    ]
    rng = random.Random(0)
    sentences = [
        " ".join(rng.choice(words) for _ in range(rng.randint(4, 12))).capitalize() + rng.choice(".?!")
        for _ in range(400)
    ]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(sentences, trainer)
    return tok.to_str()


@pytest.fixture
def make_tokenizer(base_tokenizer_json):
    """A fresh transformers tokenizer each call (apply_template mutates it)."""
    from transformers import PreTrainedTokenizerFast

    def make():
        return PreTrainedTokenizerFast(
            tokenizer_object=Tokenizer.from_str(base_tokenizer_json), eos_token="<|endoftext|>"
        )

    return make


def _decode(tok, ids) -> str:
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _trained_runs(tok, enc) -> list[str]:
    """The decoded text of each maximal run of trained tokens."""
    runs, current = [], []
    for tid, label in zip(enc.input_ids, enc.labels):
        assert label in (IGNORE_INDEX, tid)
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(tid)
    if current:
        runs.append(current)
    return [_decode(tok, r) for r in runs]


def _prepared(make_tokenizer, name):
    template = TEMPLATES[name]
    tok = make_tokenizer()
    before = len(tok)
    added = apply_template(tok, template)
    assert added == len(tok) - before
    return tok, template


def test_builtins_are_registered_as_plugins():
    from llmforge.plugins import load_registry

    reg = load_registry(env="")  # the built-ins only
    assert not [e for e in reg.errors if e.plugin == "chat_templates"], reg.errors
    for name in ("chatml", "llama3", "alpaca", "mistral", "qwen", "gemma", "phi3"):
        assert reg.chat_templates[name] is TEMPLATES[name]
    assert "chat_templates" in [p.name for p in reg.plugins if "chat_templates" in p.provides]


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_template_declares_the_tokens_it_uses(name):
    t = TEMPLATES[name]
    assert t.eos and t.pad and t.pad != t.eos
    required = t.required_tokens
    assert t.eos in required and t.pad in required and (t.bos is None or t.bos in required)
    for marker in (*t.special_tokens, t.eos, t.bos):
        if marker and marker not in ("<|end_of_text|>", "<|endoftext|>"):  # document ends, not in chat text
            assert marker in t.source, marker
    assert t.stop_strings[0] == t.eos


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_only_assistant_turns_are_trained(make_tokenizer, name):
    tok, template = _prepared(make_tokenizer, name)
    enc = encode_chat(tok, template, CONVERSATION)
    text = render(template, CONVERSATION)
    assert _decode(tok, enc.input_ids) == text  # nothing lost or added (no extra BOS)
    assert not enc.truncated and len(enc.labels) == len(enc.input_ids)

    runs = _trained_runs(tok, enc)
    # Mistral's answer starts with the space after [/INST]; it belongs to the answer.
    assert [r.lstrip(" ") for r in runs] == [a + template.eos for a in ANSWERS]
    assert enc.n_trained == sum(1 for x in enc.labels if x != IGNORE_INDEX)

    # The untrained tokens are everything else: headers, system and user turns, separators.
    untrained = _decode(tok, [t for t, lab in zip(enc.input_ids, enc.labels) if lab == IGNORE_INDEX])
    for m in CONVERSATION:
        if m["role"] != "assistant":
            assert m["content"] in untrained
    assert "five" not in untrained and "café" not in untrained

    # Each trained run starts right after the generation prompt the model will see at inference.
    for i in (2, 4):
        prompt = render(template, CONVERSATION[:i], add_generation_prompt=True)
        assert text.startswith(prompt)
        n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
        assert enc.labels[n_prompt - 1] == IGNORE_INDEX
        assert enc.labels[n_prompt] != IGNORE_INDEX


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_train_on_last_turn_and_all(make_tokenizer, name):
    tok, template = _prepared(make_tokenizer, name)
    last = encode_chat(tok, template, CONVERSATION, train_on="last_turn")
    assert [r.lstrip(" ") for r in _trained_runs(tok, last)] == [ANSWERS[-1] + template.eos]
    everything = encode_chat(tok, template, CONVERSATION, train_on="all")
    assert everything.labels == everything.input_ids
    assert everything.n_trained == len(everything.input_ids)
    with pytest.raises(ChatTemplateError, match="train_on"):
        encode_chat(tok, template, CONVERSATION, train_on="assistants")


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_truncation_is_reported(make_tokenizer, name):
    tok, template = _prepared(make_tokenizer, name)
    full = encode_chat(tok, template, CONVERSATION)
    exact = encode_chat(tok, template, CONVERSATION, max_length=len(full))
    assert not exact.truncated and exact.input_ids == full.input_ids
    cut = encode_chat(tok, template, CONVERSATION, max_length=len(full) - 3)
    assert cut.truncated and len(cut.input_ids) == len(full) - 3
    assert cut.input_ids == full.input_ids[:-3] and cut.labels == full.labels[:-3]
    assert cut.n_trained == sum(x != IGNORE_INDEX for x in cut.labels) < full.n_trained


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_render_matches_transformers_and_survives_save(make_tokenizer, name, tmp_path):
    from transformers import AutoTokenizer

    tok, template = _prepared(make_tokenizer, name)
    for msgs, gen in ((CONVERSATION, False), (CONVERSATION[:4], True)):
        assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen) == render(
            template, msgs, add_generation_prompt=gen
        )
    enc = encode_chat(tok, template, CONVERSATION)
    assert tok.apply_chat_template(CONVERSATION, tokenize=True, return_dict=False) == enc.input_ids

    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again.chat_template == template.source
    assert again.eos_token == template.eos and again.pad_token == template.pad
    assert again.bos_token == template.bos or (template.bos is None and again.bos_token == tok.bos_token)
    assert again.eos_token_id == tok.eos_token_id and again.pad_token_id == tok.pad_token_id
    assert len(again) == len(tok)
    # the {name, hash} apply_template recorded survives save_pretrained
    assert dict(again.init_kwargs[TOKENIZER_CONFIG_KEY]) == {"name": template.name, "hash": template.hash}
    assert apply_template(again, template) == 0  # already carries everything
    enc2 = encode_chat(again, template, CONVERSATION)
    assert (enc2.input_ids, enc2.labels) == (enc.input_ids, enc.labels)
    # "auto" now finds the same template in the saved tokenizer
    auto = resolve_template("auto", {}, tokenizer=again)
    assert auto.source == template.source and auto.eos == template.eos and auto.pad == template.pad


def test_apply_template_adds_a_pad_distinct_from_eos(make_tokenizer):
    tok = make_tokenizer()
    bare = ChatTemplate(
        name="bare", source=TEMPLATES["chatml"].source, eos="<|im_end|>", special_tokens=("<|im_start|>",)
    )
    added = apply_template(tok, bare)
    assert added == 3  # <|im_start|>, <|im_end|>, <|pad|>
    assert tok.pad_token == DEFAULT_PAD and tok.pad_token_id != tok.eos_token_id
    assert tok.eos_token == "<|im_end|>"
    for t in ("<|im_start|>", "<|im_end|>", DEFAULT_PAD):
        assert len(tok(t, add_special_tokens=False)["input_ids"]) == 1
    with pytest.raises(ChatTemplateError, match="pad"):
        apply_template(make_tokenizer(), dataclasses.replace(bare, pad="<|im_end|>"))


def test_encode_needs_the_template_tokens(make_tokenizer):
    with pytest.raises(ChatTemplateError, match=re.escape("<|im_end|>")) as err:
        encode_chat(make_tokenizer(), TEMPLATES["chatml"], CONVERSATION)
    assert "apply_template" in err.value.hint


def test_template_that_rewrites_history_is_refused_not_mislabelled(make_tokenizer):
    # Renders the final message differently from the same message inside a longer conversation.
    source = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
        "{% if loop.last %} (final){% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    odd = ChatTemplate(
        name="odd", source=source, eos="<|im_end|>", pad="<|endoftext|>", special_tokens=("<|im_start|>",)
    )
    tok = make_tokenizer()
    apply_template(tok, odd)
    with pytest.raises(ChatTemplateError, match="'odd'"):
        encode_chat(tok, odd, CONVERSATION)
    assert encode_chat(tok, odd, CONVERSATION, train_on="all").n_trained > 0


def test_template_errors_name_the_template(make_tokenizer):
    tok, template = _prepared(make_tokenizer, "mistral")
    bad = [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}]
    with pytest.raises(ChatTemplateError, match="'mistral'.*alternate"):
        encode_chat(tok, template, bad)
    with pytest.raises(ChatTemplateError, match="syntax error"):
        render(ChatTemplate(name="broken", source="{% for m in messages %}", eos="x"), [])


def test_render_environment_matches_transformers(make_tokenizer):
    # {% generation %} blocks, strftime_now, tojson and loop controls are part of the HF dialect.
    source = (
        "{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}"
        "{{ m.role }}: {% if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}"
        "{% else %}{{ m.content | tojson }}{% endif %}{{ '\\n' }}{% endfor %}"
        "{{ strftime_now('%Y') | length }}{{ eos_token }}"
    )
    t = ChatTemplate(name="dialect", source=source, eos="<|endoftext|>")
    tok = make_tokenizer()
    tok.chat_template = source
    text = render(t, CONVERSATION)
    assert text == tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert text.startswith('user: "What is two plus three?"\nassistant: Two plus three is five.\n')
    assert text.endswith("4<|endoftext|>")


def test_hash_follows_the_template():
    t = TEMPLATES["chatml"]
    assert t.hash == dataclasses.replace(t).hash
    assert t.hash != dataclasses.replace(t, source=t.source + " ").hash
    assert t.hash != dataclasses.replace(t, eos="<|endoftext|>").hash
    assert t.hash != dataclasses.replace(t, pad="<pad>").hash
    assert len({x.hash for x in BUILTIN_TEMPLATES}) == len(BUILTIN_TEMPLATES)


def test_resolve_by_name_and_unknown_name():
    assert resolve_template("llama3", templates=TEMPLATES) is TEMPLATES["llama3"]
    assert resolve_template("chatml", load_registry(env="").chat_templates).name == "chatml"  # the built-in plugins
    with pytest.raises(ChatTemplateError) as err:
        resolve_template("chatlm", templates=TEMPLATES)
    assert "did you mean 'chatml'" in err.value.message
    assert "alpaca, chatml, gemma, llama3, mistral, phi3, qwen" in err.value.hint
    assert isinstance(err.value, UsageError) and err.value.exit_code == 2


def test_a_spare_special_token_pads_instead_of_a_new_one(make_tokenizer):
    """Like SmolLM2: its pad is its EOS (<|im_end|>) and its unknown token <|endoftext|> is free: that pads, and
    no token is added (a new one would grow the embeddings and make a LoRA adapter save the whole of them)."""
    tok = make_tokenizer()
    tok.add_special_tokens(
        {
            "extra_special_tokens": ["<|im_start|>", "<|im_end|>"],
            "unk_token": "<|endoftext|>",
            "pad_token": "<|im_end|>",
        }
    )
    tok.chat_template = TEMPLATES["chatml"].source
    auto = resolve_template("auto", tokenizer=tok, templates=TEMPLATES)
    before = len(tok)
    assert apply_template(tok, auto) == 0 and len(tok) == before
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id != tok.eos_token_id
    runs = _trained_runs(tok, encode_chat(tok, auto, CONVERSATION))
    assert runs == [a + "<|im_end|>" for a in ANSWERS]
    # a token named like a pad token comes first (Llama 3 keeps <|finetune_right_pad_id|> for this)
    tok = make_tokenizer()
    tok.add_special_tokens({"extra_special_tokens": ["<|im_start|>", "<|im_end|>", "<|reserved_pad|>"]})
    tok.chat_template = TEMPLATES["chatml"].source
    assert apply_template(tok, resolve_template("auto", tokenizer=tok, templates=TEMPLATES)) == 0
    assert tok.pad_token == "<|reserved_pad|>"


def test_resolve_auto_needs_a_tokenizer_template(make_tokenizer):
    with pytest.raises(ChatTemplateError) as err:
        resolve_template("auto", tokenizer=make_tokenizer(), templates=TEMPLATES)
    assert "no chat template" in err.value.message and 'template = "chatml"' in err.value.hint
    with pytest.raises(ChatTemplateError, match="needs a tokenizer"):
        resolve_template(None, templates=TEMPLATES)


def test_auto_takes_the_turn_end_token_as_eos(make_tokenizer):
    # Like a base tokenizer whose EOS ends documents while its chat template ends turns with another token.
    tok = make_tokenizer()
    tok.add_special_tokens({"extra_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = TEMPLATES["chatml"].source
    auto = resolve_template("auto", tokenizer=tok, templates=TEMPLATES)
    assert auto.eos == "<|im_end|>" and auto.name == "auto"
    assert auto.special_tokens == ("<|im_start|>",) and auto.pad is None
    assert auto.hash != TEMPLATES["chatml"].hash  # no pad yet: apply_template will add one
    assert apply_template(tok, auto) == 1 and tok.pad_token == DEFAULT_PAD and tok.eos_token == "<|im_end|>"
    runs = _trained_runs(tok, encode_chat(tok, auto, CONVERSATION))
    assert runs == [a + "<|im_end|>" for a in ANSWERS]


def test_resolve_jinja_file(make_tokenizer, tmp_path):
    (tmp_path / "templates").mkdir()
    body = TEMPLATES["chatml"].source
    header = '{#- llmforge: {"eos": "<|im_end|>", "pad": "<|endoftext|>", "stop": ["<|im_start|>"]} -#}\n'
    (tmp_path / "templates" / "mine.jinja").write_text(header + body)
    t = resolve_template("templates/mine.jinja", base_dir=tmp_path, templates=TEMPLATES)
    assert (t.name, t.eos, t.pad, t.stop) == ("mine", "<|im_end|>", "<|endoftext|>", ("<|im_start|>",))
    assert "<|im_start|>" in t.special_tokens  # found in the source
    assert render(t, CONVERSATION) == render(TEMPLATES["chatml"], CONVERSATION)  # the header renders nothing
    tok = make_tokenizer()
    apply_template(tok, t)
    runs = _trained_runs(tok, encode_chat(tok, t, CONVERSATION))
    assert runs == [a + "<|im_end|>" for a in ANSWERS]

    (tmp_path / "plain.jinja").write_text(body)
    with pytest.raises(ChatTemplateError, match="ends an assistant turn"):
        resolve_template("plain.jinja", base_dir=tmp_path, templates=TEMPLATES)
    plain = resolve_template("plain.jinja", tokenizer=make_tokenizer(), base_dir=tmp_path, templates=TEMPLATES)
    assert plain.eos == "<|endoftext|>"  # the tokenizer's
    with pytest.raises(ChatTemplateError, match="not found"):
        resolve_template("missing.jinja", base_dir=tmp_path, templates=TEMPLATES)
    (tmp_path / "bad.jinja").write_text('{#- llmforge: {"eos": "x", "colour": 1} -#}')
    with pytest.raises(ChatTemplateError, match="colour"):
        resolve_template("bad.jinja", base_dir=tmp_path, templates=TEMPLATES)
    (tmp_path / "bad2.jinja").write_text('{#- llmforge: {"eos": "x", "special_tokens": "<|a|>"} -#}')
    with pytest.raises(ChatTemplateError, match="special_tokens must be a list"):
        resolve_template("bad2.jinja", base_dir=tmp_path, templates=TEMPLATES)


# --------------------------------------------------------------------------------------------
# The model families' formats: each written out as the family's own template renders it.

FAMILY_RENDERINGS = {
    "qwen": (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is two plus three?<|im_end|>\n"
        "<|im_start|>assistant\nTwo plus three is five.<|im_end|>\n"
        "<|im_start|>user\nTell me about the cat, please.<|im_end|>\n"
        "<|im_start|>assistant\nThe cat sat on the mat at the café ☕.\nYes, really.<|im_end|>\n",
        "<|im_start|>assistant\n",
    ),
    # no system role: the system text goes in front of the first user message, then a blank line
    "gemma": (
        "<bos><start_of_turn>user\nYou are a helpful assistant.\n\nWhat is two plus three?<end_of_turn>\n"
        "<start_of_turn>model\nTwo plus three is five.<end_of_turn>\n"
        "<start_of_turn>user\nTell me about the cat, please.<end_of_turn>\n"
        "<start_of_turn>model\nThe cat sat on the mat at the café ☕.\nYes, really.<end_of_turn>\n",
        "<start_of_turn>model\n",
    ),
    "phi3": (
        "<|system|>\nYou are a helpful assistant.<|end|>\n"
        "<|user|>\nWhat is two plus three?<|end|>\n"
        "<|assistant|>\nTwo plus three is five.<|end|>\n"
        "<|user|>\nTell me about the cat, please.<|end|>\n"
        "<|assistant|>\nThe cat sat on the mat at the café ☕.\nYes, really.<|end|>\n",
        "<|assistant|>\n",
    ),
    # Meta's Llama 3 layout (3.1+'s own templates add a dated system header; "auto" keeps those)
    "llama3": (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is two plus three?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nTwo plus three is five.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nTell me about the cat, please.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
        "The cat sat on the mat at the café ☕.\nYes, really.<|eot_id|>",
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
    ),
}


@pytest.mark.parametrize("name", sorted(FAMILY_RENDERINGS))
def test_family_template_renders_the_family_format(make_tokenizer, name):
    template = TEMPLATES[name]
    whole, header = FAMILY_RENDERINGS[name]
    assert render(template, CONVERSATION) == whole
    # the prompt before the second answer: the first three turns of `whole`, then the generation header
    prompt = render(template, CONVERSATION[:4], add_generation_prompt=True)
    assert prompt.endswith(header) and whole.startswith(prompt)
    assert whole[len(prompt) :].startswith(ANSWERS[1][:7])

    tok, template = _prepared(make_tokenizer, name)
    enc = encode_chat(tok, template, CONVERSATION)
    assert _trained_runs(tok, enc) == [a + template.eos for a in ANSWERS]


@pytest.mark.parametrize("name", ["qwen", "gemma", "phi3", "llama3"])
def test_family_markers_are_single_control_tokens(make_tokenizer, name):
    tok, template = _prepared(make_tokenizer, name)
    enc = encode_chat(tok, template, CONVERSATION)
    for marker in template.required_tokens:
        ids = tok(marker, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and ids[0] in tok.all_special_ids, marker
        # every occurrence in the rendered text is that one id, never pieces of text
        assert enc.input_ids.count(ids[0]) == enc.text.count(marker), marker
    plain = tok.decode(enc.input_ids, skip_special_tokens=True)
    assert not any(m in plain for m in template.required_tokens)
    assert all(a in plain for a in ANSWERS)


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
TOOL_CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Weather in Paris and Rome?"},
    # OpenAI style: no content, calls wrapped in "function", arguments as an object or a JSON string
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}},
        ],
    },
    {"role": "tool", "content": "18 C, sunny"},
    {"role": "tool", "content": "21 C, cloudy"},
    {"role": "assistant", "content": "Paris: 18 C. Rome: 21 C."},
    {"role": "user", "content": "And Oslo?"},
    # text before a call (transformers' style: the call's fields directly)
    {
        "role": "assistant",
        "content": "Checking.",
        "tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}],
    },
    {"role": "tool", "content": "3 C"},
    {"role": "assistant", "content": "Oslo: 3 C."},
]
TOOL_CALL_1 = (
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'
)
TOOL_CALL_2 = 'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
QWEN_TOOL_TURNS = (
    "<|im_start|>user\nWeather in Paris and Rome?<|im_end|>\n"
    "<|im_start|>assistant\n" + TOOL_CALL_1 + "<|im_end|>\n"
    "<|im_start|>user\n<tool_response>\n18 C, sunny\n</tool_response>\n"
    "<tool_response>\n21 C, cloudy\n</tool_response><|im_end|>\n"
    "<|im_start|>assistant\nParis: 18 C. Rome: 21 C.<|im_end|>\n"
    "<|im_start|>user\nAnd Oslo?<|im_end|>\n"
    "<|im_start|>assistant\n" + TOOL_CALL_2 + "<|im_end|>\n"
    "<|im_start|>user\n<tool_response>\n3 C\n</tool_response><|im_end|>\n"
    "<|im_start|>assistant\nOslo: 3 C.<|im_end|>\n"
)


def test_qwen_renders_tools_calls_and_results_the_qwen_way(make_tokenizer):
    qwen = TEMPLATES["qwen"]
    assert render(qwen, TOOL_CONVERSATION) == "<|im_start|>system\nAnswer briefly.<|im_end|>\n" + QWEN_TOOL_TURNS
    with_tools = render(qwen, TOOL_CONVERSATION, tools=TOOLS)
    signature = (
        '{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city", '
        '"parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}'
    )
    system = (
        "<|im_start|>system\nAnswer briefly.\n\n# Tools\n\n"
        "You can call the functions whose JSON signatures are listed in <tools></tools>, one a line:\n"
        "<tools>\n" + signature + "\n</tools>\n\n"
        "To call one, write its name and arguments as a JSON object in <tool_call></tool_call> tags:\n"
        '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
    )
    assert with_tools == system + QWEN_TOOL_TURNS
    # without a system message the tools still get a system turn of their own
    assert render(qwen, TOOL_CONVERSATION[1:], tools=TOOLS).startswith(
        "<|im_start|>system\n# Tools\n\nYou can call the functions"
    )
    # the same text from transformers' apply_chat_template with the tokenizer carrying the template
    tok, _ = _prepared(make_tokenizer, "qwen")
    assert tok.apply_chat_template(TOOL_CONVERSATION, tools=TOOLS, tokenize=False) == with_tools
    prompt = render(qwen, TOOL_CONVERSATION[:5], tools=TOOLS, add_generation_prompt=True)
    assert tok.apply_chat_template(TOOL_CONVERSATION[:5], tools=TOOLS, tokenize=False, add_generation_prompt=True) == (
        prompt
    )
    assert prompt.endswith("21 C, cloudy\n</tool_response><|im_end|>\n<|im_start|>assistant\n")


def test_qwen_trains_on_tool_calls_not_on_tool_results(make_tokenizer):
    tok, qwen = _prepared(make_tokenizer, "qwen")
    enc = encode_chat(tok, qwen, TOOL_CONVERSATION)
    assert _trained_runs(tok, enc) == [
        TOOL_CALL_1 + "<|im_end|>",
        "Paris: 18 C. Rome: 21 C.<|im_end|>",
        TOOL_CALL_2 + "<|im_end|>",
        "Oslo: 3 C.<|im_end|>",
    ]
    untrained = _decode(tok, [t for t, lab in zip(enc.input_ids, enc.labels) if lab == IGNORE_INDEX])
    assert "<tool_response>\n18 C, sunny\n</tool_response>" in untrained and "And Oslo?" in untrained
    last = encode_chat(tok, qwen, TOOL_CONVERSATION[:3], train_on="last_turn")
    assert _trained_runs(tok, last) == [TOOL_CALL_1 + "<|im_end|>"]
    # with the signatures in the system turn: the same trained turns, the signatures untrained
    with_tools = encode_chat(tok, qwen, TOOL_CONVERSATION, tools=TOOLS)
    assert with_tools.input_ids == tok.apply_chat_template(TOOL_CONVERSATION, tools=TOOLS, return_dict=False)
    assert _trained_runs(tok, with_tools) == _trained_runs(tok, enc)
    untrained = _decode(tok, [t for t, lab in zip(with_tools.input_ids, with_tools.labels) if lab == IGNORE_INDEX])
    assert "<tools>\n" + json.dumps(TOOLS[0]) + "\n</tools>" in untrained
    # the tool tags are text, not special tokens: an answer decoded for the user keeps the call
    assert "<tool_call>" not in tok.all_special_tokens
    assert TOOL_CALL_1 in tok.decode(enc.input_ids, skip_special_tokens=True)


def test_gemma_puts_the_system_message_in_the_first_user_turn_and_refuses_other_roles(make_tokenizer):
    gemma = TEMPLATES["gemma"]
    text = render(gemma, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  Hi  "}], True)
    assert text == "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
    # a system message anywhere but first, a tool result, or two user turns in a row: said, not dropped
    for bad, role in (
        (CONVERSATION[1:3] + [{"role": "system", "content": "Later."}], "system"),
        ([*CONVERSATION[1:3], {"role": "tool", "content": "18 C"}], "tool"),
        ([CONVERSATION[1], CONVERSATION[3]], "user"),
    ):
        with pytest.raises(ChatTemplateError, match=f"'gemma'.*alternate.*is {role}"):
            render(gemma, bad)
    tok, gemma = _prepared(make_tokenizer, "gemma")
    runs = _trained_runs(tok, encode_chat(tok, gemma, CONVERSATION))
    assert runs == [a + "<end_of_turn>" for a in ANSWERS]
    assert tok.bos_token == "<bos>" and tok.eos_token == "<end_of_turn>" and tok.pad_token == "<pad>"


def test_phi3_leaves_out_an_empty_system_message_and_refuses_tool_turns():
    phi3 = TEMPLATES["phi3"]
    empty = [{"role": "system", "content": ""}, *CONVERSATION[1:3]]
    expected = "<|user|>\nWhat is two plus three?<|end|>\n<|assistant|>\nTwo plus three is five.<|end|>\n"
    assert render(phi3, empty) == render(phi3, CONVERSATION[1:3]) == expected
    with pytest.raises(ChatTemplateError, match="'phi3'.*not tool"):
        render(phi3, [*CONVERSATION[1:3], {"role": "tool", "content": "18 C"}])


@pytest.mark.parametrize("name", ["gemma", "phi3", "llama3"])
def test_templates_without_a_tool_format_refuse_tool_calls(name):
    with pytest.raises(ChatTemplateError, match=f"'{name}'.*no format for tool calls \\(message 2\\)"):
        render(TEMPLATES[name], TOOL_CONVERSATION[:3])


def test_data_inspect_shows_the_family_masks(tmp_path, monkeypatch, tokenizer_dir):
    from typer.testing import CliRunner

    from llmforge.cli.app import build_app

    row = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is the capital of Land0?"},
            {"role": "assistant", "content": "The capital of Land0 is Town0."},
        ]
    }
    (tmp_path / "chat.jsonl").write_text(json.dumps(row) + "\n")
    monkeypatch.chdir(tmp_path)
    for name, end in (("qwen", "<|im_end|>"), ("gemma", "<end_of_turn>"), ("phi3", "<|end|>")):
        args = [
            "data",
            "inspect",
            "chat.jsonl",
            "--model",
            str(tokenizer_dir),
            "--template",
            name,
            "--masks",
            "--plain",
        ]
        res = CliRunner().invoke(build_app(), args)
        assert res.exit_code == 0, res.output
        assert f"[[The capital of Land0 is Town0.{end}]]" in res.output and res.output.count("[[") == 1, res.output
        assert f"template {name}" in res.output
        # the untrained prompt is shown as the template renders it
        prompt = render(TEMPLATES[name], row["messages"][:2], add_generation_prompt=True)
        assert prompt in res.output, res.output
    # a row the template cannot say is named by file and line
    two_users = {"messages": [row["messages"][1], row["messages"][1], row["messages"][2]]}
    (tmp_path / "chat.jsonl").write_text(json.dumps(row) + "\n" + json.dumps(two_users) + "\n")
    args = ["data", "inspect", "chat.jsonl", "--model", str(tokenizer_dir), "--template", "gemma"]
    err = CliRunner().invoke(build_app(), args).exception  # `llmforge` prints it and exits with its code
    assert isinstance(err, ChatTemplateError) and err.exit_code == 2
    assert err.message.startswith("chat.jsonl:2: chat template 'gemma' cannot render this conversation:")


def test_qwen_modelfile_template_groups_tool_results_as_the_jinja_does():
    # Ollama's Go template for qwen (plugins/gguf/modelfile.py) on tool turns: consecutive results share
    # one user turn, whether they follow an assistant message or open the conversation.
    from llmforge_plugins.gguf.modelfile import ChatInfo, translate
    from test_gguf_cli import go_render

    qwen = TEMPLATES["qwen"]
    tr = translate(ChatInfo(template=qwen.source, eos=qwen.eos))
    assert tr.layout == "qwen" and tr.template is not None
    # Ollama has no tool calls in .Content: the calling turns carry text here
    messages = [{"role": m["role"], "content": m["content"] or "calling"} for m in TOOL_CONVERSATION]
    for conv in [messages[:n] for n in range(2, len(messages) + 1)] + [messages[3:6]]:
        gen = conv[-1]["role"] != "assistant"  # Ollama always prompts for an answer after a non-assistant turn
        go = go_render(tr.template, {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in conv]})
        assert go == render(qwen, conv, add_generation_prompt=gen), conv


# --------------------------------------------------------------------------------------------
# Real vocabularies: the tokenizers of released models, rebuilt from the vocabulary-only GGUFs that
# llama.cpp ships for its tokenizer tests. A family's template must find its markers already there,
# as the very ids the released models were trained with.

REAL_VOCABS = {
    # template: (llama.cpp vocabulary, {marker: id in the released model's vocabulary})
    "phi3": (
        "phi-3",
        {"<|system|>": 32006, "<|user|>": 32010, "<|assistant|>": 32001, "<|end|>": 32007, "<|endoftext|>": 32000},
    ),
    "qwen": ("qwen2", {"<|im_start|>": 151644, "<|im_end|>": 151645, "<|endoftext|>": 151643}),
    "llama3": (
        "llama-bpe",
        {
            "<|begin_of_text|>": 128000,
            "<|end_of_text|>": 128001,
            "<|start_header_id|>": 128006,
            "<|end_header_id|>": 128007,
            "<|eot_id|>": 128009,
        },
    ),
}


@pytest.fixture(scope="module")
def llama_cpp_vocabs():
    from llmforge_plugins.gguf.converter import llama_cpp_source

    try:
        return llama_cpp_source()  # downloaded once into llmforge's cache
    except UsageError as exc:
        pytest.skip(f"llama.cpp's source distribution (its vocabulary files) is not at hand: {exc.message}")


def _check_real_vocab(name, src, tmp_path):
    from llmforge_plugins.gguf.converter import vocab_tokenizer

    vocab, ids = REAL_VOCABS[name]
    tok, _ = vocab_tokenizer(src, vocab, tmp_path / vocab)
    template = TEMPLATES[name]
    assert {m: tok.convert_tokens_to_ids(m) for m in ids} == ids
    # nothing is added but a pad the vocabulary may lack (Llama 3.0's has no <|finetune_right_pad_id|>)
    missing = int(template.pad not in tok.get_vocab())
    assert apply_template(tok, template) == missing
    assert all(tok(m, add_special_tokens=False)["input_ids"] == [i] for m, i in ids.items())
    enc = encode_chat(tok, template, CONVERSATION)
    assert enc.input_ids == tok.apply_chat_template(CONVERSATION, tokenize=True, return_dict=False)
    assert _trained_runs(tok, enc) == [a + template.eos for a in ANSWERS]
    return tok


def test_phi3_markers_are_the_real_phi3_vocabulary_ids(llama_cpp_vocabs, tmp_path):
    tok = _check_real_vocab("phi3", llama_cpp_vocabs, tmp_path)
    assert len(tok) == 32064  # nothing added


@pytest.mark.slow  # each of these vocabularies takes ~40 s to rebuild on 2 cores
@pytest.mark.parametrize("name", ["qwen", "llama3"])
def test_markers_are_the_real_vocabulary_ids(llama_cpp_vocabs, tmp_path, name):
    tok = _check_real_vocab(name, llama_cpp_vocabs, tmp_path)
    if name == "qwen":
        assert len(tok) == 151936  # nothing added
        enc = encode_chat(tok, TEMPLATES["qwen"], TOOL_CONVERSATION)
        assert _trained_runs(tok, enc)[0] == TOOL_CALL_1 + "<|im_end|>"


def test_a_gemma_style_template_spelt_otherwise_gets_the_gemma_modelfile_template():
    # How a Gemma tokenizer's own template might spell the format: BOS from bos_token, the system text
    # carried into the first turn through a variable, roles mapped in the loop. Ollama gets the gemma layout.
    from llmforge_plugins.gguf.modelfile import ChatInfo, translate

    source = (
        "{{ bos_token }}{% set ns = namespace(pre='') %}{% for m in messages %}"
        "{% if m['role'] == 'system' %}{% set ns.pre = m['content'] + '\\n\\n' %}{% else %}"
        "{{ '<start_of_turn>' ~ ('model' if m['role'] == 'assistant' else 'user') ~ '\\n' ~ ns.pre"
        " ~ m['content'] | trim ~ '<end_of_turn>\\n' }}{% set ns.pre = '' %}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
    )
    info = ChatInfo(template=source, bos="<bos>", eos="<eos>", eot="<end_of_turn>", add_bos=True)
    tr = translate(info)
    assert tr.layout == "gemma" and tr.template is not None and not tr.template.startswith("<bos>")
    assert tr.stops[:2] == ["<eos>", "<end_of_turn>"] and "<start_of_turn>" in tr.stops
    assert render(source, CONVERSATION, bos_token="<bos>") == FAMILY_RENDERINGS["gemma"][0]


@pytest.mark.parametrize("name", ["qwen", "gemma", "phi3"])
def test_pretrain_tokenizer_reserves_the_family_markers(name):
    # what `pretrain` does with template = NAME: the trained vocabulary holds every marker as one token,
    # so the template needs nothing added afterwards and masks as on any other tokenizer
    from llmforge_plugins.training.models import train_tokenizer

    template = TEMPLATES[name]
    texts = [f"{m['content']} {a}" for m in CONVERSATION for a in ANSWERS] * 20
    tok = train_tokenizer(texts, vocab_size=300, template=template)
    assert apply_template(tok, template) == 0
    assert tok.chat_template == template.source and tok.eos_token == template.eos and tok.pad_token == template.pad
    enc = encode_chat(tok, template, CONVERSATION)
    assert _trained_runs(tok, enc) == [a + template.eos for a in ANSWERS]
