"""Chat templates and loss masking, on a real byte-level BPE tokenizer trained here in a second.

The masking tests check the labels against the conversation itself: the trained tokens, decoded,
must be exactly each assistant message followed by its end-of-turn token, and nothing else.
"""

from __future__ import annotations

import dataclasses
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
    for name in ("chatml", "llama3", "alpaca", "mistral"):
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
    assert "alpaca, chatml, llama3, mistral" in err.value.hint
    assert isinstance(err.value, UsageError) and err.value.exit_code == 2


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
