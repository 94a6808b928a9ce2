"""Cold-start slices of the prequential evaluation: HR@k of the positives whose user, or whose item, is in its first
``first`` interactions as the evaluator has seen them (``model.prequential``).

An event is cold for its item when fewer than ``first`` events of that item came before it (every user's, ranked or
not); cold for its user when fewer than ``first`` events of that (sampled) user came before it. Counts live beside
the evaluator's candidates and seen users and are forgotten with them, so an item evicted and met again is new again.

>>> cold = ColdStart(first=2)
>>> cold.grow_items(2); cold.add_user()
>>> cold.item_events(np.array([0, 1, 0])).tolist(), cold.item_events(np.array([0])).tolist()
([0, 0, 1], [2])
>>> [cold.user_event(0) for _ in range(3)]
[0, 1, 2]
>>> cold.ranked(user_prior=0, item_prior=5, hit=True); cold.ranked(user_prior=1, item_prior=1, hit=False)
>>> s = cold.summary(); s["hr_cold_users"], s["positives_cold_users"], s["hr_cold_items"], s["positives_cold_items"]
(0.5, 2, 0.0, 1)
"""
from __future__ import annotations

import math
from array import array
from typing import Any

import numpy as np
import numpy.typing as npt

FIRST = 5  # the cold-start slice: events in an id's first five interactions


class ColdStart:
    """Interaction counts per candidate item and per seen user, and the hits and positives of the cold slices."""

    def __init__(self, first: int = FIRST) -> None:
        if first <= 0:
            raise ValueError(f"prequential: the cold-start slice needs first > 0, got {first}")
        self.first = first
        self._items = np.zeros(0, np.int64)  # candidate index -> its events so far
        self._users = array("q")  # user number -> its events so far
        self.user_positives = self.user_hits = self.item_positives = self.item_hits = 0

    def grow_items(self, n: int) -> None:
        """Counts for candidates up to ``n`` (new ones have had no event)."""
        if n > len(self._items):
            self._items = np.concatenate([self._items, np.zeros(n - len(self._items), np.int64)])

    def add_user(self) -> None:
        self._users.append(0)

    def item_events(self, idx: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        """Counts a batch's events of candidates ``idx`` (B,), in order; returns how many came before each (B,)."""
        order = np.argsort(idx, kind="stable")  # (B,) events grouped by candidate, in batch order within each
        sorted_idx = idx[order]
        starts = np.flatnonzero(np.r_[True, sorted_idx[1:] != sorted_idx[:-1]])  # (G,)
        within = np.arange(len(idx)) - np.repeat(starts, np.diff(np.r_[starts, len(idx)]))  # (B,) earlier in batch
        prior = np.empty(len(idx), np.int64)
        prior[order] = self._items[sorted_idx] + within
        np.add.at(self._items, idx, 1)
        return prior

    def user_event(self, number: int) -> int:
        """Counts one event of user ``number``; returns how many came before it."""
        prior = self._users[number]
        self._users[number] = prior + 1
        return prior

    def ranked(self, user_prior: int, item_prior: int, hit: bool) -> None:
        """A positive was ranked: it counts in each slice it is cold for."""
        if user_prior < self.first:
            self.user_positives += 1
            self.user_hits += hit
        if item_prior < self.first:
            self.item_positives += 1
            self.item_hits += hit

    def compact(self, keep_items: npt.NDArray[np.bool_], keep_users: npt.NDArray[np.bool_]) -> None:
        """Forgets the counts of the candidates and users the evaluator forgot (masks over the old numbering)."""
        self._items = self._items[keep_items]
        self._users = array("q", np.asarray(self._users, np.int64)[keep_users].tobytes())

    def summary(self) -> dict[str, float]:
        return {
            "hr_cold_users": self.user_hits / self.user_positives if self.user_positives else math.nan,
            "positives_cold_users": self.user_positives,
            "hr_cold_items": self.item_hits / self.item_positives if self.item_positives else math.nan,
            "positives_cold_items": self.item_positives,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"first": self.first, "items": array("q", self._items.tobytes()), "users": self._users,
                "totals": (self.user_positives, self.user_hits, self.item_positives, self.item_hits)}

    def load_state_dict(self, state: dict[str, Any] | None, n_items: int, n_users: int) -> None:
        """The saved counts; without them (a state from before the slices) every id held counts as warm."""
        if state is None or state["first"] != self.first:
            self._items = np.full(n_items, self.first, np.int64)
            self._users = array("q", [self.first] * n_users)
            self.user_positives = self.user_hits = self.item_positives = self.item_hits = 0
            return
        self._items, self._users = np.array(np.frombuffer(array("q", state["items"]), np.int64)), array("q", state["users"])
        self.user_positives, self.user_hits, self.item_positives, self.item_hits = state["totals"]
