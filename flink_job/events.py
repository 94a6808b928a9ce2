"""The input event format, shared by producers, the job and tests.

An event is one JSON object per Kafka record::

    {"event_id": "e-1", "user_id": "u42", "item_id": "i7", "action": "rating",
     "value": 4.0, "ts": 1700000000000, "dwell_ms": 5300, "price": 9.99, "category": "c3"}

``event_id``, ``user_id``, ``item_id``, ``action`` and ``ts`` (event time, epoch ms) are required; ``value`` is the
rating for ``action == "rating"`` and an optional weight otherwise; the context features are optional.

>>> e = Event("e-1", "u1", "i2", "click", 1.0, 1700000000000)
>>> Event.from_json(e.to_json()) == e
True
>>> Event.from_json('{"event_id": "e-2"}')
Traceback (most recent call last):
...
ValueError: event: missing_user_id : '{"event_id": "e-2"}'

"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

ACTIONS: tuple[str, ...] = ("view", "click", "cart", "purchase", "rating")
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
        """Parses one record with the job's own rules (``flink_job.parse``); raises ``ValueError`` with the reason."""
        from flink_job.parse import parse_lines

        text = raw.decode() if isinstance(raw, bytes) else raw
        batch, dead = parse_lines([f"0,0,{text}"])
        if dead:
            raise ValueError(f"event: {dead[0].reason} {dead[0].detail}: {text[:80]!r}")
        context = {k: v for k, v in json.loads(text).items() if k in CONTEXT_FIELDS}
        return cls(batch.event_ids[0], batch.users[0], batch.items[0], ACTIONS[int(batch.actions[0])],
                   float(batch.values[0]), int(batch.ts[0]), context)
