"""The item rows of the serving index: one contiguous float32 matrix with an id -> row map, so that a top-N is one
matrix-vector product and an ``argpartition``."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from flink_job.serving.answers import Scored


@dataclass
class ItemRows:
    """Item rows: vectors (C, D), biases, versions, steps and event counts (C,); ``live`` marks rows in use."""

    dim: int
    capacity: int = 0
    vectors: np.ndarray = field(init=False)
    norms: np.ndarray = field(init=False)
    bias: np.ndarray = field(init=False)
    version: np.ndarray = field(init=False)
    events: np.ndarray = field(init=False)
    live: np.ndarray = field(init=False)
    row_of: dict[str, int] = field(default_factory=dict)
    id_of: list[str | None] = field(default_factory=list)
    free: list[int] = field(default_factory=list)
    used: int = 0  # rows [0, used) have been handed out at least once
    limit: int = 2**62  # rows never grow beyond this (the index's item cap)
    order: OrderedDict[str, None] = field(default_factory=OrderedDict)  # least recently updated first

    def __post_init__(self) -> None:
        self.vectors = np.zeros((self.capacity, self.dim), np.float32)
        self.norms = np.zeros(self.capacity, np.float32)
        self.bias = np.zeros(self.capacity, np.float32)
        self.version = np.zeros(self.capacity, np.int64)
        self.events = np.zeros(self.capacity, np.int64)
        self.live = np.zeros(self.capacity, bool)

    def row(self, item: str) -> int:
        """The row of ``item``, allocating one (a freed row first, else a new one, doubling the arrays) if new."""
        if item in self.row_of:
            return self.row_of[item]
        if self.free:
            r = self.free.pop()
        else:
            if self.used == self.capacity:
                self._grow(min(max(2 * self.capacity, 64), self.limit))
            r = self.used
            self.used += 1
            self.id_of.append(None)
        self.row_of[item] = r
        self.id_of[r] = item
        return r

    def touch(self, item: str) -> None:
        self.order[item] = None
        self.order.move_to_end(item)

    def remove(self, item: str) -> None:
        r = self.row_of.pop(item)
        self.order.pop(item, None)
        self.id_of[r] = None
        self.live[r] = False
        self.vectors[r] = 0.0
        self.free.append(r)

    def _grow(self, cap: int) -> None:
        for name in ("vectors", "norms", "bias", "version", "events", "live"):
            old = getattr(self, name)
            new = np.zeros((cap, *old.shape[1:]), old.dtype)
            new[: len(old)] = old
            setattr(self, name, new)
        self.capacity = cap



def top(scores: np.ndarray, n: int, it: ItemRows) -> list[Scored]:
    """The ``n`` best finite scores (M,), best first."""
    k = min(n, int(np.isfinite(scores).sum()))
    if k == 0:
        return []
    best = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
    best = best[np.argsort(-scores[best], kind="stable")]
    best = best[np.isfinite(scores[best])][:k]
    return [Scored(str(it.id_of[r]), float(scores[r]), int(it.version[r])) for r in best]


def check_n(n: int) -> None:
    if not 1 <= n <= 10_000:
        raise ValueError(f"serving: n must be in 1..10000, got {n}")
