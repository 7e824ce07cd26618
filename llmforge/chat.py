"""Chat templates: a named Jinja template plus the special tokens it needs.

Built-in templates (chatml, qwen, llama3, gemma, phi3, mistral, alpaca) are registered by a plugin through
`register_chat_templates`, like any third-party one. A training stage resolves its `template`
option to a ChatTemplate (a registered name, a .jinja file, or the tokenizer's own), and the same
template travels with every model artifact (tokenizer_config.json / chat_template.jinja) so that
export and chat later use exactly it.

Loss masking lives here too, because it can only be right if it is derived from the very template
that formats the data. `encode_chat` renders a conversation once, finds the character spans of the
assistant turns by rendering prefixes of the conversation, and labels exactly the tokens inside
those spans; everything else gets -100.

This module is imported at start-up (the plugin registry validates ChatTemplate instances), so it
imports neither torch nor transformers, and jinja2 only when a template is rendered.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmforge.errors import UsageError
from llmforge.extension import ExtensionPoint

IGNORE_INDEX = -100  # what PyTorch's cross-entropy (and every HF model) skips
TRAIN_ON = ("assistant", "all", "last_turn")
DEFAULT_PAD = "<|pad|>"
TOKENIZER_CONFIG_KEY = "llmforge_chat_template"  # where apply_template records name and hash

# `{#- llmforge: {"eos": "...", ...} -#}` at the top of a .jinja file says what the template needs.
_HEADER_RE = re.compile(r"\{#-?\s*llmforge:\s*(\{.*?\})\s*-?#\}", re.DOTALL)
_HEADER_KEYS = {"name", "eos", "bos", "pad", "special_tokens", "stop", "summary"}
# Tokens shaped like <|...|> in a template's source are almost certainly control tokens.
_MARKER_RE = re.compile(r"<\|[A-Za-z0-9_.:/-]+\|>")


class ChatTemplateError(UsageError):
    """A template that cannot be found, rendered, or used to mask a conversation (exit code 2)."""


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    source: str  # Jinja, with HF's variables: messages, add_generation_prompt, bos_token, eos_token
    eos: str  # the token that ends an assistant turn (trained on, and a stop token)
    bos: str | None = None
    pad: str | None = None
    special_tokens: tuple[str, ...] = ()  # role markers etc. that must be single tokens in the vocab
    stop: tuple[str, ...] = ()  # extra stop strings for generation
    summary: str = ""

    @property
    def hash(self) -> str:
        blob = "\0".join([self.source, self.eos, self.bos or "", self.pad or "", *self.special_tokens])
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def required_tokens(self) -> tuple[str, ...]:
        """Every token a tokenizer must hold as a single special token to use this template: BOS, EOS,
        pad, then the role markers. A tokenizer trained from scratch reserves exactly these."""
        out: list[str] = []
        for tok in (self.bos, self.eos, self.pad, *self.special_tokens):
            if tok and tok not in out:
                out.append(tok)
        return tuple(out)

    @property
    def stop_strings(self) -> tuple[str, ...]:
        """What ends generation: the EOS first, then the extra stop strings."""
        return tuple(dict.fromkeys((self.eos, *self.stop)))

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False, **kwargs) -> str:
        return render(self, messages, add_generation_prompt=add_generation_prompt, **kwargs)

    def to_json(self) -> dict:
        """The record kept in manifests and dataset cache keys (the source itself is in the artifact)."""
        return {
            "name": self.name,
            "hash": self.hash,
            "eos": self.eos,
            "bos": self.bos,
            "pad": self.pad,
            "special_tokens": list(self.special_tokens),
            "stop": list(self.stop),
        }


def _template(obj: Any) -> ChatTemplate:
    if not isinstance(obj, ChatTemplate):
        raise TypeError(f"register() expects a ChatTemplate, got {obj!r}")
    return obj


# The extension point of named templates (declared by the core in llmforge.execution).
CHAT_TEMPLATES = ExtensionPoint(
    hook="register_chat_templates",
    table="chat_templates",
    label="chat template",
    doc="""Register named chat templates: :class:`llmforge.chat.ChatTemplate` instances.

    The name is what ``template = "<name>"`` selects in a training stage.
    """,
    validate=_template,
)


@dataclass
class EncodedChat:
    """One tokenized conversation. `labels[i]` is `input_ids[i]` where the token is trained, else -100."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool
    n_trained: int
    text: str = ""  # the rendered conversation (before truncation)
    spans: list[tuple[int, int]] = field(default_factory=list)  # trained character spans of `text`

    def __len__(self) -> int:
        return len(self.input_ids)


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _environment():
    """A Jinja environment that behaves like the one transformers uses for chat templates, so a
    template renders the same here, in `tokenizer.apply_chat_template`, and after export."""
    import json as _json
    from datetime import datetime

    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        # HF templates may wrap assistant output in {% generation %}...{% endgeneration %} for their own
        # mask; we compute masks from prefixes instead, so the tag only has to render its body.
        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters, which no chat format wants.
        return _json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


@functools.lru_cache(maxsize=64)
def _compile(source: str):
    return _environment().from_string(source)


def _source_of(template: ChatTemplate | str) -> tuple[str, str]:
    if isinstance(template, ChatTemplate):
        return template.source, template.name
    return str(template), "(inline)"


def render(
    template: ChatTemplate | str,
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool = False,
    **kwargs: Any,
) -> str:
    """Render a conversation with a chat template, as `tokenizer.apply_chat_template(tokenize=False)`
    would with a tokenizer that carries the template (see `apply_template`).

    ``bos_token``/``eos_token``/``pad_token`` come from the ChatTemplate (a plain source string gets
    none unless passed in ``kwargs``); ``kwargs`` reach the template as extra variables."""
    import jinja2

    source, name = _source_of(template)
    variables: dict[str, Any] = {}
    if isinstance(template, ChatTemplate):
        # Like transformers, a token the tokenizer does not have is left undefined, not "".
        for key, value in (("bos_token", template.bos), ("eos_token", template.eos), ("pad_token", template.pad)):
            if value is not None:
                variables[key] = value
    variables.update(kwargs)
    # transformers drops None-valued keys (e.g. content=None from OpenAI-style rows); do the same.
    msgs = [{k: v for k, v in dict(m).items() if v is not None} for m in messages]
    try:
        compiled = _compile(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(
            f"chat template '{name}' has a syntax error at line {exc.lineno}: {exc.message}"
        ) from exc
    try:
        return compiled.render(messages=msgs, add_generation_prompt=add_generation_prompt, **variables)
    except (jinja2.TemplateError, TypeError) as exc:  # TypeError: e.g. a str + list inside the template
        raise ChatTemplateError(f"chat template '{name}' cannot render this conversation: {exc}") from exc


# --------------------------------------------------------------------------------------------
# Finding a template
# --------------------------------------------------------------------------------------------


def _tokenizer_source(tokenizer: Any) -> str | None:
    source = getattr(tokenizer, "chat_template", None)
    if isinstance(source, dict):  # several named templates: the default one formats conversations
        source = source.get("default")
    return source or None


def template_from_tokenizer(tokenizer: Any, name: str = "auto") -> ChatTemplate:
    """The tokenizer's own chat template, with its EOS/BOS/pad and the special tokens the source uses."""
    source = _tokenizer_source(tokenizer)
    where = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    if source is None:
        raise ChatTemplateError(
            f'the tokenizer ({where}) has no chat template of its own, so template = "auto" cannot be used',
            hint='name one, e.g. template = "chatml" (see `llmforge plugins list` for the installed templates) '
            "or a .jinja file",
        )
    eos = getattr(tokenizer, "eos_token", None)
    if not eos:
        raise ChatTemplateError(
            f"the tokenizer ({where}) has a chat template but no EOS token",
            hint='use a named template such as template = "chatml", which brings its own',
        )
    eos = _turn_end(tokenizer, source) or str(eos)
    bos = getattr(tokenizer, "bos_token", None)
    pad = getattr(tokenizer, "pad_token", None)
    pad = str(pad) if pad and str(pad) != eos else None  # a pad equal to EOS would mask the EOS
    specials = [str(t) for t in getattr(tokenizer, "all_special_tokens", []) or []]
    used = tuple(t for t in specials if t in source and t not in (eos, bos, pad))
    return ChatTemplate(
        name=name,
        source=source,
        eos=eos,
        bos=str(bos) if bos else None,
        pad=pad,
        special_tokens=used,
        summary=f"the chat template of {where}",
    )


def _turn_end(tokenizer: Any, source: str) -> str | None:
    """The special token a template writes right after an assistant's answer, if any.

    Base-model tokenizers often keep the document EOS (`<|endoftext|>`) while their chat template ends
    turns with another token (`<|im_end|>`). Training and generation must stop on the token the template
    writes, so that one becomes the template's EOS."""
    specials = sorted({str(t) for t in getattr(tokenizer, "all_special_tokens", []) or []}, key=len, reverse=True)
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]
    variables: dict[str, Any] = {k: str(v) for k, v in (getattr(tokenizer, "special_tokens_map", {}) or {}).items()}
    try:
        prompt = render(source, probe[:1], add_generation_prompt=True, **variables)
        whole = render(source, probe, **variables)
    except ChatTemplateError:
        return None  # a template that needs more than this probe: keep the tokenizer's EOS
    if not whole.startswith(prompt) or (at := whole.find("Hello there", len(prompt))) < 0:
        return None
    after = whole[at + len("Hello there") :].lstrip(" ")
    return next((t for t in specials if t and after.startswith(t)), None)


def load_template_file(path: str | Path, tokenizer: Any = None) -> ChatTemplate:
    """A template from a .jinja file. What it needs (EOS etc.) comes from an optional header comment
    ``{#- llmforge: {"eos": "<|im_end|>", "special_tokens": ["<|im_start|>"]} -#}``, else from the
    tokenizer; tokens shaped like ``<|name|>`` in the source are reserved as special tokens."""
    path = Path(path)
    try:
        source = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ChatTemplateError(f"{path}: cannot read chat template ({exc.strerror or exc})") from exc
    meta: dict[str, Any] = {}
    if m := _HEADER_RE.search(source):
        try:
            meta = json.loads(m.group(1))
        except json.JSONDecodeError as exc:
            raise ChatTemplateError(f"{path}: the llmforge header is not valid JSON: {exc}") from exc
        if not isinstance(meta, dict) or (unknown := set(meta) - _HEADER_KEYS):
            bad = sorted(unknown) if isinstance(meta, dict) else meta
            raise ChatTemplateError(
                f"{path}: unknown keys in the llmforge header: {bad}",
                hint=f"known keys: {', '.join(sorted(_HEADER_KEYS))}",
            )
        for key, value in meta.items():
            ok = (
                (all(isinstance(v, str) for v in value) if isinstance(value, list) else False)
                if key in ("special_tokens", "stop")
                else isinstance(value, str)
            )
            if not ok:
                want = "a list of strings" if key in ("special_tokens", "stop") else "a string"
                raise ChatTemplateError(f"{path}: llmforge header: {key} must be {want}, not {value!r}")
    _compile_or_raise(source, str(path))
    eos = meta.get("eos") or (str(tokenizer.eos_token) if tokenizer is not None and tokenizer.eos_token else None)
    if not eos:
        raise ChatTemplateError(
            f"{path}: cannot tell which token ends an assistant turn",
            hint='add a first line such as {#- llmforge: {"eos": "<|im_end|>"} -#}',
        )
    bos = meta.get("bos")
    pad = meta.get("pad")
    if tokenizer is not None and "bos" not in meta and tokenizer.bos_token and str(tokenizer.bos_token) in source:
        bos = str(tokenizer.bos_token)
    specials = list(meta.get("special_tokens", []))
    if "special_tokens" not in meta:
        specials += _MARKER_RE.findall(source)
        if tokenizer is not None:
            specials += [str(t) for t in tokenizer.all_special_tokens if str(t) in source]
    special_tokens = tuple(t for t in dict.fromkeys(specials) if t not in (eos, bos, pad))
    return ChatTemplate(
        name=meta.get("name") or path.stem,
        source=source,
        eos=eos,
        bos=bos,
        pad=pad,
        special_tokens=special_tokens,
        stop=tuple(meta.get("stop", ())),
        summary=meta.get("summary") or f"from {path}",
    )


def _compile_or_raise(source: str, name: str) -> None:
    import jinja2

    try:
        _compile(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"{name}: chat template syntax error at line {exc.lineno}: {exc.message}") from exc


def _looks_like_path(value: str) -> bool:
    return value.endswith((".jinja", ".j2", ".jinja2")) or "/" in value or "\\" in value


def resolve_template(
    value: str | ChatTemplate | None,
    templates: Mapping[str, ChatTemplate],
    tokenizer: Any = None,
    base_dir: str | Path | None = None,
) -> ChatTemplate:
    """Turn a stage's `template` option into a ChatTemplate.

    * None or "auto": the tokenizer's own template;
    * a name in `templates` (the registry's ``chat_templates``: `chatml`, `llama3`, ...);
    * a path to a .jinja file, relative to `base_dir` (the folder of forge.toml).
    """
    if isinstance(value, ChatTemplate):
        return value
    if value is None or value == "auto":
        if tokenizer is None:
            raise ChatTemplateError(
                'template = "auto" needs a tokenizer to take the template from',
                hint='name one instead, e.g. template = "chatml"',
            )
        return template_from_tokenizer(tokenizer)
    value = str(value)
    if _looks_like_path(value):
        path = Path(value).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = Path(base_dir) / path
        if not path.is_file():
            raise ChatTemplateError(f"chat template file not found: {path}")
        return load_template_file(path, tokenizer)
    if value in templates:
        return templates[value]
    from llmforge.schema import did_you_mean

    names = sorted(templates)
    raise ChatTemplateError(
        f"unknown chat template '{value}'{did_you_mean(value, names)}",
        hint=f'installed templates: {", ".join(names) or "(none)"}; or "auto" for the tokenizer\'s own, '
        "or a path to a .jinja file",
    )


# --------------------------------------------------------------------------------------------
# Making a tokenizer carry a template
# --------------------------------------------------------------------------------------------


def apply_template(tokenizer: Any, template: ChatTemplate) -> int:
    """Make a Hugging Face tokenizer carry `template`, so that everything saved from it (and exported
    later) formats conversations and stops exactly as training did.

    Sets ``chat_template``, registers the template's tokens as special tokens (never split, skipped by
    ``decode(skip_special_tokens=True)``), and sets EOS, BOS (when the template has one) and pad. The
    pad is the template's, else the tokenizer's own when it differs from EOS, else a spare special token the
    tokenizer has (see :func:`_spare_special`), else a new ``<|pad|>``: padding is masked out of the loss, so
    a pad equal to EOS would teach the model never to stop.

    Returns how many tokens were added to the vocabulary: resize the model's embeddings by that much.
    """
    eos = template.eos
    pad = template.pad
    if pad is None:
        current = getattr(tokenizer, "pad_token", None)
        pad = str(current) if current and str(current) != eos else (_spare_special(tokenizer, template) or DEFAULT_PAD)
    if pad == eos:
        raise ChatTemplateError(
            f"chat template '{template.name}' uses its EOS {eos!r} as pad token",
            hint="give the template a distinct pad token; padding is masked from the loss",
        )
    before = len(tokenizer)
    named: dict[str, str] = {"eos_token": eos, "pad_token": pad}
    if template.bos:
        named["bos_token"] = template.bos
    have = {str(t) for t in getattr(tokenizer, "extra_special_tokens", []) or []} | set(named.values())
    extra = [t for t in template.special_tokens if t not in have]
    tokenizer.add_special_tokens({**named, "extra_special_tokens": extra}, replace_extra_special_tokens=False)
    tokenizer.chat_template = template.source
    # Saved into tokenizer_config.json by save_pretrained: which template a model was trained with.
    tokenizer.init_kwargs[TOKENIZER_CONFIG_KEY] = {"name": template.name, "hash": template.hash}
    _check_tokens(tokenizer, template)
    return len(tokenizer) - before


def _spare_special(tokenizer: Any, template: ChatTemplate) -> str | None:
    """A special token the tokenizer already has that can pad: one named like a pad token (Llama 3's
    ``<|finetune_right_pad_id|>``), else the unknown token (SmolLM2's ``<|endoftext|>``), as long as the
    template never writes it. Padding with it adds no token: a new one would grow the embeddings, and a LoRA
    adapter then has to save the whole embedding and output matrices (246 MB for SmolLM2-135M, ~1 GB for a
    3B Llama) instead of a few MB."""
    taken = {template.eos, template.bos, *template.special_tokens}

    def spare(token: Any) -> bool:
        text = str(token or "")
        return bool(text) and text not in taken and text not in template.source

    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    named = [
        str(t.content) for t in decoder.values() if getattr(t, "special", False) and "pad" in str(t.content).lower()
    ]
    for token in [*named, getattr(tokenizer, "unk_token", None)]:
        if spare(token):
            return str(token)
    return None


def _check_tokens(tokenizer: Any, template: ChatTemplate) -> None:
    """Each required token must encode to exactly one id, or the template's markers would be learnt
    as fragments of text (and EOS would never be produced as one token)."""
    stamp = (template.hash, len(tokenizer))
    if getattr(tokenizer, "_llmforge_checked", None) == stamp:
        return
    broken = [t for t in template.required_tokens if len(tokenizer(t, add_special_tokens=False)["input_ids"]) != 1]
    if broken:
        raise ChatTemplateError(
            f"the tokenizer does not hold the special tokens of chat template '{template.name}': {', '.join(broken)}",
            hint="call llmforge.chat.apply_template(tokenizer, template) first",
        )
    tokenizer._llmforge_checked = stamp


# --------------------------------------------------------------------------------------------
# Loss masking
# --------------------------------------------------------------------------------------------


def assistant_spans(
    template: ChatTemplate,
    messages: Sequence[Mapping[str, Any]],
    text: str | None = None,
    train_on: str = "assistant",
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> list[tuple[int, int]]:
    """Character spans of `text` (the rendered conversation) that are trained.

    For an assistant message i the span starts where the rendering of messages[:i] with the
    generation prompt ends (so the role header is excluded) and ends where the rendering of
    messages[:i+1] ends, cut just after the turn's EOS (the separator after it belongs to no one).
    Both renderings must be prefixes of the whole text; a template that renders history differently
    from the final turn cannot be masked this way and raises rather than mislabel. `tools` (function
    signatures, as `apply_chat_template(tools=...)` takes them) reach the template in every rendering.
    """
    if train_on not in TRAIN_ON:
        raise ChatTemplateError(f"train_on must be one of {', '.join(TRAIN_ON)}, not {train_on!r}")
    messages = list(messages)
    extra: dict[str, Any] = {"tools": list(tools)} if tools is not None else {}
    if text is None:
        text = render(template, messages, **extra)
    if train_on == "all":
        return [(0, len(text))]
    turns = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    if train_on == "last_turn":
        turns = turns[-1:]
    spans = []
    for i in turns:
        prompt = render(template, messages[:i], add_generation_prompt=True, **extra)
        through = render(template, messages[: i + 1], **extra)
        if not through.startswith(prompt) or not text.startswith(through):
            which = "the generation prompt" if not through.startswith(prompt) else "the conversation so far"
            raise ChatTemplateError(
                f"chat template '{template.name}' renders {which} differently from the same turns inside the "
                f"whole conversation (message {i}), so the assistant tokens cannot be located",
                hint='use train_on = "all", or a template whose rendering of a conversation extends its '
                "rendering of every prefix (the built-in ones do)",
            )
        start, end = len(prompt), len(through)
        turn = text[start:end]
        cut = turn.rfind(template.eos)
        end = start + (cut + len(template.eos) if cut >= 0 else len(turn.rstrip()))
        if end > start:
            spans.append((start, end))
    return spans


def encode_chat(
    tokenizer: Any,
    template: ChatTemplate,
    messages: Sequence[Mapping[str, Any]],
    max_length: int | None = None,
    train_on: str = "assistant",
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> EncodedChat:
    """Tokenize a conversation and label it for causal-LM training.

    `train_on`: "assistant" trains every assistant turn (its content and its end-of-turn token),
    "last_turn" only the final assistant turn, "all" every token. A token is trained when its
    character span lies wholly inside a trained span; all other labels are -100. The tokenizer must
    carry the template's special tokens (see `apply_template`); the template emits BOS itself, so
    the tokenizer adds nothing. Longer sequences are cut on the right to `max_length`. `tools` are
    the function signatures a template such as `qwen` writes into the system turn (never trained).
    """
    if not getattr(tokenizer, "is_fast", True):
        raise ChatTemplateError(
            "loss masking needs a fast tokenizer (character offsets); this one is slow",
            hint="load it with use_fast=True",
        )
    _check_tokens(tokenizer, template)
    extra: dict[str, Any] = {"tools": list(tools)} if tools is not None else {}
    text = render(template, messages, **extra)
    spans = assistant_spans(template, messages, text, train_on, tools=tools)
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError as exc:  # python-backend tokenizers have no character offsets
        raise ChatTemplateError(
            f"loss masking needs character offsets, which {type(tokenizer).__name__} does not provide",
            hint="load a fast (tokenizers-backed) tokenizer",
        ) from exc
    ids = list(enc["input_ids"])
    labels = _label(ids, enc["offset_mapping"], spans)
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        ids, labels = ids[:max_length], labels[:max_length]
    return EncodedChat(
        input_ids=ids,
        labels=labels,
        truncated=truncated,
        n_trained=sum(1 for x in labels if x != IGNORE_INDEX),
        text=text,
        spans=spans,
    )


# Files that make a folder loadable by AutoTokenizer (one of them is enough).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
)


def _looks_like_local_path(value: str, base: Path) -> bool:
    """A value that can only be meant as a folder here: rooted (`/`, `.`, `~`), written with a Windows
    separator, deeper than a Hub id's `namespace/name`, ending in a separator, or whose first component
    exists here (`models/typo` when `models/` exists)."""
    if value.startswith(("/", ".", "~")) or "\\" in value or value.endswith("/") or value.count("/") > 1:
        return True
    return "/" in value and (base / value.split("/", 1)[0]).exists()


def _hub_reachable(timeout: float = 3.0) -> str | None:
    """None when the Hugging Face Hub may be reachable, else why not (offline mode, no name resolution).
    Checked before asking the Hub, whose client retries a missing network for most of a minute."""
    import os
    import socket
    import threading
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    host = urlparse(endpoint).hostname or "huggingface.co"
    found: list = []

    def resolve() -> None:
        try:
            found.append(socket.getaddrinfo(host, 443))
        except OSError as exc:
            found.append(exc)

    worker = threading.Thread(target=resolve, daemon=True)
    worker.start()
    worker.join(timeout)
    if not found:
        return f"no network: {host} did not resolve within {timeout:g}s"
    if isinstance(found[0], OSError):
        return f"no network: cannot resolve {host}"
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _damaged_json(folder: Path) -> str | None:
    """Which of a tokenizer's JSON files does not parse, said with its position (after a failed load: the
    loaders' own errors do not name the file)."""
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "config.json"):
        file = folder / name
        if file.is_file():
            try:
                json.loads(file.read_bytes())
            except (ValueError, OSError) as exc:
                return f"{file}: not valid JSON ({_first_line(exc)})"
    return None


def load_tokenizer(
    model: str | Path, base_dir: str | Path | None = None, *, what: str = "", trust_remote_code: bool = False
) -> Any:
    """AutoTokenizer for a model or tokenizer folder (relative to `base_dir`, default the current folder)
    or a Hugging Face Hub model id, with every way of failing reported as a UsageError that names the value:
    a missing folder, a folder that holds no tokenizer, a tokenizer that does not load, a Hub id that is
    neither cached nor reachable. The one loader of `data inspect`, `data lint`, `data stats` and the TUI.
    `what` names where the value came from (`--model`) at the start of each message."""
    value = str(model)
    name = f"{what} {value}" if what else value
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = base / path
    if path.is_file():
        raise UsageError(f"{name}: {path} is a file; give the model or tokenizer folder")
    if path.is_dir():
        if not any((path / name).is_file() for name in TOKENIZER_FILES):
            what_it_is = (
                "a model folder without a tokenizer"
                if (path / "config.json").is_file()
                else "not a model or tokenizer folder"
            )
            raise UsageError(
                f"{name}: {path} is {what_it_is} (none of tokenizer.json, "
                "tokenizer_config.json, tokenizer.model, vocab.json in it)"
            )
        try:
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        except Exception as exc:  # noqa: BLE001 - a tokenizer fails to load in many ways; each is the input's fault
            damaged = _damaged_json(path)
            raise UsageError(f"{name}: cannot load the tokenizer in {path}: {damaged or _first_line(exc)}") from None
    if _looks_like_local_path(value, base):
        raise UsageError(f"{name}: no such folder ({path})")
    # No folder of that name here: a Hub model id, if anything. Out of the Hub's reach only its local cache
    # is read (the Hub client would otherwise retry for most of a minute before failing).
    from transformers import AutoTokenizer

    offline = _hub_reachable()
    try:
        return AutoTokenizer.from_pretrained(
            value, trust_remote_code=trust_remote_code, local_files_only=offline is not None
        )
    except Exception as exc:  # noqa: BLE001 - not cached, not on the Hub, or not a tokenizer: said below
        if offline is not None:
            why = (
                f"as a Hugging Face Hub model id it is not in the local cache, and the Hub is out of reach ({offline})"
            )
        else:
            why = f"no Hugging Face Hub model {value!r} could be loaded ({_first_line(exc)})"
    raise UsageError(f"{name}: no such folder ({path}); {why}")


def load_chat_tokenizer(
    model: str | Path,
    template: str | None,
    base_dir: str | Path | None,
    templates: Mapping[str, ChatTemplate],
    kind: str = "chat",
) -> tuple[Any, ChatTemplate | None]:
    """A tokenizer from a model or tokenizer folder, with the chat template resolved (among `templates`,
    the registry's ``chat_templates``) and applied (no template for plain text): what `llmforge data
    inspect`, the TUI's Data screen and `data lint` use."""
    tok = load_tokenizer(model, base_dir, what="--model")
    if kind == "text":
        return tok, None
    tpl = resolve_template(template or None, templates, tok, base_dir=base_dir)
    apply_template(tok, tpl)
    return tok, tpl


def encode_row(
    tokenizer: Any,
    template: ChatTemplate | None,
    kind: str,
    row: Mapping[str, Any],
    max_length: int,
    train_on: str = "assistant",
) -> tuple[list[int], list[int], bool]:
    """(input ids, labels, truncated) of one normalised data row, as a training stage would see it:
    chat rows through `encode_chat`, text rows as plain tokens (all trained), preference rows as the
    prompt with the chosen answer (what is trained towards)."""
    if kind == "text":
        ids = tokenizer(row["text"], add_special_tokens=False)["input_ids"]
        return ids[:max_length], ids[:max_length], len(ids) > max_length
    assert template is not None, f"a {kind} row needs a chat template (load_chat_tokenizer gives one)"
    if kind == "chat":
        enc = encode_chat(tokenizer, template, row["messages"], max_length=max_length, train_on=train_on)
    else:
        enc = encode_chat(
            tokenizer, template, list(row["prompt"]) + list(row["chosen"]), max_length=max_length, train_on="last_turn"
        )
    return enc.input_ids, enc.labels, enc.truncated


def _label(ids: Sequence[int], offsets: Iterable[Sequence[int]], spans: Sequence[tuple[int, int]]) -> list[int]:
    labels = [IGNORE_INDEX] * len(ids)
    k = 0  # tokens and spans are both in text order: one pass
    for t, (a, b) in enumerate(offsets):
        while k < len(spans) and spans[k][1] <= a:
            k += 1
        if k == len(spans):
            break
        s, e = spans[k]
        if s <= a < b <= e:  # wholly inside; a token straddling a boundary stays untrained
            labels[t] = ids[t]
    return labels
