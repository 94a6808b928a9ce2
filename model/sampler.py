"""Sampling rows in proportion to a per-row weight that changes as the stream goes (negatives for the implicit loss).

A Fenwick tree over the weights makes both a weight change and a draw cost O(log R), vectorised over the rows a
batch changed and over the draws: the weights (e.g. ``count ** 0.75``) are maintained incrementally, never
re-summed over the whole table per batch.

>>> s = WeightedSampler()
>>> s.resize(4)
>>> s.set(np.array([1, 3]), np.array([1.0, 3.0]))
>>> draws = s.sample(np.random.default_rng(0), 4000)
>>> sorted(set(draws.tolist())), abs(float(np.mean(draws == 3)) - 0.75) < 0.03
([1, 3], True)
"""
from __future__ import annotations

from typing import Any

import numpy as np

from model.arrays import Rows


class WeightedSampler:
    def __init__(self) -> None:
        self.weight = np.zeros(0)  # (C,) per row
        self.tree = np.zeros(1)  # (C + 1,) Fenwick tree over weight, 1-based

    def resize(self, rows: int) -> None:
        """Room for rows ``[0, rows)``; new rows weigh 0."""
        if rows <= len(self.weight):
            return
        cap = max(rows, 2 * len(self.weight), 1024)
        w = np.zeros(cap)
        w[: len(self.weight)] = self.weight
        self._build(w)

    def _build(self, w: np.ndarray[Any, Any]) -> None:
        prefix = np.concatenate([[0.0], np.cumsum(w)])
        idx = np.arange(1, len(w) + 1)
        self.weight = w
        self.tree = np.concatenate([[0.0], prefix[idx] - prefix[idx - (idx & -idx)]])

    def set(self, rows: Rows, values: np.ndarray[Any, Any]) -> None:
        """New weights for distinct ``rows``."""
        if not len(rows):
            return
        delta = values - self.weight[rows]
        self.weight[rows] = values
        n = len(self.weight)
        i = rows + 1
        while len(i):
            np.add.at(self.tree, i, delta)
            i = i + (i & -i)
            keep = i <= n
            i, delta = i[keep], delta[keep]

    @property
    def total(self) -> float:
        t, i = 0.0, len(self.weight)
        while i > 0:
            t += self.tree[i]
            i -= i & -i
        return max(t, 0.0)

    def probability(self, rows: Rows) -> np.ndarray[Any, Any]:
        total = self.total
        return self.weight[rows] / total if total > 0 else np.zeros(len(rows))

    def sample(self, rng: np.random.Generator, size: int) -> Rows:
        """``size`` rows drawn with replacement in proportion to their weight (none if all weights are 0)."""
        total = self.total
        if total <= 0 or size <= 0:
            return np.zeros(0, np.int64)
        out = self._descend(rng.random(size) * total)
        bad = self.weight[out] <= 0  # only when rounding pushed a draw past the last weighted row
        if bad.any():
            out[bad] = int(np.argmax(self.weight))
        return out

    def sample_uniform(self, rng: np.random.Generator, size: int, tries: int = 4) -> Rows:
        """``size`` rows drawn with replacement, each row of positive weight equally likely (none if there is none).

        Draws uniformly among all rows and redraws the ones that landed on a row of weight 0 (rejection keeps the
        draws uniform over the rows held); the few still on one after ``tries`` rounds are drawn from a list of the
        rows held. Cheaper than the tree of ``sample`` when most rows are held, as they are between expiries.

        >>> s = WeightedSampler()
        >>> s.resize(8)
        >>> s.set(np.array([2, 5]), np.array([1.0, 1.0]))
        >>> sorted(set(s.sample_uniform(np.random.default_rng(0), 100).tolist()))
        [2, 5]
        """
        n = len(self.weight)
        if size <= 0 or self.total <= 0:
            return np.zeros(0, np.int64)
        out = rng.integers(0, n, size)
        for _ in range(tries):
            bad = np.flatnonzero(self.weight[out] <= 0)
            if not len(bad):
                return out
            out[bad] = rng.integers(0, n, len(bad))
        bad = np.flatnonzero(self.weight[out] <= 0)
        if len(bad):
            held = np.flatnonzero(self.weight > 0)
            out[bad] = held[rng.integers(0, len(held), len(bad))]
        return out

    def _descend(self, u: np.ndarray[Any, Any]) -> Rows:
        tree, n = self.tree, len(self.weight)
        pos = np.zeros(len(u), np.int64)
        step = 1 << (n.bit_length() - 1)
        while step:
            nxt = pos + step
            ok = nxt <= n
            val = tree[np.minimum(nxt, n)]
            ok &= val <= u
            u = np.where(ok, u - val, u)
            pos = np.where(ok, nxt, pos)
            step >>= 1
        return np.minimum(pos, n - 1)  # pos is the 1-based index before the row drawn, i.e. its 0-based row

    def state(self) -> dict[str, np.ndarray[Any, Any]]:
        return {"weight": self.weight.copy(), "tree": self.tree.copy()}

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray[Any, Any]]) -> WeightedSampler:
        s = cls()
        s.weight, s.tree = state["weight"].copy(), state["tree"].copy()
        return s
