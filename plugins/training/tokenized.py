"""Tokenized datasets, cached under a key that includes the tokenizer's and the template's hash, so a
changed tokenizer or template never reuses a stale cache (a common silent bug elsewhere)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IGNORE = -100


def tokenizer_hash(tokenizer) -> str:
    """Identify a tokenizer by what decides its output: vocabulary, merges, normalisation, special tokens."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:  # slow tokenizers: the vocabulary is the best we have
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps({k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}).encode())
    h.update(str(getattr(tokenizer, "chat_template", "")).encode())
    return h.hexdigest()[:16]


@dataclass
class TokenizedSet:
    rows: list[dict]  # {"input_ids": [...], "labels": [...]}
    key: str
    cached: bool
    stats: dict


def _rows_hash(rows: list[dict]) -> str:
    h = hashlib.sha256()
    for r in rows:
        h.update(json.dumps(r, sort_keys=True, ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


def _save(rows: list[dict], stats: dict, folder: Path) -> None:
    tmp = folder.parent / f".tmp-{folder.name}-{socket.gethostname()}-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    lengths = np.array([len(r["input_ids"]) for r in rows], dtype=np.int64)
    np.save(tmp / "lengths.npy", lengths)
    np.save(
        tmp / "input_ids.npy",
        np.fromiter((t for r in rows for t in r["input_ids"]), dtype=np.int32, count=int(lengths.sum())),
    )
    np.save(
        tmp / "labels.npy",
        np.fromiter((t for r in rows for t in r["labels"]), dtype=np.int32, count=int(lengths.sum())),
    )
    (tmp / "meta.json").write_text(json.dumps(stats, indent=2))
    if (folder / "meta.json").exists():  # another process (a rank of the same launch) was quicker
        shutil.rmtree(tmp, ignore_errors=True)
        return
    if folder.exists():  # a leftover without its meta.json: never finished
        shutil.rmtree(folder, ignore_errors=True)
    try:
        os.replace(tmp, folder)
    except OSError:
        # Another process (a rank of the same launch) finished the same entry first: same key, same rows.
        if not (folder / "meta.json").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def _load(folder: Path) -> tuple[list[dict], dict]:
    lengths = np.load(folder / "lengths.npy")
    ids = np.load(folder / "input_ids.npy")
    labels = np.load(folder / "labels.npy")
    rows, start = [], 0
    for n in lengths.tolist():
        rows.append({"input_ids": ids[start : start + n].tolist(), "labels": labels[start : start + n].tolist()})
        start += n
    return rows, json.loads((folder / "meta.json").read_text())


def tokenize(
    rows: list[dict],
    kind: str,
    tokenizer,
    template,
    *,
    max_length: int,
    train_on: str = "assistant",
    cache_dir: Path | None = None,
    add_eos: bool = True,
) -> TokenizedSet:
    """Turn normalised rows (text or chat) into {input_ids, labels}, with a cache keyed by everything
    that decides the result. Long text documents are split into max_length pieces (nothing dropped);
    long chats are truncated and counted."""
    key_src = {
        "rows": _rows_hash(rows),
        "kind": kind,
        "tokenizer": tokenizer_hash(tokenizer),
        "template": template.hash if template is not None else None,
        "max_length": max_length,
        "train_on": train_on,
        "add_eos": add_eos,
        "version": 1,
    }
    key = hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()[:20]
    folder = cache_dir / key if cache_dir is not None else None
    if folder is not None and (folder / "meta.json").exists():
        cached, stats = _load(folder)
        return TokenizedSet(cached, key, True, stats)

    t0 = time.monotonic()
    out: list[dict] = []
    truncated = 0
    if kind == "text":
        eos = tokenizer.eos_token_id
        bos = tokenizer.bos_token_id
        for r in rows:
            ids = tokenizer(r["text"], add_special_tokens=False)["input_ids"]
            ids = ([bos] if bos is not None else []) + ids + ([eos] if add_eos and eos is not None else [])
            for i in range(0, len(ids), max_length):
                piece = ids[i : i + max_length]
                if len(piece) > 1:
                    out.append({"input_ids": piece, "labels": list(piece)})
    elif kind == "chat":
        from llmforge.chat import encode_chat

        for r in rows:
            enc = encode_chat(tokenizer, template, r["messages"], max_length=max_length, train_on=train_on)
            truncated += bool(enc.truncated)
            if any(label != IGNORE for label in enc.labels):
                out.append({"input_ids": list(enc.input_ids), "labels": list(enc.labels)})
    else:
        raise ValueError(f"cannot tokenize rows of kind {kind!r} for language-model training")
    lengths = [len(r["input_ids"]) for r in out]
    stats = {
        "rows_in": len(rows),
        "sequences": len(out),
        "tokens": int(sum(lengths)),
        "trained_tokens": int(sum(sum(1 for x in r["labels"] if x != IGNORE) for r in out)),
        "truncated": truncated,
        "truncation_rate": truncated / max(len(rows), 1),
        "max_len": max(lengths, default=0),
        "mean_len": (sum(lengths) / len(lengths)) if lengths else 0.0,
        "seconds": round(time.monotonic() - t0, 3),
        "key": key,
    }
    if folder is not None:
        _save(out, stats, folder)
    return TokenizedSet(out, key, False, stats)


def split_eval(rows: list, fraction: float, seed: int) -> tuple[list, list]:
    """Deterministic hold-out split (by seed), at least one row on each side when possible."""
    if fraction <= 0 or len(rows) < 2:
        return rows, []
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(rows))
    n_eval = min(max(1, int(round(len(rows) * fraction))), len(rows) - 1)
    eval_idx = set(order[:n_eval].tolist())
    return [r for i, r in enumerate(rows) if i not in eval_idx], [r for i, r in enumerate(rows) if i in eval_idx]
