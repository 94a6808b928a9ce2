"""Online biased matrix factorisation in micro-batches: ratings by squared error, implicit feedback by a ranking loss.

The ranking score of item ``i`` for user ``u`` is ``c_i + p_u . q_i`` (``c`` the ranking bias); a predicted rating
is ``mean + b_u + b_i + p_u . q_i``. This module is the core: the two tables (``model.tables``), the update step with
its guard that rolls back a batch with non-finite numbers, and inference. The rest are parts it composes, each with
its own state and its own part of the snapshot (``model.serialise``):

- ``model.lifecycle``: which ids hold rows (admission, eviction at the row cap, expiry);
- ``model.ranking_loss``: the implicit objective (BPR or sampled softmax) and its negatives;
- ``model.ranking_extras``: the history and popularity terms and co-occurrence;
- ``model.batch`` and ``model.replay``: the batch on the device, replayed events mixed in.

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
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from model import replay, sequential, serialise
from model.arrays import Array, Rows
from model.batch import BatchStats, TrainBatch
from model.config import ModelConfig
from model.idmap import FALLBACK_ROW, IdMap
from model.lifecycle import IdLifecycle
from model.objectives import rating_grads
from model.ranking_extras import RankingExtras
from model.ranking_loss import Grads, RankingLoss
from model.replay import Reservoir
from model.sequential import Evaluate
from model.tables import EmbeddingTable, Saved, Step
from model.unknown_users import rank_unknown_users

# The model takes action codes, not names; the one code that is an explicit rating comes from the caller's
# vocabulary (the job passes flink_job.schema.RATING_CODE). This default serves callers without one of their own.
RATING_CODE = 4
STATE_VERSION = serialise.STATE_VERSION


def pick_device(setting: str) -> torch.device:
    """``auto`` is CUDA when a GPU is visible, else the CPU; ``cuda`` (or ``cuda:N``) without that GPU is a
    configuration error."""
    if setting.startswith("cuda"):
        index = int(setting.partition(":")[2] or 0)
        gpus = torch.cuda.device_count()
        if index >= gpus:
            raise ValueError(f"model: device {setting!r} requested but "
                             f"{'no CUDA device is' if not gpus else f'only {gpus} CUDA devices are'} available")
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def gpu_count() -> int:
    return torch.cuda.device_count()


class OnlineBiasedMF:
    """The tables and the update step; the parts around them each own their state and their part of the snapshot:
    ``lifecycle`` (ids, admission, eviction, expiry), ``extras`` (history, popularity, co-occurrence), ``ranking``
    (the implicit objective and its negatives) and ``reservoir`` (replay)."""

    def __init__(self, config: ModelConfig = ModelConfig(), rating_code: int = RATING_CODE) -> None:
        self.config = config
        self.rating_code = rating_code  # the action code whose events are ratings (the rating loss)
        cfg = config
        self.device = pick_device(cfg.device)
        torch.set_num_threads(cfg.threads)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.rng = np.random.default_rng(cfg.seed)
        anchored = cfg.stability.proximal > 0
        rows = cfg.ids.max_rows + 1  # the ids' rows and the fallback row
        self.user_table = EmbeddingTable(cfg.dim, cfg.init_std, self.device, self.generator, cfg.optimizer.name,
                                         anchored, rows)
        self.item_table = EmbeddingTable(cfg.dim, cfg.init_std, self.device, self.generator, cfg.optimizer.name,
                                         anchored, rows)
        self.lifecycle = IdLifecycle(cfg, (self.user_table, self.item_table), self._released)
        self.extras = RankingExtras(cfg, self.device, self.user_table, self.item_table)
        self.grow()
        for t in (self.user_table, self.item_table):
            t.params[FALLBACK_ROW] = 0.0  # an untrained fallback predicts the mean and scores 0
        self.ranking = RankingLoss(cfg, self.device, self.item_table, self.rng, self.extras.train_user_vectors)
        self.reservoir = Reservoir(cfg.stability.replay_size)
        self.rating_sum = 0.0
        self.rating_count = 0
        self.step = 0  # batches trained
        self.batches_seen = 0  # batches offered, skipped ones included
        self.skipped_batches = 0
        # (the item map, its version and releases, the candidate ids, their rows) of the last ranking
        self._candidates: tuple[IdMap | None, int, int, list[str], Rows] = (None, -1, -1, [], np.zeros(0, np.int64))

    @property
    def users(self) -> IdMap:
        return self.lifecycle.users

    @property
    def items(self) -> IdMap:
        return self.lifecycle.items

    @property
    def global_mean(self) -> float:
        if self.rating_count == 0:
            return (self.config.rating_min + self.config.rating_max) / 2
        return self.rating_sum / self.rating_count

    def grow(self) -> None:
        """Rows for every id held, in the tables and in the per-row extras."""
        self.user_table.ensure(self.users.size)
        self.item_table.ensure(self.items.size)
        self.extras.grow(self.user_table.params.shape[0], self.item_table.params.shape[0])

    def _released(self, kind: int, rows: Rows) -> None:
        """Rows of table ``kind`` (0 users, 1 items) were recycled: what else is kept per row starts anew."""
        self.extras.forget(kind, rows)
        if kind == 1:
            self.ranking.release(rows)

    # ----------------------------------------------------------------------------------------------- training

    def learn_many(
        self, users: Sequence[str], items: Sequence[str], actions: Array, values: Array,
        weights: Array | None = None, ts: Array | None = None, evaluate: Evaluate | None = None,
    ) -> BatchStats:
        """Learns a micro-batch in event order, in about ``optimizer.sub_step_budget / n`` sub-steps of an ``n``-event
        batch, each at most ``optimizer.sub_batch`` events (``model.sequential``).
        ``actions`` are codes (4 = rating); ``weights`` scale implicit events; ``ts`` (B,) event times in ms drive
        expiry (without them nothing ages). ``evaluate(part)``, when given, is called with each sub-step's slice of
        the batch just before the model trains on it (test, then train)."""
        return sequential.learn(self, users, items, actions, values, weights, ts, True, evaluate)

    def admit(self, users: Sequence[str], items: Sequence[str], times: np.ndarray[Any, Any] | None
              ) -> tuple[Rows, Rows]:
        """The rows of a batch's ids, admitting new ids and giving them rows everywhere."""
        event_u, event_i = self.lifecycle.admit(users, items, times)
        self.grow()
        self.ranking.admit(self.items.size, event_i)
        self.lifecycle.touch(event_u, event_i, times, self.batches_seen + 1)
        return event_u, event_i

    def generations(self) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
        return self.user_table.generation, self.item_table.generation

    def count_part(self, event_u: Rows, event_i: Rows, ratings: np.ndarray[Any, Any]) -> None:
        """A trained sub-step's real events count in the rating mean and the ranking extras, so that the next
        sub-step is scored with them (replayed events and pre-training epochs after the first do not count)."""
        self.rating_sum += float(ratings.sum())
        self.rating_count += len(ratings)
        self.extras.remember(event_u, event_i)
        self.extras.refresh_context(event_u)

    def count_batch(self, real: dict[str, np.ndarray[Any, Any]]) -> None:
        """A trained batch's real events count in the per-row event counts and the replay reservoir."""
        self.user_table.count_events(torch.from_numpy(real["user"]).to(self.device))
        self.item_table.count_events(torch.from_numpy(real["item"]).to(self.device))
        replay.offer(self.reservoir, self.rng, real, self.generations())

    def _lr(self) -> float:
        cfg = self.config
        s, warm = self.step + 1, cfg.optimizer.warmup_steps
        if cfg.optimizer.lr_schedule == "warmup_constant":
            return cfg.optimizer.lr * min(1.0, s / warm)
        if cfg.optimizer.lr_schedule == "warmup_rsqrt":
            return cfg.optimizer.lr * min(s / warm, math.sqrt(warm / s))
        return cfg.optimizer.lr

    def step_settings(self) -> Step:
        """How this batch moves rows."""
        cfg = self.config
        opt = cfg.optimizer
        how = Step(self._lr(), opt.name, opt.l2, opt.clip_norm, cfg.stability.proximal, opt.adam_beta1, opt.adam_beta2,
                   group_lr=(1.0, opt.rank_bias_lr, opt.rating_bias_lr), row_mean=opt.row_mean,
                   rating_prior=opt.rating_bias_prior, rating_window=opt.rating_bias_window)
        return how

    def train_part(self, b: TrainBatch, how: Step, saved: tuple[list[Saved], list[Saved]],
                   ) -> tuple[tuple[float, float], list[torch.Tensor], list[torch.Tensor]] | None:
        """``inner_steps`` passes over one sub-step: the losses of the first and the rows moved; None if a number
        was not finite (the rows' earlier states are in ``saved``, for the caller to roll back)."""
        user_rows: list[torch.Tensor] = []
        item_rows: list[torch.Tensor] = []
        losses = (0.0, 0.0)
        for k in range(self.config.optimizer.inner_steps):
            done = self._pass(b, how, saved[0], saved[1])
            if done is None:
                return None
            if k == 0:
                losses = done[0], done[1]
            user_rows.append(done[2])
            item_rows.append(done[3])
        return losses, user_rows, item_rows

    def _pass(
        self, b: TrainBatch, how: Step, saved_u: list[Saved], saved_i: list[Saved],
    ) -> tuple[float, float, torch.Tensor, torch.Tensor] | None:
        """One optimisation pass over the batch; None (and nothing changed) if a number was not finite."""
        ut, it = self.user_table, self.item_table
        rating_loss, implicit_loss, gu, gi = self._gradients(b)
        # A non-finite gradient under a finite loss shows in the rows it moved, checked after the step below (and
        # rolled back like this): checking every gradient tensor first cost 10% of the step.
        if not (math.isfinite(rating_loss) and math.isfinite(implicit_loss)):
            return None
        rows_u = rows_i = torch.zeros(0, dtype=torch.int64, device=self.device)
        if gu:
            idx = torch.cat([r for r, _ in gu])
            rows_u = ut.step(idx, torch.cat([g for _, g in gu]), how, saved_u, _curvature(b, len(idx)))
        if gi:
            idx = torch.cat([r for r, _ in gi])
            rows_i = it.step(idx, torch.cat([g for _, g in gi]), how, saved_i, _curvature(b, len(idx)))
        if not (ut.finite(rows_u) and it.finite(rows_i)):
            return None
        return rating_loss, implicit_loss, rows_u, rows_i

    def _gradients(self, b: TrainBatch) -> tuple[float, float, Grads, Grads]:
        """The losses of the batch (ratings, implicit) and the per-entry gradients of the user and item rows."""
        ut, it = self.user_table, self.item_table
        gu: Grads = []
        gi: Grads = []
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
            implicit_loss = self.ranking.grads(b, gu, gi)
        return rating_loss, implicit_loss, gu, gi

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
                stats = sequential.learn(self, users[s:e], items[s:e], act[s:e], val[s:e],
                                         None if w is None else w[s:e], None if t is None else t[s:e], epoch == 0)
                trained += not stats.skipped
        return trained

    # --------------------------------------------------------------------------------------------- inference

    def predict_ratings(self, users: Sequence[str], items: Sequence[str]) -> Array:
        """(B,) rating predictions clipped to the rating range; ids not admitted use the fallback rows."""
        u = torch.from_numpy(self.users.lookup(users)).to(self.device)
        i = torch.from_numpy(self.items.lookup(items)).to(self.device)
        return self.rating_scores(u, i).clamp(self.config.rating_min, self.config.rating_max).cpu().numpy()

    def rating_scores(self, u: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        """(B,) unclipped rating predictions ``mean + b_u + b_i + p_u . q_i`` of user rows ``u`` and item rows ``i``."""
        ut, it = self.user_table, self.item_table
        return self.global_mean + ut.rating_bias[u] + it.rating_bias[i] + (ut.weight[u] * it.weight[i]).sum(1)

    def score_items(self, users: Sequence[str], items: Sequence[str]) -> np.ndarray[Any, Any]:
        """(U, I) ranking scores of each candidate item for each user; unknown items use the fallback row, unknown
        users are ranked by popularity (``model.unknown_users``)."""
        u = torch.from_numpy(self.users.lookup(users)).to(self.device)
        i = torch.from_numpy(self._candidate_rows(items)).to(self.device)
        scores = self.extras.user_vectors(u) @ self.item_table.weight[i].T + self.extras.ranking_bias(i)  # (U, I)
        self.extras.add_similarity(scores, u, i)
        rank_unknown_users(scores, u, self.item_table.events[i], self.config.cold.unknown_users)
        return np.asarray(scores.cpu().numpy())

    def _candidate_rows(self, items: Sequence[str]) -> Rows:
        """Rows of ``items``, cached: a candidate list that only grows is looked up only for its new ids, and after
        admissions only for the ids that had no row (a release, which may give a row to another id, clears it)."""
        idmap, version, releases, cached, rows = self._candidates
        n = len(cached)
        if idmap is not self.items or releases != idmap.releases or len(items) < n or list(items[:n]) != cached:
            version, cached, rows, n = -1, [], np.zeros(0, np.int64), 0
        elif version != self.items.version and (unknown := np.flatnonzero(rows == FALLBACK_ROW)).size:
            rows = rows.copy()
            rows[unknown] = self.items.lookup([cached[j] for j in unknown.tolist()])
        if len(items) > n:
            cached = cached + list(items[n:])
            rows = np.concatenate([rows, self.items.lookup(items[n:])])
        self._candidates = (self.items, self.items.version, self.items.releases, cached, rows)
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
            vec, bias = self.extras.user_vectors(idx), table.bias[idx]
        else:
            vec, bias = table.weight[idx], self.extras.ranking_bias(idx)
        return vec.cpu().numpy(), bias.cpu().numpy(), table.updates[idx].cpu().numpy()

    def rating_biases(self, kind: str, rows: Rows) -> Array:
        """(N,) biases of rating predictions (``mean + b_u + b_i + p_u . q_i``)."""
        idx = torch.from_numpy(np.asarray(rows, np.int64)).to(self.device)
        return self._table(kind).rating_bias[idx].cpu().numpy()

    # ------------------------------------------------------------------------------------- publishing, expiry

    def drain_expired(self) -> tuple[list[str], list[str]]:
        """``(user ids, item ids)`` expired since the last call (e.g. to publish tombstones)."""
        return self.lifecycle.drain_expired()

    def drain_evicted(self) -> tuple[list[str], list[str]]:
        """``(user ids, item ids)`` evicted at the row cap since the last call (e.g. to publish tombstones)."""
        return self.lifecycle.drain_evicted()

    def mark_published(self, kind: str, rows: Rows) -> None:
        """The job published ``rows``: their current parameters become the proximal anchor."""
        self._table(kind).mark_published(torch.from_numpy(np.asarray(rows, np.int64)).to(self.device))

    # ------------------------------------------------------------------------------------------------- state

    def state_bytes(self) -> bytes:
        """The whole model and optimiser state; ``from_bytes`` restores it exactly."""
        return serialise.state_bytes(self)

    def file_bytes(self) -> bytes:
        """``state_bytes`` in a format that cannot run code when read (``model.portable``), for files that other
        processes load: the warm-start model. ``from_file_bytes`` restores it."""
        return serialise.file_bytes(self)

    @classmethod
    def from_file_bytes(cls, data: bytes, config: ModelConfig | None = None, what: str = "model file",
                        rating_code: int = RATING_CODE) -> OnlineBiasedMF:
        """The model ``file_bytes`` wrote; never unpickles. Raises ``ValueError`` naming ``what`` for a pickle or
        any other content it cannot use."""
        m = serialise.load_file(data, what, lambda state: serialise.from_state(cls, state, config))
        m.rating_code = rating_code
        return m

    @classmethod
    def from_bytes(cls, data: bytes, config: ModelConfig | None = None,
                   rating_code: int = RATING_CODE) -> OnlineBiasedMF:
        """The model as ``state_bytes`` saw it, under ``config`` (default: the saved one), which may differ: what
        was learned is kept and the new settings apply from then on. Pickle: only for the job's own state (its
        Flink checkpoints); files from elsewhere go through ``from_file_bytes``."""
        m = serialise.from_state(cls, serialise.load_pickle(data), config)
        m.rating_code = rating_code
        return m


def _curvature(b: TrainBatch, entries: int) -> torch.Tensor:
    """(E,) each gradient entry's second derivative in its rating bias: the rating weight for the ratings, which
    ``_gradients`` lists first, 0 for the ranking side's entries after them."""
    out = torch.zeros(entries, device=b.u.device)
    r = len(b.rating_idx)
    out[:r] = 1.0 if b.rating_w is None else b.rating_w
    return out
