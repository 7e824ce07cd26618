"""The ``hf`` eval model: a transformers model folder or a LoRA adapter folder, run for evaluation.

The model is opened exactly as `llmforge chat` opens it (the gguf plugin's ``hf`` chat engine: float32 on the
CPU, an adapter merged into the base its config records, the tokenizer's chat template, EOS and end-of-turn
stop tokens); this module adds what evaluation asks of it.

Log-likelihoods follow lm-evaluation-harness (``HFLM``) token for token (see models.py), and are computed with
the context shared: the choices of a multiple-choice item have the same context tokens, so each batch row packs
one context followed by every continuation of it (``ctx a1 a2 b1 b2 b3``), with an attention mask that lets each
continuation see the context and itself only, and position ids that restart after the context for each one.
The context runs once instead of once per choice, and a one-token continuation costs no position at all (its
log-probability is read where the context ends, as lm-eval's one-token cache does). A row where at most one
continuation has more than one token needs no mask (plain causal attention, right padding unseen); the others
get the 4D mask. The model's output is the same as one forward per request up to float rounding; the first
masked row is checked against plain rows, and packing is switched off for a model whose attention does not
honour a custom mask (a warning says so).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from llmforge.errors import UsageError

from .api import EvalModel
from .models import Tokens, batches_by_tokens, cut_at_stop, encode_pairs, fit_request, rolling_windows

#: tokens (rows × padded length) one forward may hold; rows per forward default to ``batch_size``
TOKEN_BUDGET = 8192
DEFAULT_BATCH = 32


class HFEvalModel(EvalModel):
    name = "hf"
    summary = "An HF model or LoRA adapter folder, run with transformers (float32 on the CPU)."
    opens = "an HF model or adapter directory"

    @classmethod
    def refuse(cls, path: Path) -> str | None:
        from llmforge_plugins.gguf.chat import HFEngine  # no torch: the engine imports it when opened

        return HFEngine.refuse(Path(path))

    def __init__(
        self,
        path: Path,
        *,
        n_ctx: int | None = None,
        batch_size: int | None = None,
        log: Callable[[str], Any] | None = None,
        share_prefix: bool = True,
        dtype: str | None = None,
    ) -> None:
        import torch

        from llmforge_plugins.gguf.chat import HFEngine

        super().__init__(path)
        self.log = log or (lambda message: None)
        self.engine = HFEngine(self.path, log=log)
        self.model = self.engine.model
        if dtype and dtype != "auto":  # float32 on the CPU unless asked: exact, and what an F32 GGUF is compared with
            if not isinstance(getattr(torch, dtype, None), torch.dtype):
                raise UsageError(f"dtype {dtype!r}: expected float32, bfloat16 or float16")
            self.model = self.model.to(getattr(torch, dtype))
        self.tokenizer = self.engine.tokenizer
        self.device = self.engine.device
        self.dtype = next(self.model.parameters()).dtype
        self.context = int(n_ctx or self.engine.context)
        self.batch_size = int(batch_size or DEFAULT_BATCH)
        self.share_prefix = share_prefix
        self._packing_checked = False
        config = self.model.config
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        windows = [
            getattr(c, k, None) for c in (config, text_config) for k in ("sliding_window", "attention_chunk_size")
        ]
        self._window = min([int(w) for w in windows if isinstance(w, int) and w > 0], default=1 << 30)
        tok = self.tokenizer
        # lm-eval's prefix token: what an empty context and the first token of a rolling text are conditioned on
        self.prefix_id: int | None = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        self._prefix_text: str | None = str(tok.decode([self.prefix_id])) if self.prefix_id is not None else None
        self._torch = torch

    # -- tokens -----------------------------------------------------------------------------------

    def _encode(self, text: str) -> Tokens:
        """As the tokenizer encodes by default (its BOS, when it adds one), unless the text already starts with
        the prefix token's text (lm-eval's ``tok_encode``: no second BOS in front of a rendered chat)."""
        special = not (self._prefix_text and text.startswith(self._prefix_text))
        return self._encode_many([text], special)[0]

    def _encode_many(self, texts: list[str], special: bool) -> list[Tokens]:
        return [list(ids) for ids in self.tokenizer(texts, add_special_tokens=special)["input_ids"]]

    # -- log-likelihood ---------------------------------------------------------------------------

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        return self.score_tokens(encode_pairs(self._encode_many, requests, self.prefix_id, self._prefix_text))

    def loglikelihood_rolling(self, texts: Sequence[str]) -> list[tuple[float, int]]:
        owners: list[int] = []
        pairs: list[tuple[Tokens, Tokens]] = []
        for i, text in enumerate(texts):
            for window in rolling_windows(self._encode_many([text], False)[0], self.prefix_id, self.context):
                owners.append(i)
                pairs.append(window)
        totals = [0.0] * len(texts)
        counts = [0] * len(texts)
        for i, (ctx_cont, (logprob, _)) in zip(owners, zip(pairs, self.score_tokens(pairs))):
            totals[i] += logprob
            counts[i] += len(ctx_cont[1])
        return list(zip(totals, counts))

    def score_tokens(self, pairs: Sequence[tuple[Tokens, Tokens]]) -> list[tuple[float, bool]]:
        """(sum of log-probabilities, greedy?) of each continuation after its context, both token ids. Requests
        with the same (left-cut) context are scored in one packed row; rows are sorted longest first and
        batched within the token budget."""
        out: list[tuple[float, bool] | None] = [None] * len(pairs)
        groups: dict[tuple[int, ...], dict[tuple[int, ...], list[int]]] = {}
        for i, (ctx, cont) in enumerate(pairs):
            if not cont:
                out[i] = (0.0, True)  # nothing to score (lm-eval refuses such a request)
                continue
            fitted = tuple(fit_request(ctx, cont, self.context))
            # without sharing, each request is a group of its own (lm-eval's one row per request)
            key = fitted if self.share_prefix else (i, *fitted)
            groups.setdefault(key, {}).setdefault(tuple(cont), []).append(i)
        rows = [
            _Row(list(key[0 if self.share_prefix else 1 :]), [list(c) for c in conts]) for key, conts in groups.items()
        ]
        owners = [list(conts.values()) for conts in groups.values()]
        if self.share_prefix:
            rows, owners = self._split_long(rows, owners)
        order = sorted(range(len(rows)), key=lambda r: -rows[r].length)
        for batch in batches_by_tokens([rows[r].length for r in order], self.batch_size, TOKEN_BUDGET):
            picked = [order[b] for b in batch]
            if not self._packing_checked and any(rows[r].packed for r in picked):
                self._check_packing(rows[next(r for r in picked if rows[r].packed)])
                if not self.share_prefix:  # the check failed: start again, one row per request
                    return self.score_tokens(pairs)
            results = self._forward([rows[r] for r in picked])
            for r, row_results in zip(picked, results):
                for idxs, res in zip(owners[r], row_results):
                    for i in idxs:
                        out[i] = res
        return [r if r is not None else (0.0, True) for r in out]

    def _split_long(self, rows: list[_Row], owners: list[list[list[int]]]) -> tuple[list[_Row], list]:
        """A context with so many continuations that the packed row outgrows the token budget is split into
        several rows (each with the context again). So is a masked row longer than the model's sliding attention
        window: our mask would let its local layers see too far back (without a mask the model builds its own)."""
        out_rows, out_owners = [], []
        for row, own in zip(rows, owners):
            if row.packed and row.length > self._window:
                out_rows += [_Row(row.context, [cont]) for cont in row.conts]
                out_owners += [[o] for o in own]
                continue
            if row.length <= TOKEN_BUDGET or len(row.conts) == 1:
                out_rows.append(row)
                out_owners.append(own)
                continue
            part: list[Tokens] = []
            part_own: list[list[int]] = []
            size = len(row.context)
            for cont, o in zip(row.conts, own):
                if part and size + len(cont) - 1 > TOKEN_BUDGET:
                    out_rows.append(_Row(row.context, part))
                    out_owners.append(part_own)
                    part, part_own, size = [], [], len(row.context)
                part.append(cont)
                part_own.append(o)
                size += len(cont) - 1
            out_rows.append(_Row(row.context, part))
            out_owners.append(part_own)
        return out_rows, out_owners

    def _forward(self, rows: Sequence[_Row]) -> list[list[tuple[float, bool]]]:
        """One forward over ``rows`` (right-padded); for each row, (log-prob, greedy) of each continuation."""
        torch = self._torch
        width = max(r.length for r in rows)
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        pos = torch.zeros((len(rows), width), dtype=torch.long)
        # Plain causal attention is right as long as at most one continuation per row puts tokens after the
        # context (one-token continuations are read where the context ends), and right padding is never seen by
        # a real position: no mask then, and attention takes its fast causal path (as lm-eval's rows do).
        mask = None
        if any(row.packed for row in rows):
            # additive float mask: what eager and SDPA attention both take as given (a 4D mask is used as is)
            blocked = torch.finfo(self.dtype).min
            mask = torch.full((len(rows), 1, width, width), blocked, dtype=self.dtype)
        where_b: list[int] = []
        where_p: list[int] = []
        targets: list[int] = []
        for b, row in enumerate(rows):
            c = len(row.context)
            ids[b, :c] = torch.tensor(row.context)
            pos[b, :c] = torch.arange(c)
            if mask is not None:
                mask[b, 0, :c, :c] = torch.triu(torch.full((c, c), blocked, dtype=self.dtype), diagonal=1)
            at = c
            for cont in row.conts:
                n = len(cont) - 1  # the last token is predicted, never input
                if n:
                    ids[b, at : at + n] = torch.tensor(cont[:-1])
                    pos[b, at : at + n] = torch.arange(c, c + n)
                    if mask is not None:
                        mask[b, 0, at : at + n, :c] = 0
                        mask[b, 0, at : at + n, at : at + n] = torch.triu(
                            torch.full((n, n), blocked, dtype=self.dtype), diagonal=1
                        )
                where_b.extend([b] * (n + 1))
                where_p.extend([c - 1, *range(at, at + n)])
                targets.extend(cont)
                at += n
            if mask is not None:
                for p in range(row.length, width):  # padding attends to itself: no row of -inf (NaN) anywhere
                    mask[b, 0, p, p] = 0
        # only the positions from the earliest context end on are projected onto the vocabulary
        first = min(len(row.context) for row in rows) - 1
        keep = torch.arange(first, width, device=self.device)
        with torch.no_grad():
            logits = self.model(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device) if mask is not None else None,
                position_ids=pos.to(self.device),
                logits_to_keep=keep,
                use_cache=False,
            ).logits
            picked = logits[torch.tensor(where_b), torch.tensor(where_p) - first].float()
            target = torch.tensor(targets, device=picked.device)
            token_logprobs = torch.log_softmax(picked, dim=-1).gather(1, target[:, None])[:, 0].tolist()
            hits = (picked.argmax(dim=-1) == target).tolist()
        results = []
        k = 0
        for row in rows:
            row_results = []
            for cont in row.conts:
                n = len(cont)
                row_results.append((float(sum(token_logprobs[k : k + n])), all(hits[k : k + n])))
                k += n
            results.append(row_results)
        return results

    def _check_packing(self, row: _Row) -> None:
        """Packed rows must give what separate rows give; a model whose attention ignores the custom mask (or
        computes something position-dependent we do not reproduce) falls back to one row per request."""
        self._packing_checked = True
        packed = self._forward([row])[0]
        plain = [self._forward([_Row(row.context, [c])])[0][0] for c in row.conts]
        worst = max(abs(a[0] - b[0]) for a, b in zip(packed, plain))
        if worst > 1e-4 * max(1.0, max(abs(b[0]) for b in plain)) or any(a[1] != b[1] for a, b in zip(packed, plain)):
            self.share_prefix = False
            self.log(
                f"warning: {self.path}: shared-context scoring differs from plain scoring by {worst:.2g} on this "
                "model; scoring each request on its own"
            )

    # -- generation -------------------------------------------------------------------------------

    @property
    def has_chat_template(self) -> bool:
        return bool(self.engine.template)

    def prompt(self, messages: Sequence[dict[str, Any]]) -> str:
        from llmforge.chat_engine import render_prompt

        if not self.engine.template:
            return str(messages[-1]["content"])
        return render_prompt(self.engine, list(messages))

    def _prompt_ids(self, text: str) -> Tokens:
        # a rendered chat starts with its BOS when the template writes one; a plain prompt gets the tokenizer's
        return self._encode(text)

    def generate(
        self,
        prompts: Sequence[str],
        *,
        max_new_tokens: int = 256,
        stop: Sequence[str] = (),
        temperature: float = 0.0,
        seed: int = 0,
    ) -> list[str]:
        torch = self._torch
        from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

        stops = tuple(dict.fromkeys([*stop, *self.engine.stop_strings]))
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        room = max(1, self.context - max_new_tokens)
        encoded = [self._prompt_ids(p)[-room:] for p in prompts]
        out: list[str] = [""] * len(prompts)
        order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
        tokenizer = self.tokenizer

        class StopStrings(StoppingCriteria):
            """Ends a row as soon as its answer holds a stop string (per row: the others go on)."""

            def __init__(self, start: int):
                self.start = start

            def __call__(self, input_ids, scores, **kwargs):
                done = [
                    cut_at_stop(str(tokenizer.decode(row[self.start :], skip_special_tokens=True)), stops)[1]
                    for row in input_ids.tolist()
                ]
                return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

        sample = temperature > 0
        # Every setting spelled out: generate() fills what is left None from the model's generation_config.json
        # (a checkpoint's sampling defaults, a repetition penalty) and the answers would no longer be greedy /
        # plain temperature sampling, the same as the gguf model's and the chat engines'.
        config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            min_new_tokens=0,
            do_sample=sample,
            num_beams=1,
            temperature=temperature if sample else 1.0,
            top_k=0,
            top_p=1.0,
            min_p=0.0,
            typical_p=1.0,
            repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            eos_token_id=sorted(self.engine.stops),
            pad_token_id=pad,
        )
        for batch in batches_by_tokens(
            [len(encoded[i]) + max_new_tokens for i in order], self.batch_size, TOKEN_BUDGET
        ):
            picked = [order[b] for b in batch]
            width = max(len(encoded[i]) for i in picked)
            ids = torch.full((len(picked), width), pad, dtype=torch.long)
            mask = torch.zeros((len(picked), width), dtype=torch.long)
            for b, i in enumerate(picked):  # left padding: every answer starts at the same column
                n = len(encoded[i])
                ids[b, width - n :] = torch.tensor(encoded[i])
                mask[b, width - n :] = 1
            criteria = StoppingCriteriaList([StopStrings(width)]) if stops else None
            with torch.no_grad(), torch.random.fork_rng():
                torch.manual_seed(seed)
                gen = self.model.generate(
                    input_ids=ids.to(self.device),
                    attention_mask=mask.to(self.device),
                    generation_config=config,
                    stopping_criteria=criteria,
                )
            for b, i in enumerate(picked):
                new = gen[b, width:].tolist()  # after a row ends, generate pads it: cut at the stop token first
                cut = next((k for k, t in enumerate(new) if t in self.engine.stops), len(new))
                text = str(self.tokenizer.decode(new[:cut], skip_special_tokens=True))
                out[i] = cut_at_stop(text, stops)[0]
        return out

    # -- embeddings -------------------------------------------------------------------------------

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """The mean of the last layer's hidden states over each text's tokens (padding left out)."""
        torch = self._torch
        encoded = [self._encode(t)[-self.context :] or [self.prefix_id or 0] for t in texts]
        out: list[list[float]] = [[] for _ in texts]
        order = sorted(range(len(texts)), key=lambda i: -len(encoded[i]))
        for batch in batches_by_tokens([len(encoded[i]) for i in order], self.batch_size, TOKEN_BUDGET):
            picked = [order[b] for b in batch]
            width = max(len(encoded[i]) for i in picked)
            ids = torch.zeros((len(picked), width), dtype=torch.long)
            mask = torch.zeros((len(picked), width), dtype=torch.long)
            for b, i in enumerate(picked):
                ids[b, : len(encoded[i])] = torch.tensor(encoded[i])
                mask[b, : len(encoded[i])] = 1
            with torch.no_grad():
                hidden = self.model(
                    input_ids=ids.to(self.device),
                    attention_mask=mask.to(self.device),
                    output_hidden_states=True,
                    logits_to_keep=1,
                    use_cache=False,
                ).hidden_states[-1]
            m = mask.to(hidden.device, hidden.dtype)[..., None]
            means = (hidden * m).sum(dim=1) / m.sum(dim=1)
            for b, i in enumerate(picked):
                out[i] = means[b].float().tolist()
        return out

    def close(self) -> None:
        self.engine.close()
        self.model = None


class _Row:
    """One batch row: a context, then the continuations scored after it (each but its last token is input)."""

    __slots__ = ("context", "conts", "length", "packed")

    def __init__(self, context: Tokens, conts: list[Tokens]):
        self.context = context
        self.conts = [list(c) for c in conts]
        self.length = len(context) + sum(len(c) - 1 for c in self.conts)
        #: more than one continuation puts tokens after the context: the row needs its own attention mask
        self.packed = sum(len(c) > 1 for c in self.conts) > 1
