"""The in-step rating offsets: what the earlier ratings of a sub-step teach the closed-form biases and the mean."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from model import rating_offsets
from model.config import ModelConfig, ObjectiveConfig, OptimizerConfig
from model.mf import OnlineBiasedMF

R = 4  # rating action code


def test_exclusive_sums_match_a_loop_over_earlier_entries() -> None:
    rng = np.random.default_rng(1)
    keys, values = rng.integers(0, 5, 200), rng.normal(size=(200, 2))
    got = rating_offsets.exclusive_sums(torch.from_numpy(keys), torch.from_numpy(values)).numpy()
    want = np.array([values[:j][keys[:j] == keys[j]].sum(0) for j in range(200)])
    np.testing.assert_allclose(got, want, atol=1e-9)


def _model(**optimizer: float) -> OnlineBiasedMF:
    """Vectors of ~0 (they stay ~0: every gradient of a vector is a product with another): ratings teach the mean and
    the biases only, so the offsets can be checked against learning event by event."""
    return OnlineBiasedMF(ModelConfig(dim=2, init_std=1e-9, seed=0, objective=ObjectiveConfig(rating_implicit_weight=0),
                                      optimizer=OptimizerConfig(**optimizer)))  # type: ignore[arg-type]


def _scored(m: OnlineBiasedMF, users: list[str], items: list[str], ratings: np.ndarray) -> np.ndarray:
    """The rating each event is predicted when the batch is tested sub-step by sub-step."""
    pred = np.zeros(len(users))

    def evaluate(part: slice, offset: np.ndarray) -> None:
        pred[part] = m.predict_ratings(users[part], items[part]) + offset
    m.learn_many(users, items, np.full(len(users), R), ratings, evaluate=evaluate)
    return pred


def test_one_sub_step_predicts_the_biases_as_event_by_event_learning_does() -> None:
    # A user's ratings of fresh items, after a history that fixes the mean: in one sub-step, each event is predicted
    # with the user bias its earlier ratings give, as when every event is its own step (to the mean's small drift).
    rng = np.random.default_rng(2)
    history = ([f"h{k % 50}" for k in range(5000)], [f"hi{k % 70}" for k in range(5000)],
               rng.integers(1, 6, 5000).astype(np.float64))
    users, items = ["a"] * 40, [f"new{k}" for k in range(40)]
    ratings = np.clip(rng.normal(4.6, 0.5, 40), 1, 5)
    at_once, one_by_one = _model(sub_step_budget=0), _model(sub_batch=1, sub_step_budget=0)
    for m in (at_once, one_by_one):
        m.learn_many(*history[:2], np.full(5000, R), history[2])
    pred = _scored(at_once, users, items, ratings)
    want = _scored(one_by_one, users, items, ratings)
    assert want[-1] - want[0] > 0.5  # the user bias moved a lot within the batch...
    np.testing.assert_allclose(pred, want, atol=1e-2)  # ...and the one sub-step predicts it as it moved


def test_the_offsets_use_no_events_own_rating_nor_a_later_one() -> None:
    m = _model()
    users, items = ["a", "b", "a", "a"], ["x", "y", "y", "x"]
    u, i = m.admit(users, items, None)
    base = rating_offsets.in_step(m, u, i, np.array([5.0, 1.0, 5.0, 5.0]), np.ones(4, bool))
    changed = rating_offsets.in_step(m, u, i, np.array([5.0, 1.0, 1.0, 2.0]), np.ones(4, bool))
    assert base[0] == 0.0
    np.testing.assert_array_equal(base[:3], changed[:3])  # events 2 and 3's own ratings move nothing before them
    assert base[3] != changed[3]  # event 3 learns from event 2's rating (user a, item y)


def test_without_a_prior_only_the_mean_moves_and_non_ratings_teach_nothing() -> None:
    m = _model(rating_bias_prior=0.0)
    users, items = ["a", "a", "b"], ["x", "y", "x"]
    u, i = m.admit(users, items, None)
    got = rating_offsets.in_step(m, u, i, np.array([5.0, np.nan, 1.0]), np.array([True, True, False]))
    mid = m.global_mean
    assert got.tolist() == pytest.approx([0.0, 5.0 - mid, 5.0 - mid])


@pytest.mark.parametrize("window", [200.0, 4.0])
def test_a_rating_bias_is_the_shrunk_mean_of_its_residuals_after_one_step(window: float) -> None:
    m = _model(sub_step_budget=0, rating_bias_window=window)
    m.learn_many([f"h{k}" for k in range(100)], ["old"] * 100, np.full(100, R), np.full(100, 3.0))
    ratings = np.array([5.0, 4.0, 5.0, 5.0, 3.0, 4.0, 5.0, 4.0, 5.0, 5.0])
    m.learn_many(["a"] * 10, [f"new{k}" for k in range(10)], np.full(10, R), ratings)
    bias = float(m.user_table.rating_bias[m.users.get("a")])
    assert bias == pytest.approx(float((ratings - 3.0).sum()) / (5.0 + 10), rel=1e-4)  # a step counts all its ratings
    # and the count kept stops at the window, so that later steps follow the row's latest ratings
    assert float(m.user_table.acc[m.users.get("a"), 2]) == min(10.0, window)
