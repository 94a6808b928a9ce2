"""An embedding table with two biases per row and a row-wise optimiser that touches only the rows a batch used.

A row's parameters are ``[vector (D) | ranking bias | rating bias]``, one tensor ``params`` (R, D + 2). Row-wise
Adagrad keeps one accumulator per parameter group (vector, each bias); row-wise Adam keeps a first moment per
parameter, a second moment per group and a step count per row (lazy: rows a batch does not touch do not move and
their moments do not decay). Rows are allocated on demand (capacity doubles) and can be reset for recycling.

>>> import torch
>>> t = EmbeddingTable(dim=4, init_std=0.1, device=torch.device("cpu"), generator=torch.Generator().manual_seed(0))
>>> t.ensure(3)
>>> before = t.weight[:3].clone()
>>> t.step(torch.tensor([1]), torch.ones(1, 6), Step(lr=0.1)).tolist()
[1]
>>> bool((t.weight[0] == before[0]).all()), bool((t.weight[1] != before[1]).all())
(True, True)
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from typing import Any

import numpy as np
import torch

NEVER = np.iinfo(np.int64).max  # last_seen of the fallback row and free rows: they never expire


@dataclass(frozen=True)
class Step:
    """How to move rows: one optimiser step's settings."""

    lr: float
    optimizer: str = "adagrad"
    l2: float = 0.0
    clip_norm: float = 0.0
    proximal: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    group_lr: tuple[float, float, float] = (1.0, 1.0, 1.0)  # step size multipliers: vector, ranking bias, rating bias
    row_mean: bool = False  # a row's gradient is the mean over its entries, not their sum
    # > 0: the rating bias takes a Newton step instead, ``-gradient / (rating_prior + count)``, the count (of rating
    # entries, weighted, at most ``rating_window``) kept in the rating bias group's accumulator: the bias is the
    # running mean of its row's residuals shrunk by ``rating_prior`` pseudo-ratings.
    rating_prior: float = 0.0
    rating_window: float = float("inf")


# One saved copy of some rows, to undo a step: (rows, {attribute: saved rows}).
Saved = tuple[torch.Tensor, dict[str, torch.Tensor]]


class EmbeddingTable:
    def __init__(self, dim: int, init_std: float, device: torch.device, generator: torch.Generator,
                 optimizer: str = "adagrad", anchored: bool = False, max_rows: int = 0) -> None:
        self.dim = dim
        self.max_rows = max_rows  # allocation never grows past this many rows (0: no limit)
        self.init_std = init_std
        self.device = device
        self.generator = generator
        self.optimizer = optimizer
        self.rows = 0
        d = dim + 2
        self.params = torch.zeros(0, d, device=device)  # (R, D + 2)
        self.acc = torch.zeros(0, 3, device=device)  # (R, 3) Adagrad sums / Adam second moments per group
        self.moment = torch.zeros(0, d if optimizer == "adam" else 0, device=device)  # (R, D + 2) Adam only
        self.steps = torch.zeros(0, dtype=torch.int64, device=device)  # (R,) optimiser steps taken by each row
        self.updates = torch.zeros(0, dtype=torch.int64, device=device)  # (R,) how often each row was moved
        # (R,) events trained with this id: what exactly-once training is reconciled against (negatives excluded)
        self.events = torch.zeros(0, dtype=torch.int64, device=device)
        # Last published parameters (the proximal anchor), kept only when a proximal penalty is configured.
        self.anchor = torch.zeros(0, d if anchored else 0, device=device)  # (R, D + 2)
        self.anchored = torch.zeros(0, dtype=torch.bool, device=device)  # (R,) rows with an anchor
        # Bookkeeping on the CPU: newest event time of each row (NEVER: no expiry) and a generation per row that
        # changes when the row is recycled, so stored references to an old holder can be recognised.
        self.last_seen = np.zeros(0, np.int64)  # (R,)
        self.generation = np.zeros(0, np.int64)  # (R,)
        # (R,) the model's batch count when each row last had an event: least recently used goes first at the cap.
        # A count, not event time: a hostile timestamp cannot keep a row in or push one out.
        self.last_used = np.zeros(0, np.int64)
        # Parameter group of each column: 0 the vector, 1 the ranking bias, 2 the rating bias.
        self._group = torch.tensor([0] * dim + [1, 2], device=device)
        # Called with the rows about to change (a step, event counts, the ranking extras), before they change: how
        # a replica's item journal (``model.item_sync``) keeps a base copy of only the rows it moves. None: off.
        self.watch: Callable[[torch.Tensor], None] | None = None

    @property
    def weight(self) -> torch.Tensor:
        return self.params[:, : self.dim]  # (R, D) view

    @property
    def bias(self) -> torch.Tensor:
        """(R,) view: the ranking bias, the ``c_i`` of a score ``c_i + p_u . q_i`` (zero for users)."""
        return self.params[:, self.dim]

    @property
    def rating_bias(self) -> torch.Tensor:
        """(R,) view: the bias of rating predictions ``mean + b_u + b_i + p_u . q_i``."""
        return self.params[:, self.dim + 1]

    def ensure(self, rows: int) -> None:
        """Make rows ``[0, rows)`` exist; new rows get small random vectors and zero biases."""
        if rows <= self.rows:
            return
        if rows > self.params.shape[0]:
            cap = max(rows, 2 * self.params.shape[0], 1024)
            if self.max_rows:  # doubling stops at the row cap: a capped table allocates no more than it can hold
                cap = max(rows, min(cap, self.max_rows))
            for name in _TENSORS:
                setattr(self, name, _grow(getattr(self, name), cap))
            self.last_seen = np.concatenate([self.last_seen, np.full(cap - len(self.last_seen), NEVER)])
            self.generation = np.concatenate([self.generation, np.zeros(cap - len(self.generation), np.int64)])
            self.last_used = np.concatenate([self.last_used, np.zeros(cap - len(self.last_used), np.int64)])
        fresh = torch.randn(rows - self.rows, self.dim, generator=self.generator) * self.init_std
        self.params[self.rows:rows, : self.dim] = fresh.to(self.device)
        self.rows = rows

    def reset(self, rows: np.ndarray[Any, Any]) -> None:
        """Gives ``rows`` fresh random vectors and empty optimiser state and counters, for a new holder."""
        if not len(rows):
            return
        idx = torch.from_numpy(rows).to(self.device)
        fresh = torch.randn(len(rows), self.dim, generator=self.generator) * self.init_std
        self.params[idx] = 0.0
        self.params[idx, : self.dim] = fresh.to(self.device)
        for name in _TENSORS[1:]:
            getattr(self, name)[idx] = 0
        self.last_seen[rows] = NEVER
        self.generation[rows] += 1

    def step(self, idx: torch.Tensor, grad: torch.Tensor, how: Step, saved: list[Saved] | None = None,
             curv: torch.Tensor | None = None) -> torch.Tensor:
        """One optimiser step on the rows ``idx`` (B,) (may repeat), ``grad`` (B, D + 2) per entry; ``curv`` (B,) the
        second derivative of each entry's loss in its rating bias (its rating weight; 0 for other entries), which
        counts the ratings under ``how.rating_prior`` (None: none).

        The rows' state before the step is appended to ``saved`` (for ``restore``). Returns the distinct rows.
        """
        rows, inv = unique_rows(idx)  # (U,), (B,)
        self.notify(rows)
        if saved is not None:
            saved.append(self.save(rows))
        p = self.params[rows]  # (U, D + 2)
        g = torch.zeros_like(p).index_add_(0, inv, grad)  # (U, D + 2)
        if how.row_mean:
            g /= torch.bincount(inv, minlength=len(rows)).unsqueeze(1).to(g.dtype)
        if how.l2:
            g[:, : self.dim] += how.l2 * p[:, : self.dim]
        if how.proximal and self.anchor.shape[1]:
            g += how.proximal * (p - self.anchor[rows]) * self.anchored[rows].unsqueeze(1)
        if how.clip_norm:
            g *= (how.clip_norm / (g.norm(dim=1, keepdim=True) + 1e-12)).clamp(max=1.0)
        sq = torch.stack([g[:, : self.dim].pow(2).mean(1), g[:, self.dim].pow(2), g[:, self.dim + 1].pow(2)], 1)
        self.steps[rows] += 1
        lr: float | torch.Tensor = how.lr
        if how.group_lr != (1.0, 1.0, 1.0):
            lr = how.lr * torch.tensor(how.group_lr, device=p.device)[self._group]  # (D + 2,)
        count = None
        if how.rating_prior:  # the Newton step's count replaces the group's accumulated squares
            h = torch.zeros(len(rows), device=p.device)  # (U,) the rows' ratings in this step, weighted
            if curv is not None:
                h.index_add_(0, inv, curv)
            count = self.acc[rows, 2] + h  # (U,) kept at most rating_window; the step counts all of h (no overshoot)
            sq[:, 2] = 0.0
        if how.optimizer == "adam":
            t = self.steps[rows].to(p.dtype).unsqueeze(1)  # (U, 1)
            m = self.moment[rows].mul_(how.beta1).add_(g, alpha=1 - how.beta1)  # (U, D + 2)
            v = self.acc[rows].mul_(how.beta2).add_(sq, alpha=1 - how.beta2)  # (U, 3)
            self.moment[rows] = m
            self.acc[rows] = v
            m_hat = m / (1 - how.beta1 ** t)
            v_hat = v / (1 - how.beta2 ** t)
            self.params[rows] = p - lr * m_hat / (v_hat.sqrt() + how.eps)[:, self._group]
        elif how.optimizer == "sgd":
            self.params[rows] = p - lr * g
        else:
            acc = self.acc[rows] + sq  # (U, 3)
            self.acc[rows] = acc
            self.params[rows] = p - lr * g / (acc.sqrt() + how.eps)[:, self._group]
        if count is not None:
            self.acc[rows, 2] = count.clamp(max=how.rating_window)
            # The Adam and Adagrad branches stepped the column with the group's state; redo it as a Newton step.
            curvature = how.rating_prior + count  # (U,) plus the proximal penalty's: a Newton step counts all
            if how.proximal and self.anchor.shape[1]:
                curvature = curvature + how.proximal * self.anchored[rows]
            self.params[rows, self.dim + 1] = p[:, self.dim + 1] - g[:, self.dim + 1] / curvature
        self.updates[rows] += torch.bincount(inv, minlength=len(rows))
        return rows

    def save(self, rows: torch.Tensor) -> Saved:
        return rows, {name: getattr(self, name)[rows].clone() for name in _MOVED}

    def restore(self, saved: list[Saved]) -> None:
        """Undoes the steps that filled ``saved``, newest first."""
        for rows, values in reversed(saved):
            for name, value in values.items():
                getattr(self, name)[rows] = value

    def finite(self, rows: torch.Tensor) -> bool:
        # A sum in float64 is NaN or infinite exactly when an element is (finite float32 values cannot overflow it).
        return math.isfinite(float(self.params[rows].sum(dtype=torch.float64)))

    def mark_published(self, rows: torch.Tensor) -> None:
        """The rows' current parameters become their proximal anchor (no-op without a proximal penalty)."""
        if self.anchor.shape[1]:
            self.anchor[rows] = self.params[rows]
            self.anchored[rows] = True

    def notify(self, rows: torch.Tensor) -> None:
        """Tells ``watch`` (if any) that ``rows`` (may repeat) are about to change."""
        if self.watch is not None:
            self.watch(rows)

    def count_events(self, rows: torch.Tensor) -> None:
        """One more trained event for each entry of ``rows`` (B,), which may repeat."""
        self.notify(rows)
        self.events.index_add_(0, rows, torch.ones_like(rows))

    def bytes_per_row(self) -> int:
        """Bytes one row costs in this table: parameters, optimiser state, counters, anchor and bookkeeping."""
        n = sum(getattr(self, k).element_size() * int(np.prod(getattr(self, k).shape[1:])) for k in _TENSORS)
        return int(n) + self.last_seen.itemsize + self.generation.itemsize + self.last_used.itemsize

    def state(self) -> dict[str, np.ndarray[Any, Any]]:
        n = self.rows
        out = {k: getattr(self, k)[:n].cpu().numpy().copy() for k in _TENSORS}
        out["last_seen"] = self.last_seen[:n].copy()
        out["generation"] = self.generation[:n].copy()
        out["last_used"] = self.last_used[:n].copy()
        return out

    def load(self, state: dict[str, np.ndarray[Any, Any]]) -> None:
        n, d = state["params"].shape
        if d != self.dim + 2:
            raise ValueError(f"embedding table: state has dim {d - 2}, model has {self.dim}")
        for k in _TENSORS:
            value = torch.from_numpy(state[k]).to(self.device)
            wanted = getattr(self, k).shape[1:]
            if value.shape[1:] != wanted:  # optimiser or anchor changed by the configuration: start that state anew
                value = torch.zeros((n, *wanted), dtype=value.dtype, device=self.device)
            setattr(self, k, value.clone())
        self.last_seen = state["last_seen"].copy()
        self.generation = state["generation"].copy()
        # Written before the row cap: every row counts as used at batch 0 (ties go to the lower row).
        self.last_used = state["last_used"].copy() if "last_used" in state else np.zeros(n, np.int64)
        self.rows = n


_TENSORS = ("params", "acc", "moment", "steps", "updates", "events", "anchor", "anchored")
_MOVED = ("params", "acc", "moment", "steps", "updates")


def unique_rows(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.unique(idx, return_inverse=True)`` of a 1-D tensor: its sorted distinct values and where each entry
    is among them. On the CPU by numpy, whose sort takes 0.6x the time of torch's for the ~10^4 entries of a
    sub-step (the sort was a third of a table's step); the results are the same.

    >>> [t.tolist() for t in unique_rows(torch.tensor([5, 2, 5, 7]))]
    [[2, 5, 7], [1, 0, 1, 2]]
    """
    if idx.device.type != "cpu":
        rows: torch.Tensor
        inv: torch.Tensor
        rows, inv = torch.unique(idx, return_inverse=True)
        return rows, inv
    values, where = np.unique(idx.numpy(), return_inverse=True)
    return torch.from_numpy(values), torch.from_numpy(np.asarray(where, np.int64).reshape(-1))


def _grow(t: torch.Tensor, cap: int) -> torch.Tensor:
    out = torch.zeros((cap, *t.shape[1:]), dtype=t.dtype, device=t.device)
    out[: t.shape[0]] = t
    return out
