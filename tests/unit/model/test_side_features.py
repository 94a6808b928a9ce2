"""Cold ids: an unknown user is ranked by popularity, as serving ranks it; a new item may start at its category's
mean row."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from model.config import ModelConfig, OptimizerConfig, SideConfig
from model.mf import OnlineBiasedMF

# A step too small to move a row visibly: what a row holds after its first batch is where it started.
STILL = OptimizerConfig(lr=1e-12)


def _model(**side: str) -> OnlineBiasedMF:
    return OnlineBiasedMF(ModelConfig(dim=4, seed=3, device="cpu", optimizer=STILL, side=SideConfig(**side)))


def _row(m: OnlineBiasedMF, kind: str, ids: list[str]) -> np.ndarray:
    table = m.item_table if kind == "item" else m.user_table
    rows = torch.from_numpy((m.items if kind == "item" else m.users).lookup(ids))
    return table.params[rows].numpy()


def _warm(m: OnlineBiasedMF) -> None:
    m.learn_many(["u1", "u2", "u3"], ["a1", "a2", "b1"], np.array([4, 4, 4]), np.array([5.0, 3.0, 1.0]),
                 categories=["A", "A", "B"])
    m.item_table.params[1:4] += torch.arange(18, dtype=torch.float32).reshape(3, 6)  # rows far apart


def test_a_new_item_starts_at_the_mean_row_of_its_category_else_of_all_items() -> None:
    m = _model(item_init="category")
    _warm(m)
    a1, a2, b1 = _row(m, "item", ["a1", "a2", "b1"])
    m.learn_many(["u1", "u2"], ["a3", "c1"], np.array([4, 4]), np.array([4.0, 4.0]), categories=["A", "C"])
    a3, c1 = _row(m, "item", ["a3", "c1"])
    np.testing.assert_allclose(a3, (a1 + a2) / 2, atol=1e-5)  # vector and both biases
    np.testing.assert_allclose(c1, (a1 + a2 + b1) / 3, atol=1e-5)  # category C has no trained item yet
    # the published row is that row: serving ranks a3 as the model does
    vec, bias, _ = m.vectors("item", m.items.lookup(["a3"]))
    np.testing.assert_allclose(vec[0], a3[:4], atol=1e-6)


def test_without_the_setting_a_new_item_starts_random_and_its_category_is_still_noted() -> None:
    m = _model()
    _warm(m)
    m.learn_many(["u1"], ["a3"], np.array([4]), np.array([4.0]), categories=["A"])
    a1, a2, a3 = _row(m, "item", ["a1", "a2", "a3"])
    assert not np.allclose(a3, (a1 + a2) / 2, atol=1e-3)
    assert m.side.item_category[m.items.lookup(["a3"])].tolist() == [m.side.vocab["A"]]


def test_a_user_without_a_row_is_ranked_by_the_items_event_counts_as_serving_ranks_it() -> None:
    m = _model()
    m.learn_many(["u1", "u2", "u2", "u3"], ["a", "b", "a", "a"], np.array([4] * 4), np.array([5.0, 4.0, 2.0, 3.0]))
    scores = m.score_items(["nobody", "u1"], ["b", "a", "never"])
    assert scores[0].tolist() == [1.0, 3.0, 0.0]  # events trained on: serving's answer for a user it does not know
    assert scores[1].tolist() != [1.0, 3.0, 0.0]  # a known user: its own row
    old = OnlineBiasedMF(ModelConfig(dim=4, seed=3, device="cpu", side=SideConfig(unknown_users="fallback_row")))
    old.learn_many(["u1", "u2", "u2", "u3"], ["a", "b", "a", "a"], np.array([4] * 4), np.array([5.0, 4.0, 2.0, 3.0]))
    fallback = old.score_items(["nobody"], ["b", "a"])[0]
    np.testing.assert_allclose(fallback, old.item_table.bias[old.items.lookup(["b", "a"])].numpy())  # c_i only


@pytest.mark.parametrize("portable", [False, True])
def test_categories_survive_a_state_round_trip(portable: bool) -> None:
    m = _model(item_init="category")
    _warm(m)
    again = (OnlineBiasedMF.from_file_bytes(m.file_bytes()) if portable
             else OnlineBiasedMF.from_bytes(m.state_bytes()))
    assert again.side.vocab == m.side.vocab
    n = m.items.size
    np.testing.assert_array_equal(again.side.item_category[:n], m.side.item_category[:n])
    assert (again.side.item_category[n:] == -1).all()


def test_an_evicted_item_row_forgets_its_category() -> None:
    from model.config import IdsConfig

    m = OnlineBiasedMF(ModelConfig(dim=4, seed=3, device="cpu", ids=IdsConfig(max_rows=2)))
    m.learn_many(["u1", "u1"], ["a1", "a2"], np.array([4, 4]), np.array([4.0, 4.0]), categories=["A", "A"])
    m.learn_many(["u1"], ["x"], np.array([4]), np.array([4.0]))  # no category: x's recycled row knows none
    assert m.side.item_category[m.items.lookup(["x"])].tolist() == [-1]
