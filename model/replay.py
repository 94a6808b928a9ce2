"""A reservoir sample of past events (Algorithm R), replayed into later batches against forgetting.

Events are stored by table row together with the row's generation, so an event whose user or item row has since
been recycled for another id is recognised and not replayed.

>>> r = Reservoir(size=3)
>>> rng = np.random.default_rng(0)
>>> cols = {name: np.arange(10) for name in COLUMNS}
>>> r.add(rng, cols)
>>> r.seen, len(r), sorted(r.columns["user"].tolist()) != [0, 1, 2]
(10, 3, True)
"""
from __future__ import annotations

from typing import Any

import numpy as np

COLUMNS: dict[str, type] = {
    "user": np.int64, "item": np.int64, "user_gen": np.int64, "item_gen": np.int64,
    "action": np.int64, "value": np.float32, "weight": np.float32,
}


class Reservoir:
    def __init__(self, size: int) -> None:
        self.size = size
        self.seen = 0  # events offered so far
        self.columns: dict[str, np.ndarray[Any, Any]] = {name: np.zeros(size, dtype) for name, dtype in COLUMNS.items()}

    def __len__(self) -> int:
        return min(self.seen, self.size)

    def add(self, rng: np.random.Generator, events: dict[str, np.ndarray[Any, Any]]) -> None:
        """Offers a batch of events (each column (B,)); every event seen so far stays with equal probability."""
        n = len(events["user"])
        if not self.size or not n:
            return
        serial = np.arange(self.seen, self.seen + n)  # (B,) 0-based number of each event in the stream
        slot = np.where(serial < self.size, serial, rng.integers(0, serial + 1))  # (B,)
        src = np.flatnonzero(slot < self.size)
        # When two events of the batch draw the same slot, the later one wins, as one at a time.
        slot_last, first = np.unique(slot[src][::-1], return_index=True)
        src = src[::-1][first]
        for name, col in self.columns.items():
            col[slot_last] = events[name][src]
        self.seen += n

    def sample(self, rng: np.random.Generator, k: int) -> dict[str, np.ndarray[Any, Any]]:
        """``k`` stored events drawn uniformly with replacement (none while empty)."""
        filled = len(self)
        idx = rng.integers(0, filled, k) if filled and k > 0 else np.zeros(0, np.int64)
        return {name: col[idx] for name, col in self.columns.items()}

    def state(self) -> dict[str, object]:
        n = len(self)
        return {"seen": self.seen, "columns": {k: v[:n].copy() for k, v in self.columns.items()}}

    @classmethod
    def from_state(cls, size: int, state: dict[str, object]) -> Reservoir:
        """The reservoir under a (possibly new) size: kept events beyond it are dropped."""
        r = cls(size)
        columns = state["columns"]
        assert isinstance(columns, dict)
        seen = state["seen"]
        assert isinstance(seen, int)
        n = min(len(columns["user"]), size)
        for k, v in columns.items():
            r.columns[k][:n] = v[:n]
        r.seen = seen if n == min(seen, size) else n
        return r


def mix_in(reservoir: Reservoir, rng: np.random.Generator, real: dict[str, np.ndarray[Any, Any]], k: int,
           generations: tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]) -> tuple[dict[str, np.ndarray[Any, Any]], int]:
    """``real`` (a batch's columns) followed by ``k`` replayed events drawn from the reservoir, and how many were
    replayed: those whose rows were recycled since (their generation, ``generations`` of users and items, moved) are
    left out."""
    if not k or not len(reservoir):
        return real, 0
    past = reservoir.sample(rng, k)
    ok = (generations[0][past["user"]] == past["user_gen"]) & (generations[1][past["item"]] == past["item_gen"])
    return {name: np.concatenate([col, past[name][ok]]) for name, col in real.items()}, int(ok.sum())


def offer(reservoir: Reservoir, rng: np.random.Generator, real: dict[str, np.ndarray[Any, Any]],
          generations: tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]) -> None:
    """Offers a trained batch's events to the reservoir, with the generations of their rows."""
    if not reservoir.size:
        return
    reservoir.add(rng, {**real, "user_gen": generations[0][real["user"]], "item_gen": generations[1][real["item"]]})
