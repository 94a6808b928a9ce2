"""How a micro-batch is learned: in event order, in sub-steps, each tested before it trains.

The transport batch (the job's ``batch.size``) is what makes the job fast; it need not be the unit the model learns
in. A batch is split into consecutive sub-steps (``step_size``: about ``optimizer.sub_step_budget / n`` of them for
an ``n``-event batch, each at most ``optimizer.sub_batch`` events), and for each, in order:

1. ``evaluate(part, offsets)`` (the caller's prequential test, given the sub-step's slice of the batch) against the
   model as it is: trained on every earlier sub-step, on nothing of this one or later; ``offsets`` move each event's
   predicted rating by what the sub-step's earlier ratings teach the closed-form biases (``model.rating_offsets``);
2. one gradient step on the sub-step's events and its share of the replayed ones;
3. its events count in the rating mean and the ranking extras (the history and popularity terms), so the next
   sub-step is scored with them.

No event is scored after its own update, nor by a model trained on a later event. What need not repeat runs once
per batch: id admission and lifecycle, the replay draw, the per-row event counts, the reservoir and expiry. If a
sub-step meets a non-finite number the whole batch is rolled back (its earlier sub-steps included), the rest of it
is still evaluated, and the batch is reported skipped, as a one-step batch is.

>>> rows = np.array([1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
>>> split(rows, 4), split(rows[:3], 0), split(np.array([1, 2, 1, 3, 3]), 0, once=True)
([0, 4, 8, 10], [0, 3], [0, 2, 4, 5])
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from model import rating_offsets, replay
from model.arrays import Array, Rows
from model.batch import BatchStats, to_device
from model.idmap import FALLBACK_ROW
from model.tables import Saved

if TYPE_CHECKING:
    from model.mf import OnlineBiasedMF

# Tests the batch's events in the slice against the model as it is, each event's predicted rating moved by the
# offset (slice length,) that the slice's earlier ratings give it (model.rating_offsets).
Evaluate = Callable[[slice, np.ndarray[Any, Any]], None]
Columns = dict[str, np.ndarray[Any, Any]]


def step_size(n: int, sub_batch: int, budget: int) -> int:
    """Events per sub-step of an ``n``-event batch: ``ceil(n^2 / budget)`` (about ``budget / n`` sub-steps; 0: one),
    at most ``sub_batch`` (0: no bound). A batch closes full at high traffic and small (after ``batch.max_wait_ms``) at
    low traffic, when the job has time to spare: so a small batch learns almost event by event, a full one in a few
    sub-steps, and the sub-steps' cost per batch falls as the traffic rises.

    >>> step_size(4096, 0, 8192), step_size(256, 0, 8192), step_size(1, 0, 8192), step_size(256, 4, 8192)
    (2048, 8, 1, 4)
    """
    size = -(-n * n // budget) if budget > 0 else n
    return max(1, min(size, sub_batch) if sub_batch > 0 else size)


def split(users: Rows, size: int, once: bool = False) -> list[int]:
    """Bounds of the sub-steps of a batch of events of user rows ``users`` (B,): every ``size`` events (0: no such
    bound) and, when ``once``, before a user's second event in a sub-step (the fallback row excepted)."""
    n = len(users)
    if not once:
        return [0, n] if size <= 0 or size >= n else [*range(0, n, size), n]
    limit = size if size > 0 else n
    bounds = [0]
    held: set[int] = set()
    for j, u in enumerate(users.tolist()):
        if (u in held and u != FALLBACK_ROW) or j - bounds[-1] >= limit:
            bounds.append(j)
            held.clear()
        held.add(u)
    bounds.append(n)
    return bounds


def learn(model: OnlineBiasedMF, users: Sequence[str], items: Sequence[str], actions: Array, values: Array,
          weights: Array | None, ts: Array | None, count: bool, evaluate: Evaluate | None = None) -> BatchStats:
    """Learns one batch in sub-steps (module docstring); ``count``: its events count in the mean, the extras, the
    event counts and the reservoir (pre-training epochs after the first do not)."""
    n = len(users)
    times = None if ts is None or not n else np.asarray(ts, np.int64)  # (B,)
    event_u, event_i = model.admit(users, items, times)
    act = np.asarray(actions, np.int64)
    val = np.asarray(values, np.float32)
    w = np.ones(n, np.float32) if weights is None else np.asarray(weights, np.float32)
    real: Columns = {"user": event_u, "item": event_i, "action": act, "value": val, "weight": w}
    train, replayed = replay.mix_in(model.reservoir, model.rng, real, model.config.stability.replay_count(n),
                                    model.generations())
    model.batches_seen += 1
    is_rating = act == model.rating_code
    opt = model.config.optimizer
    bounds = split(event_u, step_size(n, opt.sub_batch, opt.sub_step_budget), opt.user_once)
    trained = _steps(model, train, bounds, replayed, count, evaluate)
    ratings, implicit = int(is_rating.sum()), int((~is_rating).sum())
    if trained is None:
        model.skipped_batches += 1
        empty = np.zeros(0, np.int64)
        return BatchStats(n, ratings, implicit, float("nan"), float("nan"), empty, empty, event_u, event_i, True,
                          replayed)
    (rating_loss, implicit_loss), user_rows, item_rows = trained
    if count:
        model.count_batch(real)
    model.ranking.update(event_i)
    model.step += 1
    model.lifecycle.expire()
    return BatchStats(n, ratings, implicit, rating_loss, implicit_loss, _distinct(user_rows), _distinct(item_rows),
                      event_u, event_i, False, replayed)


def _steps(model: OnlineBiasedMF, train: Columns, bounds: list[int], replayed: int, count: bool,
           evaluate: Evaluate | None) -> tuple[tuple[float, float], list[torch.Tensor], list[torch.Tensor]] | None:
    """Tests and trains each sub-step in turn: the batch's mean losses and the rows moved; None (everything rolled
    back) if a sub-step was not finite."""
    n = bounds[-1]
    how = model.step_settings()
    saved: tuple[list[Saved], list[Saved]] = ([], [])
    before = (model.rating_sum, model.rating_count, model.extras.save(train["user"][:n], train["item"][:n]))
    user_rows: list[torch.Tensor] = []
    item_rows: list[torch.Tensor] = []
    sums = np.zeros(4)  # rating loss x ratings, ratings, implicit loss x entries, entries
    for a, b in zip(bounds[:-1], bounds[1:], strict=False):
        if evaluate is not None:
            _test(model, train, a, b, evaluate)
        ra, rb = replayed * a // n, replayed * b // n  # the sub-step's share of the replayed events
        part = {k: np.concatenate([col[a:b], col[n + ra:n + rb]]) if replayed else col[a:b] for k, col in train.items()}
        batch = to_device(part, b - a, model.config, model.device, model.rating_code)
        done = model.train_part(batch, how, saved)
        if done is None:
            model.user_table.restore(saved[0])
            model.item_table.restore(saved[1])
            model.rating_sum, model.rating_count = before[0], before[1]
            model.extras.restore(before[2])
            if evaluate is not None and b < n:
                _test(model, train, b, n, evaluate)
            return None
        (rating_loss, implicit_loss), moved_u, moved_i = done
        sums += (rating_loss * len(batch.rating_idx), len(batch.rating_idx),
                 implicit_loss * len(batch.implicit_idx), len(batch.implicit_idx))
        user_rows += moved_u
        item_rows += moved_i
        if count:
            rated = part["action"][: b - a] == model.rating_code
            model.count_part(part["user"][: b - a], part["item"][: b - a], part["value"][: b - a][rated])
    losses = (sums[0] / sums[1] if sums[1] else 0.0, sums[2] / sums[3] if sums[3] else 0.0)
    return (float(losses[0]), float(losses[1])), user_rows, item_rows


def _test(model: OnlineBiasedMF, train: Columns, a: int, b: int, evaluate: Evaluate) -> None:
    """Tests the real events ``[a, b)`` as one sub-step."""
    rated = train["action"][a:b] == model.rating_code
    evaluate(slice(a, b), rating_offsets.in_step(model, train["user"][a:b], train["item"][a:b],
                                                 train["value"][a:b], rated))


def _distinct(rows: list[torch.Tensor]) -> np.ndarray[Any, Any]:
    if not rows:
        return np.zeros(0, np.int64)
    return np.asarray(torch.unique(torch.cat(rows)).cpu().numpy(), np.int64)
