"""`llmforge chat`: talk to an HF model directory (transformers) or a GGUF file (llama.cpp).

The two chat engines this plugin registers (``register_chat_engines``, the core's extension point in
llmforge.chat_engine): ``hf`` and ``gguf``. The conversation loop they run under (`reply`, the prompt
fitted to the context, streaming, stop strings) is the core's, shared with the TUI's chat panel; the
session here (one prompt, or a prompt loop on stdin) is the `llmforge chat` command's.

Both engines format the conversation the same way: the model's own chat template (the tokenizer's, or
the one the GGUF carries) rendered by `llmforge.chat.render`, the renderer training masks were computed
with; the text is tokenized with special tokens parsed and no BOS added (the template writes it), as
transformers' `apply_chat_template` does. Generation is a plain loop on each side: greedy at
temperature 0, otherwise sampling from softmax(logits / T) with a seeded generator (no top-k/top-p), and
it stops on the same tokens (EOS, the template's end of turn, well-known end-of-generation tokens) and
stop strings. So with greedy decoding an F32 GGUF answers with the same tokens as the HF model it came
from: that is what `Reply.token_ids` lets a test check.

A model without a chat template is driven as plain text completion: each prompt is continued.

The engines import torch and transformers when they are opened, never at import; llama.cpp runs in a child
process (llmforge.native), so a native crash there is an error naming the file and the signal.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO, cast

from llmforge.chat_engine import ChatEngine, Reply, render_prompt, reply
from llmforge.chat_engine import open_engine as open_with
from llmforge.errors import UsageError

__all__ = [
    "ENGINES",
    "GGUFEngine",
    "HFEngine",
    "Reply",
    "ChatSettings",
    "chat_main",
    "interactive",
    "one_shot",
    "open_engine",
    "render_prompt",
    "reply",
]

# Tokens that end generation by their name, whatever the model's EOS is (llama.cpp treats these as
# end-of-generation too, so both engines stop at the same place).
END_TOKENS = (
    "</s>",
    "<|endoftext|>",
    "<|im_end|>",
    "<|eot_id|>",
    "<|end_of_text|>",
    "<|eom_id|>",
    "<|end|>",
    "<end_of_turn>",
    "<EOT>",
    "<|return|>",
)
DEFAULT_N_CTX = 4096


# ------------------------------------------------------------------------------------------------
# opening a model


def is_gguf(path: Path) -> bool:
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def open_engine(path: Path, *, n_ctx: int | None = None, log: Callable | None = None) -> ChatEngine:
    """An engine of this plugin's for an HF model or adapter directory, or a .gguf file; UsageError for
    anything else. (The front ends open through the registry's engines: ``llmforge.chat_engine.open_engine``.)"""
    return open_with(path, ENGINES, n_ctx=n_ctx, log=log)


def _stop_strings(template: str | None) -> tuple[str, ...]:
    """Plain-text stops of a recognised built-in layout (e.g. alpaca's '### Instruction:')."""
    if not template:
        return ()
    from llmforge_plugins.chat_templates import BUILTIN_TEMPLATES
    from llmforge_plugins.gguf.modelfile import recognise

    name = recognise(template)
    for t in BUILTIN_TEMPLATES:
        if t.name == name:
            return tuple(s for s in t.stop if s not in t.special_tokens)
    return ()


class HFEngine(ChatEngine):
    name = kind = "hf"
    summary = "An HF model or LoRA adapter folder, run with transformers (float32 on the CPU)."
    opens = "an HF model or adapter directory"

    @classmethod
    def refuse(cls, path: Path) -> str | None:
        if not path.is_dir():
            return "not a model directory"
        if not (path / "config.json").exists() and not (path / "adapter_config.json").exists():
            return "not a model directory (no config.json or adapter_config.json)"
        return None

    def __init__(self, path: Path, *, n_ctx: int | None = None, log: Callable | None = None):
        import torch
        from transformers.utils import logging as hf_logging

        from llmforge.chat import ChatTemplateError, template_from_tokenizer
        from llmforge_plugins.gguf.export import check_model_folder
        from llmforge_plugins.training.models import load_model

        hf_logging.set_verbosity_error()
        self.path = path
        check_model_folder(path)  # a truncated safetensors or adapter config is named here, exit 2
        tok_dir = path if (path / "tokenizer_config.json").exists() else self._adapter_base(path)
        try:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
            # float32 on the CPU: exact, and what an F32 GGUF is compared with.
            dtype = None if self.device == "cuda" else torch.float32
            self.model = load_model(path, dtype=dtype).to(self.device).eval()
        except (OSError, ValueError) as exc:
            raise UsageError(f"{path}: cannot load the model ({exc})") from exc
        source = getattr(self.tokenizer, "chat_template", None)
        if isinstance(source, dict):
            source = source.get("default")
        self.template = source or None
        self.context = int(getattr(self.model.config, "max_position_embeddings", 0) or DEFAULT_N_CTX)
        vocab = self.tokenizer.get_vocab()
        stops = {vocab[t] for t in END_TOKENS if t in vocab}
        for ids in (
            self.model.config.eos_token_id,
            getattr(self.model.generation_config, "eos_token_id", None),
            self.tokenizer.eos_token_id,
        ):
            stops.update(ids if isinstance(ids, (list, tuple)) else [ids] if ids is not None else [])
        if self.template:
            try:  # the token the template ends an answer with, when it is not the EOS (<|im_end|> vs <|endoftext|>)
                end = template_from_tokenizer(self.tokenizer).eos
            except ChatTemplateError:
                end = None
            if end is not None and end in vocab:
                stops.add(vocab[end])
        self.stops = stops
        self.stop_strings = _stop_strings(self.template)
        # transformers 5.2x renamed past_key_values to cache (argument and output); accept either.
        params = inspect.signature(self.model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        if log:
            log(f"loaded {path} with transformers on {self.device}")

    @staticmethod
    def _adapter_base(path: Path) -> Path:
        from llmforge.runs import read_json_object

        cfg = path / "adapter_config.json"
        if cfg.exists():
            base = read_json_object(cfg, "adapter config").get("base_model_name_or_path")
            if base:
                return Path(base)
        return path

    def render_variables(self) -> dict:
        tok = self.tokenizer
        return {k: v for k, v in (("bos_token", tok.bos_token), ("eos_token", tok.eos_token)) if v}

    def encode(self, text: str, *, chat: bool) -> list[int]:
        # A rendered chat already holds its BOS (the template writes it); plain text gets the tokenizer's.
        return self.tokenizer(text, add_special_tokens=not chat)["input_ids"]

    def generate(self, ids: list[int], *, temperature: float, seed: int) -> Iterator[int]:
        import torch

        gen = torch.Generator(device=self.device).manual_seed(seed)
        past, step = None, torch.tensor([ids], device=self.device)
        with torch.no_grad():
            while True:
                out = self.model(input_ids=step, use_cache=True, logits_to_keep=1, **{self._cache_arg: past})
                past = getattr(out, self._cache_arg)
                logits = out.logits[0, -1].float()
                if temperature <= 0:
                    token = int(torch.argmax(logits))
                else:
                    probs = torch.softmax(logits / temperature, dim=-1)
                    token = int(torch.multinomial(probs, 1, generator=gen))
                yield token
                step = torch.tensor([[token]], device=self.device)

    def decode(self, ids: list[int]) -> str:
        # str for a list of ids (the list[str] of its annotation is for a batch of lists)
        return cast(str, self.tokenizer.decode(ids, skip_special_tokens=True))

    def is_stop(self, token: int) -> bool:
        return token in self.stops

    def close(self) -> None:
        pass


class GGUFEngine(ChatEngine):
    """llama.cpp in a child process (llmforge.native): a native crash ends this engine with an error naming the
    file and the signal, and the CLI, the TUI or the demo that asked goes on."""

    name = kind = "gguf"
    summary = "A GGUF file, run with llama.cpp in a child process."
    opens = "a .gguf file"

    @classmethod
    def refuse(cls, path: Path) -> str | None:
        if not path.is_file():
            return "not a GGUF file (a folder)"
        if not is_gguf(path):
            return "not a GGUF file (it does not start with the GGUF magic bytes)"
        return None

    def __init__(self, path: Path, *, n_ctx: int | None = None, log: Callable | None = None):
        from llmforge.native import LlamaModel
        from llmforge_plugins.gguf.metadata import read_metadata

        self.path = path
        # Two keys, read without parsing the vocabulary (gguf's GGUFReader takes seconds on a 150k-token one);
        # a truncated or damaged file is a UsageError naming it.
        meta = read_metadata(path, lambda key: key == "general.architecture" or key.endswith(".context_length"))
        arch = meta.get("general.architecture")
        trained = meta.get(f"{arch}.context_length") if arch else None
        self.trained = int(trained or 0)
        # More context than the model was trained on only makes llama.cpp warn, and answers degrade there.
        n_ctx = min(n_ctx or DEFAULT_N_CTX, int(trained)) if trained else (n_ctx or DEFAULT_N_CTX)
        self.llm = LlamaModel(path, n_ctx=n_ctx, doing="running", vocab_texts=True)
        self.template = self.llm.metadata.get("tokenizer.chat_template") or None
        # llama.cpp rounds the context up (to 256); the prompt budget stays within what the model was trained on.
        self.context = min(self.llm.n_ctx, int(trained)) if trained else self.llm.n_ctx
        texts = self.llm.token_texts
        vocab = {t: i for i, t in enumerate(texts)}
        self.stops = {vocab[t] for t in END_TOKENS if t in vocab} | {self.llm.token_eos} | set(self.llm.eog)
        self.stop_strings = _stop_strings(self.template)
        self._bos = texts[self.llm.token_bos] if 0 <= self.llm.token_bos < len(texts) else None
        self._eos = texts[self.llm.token_eos] if 0 <= self.llm.token_eos < len(texts) else None
        if log:
            log(f"loaded {path} with llama.cpp (context {self.context})")

    def render_variables(self) -> dict:
        return {k: v for k, v in (("bos_token", self._bos), ("eos_token", self._eos)) if v}

    def encode(self, text: str, *, chat: bool) -> list[int]:
        return self.llm.tokenize(text, add_bos=not chat, special=chat)

    def generate(self, ids: list[int], *, temperature: float, seed: int) -> Iterator[int]:
        # top_k 0, top_p 1 and min_p 0 switch those samplers off: plain temperature sampling, as on the HF side.
        yield from self.llm.generate(
            ids, temp=max(temperature, 0.0), seed=seed, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.0
        )

    def decode(self, ids: list[int]) -> str:
        return self.llm.detokenize(ids).decode("utf-8", errors="replace")

    def close(self) -> None:
        self.llm.close()

    def is_stop(self, token: int) -> bool:
        return token in self.stops


#: this plugin's engines, in the order they are tried (registered in this order too)
ENGINES: dict[str, type[ChatEngine]] = {HFEngine.name: HFEngine, GGUFEngine.name: GGUFEngine}


# ------------------------------------------------------------------------------------------------
# the session


@dataclass
class ChatSettings:
    max_new_tokens: int = 256
    temperature: float = 0.7
    seed: int = 0
    system: str | None = None


def _streamer(out: TextIO) -> Callable[[str], None]:
    """Writes each piece of an answer to ``out`` as it comes."""

    def show(text: str) -> None:
        out.write(text)
        out.flush()

    return show


def one_shot(engine: ChatEngine, prompt: str, settings: ChatSettings, out: TextIO = sys.stdout) -> Reply:
    """Answer one prompt, printing only the answer (for scripts)."""
    messages = [{"role": "system", "content": settings.system}] if settings.system and engine.template else []
    messages.append({"role": "user", "content": prompt})
    result = reply(
        engine,
        messages,
        max_new_tokens=settings.max_new_tokens,
        temperature=settings.temperature,
        seed=settings.seed,
        on_text=_streamer(out),
    )
    out.write("\n")
    out.flush()
    return result


def interactive(
    engine: ChatEngine,
    settings: ChatSettings,
    inp: TextIO = sys.stdin,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
) -> int:
    """Read prompts line by line until EOF or /exit; the conversation is kept (/reset clears it). Returns
    the number of answers given."""
    tty = inp.isatty()
    mode = "chat" if engine.template else "text completion (the model has no chat template)"
    err.write(f"{engine.name} model {engine.path}: {mode}. /exit or end of input quits, /reset forgets.\n")
    system = [{"role": "system", "content": settings.system}] if settings.system and engine.template else []
    history: list[dict] = list(system)
    answers = 0
    while True:
        if tty:
            err.write("> ")
            err.flush()
        line = inp.readline()
        if not line:
            break
        text = line.rstrip("\n")
        if text.strip() == "/exit":
            break
        if text.strip() == "/reset":
            history = list(system)
            err.write("(conversation cleared)\n")
            continue
        if not text.strip():
            continue
        history.append({"role": "user", "content": text})
        try:
            result = reply(
                engine,
                history,
                max_new_tokens=settings.max_new_tokens,
                temperature=settings.temperature,
                seed=settings.seed + answers,
                on_text=_streamer(out),
            )
        except UsageError as exc:  # a prompt longer than the context: say so and keep the session
            history.pop()
            err.write(f"error: {exc.render()}\n")
            continue
        out.write("\n")
        out.flush()
        del history[len(system) : len(system) + result.dropped]  # what no longer fits stays out
        history.append({"role": "assistant", "content": result.text})
        if not engine.template:
            history = list(system)  # plain completion: each line stands alone
        answers += 1
    return answers


def chat_main(
    model: Path,
    *,
    prompt: str | None,
    settings: ChatSettings,
    engines: dict[str, type[ChatEngine]],
    n_ctx: int | None = None,
    log: Callable | None = None,
) -> None:
    """`llmforge chat MODEL`: open ``model`` with the first of ``engines`` (the registry's) that accepts it,
    then answer ``prompt`` or hold a session on stdin."""
    engine = open_with(model, engines, n_ctx=n_ctx, log=log)
    try:
        if prompt is not None:
            one_shot(engine, prompt, settings)
        else:
            interactive(engine, settings)
    finally:
        engine.close()
