"""MinHash signatures and LSH band keys for a batch of texts, vectorised with numpy.

Per batch of documents:

1. shingles: words (runs of letters, digits and underscores, lower-cased on request) or characters;
   each word is hashed once from its UTF-8 bytes (a character is its code point), and every n-gram's
   hash is a combination of its members' hashes, computed over the whole batch at once with numpy
   (no Python call per word), then mixed with the splitmix64 finaliser;
2. signatures: for each of ``num_perm`` hash functions ``h_k(x) = a_k * x + b_k (mod 2^32)`` (odd
   ``a_k``), the minimum over the document's shingles, computed as one (num_perm x shingles) product
   per chunk of documents and reduced per document with ``np.minimum.reduceat``. Two documents agree
   on a signature entry with probability about equal to the Jaccard similarity of their shingle sets;
3. band keys: the signature cut into ``bands`` bands of ``rows`` values, each band hashed to one 64-bit
   key. Documents that share a band key are candidates (locality-sensitive hashing).

Everything is deterministic for a given seed.
"""

from __future__ import annotations

import math
import re
from functools import lru_cache

import numpy as np

WORD = re.compile(r"\w+")
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
# Shingles per chunk of the (shingles x num_perm) product: 16k x 128 x 8 bytes = 16 MB of scratch.
_CHUNK = 1 << 14


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, in place on a uint64 array: spreads every input bit over the output."""
    x ^= x >> np.uint64(30)
    x *= _M1
    x ^= x >> np.uint64(27)
    x *= _M2
    x ^= x >> np.uint64(31)
    return x


@lru_cache(maxsize=16)
def _perm32(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, num_perm, 0x5EED])
    a = rng.integers(0, 2**31, size=num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
    b = rng.integers(0, 2**32, size=num_perm, dtype=np.uint32)
    return a, b


@lru_cache(maxsize=16)
def _params(num_perm: int, seed: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, num_perm, n, 0x5EED])
    a = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    b = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64) * np.uint64(2)
    # multipliers that combine n member hashes into one n-gram hash (position-dependent)
    p = rng.integers(0, 2**63, size=max(n, 1), dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    return a, b, p


def _word_bytes() -> np.ndarray:
    table = np.zeros(256, dtype=bool)
    for c in b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_":
        table[c] = True
    table[0x80:] = True  # bytes of non-ASCII characters; their punctuation is taken out below
    return table


_WORD_BYTE = _word_bytes()
_MAX_WORD = 64  # bytes of a word that enter its hash position by position (longer words wrap around)


def _classify(data: np.ndarray) -> np.ndarray:
    """Which bytes of UTF-8 text belong to words."""
    is_word = _WORD_BYTE[data]
    for lead, seconds, width in ((0xC2, (0x80, 0xBF), 2), (0xE2, (0x80, 0x81), 3), (0xE3, (0x80, 0x80), 3)):
        at = np.flatnonzero(data[:-1] == lead)
        at = at[(data[at + 1] >= seconds[0]) & (data[at + 1] <= seconds[1])]
        for k in range(width):
            is_word[np.minimum(at + k, data.size - 1)] = False
    return is_word


def split_words(text: str) -> list[str]:
    """The words of one text as the word shingles see them (for showing a matched n-gram)."""
    raw = text.encode("utf-8")
    data = np.frombuffer(raw, dtype=np.uint8)
    edge = np.diff(_classify(data).astype(np.int8), prepend=np.int8(0), append=np.int8(0))
    starts, ends = np.flatnonzero(edge == 1), np.flatnonzero(edge == -1)
    return [raw[a:b].decode("utf-8", "replace") for a, b in zip(starts.tolist(), ends.tolist())]


def _word_units(texts: list[str], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Hash every word of every text without a Python call per word: the texts' UTF-8 bytes are
    classified with a lookup table (ASCII letters, digits and underscore, and non-ASCII characters
    other than the common punctuation and spaces of U+0080-U+00BF, U+2000-U+206F and U+3000-U+303F),
    and each word's hash is a polynomial in its bytes, summed per word with ``np.add.reduceat``."""
    encoded = [t.encode("utf-8") for t in texts]
    data = np.frombuffer(b"\n".join(encoded), dtype=np.uint8)
    is_word = _classify(data)
    edge = np.diff(is_word.astype(np.int8), prepend=np.int8(0))
    starts = np.flatnonzero(edge == 1)
    idx = np.flatnonzero(is_word)
    _, _, mult = _params(1, seed, _MAX_WORD)
    word_of = np.cumsum(edge[idx] == 1) - 1
    pos = (idx - starts[word_of]) % _MAX_WORD
    contrib = (data[idx].astype(np.uint64) + np.uint64(1)) * mult[pos]
    values = np.add.reduceat(contrib, np.searchsorted(idx, starts)) if starts.size else contrib[:0]
    values = mix64(values ^ np.uint64(seed))
    # words per text: texts are joined by one separator byte, so text i spans [byte_start[i], byte_end[i])
    lengths = np.fromiter((len(b) for b in encoded), dtype=np.int64, count=len(encoded))
    byte_end = np.cumsum(lengths + 1) - 1
    counts = np.diff(np.searchsorted(starts, byte_end), prepend=0)
    return values, counts


def units(texts: list[str], unit: str = "word", lowercase: bool = True, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """The hashed words (or characters) of every text, concatenated, and each text's count."""
    if lowercase:
        texts = [t.lower() for t in texts]
    if unit == "char":
        flat = [" ".join(t.split()) for t in texts]
        counts = np.fromiter((len(t) for t in flat), dtype=np.int64, count=len(flat))
        data = "".join(flat).encode("utf-32-le")
        return np.frombuffer(data, dtype=np.uint32).astype(np.uint64), counts
    return _word_units(texts, seed)


def shingles(
    texts: list[str], unit: str = "word", n: int = 5, lowercase: bool = True, seed: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """(hashes, offsets): the n-gram hashes of every text, concatenated; text i's are
    ``hashes[offsets[i]:offsets[i + 1]]``. A text shorter than n units is one shingle (all of it); an
    empty text has none."""
    return grams(*units(texts, unit, lowercase, seed), n, seed)


def grams(unit_hashes: np.ndarray, counts: np.ndarray, n: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """``shingles`` from already hashed units (see ``units``): several n over the same texts hash the
    words only once."""
    _, _, p = _params(1, seed, n)
    n_texts = counts.size
    starts = np.zeros(n_texts + 1, dtype=np.int64)
    np.cumsum(counts, out=starts[1:])
    # the n-gram hash at every position of the concatenation; then keep those inside one text
    m = max(unit_hashes.size - n + 1, 0)
    every = np.zeros(m, dtype=np.uint64)
    for j in range(n):
        every += unit_hashes[j : j + m] * p[j]
    valid = np.zeros(m, dtype=bool)
    if m:
        text_of = np.repeat(np.arange(n_texts), counts)[:m]
        valid = np.arange(m) + n <= starts[1:][text_of]
    per_text = np.maximum(counts - n + 1, 0)
    is_short = (counts > 0) & (counts < n)
    offsets = np.zeros(n_texts + 1, dtype=np.int64)
    np.cumsum(per_text + is_short, out=offsets[1:])
    out = np.empty(int(offsets[-1]), dtype=np.uint64)
    # long texts: their valid n-grams, in order, around the one slot of each short text
    short = np.flatnonzero(is_short)
    is_long = np.ones(out.size, dtype=bool)
    is_long[offsets[short]] = False
    out[is_long] = every[valid]
    for i in short:
        u = unit_hashes[starts[i] : starts[i + 1]]
        out[offsets[i]] = np.sum(u * p[: u.size], dtype=np.uint64) + np.uint64(u.size)
    return mix64(out), offsets


def signatures(hashes: np.ndarray, offsets: np.ndarray, num_perm: int = 128, seed: int = 1) -> np.ndarray:
    """(documents x num_perm) uint32 MinHash signatures. A document without shingles gets all
    0xFFFFFFFF (and should not be compared). The hash functions are ``a_k * x + b_k (mod 2^32)`` on the
    top 32 bits of each shingle's (well mixed) hash: measured unbiased against exact Jaccard
    similarity, and half the memory traffic of 64-bit arithmetic."""
    a, b = _perm32(num_perm, seed)
    x = (hashes >> np.uint64(32)).astype(np.uint32)
    n_docs = offsets.size - 1
    # (num_perm x documents): numpy reduces along the last axis several times faster than along the first
    sig = np.full((num_perm, n_docs), np.uint32(2**32 - 1), dtype=np.uint32)
    lengths = np.diff(offsets)
    docs = np.flatnonzero(lengths > 0)
    i = 0
    while i < docs.size:
        # a chunk of whole documents holding about _CHUNK shingles (at least one document)
        lo = offsets[docs[i]]
        j = max(int(np.searchsorted(offsets[docs + 1], lo + _CHUNK, side="right")), i + 1)
        chunk = docs[i:j]
        hi = offsets[chunk[-1] + 1]
        prod = np.multiply.outer(a, x[lo:hi])
        prod += b[:, None]
        sig[:, chunk] = np.minimum.reduceat(prod, offsets[chunk] - lo, axis=1)
        i = j
    return np.ascontiguousarray(sig.T)


def band_keys(sig: np.ndarray, bands: int, rows: int, seed: int = 1) -> np.ndarray:
    """(documents x bands) uint64 keys: band j of each signature hashed to one number (with j mixed in,
    so equal values in different bands never collide)."""
    rng = np.random.default_rng([seed, bands, rows, 0xBA4D])
    mult = rng.integers(0, 2**63, size=rows, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    salt = rng.integers(0, 2**63, size=bands, dtype=np.uint64)
    cut = sig[:, : bands * rows].astype(np.uint64).reshape(sig.shape[0], bands, rows)
    keys = (cut * mult).sum(axis=2, dtype=np.uint64) + salt
    return mix64(keys)


# ------------------------------------------------------------------------------------------------
# choosing bands and rows


# numpy < 2 has only the old name, which numpy 2's type stubs no longer declare: looked up by name
_integrate = getattr(np, "trapezoid", None) or getattr(np, "trapz")  # noqa: B009


def _probability(s: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """Chance that two documents of Jaccard similarity s share at least one band."""
    return 1.0 - (1.0 - s**rows) ** bands


@lru_cache(maxsize=64)
def lsh_params(threshold: float, num_perm: int, fp_weight: float = 0.5) -> tuple[int, int]:
    """(bands, rows) with bands * rows <= num_perm that minimise the weighted area of false positives
    (similarity below the threshold, yet candidates) and false negatives (above it, yet not)."""
    below = np.linspace(0.0, threshold, 200)
    above = np.linspace(threshold, 1.0, 200)
    best, best_cost = (1, num_perm), math.inf
    for bands in range(1, num_perm + 1):
        for rows in range(1, num_perm // bands + 1):
            fp = _integrate(_probability(below, bands, rows), below)
            fn = _integrate(1.0 - _probability(above, bands, rows), above)
            cost = fp_weight * fp + (1.0 - fp_weight) * fn
            if cost < best_cost:
                best, best_cost = (bands, rows), cost
    return best


def candidate_probability(similarity: float, bands: int, rows: int) -> float:
    return float(_probability(np.asarray(similarity), bands, rows))
