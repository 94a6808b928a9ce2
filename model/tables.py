"""An embedding table with a bias per row and row-wise Adagrad that touches only the rows a batch used.

Rows are allocated on demand (capacity doubles), so a stream of new ids never rehashes or collides.

>>> import torch
>>> t = EmbeddingTable(dim=4, init_std=0.1, device=torch.device("cpu"), generator=torch.Generator().manual_seed(0))
>>> t.ensure(3)
>>> before = t.weight[:3].clone()
>>> t.step(torch.tensor([1]), torch.ones(1, 4), torch.ones(1), lr=0.1).tolist()
[1]
>>> bool((t.weight[0] == before[0]).all()), bool((t.weight[1] != before[1]).all())
(True, True)
"""
from __future__ import annotations

import torch


class EmbeddingTable:
    def __init__(self, dim: int, init_std: float, device: torch.device, generator: torch.Generator) -> None:
        self.dim = dim
        self.init_std = init_std
        self.device = device
        self.generator = generator
        self.rows = 0
        self.weight = torch.zeros(0, dim, device=device)  # (R, D)
        self.bias = torch.zeros(0, device=device)  # (R,)
        self.acc = torch.zeros(0, device=device)  # (R,) Adagrad sum of mean squared row gradients
        self.acc_bias = torch.zeros(0, device=device)  # (R,)
        self.updates = torch.zeros(0, dtype=torch.int64, device=device)  # (R,) how often each row was moved
        # (R,) events trained with this id: what exactly-once training is reconciled against (negatives excluded)
        self.events = torch.zeros(0, dtype=torch.int64, device=device)

    def ensure(self, rows: int) -> None:
        """Make rows ``[0, rows)`` exist; new rows get small random vectors."""
        if rows <= self.rows:
            return
        if rows > self.weight.shape[0]:
            cap = max(rows, 2 * self.weight.shape[0], 1024)
            self.weight = _grow(self.weight, cap)
            self.bias = _grow(self.bias, cap)
            self.acc = _grow(self.acc, cap)
            self.acc_bias = _grow(self.acc_bias, cap)
            self.updates = _grow(self.updates, cap)
            self.events = _grow(self.events, cap)
        fresh = torch.randn(rows - self.rows, self.dim, generator=self.generator) * self.init_std
        self.weight[self.rows:rows] = fresh.to(self.device)
        self.rows = rows

    def step(self, idx: torch.Tensor, grad: torch.Tensor, grad_bias: torch.Tensor, lr: float) -> torch.Tensor:
        """Row-wise Adagrad on the rows ``idx`` (may repeat); ``grad`` (B, D) and ``grad_bias`` (B,) per entry.

        Returns the distinct rows updated.
        """
        rows: torch.Tensor
        inv: torch.Tensor
        rows, inv = torch.unique(idx, return_inverse=True)  # (U,), (B,)
        g = torch.zeros(len(rows), self.dim, device=self.device).index_add_(0, inv, grad)  # (U, D)
        gb = torch.zeros(len(rows), device=self.device).index_add_(0, inv, grad_bias)  # (U,)
        self.acc[rows] += g.pow(2).mean(dim=1)
        self.acc_bias[rows] += gb.pow(2)
        self.weight[rows] -= lr * g / (self.acc[rows].sqrt() + 1e-8).unsqueeze(1)
        self.bias[rows] -= lr * gb / (self.acc_bias[rows].sqrt() + 1e-8)
        self.updates[rows] += torch.bincount(inv, minlength=len(rows))
        return rows

    def count_events(self, rows: torch.Tensor) -> None:
        """One more trained event for each entry of ``rows`` (B,), which may repeat."""
        self.events.index_add_(0, rows, torch.ones_like(rows))

    def state(self) -> dict[str, torch.Tensor]:
        n = self.rows
        return {k: getattr(self, k)[:n].cpu().clone() for k in _STATE}

    def load(self, state: dict[str, torch.Tensor]) -> None:
        n = state["weight"].shape[0]
        if state["weight"].shape[1] != self.dim:
            raise ValueError(f"embedding table: state has dim {state['weight'].shape[1]}, model has {self.dim}")
        for k in _STATE:
            setattr(self, k, state[k].to(self.device).clone())
        self.rows = n


_STATE = ("weight", "bias", "acc", "acc_bias", "updates", "events")


def _grow(t: torch.Tensor, cap: int) -> torch.Tensor:
    out = torch.zeros((cap, *t.shape[1:]), dtype=t.dtype, device=t.device)
    out[: t.shape[0]] = t
    return out
