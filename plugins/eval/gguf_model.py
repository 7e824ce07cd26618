"""The ``gguf`` eval model: a .gguf file run by llama.cpp, in a child process (llmforge.native).

Opened as the gguf plugin's chat engine opens a GGUF (the context the file was trained with, its chat template
and BOS/EOS from the metadata, EOS, end-of-generation and end-of-turn tokens as stops), but with every position's
logits kept (``logits_all``): a log-likelihood is read off one evaluation of context + continuation, with the
same token bookkeeping as the ``hf`` eval model (models.py: lm-eval's), llama.cpp's own tokenizer, and the BOS
when the GGUF's ``tokenizer.ggml.add_bos_token`` says its tokenizer adds one. An F32 GGUF therefore scores the
same as the HF model it was exported from, and a quant's scores differ by exactly what quantization costs.

llama.cpp runs one sequence at a time here, from an empty cache (what the child's protocol offers): an evaluation
serves every request whose input is a prefix of it (the one-token choices of an item share one), but a context
is evaluated again for each choice of several tokens.
llama.cpp in the child is loaded without the extra buffer types where they fault (see llmforge.native).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .api import EvalModel
from .models import Tokens, cut_at_stop, encode_pairs, fit_request, rolling_windows


class GGUFEvalModel(EvalModel):
    name = "gguf"
    summary = "A GGUF file, run with llama.cpp in a child process."
    opens = "a .gguf file"

    @classmethod
    def refuse(cls, path: Path) -> str | None:
        from llmforge_plugins.gguf.chat import GGUFEngine  # no llama.cpp: it loads in a child when opened

        return GGUFEngine.refuse(Path(path))

    def __init__(
        self,
        path: Path,
        *,
        n_ctx: int | None = None,
        batch_size: int | None = None,
        log: Callable[[str], Any] | None = None,
        threads: int | None = None,
    ) -> None:
        from llmforge.native import LlamaModel
        from llmforge_plugins.gguf.chat import DEFAULT_N_CTX, END_TOKENS, _stop_strings
        from llmforge_plugins.gguf.metadata import read_metadata

        super().__init__(path)
        self.log = log or (lambda message: None)
        meta = read_metadata(self.path, lambda key: key == "general.architecture" or key.endswith(".context_length"))
        arch = meta.get("general.architecture")
        trained = int(meta.get(f"{arch}.context_length") or 0) if arch else 0
        # never more than the model was trained on: lm-eval's max_length for the HF model is that length too
        want = min(n_ctx or DEFAULT_N_CTX, trained) if trained else (n_ctx or DEFAULT_N_CTX)
        extra = {"n_threads": threads, "n_threads_batch": threads} if threads else {}
        # n_batch = n_ctx: a whole request is evaluated in one batch; logits_all keeps every position's logits
        self.llm = LlamaModel(
            self.path, n_ctx=want, n_batch=want, logits_all=True, doing="evaluating", vocab_texts=True, **extra
        )
        self.context = min(self.llm.n_ctx, want)
        self.template: str | None = self.llm.metadata.get("tokenizer.chat_template") or None
        texts = self.llm.token_texts
        vocab = {t: i for i, t in enumerate(texts)}
        self.stops = {vocab[t] for t in END_TOKENS if t in vocab} | {self.llm.token_eos} | set(self.llm.eog)
        self.stop_strings = _stop_strings(self.template)
        bos, eos = self.llm.token_bos, self.llm.token_eos
        self._bos = texts[bos] if 0 <= bos < len(texts) else None
        self._eos = texts[eos] if 0 <= eos < len(texts) else None
        # lm-eval's prefix token (BOS, else EOS): an empty context and a rolling text's first token follow it
        self.prefix_id: int | None = bos if 0 <= bos < len(texts) else (eos if 0 <= eos < len(texts) else None)
        self._prefix_text = texts[self.prefix_id] if self.prefix_id is not None else None
        self.log(f"loaded {self.path} with llama.cpp (context {self.context})")

    # -- tokens -----------------------------------------------------------------------------------

    def _encode(self, text: str) -> Tokens:
        """llama.cpp's tokenization with the BOS the GGUF's tokenizer adds (none when the text already starts
        with it), special tokens parsed: as the HF tokenizer encodes by default."""
        special = not (self._prefix_text and text.startswith(self._prefix_text))
        return self._encode_many([text], special)[0]

    def _encode_many(self, texts: list[str], special: bool) -> list[Tokens]:
        # add_bos adds the BOS only when the GGUF's tokenizer adds one (tokenizer.ggml.add_bos_token)
        return [self.llm.tokenize(text, add_bos=special, special=True) for text in texts]

    # -- log-likelihood ---------------------------------------------------------------------------

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        return self.score_tokens(encode_pairs(self._encode_many, requests, self.prefix_id, self._prefix_text))

    def loglikelihood_rolling(self, texts: Sequence[str]) -> list[tuple[float, int]]:
        out = []
        for text in texts:
            windows = rolling_windows(self._encode_many([text], False)[0], self.prefix_id, self.context)
            scores = self.score_tokens(windows)
            out.append((sum(s for s, _ in scores), sum(len(cont) for _, cont in windows)))
        return out

    def score_tokens(self, pairs: Sequence[tuple[Tokens, Tokens]]) -> list[tuple[float, bool]]:
        """(sum of log-probabilities, greedy?) of each continuation after its context (token ids).

        llama.cpp evaluates context + continuation minus its last token; logits are causal, so an evaluation
        also serves every request whose input is a prefix of it: the one-token choices of an item share one
        evaluation (the context's), and " Paris" is read off the evaluation of " Paris, France"."""
        import numpy as np

        fitted = [(fit_request(ctx, cont, self.context), cont) if cont else (ctx, cont) for ctx, cont in pairs]
        inputs = [tuple(ctx + cont[:-1]) for ctx, cont in fitted]
        todo = [i for i, (_, cont) in enumerate(fitted) if cont]
        done: list[tuple[tuple[int, ...], Any]] = []  # (input, logits) of the evaluations of the current context
        context: tuple[int, ...] | None = None
        out: list[tuple[float, bool]] = [(0.0, True)] * len(pairs)  # an empty continuation: nothing to score
        # by context, longest input first: a shorter input finds the evaluation it is a prefix of
        for i in sorted(todo, key=lambda i: (tuple(fitted[i][0]), -len(inputs[i]))):
            ctx, cont = fitted[i]
            if tuple(ctx) != context:
                context, done = tuple(ctx), []
            seq = inputs[i]
            logits = next((lg for inp, lg in done if inp[: len(seq)] == seq), None)
            if logits is None:
                logits = np.asarray(self.llm.logits(list(seq)), dtype=np.float32)
                done.append((seq, logits))
            rows = logits[len(ctx) - 1 : len(seq)].astype(np.float64)
            top = rows.max(axis=1, keepdims=True)
            logprobs = rows - top - np.log(np.exp(rows - top).sum(axis=1, keepdims=True))
            target = np.asarray(cont)
            total = float(logprobs[np.arange(len(cont)), target].sum())
            out[i] = (total, bool((rows.argmax(axis=1) == target).all()))
        return out

    # -- generation -------------------------------------------------------------------------------

    @property
    def has_chat_template(self) -> bool:
        return bool(self.template)

    def prompt(self, messages: Sequence[dict[str, Any]]) -> str:
        from llmforge.chat import render

        if not self.template:
            return str(messages[-1]["content"])
        variables = {k: v for k, v in (("bos_token", self._bos), ("eos_token", self._eos)) if v}
        return render(self.template, list(messages), add_generation_prompt=True, **variables)

    def generate(
        self,
        prompts: Sequence[str],
        *,
        max_new_tokens: int = 256,
        stop: Sequence[str] = (),
        temperature: float = 0.0,
        seed: int = 0,
    ) -> list[str]:
        stops = tuple(dict.fromkeys([*stop, *self.stop_strings]))
        room = max(1, self.context - max_new_tokens)
        out = []
        for prompt in prompts:
            ids = self._encode(prompt)[-room:]
            budget = min(max_new_tokens, self.context - len(ids))
            new: list[int] = []
            text = ""
            # top_k 0, top_p 1, min_p 0: plain temperature sampling, as the hf model samples (greedy at 0)
            tokens = self.llm.generate(
                ids, temp=max(temperature, 0.0), seed=seed, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.0
            )
            for token in tokens:
                if len(new) >= budget or token in self.stops:
                    break
                new.append(token)
                text = self.llm.detokenize(new).decode("utf-8", errors="replace")
                if stops and cut_at_stop(text, stops)[1]:
                    break
            out.append(cut_at_stop(text, stops)[0])
        return out

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        raise NotImplementedError(
            "the gguf eval model has no embeddings (llama.cpp would need a second context in embedding mode): "
            "compare answers with an hf model's embed()"
        )

    def close(self) -> None:
        self.llm.close()
