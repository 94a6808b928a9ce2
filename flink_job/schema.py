"""The event format and its vocabularies, shared by producers, the job, the model's callers and tests.

This module imports nothing of the project, so every layer can depend on it.

An event is one JSON object per Kafka record::

    {"event_id": "e-1", "user_id": "u42", "item_id": "i7", "action": "rating",
     "value": 4.0, "ts": 1700000000000, "dwell_ms": 5300, "price": 9.99, "category": "c3"}

``event_id``, ``user_id``, ``item_id``, ``action`` and ``ts`` (event time, epoch ms) are required; ``value`` is the
rating for ``action == "rating"`` and an optional weight otherwise; the context fields are optional.

>>> Event("e-1", "u1", "i2", "click", 1.0, 1700000000000).to_json()
b'{"event_id":"e-1","user_id":"u1","item_id":"i2","action":"click","value":1.0,"ts":1700000000000}'

Parsing one with the job's rules is ``flink_job.stages.parse.parse_event``.

"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

ACTIONS: tuple[str, ...] = ("view", "click", "cart", "purchase", "rating")
RATING_CODE = ACTIONS.index("rating")  # the action code of an explicit rating (the model's rating loss)
CONTEXT_FIELDS: tuple[str, ...] = ("dwell_ms", "price", "category")
FLOAT32_MAX = 3.4028234663852886e38  # numbers go to float32 columns: beyond this they become inf
# Context fields the cleaning rules judge, and what they may do with a missing or an outlying value.
NUMERIC_FIELDS: tuple[str, ...] = ("dwell_ms", "price")
MISSING_POLICIES: dict[str, tuple[str, ...]] = {
    "dwell_ms": ("default", "global_mean", "user_mean", "drop"),
    "price": ("default", "global_mean", "user_mean", "drop"),
    "category": ("default", "drop"),
}
OUTLIER_POLICIES: tuple[str, ...] = ("clip", "drop", "off")


@dataclass(frozen=True)
class Event:
    event_id: str
    user_id: str
    item_id: str
    action: str
    value: float
    ts: int
    context: dict[str, Any] = field(default_factory=dict, compare=True)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "event_id": self.event_id,
            "user_id": self.user_id,
            "item_id": self.item_id,
            "action": self.action,
            "value": self.value,
            "ts": self.ts,
        }
        d.update(self.context)
        return d

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":")).encode()
