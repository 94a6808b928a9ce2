"""The evaluator under a flood of new ids: capped candidates and seen pairs, restored exactly."""
from __future__ import annotations
import numpy as np
from model.prequential import Prequential


def test_the_evaluator_caps_its_candidates_and_seen_pairs_and_restores_exactly() -> None:
    class Zero:
        def predict_ratings(self, users, items):  # type: ignore[no-untyped-def]
            return np.full(len(users), 3.0)

        def score_items(self, users, items):  # type: ignore[no-untyped-def]
            return np.zeros((len(users), len(items)))

    ev = Prequential(k=5, max_items=16, max_seen=24)
    copy = None
    for t in range(40):
        users = [f"u{t}-{k % 3}" for k in range(8)]
        items = [f"i{t}-{k}" for k in range(8)]
        for e in ([ev] if copy is None else [ev, copy]):
            e.evaluate(Zero(), users, items, np.full(8, np.nan), np.ones(8, bool))
        assert len(ev.candidates) <= 16 and len(ev._seen_log) // 2 <= 24 and len(ev._seen_users) <= 24
        if t == 19:
            copy = Prequential(k=5, max_items=16, max_seen=24)
            copy.load_state_dict(ev.state_dict())
    assert copy is not None and copy.summary() == ev.summary() and copy.state_dict() == ev.state_dict()
    assert ev.summary()["positives"] == 320  # every positive is still ranked
    assert "i39-7" in ev.candidates and "i0-0" not in ev.candidates  # the least recently met went

