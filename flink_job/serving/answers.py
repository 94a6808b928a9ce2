"""What the serving index holds per user and what it answers: the types its readers and the HTTP server see."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True, slots=True)  # slots: a million of them cost a third less
class UserVector:
    """The newest published record of one user."""

    id: str
    version: int
    step: int
    bias: float
    vector: np.ndarray  # (D,) float32
    seen: tuple[str, ...] | None  # items the user interacted with (each once), when the job publishes them
    event_ts: int = -1
    events: int = 0
    partition: int = -1
    offset: int = -1


@dataclass(frozen=True)
class Scored:
    id: str
    score: float
    version: int  # the version of the item's vector the score used


@dataclass(frozen=True)
class Recommendation:
    """Top-N for a user. ``fallback``: the user is unknown and the items are ranked by popularity (score = events)."""

    user: str
    items: list[Scored]
    fallback: bool
    user_version: int | None  # None when the fallback was used
    user_step: int | None
    item_step: int  # the index's item watermark: the highest training step of any item record applied
    excluded_seen: int = 0  # candidates left out because the user had interacted with them
    seen_published: bool = False  # whether the user record carried a ``seen`` list

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Similar:
    """Items nearest to ``item`` by cosine similarity of their vectors (the item itself excluded)."""

    item: str
    item_version: int
    items: list[Scored]
    item_step: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

