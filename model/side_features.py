"""Cold ids: a user the model holds no row for is ranked by popularity, and a new item may start from its
category's prototype.

A user not admitted yet (the fallback row) is ranked by the items' event counts (``model.side.unknown_users=
"popularity"``, the default): exactly the answer serving gives a user it has no record of
(``flink_job.serving.index``), so the evaluator measures what a new user is served, where the fallback row's
``c_i`` alone ranked them by the ranking biases, which are not popularity.

With ``model.side.item_init="category"`` a new item's whole row (vector, ranking bias, rating bias) starts as the
mean of the trained items of its category (``category`` of the event; for MovieLens its genres), or of all trained
items when its category has none yet, instead of a small random vector with zero biases. The row is a row like any
other, so the published rows and serving reproduce its scores with nothing more. Off by default: on ML-100K it
lowered HR@10 at batch 256 (BENCHMARKS.md, "Side features and cold start").

>>> import torch
>>> from model.tables import EmbeddingTable
>>> t = EmbeddingTable(2, 0.1, torch.device("cpu"), torch.Generator().manual_seed(0))
>>> t.ensure(4)
>>> t.params[1:3] = torch.tensor([[1.0, 0.0, 0.5, 0.2], [3.0, 2.0, 1.5, 0.4]]); t.events[1:3] = 1
>>> side = SideFeatures(SideConfig(item_init="category"))
>>> side.grow(4)
>>> side.admit_items(t, np.array([1, 2]), ["a", "a"])  # trained rows: only their category is noted
>>> side.admit_items(t, np.array([3]), ["a"])  # a fresh row of category a: the mean of rows 1 and 2
>>> [round(x, 3) for x in t.params[3].tolist()]
[2.0, 1.0, 1.0, 0.3]
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from model.arrays import Rows
from model.config import SideConfig
from model.idmap import FALLBACK_ROW
from model.tables import EmbeddingTable

NONE = -1  # no category known for the row


class SideFeatures:
    """Each item row's category and the initialisation of fresh rows; its state is the category of each row."""

    def __init__(self, config: SideConfig) -> None:
        self.config = config
        self.vocab: dict[str, int] = {}
        self.item_category = np.full(0, NONE, np.int64)  # (R,) category index of each item row

    def grow(self, item_rows: int) -> None:
        if item_rows > len(self.item_category):
            grown = np.full(item_rows - len(self.item_category), NONE, np.int64)
            self.item_category = np.concatenate([self.item_category, grown])

    def forget(self, rows: Rows) -> None:
        """Item ``rows`` were recycled: their next holders' categories are not known yet."""
        self.item_category[rows] = NONE

    def admit_items(self, table: EmbeddingTable, rows: Rows, categories: Sequence[str | None] | None) -> None:
        """Notes the category of each event's item row (B,), then starts the fresh ones from their category's
        prototype (``item_init="category"``)."""
        if categories is not None:
            cats = np.fromiter((self._index(c) for c in categories), np.int64, len(rows))  # (B,)
            known = cats != NONE
            self.item_category[rows[known]] = cats[known]
        if self.config.item_init != "category":
            return
        fresh = _fresh(table, rows)
        if len(fresh):
            table.params[torch.from_numpy(fresh).to(table.device)] = self._prototypes(table, fresh)

    def rank_unknown_users(self, scores: torch.Tensor, user_rows: torch.Tensor, item_rows: torch.Tensor,
                           table: EmbeddingTable) -> None:
        """Scores (U, I) of the users on the fallback row (U,) become the candidates' (I,) event counts, in place."""
        if self.config.unknown_users != "popularity":
            return
        unknown = user_rows == FALLBACK_ROW  # (U,)
        if bool(unknown.any()):
            scores[unknown] = table.events[item_rows].to(scores.dtype)[None, :]

    def _index(self, category: str | None) -> int:
        if not category:
            return NONE
        c = self.vocab.get(category)
        if c is None:
            c = self.vocab[category] = len(self.vocab)
        return c

    def _prototypes(self, table: EmbeddingTable, fresh: Rows) -> torch.Tensor:
        """(F, D + 2) the mean row of the trained items of each fresh row's category, else of all trained items."""
        n = table.rows
        trained = _trained(table)  # (R,)
        cats = torch.from_numpy(self.item_category[:n]).to(table.device)  # (R,)
        params = table.params[:n]  # (R, D + 2)
        overall = params[trained].mean(0) if bool(trained.any()) else torch.zeros_like(params[0])  # (D + 2,)
        want = torch.from_numpy(self.item_category[fresh]).to(table.device)  # (F,)
        k = len(self.vocab) + 1  # the last slot collects the rows without a category
        slot = torch.where(cats >= 0, cats, k - 1)[trained]  # (T,)
        sums = torch.zeros(k, params.shape[1], device=table.device).index_add_(0, slot, params[trained])  # (K, D+2)
        counts = torch.zeros(k, device=table.device).index_add_(0, slot, torch.ones(len(slot), device=table.device))
        use = (want >= 0) & (counts[want.clamp(min=0)] > 0)  # (F,)
        proto = sums[want.clamp(min=0)] / counts[want.clamp(min=0)].clamp(min=1)[:, None]  # (F, D + 2)
        return torch.where(use[:, None], proto, overall[None, :])

    def state(self, item_rows: int) -> dict[str, Any]:
        return {"vocab": list(self.vocab), "item_category": self.item_category[:item_rows].copy()}

    def load(self, state: dict[str, Any] | None, item_rows: int) -> None:
        """The saved categories (none: a model saved before side features, whose rows start with none known)."""
        self.vocab = {c: n for n, c in enumerate(state["vocab"])} if state else {}
        self.item_category = np.full(item_rows, NONE, np.int64)
        if state:
            saved = np.asarray(state["item_category"], np.int64)[:item_rows]
            self.item_category[: len(saved)] = saved


def _trained(table: EmbeddingTable) -> torch.Tensor:
    """(R,) the rows trained on at least one event, the fallback row excluded."""
    trained = table.events[: table.rows] > 0
    trained[FALLBACK_ROW] = False
    return trained


def _fresh(table: EmbeddingTable, rows: Rows) -> Rows:
    """The distinct rows among ``rows`` never trained or moved (just admitted), the fallback row excluded."""
    u: Rows = np.unique(np.asarray(rows, np.int64))
    u = u[u != FALLBACK_ROW]
    idx = torch.from_numpy(u).to(table.device)
    new: np.ndarray[Any, Any] = ((table.events[idx] == 0) & (table.updates[idx] == 0)).cpu().numpy()
    fresh: Rows = u[new]
    return fresh
