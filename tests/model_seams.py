"""Test-only seams into the model, kept out of production code: they patch one model instance from the outside."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from model.mf import OnlineBiasedMF


def poison_next_batch(model: OnlineBiasedMF) -> None:
    """The model's next batch computes a NaN loss in every pass, as a numerical blow-up would, so the model's own
    guard skips it and rolls it back; later batches train as usual."""
    poisoned = model.batches_seen + 1  # the batch number the next learn_many call runs as
    _poison_when(model, lambda seen: seen == poisoned)


def poison_every(model: OnlineBiasedMF, n: int) -> None:
    """Every ``n``-th batch the model is offered (``batches_seen``, skipped ones included, so batches n, 2n, ...)
    computes a NaN loss in every pass and is skipped; the fault test's job runs it inside a TaskManager."""
    _poison_when(model, lambda seen: seen % n == 0)


def _poison_when(model: OnlineBiasedMF, poisoned: Callable[[int], bool]) -> None:
    gradients = model._gradients

    def nan_when(batch: Any) -> Any:
        rating_loss, implicit_loss, gu, gi = gradients(batch)
        if poisoned(model.batches_seen):
            return float("nan"), float("nan"), gu, gi
        return rating_loss, implicit_loss, gu, gi

    model._gradients = nan_when  # type: ignore[method-assign]
