"""Test-only seams into the model, kept out of production code: they patch one model instance from the outside."""
from __future__ import annotations

from typing import Any

from model.mf import OnlineBiasedMF


def poison_next_batch(model: OnlineBiasedMF) -> None:
    """The model's next batch computes a NaN loss in every pass, as a numerical blow-up would, so the model's own
    guard skips it and rolls it back; later batches train as usual."""
    gradients = model._gradients
    poisoned = model.batches_seen + 1  # the batch number the next learn_many call runs as

    def nan_once(batch: Any) -> Any:
        rating_loss, implicit_loss, gu, gi = gradients(batch)
        if model.batches_seen == poisoned:
            return float("nan"), float("nan"), gu, gi
        return rating_loss, implicit_loss, gu, gi

    model._gradients = nan_once  # type: ignore[method-assign]
