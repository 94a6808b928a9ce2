"""Online biased matrix factorisation in micro-batches: ratings by squared error, implicit feedback by a ranking loss.

The ranking score of item ``i`` for user ``u`` is ``c_i + p_u . q_i`` (``c`` the ranking bias); a predicted rating
is ``mean + b_u + b_i + p_u . q_i``. Implicit events (and, weighted, ratings) train the ranking side with BPR or a
sampled softmax with log Q correction, against uniform, popularity (``count ** 0.75``) or in-batch negatives.
Gradients are written out by hand (``model.objectives``) and applied with row-wise Adagrad or Adam to the rows a
batch touched. Around that: id admission with a shared fallback row, expiry of idle ids with recycled rows, a
replay reservoir, a proximal pull toward published rows, and a guard that skips a batch with non-finite numbers.

>>> m = OnlineBiasedMF(ModelConfig(dim=8, seed=1))
>>> import numpy as np
>>> stats = m.learn_many(["u1", "u2"], ["i1", "i2"], np.array([4, 0]), np.array([5.0, 1.0]))
>>> stats.events, sorted(m.users.ids(stats.user_rows))
(2, ['u1', 'u2'])
>>> m.score_items(["u1", "nobody"], ["i1", "i2", "new"]).shape
(2, 3)
"""
from __future__ import annotations

import math
import pickle
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

from model import portable
from model.arrays import Array, Rows
from model.config import ModelConfig
from model.idmap import FALLBACK_ROW, IdMap, Sightings, least_recently_used
from model.objectives import bpr_grads, rating_grads, sampled_softmax_grads
from model.replay import Reservoir
from model.sampler import WeightedSampler
from model.tables import EmbeddingTable, Saved, Step

# The model takes action codes, not names; the one code that is an explicit rating comes from the caller's
# vocabulary (the job passes flink_job.schema.RATING_CODE). This default serves callers without one of their own.
RATING_CODE = 4
STATE_VERSION = 4


def pick_device(setting: str) -> torch.device:
    """``auto`` is CUDA when a GPU is visible, else the CPU; ``cuda`` without a GPU is a configuration error."""
    if setting == "cuda" and not torch.cuda.is_available():
        raise ValueError("model: device 'cuda' requested but no CUDA device is available")
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


@dataclass(frozen=True)
class BatchStats:
    events: int
    ratings: int
    implicit: int
    rating_loss: float  # mean squared error on the batch's ratings, before the update
    bpr_loss: float  # mean implicit loss (BPR or sampled softmax) of the batch, before the update
    user_rows: Rows  # (U,) rows moved (replayed events included)
    item_rows: Rows  # (I,) rows moved, negatives and replayed events included
    event_user_rows: Rows  # (B,) the row of each event's user (0: the fallback row of ids not admitted yet)
    event_item_rows: Rows  # (B,) the row of each event's item
    skipped: bool = False  # non-finite loss or gradient: nothing was trained, the touched rows were rolled back
    replayed: int = 0  # past events replayed into this batch


@dataclass
class _Batch:
    """One training batch on the device: real events first, then replayed ones."""

    u: torch.Tensor  # (E,) user rows
    i: torch.Tensor  # (E,) item rows
    rating_idx: torch.Tensor  # (R,) entries that are ratings
    ratings: torch.Tensor  # (R,)
    rating_w: torch.Tensor | None  # (R,) gradient weights of the ratings (None: all 1)
    implicit_idx: torch.Tensor  # (M,) entries that train the ranking side
    implicit_w: torch.Tensor  # (M,) their weights


class OnlineBiasedMF:
    def __init__(self, config: ModelConfig = ModelConfig(), rating_code: int = RATING_CODE) -> None:
        self.config = config
        self.rating_code = rating_code  # the action code whose events are ratings (the rating loss)
        cfg = config
        self.device = pick_device(cfg.device)
        torch.set_num_threads(cfg.threads)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.rng = np.random.default_rng(cfg.seed)
        self.users = IdMap()
        self.items = IdMap()
        self.user_sightings = Sightings(cfg.admit_capacity)
        self.item_sightings = Sightings(cfg.admit_capacity)
        anchored = cfg.proximal > 0
        rows = cfg.max_rows + 1  # the ids' rows and the fallback row
        self.user_table = EmbeddingTable(cfg.dim, cfg.init_std, self.device, self.generator, cfg.optimizer, anchored,
                                         rows)
        self.item_table = EmbeddingTable(cfg.dim, cfg.init_std, self.device, self.generator, cfg.optimizer, anchored,
                                         rows)
        # Ranking extras (see ModelConfig.history_size, popularity_weight): each user's last items (a ring of item
        # rows, FALLBACK_ROW when empty) and each item's log decayed event count, in units where an event at stream
        # position n weighs 2 ** (n / halflife); the common offset cancels out of every ranking.
        self.history = np.zeros((0, cfg.history_size), np.int64)  # (users, K)
        self.history_next = np.zeros(0, np.int64)  # (users,) events written to each ring
        self.pop_log = np.zeros(0, np.float64)  # (items,) -inf: no event yet
        # The history term of each user's ranking vector as of the user's last trained batch: what is published and
        # what score_items ranks by, so a server holding the published rows ranks exactly as the evaluator does.
        self.user_context = torch.zeros(0, cfg.dim if self._history_on() else 0, device=self.device)  # (users, D)
        self.events_counted = 0
        cap = cfg.cooccurrence_capacity if cfg.cooccurrence_weight and cfg.history_size else 0
        self.cooccurrence = np.zeros((cap, cap), np.float32)  # (C, C) events of both items in one user's window
        self._grow()
        for t in (self.user_table, self.item_table):
            t.params[FALLBACK_ROW] = 0.0  # an untrained fallback predicts the mean and scores 0
        self.sampler = WeightedSampler()
        self.reservoir = Reservoir(cfg.replay_size)
        self.rating_sum = 0.0
        self.rating_count = 0
        self.step = 0  # batches trained
        self.batches_seen = 0  # batches offered, skipped ones included
        self.skipped_batches = 0
        self.clock_ms = 0  # newest event time seen
        self.sweep_cursor = [1, 1]  # next row to check for expiry, users and items
        self.expired: tuple[list[str], list[str]] = ([], [])  # ids expired since the last drain_expired
        self.evicted: tuple[list[str], list[str]] = ([], [])  # ids evicted at the row cap since the last drain_evicted
        self.evictions = [0, 0]  # ids evicted at the row cap so far, users and items
        self._poison_next = False
        self._candidates: tuple[int, list[str], Rows] = (-1, [], np.zeros(0, np.int64))

    # ----------------------------------------------------------------------------------------------- training

    @property
    def global_mean(self) -> float:
        if self.rating_count == 0:
            return (self.config.rating_min + self.config.rating_max) / 2
        return self.rating_sum / self.rating_count

    def _grow(self) -> None:
        self.user_table.ensure(self.users.size)
        self.item_table.ensure(self.items.size)
        cap_u, cap_i = self.user_table.params.shape[0], self.item_table.params.shape[0]
        if len(self.history_next) < cap_u:
            grow = cap_u - len(self.history_next)
            self.history = np.concatenate([self.history, np.zeros((grow, self.config.history_size), np.int64)])
            self.history_next = np.concatenate([self.history_next, np.zeros(grow, np.int64)])
        if self.user_context.shape[1] and len(self.user_context) < cap_u:
            grown = torch.zeros(cap_u, self.config.dim, device=self.device)
            grown[: len(self.user_context)] = self.user_context
            self.user_context = grown
        if len(self.pop_log) < cap_i:
            self.pop_log = np.concatenate([self.pop_log, np.full(cap_i - len(self.pop_log), -np.inf)])

    def _history_on(self) -> bool:
        return bool(self.config.history_size and self.config.history_weight)

    def _history_mean(self, rows: torch.Tensor) -> torch.Tensor:
        """(N, D) the mean vector of the recent items of user ``rows`` (N,), from the item vectors as they are now (a
        feature: no gradient flows into those items through it); zero for a user without history."""
        hist = torch.from_numpy(self.history[rows.cpu().numpy()]).to(self.device)  # (N, K)
        own = (hist != FALLBACK_ROW).to(self.item_table.params.dtype)  # (N, K)
        total = (self.item_table.weight[hist] * own.unsqueeze(2)).sum(1)  # (N, D)
        return total / own.sum(1, keepdim=True).clamp(min=1.0)

    def _train_user_vectors(self, rows: torch.Tensor) -> torch.Tensor:
        """(N, D) the user vectors the ranking loss trains through: ``p_u`` plus ``history_weight`` times the mean of
        the recent item vectors as they are now."""
        p = self.user_table.weight[rows]
        if not self._history_on():
            return p
        return p + self.config.history_weight * self._history_mean(rows)

    def _user_vectors(self, rows: torch.Tensor) -> torch.Tensor:
        """(N, D) the published ranking vectors of user ``rows`` (N,): ``p_u`` plus ``history_weight`` times the
        history term stored at the user's last trained batch (``user_context``). A user row moves only in a batch
        with the user's events, and that batch refreshes the stored term, so this vector changes only when the row
        is touched, and a server with the latest published rows scores ``bias_i + u . q_i`` exactly as
        ``score_items`` does."""
        p = self.user_table.weight[rows]
        if not self._history_on():
            return p
        return p + self.config.history_weight * self.user_context[rows]

    def _refresh_context(self, event_u: Rows) -> None:
        """Stores the history term of the users of a trained batch (after their rings took the batch's items)."""
        if not self._history_on():
            return
        rows = np.unique(event_u)
        rows = rows[rows != FALLBACK_ROW]
        if len(rows):
            idx = torch.from_numpy(rows).to(self.device)
            self.user_context[idx] = self._history_mean(idx)

    def _ranking_bias(self, rows: torch.Tensor) -> torch.Tensor:
        """(N,) the published ranking bias of item ``rows``: ``c_i`` plus ``popularity_weight`` times the log of the
        item's decayed event count, in the stream's fixed frame (an event at position ``n`` weighs
        ``2 ** (n / halflife)``). In that frame an item's term changes only with its own events, so the published bias
        stays exact while other items are trained; rankings are the same as in a frame decayed to now, since the
        offset is common to all items. The frame grows by ``ln 2`` per half-life of events, so a float32 bias keeps a
        resolution of 1e-5 or better for the first ~100 half-lives (1e6 events at the default half-life of 10,000) and
        of 1e-3 after 10^4 half-lives; past that a stream needs a rebase of the frame (not done here)."""
        c = self.item_table.bias[rows]
        cfg = self.config
        if not cfg.popularity_weight:
            return c
        pop = self.pop_log[rows.cpu().numpy()]
        pop = np.where(np.isfinite(pop), pop, _POP_FLOOR)
        return (c.double() + cfg.popularity_weight * torch.from_numpy(pop).to(self.device)).to(c.dtype)

    def _remember(self, event_u: Rows, event_i: Rows) -> None:
        """Adds a trained batch to the users' recent items and the items' decayed counts, in event order."""
        cfg = self.config
        if cfg.history_size:
            co, cap = self.cooccurrence, self.cooccurrence.shape[0]
            for u, i in zip(event_u.tolist(), event_i.tolist(), strict=True):
                if u != FALLBACK_ROW and i != FALLBACK_ROW:
                    if i < cap:
                        past = self.history[u]
                        past = past[(past != FALLBACK_ROW) & (past < cap)]
                        co[i, past] += 1.0
                        co[past, i] += 1.0
                        co[i, i] += 1.0
                    self.history[u, self.history_next[u] % cfg.history_size] = i
                    self.history_next[u] += 1
        n = len(event_i)
        if cfg.popularity_weight and n:
            pos = (self.events_counted + 1 + np.arange(n)) / cfg.popularity_halflife * math.log(2.0)  # (B,)
            own = event_i != FALLBACK_ROW
            np.logaddexp.at(self.pop_log, event_i[own], pos[own])
        self.events_counted += n

    def learn_many(
        self, users: Sequence[str], items: Sequence[str], actions: Array, values: Array,
        weights: Array | None = None, ts: Array | None = None,
    ) -> BatchStats:
        """One update on a micro-batch. ``actions`` are codes (4 = rating); ``weights`` scale implicit events;
        ``ts`` (B,) event times in ms drive expiry (without them nothing ages)."""
        return self._learn(users, items, actions, values, weights, ts, count=True)

    def _learn(
        self, users: Sequence[str], items: Sequence[str], actions: Array, values: Array,
        weights: Array | None, ts: Array | None, count: bool,
    ) -> BatchStats:
        cfg = self.config
        n = len(users)
        times = None if ts is None or not n else np.asarray(ts, np.int64)  # (B,)
        if times is not None:
            self.clock_ms = max(self.clock_ms, int(times.max()))
        self._make_room(0, users)
        self._make_room(1, items)
        event_u = self.users.rows(users, self.user_sightings, cfg.admit_after, cfg.max_rows)  # (B,)
        event_i = self.items.rows(items, self.item_sightings, cfg.admit_after, cfg.max_rows)  # (B,)
        self._grow()
        self.sampler.resize(self.items.size)
        self._admit_to_sampler(event_i)
        self._mark_seen(self.user_table, event_u, times)
        self._mark_seen(self.item_table, event_i, times)
        self.user_table.last_used[event_u] = self.batches_seen + 1  # the fallback row too: it is never evicted
        self.item_table.last_used[event_i] = self.batches_seen + 1
        act = np.asarray(actions, np.int64)
        val = np.asarray(values, np.float32)
        w = np.ones(n, np.float32) if weights is None else np.asarray(weights, np.float32)
        real: dict[str, np.ndarray[Any, Any]] = {"user": event_u, "item": event_i, "action": act, "value": val, "weight": w}
        train, replayed = self._with_replay(real)
        batch = self._to_device(train, n)
        self.batches_seen += 1
        poison = self._poison_next or (cfg.inject_nan_every > 0 and self.batches_seen % cfg.inject_nan_every == 0)
        self._poison_next = False

        how = Step(self._lr(), cfg.optimizer, cfg.l2, cfg.clip_norm, cfg.proximal, cfg.adam_beta1, cfg.adam_beta2,
                   group_lr=(1.0, cfg.rank_bias_lr, cfg.rating_bias_lr))
        saved_u: list[Saved] = []
        saved_i: list[Saved] = []
        user_rows: list[torch.Tensor] = []
        item_rows: list[torch.Tensor] = []
        losses = (0.0, 0.0)
        for k in range(cfg.inner_steps):
            done = self._pass(batch, how, poison, saved_u, saved_i)
            if done is None:
                self.user_table.restore(saved_u)
                self.item_table.restore(saved_i)
                self.skipped_batches += 1
                empty = np.zeros(0, np.int64)
                return BatchStats(n, int((act == self.rating_code).sum()), int((act != self.rating_code).sum()),
                                  float("nan"), float("nan"), empty, empty, event_u, event_i, True, replayed)
            if k == 0:
                losses = done[0], done[1]
            user_rows.append(done[2])
            item_rows.append(done[3])

        is_rating = act == self.rating_code
        if count:
            self.rating_sum += float(val[is_rating].sum())
            self.rating_count += int(is_rating.sum())
            self.user_table.count_events(torch.from_numpy(event_u).to(self.device))
            self.item_table.count_events(torch.from_numpy(event_i).to(self.device))
            self._remember(event_u, event_i)
            self._refresh_context(event_u)
            self._offer_to_reservoir(real)
        self._update_sampler(event_i)
        self.step += 1
        self._expire()
        return BatchStats(
            n, int(is_rating.sum()), int((~is_rating).sum()), losses[0], losses[1],
            _distinct(user_rows), _distinct(item_rows), event_u, event_i, False, replayed,
        )

    def _lr(self) -> float:
        cfg = self.config
        s, warm = self.step + 1, cfg.warmup_steps
        if cfg.lr_schedule == "warmup_constant":
            return cfg.lr * min(1.0, s / warm)
        if cfg.lr_schedule == "warmup_rsqrt":
            return cfg.lr * min(s / warm, math.sqrt(warm / s))
        return cfg.lr

    def _pass(
        self, b: _Batch, how: Step, poison: bool, saved_u: list[Saved], saved_i: list[Saved],
    ) -> tuple[float, float, torch.Tensor, torch.Tensor] | None:
        """One optimisation pass over the batch; None (and nothing changed) if a number was not finite."""
        cfg = self.config
        ut, it = self.user_table, self.item_table
        gu: list[tuple[torch.Tensor, torch.Tensor]] = []  # (rows (E,), gradients (E, D + 2))
        gi: list[tuple[torch.Tensor, torch.Tensor]] = []
        rating_loss = implicit_loss = 0.0

        if len(b.rating_idx):
            ru, ri = b.u[b.rating_idx], b.i[b.rating_idx]  # (R,)
            rating_loss, g_u, g_i = rating_grads(
                self.global_mean, ut.rating_bias[ru], it.rating_bias[ri], ut.weight[ru], it.weight[ri], b.ratings,
                b.rating_w,
            )
            gu.append((ru, g_u))
            gi.append((ri, g_i))

        if len(b.implicit_idx):
            if cfg.implicit_loss == "bpr":
                implicit_loss = self._bpr(b, gu, gi)
            else:
                implicit_loss = self._softmax(b, gu, gi)

        if poison:
            rating_loss = implicit_loss = float("nan")
        # A non-finite gradient under a finite loss shows in the rows it moved, checked after the step below (and
        # rolled back like this): checking every gradient tensor first cost 10% of the step.
        if not (math.isfinite(rating_loss) and math.isfinite(implicit_loss)):
            return None
        rows_u = rows_i = torch.zeros(0, dtype=torch.int64, device=self.device)
        if gu:
            rows_u = ut.step(torch.cat([r for r, _ in gu]), torch.cat([g for _, g in gu]), how, saved_u)
        if gi:
            rows_i = it.step(torch.cat([r for r, _ in gi]), torch.cat([g for _, g in gi]), how, saved_i)
        if not (ut.finite(rows_u) and it.finite(rows_i)):
            return None
        return rating_loss, implicit_loss, rows_u, rows_i

    def _bpr(self, b: _Batch, gu: list[tuple[torch.Tensor, torch.Tensor]],
             gi: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        k = self.config.implicit_negatives
        it = self.item_table
        u, i = b.u[b.implicit_idx], b.i[b.implicit_idx]  # (M,)
        m = len(i)
        bj = self._negatives(i, m * k)  # (M * k,) negative n of event e at n * M + e
        if len(bj) != m * k:
            return 0.0
        w = b.implicit_w * (bj.view(k, m) != i)  # (k, M) a negative that is the positive drops out
        loss, g_u, g_i, g_j = bpr_grads(self._train_user_vectors(u), it.weight[i], it.bias[i],
                                        it.weight[bj].view(k, m, -1), it.bias[bj].view(k, m), w / k)
        gu.append((u, g_u))
        gi.extend([(i, g_i), (bj, g_j)])
        return loss

    def _softmax(self, b: _Batch, gu: list[tuple[torch.Tensor, torch.Tensor]],
                 gi: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        cfg = self.config
        it = self.item_table
        bu, bi = b.u[b.implicit_idx], b.i[b.implicit_idx]  # (M,)
        m = len(bi)
        if cfg.negatives == "in_batch":
            neg = bi if m <= cfg.shared_negatives else self._negatives(bi, cfg.shared_negatives)  # (K,)
            # The negatives are the batch's own items, so an item is drawn in proportion to its count in the batch.
            uniq, inv, counts = torch.unique(bi, return_inverse=True, return_counts=True)  # sorted (Q,)
            logq = torch.log(counts.to(torch.float32) / m)  # (Q,)
            logq_pos, logq_neg = logq[inv], logq[torch.searchsorted(uniq, neg)]  # (M,), (K,)
        else:
            neg = self._negatives(bi, cfg.shared_negatives)
            if not len(neg):
                return 0.0
            if cfg.negatives == "popularity":
                floor = 1.0 / max(self.sampler.total, 1e-12)  # an item not counted yet weighs as one event
                logq_pos = torch.from_numpy(np.log(np.maximum(
                    self.sampler.probability(bi.cpu().numpy()), floor))).to(self.device, torch.float32)
                logq_neg = torch.from_numpy(np.log(self.sampler.probability(neg.cpu().numpy()))).to(
                    self.device, torch.float32)
            else:  # uniform: the same log Q for every item cancels out
                logq_pos = torch.zeros(m, device=self.device)
                logq_neg = torch.zeros(len(neg), device=self.device)
        collide = bi.unsqueeze(1) == neg.unsqueeze(0)  # (M, K)
        loss, g_u, g_pos, g_neg = sampled_softmax_grads(
            self._train_user_vectors(bu), it.weight[bi], it.bias[bi], logq_pos, it.weight[neg], it.bias[neg], logq_neg,
            collide, b.implicit_w,
        )
        gu.append((bu, g_u))
        gi.extend([(bi, g_pos), (neg, g_neg)])
        return loss

    def _negatives(self, positives: torch.Tensor, size: int) -> torch.Tensor:
        """``size`` negative item rows: from the batch's positives (in_batch), uniform over the items held, or in
        proportion to the weighted sampler's weights."""
        cfg = self.config
        if cfg.negatives == "in_batch":
            pick = torch.from_numpy(self.rng.integers(0, len(positives), size)).to(self.device)
            return positives[pick]
        if cfg.negatives == "uniform":
            return torch.from_numpy(self.sampler.sample_uniform(self.rng, size)).to(self.device)
        return torch.from_numpy(self.sampler.sample(self.rng, size)).to(self.device)

    def _to_device(self, train: dict[str, np.ndarray[Any, Any]], n_real: int) -> _Batch:
        """The batch on the device; entries from ``n_real`` on are replayed and weigh ``replay_weight``."""
        cfg = self.config
        act, val, w = train["action"], train["value"], train["weight"]
        is_rating = act == self.rating_code
        rating_idx = np.flatnonzero(is_rating)
        implicit_w = np.where(is_rating, 0.0, w).astype(np.float32)
        if cfg.rating_implicit_weight > 0:
            implicit_w[is_rating & (val >= cfg.rating_implicit_min)] = cfg.rating_implicit_weight
        rating_w = None
        if cfg.replay_weight != 1.0 and len(act) > n_real:
            implicit_w[n_real:] *= cfg.replay_weight
            entry_w = np.ones(len(act), np.float32)
            entry_w[n_real:] = cfg.replay_weight
            rating_w = torch.from_numpy(entry_w[rating_idx]).to(self.device)
        implicit_idx = np.flatnonzero(implicit_w > 0)
        dev = self.device
        return _Batch(
            torch.from_numpy(train["user"]).to(dev), torch.from_numpy(train["item"]).to(dev),
            torch.from_numpy(rating_idx).to(dev), torch.from_numpy(val[rating_idx]).to(dev), rating_w,
            torch.from_numpy(implicit_idx).to(dev), torch.from_numpy(implicit_w[implicit_idx]).to(dev),
        )

    # ---------------------------------------------------------------------- replay, sampler, expiry bookkeeping

    def _with_replay(self, real: dict[str, np.ndarray[Any, Any]]) -> tuple[dict[str, np.ndarray[Any, Any]], int]:
        cfg = self.config
        k = int(round(cfg.replay_ratio * len(real["user"])))
        if not k or not len(self.reservoir):
            return real, 0
        past = self.reservoir.sample(self.rng, k)
        ok = ((self.user_table.generation[past["user"]] == past["user_gen"])
              & (self.item_table.generation[past["item"]] == past["item_gen"]))  # rows not recycled since
        return {name: np.concatenate([col, past[name][ok]]) for name, col in real.items()}, int(ok.sum())

    def _offer_to_reservoir(self, real: dict[str, np.ndarray[Any, Any]]) -> None:
        if not self.reservoir.size:
            return
        self.reservoir.add(self.rng, {
            **real, "user_gen": self.user_table.generation[real["user"]],
            "item_gen": self.item_table.generation[real["item"]],
        })

    def _sampler_weights(self, rows: Rows) -> np.ndarray[Any, Any]:
        if self.config.negatives == "popularity":
            counts = self.item_table.events[torch.from_numpy(rows).to(self.device)].cpu().numpy()
            return np.power(counts.astype(np.float64), self.config.popularity_power)
        return np.ones(len(rows))

    def _admit_to_sampler(self, event_i: Rows) -> None:
        """Items new to the sampler weigh as one event, so they can be negatives already in their first batch."""
        if self.config.negatives == "in_batch":
            return
        rows = np.unique(event_i)
        rows = rows[(rows != FALLBACK_ROW) & (self.sampler.weight[rows] == 0)]
        self.sampler.set(rows, np.ones(len(rows)))

    def _update_sampler(self, event_i: Rows) -> None:
        if self.config.negatives == "in_batch":
            return
        rows = np.unique(event_i)
        rows = rows[rows != FALLBACK_ROW]
        self.sampler.set(rows, self._sampler_weights(rows))

    def _rebuild_sampler(self) -> None:
        self.sampler = WeightedSampler()
        self.sampler.resize(self.items.size)
        if self.config.negatives != "in_batch":
            live = np.flatnonzero(self.items.live_mask())
            self.sampler.set(live, self._sampler_weights(live))

    @staticmethod
    def _mark_seen(table: EmbeddingTable, rows: Rows, times: np.ndarray[Any, Any] | None) -> None:
        own = rows != FALLBACK_ROW
        r = rows[own]
        if times is None:
            table.last_seen[r] = np.minimum(table.last_seen[r], 0)  # seen, but without a clock nothing ages
            return
        table.last_seen[r] = np.iinfo(np.int64).min
        np.maximum.at(table.last_seen, r, times[own])

    def _expire(self) -> None:
        """Checks the next ``sweep_rows`` rows of each table for ids idle longer than ``ttl_ms`` (event time)."""
        cfg = self.config
        if not cfg.ttl_ms:
            return
        cutoff = self.clock_ms - cfg.ttl_ms
        for k, (idmap, table) in enumerate(((self.users, self.user_table), (self.items, self.item_table))):
            span = idmap.size - 1
            if span <= 0:
                continue
            n = min(cfg.sweep_rows, span)
            rows = 1 + (self.sweep_cursor[k] - 1 + np.arange(n)) % span  # (n,) wraps past the last row
            self.sweep_cursor[k] = int(1 + (self.sweep_cursor[k] - 1 + n) % span)
            old = rows[table.last_seen[rows] < cutoff]
            if len(old):
                self.expired[k].extend(self._release(k, old))

    def _make_room(self, kind: int, ids: Sequence[str]) -> None:
        """Evicts the least recently used ids of table ``kind`` (0 users, 1 items) when the batch's new ids would
        take it past ``max_rows``; the ids of the batch itself stay. One scan frees room for at least 1/64 of the
        cap, so a flood of new ids costs a table scan per cap/64 new ids, not per batch."""
        cap = self.config.max_rows
        idmap, table = (self.users, self.user_table) if kind == 0 else (self.items, self.item_table)
        if len(idmap) + len(ids) <= cap:  # room for every id of the batch: the usual case, no look-ups
            return
        over = len(idmap) + idmap.new_ids(ids) - cap
        if over <= 0:
            return
        mask = idmap.live_mask()
        mask[idmap.lookup(ids)] = False  # the batch's own ids are in use (the fallback row is never live)
        rows = least_recently_used(table.last_used, np.flatnonzero(mask), max(over, cap // EVICT_SHARE))
        self.evicted[kind].extend(self._release(kind, rows))
        self.evictions[kind] += len(rows)

    def _release(self, kind: int, rows: Rows) -> list[str]:
        """Frees ``rows`` of table ``kind`` for new holders; returns the ids that held them."""
        idmap, table = (self.users, self.user_table) if kind == 0 else (self.items, self.item_table)
        ids = idmap.release(rows)
        table.reset(rows)
        self._forget(kind, rows)
        if kind == 1:
            self.sampler.set(rows, np.zeros(len(rows)))
        return ids

    def _forget(self, kind: int, rows: Rows) -> None:
        """Clears the ranking extras of recycled rows: users (kind 0) lose their recent items, items (kind 1) their
        decayed count and co-occurrences (references to them in users' recent items stay until overwritten)."""
        if kind == 0:
            self.history[rows] = FALLBACK_ROW
            self.history_next[rows] = 0
            if self.user_context.shape[1]:
                self.user_context[torch.from_numpy(rows).to(self.device)] = 0.0
            return
        self.pop_log[rows] = -np.inf
        inside = rows[rows < self.cooccurrence.shape[0]]
        self.cooccurrence[inside] = 0.0
        self.cooccurrence[:, inside] = 0.0

    def drain_expired(self) -> tuple[list[str], list[str]]:
        """``(user ids, item ids)`` expired since the last call (e.g. to publish tombstones)."""
        out = self.expired
        self.expired = ([], [])
        return out

    def drain_evicted(self) -> tuple[list[str], list[str]]:
        """``(user ids, item ids)`` evicted at the row cap since the last call (e.g. to publish tombstones)."""
        out = self.evicted
        self.evicted = ([], [])
        return out

    def poison_next_batch(self) -> None:
        """Test hook: the next batch gets a NaN loss, so it is skipped and rolled back."""
        self._poison_next = True

    def mark_published(self, kind: str, rows: Rows) -> None:
        """The job published ``rows``: their current parameters become the proximal anchor."""
        self._table(kind).mark_published(torch.from_numpy(np.asarray(rows, np.int64)).to(self.device))

    # ---------------------------------------------------------------------------------------------- warm start

    def pretrain(
        self, users: Sequence[str], items: Sequence[str], actions: Array, values: Array,
        weights: Array | None = None, ts: Array | None = None, epochs: int = 1, batch_size: int = 1024,
    ) -> int:
        """Trains on a historical log in its order, ``epochs`` times, in batches; the stream then continues on the
        same state. Each event counts once in the per-id event counters. Returns the batches trained."""
        if epochs <= 0 or batch_size <= 0:
            raise ValueError(f"model: pretrain needs epochs and batch_size > 0, got {epochs} and {batch_size}")
        n = len(users)
        act, val = np.asarray(actions, np.int64), np.asarray(values, np.float32)
        w = None if weights is None else np.asarray(weights, np.float32)
        t = None if ts is None else np.asarray(ts, np.int64)
        trained = 0
        for epoch in range(epochs):
            for s in range(0, n, batch_size):
                e = min(s + batch_size, n)
                stats = self._learn(users[s:e], items[s:e], act[s:e], val[s:e], None if w is None else w[s:e],
                                    None if t is None else t[s:e], count=epoch == 0)
                trained += not stats.skipped
        return trained

    # --------------------------------------------------------------------------------------------- inference

    def predict_ratings(self, users: Sequence[str], items: Sequence[str]) -> Array:
        """(B,) rating predictions clipped to the rating range; ids not admitted use the fallback rows."""
        u = torch.from_numpy(self.users.lookup(users)).to(self.device)
        i = torch.from_numpy(self.items.lookup(items)).to(self.device)
        ut, it = self.user_table, self.item_table
        pred = self.global_mean + ut.rating_bias[u] + it.rating_bias[i] + (ut.weight[u] * it.weight[i]).sum(1)
        return pred.clamp(self.config.rating_min, self.config.rating_max).cpu().numpy()

    def score_items(self, users: Sequence[str], items: Sequence[str]) -> np.ndarray[Any, Any]:
        """(U, I) ranking scores of each candidate item for each user; unknown ids use the fallback rows."""
        u = torch.from_numpy(self.users.lookup(users)).to(self.device)
        i = torch.from_numpy(self._candidate_rows(items)).to(self.device)
        it = self.item_table
        scores = self._user_vectors(u) @ it.weight[i].T + self._ranking_bias(i)  # (U, I)
        if self.cooccurrence.shape[0]:
            scores += self.config.cooccurrence_weight * torch.from_numpy(
                self._item_similarity(u.cpu().numpy(), i.cpu().numpy())).to(self.device, scores.dtype)
        return np.asarray(scores.cpu().numpy())

    def _item_similarity(self, users: Rows, items: Rows) -> np.ndarray[Any, Any]:
        """(U, I) mean cosine similarity (by co-occurrence) of each item to each user's latest items."""
        cfg, co = self.config, self.cooccurrence
        cap = co.shape[0]
        k = min(cfg.cooccurrence_recent, cfg.history_size)
        written = self.history_next[users]  # (U,)
        back = (written[:, None] - 1 - np.arange(k)[None, :]) % cfg.history_size  # (U, k) ring slots, newest first
        recent = self.history[users[:, None], back]  # (U, k)
        recent[(np.arange(k)[None, :] >= written[:, None]) | (recent >= cap)] = FALLBACK_ROW
        norm = np.sqrt(np.diagonal(co)) + 1e-9  # (C,)
        inside = items < cap
        cols = np.where(inside, items, 0)
        sim = co[recent][:, :, cols] / (norm[recent][:, :, None] * norm[cols][None, None, :])  # (U, k, I)
        sim *= (recent != FALLBACK_ROW)[:, :, None] * inside[None, None, :]
        count = np.maximum((recent != FALLBACK_ROW).sum(1), 1)  # (U,)
        return np.asarray(sim.sum(1) / count[:, None])

    def _candidate_rows(self, items: Sequence[str]) -> Rows:
        """Rows of ``items``, cached: a candidate list that only grows is looked up only for its new ids."""
        version, cached, rows = self._candidates
        n = len(cached)
        if version != self.items.version or len(items) < n or list(items[:n]) != cached:
            cached, rows, n = [], np.zeros(0, np.int64), 0
        if len(items) > n:
            cached = cached + list(items[n:])
            rows = np.concatenate([rows, self.items.lookup(items[n:])])
        self._candidates = (self.items.version, cached, rows)
        return rows

    def _table(self, kind: str) -> EmbeddingTable:
        if kind not in ("user", "item"):
            raise ValueError(f"model: table kind must be 'user' or 'item', got {kind!r}")
        return self.user_table if kind == "user" else self.item_table

    def event_counts(self, kind: str, rows: Rows) -> Array:
        """(N,) how many events each row of table ``kind`` was trained on."""
        return self._table(kind).events[torch.from_numpy(np.asarray(rows, np.int64)).to(self.device)].cpu().numpy()

    def vectors(self, kind: str, rows: Rows) -> tuple[Array, Array, Array]:
        """``(vectors (N, D), ranking biases (N,), update counts (N,))`` of table ``kind`` ("user" or "item"): what
        a server ranks items by (``bias_i + u . q_i``), and exactly what ``score_items`` ranks by (without the
        co-occurrence term): the user vector includes the stored history term, the item bias the popularity term."""
        table = self._table(kind)
        idx = torch.from_numpy(np.asarray(rows, np.int64)).to(self.device)
        if kind == "user":
            vec, bias = self._user_vectors(idx), table.bias[idx]
        else:
            vec, bias = table.weight[idx], self._ranking_bias(idx)
        return vec.cpu().numpy(), bias.cpu().numpy(), table.updates[idx].cpu().numpy()

    def rating_biases(self, kind: str, rows: Rows) -> Array:
        """(N,) biases of rating predictions (``mean + b_u + b_i + p_u . q_i``)."""
        idx = torch.from_numpy(np.asarray(rows, np.int64)).to(self.device)
        return self._table(kind).rating_bias[idx].cpu().numpy()

    def memory_report(self) -> dict[str, dict[str, float]]:
        """Bytes per admitted id of each table: rows (parameters, optimiser state, counters, anchor) at the table's
        allocated capacity, plus the id map; and the shared structures (sampler, reservoir, sightings)."""
        out: dict[str, dict[str, float]] = {}
        for kind, idmap, table, seen in (("user", self.users, self.user_table, self.user_sightings),
                                         ("item", self.items, self.item_table, self.item_sightings)):
            table_bytes = table.bytes_per_row() * table.params.shape[0]
            map_bytes = idmap.nbytes()
            ids = max(len(idmap), 1)
            out[kind] = {
                "ids": len(idmap), "capacity": table.params.shape[0], "row_bytes": table.bytes_per_row(),
                "table_bytes": table_bytes, "idmap_bytes": map_bytes, "bytes_per_id": (table_bytes + map_bytes) / ids,
                "pending_ids": len(seen), "pending_bytes": len(pickle.dumps(seen.counts)),
            }
        out["shared"] = {
            "sampler_bytes": self.sampler.weight.nbytes + self.sampler.tree.nbytes,
            "reservoir_bytes": sum(c.nbytes for c in self.reservoir.columns.values()),
        }
        return out

    # ------------------------------------------------------------------------------------------------- state

    def state_bytes(self) -> bytes:
        """The whole model and optimiser state; ``from_bytes`` restores it exactly."""
        # Tensors as numpy arrays under plain pickle: the job serialises this at every bundle, and torch.save took
        # 2.9 ms for 5,000 users where pickle takes 0.3 ms.
        return pickle.dumps(
            {
                "version": STATE_VERSION,
                "config": {f.name: getattr(self.config, f.name) for f in fields(self.config)},
                "users": self.users.state(),
                "items": self.items.state(),
                "user_sightings": self.user_sightings.counts,
                "item_sightings": self.item_sightings.counts,
                "user_table": self.user_table.state(),
                "item_table": self.item_table.state(),
                "sampler": self.sampler.state(),
                "reservoir": self.reservoir.state(),
                "extras": pickle.dumps({
                    "history": self.history[: self.users.size], "history_next": self.history_next[: self.users.size],
                    "pop_log": self.pop_log[: self.items.size], "cooccurrence": self.cooccurrence,
                    "user_context": self.user_context[: self.users.size].cpu().numpy(),
                }, pickle.HIGHEST_PROTOCOL),  # its own pickle: it shares no memo entries with the rest
                "scalars": {k: getattr(self, k) for k in _SCALARS},
                "torch_rng": self.generator.get_state().numpy(),
                "np_rng": self.rng.bit_generator.state,
            },
            pickle.HIGHEST_PROTOCOL,
        )

    def _load_extras(self, extras: dict[str, np.ndarray[Any, Any]] | None) -> None:
        """Restores the ranking extras where the configuration still has room for them (else they start empty)."""
        if extras is None:
            return
        n = min(len(extras["pop_log"]), len(self.pop_log))
        self.pop_log[:n] = extras["pop_log"][:n]
        if extras["history"].shape[1] == self.history.shape[1]:
            n = min(len(extras["history_next"]), len(self.history_next))
            self.history[:n] = extras["history"][:n]
            self.history_next[:n] = extras["history_next"][:n]
        c = min(extras["cooccurrence"].shape[0], self.cooccurrence.shape[0])
        self.cooccurrence[:c, :c] = extras["cooccurrence"][:c, :c]
        if self.user_context.shape[1]:
            saved = extras.get("user_context")
            if saved is not None and saved.shape[1] == self.user_context.shape[1]:
                n = min(len(saved), len(self.user_context))
                self.user_context[:n] = torch.from_numpy(saved[:n]).to(self.device)
            else:  # saved without the term (or another dim): rebuilt from the rings and the item vectors as they are
                self._refresh_context(np.arange(1, self.users.size))

    def file_bytes(self) -> bytes:
        """``state_bytes`` in a format that cannot run code when read (``model.portable``), for files that other
        processes load: the warm-start model. ``from_file_bytes`` restores it."""
        state = pickle.loads(self.state_bytes())  # made just now, by this process
        state["extras"] = pickle.loads(state["extras"])
        return portable.dumps(state)

    @classmethod
    def from_file_bytes(cls, data: bytes, config: ModelConfig | None = None, what: str = "model file",
                        rating_code: int = RATING_CODE) -> OnlineBiasedMF:
        """The model ``file_bytes`` wrote; never unpickles. Raises ``ValueError`` naming ``what`` for a pickle or
        any other content it cannot use."""
        state = portable.loads(data, what)
        try:
            return cls._from_state(state, config, rating_code)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as ex:
            raise ValueError(f"{what}: not a usable model state: {type(ex).__name__}: {ex}") from None

    @classmethod
    def from_bytes(cls, data: bytes, config: ModelConfig | None = None,
                   rating_code: int = RATING_CODE) -> OnlineBiasedMF:
        """The model as ``state_bytes`` saw it, under ``config`` (default: the saved one), which may differ: what
        was learned is kept and the new settings apply from then on. Pickle: only for the job's own state (its
        Flink checkpoints); files from elsewhere go through ``from_file_bytes``."""
        state: dict[str, Any] = pickle.loads(data)
        if "extras" in state:
            state["extras"] = pickle.loads(state["extras"])
        return cls._from_state(state, config, rating_code)

    @classmethod
    def _from_state(cls, state: dict[str, Any], config: ModelConfig | None,
                    rating_code: int = RATING_CODE) -> OnlineBiasedMF:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"model: state version {state.get('version')} is not {STATE_VERSION}")
        old = ModelConfig(**state["config"])
        m = cls(config or old, rating_code)
        m.users = IdMap.from_state(state["users"])
        m.items = IdMap.from_state(state["items"])
        m.user_sightings.counts = OrderedDict(state["user_sightings"])
        m.item_sightings.counts = OrderedDict(state["item_sightings"])
        m.user_table.load(state["user_table"])
        m.item_table.load(state["item_table"])
        if m.config.optimizer != old.optimizer:  # the other optimiser's state means nothing to this one
            for t in (m.user_table, m.item_table):
                t.acc.zero_()
                t.steps.zero_()
        for k, v in state["scalars"].items():  # freshly unpickled: shared with nobody
            setattr(m, k, v)
        m._grow()  # the per-row extras must cover every loaded row before they are filled
        m._load_extras(state.get("extras"))
        m.reservoir = Reservoir.from_state(m.config.replay_size, state["reservoir"])
        m.generator.set_state(torch.from_numpy(state["torch_rng"]))
        m.rng.bit_generator.state = state["np_rng"]
        if (m.config.negatives, m.config.popularity_power) == (old.negatives, old.popularity_power):
            m.sampler = WeightedSampler.from_state(state["sampler"])
        else:
            m._rebuild_sampler()
        return m


_POP_FLOOR = -30.0  # log decayed count of an item without events (the fallback row); real items are above 0
_SCALARS = ("events_counted", "rating_sum", "rating_count", "step", "batches_seen", "skipped_batches", "clock_ms", "sweep_cursor",
            "expired", "evicted", "evictions")
EVICT_SHARE = 64  # at the row cap, one eviction scan frees at least 1/64 of the cap (amortises the scan)


def _distinct(rows: list[torch.Tensor]) -> Rows:
    if not rows:
        return np.zeros(0, np.int64)
    return np.asarray(torch.unique(torch.cat(rows)).cpu().numpy(), np.int64)
