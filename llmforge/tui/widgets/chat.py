"""A chat panel: talk to an HF model folder, a LoRA adapter or a GGUF file, the answer streamed as it comes.

The conversation loop is `llmforge chat`'s (llmforge.chat_engine.reply): the model's own chat template, the
same stop tokens, plain text completion for a model without a template. The engine that opens the model is
the first of the registry's chat engines that accepts it (plugins register them: the gguf plugin's open HF
folders and GGUF files), so the panel names none. Opening a model imports torch/transformers or llama_cpp
and generating keeps a core busy, so both happen in a worker thread; the tokens come back to the UI
through `call_from_thread`, and the UI stays responsive. One engine is kept open (the last model used) and
one answer runs at a time; escape stops it at the next token.

Everything shown goes through `terminal_safe`: a small model writes control characters, broken UTF-8
(U+FFFD) and zero-width characters, which terminals draw differently from how they are measured, and
the panel's border would break.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.widgets import Input, Static

from llmforge.tui.widgets.text import terminal_safe


class _Stopped(Exception):
    """Raised from the streaming callback to leave `reply()` when the user stops the answer."""


class Message(Static):
    DEFAULT_CSS = """
    Message { padding: 0 1; margin: 0 0 1 0; }
    Message.user { color: $text-accent; }
    Message.error { color: $text-error; }
    Message.note { color: $text-muted; }
    """


class ChatPanel(Vertical):
    """Chat with one model: type a message, enter sends it; escape stops an answer; ctrl+r starts afresh."""

    DEFAULT_CSS = """
    ChatPanel { border: round $panel; }
    ChatPanel #chat-title { height: 1; padding: 0 1; text-style: bold; }
    ChatPanel #chat-log { height: 1fr; }
    ChatPanel #chat-input { dock: bottom; }
    """

    BINDINGS = [
        Binding("escape", "stop", "Stop answer"),
        Binding("ctrl+r", "reset", "New chat"),
    ]

    def __init__(self, *, max_new_tokens: int = 256, temperature: float = 0.7, seed: int = 0, **kw):
        super().__init__(**kw)
        self.max_new_tokens, self.temperature, self.seed = max_new_tokens, temperature, seed
        self.model: Path | None = None
        self.history: list[dict] = []  # the conversation so far, as chat messages
        self.answering = False
        self.last_reply = None  # the last `Reply` (text, token ids, why it stopped): for tests and status
        self._stop = threading.Event()
        self._engine: Any = None  # opened in a worker, used only there (under _lock)
        self._engine_path: Path | None = None
        self._lock = threading.Lock()
        self._current: Message | None = None
        self._streamed = ""
        self._registry: Any = None  # only when the hosting app has no registry of its own (see _engines)

    def compose(self) -> ComposeResult:
        yield Static("chat: pick a model (enter)", id="chat-title")
        yield VerticalScroll(id="chat-log")
        yield Input(placeholder="message (enter sends)", id="chat-input", disabled=True)

    # ---- choosing the model --------------------------------------------------------------------
    def set_model(self, path: Path, label: str | None = None) -> None:
        """Talk to `path` from now on; a different model starts a new conversation."""
        path = Path(path)
        if path != self.model:
            if self.answering:  # the answer belongs to the conversation it was asked in
                self.notify("still answering: escape stops the answer first", severity="warning")
                return
            self.model = path
            self.history = []
            self.query_one("#chat-log", VerticalScroll).remove_children()
            self._note(f"talking to {path}")
        self.query_one("#chat-title", Static).update(terminal_safe(f"chat: {label or path.name}"))
        self.query_one("#chat-input", Input).disabled = False

    def focus_input(self) -> None:
        self.query_one("#chat-input", Input).focus()

    # ---- the conversation ----------------------------------------------------------------------
    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        text = event.value.strip()
        if not text or self.model is None:
            return
        if self.answering:
            self.notify("still answering: escape stops the answer", severity="warning")
            return
        event.input.value = ""
        self.send(text)

    def send(self, text: str) -> None:
        """Add a user message and start the answer."""
        self.history.append({"role": "user", "content": text})
        self._add(Message(terminal_safe(f"> {text}"), classes="user"))
        self._current = self._add(Message("…", classes="assistant"))
        self._streamed = ""
        self.answering = True
        self._stop.clear()
        self._answer(self.model, list(self.history), self.seed + len(self.history))

    def action_stop(self) -> None:
        if not self.answering:
            # Nothing to stop: escape does what it does elsewhere (the app's binding leaves the field).
            from textual.actions import SkipAction

            raise SkipAction()
        self._stop.set()

    def action_reset(self) -> None:
        if self.answering:
            self.notify("still answering: escape stops the answer first", severity="warning")
            return
        self.history = []
        self.query_one("#chat-log", VerticalScroll).remove_children()
        self._note("(conversation cleared)")

    @work(thread=True, exclusive=True, group="chat", exit_on_error=False)
    def _answer(self, model: Path, messages: list[dict], seed: int) -> None:
        from llmforge.errors import ForgeError

        try:
            with self._lock:
                engine = self._open(model)
                from llmforge.chat_engine import reply

                result = reply(
                    engine,
                    messages,
                    max_new_tokens=self.max_new_tokens,
                    temperature=self.temperature,
                    seed=seed,
                    on_text=self._stream_from_thread,
                )
            self.app.call_from_thread(self._finished, result, engine.template is not None, None)
        except _Stopped:
            self.app.call_from_thread(self._finished, None, True, None)
        except ForgeError as exc:  # not a model, a prompt longer than the context: say so, keep the chat
            self.app.call_from_thread(self._finished, None, True, exc.render())
        except Exception as exc:  # noqa: BLE001 - a model that cannot run must not take the app down
            self.app.call_from_thread(self._finished, None, True, f"{type(exc).__name__}: {exc}")

    def _engines(self) -> dict:
        """The registry's chat engines: the llmforge app's registry (AppState.registry), or, hosted by
        another app, one the panel loads for itself. Worker thread: loading the plugins takes a moment."""
        from llmforge.chat_engine import CHAT_ENGINES

        state = getattr(self.app, "state", None)
        if state is not None and callable(getattr(state, "registry", None)):
            return state.registry().table(CHAT_ENGINES)
        if self._registry is None:
            from llmforge.plugins import load_registry

            self._registry = load_registry()
        return self._registry.table(CHAT_ENGINES)

    def _open(self, model: Path):
        """The engine for `model`, opening it (and closing the previous one) when it changed. Worker thread."""
        from llmforge import chat_engine

        if self._engine is not None and self._engine_path == model:
            return self._engine
        self._close_engine()
        self.app.call_from_thread(self._set_streamed, f"loading {model.name}…")
        self._engine = chat_engine.open_engine(model, self._engines())
        self._engine_path = model
        self.app.call_from_thread(self._set_streamed, "")
        return self._engine

    def _close_engine(self) -> None:
        if self._engine is not None:
            engine, self._engine, self._engine_path = self._engine, None, None
            engine.close()

    def _stream_from_thread(self, text: str) -> None:
        if self._stop.is_set():
            raise _Stopped
        self.app.call_from_thread(self._append, text)

    def _append(self, text: str) -> None:
        self._set_streamed(self._streamed + text)

    def _set_streamed(self, text: str) -> None:
        self._streamed = text
        if self._current is not None:
            self._current.update(terminal_safe(text or "…"))
            self.query_one("#chat-log", VerticalScroll).scroll_end(animate=False)

    def _finished(self, result, chat: bool, error: str | None) -> None:
        self.answering = False
        if error is not None:
            self.history.pop()  # the message that could not be answered is not part of the conversation
            if self._current is not None:
                self._current.remove()
            self._add(Message(terminal_safe(f"error: {error}"), classes="error"))
            return
        if result is None:  # stopped: keep what was said so far, as the CLI keeps a partial answer on screen
            self._set_streamed(self._streamed)
            self.history.append({"role": "assistant", "content": self._streamed})
            self._note("(stopped)")
            return
        self.last_reply = result
        self._set_streamed(result.text)
        if result.dropped:
            del self.history[: result.dropped]  # older messages no longer fit the context: leave them out
            self._note(f"({result.dropped} older message(s) left out: the context is full)")
        self.history.append({"role": "assistant", "content": result.text})
        if not chat:
            self.history = []  # plain completion (no chat template): each prompt stands alone

    # ---- helpers ---------------------------------------------------------------------------------
    def _add(self, message: Message) -> Message:
        log = self.query_one("#chat-log", VerticalScroll)
        log.mount(message)
        log.scroll_end(animate=False)
        return message

    def _note(self, text: str) -> None:
        self._add(Message(terminal_safe(text), classes="note"))

    def on_unmount(self) -> None:
        self._stop.set()
        # Free llama.cpp's memory now; if an answer is still running, its thread holds the lock and the
        # engine goes with the process.
        if self._lock.acquire(blocking=False):
            try:
                self._close_engine()
            finally:
                self._lock.release()
