"""A collisionless map from external ids (strings) to table rows, with a shared fallback row and recycled rows.

Row 0 is the fallback row of the table: ids not (yet) admitted use it. Every admitted id owns one row; a released
row goes on a free list and is handed to the next new id, so a row never holds two ids at once.

>>> m = IdMap()
>>> m.rows(["a", "b", "a"]).tolist(), len(m)
([1, 2, 1], 2)
>>> m.release([1]), m.rows(["c"]).tolist(), m.ids([1, 2])
(['a'], [1], ['c', 'b'])
>>> s = Sightings(capacity=2)
>>> m.rows(["x", "x", "y"], s, admit_after=2).tolist(), "x" in m
([0, 3, 0], True)
"""
from __future__ import annotations

import sys
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from itertools import repeat
from typing import Any

import numpy as np

from model.arrays import Rows

FALLBACK_ROW = 0
NO_ID = ""  # the id of the fallback row and of free rows; the job rejects empty ids, so it names no real id


class Sightings:
    """How often each not-yet-admitted id was seen, for at most ``capacity`` ids (the least recently seen go)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        # Least recently seen first. An OrderedDict, not a dict: a plain dict scans the deleted slots at its front
        # to find its first key, which made dropping the oldest id cost ~17 us under a flood of new ids.
        self.counts: OrderedDict[str, int] = OrderedDict()

    def see(self, key: str) -> int:
        """One more sighting of ``key``; returns its count."""
        counts = self.counts
        n = counts.get(key, 0) + 1
        counts[key] = n
        counts.move_to_end(key)
        if len(counts) > self.capacity:
            counts.popitem(last=False)
        return n

    def forget(self, key: str) -> None:
        self.counts.pop(key, None)

    def __len__(self) -> int:
        return len(self.counts)


class IdMap:
    def __init__(self) -> None:
        self._row: dict[str, int] = {}
        self._ids: list[str] = [NO_ID]  # row -> id; NO_ID for the fallback row and free rows
        self._free: list[int] = []
        # row -> holds an id, kept as rows are admitted and released: an eviction scan reads it instead of building
        # it from the dict's values (~40 ns an id, so ~10 ms a scan at 262,144 ids). Capacity grows by doubling.
        self._live = np.zeros(1024, bool)
        self.version = 0  # changes whenever an id gains or loses a row
        self.releases = 0  # changes whenever an id loses a row: rows looked up before may now hold another id

    def __len__(self) -> int:
        """Admitted ids (the fallback row is not one)."""
        return len(self._row)

    @property
    def size(self) -> int:
        """Rows in use or free, fallback included: the table must hold this many rows."""
        return len(self._ids)

    def __contains__(self, key: str) -> bool:
        return key in self._row

    def rows(self, ids: Sequence[str], sightings: Sightings | None = None, admit_after: int = 1,
             max_ids: int = 0) -> Rows:
        """Rows of ``ids``; an id not yet known is admitted at its ``admit_after``-th sighting, before that it gets
        the fallback row (sightings counted in ``sightings``, which is needed when ``admit_after > 1``). With
        ``max_ids`` > 0 no id is admitted while that many hold rows: it gets the fallback row, like an id not yet
        admitted (the caller evicts ids beforehand to make room, ``least_recently_used``)."""
        row = self._row
        out = np.empty(len(ids), np.int64)
        for n, key in enumerate(ids):
            r = row.get(key)
            if r is None:
                if max_ids and len(row) >= max_ids:
                    out[n] = FALLBACK_ROW
                    continue
                if sightings is not None and admit_after > 1:
                    if sightings.see(key) < admit_after:
                        out[n] = FALLBACK_ROW
                        continue
                    sightings.forget(key)
                r = self._admit(key)
            out[n] = r
        return out

    def new_ids(self, ids: Sequence[str]) -> int:
        """How many distinct ids of ``ids`` hold no row: the most a ``rows`` call with them can admit."""
        row = self._row
        return len({key for key in ids if key not in row})

    def _admit(self, key: str) -> int:
        if self._free:
            r = self._free.pop()
            self._ids[r] = key
        else:
            r = len(self._ids)
            self._ids.append(key)
            if r >= len(self._live):
                self._live = np.concatenate([self._live, np.zeros(len(self._live), bool)])
        self._live[r] = True
        self._row[key] = r
        self.version += 1
        return r

    def lookup(self, ids: Iterable[str]) -> Rows:
        """Rows of ``ids`` without admitting anyone: unknown ids get the fallback row."""
        return np.fromiter(map(self._row.get, ids, repeat(FALLBACK_ROW)), np.int64)  # map: no frame per id

    def get(self, key: str) -> int | None:
        return self._row.get(key)

    def ids(self, rows: Sequence[int] | Rows) -> list[str]:
        ids = self._ids
        return [ids[r] for r in rows]

    def release(self, rows: Sequence[int] | Rows) -> list[str]:
        """Frees ``rows`` (admitted ones); returns their ids."""
        out = []
        for r in rows:
            key = self._ids[r]
            if r == FALLBACK_ROW or key == NO_ID:
                raise ValueError(f"id map: row {r} holds no id and cannot be released")
            del self._row[key]
            self._ids[r] = NO_ID
            self._live[r] = False
            self._free.append(int(r))
            out.append(key)
        if out:
            self.version += 1
            self.releases += 1
        return out

    def live_mask(self) -> np.ndarray[Any, Any]:
        """(size,) True for rows that hold an id."""
        return self._live[: self.size].copy()

    def live_rows(self) -> Rows:
        """Rows that hold an id, ascending."""
        return np.flatnonzero(self._live[: self.size])

    def nbytes(self) -> int:
        """Approximate memory of the map: the dict, the row list, the free list and the id strings."""
        return (sys.getsizeof(self._row) + sys.getsizeof(self._ids) + sys.getsizeof(self._free) + self._live.nbytes
                + sum(sys.getsizeof(k) for k in self._row))

    def state(self) -> dict[str, Any]:
        return {"ids": list(self._ids), "free": list(self._free), "version": self.version}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> IdMap:
        m = cls()
        m._ids = list(state["ids"])
        m._free = list(state["free"])
        m.version = state["version"]
        m._row = {k: n for n, k in enumerate(m._ids) if k != NO_ID}
        m._live = np.zeros(max(1024, len(m._ids)), bool)
        m._live[np.fromiter(m._row.values(), np.int64, len(m._row))] = True
        if len(m._row) + len(m._free) + 1 != len(m._ids):
            raise ValueError("id map: state holds duplicate ids or inconsistent free rows")
        return m


def least_recently_used(last_used: np.ndarray[Any, Any], candidates: Rows, n: int) -> Rows:
    """The ``n`` rows of ``candidates`` (ascending) with the smallest ``last_used``, ascending; ties go to the lower
    row, so the choice depends only on the arrays (a replay or restore evicts the same rows). O(len(candidates)).

    >>> least_recently_used(np.array([0, 5, 3, 3, 9, 1]), np.array([1, 2, 3, 4, 5]), 3).tolist()
    [2, 3, 5]
    """
    if n >= len(candidates):
        return candidates
    if n <= 0:
        return candidates[:0]
    t = last_used[candidates]
    kth = np.partition(t, n - 1)[n - 1]
    below = candidates[t < kth]
    tied = candidates[t == kth][: n - len(below)]
    return np.sort(np.concatenate([below, tied]))
