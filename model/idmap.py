"""A collisionless map from external ids (strings) to dense table rows, growing as new ids arrive.

>>> m = IdMap()
>>> m.rows(["a", "b", "a"]).tolist(), len(m)
([0, 1, 0], 2)
>>> m.ids([1, 0])
['b', 'a']
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from model.arrays import Rows


class IdMap:
    def __init__(self) -> None:
        self._row: dict[str, int] = {}
        self._ids: list[str] = []

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, key: str) -> bool:
        return key in self._row

    def rows(self, ids: Sequence[str]) -> Rows:
        """Rows of ``ids``, assigning the next free row to each id not seen before."""
        row = self._row
        out = np.empty(len(ids), np.int64)
        for n, key in enumerate(ids):
            r = row.get(key)
            if r is None:
                r = row[key] = len(self._ids)
                self._ids.append(key)
            out[n] = r
        return out

    def get(self, key: str) -> int | None:
        return self._row.get(key)

    def ids(self, rows: Sequence[int] | Rows) -> list[str]:
        ids = self._ids
        return [ids[r] for r in rows]

    def state(self) -> list[str]:
        return list(self._ids)

    @classmethod
    def from_state(cls, ids: list[str]) -> IdMap:
        m = cls()
        m._ids = list(ids)
        m._row = {k: n for n, k in enumerate(m._ids)}
        if len(m._row) != len(m._ids):
            raise ValueError("id map: state holds duplicate ids")
        return m
