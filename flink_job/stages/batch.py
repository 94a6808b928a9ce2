"""Micro-batching: gather parsed events and hand them out in batches of a fixed size.

>>> from flink_job.stages.parse import parse_lines
>>> lines = [f'0,{n},{{"event_id":"e{n}","user_id":"u","item_id":"i","action":"view","ts":1}}' for n in range(5)]
>>> b = MicroBatcher(size=2)
>>> b.add(parse_lines(lines)[0])
>>> [len(x) for x in b.take_full()], b.pending
([2, 2], 1)
>>> [len(x) for x in b.take_rest()], b.pending
([1], 0)
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from flink_job.stages.events import EventBatch


class MicroBatcher:
    def __init__(self, size: int) -> None:
        if size <= 0:
            raise ValueError(f"batch: size must be positive, got {size}")
        self.size = size
        self._parts: list[EventBatch] = []
        self.pending = 0

    def state(self) -> dict[str, Any]:
        """The pending events (the batch size comes from the configuration)."""
        return {"parts": self._parts, "pending": self.pending}

    def load_state(self, state: dict[str, Any]) -> None:
        self._parts = state.get("parts", self._parts)
        self.pending = state.get("pending", self.pending)

    def add(self, batch: EventBatch) -> None:
        if len(batch):
            self._parts.append(batch)
            self.pending += len(batch)

    def take_full(self) -> Iterator[EventBatch]:
        """Batches of exactly ``size`` events while that many are pending; the rest stays."""
        if self.pending < self.size:
            return
        merged = EventBatch.concat(self._parts)
        start = 0
        while len(merged) - start >= self.size:
            yield merged.slice(start, start + self.size)
            start += self.size
        rest = merged.slice(start, len(merged))
        self._parts = [rest] if len(rest) else []
        self.pending = len(rest)

    def take_rest(self) -> Iterator[EventBatch]:
        """Everything pending, as one batch (the time bound has passed)."""
        if self.pending:
            merged = EventBatch.concat(self._parts)
            self._parts, self.pending = [], 0
            yield merged
