"""The prequential evaluator's cold-start slices: positives of users and of items in their first five interactions."""
from __future__ import annotations

import numpy as np
import pytest

from model.prequential import Prequential


class ByName:
    """Scores a candidate by a fixed table (other ids 0): rankings known in advance."""

    def __init__(self, scores: dict[str, float]) -> None:
        self.scores = scores

    def predict_ratings(self, users: list[str], items: list[str]) -> np.ndarray:
        return np.full(len(users), 3.0)

    def score_items(self, users: list[str], items: list[str]) -> np.ndarray:
        return np.array([[self.scores.get(i, 0.0) for i in items] for _ in users])


def _events() -> list[tuple[str, str, bool]]:
    """A decoy seen first (not ranked), user a on seven new items, then seven new users on x0."""
    return [("z", "decoy", False)] + [("a", f"x{j}", True) for j in range(7)] + [(f"b{n}", "x0", True)
                                                                                 for n in range(7)]


@pytest.mark.parametrize("batch", [1, 4, 100])
def test_cold_slices_count_the_first_five_interactions_of_users_and_items(batch: int) -> None:
    # k=1; x0 outranks the decoy, which outranks every other item: a positive hits only on x0.
    scorer, ev, events = ByName({"x0": 20.0, "decoy": 10.0}), Prequential(k=1), _events()
    for s in range(0, len(events), batch):
        users, items, pos = zip(*events[s:s + batch], strict=True)
        ev.evaluate(scorer, list(users), list(items), np.full(len(users), np.nan), np.array(pos))
    got = ev.summary()
    assert (got["positives"], got["hr"]) == (14, 8 / 14)
    # users: a's first five (x0 hits, x1..x4 miss) and the seven new users (all on x0, all hit)
    assert (got["positives_cold_users"], got["hr_cold_users"]) == (12, 8 / 12)
    # items: a's seven first events of x0..x6 (x0 hits), then x0's 2nd to 5th events (hits)
    assert (got["positives_cold_items"], got["hr_cold_items"]) == (11, 5 / 11)


def test_the_cold_counts_survive_a_state_round_trip_and_an_old_state_counts_as_warm() -> None:
    scorer, events = ByName({"x0": 20.0, "decoy": 10.0}), _events()
    ev = Prequential(k=1)
    users, items, pos = zip(*events[:5], strict=True)
    ev.evaluate(scorer, list(users), list(items), np.full(5, np.nan), np.array(pos))
    state = ev.state_dict()
    again, old = Prequential(k=1), Prequential(k=1)
    again.load_state_dict(state)
    old.load_state_dict({**state, "version": 3, "cold": None})
    rest = list(zip(*events[5:], strict=True))
    for e in (ev, again, old):
        e.evaluate(scorer, list(rest[0]), list(rest[1]), np.full(len(rest[0]), np.nan), np.array(rest[2]))
    assert again.summary() == ev.summary()
    # before the slices, user a and x0..x3 count as past their first five: only the ids met afterwards are cold
    assert old.summary()["positives_cold_users"] == 7 and old.summary()["positives_cold_items"] == 3
