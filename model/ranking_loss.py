"""The implicit (ranking) objective of a batch and where its negatives come from.

BPR scores each event's positive against ``implicit_negatives`` negatives of its own; the sampled softmax scores it
against ``shared_negatives`` negatives shared by the batch, logits corrected by ``log Q``. Negatives are drawn
uniformly over the items held, in proportion to ``count ** popularity_power`` (a ``WeightedSampler`` kept up to
date with each trained batch) or from the batch's own items. The gradients themselves are in ``model.objectives``.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from model.arrays import Rows
from model.batch import TrainBatch
from model.config import ModelConfig
from model.idmap import FALLBACK_ROW, IdMap
from model.objectives import bpr_grads, sampled_softmax_grads
from model.sampler import WeightedSampler
from model.tables import EmbeddingTable

# Per-entry gradients of one table: (rows (E,), gradients (E, D + 2)).
Grads = list[tuple[torch.Tensor, torch.Tensor]]


class RankingLoss:
    def __init__(self, config: ModelConfig, device: torch.device, item_table: EmbeddingTable,
                 rng: np.random.Generator, user_vectors: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.config = config
        self.device = device
        self.item_table = item_table
        self.rng = rng  # shared with the replay reservoir: one stream of draws, in the model's state
        self.user_vectors = user_vectors  # (N,) user rows -> (N, D) the vectors the loss trains through
        self.sampler = WeightedSampler()

    def grads(self, b: TrainBatch, gu: Grads, gi: Grads) -> float:
        """Appends the implicit entries' gradients of users to ``gu`` and of items to ``gi``; returns the loss."""
        if self.config.objective.implicit_loss == "bpr":
            return self._bpr(b, gu, gi)
        return self._softmax(b, gu, gi)

    def _bpr(self, b: TrainBatch, gu: Grads, gi: Grads) -> float:
        k = self.config.objective.implicit_negatives
        it = self.item_table
        u, i = b.u[b.implicit_idx], b.i[b.implicit_idx]  # (M,)
        m = len(i)
        bj = self.negatives(i, m * k)  # (M * k,) negative n of event e at n * M + e
        if len(bj) != m * k:
            return 0.0
        w = b.implicit_w * (bj.view(k, m) != i)  # (k, M) a negative that is the positive drops out
        loss, g_u, g_i, g_j = bpr_grads(self.user_vectors(u), it.weight[i], it.bias[i],
                                        it.weight[bj].view(k, m, -1), it.bias[bj].view(k, m), w / k)
        gu.append((u, g_u))
        gi.extend([(i, g_i), (bj, g_j)])
        return loss

    def _softmax(self, b: TrainBatch, gu: Grads, gi: Grads) -> float:
        cfg = self.config
        it = self.item_table
        bu, bi = b.u[b.implicit_idx], b.i[b.implicit_idx]  # (M,)
        m = len(bi)
        if cfg.objective.negatives == "in_batch":
            shared = cfg.objective.shared_negatives
            neg = bi if m <= shared else self.negatives(bi, shared)  # (K,)
            # The negatives are the batch's own items, so an item is drawn in proportion to its count in the batch.
            uniq, inv, counts = torch.unique(bi, return_inverse=True, return_counts=True)  # sorted (Q,)
            logq = torch.log(counts.to(torch.float32) / m)  # (Q,)
            logq_pos, logq_neg = logq[inv], logq[torch.searchsorted(uniq, neg)]  # (M,), (K,)
        else:
            neg = self.negatives(bi, cfg.objective.shared_negatives)
            if not len(neg):
                return 0.0
            logq_pos, logq_neg = self._log_q(bi, neg)
        collide = bi.unsqueeze(1) == neg.unsqueeze(0)  # (M, K)
        loss, g_u, g_pos, g_neg = sampled_softmax_grads(
            self.user_vectors(bu), it.weight[bi], it.bias[bi], logq_pos, it.weight[neg], it.bias[neg], logq_neg,
            collide, b.implicit_w,
        )
        gu.append((bu, g_u))
        gi.extend([(bi, g_pos), (neg, g_neg)])
        return loss

    def _log_q(self, pos: torch.Tensor, neg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Log sampling probabilities of the positives (M,) and the sampler's negatives (K,)."""
        if self.config.objective.negatives == "popularity":
            floor = 1.0 / max(self.sampler.total, 1e-12)  # an item not counted yet weighs as one event
            logq_pos = torch.from_numpy(np.log(np.maximum(
                self.sampler.probability(pos.cpu().numpy()), floor))).to(self.device, torch.float32)
            logq_neg = torch.from_numpy(np.log(self.sampler.probability(neg.cpu().numpy()))).to(
                self.device, torch.float32)
            return logq_pos, logq_neg
        # uniform: the same log Q for every item cancels out
        return torch.zeros(len(pos), device=self.device), torch.zeros(len(neg), device=self.device)

    def negatives(self, positives: torch.Tensor, size: int) -> torch.Tensor:
        """``size`` negative item rows: from the batch's positives (in_batch), uniform over the items held, or in
        proportion to the weighted sampler's weights."""
        cfg = self.config
        if cfg.objective.negatives == "in_batch":
            pick = torch.from_numpy(self.rng.integers(0, len(positives), size)).to(self.device)
            return positives[pick]
        if cfg.objective.negatives == "uniform":
            return torch.from_numpy(self.sampler.sample_uniform(self.rng, size)).to(self.device)
        return torch.from_numpy(self.sampler.sample(self.rng, size)).to(self.device)

    # ---------------------------------------------------------------------------------------- sampler upkeep

    def admit(self, items: int, event_i: Rows) -> None:
        """Room for ``items`` item rows; items new to the sampler weigh as one event, so they can be negatives
        already in their first batch."""
        self.sampler.resize(items)
        if self.config.objective.negatives == "in_batch":
            return
        rows = np.unique(event_i)
        rows = rows[(rows != FALLBACK_ROW) & (self.sampler.weight[rows] == 0)]
        self.sampler.set(rows, np.ones(len(rows)))

    def update(self, event_i: Rows) -> None:
        """New weights for the items of a batch (their event counts changed)."""
        if self.config.objective.negatives == "in_batch":
            return
        rows = np.unique(event_i)
        rows = rows[rows != FALLBACK_ROW]
        self.sampler.set(rows, self._weights(rows))

    def release(self, rows: Rows) -> None:
        """Recycled item rows are never drawn until a new holder has events."""
        self.sampler.set(rows, np.zeros(len(rows)))

    def rebuild(self, items: IdMap) -> None:
        """A sampler built anew from the items held (after a restore under other sampling settings)."""
        self.sampler = WeightedSampler()
        self.sampler.resize(items.size)
        if self.config.objective.negatives != "in_batch":
            live = np.flatnonzero(items.live_mask())
            self.sampler.set(live, self._weights(live))

    def _weights(self, rows: Rows) -> np.ndarray[Any, Any]:
        if self.config.objective.negatives == "popularity":
            counts = self.item_table.events[torch.from_numpy(rows).to(self.device)].cpu().numpy()
            return np.power(counts.astype(np.float64), self.config.objective.popularity_power)
        return np.ones(len(rows))
