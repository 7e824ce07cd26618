"""Chat engines: how `llmforge chat`, the TUI's chat panel and the demo's evaluation talk to a model.

The core holds what every engine shares: the conversation loop (:func:`reply`: the model's own chat
template rendered by :func:`llmforge.chat.render`, the oldest messages dropped until the prompt fits the
context, the answer streamed and cut at the stop tokens and stop strings) and the choice of an engine for
a path (:func:`open_engine`). How a model is opened and run is a plugin's: the gguf plugin registers the
``hf`` engine (transformers, for a model or adapter folder) and the ``gguf`` engine (llama.cpp), through
the ``register_chat_engines`` hook this module declares (:data:`CHAT_ENGINES`). So the core's front ends
chat with any model a plugin can open, and know none of the engines by name.

An engine formats the conversation with the template it reports in ``template`` (None: plain text
completion, each prompt continued), tokenizes a rendered chat with special tokens parsed and no BOS added
(the template writes it), and generates one token at a time; :func:`reply` decides when to stop. Nothing
heavy is imported here: an engine imports torch or llama.cpp when it is opened.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from llmforge.errors import UsageError
from llmforge.extension import ExtensionPoint, subclass_of


@dataclass
class Reply:
    """One answer: its text, the token ids generated (what a parity test compares), why it stopped."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    stop: str = "length"  # "token", "string" or "length"
    prompt_tokens: int = 0
    dropped: int = 0  # oldest messages left out so that the prompt fits the context


class ChatEngine:
    """Base class of chat engines. Registered (as a class) through ``register_chat_engines``.

    Class attributes: ``name`` (``hf``, ``gguf``), ``summary``, and ``opens``, what it opens in words
    (``a .gguf file``: the hint when no engine recognises a path). :meth:`refuse` decides, cheaply and
    without heavy imports, whether the engine opens a path; the constructor ``Engine(path, n_ctx=None,
    log=None)`` opens it (imports and loading happen there).

    An open engine has ``path``, ``template`` (the chat template's source, or None for plain text
    completion), ``context`` (tokens the prompt and the answer may take together), ``stop_strings``
    (plain text that ends an answer, cut before it) and ``trained`` (the context the model was trained
    with, when larger than ``context``: the error for a long prompt then suggests a larger ``--n-ctx``).
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    opens: ClassVar[str] = ""

    path: Path
    template: str | None = None
    context: int = 0
    stop_strings: tuple[str, ...] = ()
    trained: int = 0

    def __init__(self, path: Path, *, n_ctx: int | None = None, log: Callable[[str], Any] | None = None) -> None:
        self.path = Path(path)

    @classmethod
    def refuse(cls, path: Path) -> str | None:
        """None when this engine opens ``path`` (an existing file or folder), else why not, in a few words
        (``not a GGUF file (it does not start with the GGUF magic bytes)``)."""
        return "not supported"

    def encode(self, text: str, *, chat: bool) -> list[int]:
        """Token ids of ``text``: a rendered chat (``chat``: special tokens parsed, no BOS added) or plain
        text (the tokenizer's BOS added)."""
        raise NotImplementedError

    def generate(self, ids: list[int], *, temperature: float, seed: int) -> Iterator[int]:
        """The next tokens after ``ids``, one at a time, for as long as the caller iterates: greedy at
        temperature 0, else sampled from softmax(logits / T) with a generator seeded by ``seed``."""
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        """The text of ``ids``, special tokens left out."""
        raise NotImplementedError

    def render_variables(self) -> dict:
        """Variables the chat template reads besides the messages (``bos_token``, ``eos_token``)."""
        return {}

    def is_stop(self, token: int) -> bool:
        """True for a token that ends an answer (EOS, the template's end of turn)."""
        raise NotImplementedError

    def close(self) -> None:
        """Free the model (a llama.cpp child process, GPU memory)."""


#: The extension point chat engines are registered through; the front ends read the table with
#: ``registry.table(CHAT_ENGINES)`` and open a model with :func:`open_engine`.
CHAT_ENGINES = ExtensionPoint(
    hook="register_chat_engines",
    table="chat_engines",
    label="chat engine",
    doc="""Register chat engines: :class:`llmforge.chat_engine.ChatEngine` subclasses.

    An engine opens one kind of model (``refuse(path)`` says whether it opens a path, cheaply) and
    tokenizes, generates and decodes for the conversation loop of the core (``llmforge.chat_engine.reply``),
    which `llmforge chat`, the TUI's chat panel and the demo's evaluation share. The first engine, in
    load order, that accepts a path opens it. The built-in engines (``hf``: transformers, for a model or
    adapter folder; ``gguf``: llama.cpp) are registered by the gguf plugin through this hook too.
    """,
    validate=subclass_of(ChatEngine),
)


def open_engine(
    path: Path,
    engines: dict[str, type[ChatEngine]],
    *,
    n_ctx: int | None = None,
    log: Callable[[str], Any] | None = None,
) -> ChatEngine:
    """Open ``path`` with the first of ``engines`` (the registry's table, in load order) that accepts it;
    a UsageError naming the path and what each engine wanted when none does."""
    path = Path(path)
    kinds = " or ".join(cls.opens for cls in engines.values() if cls.opens) or "a model"
    if not path.exists():
        raise UsageError(f"{path}: no such file or directory", hint=f"give {kinds}")
    why = []
    for cls in engines.values():
        reason = cls.refuse(path)
        if reason is None:
            return cls(path, n_ctx=n_ctx, log=log)
        why.append(reason)
    if not engines:
        raise UsageError(
            f"{path}: no chat engine is installed",
            hint="the gguf plugin provides them; `llmforge plugins list` shows what loaded",
        )
    raise UsageError(f"{path}: " + "; ".join(why), hint=f"give {kinds}")


# ------------------------------------------------------------------------------------------------
# one reply


def render_prompt(engine: ChatEngine, messages: list[dict]) -> str:
    """The conversation rendered by the engine's chat template, ready for the assistant's answer."""
    from llmforge.chat import render

    if not engine.template:  # plain text completion has nothing to render (reply() sends the text as it is)
        raise ValueError(f"{engine.path}: the model has no chat template")
    return render(engine.template, messages, add_generation_prompt=True, **engine.render_variables())


def _prompt_ids(engine: ChatEngine, messages: list[dict], max_new_tokens: int) -> tuple[list[int], int]:
    """The prompt's token ids, dropping the oldest messages (never the system message or the last one) until
    the prompt and at least a few answer tokens fit in the context; and how many were dropped."""
    messages = list(messages)
    dropped = 0
    while True:
        if engine.template:
            ids = engine.encode(render_prompt(engine, messages), chat=True)
        else:
            ids = engine.encode(messages[-1]["content"], chat=False)
        if len(ids) + min(max_new_tokens, 16) <= engine.context:
            return ids, dropped
        first = 1 if messages[0]["role"] == "system" else 0
        if len(messages) - first <= 1:
            grow = getattr(engine, "trained", 0) > engine.context  # a GGUF opened with less than it can take
            raise UsageError(
                f"the prompt takes {len(ids)} tokens; the model's context is {engine.context}",
                hint="shorten the prompt" + (" or raise --n-ctx" if grow else ""),
            )
        del messages[first]
        dropped += 1


class _Stream:
    """Turns token ids into printable text as they come: holds back an unfinished UTF-8 character and
    any tail that could be the start of a stop string."""

    def __init__(self, engine: ChatEngine, on_text: Callable[[str], None] | None):
        self.engine, self.on_text = engine, on_text
        self.ids: list[int] = []
        self.shown = 0
        self.text = ""

    def add(self, token: int) -> bool:
        """Add a token; True when a stop string has appeared (the text is then cut before it)."""
        self.ids.append(token)
        text = self.engine.decode(self.ids)
        for stop in self.engine.stop_strings:
            at = text.find(stop)
            if at >= 0:
                self.text = text[:at]
                return True
        self.text = text
        safe = len(text.rstrip("\ufffd"))
        for stop in self.engine.stop_strings:
            for k in range(min(len(stop) - 1, safe), 0, -1):
                if text[:safe].endswith(stop[:k]):
                    safe -= k
                    break
        self._emit(safe)
        return False

    def _emit(self, upto: int) -> None:
        if upto > self.shown and self.on_text:
            self.on_text(self.text[self.shown : upto])
        self.shown = max(self.shown, upto)

    def finish(self) -> str:
        self._emit(len(self.text))
        return self.text


def reply(
    engine: ChatEngine,
    messages: list[dict],
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.7,
    seed: int = 0,
    on_text: Callable[[str], None] | None = None,
) -> Reply:
    """Generate the answer to ``messages`` (a chat), or a continuation of the last message's text (no
    template). ``on_text`` receives the answer as it grows (only text that can no longer turn into a stop
    string); an exception it raises leaves the loop (how the TUI stops an answer)."""
    ids, dropped = _prompt_ids(engine, messages, max_new_tokens)
    budget = min(max_new_tokens, engine.context - len(ids))
    stream = _Stream(engine, on_text)
    out = Reply(text="", prompt_tokens=len(ids), dropped=dropped)
    for n, token in enumerate(engine.generate(ids, temperature=temperature, seed=seed)):
        if n >= budget:
            break
        if engine.is_stop(token):
            out.stop = "token"
            break
        out.token_ids.append(token)
        if stream.add(token):
            out.stop = "string"
            break
    out.text = stream.finish()
    return out
