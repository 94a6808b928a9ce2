"""One training batch on the device: which entries are ratings, which train the ranking side and their weights.

Real events come first, replayed ones after them (``n_real`` on), weighted by ``replay_weight``. A rating trains the
ranking side too, as an implicit positive of weight ``rating_implicit_weight``, when its value reaches
``rating_implicit_min``.

>>> import torch
>>> from model.config import ModelConfig
>>> cols = {"user": np.array([1, 2]), "item": np.array([1, 1]), "action": np.array([4, 0]),
...         "value": np.array([5.0, 1.0], np.float32), "weight": np.ones(2, np.float32)}
>>> b = to_device(cols, 2, ModelConfig(), torch.device("cpu"), rating_code=4)
>>> b.rating_idx.tolist(), b.implicit_idx.tolist()
([0], [0, 1])
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from model.arrays import Rows
from model.config import ModelConfig


@dataclass
class TrainBatch:
    u: torch.Tensor  # (E,) user rows
    i: torch.Tensor  # (E,) item rows
    rating_idx: torch.Tensor  # (R,) entries that are ratings
    ratings: torch.Tensor  # (R,)
    rating_w: torch.Tensor | None  # (R,) gradient weights of the ratings (None: all 1)
    implicit_idx: torch.Tensor  # (M,) entries that train the ranking side
    implicit_w: torch.Tensor  # (M,) their weights


def to_device(train: dict[str, np.ndarray[Any, Any]], n_real: int, cfg: ModelConfig, device: torch.device,
              rating_code: int) -> TrainBatch:
    """The batch of columns ``train`` on ``device``; entries from ``n_real`` on are replayed and weigh
    ``replay_weight``; actions equal to ``rating_code`` are ratings."""
    act, val, w = train["action"], train["value"], train["weight"]
    is_rating = act == rating_code
    rating_idx = np.flatnonzero(is_rating)
    implicit_w = np.where(is_rating, 0.0, w).astype(np.float32)
    if cfg.objective.rating_implicit_weight > 0:
        implicit_w[is_rating & (val >= cfg.objective.rating_implicit_min)] = cfg.objective.rating_implicit_weight
    rating_w = None
    if cfg.stability.replay_weight != 1.0 and len(act) > n_real:
        implicit_w[n_real:] *= cfg.stability.replay_weight
        entry_w = np.ones(len(act), np.float32)
        entry_w[n_real:] = cfg.stability.replay_weight
        rating_w = torch.from_numpy(entry_w[rating_idx]).to(device)
    implicit_idx = np.flatnonzero(implicit_w > 0)
    return TrainBatch(
        torch.from_numpy(train["user"]).to(device), torch.from_numpy(train["item"]).to(device),
        torch.from_numpy(rating_idx).to(device), torch.from_numpy(val[rating_idx]).to(device), rating_w,
        torch.from_numpy(implicit_idx).to(device), torch.from_numpy(implicit_w[implicit_idx]).to(device),
    )


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
