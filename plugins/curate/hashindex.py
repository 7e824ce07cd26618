"""A compact hash table from 64-bit keys to 64-bit values, probed a whole batch at a time with numpy.

The deduplication steps remember one or a few 64-bit hashes per kept row. A Python dict or set costs
about 70-100 bytes per entry; this table costs 12 bytes per slot (16 with 64-bit values) and stays
at most half full, so 24 to 48 bytes per key, and it looks up or inserts thousands of keys per numpy
call (open addressing, linear probing). Key 0 marks an empty slot, so keys are nudged off 0 on the
way in. Inserts and the rehash when it grows go in chunks, so their temporaries stay small next to
the table itself.
"""

from __future__ import annotations

import numpy as np

_EMPTY = np.uint64(0)
_CHUNK = 1 << 18  # keys per insert step: bounds the temporaries (a few MB) whatever the batch


def _nonzero(keys: np.ndarray) -> np.ndarray:
    keys = np.asarray(keys, dtype=np.uint64)
    return np.where(keys == _EMPTY, np.uint64(1), keys)


class HashIndex:
    def __init__(self, capacity: int = 1 << 16, value_dtype=np.uint64):
        size = 1 << max(4, int(capacity - 1).bit_length())
        self._value_dtype = value_dtype
        self._keys = np.zeros(size, dtype=np.uint64)
        self._values = np.zeros(size, dtype=value_dtype)
        self._mask = np.uint64(size - 1)
        self.count = 0

    def __len__(self) -> int:
        return self.count

    @property
    def nbytes(self) -> int:
        return self._keys.nbytes + self._values.nbytes

    def _slots(self, keys: np.ndarray) -> np.ndarray:
        # Keys are hashes already (well mixed), so their low bits are a fine slot number.
        return (keys & self._mask).astype(np.int64)

    def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(found, values) for each key; values are 0 where not found."""
        keys = _nonzero(keys).ravel()
        found = np.zeros(keys.shape, dtype=bool)
        values = np.zeros(keys.shape, dtype=self._value_dtype)
        active = np.arange(keys.size)
        slots = self._slots(keys)
        mask = int(self._mask)
        while active.size:
            s = slots[active]
            seen = self._keys[s]
            hit = seen == keys[active]
            found[active[hit]] = True
            values[active[hit]] = self._values[s[hit]]
            go_on = ~hit & (seen != _EMPTY)
            active = active[go_on]
            slots[active] = (slots[active] + 1) & mask
        return found, values

    def insert(self, keys: np.ndarray, values: np.ndarray) -> None:
        """Add keys with their values. A key already present keeps its first value (the first row seen
        wins), and so does the first of equal keys within one call."""
        keys = _nonzero(keys).ravel()
        values = np.asarray(values, dtype=self._value_dtype).ravel()
        if not keys.size:
            return
        keys, first = np.unique(keys, return_index=True)
        order = np.argsort(first, kind="stable")  # insertion order = order given
        keys, values = keys[order], values[first[order]]
        if (self.count + keys.size) * 2 > self._keys.size:
            self._grow(self.count + keys.size)
        for lo in range(0, keys.size, _CHUNK):
            self._place(keys[lo : lo + _CHUNK], values[lo : lo + _CHUNK])

    def _place(self, keys: np.ndarray, values: np.ndarray) -> None:
        """Insert distinct keys (room is made already)."""
        active = np.arange(keys.size)
        slots = self._slots(keys)
        mask = int(self._mask)
        while active.size:
            s = slots[active]
            seen = self._keys[s]
            present = seen == keys[active]
            empty = seen == _EMPTY
            # Several keys may want the same empty slot: the first of them takes it, the others move on.
            cand = np.flatnonzero(empty)
            taken = np.zeros(active.size, dtype=bool)
            if cand.size:
                _, winners = np.unique(s[cand], return_index=True)
                win = cand[winners]
                self._keys[s[win]] = keys[active[win]]
                self._values[s[win]] = values[active[win]]
                self.count += win.size
                taken[win] = True
            go_on = ~(present | taken)
            moving = go_on & ~empty  # losers of a race retry the same slot, now taken, and move on then
            slots[active[moving]] = (slots[active[moving]] + 1) & mask
            active = active[go_on]

    def _grow(self, needed: int) -> None:
        old_keys, old_values = self._keys, self._values
        size = self._keys.size
        while needed * 2 > size:
            size *= 2
        self._keys = np.zeros(size, dtype=np.uint64)
        self._values = np.zeros(size, dtype=self._value_dtype)
        self._mask = np.uint64(size - 1)
        self.count = 0
        # the old keys are distinct: rehash them chunk by chunk, without sorting them all at once
        for lo in range(0, old_keys.size, _CHUNK):
            k = old_keys[lo : lo + _CHUNK]
            used = k != _EMPTY
            if used.any():
                self._place(k[used], old_values[lo : lo + _CHUNK][used])
