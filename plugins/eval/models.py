"""Opening a model for evaluation, and what the built-in eval models (hf_model.py, gguf_model.py) share.

:func:`open_model` picks the first registered :class:`~llmforge_plugins.eval.api.EvalModel` class that accepts a
path (as ``llmforge.chat_engine.open_engine`` does for chat engines). The rest is the token bookkeeping of
lm-evaluation-harness that both built-in models follow, so that their log-likelihoods are the ones lm-eval
computes on the same model: how a (context, continuation) pair becomes tokens (:func:`encode_pairs`), how a pair
longer than the context is cut (:func:`fit_request`), how a long text is scored in windows
(:func:`rolling_windows`), and where a generated answer ends (:func:`cut_at_stop`).

No torch here: imported when a task or the stage opens a model, before any model is loaded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from llmforge.errors import UsageError

from .api import EvalModel

Tokens = list[int]


def open_model(
    path: Path | str,
    registry_or_table: Any,
    *,
    label: str | None = None,
    n_ctx: int | None = None,
    batch_size: int | None = None,
    log: Callable[[str], Any] | None = None,
    **kw: Any,
) -> EvalModel:
    """Open ``path`` with the first eval model class (the registry's table ``EVAL_MODELS``, or such a table
    given directly, in load order) that accepts it; a UsageError naming the path and what each class wanted
    when none does. ``label`` names the model in a leaderboard (default: the file or folder name); other
    keyword arguments go to the class (``dtype`` for hf)."""
    if isinstance(registry_or_table, Mapping):
        table: Mapping[str, type[EvalModel]] = registry_or_table
    else:
        from .api import EVAL_MODELS

        table = registry_or_table.table(EVAL_MODELS)
    path = Path(path)
    kinds = " or ".join(cls.opens for cls in table.values() if cls.opens) or "a model"
    if not path.exists():
        raise UsageError(f"{path}: no such file or directory", hint=f"give {kinds}")
    if not table:
        raise UsageError(
            f"{path}: no eval model is installed",
            hint="the eval plugin provides them; `llmforge plugins list` shows what loaded",
        )
    why = []
    for name, cls in table.items():
        reason = cls.refuse(path)
        if reason is None:
            model = cls(path, n_ctx=n_ctx, batch_size=batch_size, log=log, **kw)
            model.label = label or model.label or path.name
            return model
        why.append(f"{name}: {reason}")
    raise UsageError(f"{path}: no eval model opens it ({'; '.join(why)})", hint=f"give {kinds}")


# ------------------------------------------------------------------------------------------------
# lm-evaluation-harness's token bookkeeping


def encode_pairs(
    encode_many: Callable[[list[str], bool], list[Tokens]],
    requests: Sequence[tuple[str, str]],
    prefix_id: int | None,
    prefix_text: str | None,
) -> list[tuple[Tokens, Tokens]]:
    """(context tokens, continuation tokens) of each request, as lm-eval's causal models make them.

    ``encode_many(texts, special)`` tokenizes texts with the tokenizer's special tokens (its BOS, when it adds
    one) or without. A text is encoded as the tokenizer does by default unless it starts with the prefix token's
    text (lm-eval's ``tok_encode``: no second BOS in front of a rendered chat). Trailing spaces of the context go
    to the continuation (a tokenizer glues a space to the word after it); the continuation's tokens are what
    encoding the whole adds after the context's own encoding, so the model sees exactly context_enc +
    continuation_enc. An empty context is the prefix token (BOS, else EOS) unless the continuation, encoded
    without special tokens, already starts with it.

    Each distinct text is encoded once, in one call per kind (the choices of an item share their context)."""
    wanted: dict[tuple[str, bool], Tokens | None] = {}

    def ask(text: str, special: bool | None = None) -> tuple[str, bool]:
        if special is None:
            special = not (prefix_text and text.startswith(prefix_text))
        wanted.setdefault((text, special), None)
        return text, special

    plan: list[tuple[tuple[str, bool] | None, tuple[str, bool]]] = []
    for context, continuation in requests:
        if not context:
            plan.append((None, ask(continuation, False)))
            continue
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        plan.append((ask(context), ask(context + continuation)))
    for special in (True, False):
        texts = [text for text, sp in wanted if sp is special]
        if texts:
            for text, ids in zip(texts, encode_many(texts, special)):
                wanted[text, special] = list(ids)
    out: list[tuple[Tokens, Tokens]] = []
    for ctx_key, whole_key in plan:
        whole = wanted[whole_key] or []
        if ctx_key is None:
            if prefix_id is None or (whole and whole[0] == prefix_id):
                out.append((whole[:1], whole[1:]))
            else:
                out.append(([prefix_id], whole))
        else:
            ctx = wanted[ctx_key] or []
            out.append((ctx, whole[len(ctx) :]))
    return out


def fit_request(context: Tokens, continuation: Tokens, max_length: int) -> Tokens:
    """The context the model sees when context + continuation is longer than ``max_length`` + 1 tokens: cut
    from the left, as lm-eval does (the last token is never input, so max_length + 1 tokens fit). The
    continuation is kept whole; at least one context token stays (the first continuation token needs one)."""
    if len(continuation) > max_length:
        raise UsageError(
            f"a continuation of {len(continuation)} tokens does not fit the model's context ({max_length})",
            hint="shorten the answers, or open the model with a larger context",
        )
    room = max_length + 1 - len(continuation)
    return context[-room:] if len(context) > room else context


def rolling_windows(tokens: Tokens, prefix_id: int | None, max_length: int) -> list[tuple[Tokens, Tokens]]:
    """(context, continuation) windows that score every token of ``tokens`` once, in windows of at most
    ``max_length`` inputs: lm-eval's rolling windows with a context of one token, made disjoint. The first
    token is predicted from ``prefix_id`` (BOS, else EOS); with neither it is not scored (it is the first
    window's context).

    ``tokens`` are the text's own, without special tokens. (lm-eval 0.4.13's HFLM encodes the text with the
    tokenizer's defaults, so with a tokenizer that adds a BOS it scores that BOS after the prefix BOS: its
    perplexities differ from these there, and only there.)"""
    if prefix_id is None:
        if len(tokens) < 2:
            return []
        head, tokens = tokens[:1], tokens[1:]
    else:
        head = [prefix_id]
    out: list[tuple[Tokens, Tokens]] = []
    done = 0
    while done < len(tokens):
        n = min(max_length, len(tokens) - done)
        end = done + n
        # everything before the window that still fits as input (max_length + 1 tokens in all)
        history = head + tokens[:done]
        ctx_room = max_length + 1 - n
        out.append((history[-ctx_room:], tokens[done:end]))
        done = end
    return out


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """``text`` cut before the earliest of ``stops``, and whether one was found."""
    at = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    return (text[:at], True) if at >= 0 else (text, False)


def batches_by_tokens(lengths: Sequence[int], rows: int, tokens: int) -> Iterator[list[int]]:
    """Indices of items (sorted longest first by the caller) in batches of at most ``rows`` items whose
    padded size (rows × the longest) stays within ``tokens``; an item longer than ``tokens`` goes alone."""
    batch: list[int] = []
    longest = 0
    for i, n in enumerate(lengths):
        top = max(longest, n)
        if batch and (len(batch) + 1 > rows or top * (len(batch) + 1) > tokens):
            yield batch
            batch, top = [], n
        batch.append(i)
        longest = top
    if batch:
        yield batch
