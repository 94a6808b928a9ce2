"""Negative sampling by popularity."""
from __future__ import annotations
import numpy as np
import pytest
from model.config import ModelConfig, ObjectiveConfig
from model.mf import OnlineBiasedMF


R = 4  # rating action code

V = 0  # view


def _learn(m: OnlineBiasedMF, users: list[str], items: list[str], action: int = R, value: float = 4.0,
           ts: list[int] | None = None):
    n = len(users)
    return m.learn_many(users, items, np.full(n, action), np.full(n, value), None,
                        None if ts is None else np.array(ts))


def test_popularity_negatives_follow_count_to_the_power() -> None:
    m = OnlineBiasedMF(ModelConfig(dim=4, objective=ObjectiveConfig(negatives="popularity", popularity_power=0.75)))
    _learn(m, ["u"] * 17, ["a"] * 16 + ["b"], action=V, value=1.0)  # a: 16 events, b: 1
    draws = m.items.ids(m.ranking.sampler.sample(np.random.default_rng(0), 20_000))
    share_a = draws.count("a") / len(draws)
    assert share_a == pytest.approx(16**0.75 / (16**0.75 + 1), abs=0.01)  # 0.889, not 16/17 = 0.941

