"""The baselines that ``benchmarks.ml100k`` runs beside the project's model, as ``model.prequential.Scorer``s: River's
``reco.BiasedMF`` and popularity (the count of past interactions)."""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

Array = np.ndarray[Any, Any]

class _CandidateRows:
    """Rows of an append-only candidate list (``Prequential.candidates``), mapping only the ids added since the last
    call when the same list comes back longer."""

    def __init__(self, row_of: Callable[[str], int]) -> None:
        self._row_of = row_of
        self._seq: Sequence[str] | None = None
        self._rows = np.zeros(0, np.int64)

    def __call__(self, items: Sequence[str]) -> Array:
        done = len(self._rows) if items is self._seq and len(items) >= len(self._rows) else 0
        if done < len(items):
            new = np.fromiter((self._row_of(i) for i in items[done:]), np.int64, len(items) - done)
            self._rows = np.concatenate([self._rows[:done], new])
        self._seq = items
        return self._rows[: len(items)]


class RiverScorer:
    """River's ``reco.BiasedMF`` as a ``Scorer``: ratings through ``predict_one``, candidate scores vectorised over a
    copy of its item weights that is refreshed for every item it predicts or learns.

    Reads River's weights with ``.get`` so that scoring never creates an entry (and never draws from its random
    initialiser); ``predict_one`` on the event itself creates the user's and the item's weights, as River's own
    ``progressive_val_score`` does.
    """

    def __init__(self, model: Any) -> None:
        self.model = model
        self._row: dict[str, int] = {}
        self._q = np.zeros((64, model.n_factors))  # (cap, F) item latents
        self._b = np.zeros(64)  # (cap,) item biases
        self._candidates = _CandidateRows(self._sync)
        self.seconds = 0.0

    def _sync(self, item: str) -> int:
        r = self._row.get(item)
        if r is None:
            r = self._row[item] = len(self._row)
            if r == len(self._b):
                self._q = np.concatenate([self._q, np.zeros_like(self._q)])
                self._b = np.concatenate([self._b, np.zeros_like(self._b)])
        q = self.model.i_latents.get(item)
        if q is not None:
            self._q[r] = q
        self._b[r] = self.model.i_biases.get(item, 0.0)
        return r

    def predict_ratings(self, users: Sequence[str], items: Sequence[str]) -> Array:
        start = time.perf_counter()
        out = np.array([self.model.predict_one(u, i) for u, i in zip(users, items, strict=True)], np.float64)
        self.seconds += time.perf_counter() - start
        for i in items:
            self._sync(i)
        return out

    def score_items(self, users: Sequence[str], items: Sequence[str]) -> Array:
        rows = self._candidates(items)  # (I,)
        m = self.model
        zeros = np.zeros(m.n_factors)
        p = np.stack([m.u_latents.get(u, zeros) for u in users])  # (U, F)
        bu = np.array([m.u_biases.get(u, 0.0) for u in users])  # (U,)
        scores: Array = (m.global_mean.get() + bu)[:, None] + self._b[rows][None, :] + p @ self._q[rows].T  # (U, I)
        return scores

    def learn_one(self, user: str, item: str, rating: float) -> None:
        start = time.perf_counter()
        self.model.learn_one(user, item, rating)
        self.seconds += time.perf_counter() - start
        self._sync(item)


class Popularity:
    """Scores an item by its count of past interactions; no rating predictions."""

    def __init__(self) -> None:
        self._row: dict[str, int] = {}
        self._counts = np.zeros(1024, np.int64)
        self._candidates = _CandidateRows(self._row_of)
        self.seconds = 0.0

    def _row_of(self, item: str) -> int:
        r = self._row.get(item)
        if r is None:
            r = self._row[item] = len(self._row)
            if r == len(self._counts):
                self._counts = np.concatenate([self._counts, np.zeros_like(self._counts)])
        return r

    def predict_ratings(self, users: Sequence[str], items: Sequence[str]) -> Array:
        raise NotImplementedError("popularity predicts no ratings; evaluate it with NaN ratings")

    def score_items(self, users: Sequence[str], items: Sequence[str]) -> Array:
        rows = self._candidates(items)  # (I,) first: it may grow the counts
        counts = self._counts[rows].astype(np.float64)  # (I,)
        return np.broadcast_to(counts, (len(users), len(counts)))  # (U, I)

    def learn_many(self, items: Sequence[str]) -> None:
        start = time.perf_counter()
        rows = np.fromiter((self._row_of(i) for i in items), np.int64, len(items))  # (B,) first: may grow the counts
        np.add.at(self._counts, rows, 1)
        self.seconds += time.perf_counter() - start


def river_model(seed: int = 73) -> Any:
    """River's BiasedMF with the settings of its MovieLens tutorial (10 factors, SGD 0.025 on biases and 0.05 on
    latents, zero biases, latents from N(0, 0.1) with seed 73, no L2)."""
    from river import optim, reco

    return reco.BiasedMF(
        n_factors=10,
        bias_optimizer=optim.SGD(0.025),
        latent_optimizer=optim.SGD(0.05),
        weight_initializer=optim.initializers.Zeros(),
        latent_initializer=optim.initializers.Normal(mu=0.0, sigma=0.1, seed=seed),
        l2_bias=0.0,
        l2_latent=0.0,
    )
