"""The input event format, shared by producers, the job and tests.

An event is one JSON object per Kafka record::

    {"event_id": "e-1", "user_id": "u42", "item_id": "i7", "action": "rating",
     "value": 4.0, "ts": 1700000000000, "dwell_ms": 5300, "price": 9.99, "category": "c3"}

``event_id``, ``user_id``, ``item_id``, ``action`` and ``ts`` (event time, epoch ms) are required; ``value`` is the
rating for ``action == "rating"`` and an optional weight otherwise; the context features are optional.

>>> e = Event("e-1", "u1", "i2", "click", 1.0, 1700000000000)
>>> Event.from_json(e.to_json()) == e
True
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

ACTIONS: tuple[str, ...] = ("view", "click", "cart", "purchase", "rating")
REQUIRED_FIELDS: tuple[str, ...] = ("event_id", "user_id", "item_id", "action", "ts")
CONTEXT_FIELDS: tuple[str, ...] = ("dwell_ms", "price", "category")


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

    @classmethod
    def from_json(cls, raw: bytes | str) -> Event:
        """Parses a well-formed event; raises ``ValueError`` naming the field that is wrong."""
        try:
            d = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as ex:
            raise ValueError(f"event: not JSON: {raw[:80]!r}") from ex
        if not isinstance(d, dict):
            raise ValueError(f"event: not a JSON object: {raw[:80]!r}")
        for name in REQUIRED_FIELDS:
            if name not in d:
                raise ValueError(f"event: missing field {name!r} in {raw[:80]!r}")
        if d["action"] not in ACTIONS:
            raise ValueError(f"event: unknown action {d['action']!r}")
        value = float(d.get("value", 1.0))
        if not math.isfinite(value):
            raise ValueError(f"event: value is not finite: {value}")
        context = {k: d[k] for k in CONTEXT_FIELDS if k in d}
        return cls(str(d["event_id"]), str(d["user_id"]), str(d["item_id"]), d["action"], value, int(d["ts"]), context)
