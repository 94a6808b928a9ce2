"""A user the model holds no row for is ranked by popularity: serving's answer for a user it does not know."""
from __future__ import annotations

import numpy as np
import torch

from model.config import ColdConfig, ModelConfig
from model.mf import OnlineBiasedMF

USERS, ITEMS = ["u1", "u2", "u2", "u3"], ["a", "b", "a", "a"]


def _model(unknown_users: str) -> OnlineBiasedMF:
    m = OnlineBiasedMF(ModelConfig(dim=4, seed=3, device="cpu", cold=ColdConfig(unknown_users=unknown_users)))
    m.learn_many(USERS, ITEMS, np.array([4] * 4), np.array([5.0, 4.0, 2.0, 3.0]))
    return m


def test_a_user_without_a_row_is_ranked_by_the_items_event_counts() -> None:
    m = _model("popularity")
    scores = m.score_items(["nobody", "u1"], ["b", "a", "never"])
    assert scores[0].tolist() == [1.0, 3.0, 0.0]  # events trained on, serving's score for a user it does not know
    assert scores[1].tolist() != [1.0, 3.0, 0.0]  # a known user: its own row


def test_the_fallback_row_setting_ranks_an_unknown_user_by_the_ranking_biases() -> None:
    m = _model("fallback_row")
    fallback = m.score_items(["nobody"], ["b", "a"])[0]
    rows = torch.from_numpy(m.items.lookup(["b", "a"]))
    np.testing.assert_allclose(fallback, m.extras.ranking_bias(rows).numpy())  # the popularity term included
