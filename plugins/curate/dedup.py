"""Deduplication steps: `exact_dedup` (a content hash per row) and `near_dedup` (MinHash with LSH
banding). Both keep the first row of a group and drop the later ones, naming the row they repeat.

Memory: the index holds hashes only. `exact_dedup` keeps one 64-bit hash and one location code per
kept row (32-64 bytes in its hash table); `near_dedup` keeps one 64-bit key per band of each kept row
(24-48 bytes each), a location code, and, to verify candidates, a 16-bit slice of each signature
value (``num_perm`` x 2 bytes). Rows themselves are never kept.
"""

from __future__ import annotations

import json
import re
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from llmforge_plugins.curate import minhash
from llmforge_plugins.curate.api import (
    CurationStep,
    Drop,
    StepOptions,
    map_text,
    row_text,
)
from llmforge_plugins.curate.hashindex import HashIndex
from llmforge_plugins.curate.source import WhereCodec

_SPACES = re.compile(r"\s+")


class _Store:
    """A growable numpy array of rows (signatures) or values (locations), doubling as it fills."""

    def __init__(self, width: int | None, dtype):
        self.width, self.dtype, self.size = width, dtype, 0
        self.data = np.zeros((1024, width) if width else 1024, dtype=dtype)

    def append(self, value) -> int:
        if self.size == self.data.shape[0]:
            grown = np.zeros((self.size * 2, *self.data.shape[1:]), dtype=self.dtype)
            grown[: self.size] = self.data
            self.data = grown
        self.data[self.size] = value
        self.size += 1
        return self.size - 1

    @property
    def nbytes(self) -> int:
        return self.data.nbytes


# ------------------------------------------------------------------------------------------------
# exact


class ExactDedupOptions(StepOptions):
    lowercase: bool = Field(True, description="Compare rows case-insensitively (the row itself is not changed).")
    whitespace: bool = Field(True, description="Treat any run of whitespace as one space when comparing.")


class ExactDedup(CurationStep[ExactDedupOptions]):
    """Drops a row whose content (every text field, roles included) equals an earlier row's, after the
    optional lower-casing and whitespace folding of the comparison key. Keeps the first."""

    name = "exact_dedup"
    summary = "Drop rows whose content repeats an earlier row's exactly (a content hash per row)."
    action = "dedup"
    Options = ExactDedupOptions

    def __init__(self, options, env):
        super().__init__(options, env)
        self.index = HashIndex()
        self.codec = WhereCodec()

    def _key(self, row: dict) -> int:
        import xxhash

        options = self.options

        def fold(text: str) -> str:
            if options.whitespace:
                text = _SPACES.sub(" ", text).strip()
            return text.lower() if options.lowercase else text

        key = json.dumps(map_text(row, fold), ensure_ascii=False, sort_keys=True)
        return xxhash.xxh3_64_intdigest(key.encode("utf-8"), seed=self.env.seed)

    def process_batch(self, rows, wheres):
        keys = np.fromiter((self._key(r) for r in rows), dtype=np.uint64, count=len(rows))
        found, values = self.index.lookup(keys)
        local: dict[int, int] = {}
        out: list = []
        new_keys, new_values = [], []
        for i, row in enumerate(rows):
            k = int(keys[i])
            if found[i]:
                out.append(Drop(f"exact duplicate of {self.codec.decode(int(values[i]))}", code="exact"))
                continue
            if k in local:
                out.append(Drop(f"exact duplicate of {self.codec.decode(local[k])}", code="exact"))
                continue
            code = self.codec.encode(wheres[i])
            local[k] = code
            new_keys.append(k)
            new_values.append(code)
            out.append(row)
        self.index.insert(np.array(new_keys, dtype=np.uint64), np.array(new_values, dtype=np.uint64))
        return out

    def finish(self) -> dict:
        return {"distinct_rows": len(self.index), "index_bytes": self.index.nbytes}


# ------------------------------------------------------------------------------------------------
# near


class NearDedupOptions(StepOptions):
    threshold: float = Field(
        0.8,
        gt=0,
        lt=1,
        description="Jaccard similarity of the shingle sets at or above "
        "which a row is a near duplicate of an earlier one.",
    )
    ngram: int = Field(5, ge=1, le=64, description='Shingle length, in words (or characters with unit = "char").')
    unit: Literal["word", "char"] = Field("word", description="Shingles of words or of characters.")
    num_perm: int = Field(
        128, ge=16, le=1024, description="Hash functions per MinHash signature (more: a closer estimate, slower)."
    )
    bands: int | None = Field(None, ge=1, description="LSH bands (with rows); default: chosen from the threshold.")
    rows: int | None = Field(None, ge=1, description="Signature values per band (with bands).")
    lowercase: bool = Field(True, description="Compare case-insensitively.")
    verify: bool = Field(
        True,
        description="Check each LSH candidate's estimated similarity against the threshold "
        "(false: any candidate is a duplicate, as plain LSH does).",
    )
    seed: int = Field(1, description="Seed of the hash functions.")

    @model_validator(mode="after")
    def _bands_and_rows(self):
        if (self.bands is None) != (self.rows is None):
            raise ValueError("set both bands and rows, or neither")
        if self.bands is not None and self.rows is not None and self.bands * self.rows > self.num_perm:
            raise ValueError(f"bands x rows ({self.bands} x {self.rows}) exceeds num_perm ({self.num_perm})")
        return self


class NearDedup(CurationStep[NearDedupOptions]):
    """Drops a row whose shingle set is at least ``threshold`` similar (Jaccard) to an earlier kept
    row's: MinHash signatures, LSH bands to find candidates, and (``verify``) the candidates'
    estimated similarity checked against the threshold. Chat and preference rows are compared on their
    concatenated turns."""

    name = "near_dedup"
    summary = "Drop near-duplicate rows: MinHash + LSH over word or character n-grams (Jaccard threshold)."
    action = "dedup"
    Options = NearDedupOptions

    def __init__(self, options: NearDedupOptions, env):
        super().__init__(options, env)
        if options.bands is None or options.rows is None:  # both or neither (the options' validator)
            # With verification a false candidate costs only a comparison, so favour recall.
            self.bands, self.rows = minhash.lsh_params(
                options.threshold, options.num_perm, 0.1 if options.verify else 0.5
            )
        else:
            self.bands, self.rows = options.bands, options.rows
        self.index = HashIndex(value_dtype=np.uint32)  # values are row numbers in the stores below
        self.codec = WhereCodec()
        self.where = _Store(None, np.uint64)
        self.sigs = _Store(options.num_perm, np.uint16) if options.verify else None
        self.kept = 0

    def process_batch(self, rows, wheres):
        options = self.options
        texts = [row_text(r) for r in rows]
        hashes, offsets = minhash.shingles(texts, options.unit, options.ngram, options.lowercase, options.seed)
        sig = minhash.signatures(hashes, offsets, options.num_perm, options.seed)
        keys = minhash.band_keys(sig, self.bands, self.rows, options.seed)
        found, values = self.index.lookup(keys)
        found = found.reshape(keys.shape)
        values = values.reshape(keys.shape)
        sig16 = sig.astype(np.uint16)  # the low 16 bits: enough to estimate similarity
        has = np.diff(offsets) > 0
        any_found = np.asarray(found.any(axis=1))  # one per row (asarray: the stubs allow a scalar)
        key_lists = keys.tolist()
        local: dict[int, int] = {}
        out: list = []
        new_keys: list[int] = []
        new_ids: list[int] = []
        for i, row in enumerate(rows):
            if not has[i]:
                out.append(row)  # nothing to compare (no words): exact_dedup handles empty rows
                continue
            ks = key_lists[i]
            cands = set(values[i][found[i]].tolist()) if any_found[i] else set()
            for k in ks:
                j = local.get(k)
                if j is not None:
                    cands.add(j)
            match = self._best(cands, sig16[i]) if cands else None
            if match is not None:
                ident, sim = match
                where = self.codec.decode(int(self.where.data[ident]))
                what = (
                    f"estimated Jaccard {sim:.2f} >= {options.threshold}" if sim is not None else "shares an LSH band"
                )
                out.append(Drop(f"near duplicate ({what}) of {where}", code="near"))
                continue
            ident = self.where.append(self.codec.encode(wheres[i]))
            if self.sigs is not None:
                self.sigs.append(sig16[i])
            for k in ks:
                local.setdefault(k, ident)
            new_keys += ks
            new_ids += [ident] * len(ks)
            self.kept += 1
            out.append(row)
        self.index.insert(np.array(new_keys, dtype=np.uint64), np.array(new_ids, dtype=np.uint32))
        return out

    def _best(self, cands: set[int], sig: np.ndarray) -> tuple[int, float | None] | None:
        ids = np.fromiter(cands, dtype=np.int64, count=len(cands))
        if self.sigs is None:
            return int(ids.min()), None
        sims = (self.sigs.data[ids] == sig).mean(axis=1)
        best = int(np.argmax(sims))
        if sims[best] >= self.options.threshold:
            return int(ids[best]), float(sims[best])
        return None

    def finish(self) -> dict:
        options = self.options
        return {
            "bands": self.bands,
            "rows_per_band": self.rows,
            "kept_signatures": self.kept,
            "candidate_probability_at_threshold": round(
                minhash.candidate_probability(options.threshold, self.bands, self.rows), 4
            ),
            "index_bytes": self.index.nbytes + self.where.nbytes + (self.sigs.nbytes if self.sigs else 0),
        }
