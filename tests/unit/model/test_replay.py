"""The replay reservoir."""
from __future__ import annotations
import numpy as np
import pytest


def test_reservoir_keeps_a_uniform_sample() -> None:
    from model.replay import COLUMNS, Reservoir

    rng = np.random.default_rng(0)
    hist = np.zeros(100)
    for _ in range(300):
        r = Reservoir(10)
        for s in range(0, 100, 7):
            idx = np.arange(s, min(s + 7, 100))
            r.add(rng, {name: idx for name in COLUMNS})
        hist[r.columns["user"]] += 1
    assert hist[:50].sum() == pytest.approx(hist[50:].sum(), rel=0.1)

