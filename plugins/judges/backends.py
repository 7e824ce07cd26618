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
import inspect
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
    threads: int | None = Field(
        None,
        gt=0,
        description="CPU threads for every decode (default: half the CPUs, at least 1: llama-cpp-python's own "
        "default for generation; see docs/benchmarks.md, Synthetic data).",
    )


def default_threads() -> int:
    """Half the CPUs this process may use, at least one. llama-cpp-python uses the same for single-token steps
    (and all CPUs for prompt batches); every step here is a batch, and on a 2-core machine shared with other
    work two threads ran a batched step 3-4x slower than one (ggml's threads wait for each other at every
    operation, and one of them waits for a busy core): bench/synth.py, docs/benchmarks.md."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, n // 2)


class _Slot:
    """One sequence of the context and the request it is answering now."""

    __slots__ = ("index", "ids", "fed", "pos", "answer", "tail", "rng", "next")

    def __init__(self, index: int, ids: list[int], fed: int, rng: Any) -> None:
        self.index = index  # the request's place in the call
        self.ids = ids  # its prompt tokens
        self.fed = fed  # prompt tokens already in the KV cache (the shared prefix counts)
        self.pos = fed
        self.answer: list[int] = []
        self.tail = b""  # the answer's last bytes, for stop strings (no full detokenize per token)
        self.rng = rng
        self.next: int | None = None  # the sampled token, decoded in the next step


class GgufJudge(JudgeBackend):
    """llama.cpp in this process, loaded through llmforge.native (which knows whether this CPU's AMX
    kernels can be trusted). Requests are decoded as ``concurrency`` parallel sequences of one context with
    continuous batching: every step is one batch carrying the next token of each answering sequence (and the
    prompt tokens of requests just started), and a sequence that finishes frees its KV cells and takes the next
    pending request at once, so short answers never wait for long ones. A prompt prefix shared by all requests
    of a call (the chat template's system part) is decoded once and copied to every sequence. Where the
    throughput comes from, and where it does not: docs/benchmarks.md (bench/judge.py, bench/synth.py)."""

    name = "gguf"
    summary = "a .gguf file through llama.cpp, in this process, requests decoded as parallel sequences"
    Options = GgufJudgeOptions

    def __init__(self, options: Any, *, base_dir: Path, log: Callable[[str], Any] | None = None) -> None:
        super().__init__(options, base_dir=base_dir, log=log)
        self.path = _resolve(self.base_dir, options.model, what="model", must="file")
        self.counter = _Counter()
        self._tokens = 0
        self._lock = threading.Lock()  # one decode loop at a time: the context is not thread-safe
        from llmforge import native

        # The Llama object holds the model, its tokenizer and its chat template; generation runs in a context
        # of our own with one sequence per concurrent request (Llama's own context has one), so its context is
        # kept tiny.
        self.threads = options.threads or default_threads()
        kwargs: dict[str, Any] = {"n_ctx": 64, "verbose": False}
        kwargs.update(n_threads=self.threads, n_threads_batch=self.threads)
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

    @property
    def tokens(self) -> int:
        """Answer tokens sampled so far (the end-of-turn token not counted)."""
        return self._tokens

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
        # one KV stream of n_ctx cells per sequence (llama.cpp's default, kv_unified off): a sequence attends
        # to its own cells only, so a step's attention cost does not grow with the number of sequences
        p.n_ctx = self.options.n_ctx * n_seq
        p.n_batch = p.n_ubatch = 512
        p.n_seq_max = n_seq
        p.n_threads = p.n_threads_batch = self.threads
        # flash attention off, as llama-cpp-python's Llama has it: the same sums as its create_chat_completion,
        # so greedy answers match a plain llama-cpp-python loop token for token (on: near ties flip)
        p.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
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
        with self._lock:
            # the context has `concurrency` sequences whatever the call's size, so calls of a few requests
            # (a synth batch's tail, a judge retry) reuse it instead of allocating another
            return self._decode(rendered, list(requests), max(1, self.options.concurrency))

    def _decode(
        self, rendered: list[tuple[list[int], list[str]]], requests: list[JudgeRequest], n_seq: int
    ) -> list[str]:
        """Greedy (or seeded sampled) decoding of all requests, ``n_seq`` at a time, continuously batched."""
        import llama_cpp.llama_cpp as lib
        import numpy as np

        ctx = self._context(n_seq)
        mem = lib.llama_get_memory(ctx)
        lib.llama_memory_clear(mem, True)
        vocab = lib.llama_model_get_vocab(self.llm._model.model)
        n_vocab = self.llm.n_vocab()
        model = self.llm._model
        cap = 512
        batch = lib.llama_batch_init(cap, 0, n_seq)
        k = len(rendered)
        results: list[list[int]] = [[] for _ in range(k)]
        stops = [[x.encode("utf-8") for x in st if x] for _, st in rendered]
        longest_stop = max((len(x) for st in stops for x in st), default=0)

        def put(i: int, seq: int, token: int, p: int, logits: bool) -> None:
            batch.token[i] = token
            batch.pos[i] = p
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = logits

        def decode(n_tokens: int) -> None:
            batch.n_tokens = n_tokens
            rc = lib.llama_decode(ctx, batch)
            if rc != 0:
                raise JudgeUnavailable(f"llama.cpp could not decode a batch (llama_decode returned {rc})")

        # The prefix every prompt of this call starts with (the system turn of a template shared by all), but
        # never a whole prompt: each sequence must decode at least its last prompt token to get its logits.
        used = min(n_seq, k)  # sequences this call needs
        shared = 0
        if used > 1:
            first = rendered[0][0]
            shared = min(len(ids) for ids, _ in rendered) - 1
            for ids, _ in rendered[1:]:
                same = 0
                for a, b in zip(first[:shared], ids, strict=False):
                    if a != b:
                        break
                    same += 1
                shared = same
            if shared < 8:  # not worth a copy of the KV stream per sequence
                shared = 0
        try:
            if shared:
                for start in range(0, shared, cap):
                    chunk = rendered[0][0][start : min(start + cap, shared)]
                    for i, t in enumerate(chunk):
                        put(i, 0, t, start + i, False)
                    decode(len(chunk))
                # each sequence has its own KV stream: llama.cpp copies sequence 0's stream (the prefix) whole
                for s in range(1, used):
                    lib.llama_memory_seq_cp(mem, 0, s, -1, -1)
            pending = iter(range(k))
            slots: list[_Slot | None] = [None] * used

            def start_next(s: int) -> None:
                i = next(pending, None)
                slots[s] = None
                if i is not None:
                    slots[s] = _Slot(i, rendered[i][0], shared, np.random.default_rng(requests[i].seed))

            for s in range(used):
                start_next(s)
            while any(slots):
                # one batch: the sampled token of every answering sequence first, then prompt tokens
                rows: list[int] = []  # sequence of each logits row, in batch order
                n = 0
                for s, slot in enumerate(slots):
                    if slot is not None and slot.next is not None:
                        put(n, s, slot.next, slot.pos, True)
                        slot.pos += 1
                        rows.append(s)
                        n += 1
                for s, slot in enumerate(slots):
                    if slot is None or slot.next is not None or slot.fed >= len(slot.ids) or n >= cap:
                        continue
                    take = min(cap - n, len(slot.ids) - slot.fed)
                    for j in range(slot.fed, slot.fed + take):
                        last = j == len(slot.ids) - 1
                        put(n, s, slot.ids[j], j, last)
                        if last:
                            rows.append(s)
                        n += 1
                    slot.fed += take
                    slot.pos = slot.fed
                decode(n)
                if not rows:
                    continue
                # all logits rows of the step, in batch order, read in place (no copy); argmax for all at once
                logits = np.ctypeslib.as_array(lib.llama_get_logits(ctx), shape=(len(rows), n_vocab))
                greedy = logits.argmax(axis=1)
                for row, s in enumerate(rows):
                    slot = slots[s]
                    assert slot is not None
                    r = requests[slot.index]
                    if r.temperature > 0:
                        z = logits[row].astype(np.float64) / r.temperature
                        prob = np.exp(z - z.max())
                        token = int(slot.rng.choice(n_vocab, p=prob / prob.sum()))
                    else:
                        token = int(greedy[row])
                    done = bool(lib.llama_vocab_is_eog(vocab, token))
                    if not done:
                        slot.answer.append(token)
                        self._tokens += 1
                        if stops[slot.index]:
                            slot.tail = (slot.tail + model.token_to_piece(token, special=False))[-(longest_stop + 64) :]
                            done = any(x in slot.tail for x in stops[slot.index])
                        done = done or len(slot.answer) >= r.max_tokens
                    if done:
                        results[slot.index] = slot.answer
                        self.counter.add(1)
                        # free the answer's cells (the shared prefix stays) and start the next request here
                        lib.llama_memory_seq_rm(mem, s, shared, -1)
                        start_next(s)
                    else:
                        slot.next = token
        finally:
            lib.llama_batch_free(batch)
        out = []
        for s in range(k):
            text = self.llm.detokenize(results[s]).decode("utf-8", errors="ignore")
            for x in rendered[s][1]:
                if x and x in text:
                    text = text[: text.index(x)]
            out.append(text)
        return out

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
    """A transformers model folder, or a PEFT LoRA adapter folder (``adapter_config.json``: its base model is
    loaded and the adapter merged in memory, so a policy ``model = "@sft"`` that is an adapter works): prompts
    through the tokenizer's chat template, generated in left-padded batches of ``batch_size``. Greedy requests
    share one ``generate`` call; sampled requests are drawn token by token with one torch generator per row
    seeded by its request, so a row's sample depends on its seed only, not on its batch neighbours."""

    name = "hf"
    summary = "a transformers model folder (or LoRA adapter), its chat template, batched generation"
    Options = HfJudgeOptions

    def __init__(self, options: Any, *, base_dir: Path, log: Callable[[str], Any] | None = None) -> None:
        super().__init__(options, base_dir=base_dir, log=log)
        self.path = _resolve(self.base_dir, options.model, what="model", must="dir")
        self.counter = _Counter()
        self._tokens = 0
        self._lock = threading.Lock()
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        dtype = "auto" if options.dtype == "auto" else getattr(torch, options.dtype)
        self._tokenizer_dir = self.path
        adapter = self.path / "adapter_config.json"
        if adapter.is_file():
            self.model = self._load_adapter(adapter, dtype)
        else:
            self.model = AutoModelForCausalLM.from_pretrained(self.path, dtype=dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(self._tokenizer_dir)
        if not getattr(self.tokenizer, "chat_template", None):
            raise UsageError(f"model: {self.path} has no chat template: a judge needs an instruct model")
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.eval()

    def _load_adapter(self, config: Path, dtype: Any) -> Any:
        """Base model + LoRA adapter, merged (generation then costs what the base model costs)."""
        import json

        from transformers import AutoModelForCausalLM

        try:
            base = json.loads(config.read_text())["base_model_name_or_path"]
        except (ValueError, KeyError) as exc:
            raise UsageError(f"{config}: no base_model_name_or_path ({exc})") from None
        base_path = Path(os.path.expanduser(str(base)))
        base_path = base_path if base_path.is_absolute() else (self.path / base_path)
        if not base_path.is_dir():
            raise UsageError(f"{config}: base_model_name_or_path {base} is not a model folder here")
        from peft import PeftModel

        model = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype)
        # the adapter folder's tokenizer when it saved one (chat template of the fine-tune), else the base's
        self._tokenizer_dir = self.path if (self.path / "tokenizer_config.json").is_file() else base_path
        return PeftModel.from_pretrained(model, self.path).merge_and_unload()

    @property
    def requests(self) -> int:
        return self.counter.requests

    @property
    def tokens(self) -> int:
        """Answer tokens generated so far (padding after a row's end not counted)."""
        return self._tokens

    def identity(self) -> str:
        return f"hf:{self.path.name}:{_file_identity(self.path)}"

    def complete(self, requests: Sequence[JudgeRequest]) -> list[str]:
        out: list[str] = [""] * len(requests)
        with self._lock:
            greedy = [i for i, r in enumerate(requests) if r.temperature <= 0]
            sampled = [i for i, r in enumerate(requests) if r.temperature > 0]
            for part, fn in ((greedy, self._greedy), (sampled, self._sample)):
                for start in range(0, len(part), self.options.batch_size):
                    group = part[start : start + self.options.batch_size]
                    for i, text in zip(group, fn([requests[i] for i in group]), strict=True):
                        out[i] = text
                    self.counter.add(len(group))
        return out

    def _encode(self, group: list[JudgeRequest]) -> Any:
        prompts = [
            self.tokenizer.apply_chat_template(
                [dict(m) for m in r.messages], tokenize=False, add_generation_prompt=True
            )
            for r in group
        ]
        return self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)

    def _finish(self, group: list[JudgeRequest], new: Any) -> list[str]:
        """Answers from the generated ids (prompt removed): each cut at its end of turn and its max_tokens."""
        stop = set(self._stop_ids())
        texts = []
        for row, r in zip(new.tolist(), group, strict=True):
            row = row[: r.max_tokens]
            n = next((j for j, t in enumerate(row) if t in stop), len(row))
            self._tokens += n
            texts.append(str(self.tokenizer.decode(row[:n], skip_special_tokens=True)))
        return texts

    def _stop_ids(self) -> list[int]:
        eos = self.model.generation_config.eos_token_id
        ids = eos if isinstance(eos, list) else ([eos] if eos is not None else [])
        for t in (self.tokenizer.eos_token_id, self.tokenizer.pad_token_id):
            if t is not None and t not in ids:
                ids.append(t)
        return ids

    def _greedy(self, group: list[JudgeRequest]) -> list[str]:
        import torch

        enc = self._encode(group)
        kwargs: dict[str, Any] = {"max_new_tokens": max(r.max_tokens for r in group)}
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        with torch.no_grad():
            ids = self.model.generate(**enc, **kwargs, pad_token_id=self.tokenizer.pad_token_id)
        return self._finish(group, ids[:, enc["input_ids"].shape[1] :])

    def _sample(self, group: list[JudgeRequest]) -> list[str]:
        """Sampling with a generator per row (transformers' generate draws all rows from one global stream,
        so a row's sample would depend on its neighbours): a plain KV-cached loop over the batch."""
        import torch

        enc = self._encode(group)
        gens = [torch.Generator().manual_seed(int(r.seed)) for r in group]
        temps = torch.tensor([[r.temperature] for r in group], dtype=torch.float32)
        stop = torch.tensor(self._stop_ids())
        mask = enc["attention_mask"]
        n = max(r.max_tokens for r in group)
        done = torch.zeros(len(group), dtype=torch.bool)
        pad = self.tokenizer.pad_token_id
        cols = []
        # transformers 5.x renamed past_key_values to cache (the old name warns); models not yet moved keep it
        name = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        past, inputs = None, enc["input_ids"]
        with torch.no_grad():
            for _ in range(n):
                pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, -inputs.shape[1] :]
                res = self.model(
                    input_ids=inputs, attention_mask=mask, position_ids=pos, use_cache=True, **{name: past}
                )
                past = getattr(res, name)
                probs = torch.softmax(res.logits[:, -1, :].float() / temps, dim=-1)
                nxt = torch.stack([torch.multinomial(probs[j], 1, generator=gens[j])[0] for j in range(len(group))])
                nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
                cols.append(nxt)
                done = done | torch.isin(nxt, stop)
                if bool(done.all()):
                    break
                inputs = nxt[:, None]
                mask = torch.cat([mask, torch.ones_like(inputs)], dim=1)
        return self._finish(group, torch.stack(cols, dim=1))

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
        self._tokens = 0
        self._tokens_lock = threading.Lock()
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

    @property
    def tokens(self) -> int:
        """Answer tokens so far, as the server reports them (``usage.completion_tokens``; a server that
        reports no usage adds nothing)."""
        return self._tokens

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
        usage = getattr(resp, "usage", None)
        if usage is not None and isinstance(getattr(usage, "completion_tokens", None), int):
            with self._tokens_lock:
                self._tokens += usage.completion_tokens
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
