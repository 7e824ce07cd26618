"""The built-in judge backends: ``gguf`` (llama.cpp in this process, several sequences decoded together),
``hf`` (transformers, batched generation) and ``openai`` (any OpenAI-compatible endpoint, requests in a
thread pool).

A backend only turns chat requests into answer texts, formatting them with the judge model's own chat
template (the GGUF's metadata, the folder's tokenizer_config.json, or the server's). Everything a judge
does with answers is plugins/judges/judge.py's. Each backend counts what it actually asked its model
(``requests``): the judgment cache is proven by that count staying still.

Heavy libraries (llama_cpp, torch, transformers, openai) are imported when a backend is opened.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pydantic import Field

from llmforge.errors import UsageError
from llmforge.judging import JudgeBackend, JudgeOptions, JudgeRequest, JudgeUnavailable


def _file_identity(path: Path) -> str:
    """A model file or folder named by what it holds, cheaply: names and sizes (a re-export to the same
    path with other weights changes sizes or, for same-size files, the first megabyte's hash)."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.relative_to(path) if path.is_dir() else f.name}:{f.stat().st_size}\n".encode())
        if f.suffix in (".gguf", ".safetensors", ".bin"):
            with f.open("rb") as fh:
                h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]


def _resolve(base_dir: Path, value: str, *, what: str, must: str) -> Path:
    path = Path(os.path.expanduser(value))
    path = path if path.is_absolute() else (base_dir / path)
    if must == "file" and not path.is_file():
        raise UsageError(f"{what}: no such file {path}")
    if must == "dir" and not path.is_dir():
        raise UsageError(f"{what}: no such model folder {path}")
    return path.resolve()


class _Counter:
    """Requests actually sent to the model, across threads."""

    def __init__(self) -> None:
        self.requests = 0
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        with self._lock:
            self.requests += n


# ------------------------------------------------------------------------------------------------
# gguf: llama.cpp


class GgufJudgeOptions(JudgeOptions):
    model: str = Field(description="The judge's .gguf file (relative to forge.toml's folder).")
    n_ctx: int = Field(4096, gt=0, description="Context of one judgment (prompt and answer), in tokens.")
    threads: int | None = Field(None, gt=0, description="CPU threads (default: llama.cpp's choice).")


class GgufJudge(JudgeBackend):
    """llama.cpp in this process, loaded through llmforge.native (which knows whether this CPU's AMX
    kernels can be trusted). ``concurrency`` requests are decoded together as parallel sequences of one
    context: one batch per step carries a token of every sequence, which is where the throughput over one
    request at a time comes from (bench/judge.py)."""

    name = "gguf"
    summary = "a .gguf file through llama.cpp, in this process, requests decoded as parallel sequences"
    Options = GgufJudgeOptions

    def __init__(self, options: Any, *, base_dir: Path, log: Callable[[str], Any] | None = None) -> None:
        super().__init__(options, base_dir=base_dir, log=log)
        self.path = _resolve(self.base_dir, options.model, what="model", must="file")
        self.counter = _Counter()
        self._lock = threading.Lock()  # one decode loop at a time: the context is not thread-safe
        from llmforge import native

        # The Llama object holds the model, its tokenizer and its chat template; generation runs in a context
        # of our own with one sequence per concurrent request (Llama's own context has one), so its context is
        # kept tiny.
        kwargs: dict[str, Any] = {"n_ctx": 64, "verbose": False}
        if options.threads:
            kwargs.update(n_threads=options.threads, n_threads_batch=options.threads)
        try:
            self.llm = native.load_llama(self.path, **kwargs)
        except ValueError as exc:  # llama-cpp-python's word for "could not load"
            raise JudgeUnavailable(f"llama.cpp could not load {self.path}: {exc}") from None
        self._formatter = self._chat_formatter()
        self._ctx: Any = None
        self._n_seq = 0

    @property
    def requests(self) -> int:
        return self.counter.requests

    def identity(self) -> str:
        return f"gguf:{self.path.name}:{_file_identity(self.path)}"

    def _chat_formatter(self) -> Any:
        from llama_cpp import llama_chat_format

        template = self.llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise UsageError(
                f"model: {self.path} has no chat template (tokenizer.chat_template): a judge needs an instruct model"
            )
        m = self.llm._model
        eos, bos = self.llm.token_eos(), self.llm.token_bos()
        return llama_chat_format.Jinja2ChatFormatter(
            template=template,
            eos_token=m.token_get_text(eos) if eos != -1 else "",
            bos_token=m.token_get_text(bos) if bos != -1 else "",
        )

    def _context(self, n_seq: int) -> Any:
        import llama_cpp.llama_cpp as lib

        if self._ctx is not None and self._n_seq == n_seq:
            return self._ctx
        self._free_context()
        p = lib.llama_context_default_params()
        p.n_ctx = self.options.n_ctx * n_seq
        p.n_batch = p.n_ubatch = 512
        p.n_seq_max = n_seq
        p.n_threads = p.n_threads_batch = self.llm.n_threads
        ctx = lib.llama_init_from_model(self.llm._model.model, p)
        if not ctx:
            raise JudgeUnavailable(f"llama.cpp could not make a context of {p.n_ctx} tokens for {self.path}")
        self._ctx, self._n_seq = ctx, n_seq
        return ctx

    def _free_context(self) -> None:
        if self._ctx is not None:
            import llama_cpp.llama_cpp as lib

            lib.llama_free(self._ctx)
            self._ctx = None

    def render(self, request: JudgeRequest) -> tuple[list[int], list[str]]:
        """The request's tokens through the GGUF's chat template, and the template's stop strings."""
        out = self._formatter(messages=[dict(m) for m in request.messages])
        text = out.prompt
        ids = self.llm.tokenize(text.encode("utf-8"), add_bos=not out.added_special, special=True)
        stop = out.stop if isinstance(out.stop, list) else ([out.stop] if out.stop else [])
        return ids, stop

    def complete(self, requests: Sequence[JudgeRequest]) -> list[str]:
        if not requests:
            return []
        rendered = [self.render(r) for r in requests]
        for (ids, _), r in zip(rendered, requests, strict=True):
            if len(ids) + r.max_tokens > self.options.n_ctx:
                raise JudgeUnavailable(
                    f"a judge prompt of {len(ids)} tokens and {r.max_tokens} answer tokens does not fit "
                    f"n_ctx = {self.options.n_ctx} of {self.path.name}: raise n_ctx or lower max_tokens"
                )
        out: list[str] = []
        with self._lock:
            n = max(1, min(self.options.concurrency, len(requests)))
            for start in range(0, len(requests), n):
                group = list(range(start, min(start + n, len(requests))))
                out += self._decode([rendered[i] for i in group], [requests[i] for i in group], n)
                self.counter.add(len(group))
        return out

    def _decode(
        self, rendered: list[tuple[list[int], list[str]]], requests: list[JudgeRequest], n_seq: int
    ) -> list[str]:
        """Greedy (or seeded sampled) decoding of up to ``n_seq`` prompts together, each its own sequence of
        one KV cache."""
        import llama_cpp.llama_cpp as lib
        import numpy as np

        ctx = self._context(n_seq)
        lib.llama_memory_clear(lib.llama_get_memory(ctx), True)
        vocab = lib.llama_model_get_vocab(self.llm._model.model)
        n_vocab = self.llm.n_vocab()
        cap = 512
        batch = lib.llama_batch_init(cap, 0, n_seq)
        k = len(rendered)
        answers: list[list[int]] = [[] for _ in range(k)]
        texts = [""] * k
        pos = [0] * k
        rows: dict[int, Any] = {}  # sequence -> the logits of its next token (copied: the next decode overwrites)
        rngs = [np.random.default_rng(r.seed) for r in requests]

        def put(i: int, seq: int, token: int, p: int, logits: bool) -> None:
            batch.token[i] = token
            batch.pos[i] = p
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = logits

        def decode(n_tokens: int, outputs: dict[int, int]) -> None:
            batch.n_tokens = n_tokens
            rc = lib.llama_decode(ctx, batch)
            if rc != 0:
                raise JudgeUnavailable(f"llama.cpp could not decode a batch (llama_decode returned {rc})")
            for s, i in outputs.items():
                rows[s] = np.ctypeslib.as_array(lib.llama_get_logits_ith(ctx, i), shape=(n_vocab,)).copy()

        try:
            # the prompts, packed into batches of up to `cap` tokens; each sequence's last token asks for logits
            pending = [(s, j, t) for s, (ids, _) in enumerate(rendered) for j, t in enumerate(ids)]
            for start in range(0, len(pending), cap):
                chunk = pending[start : start + cap]
                outputs: dict[int, int] = {}
                for i, (s, j, t) in enumerate(chunk):
                    last = j == len(rendered[s][0]) - 1
                    put(i, s, t, j, last)
                    if last:
                        outputs[s] = i
                decode(len(chunk), outputs)
            for s, (ids, _) in enumerate(rendered):
                pos[s] = len(ids)
            active = list(range(k))
            while active:
                step: list[tuple[int, int]] = []
                for s in active:
                    row, r = rows[s], requests[s]
                    if r.temperature > 0:
                        z = row.astype(np.float64) / r.temperature
                        prob = np.exp(z - z.max())
                        token = int(rngs[s].choice(n_vocab, p=prob / prob.sum()))
                    else:
                        token = int(np.argmax(row))
                    if lib.llama_vocab_is_eog(vocab, token):
                        continue
                    answers[s].append(token)
                    texts[s] = self.llm.detokenize(answers[s]).decode("utf-8", errors="ignore")
                    if any(x and x in texts[s] for x in rendered[s][1]) or len(answers[s]) >= r.max_tokens:
                        continue
                    step.append((s, token))
                active = [s for s, _ in step]
                if not step:
                    break
                outputs = {}
                for i, (s, token) in enumerate(step):
                    put(i, s, token, pos[s], True)
                    outputs[s] = i
                    pos[s] += 1
                decode(len(step), outputs)
        finally:
            lib.llama_batch_free(batch)
        result = []
        for s in range(k):
            text = texts[s]
            for x in rendered[s][1]:
                if x and x in text:
                    text = text[: text.index(x)]
            result.append(text)
        return result

    def close(self) -> None:
        self._free_context()
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.close()


# ------------------------------------------------------------------------------------------------
# hf: transformers


class HfJudgeOptions(JudgeOptions):
    model: str = Field(description="The judge's model folder (transformers; relative to forge.toml's folder).")
    batch_size: int = Field(8, gt=0, description="Requests generated together (left-padded).")
    dtype: str = Field("auto", description="Weights' dtype: auto (the folder's), float32, bfloat16, float16.")


class HfJudge(JudgeBackend):
    """A transformers model folder: prompts through its tokenizer's chat template, generated in left-padded
    batches of ``batch_size``."""

    name = "hf"
    summary = "a transformers model folder, its chat template, batched generation"
    Options = HfJudgeOptions

    def __init__(self, options: Any, *, base_dir: Path, log: Callable[[str], Any] | None = None) -> None:
        super().__init__(options, base_dir=base_dir, log=log)
        self.path = _resolve(self.base_dir, options.model, what="model", must="dir")
        self.counter = _Counter()
        self._lock = threading.Lock()
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        if not getattr(self.tokenizer, "chat_template", None):
            raise UsageError(f"model: {self.path} has no chat template: a judge needs an instruct model")
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        dtype = "auto" if options.dtype == "auto" else getattr(torch, options.dtype)
        self.model = AutoModelForCausalLM.from_pretrained(self.path, dtype=dtype)
        self.model.eval()

    @property
    def requests(self) -> int:
        return self.counter.requests

    def identity(self) -> str:
        return f"hf:{self.path.name}:{_file_identity(self.path)}"

    def complete(self, requests: Sequence[JudgeRequest]) -> list[str]:
        import torch

        out: list[str] = []
        with self._lock:
            # Same settings batch together (one generate call has one temperature).
            for start in range(0, len(requests), self.options.batch_size):
                group = list(requests[start : start + self.options.batch_size])
                prompts = [
                    self.tokenizer.apply_chat_template(
                        [dict(m) for m in r.messages], tokenize=False, add_generation_prompt=True
                    )
                    for r in group
                ]
                enc = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
                r0 = group[0]
                kwargs: dict[str, Any] = {"max_new_tokens": max(r.max_tokens for r in group)}
                if r0.temperature > 0:
                    torch.manual_seed(r0.seed)
                    kwargs.update(do_sample=True, temperature=r0.temperature)
                else:
                    kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
                with torch.no_grad():
                    ids = self.model.generate(**enc, **kwargs, pad_token_id=self.tokenizer.pad_token_id)
                width = enc["input_ids"].shape[1]
                for row, r in zip(ids, group, strict=True):
                    answer = row[width : width + r.max_tokens]
                    out.append(str(self.tokenizer.decode(answer, skip_special_tokens=True)))
                self.counter.add(len(group))
        return out

    def close(self) -> None:
        # dropped so that a closed judge frees its weights even while something holds the backend
        self.__dict__.pop("model", None)


# ------------------------------------------------------------------------------------------------
# openai: any OpenAI-compatible endpoint


class OpenAIJudgeOptions(JudgeOptions):
    base_url: str = Field(description="The endpoint, e.g. http://127.0.0.1:8080/v1 (llama.cpp, Ollama, vLLM).")
    model: str = Field(description="The model name the endpoint serves.")
    api_key_env: str | None = Field(
        None, description="The environment variable holding the API key (the key itself is never in forge.toml)."
    )


class OpenAIJudge(JudgeBackend):
    """An OpenAI-compatible chat endpoint through the `openai` client; ``concurrency`` requests in flight
    from a thread pool, each with ``timeout`` seconds. A request that fails (refused connection, timeout,
    an error status) raises :class:`JudgeUnavailable` naming the endpoint and the reason, never the key."""

    name = "openai"
    summary = "an OpenAI-compatible endpoint (llama.cpp's server, Ollama, vLLM, LM Studio), concurrent requests"
    Options = OpenAIJudgeOptions

    def __init__(self, options: Any, *, base_dir: Path, log: Callable[[str], Any] | None = None) -> None:
        super().__init__(options, base_dir=base_dir, log=log)
        self.counter = _Counter()
        key = "none"  # local servers want no key, but the client insists on one
        if options.api_key_env:
            key = os.environ.get(options.api_key_env, "")
            if not key:
                raise UsageError(
                    f"api_key_env: the environment variable {options.api_key_env} is not set",
                    hint="export it before the run (the key is read from it, never from forge.toml)",
                )
        import openai

        # retries are the judge's (a parse failure asks again); the client's own would hide a dead server
        self.client = openai.OpenAI(base_url=options.base_url, api_key=key, timeout=options.timeout, max_retries=0)
        self._pool = ThreadPoolExecutor(max_workers=options.concurrency, thread_name_prefix="judge")

    @property
    def requests(self) -> int:
        return self.counter.requests

    def identity(self) -> str:
        return f"openai:{self.options.base_url.rstrip('/')}:{self.options.model}"

    def _one(self, r: JudgeRequest) -> str:
        import openai

        self.counter.add(1)
        try:
            resp = self.client.chat.completions.create(
                model=self.options.model,
                messages=[dict(m) for m in r.messages],  # type: ignore[misc]
                max_tokens=r.max_tokens,
                temperature=r.temperature,
                seed=r.seed,
            )
        except openai.APITimeoutError:
            raise JudgeUnavailable(
                f"{self.options.base_url}: no answer within timeout = {self.options.timeout} s"
            ) from None
        except openai.APIConnectionError as exc:
            raise JudgeUnavailable(f"{self.options.base_url}: cannot connect ({exc.__cause__ or exc})") from None
        except openai.APIStatusError as exc:
            raise JudgeUnavailable(f"{self.options.base_url}: HTTP {exc.status_code} ({_short(exc)})") from None
        choice = resp.choices[0] if resp.choices else None
        return (choice.message.content or "") if choice is not None else ""

    def complete(self, requests: Sequence[JudgeRequest]) -> list[str]:
        return list(self._pool.map(self._one, requests))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()


def _short(exc: Exception) -> str:
    text = str(exc)
    return text if len(text) < 300 else text[:300] + "..."


BACKENDS: list[type[JudgeBackend]] = [GgufJudge, HfJudge, OpenAIJudge]
