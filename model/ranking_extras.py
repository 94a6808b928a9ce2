"""Ranking extras folded into what a server ranks by (``bias_i + u . q_i``), beside the trained rows.

A user's ranking vector adds ``history_weight`` times the mean vector of the user's recent items (a ring of item
rows per user); an item's ranking bias adds ``popularity_weight`` times the log of its decayed event count; and
``score_items`` adds an item-to-item term from co-occurrence within users' recent items. Each part is off at its
default setting; all are kept per table row, grown with the tables and cleared when a row is recycled.

>>> import torch
>>> from model.config import ExtrasConfig, ModelConfig
>>> from model.tables import EmbeddingTable
>>> cfg = ModelConfig(dim=2, extras=ExtrasConfig(history_size=2))
>>> users, items = (EmbeddingTable(2, 0.1, torch.device("cpu"), torch.Generator()) for _ in range(2))
>>> x = RankingExtras(cfg, torch.device("cpu"), users, items)
>>> x.grow(3, 3)
>>> x.remember(np.array([1, 1, 1]), np.array([1, 2, 1]))
>>> x.history[1].tolist(), x.events_counted
([1, 2], 3)
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from model.arrays import Rows
from model.config import ModelConfig
from model.idmap import FALLBACK_ROW
from model.tables import EmbeddingTable

POP_FLOOR = -30.0  # log decayed count of an item without events (the fallback row); real items are above 0


class RankingExtras:
    def __init__(self, config: ModelConfig, device: torch.device, user_table: EmbeddingTable,
                 item_table: EmbeddingTable) -> None:
        self.config = config
        self.device = device
        self.user_table = user_table
        self.item_table = item_table
        cfg = config
        # Each user's last items (a ring of item rows, FALLBACK_ROW when empty) and each item's log decayed event
        # count, in units where an event at stream position n weighs 2 ** (n / halflife); the common offset cancels
        # out of every ranking.
        self.history = np.zeros((0, cfg.extras.history_size), np.int64)  # (users, K)
        self.history_next = np.zeros(0, np.int64)  # (users,) events written to each ring
        self.pop_log = np.zeros(0, np.float64)  # (items,) -inf: no event yet
        # The history term of each user's ranking vector as of the user's last trained batch: what is published and
        # what score_items ranks by, so a server holding the published rows ranks exactly as the evaluator does.
        self.user_context = torch.zeros(0, cfg.dim if self.history_on else 0, device=device)  # (users, D)
        self.events_counted = 0
        cap = cfg.extras.cooccurrence_capacity if cfg.extras.cooccurrence_weight and cfg.extras.history_size else 0
        self.cooccurrence = np.zeros((cap, cap), np.float32)  # (C, C) events of both items in one user's window

    @property
    def history_on(self) -> bool:
        return bool(self.config.extras.history_size and self.config.extras.history_weight)

    def grow(self, users: int, items: int) -> None:
        """Room for ``users`` user rows and ``items`` item rows (the tables' capacities)."""
        if len(self.history_next) < users:
            grow = users - len(self.history_next)
            self.history = np.concatenate([self.history, np.zeros((grow, self.config.extras.history_size), np.int64)])
            self.history_next = np.concatenate([self.history_next, np.zeros(grow, np.int64)])
        if self.user_context.shape[1] and len(self.user_context) < users:
            grown = torch.zeros(users, self.config.dim, device=self.device)
            grown[: len(self.user_context)] = self.user_context
            self.user_context = grown
        if len(self.pop_log) < items:
            self.pop_log = np.concatenate([self.pop_log, np.full(items - len(self.pop_log), -np.inf)])

    # ------------------------------------------------------------------------------------------ ranking vectors

    def history_mean(self, rows: torch.Tensor) -> torch.Tensor:
        """(N, D) the mean vector of the recent items of user ``rows`` (N,), from the item vectors as they are now (a
        feature: no gradient flows into those items through it); zero for a user without history."""
        hist = torch.from_numpy(self.history[rows.cpu().numpy()]).to(self.device)  # (N, K)
        own = (hist != FALLBACK_ROW).to(self.item_table.params.dtype)  # (N, K)
        # One fused gather-and-sum over the whole rows (contiguous), the biases dropped after: 10x the speed of
        # gathering (N, K, D) and summing it.
        params = self.item_table.params
        total = torch.nn.functional.embedding_bag(hist, params, mode="sum", per_sample_weights=own)[:, :params.shape[1] - 2]
        return total / own.sum(1, keepdim=True).clamp(min=1.0)

    def train_user_vectors(self, rows: torch.Tensor) -> torch.Tensor:
        """(N, D) the user vectors the ranking loss trains through: ``p_u`` plus ``history_weight`` times the mean of
        the recent item vectors as they are now."""
        p = self.user_table.weight[rows]
        if not self.history_on:
            return p
        return p + self.config.extras.history_weight * self.history_mean(rows)

    def user_vectors(self, rows: torch.Tensor) -> torch.Tensor:
        """(N, D) the published ranking vectors of user ``rows`` (N,): ``p_u`` plus ``history_weight`` times the
        history term stored at the user's last trained batch (``user_context``). A user row moves only in a batch
        with the user's events, and that batch refreshes the stored term, so this vector changes only when the row
        is touched, and a server with the latest published rows scores ``bias_i + u . q_i`` exactly as
        ``score_items`` does."""
        p = self.user_table.weight[rows]
        if not self.history_on:
            return p
        return p + self.config.extras.history_weight * self.user_context[rows]

    def ranking_bias(self, rows: torch.Tensor) -> torch.Tensor:
        """(N,) the published ranking bias of item ``rows``: ``c_i`` plus ``popularity_weight`` times the log of the
        item's decayed event count, in the stream's fixed frame (an event at position ``n`` weighs
        ``2 ** (n / halflife)``). In that frame an item's term changes only with its own events, so the published bias
        stays exact while other items are trained; rankings are the same as in a frame decayed to now, since the
        offset is common to all items. The frame grows by ``ln 2`` per half-life of events, so a float32 bias keeps a
        resolution of 1e-5 or better for the first ~100 half-lives (1e6 events at the default half-life of 10,000) and
        of 1e-3 after 10^4 half-lives; past that a stream needs a rebase of the frame (not done here)."""
        c = self.item_table.bias[rows]
        cfg = self.config
        if not cfg.extras.popularity_weight:
            return c
        pop = self.pop_log[rows.cpu().numpy()]
        pop = np.where(np.isfinite(pop), pop, POP_FLOOR)
        return (c.double() + cfg.extras.popularity_weight * torch.from_numpy(pop).to(self.device)).to(c.dtype)

    def add_similarity(self, scores: torch.Tensor, users: torch.Tensor, items: torch.Tensor) -> None:
        """Adds the co-occurrence term to ``scores`` (U, I) in place (nothing when it is off)."""
        if self.cooccurrence.shape[0]:
            scores += self.config.extras.cooccurrence_weight * torch.from_numpy(
                self._item_similarity(users.cpu().numpy(), items.cpu().numpy())).to(self.device, scores.dtype)

    def _item_similarity(self, users: Rows, items: Rows) -> np.ndarray[Any, Any]:
        """(U, I) mean cosine similarity (by co-occurrence) of each item to each user's latest items."""
        cfg, co = self.config, self.cooccurrence
        cap = co.shape[0]
        k = min(cfg.extras.cooccurrence_recent, cfg.extras.history_size)
        written = self.history_next[users]  # (U,)
        # (U, k) ring slots, newest first
        back = (written[:, None] - 1 - np.arange(k)[None, :]) % cfg.extras.history_size
        recent = self.history[users[:, None], back]  # (U, k)
        recent[(np.arange(k)[None, :] >= written[:, None]) | (recent >= cap)] = FALLBACK_ROW
        norm = np.sqrt(np.diagonal(co)) + 1e-9  # (C,)
        inside = items < cap
        cols = np.where(inside, items, 0)
        sim = co[recent][:, :, cols] / (norm[recent][:, :, None] * norm[cols][None, None, :])  # (U, k, I)
        sim *= (recent != FALLBACK_ROW)[:, :, None] * inside[None, None, :]
        count = np.maximum((recent != FALLBACK_ROW).sum(1), 1)  # (U,)
        return np.asarray(sim.sum(1) / count[:, None])

    # --------------------------------------------------------------------------------------------- upkeep

    def remember(self, event_u: Rows, event_i: Rows) -> None:
        """Adds a trained batch to the users' recent items and the items' decayed counts, in event order."""
        cfg = self.config
        if cfg.extras.popularity_weight:
            self.item_table.notify(torch.from_numpy(event_i))
        if cfg.extras.history_size and not self.cooccurrence.shape[0]:
            self._push_history(event_u, event_i)
        elif cfg.extras.history_size:
            co, cap = self.cooccurrence, self.cooccurrence.shape[0]
            for u, i in zip(event_u.tolist(), event_i.tolist(), strict=True):
                if u != FALLBACK_ROW and i != FALLBACK_ROW:
                    if i < cap:
                        past = self.history[u]
                        past = past[(past != FALLBACK_ROW) & (past < cap)]
                        co[i, past] += 1.0
                        co[past, i] += 1.0
                        co[i, i] += 1.0
                    self.history[u, self.history_next[u] % cfg.extras.history_size] = i
                    self.history_next[u] += 1
        n = len(event_i)
        if cfg.extras.popularity_weight and n:
            pos = (self.events_counted + 1 + np.arange(n)) / cfg.extras.popularity_halflife * math.log(2.0)  # (B,)
            own = event_i != FALLBACK_ROW
            np.logaddexp.at(self.pop_log, event_i[own], pos[own])
        self.events_counted += n

    def _push_history(self, event_u: Rows, event_i: Rows) -> None:
        """The events' items into their users' rings in event order, vectorised: of a user's events in the call
        only the last ``history_size`` can stay, so each ring slot is written once."""
        k = self.config.extras.history_size
        own = (event_u != FALLBACK_ROW) & (event_i != FALLBACK_ROW)
        u, i = event_u[own], event_i[own]
        if not len(u):
            return
        order = np.argsort(u, kind="stable")  # each user's events together, in event order
        su = u[order]
        starts = np.r_[0, np.flatnonzero(su[1:] != su[:-1]) + 1]
        counts = np.diff(np.r_[starts, len(su)])
        occurrence = np.arange(len(su)) - np.repeat(starts, counts)  # (E,) index among the user's events
        last = occurrence >= np.repeat(counts, counts) - k
        rows = su[last]
        self.history[rows, (self.history_next[rows] + occurrence[last]) % k] = i[order][last]
        self.history_next[su[starts]] += counts

    def refresh_context(self, event_u: Rows) -> None:
        """Stores the history term of the users of a trained batch (after their rings took the batch's items)."""
        if not self.history_on:
            return
        rows = np.unique(event_u)
        rows = rows[rows != FALLBACK_ROW]
        if len(rows):
            idx = torch.from_numpy(rows).to(self.device)
            self.user_context[idx] = self.history_mean(idx)

    def save(self, users: Rows, items: Rows) -> tuple[Any, ...]:
        """What ``remember`` and ``refresh_context`` can change for these rows (not co-occurrence), for ``restore``:
        a batch that fails in a later sub-step takes back what its earlier sub-steps counted."""
        context = self.user_context[torch.from_numpy(users).to(self.device)].clone() if self.history_on else None
        return (users, items, self.history[users].copy(), self.history_next[users].copy(), self.pop_log[items].copy(),
                context, self.events_counted)

    def restore(self, saved: tuple[Any, ...]) -> None:
        users, items, history, history_next, pop_log, context, counted = saved
        self.history[users], self.history_next[users], self.pop_log[items] = history, history_next, pop_log
        if context is not None:
            self.user_context[torch.from_numpy(users).to(self.device)] = context
        self.events_counted = counted

    def forget(self, kind: int, rows: Rows) -> None:
        """Clears the extras of recycled rows: users (kind 0) lose their recent items, items (kind 1) their decayed
        count and co-occurrences (references to them in users' recent items stay until overwritten)."""
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

    # ---------------------------------------------------------------------------------------------- state

    def state(self, users: int, items: int) -> dict[str, np.ndarray[Any, Any]]:
        """The extras of the first ``users`` user rows and ``items`` item rows."""
        return {
            "history": self.history[:users], "history_next": self.history_next[:users],
            "pop_log": self.pop_log[:items], "cooccurrence": self.cooccurrence,
            "user_context": self.user_context[:users].cpu().numpy(),
        }

    def load(self, extras: dict[str, np.ndarray[Any, Any]] | None, users: int) -> None:
        """Restores the extras where the configuration still has room for them (else they start empty); a history
        term saved without (or at another dim) is rebuilt for user rows ``[1, users)``."""
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
            else:  # rebuilt from the rings and the item vectors as they are
                self.refresh_context(np.arange(1, users))
