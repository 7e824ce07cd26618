"""Ollama Modelfiles: `FROM ./file.gguf`, the chat template in Ollama's Go template syntax, stop tokens.

Ollama does not run the Jinja chat template a GGUF carries; it needs a Go `text/template`. Translating
arbitrary Jinja is not possible, so the template is first *recognised* by what it does: a probe
conversation is rendered with it and with each built-in template (chatml, llama3, alpaca, mistral, qwen, gemma,
phi3), and a template that produces the same text on every probe gets that layout's hand-written Go template
(a built-in's own source gets its own name, where two built-ins render the probes alike: chatml and qwen).
Comparing renderings, not sources, recognises a template however it is spelt.

Any other template is *derived* when it has the simple shape most chat formats have: a fixed text
before the conversation, then each message as `prefix(role) + content + suffix(role)`, and a
generation prompt after the last message. The pieces are cut out of renderings of the probe around
marker strings, and accepted only if putting them back together reproduces the Jinja output on every
probe. A template that needs anything more (dates, position-dependent turns, tool logic) gets a
Modelfile without TEMPLATE and a comment saying why: Ollama then falls back to its own guess, which a
user can override, and no wrong template is written silently.

The Go templates use only `range` over `.Messages`, `.Role`, `.Content`, `if`/`else if`, `eq`, `ne`,
`and`, `len`, `slice` and `index`: the subset every Ollama release understands. No trim markers are
used, so every character between actions is part of the format.

Imported lazily (by the stage and the commands); jinja2 and gguf only inside functions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

# Marker contents for the probe: unlikely to occur in any template, no whitespace (some templates trim).
_SYS, _U1, _A1, _U2, _A2, _U3 = "QzSysPrompt7", "QzUserOne7", "QzAsstOne7", "QzUserTwo7", "QzAsstTwo7", "QzUserThree7"

# What the recognised layouts are checked on: with and without a system message, one to three rounds,
# ending on a user turn with the generation prompt or on an assistant turn without it.
_CONVERSATIONS: tuple[tuple[tuple[str, ...], bool], ...] = (
    (("user",), True),
    (("user", "assistant"), False),
    (("user", "assistant", "user"), True),
    (("user", "assistant", "user", "assistant"), False),
    (("system", "user"), True),
    (("system", "user", "assistant", "user"), True),
    (("system", "user", "assistant", "user", "assistant"), False),
)

# Loop scaffolding shared by the Go templates: `$last` is true on the last message, where the generation
# prompt goes unless the model is continuing its own (assistant) message.
_LAST = "{{ $last := eq (len (slice $.Messages $i)) 1 }}"


def _gen(prompt: str) -> str:
    return '{{ if and $last (ne .Role "assistant") }}' + prompt + "{{ end }}"


_ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)

# name -> (text before the conversation, the rest). The first part is kept apart because llama.cpp adds the
# BOS itself when the GGUF says so; writing it in the template too would double it.
KNOWN_TEMPLATES: dict[str, tuple[str, str]] = {
    "chatml": (
        "",
        "{{ range $i, $_ := .Messages }}"
        + _LAST
        + "<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
        + _gen("<|im_start|>assistant\n")
        + "{{ end }}",
    ),
    "llama3": (
        "<|begin_of_text|>",
        "{{ range $i, $_ := .Messages }}"
        + _LAST
        + "<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
        + _gen("<|start_header_id|>assistant<|end_header_id|>\n\n")
        + "{{ end }}",
    ),
    # The system message, when there is one, replaces the default preamble.
    "alpaca": (
        "<s>",
        '{{ if and .Messages (eq (index .Messages 0).Role "system") }}{{ (index .Messages 0).Content }}'
        "{{ else }}" + _ALPACA_PREAMBLE + "{{ end }}\n\n"
        "{{ range $i, $_ := .Messages }}" + _LAST + '{{ if eq .Role "user" }}### Instruction:\n{{ .Content }}\n\n'
        '{{ else if eq .Role "assistant" }}### Response:\n{{ .Content }}</s>\n\n{{ end }}'
        + _gen("### Response:\n")
        + "{{ end }}",
    ),
    # The system message goes in front of the first user message; the answer follows [/INST] directly.
    "mistral": (
        "<s>",
        "{{ range $i, $_ := .Messages }}"
        '{{ if eq .Role "user" }}[INST] '
        '{{ if and (eq $i 1) (eq (index $.Messages 0).Role "system") (index $.Messages 0).Content }}'
        "{{ (index $.Messages 0).Content }}\n\n{{ end }}{{ .Content }} [/INST]"
        '{{ else if eq .Role "assistant" }} {{ .Content }}</s>{{ end }}{{ end }}',
    ),
    # ChatML, with consecutive tool results in one user turn as Qwen writes them: the turn is opened by the
    # message before the first result (or by a first message that is one) and closed after the last. Tool
    # definitions and calls are not written: they need Ollama's .Tools/.ToolCalls, outside this subset.
    "qwen": (
        "",
        "{{ range $i, $_ := .Messages }}"
        + _LAST
        + '{{ if eq .Role "tool" }}{{ if eq $i 0 }}<|im_start|>user{{ end }}'
        + "\n<tool_response>\n{{ .Content }}\n</tool_response>"
        + '{{ if $last }}<|im_end|>\n{{ else if ne (index (slice $.Messages $i) 1).Role "tool" }}<|im_end|>\n{{ end }}'
        + "{{ else }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
        + '{{ if $last }}{{ else if eq (index (slice $.Messages $i) 1).Role "tool" }}<|im_start|>user{{ end }}'
        + "{{ end }}"
        + _gen("<|im_start|>assistant\n")
        + "{{ end }}",
    ),
    # No system role: the system message goes in front of the first user message, then a blank line.
    "gemma": (
        "<bos>",
        "{{ range $i, $_ := .Messages }}"
        + _LAST
        + '{{ if eq .Role "user" }}<start_of_turn>user\n'
        + '{{ if and (eq $i 1) (eq (index $.Messages 0).Role "system") }}'
        + "{{ (index $.Messages 0).Content }}\n\n{{ end }}"
        + "{{ .Content }}<end_of_turn>\n"
        + '{{ else if eq .Role "assistant" }}<start_of_turn>model\n{{ .Content }}<end_of_turn>\n{{ end }}'
        + _gen("<start_of_turn>model\n")
        + "{{ end }}",
    ),
    # An empty system message is left out.
    "phi3": (
        "",
        "{{ range $i, $_ := .Messages }}"
        + _LAST
        + '{{ if eq .Role "system" }}{{ if .Content }}<|system|>\n{{ .Content }}<|end|>\n{{ end }}'
        + '{{ else if eq .Role "user" }}<|user|>\n{{ .Content }}<|end|>\n'
        + '{{ else if eq .Role "assistant" }}<|assistant|>\n{{ .Content }}<|end|>\n{{ end }}'
        + _gen("<|assistant|>\n")
        + "{{ end }}",
    ),
}


@dataclass(frozen=True)
class ChatInfo:
    """What a Modelfile needs from a GGUF's tokenizer metadata."""

    template: str | None
    bos: str | None = None
    eos: str | None = None
    eot: str | None = None  # end of turn, when the vocabulary names one apart from EOS
    add_bos: bool = False  # llama.cpp (and so Ollama) puts the BOS in front of the prompt itself


@dataclass
class Translation:
    """A chat template in Go syntax, or why there is none; and the stop strings."""

    template: str | None
    layout: str  # a known name, "derived", or "none"
    reason: str = ""
    stops: list[str] = field(default_factory=list)


class _NotSimple(Exception):
    pass


# ------------------------------------------------------------------------------------------------
# rendering the probe


def _messages(roles: tuple[str, ...]) -> list[dict]:
    users, assistants = iter((_U1, _U2, _U3)), iter((_A1, _A2))
    content = {"system": lambda: _SYS, "user": lambda: next(users), "assistant": lambda: next(assistants)}
    return [{"role": r, "content": content[r]()} for r in roles]


def _render(source: str, roles: tuple[str, ...], gen: bool, variables: dict) -> str | None:
    """The Jinja rendering of a probe conversation; None when the template refuses it."""
    from llmforge.chat import ChatTemplateError, render

    try:
        return render(source, _messages(roles), add_generation_prompt=gen, **variables)
    except ChatTemplateError:
        return None


def _variables(info: ChatInfo) -> dict:
    return {k: v for k, v in (("bos_token", info.bos), ("eos_token", info.eos)) if v is not None}


def recognise(source: str, info: ChatInfo | None = None) -> str | None:
    """The built-in template whose layout `source` produces on every probe conversation, if any."""
    from llmforge_plugins.chat_templates import BUILTIN_TEMPLATES

    for builtin in BUILTIN_TEMPLATES:
        if source == builtin.source:  # qwen renders the probes as chatml does; its own source is still qwen
            return builtin.name
    variables = _variables(info or ChatInfo(template=source))
    ours = [_render(source, roles, gen, variables) for roles, gen in _CONVERSATIONS]
    if all(text is None for text in ours):
        return None
    for builtin in BUILTIN_TEMPLATES:
        theirs = [_render(builtin.source, roles, gen, {}) for roles, gen in _CONVERSATIONS]
        if theirs == ours:
            return builtin.name
    return None


# ------------------------------------------------------------------------------------------------
# deriving a simple layout


@dataclass(frozen=True)
class Layout:
    """`head`, then each message as prefix[role] + content + suffix[role], then `generation` after a last
    message that is not the assistant's."""

    head: str
    prefix: dict[str, str]
    suffix: dict[str, str]
    generation: str

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        out = [self.head]
        for m in messages:
            out += [self.prefix[m["role"]], m["content"], self.suffix[m["role"]]]
        if add_generation_prompt and messages and messages[-1]["role"] != "assistant":
            out.append(self.generation)
        return "".join(out)


def _cut(text: str, marker: str) -> tuple[str, str]:
    at = text.find(marker)
    if at < 0 or text.find(marker, at + 1) >= 0:
        raise _NotSimple(f"the content {marker!r} is not rendered exactly once")
    return text[:at], text[at + len(marker) :]


def _after(text: str | None, prefix: str | None) -> str:
    """What `text` adds to `prefix`; rendering more messages must only append."""
    if text is None or prefix is None or not text.startswith(prefix):
        raise _NotSimple("rendering one more message changes what was rendered before it")
    return text[len(prefix) :]


def derive_layout(source: str, info: ChatInfo | None = None) -> Layout:
    """Cut a template's pieces out of its renderings of the probe; raise _NotSimple when it has no such shape."""
    variables = _variables(info or ChatInfo(template=source))

    def r(*roles: str, gen: bool = False) -> str | None:
        return _render(source, roles, gen, variables)

    one_user = r("user")
    if one_user is None:
        raise _NotSimple("it cannot render a single user message")
    head_and_up, us = _cut(one_user, _U1)
    ap, as_ = _cut(_after(r("user", "assistant"), one_user), _A1)
    up, us2 = _cut(_after(r("user", "assistant", "user"), r("user", "assistant")), _U2)
    if us2 != us or not head_and_up.endswith(up):
        raise _NotSimple("the user turns are not all written the same way")
    head = head_and_up[: len(head_and_up) - len(up)]
    generation = _after(r("user", gen=True), one_user)
    prefix, suffix = {"user": up, "assistant": ap}, {"user": us, "assistant": as_}
    with_system = r("system", "user")
    if with_system is not None:
        sp, rest = _cut(_after(with_system, head), _SYS)
        tail = up + _U1 + us
        if not rest.endswith(tail):
            raise _NotSimple("the system message changes how the first user message is written")
        prefix["system"], suffix["system"] = sp, rest[: len(rest) - len(tail)]
    layout = Layout(head, prefix, suffix, generation)
    for roles, gen in _CONVERSATIONS:
        if "system" in roles and "system" not in prefix:
            continue
        expected = r(*roles, gen=gen)
        if expected != layout.render(_messages(roles), gen):
            raise _NotSimple(f"the pieces do not reproduce a {len(roles)}-message conversation")
    return layout


def _go_literal(text: str) -> str:
    if "{{" in text or "}}" in text:
        raise _NotSimple("its text contains {{ or }}, which Go templates would read as actions")
    return text


def layout_to_go(layout: Layout) -> tuple[str, str]:
    """(head, body) of the Go template that writes `layout`."""
    branches = []
    for role in ("system", "user", "assistant"):
        if role in layout.prefix:
            branches.append(
                f'if eq .Role "{role}" }}}}{_go_literal(layout.prefix[role])}{{{{ .Content }}}}'
                f"{_go_literal(layout.suffix[role])}"
            )
    body = "{{ range $i, $_ := .Messages }}"
    if layout.generation:
        body += _LAST
    body += "{{ " + "{{ else ".join(branches) + "{{ end }}"
    if layout.generation:
        body += _gen(_go_literal(layout.generation))
    return _go_literal(layout.head), body + "{{ end }}"


# ------------------------------------------------------------------------------------------------
# the Modelfile


def _stops(info: ChatInfo, name: str | None, layout: Layout | None) -> list[str]:
    """EOS, end-of-turn, and what starts the next turn: generation must end where the answer does."""
    from llmforge_plugins.chat_templates import BUILTIN_TEMPLATES

    found = [info.eos, info.eot]
    known = {t.name: t for t in BUILTIN_TEMPLATES}
    if name in known:
        found += known[name].stop_strings
    if layout is not None:
        found += [layout.suffix["assistant"].strip(), layout.prefix["user"].strip()]
    return [s for s in dict.fromkeys(found) if s and s.strip() and len(s) <= 64]


def translate(info: ChatInfo) -> Translation:
    """The Go template for a GGUF's chat template: recognised, derived, or none (with the reason)."""
    if not info.template:
        return Translation(None, "none", "the GGUF carries no chat template", _stops(info, None, None))
    layout = None
    name = recognise(info.template, info)
    try:
        if name is not None:
            head, body = KNOWN_TEMPLATES[name]
        else:
            layout = derive_layout(info.template, info)
            head, body = layout_to_go(layout)
    except _NotSimple as exc:
        return Translation(
            None, "none", f"its chat template is not a simple role/content layout ({exc})", _stops(info, None, None)
        )
    if info.add_bos and info.bos and head.startswith(info.bos):
        head = head[len(info.bos) :]  # llama.cpp puts the BOS in front itself
    text = _go_literal(head) + body
    if '"""' in text:
        return Translation(
            None, "none", 'its chat template contains """, which ends a Modelfile string', _stops(info, name, layout)
        )
    return Translation(text, name or "derived", "", _stops(info, name, layout))


def _quote(value: str) -> str | None:
    if '"' not in value and "\n" not in value and "\\" not in value:
        return f'"{value}"'
    if '"""' not in value and not value.endswith('"'):
        return f'"""{value}"""'
    return None


def modelfile_text(gguf_name: str, info: ChatInfo) -> str:
    """The Modelfile for a GGUF named `gguf_name`, in the same folder."""
    tr = translate(info)
    lines = [
        "# Ollama Modelfile written by llmforge. Use it with:",
        f"#   ollama create NAME -f {Path(gguf_name).stem}.Modelfile",
        f"FROM ./{gguf_name}",
    ]
    if tr.template is not None:
        how = (
            "the built-in template '" + tr.layout + "'"
            if tr.layout != "derived"
            else "the GGUF's chat template, derived from how it renders a conversation"
        )
        lines += ["", f"# Chat template: {how}.", f'TEMPLATE """{tr.template}"""']
    else:
        lines += [
            "",
            f"# No TEMPLATE: {tr.reason}.",
            "# Ollama will guess one; write a TEMPLATE here if its guess is wrong.",
        ]
    stops = [q for s in tr.stops if (q := _quote(s)) is not None]
    if stops:
        lines.append("")
        lines += [f"PARAMETER stop {q}" for q in stops]
    return "\n".join(lines) + "\n"


def read_chat_info(gguf: Path) -> ChatInfo:
    """The chat template and special tokens from a GGUF's metadata. Only these keys are decoded (metadata.py):
    gguf's GGUFReader would parse the whole vocabulary and merges first, seconds and hundreds of MB for a
    150k-token one, to give back three strings of it."""
    from llmforge_plugins.gguf.metadata import read_metadata

    ids = ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")
    template, add_bos, tokens = "tokenizer.chat_template", "tokenizer.ggml.add_bos_token", "tokenizer.ggml.tokens"
    # a missing, foreign or truncated file is a UsageError naming it
    meta = read_metadata(gguf, (template, add_bos, tokens, *ids))
    vocab = meta.get(tokens)

    def token(key: str) -> str | None:
        idx = meta.get(key)
        if not isinstance(vocab, list) or idx is None or not 0 <= int(idx) < len(vocab):
            return None
        return str(vocab[int(idx)])

    return ChatInfo(
        template=meta.get(template),
        bos=token(ids[0]),
        eos=token(ids[1]),
        eot=token(ids[2]),
        add_bos=bool(meta.get(add_bos)),
    )


def modelfile_path(gguf: Path) -> Path:
    return Path(gguf).with_suffix(".Modelfile")


def write_modelfile(gguf: Path, out: Path | None = None) -> Path:
    """Write `<name>.Modelfile` next to `gguf` (or to `out`) and return its path."""
    gguf = Path(gguf)
    out = Path(out) if out is not None else modelfile_path(gguf)
    text = modelfile_text(gguf.name, read_chat_info(gguf))
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(out)
    return out
