"""What the earlier ratings of a sub-step add to the rating predicted for each later event of the same sub-step.

A sub-step is tested as a whole and then trained in one step, so without this an event is predicted by biases that
have not seen the ratings just before it in its own sub-step, though those are in its past: a 4,096-event batch in
two sub-steps predicts its last event with biases 2,047 ratings old. Under ``optimizer.rating_bias_prior`` a rating
bias is a closed form, the running mean of its row's residuals shrunk by ``prior`` pseudo-ratings (``b`` after ``n``
ratings, ``b + sum(residuals) / (prior + n + c)`` after ``c`` more), and so is the global mean. The bias a row would
have after its earlier ratings in the sub-step therefore costs one grouped prefix sum for all events at once: each
event is predicted as if the sub-step's earlier ratings had each been learned before it, in the biases (the vectors
wait for the step). Residuals are taken against the model at the start of the sub-step, as its one training step
takes them. No event sees its own rating or a later one.

>>> exclusive_sums(torch.tensor([7, 3, 7, 7]), torch.tensor([[1.0], [1.0], [1.0], [2.0]])).flatten().tolist()
[0.0, 0.0, 1.0, 2.0]
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from model.idmap import FALLBACK_ROW

if TYPE_CHECKING:
    from model.mf import OnlineBiasedMF


def exclusive_sums(keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """(B, C): for each entry, the sums of ``values`` (B, C) over the earlier entries with its key (B,)."""
    if not len(keys):
        return values.clone()
    order = torch.sort(keys, stable=True).indices  # (B,) grouped by key, in entry order within a group
    k, v = keys[order], values[order]
    total = v.cumsum(0)  # (B, C) inclusive prefix sums over the grouped entries
    first = torch.ones(len(k), dtype=torch.bool, device=k.device)
    first[1:] = k[1:] != k[:-1]
    positions = torch.arange(len(k), device=k.device)
    start = torch.where(first, positions, 0).cummax(0).values  # (B,) where each entry's group starts
    grouped = total - v - (total[start] - v[start])  # (B, C) the group's sums before each entry
    out = torch.empty_like(grouped)
    out[order] = grouped
    return out


def in_step(model: OnlineBiasedMF, users: np.ndarray[Any, Any], items: np.ndarray[Any, Any],
            ratings: np.ndarray[Any, Any], is_rating: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """(B,) what the sub-step's earlier ratings add to each of its events' predicted rating: the global mean's move
    and, under a rating bias prior, the user's and the item's. ``users``, ``items`` (B,) are rows (the fallback row's
    bias stays: it stands for many ids), ``ratings`` (B,) the values where ``is_rating`` (B,)."""
    n = len(users)
    is_rating = np.asarray(is_rating, bool) & np.isfinite(ratings)  # a non-finite rating (a skipped batch) teaches none
    rated = torch.from_numpy(is_rating)
    r = torch.from_numpy(np.where(is_rating, ratings, 0.0).astype(np.float64))
    ones = rated.to(torch.float64)
    before_sum = torch.cumsum(r, 0) - r  # (B,) ratings of the sub-step before each event
    before_count = torch.cumsum(ones, 0) - ones
    mean = model.global_mean
    total = model.rating_count + before_count
    moved = torch.where(total > 0, (model.rating_sum + before_sum) / total.clamp(min=1), mean) - mean  # (B,)
    opt = model.config.optimizer
    if not opt.rating_bias_prior or not bool(rated.any()):
        return moved.numpy()
    u = torch.from_numpy(np.asarray(users, np.int64)).to(model.device)
    i = torch.from_numpy(np.asarray(items, np.int64)).to(model.device)
    predicted = model.rating_scores(u, i)  # (B,)
    residual = (r.to(predicted) - predicted) * rated.to(predicted)  # (B,) 0 for events without a rating
    both = torch.stack([residual, rated.to(predicted)], 1)  # (B, 2)
    shift = torch.zeros(n, dtype=predicted.dtype, device=predicted.device)
    for rows, table in ((u, model.user_table), (i, model.item_table)):
        sums = exclusive_sums(rows, both)  # (B, 2) residual sum and rating count of the row's earlier events
        count = table.acc[rows, 2] + sums[:, 1]  # as the step counts them (model.tables)
        shift += torch.where(rows == FALLBACK_ROW, 0.0, sums[:, 0] / (opt.rating_bias_prior + count))
    return np.asarray(moved.numpy() + shift.double().cpu().numpy())
