"""Prequential (test-then-train) quality of a recommender on a stream of micro-batches, as docs/evaluation.md says.

Each batch is tested against the model as it is, before the model trains on it: one ``predict_ratings`` call for the
batch's rated events and one ``score_items`` call for the distinct (sampled) users with positives, over every item
seen so far. The candidate set and each user's seen set still advance event by event in batch order, so an item that
first appears later in the batch is no candidate for an earlier event, and an item the user met earlier in the same
batch is excluded. The rank of ``i`` counts the candidates other than ``i`` scoring ``>=`` it (ties count against the
model); HR@k is ``rank < k`` and NDCG@k is ``1 / log2(rank + 2)`` when ``rank < k``. Predicted ratings are clipped to
``[rating_min, rating_max]`` before the rating error is taken.

>>> import numpy as np
>>> class Fixed:
...     def predict_ratings(self, users, items):
...         return np.full(len(users), 4.0)
...     def score_items(self, users, items):
...         return np.array([[float(len(i)) for i in items] for _ in users])  # longer id, higher score
>>> ev = Prequential(k=1)
>>> batch = ev.evaluate(Fixed(), ["u", "u"], ["aa", "b"], np.array([5.0, 3.0]), np.array([True, False]))
>>> batch["positives"], batch["hits"], batch["rmse"]
(1, 1, 1.0)
>>> ev.summary()["hr"]
1.0
"""
from __future__ import annotations

import math
from array import array
import zlib
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from model.cold_start import ColdStart

STATE_VERSION = 4
EVICT_SHARE = 8  # over a cap, one compaction frees room for 1/8 of it (it rewrites every seen set: amortised)


class Scorer(Protocol):
    """What the evaluator needs from a model: rating predictions and scores of candidate items."""

    def predict_ratings(self, users: Sequence[str], items: Sequence[str]) -> npt.NDArray[Any]:
        """(B,) predicted rating of each ``(users[b], items[b])`` pair."""
        ...

    def score_items(self, users: Sequence[str], items: Sequence[str]) -> npt.NDArray[Any]:
        """(U, I) score of every item for every user; higher is ranked first."""
        ...


def in_sample(user: str, user_sample: float) -> bool:
    """Whether ``user`` is in the ranking sample: a stable hash (CRC-32 of its UTF-8 id), not Python's salted one.

    >>> in_sample("u1", 1.0), in_sample("u1", 0.5) == in_sample("u1", 0.5)
    (True, True)
    """
    return zlib.crc32(user.encode()) < user_sample * 2**32


class Prequential:
    """Running prequential RMSE, MAE, HR@k and NDCG@k; one ``evaluate`` call per micro-batch, before training on it.

    ``user_sample`` in (0, 1] ranks only the users whose stable hash falls in that share (and keeps seen sets only
    for them), so memory and time stay bounded on big streams; the rating error uses every rated event.

    Memory is capped whatever the stream: at most ``max_items`` candidates (the least recently met go first; one
    that comes back is a new candidate) and at most ``max_seen`` remembered (user, item) pairs and users (the users
    least recently evaluated go first, with their seen items). The job passes the model's row cap for both.

    The summary also has HR@k over the cold-start slices (``model.cold_start``): positives of users, and of items,
    in their first five interactions.
    """

    def __init__(self, k: int = 10, rating_min: float = 1.0, rating_max: float = 5.0, user_sample: float = 1.0,
                 max_items: int = 1 << 20, max_seen: int = 1 << 20) -> None:
        if k <= 0:
            raise ValueError(f"prequential: k must be positive, got {k}")
        if not rating_min < rating_max:
            raise ValueError(f"prequential: rating_min must be below rating_max, got {rating_min} and {rating_max}")
        if not 0.0 < user_sample <= 1.0:
            raise ValueError(f"prequential: user_sample must be in (0, 1], got {user_sample}")
        if max_items <= 0 or max_seen <= 0:
            raise ValueError(f"prequential: max_items and max_seen must be positive, got {max_items} and {max_seen}")
        self.max_items = max_items
        self.max_seen = max_seen
        self.k = k
        self.rating_min = rating_min
        self.rating_max = rating_max
        self.user_sample = user_sample
        self._items: list[str] = []  # candidates in order of first appearance
        self._item_index: dict[str, int] = {}  # item id -> index in _items
        self._item_last = array("q")  # index in _items -> position in the stream of its latest event
        # Sampled user -> (its number, indices of the items it interacted with). The state keeps the same as a log
        # of (user number, item index) pairs in the order first seen, which pickles as one buffer (the job writes its
        # state at every bundle) instead of a set per user.
        self._seen: dict[str, tuple[int, set[int]]] = {}
        self._seen_users: list[str] = []  # user number -> user
        self._seen_log = array("q")  # (user number, item index) pairs, flat
        self._user_last = array("q")  # user number -> position in the stream of its latest evaluated event
        self._sampled: dict[str, bool] = {}  # memo of in_sample, rebuilt on demand (not part of the state)
        self.events = 0
        self.rated = 0
        self.sq_err = 0.0
        self.abs_err = 0.0
        self.positives = 0  # positives of sampled users, all ranked
        self.hits = 0
        self.ndcg_sum = 0.0
        self.cold = ColdStart()

    @property
    def candidates(self) -> Sequence[str]:
        """Every item seen so far, in order of first appearance (do not mutate)."""
        return self._items

    def _is_sampled(self, user: str) -> bool:
        if self.user_sample >= 1.0:
            return True
        hit = self._sampled.get(user)
        if hit is None:
            hit = self._sampled[user] = in_sample(user, self.user_sample)
        return hit

    def evaluate(
        self, scorer: Scorer, users: Sequence[str], items: Sequence[str], ratings: npt.NDArray[Any],
        positive: npt.NDArray[Any], rating_offset: npt.NDArray[Any] | None = None,
    ) -> dict[str, float]:
        """Test one batch against ``scorer`` as it is; returns the batch's figures and adds them to the totals.

        ``ratings`` (B,) is NaN for events without a rating; ``positive`` (B,) marks the events to rank;
        ``rating_offset`` (B,), when given, is added to the predicted ratings before they are clipped (what the
        batch's earlier ratings teach the model's biases, ``model.rating_offsets``).
        """
        n = len(users)
        if not len(items) == len(ratings) == len(positive) == n:
            raise ValueError(
                f"prequential: users, items, ratings and positive must have one length, got "
                f"{n}, {len(items)}, {len(ratings)}, {len(positive)}"
            )
        ratings = np.asarray(ratings, np.float64)  # (B,)
        positive = np.asarray(positive, bool)  # (B,)
        rated = np.flatnonzero(np.isfinite(ratings))  # (R,)
        sq_err, abs_err = self._rating_error(scorer, users, items, ratings, rated,
                                             None if rating_offset is None else np.asarray(rating_offset)[rated])
        item_idx, avail, item_prior = self._add_candidates(items)
        sampled = [self._is_sampled(u) for u in users]
        ranked_users, scores = self._scores(scorer, users, positive, sampled)
        hits, ndcg, n_pos = self._rank_events(users, positive, sampled, (item_idx, avail, item_prior), ranked_users,
                                              scores)

        self.events += n
        self.rated += len(rated)
        self.sq_err += sq_err
        self.abs_err += abs_err
        self.positives += n_pos
        self.hits += hits
        self.ndcg_sum += ndcg
        self._bound()
        return with_rates({"events": n, "rated": len(rated), "sq_err": sq_err, "abs_err": abs_err, "positives": n_pos,
                           "hits": hits, "ndcg_sum": ndcg})

    def _rating_error(self, scorer: Scorer, users: Sequence[str], items: Sequence[str],
                      ratings: npt.NDArray[np.float64], rated: npt.NDArray[np.int64],
                      offset: npt.NDArray[Any] | None) -> tuple[float, float]:
        """Summed squared and absolute error of the rated events, one predict_ratings call for them."""
        if not len(rated):
            return 0.0, 0.0
        pred = np.asarray(scorer.predict_ratings([users[j] for j in rated], [items[j] for j in rated]), np.float64)
        if pred.shape != (len(rated),):
            raise ValueError(f"prequential: predict_ratings returned shape {pred.shape}, expected ({len(rated)},)")
        if offset is not None:
            pred = pred + offset
        err: npt.NDArray[np.float64] = ratings[rated] - np.clip(pred, self.rating_min, self.rating_max)  # (R,)
        return float(np.dot(err, err)), float(np.abs(err).sum())

    def _add_candidates(self, items: Sequence[str]
                        ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """Candidate growth: each event's candidate index (B,), the candidate count right after its item appeared
        (B,) and the item's events before it (B,)."""
        index, item_last = self._item_index, self._item_last
        n = len(items)
        item_idx = np.empty(n, np.int64)  # (B,)
        avail = np.empty(n, np.int64)  # (B,)
        for j, item in enumerate(items):
            c = index.get(item)
            if c is None:
                c = index[item] = len(self._items)
                self._items.append(item)
                item_last.append(0)
            item_last[c] = self.events + j
            item_idx[j] = c
            avail[j] = len(self._items)
        self.cold.grow_items(len(self._items))
        return item_idx, avail, self.cold.item_events(item_idx)

    def _scores(self, scorer: Scorer, users: Sequence[str], positive: npt.NDArray[np.bool_], sampled: list[bool]
                ) -> tuple[dict[str, int], npt.NDArray[Any]]:
        """One score_items call for the distinct sampled users with positives, over every candidate: their score
        rows and the scores (U, I)."""
        ranked_users: dict[str, int] = {}
        for j in np.flatnonzero(positive):
            if sampled[j]:
                ranked_users.setdefault(users[j], len(ranked_users))
        scores = np.zeros((0, 0))
        if ranked_users:
            scores = np.asarray(scorer.score_items(list(ranked_users), self._items))  # (U, I)
            if scores.shape != (len(ranked_users), len(self._items)):
                raise ValueError(
                    f"prequential: score_items returned shape {scores.shape}, "
                    f"expected ({len(ranked_users)}, {len(self._items)})"
                )
        return ranked_users, scores

    def _rank_events(
        self, users: Sequence[str], positive: npt.NDArray[np.bool_], sampled: list[bool],
        events: tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]],
        ranked_users: dict[str, int], scores: npt.NDArray[Any],
    ) -> tuple[int, float, int]:
        """Ranks event by event (hits, summed NDCG, positives ranked); seen sets advance in batch order.
        ``events``: each event's candidate index, candidate count and item's prior events (``_add_candidates``)."""
        item_idx, avail, item_prior = events
        hits = 0
        ndcg = 0.0
        n_pos = 0
        for j in range(len(users)):
            if not sampled[j]:
                continue
            user = users[j]
            entry = self._seen.get(user)
            if entry is None:
                entry = self._seen[user] = (len(self._seen_users), set())
                self._seen_users.append(user)
                self._user_last.append(0)
                self.cold.add_user()
            number, seen = entry
            self._user_last[number] = self.events + j
            user_prior = self.cold.user_event(number)
            i = int(item_idx[j])
            if positive[j]:
                rank = _rank(scores[ranked_users[users[j]], : avail[j]], i, seen)
                n_pos += 1
                self.cold.ranked(user_prior, int(item_prior[j]), rank < self.k)
                if rank < self.k:
                    hits += 1
                    ndcg += 1.0 / math.log2(rank + 2)
            if i not in seen:
                seen.add(i)
                self._seen_log.extend((number, i))
        return hits, ndcg, n_pos

    def _bound(self) -> None:
        """Keeps the candidates and the seen pairs and users within their caps (see the class docstring)."""
        if len(self._sampled) > self.max_seen:  # a memo, not state
            self._sampled = {}
        n_items, n_users, n_pairs = len(self._items), len(self._seen_users), len(self._seen_log) // 2
        if n_items <= self.max_items and max(n_users, n_pairs) <= self.max_seen:
            return
        log = np.frombuffer(self._seen_log, np.int64).reshape(-1, 2) if n_pairs else np.zeros((0, 2), np.int64)
        drop_items = np.zeros(n_items, bool)
        if n_items > self.max_items:
            target = self.max_items - self.max_items // EVICT_SHARE
            drop_items[_oldest(np.asarray(self._item_last, np.int64), n_items - target)] = True
        drop_users = np.zeros(n_users, bool)
        target = self.max_seen - self.max_seen // EVICT_SHARE
        if max(n_users, n_pairs) > self.max_seen:
            pairs = np.bincount(log[:, 0], minlength=n_users)  # (U,) seen items per user
            order = np.lexsort((np.arange(n_users), np.asarray(self._user_last, np.int64)))  # oldest first
            freed = np.cumsum(pairs[order])
            k_users = n_users - target if n_users > self.max_seen else 0
            k_pairs = int(np.searchsorted(freed, n_pairs - target)) + 1 if n_pairs > self.max_seen else 0
            k = max(k_users, k_pairs)
            drop_users[order[:k]] = True
        self._compact(log, drop_items, drop_users)

    def _compact(self, log: npt.NDArray[np.int64], drop_items: npt.NDArray[np.bool_],
                 drop_users: npt.NDArray[np.bool_]) -> None:
        """Forgets the candidates and users marked, renumbering the rest in their order."""
        keep = ~drop_users[log[:, 0]] & ~drop_items[log[:, 1]]
        item_map = np.cumsum(~drop_items) - 1  # old index -> new index of the items kept
        user_map = np.cumsum(~drop_users) - 1
        new_log = np.stack([user_map[log[keep, 0]], item_map[log[keep, 1]]], 1).astype(np.int64)
        self._items = [item for item, d in zip(self._items, drop_items.tolist(), strict=True) if not d]
        self._item_index = {item: c for c, item in enumerate(self._items)}
        self._item_last = array("q", np.asarray(self._item_last, np.int64)[~drop_items].tobytes())
        self._seen_users = [u for u, d in zip(self._seen_users, drop_users.tolist(), strict=True) if not d]
        self._user_last = array("q", np.asarray(self._user_last, np.int64)[~drop_users].tobytes())
        self._seen_log = array("q", new_log.tobytes())
        self._seen = _seen_sets(self._seen_users, self._seen_log)
        self.cold.compact(~drop_items, ~drop_users)

    def summary(self) -> dict[str, float]:
        """Running figures over every batch so far; a mean over no events is NaN."""
        return {
            "rmse": math.sqrt(self.sq_err / self.rated) if self.rated else math.nan,
            "mae": self.abs_err / self.rated if self.rated else math.nan,
            "hr": self.hits / self.positives if self.positives else math.nan,
            "ndcg": self.ndcg_sum / self.positives if self.positives else math.nan,
            "rated": self.rated,
            "positives": self.positives,
            "events": self.events,
            "candidates": len(self._items),
            **self.cold.summary(),
        }

    def state_dict(self) -> dict[str, Any]:
        """Plain Python and numpy, picklable; ``load_state_dict`` restores it exactly."""
        return {
            "version": STATE_VERSION,
            "k": self.k,
            "rating_min": self.rating_min,
            "rating_max": self.rating_max,
            "user_sample": self.user_sample,
            "items": list(self._items),
            "seen_users": list(self._seen_users),
            "seen_log": self._seen_log,
            "item_last": self._item_last,
            "user_last": self._user_last,
            "totals": {
                "events": self.events, "rated": self.rated, "sq_err": self.sq_err, "abs_err": self.abs_err,
                "positives": self.positives, "hits": self.hits, "ndcg_sum": self.ndcg_sum,
            },
            "cold": self.cold.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # 2: before the caps, without the recency arrays; 3: before the cold-start slices
        if state.get("version") not in (2, 3, STATE_VERSION):
            raise ValueError(f"prequential: state version {state.get('version')} is not {STATE_VERSION}")
        settings = (state["k"], state["rating_min"], state["rating_max"], state["user_sample"])
        if settings != (self.k, self.rating_min, self.rating_max, self.user_sample):
            raise ValueError(
                f"prequential: state has (k, rating_min, rating_max, user_sample) = {settings}, this evaluator "
                f"{(self.k, self.rating_min, self.rating_max, self.user_sample)}"
            )
        self._items = list(state["items"])
        self._item_index = {item: c for c, item in enumerate(self._items)}
        self._seen_users = list(state["seen_users"])
        self._seen_log = array("q", state["seen_log"])
        self._seen = _seen_sets(self._seen_users, self._seen_log)
        self._item_last = array("q", state.get("item_last", array("q", bytes(8 * len(self._items)))))
        self._user_last = array("q", state.get("user_last", array("q", bytes(8 * len(self._seen_users)))))
        self._sampled = {}
        t = state["totals"]
        self.events, self.rated, self.positives, self.hits = t["events"], t["rated"], t["positives"], t["hits"]
        self.sq_err, self.abs_err, self.ndcg_sum = t["sq_err"], t["abs_err"], t["ndcg_sum"]
        self.cold.load_state_dict(state.get("cold"), len(self._items), len(self._seen_users))


SUMS = ("events", "rated", "sq_err", "abs_err", "positives", "hits", "ndcg_sum")


def with_rates(sums: dict[str, float]) -> dict[str, float]:
    """The sums of ``evaluate`` with the figures they give: RMSE, MAE, HR and NDCG (NaN over no events)."""
    rated, n_pos = sums["rated"], sums["positives"]
    return {
        **sums,
        "rmse": math.sqrt(sums["sq_err"] / rated) if rated else math.nan,
        "mae": sums["abs_err"] / rated if rated else math.nan,
        "hr": sums["hits"] / n_pos if n_pos else math.nan,
        "ndcg": sums["ndcg_sum"] / n_pos if n_pos else math.nan,
    }


def combine(parts: Sequence[dict[str, float]]) -> dict[str, float]:
    """The figures of one batch evaluated in parts (the model's sub-steps), as if ``evaluate`` had seen it whole.

    >>> combine([{"events": 1, "rated": 1, "sq_err": 1.0, "abs_err": 1.0, "positives": 0, "hits": 0, "ndcg_sum": 0},
    ...          {"events": 1, "rated": 1, "sq_err": 3.0, "abs_err": 1.0, "positives": 0, "hits": 0, "ndcg_sum": 0}])["rmse"]
    1.4142135623730951
    """
    return with_rates({k: sum(p[k] for p in parts) for k in SUMS})


def _seen_sets(users: list[str], log: array[int]) -> dict[str, tuple[int, set[int]]]:
    """Each user's (number, seen item indices) from the flat (user number, item index) log."""
    sets: list[set[int]] = [set() for _ in users]
    for n in range(0, len(log), 2):
        sets[log[n]].add(log[n + 1])
    return {u: (n, sets[n]) for n, u in enumerate(users)}


def _oldest(last: npt.NDArray[np.int64], n: int) -> npt.NDArray[np.int64]:
    """Indices of the ``n`` smallest ``last`` values, ties to the lower index."""
    return np.asarray(np.lexsort((np.arange(len(last)), last))[:n], np.int64)


def _rank(row: npt.NDArray[Any], i: int, seen: set[int]) -> int:
    """Candidates other than ``i`` in ``row`` (the scores of the items appeared so far) that are not in ``seen``
    and score ``>=`` row[i]."""
    s = row[i]
    rank = int(np.count_nonzero(row >= s)) - 1  # i itself counts once (a NaN score ranks last: no candidate is >=)
    if math.isnan(s):
        return len(row) - 1 - len(seen - {i})
    if seen:  # every seen item appeared before this event, so its index is inside row
        idx = np.fromiter(seen, np.int64, len(seen))
        rank -= int(np.count_nonzero(row[idx[idx != i]] >= s))
    return rank
