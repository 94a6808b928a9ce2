"""Near-duplicates: the same user, item and action again within a short window (a double-click) counts once.

Exact duplicates (same event id) are removed in the JVM before Python sees them; these are distinct events that
mean the same thing. They are counted as de-duplicated, not dead-lettered: nothing is wrong with them.

>>> from flink_job.stages.parse import parse_lines
>>> line = '0,{n},{{"event_id":"e{n}","user_id":"u","item_id":"i","action":"click","ts":{ts}}}'
>>> nd = NearDuplicates(window_ms=500)
>>> kept, dropped = nd.filter(parse_lines([line.format(n=n, ts=ts) for n, ts in enumerate([0, 300, 900, 1000])],
...                                       now_ms=10**6)[0])
>>> kept.event_ids, dropped
(['e0', 'e2'], 2)
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np

from flink_job.stages.events import EventBatch


class NearDuplicates:
    def __init__(self, window_ms: int, max_keys: int = 1_000_000) -> None:
        """``window_ms <= 0`` turns the rule off. At most ``max_keys`` keys are remembered, the least recently kept
        going first, so a flood of distinct keys costs a missed near-duplicate at worst, never unbounded memory."""
        self.window_ms = window_ms
        self.max_keys = max_keys
        # (user, item, action) -> event time of the last kept one, least recently kept first. An OrderedDict: a
        # plain dict finds its first key by scanning past the deleted ones, slow when dropping the oldest per event.
        self.last: OrderedDict[tuple[str, str, int], int] = OrderedDict()
        self.newest_ts = 0

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps (the settings come from the configuration)."""
        return {"last": self.last, "newest_ts": self.newest_ts}

    def load_state(self, state: dict[str, Any]) -> None:
        """``state`` written by an older version may lack a key added since: that part starts empty."""
        self.last = state.get("last", self.last)
        self.newest_ts = state.get("newest_ts", self.newest_ts)

    def filter(self, batch: EventBatch) -> tuple[EventBatch, int]:
        """``(events kept, how many were near-duplicates)``; events are judged in input order."""
        if self.window_ms <= 0 or not len(batch):
            return batch, 0
        if not isinstance(self.last, OrderedDict):  # restored from state written before the cap
            self.last = OrderedDict(self.last)
        keep = np.ones(len(batch), bool)
        last, window = self.last, self.window_ms
        for i, (user, item, action, ts) in enumerate(
            zip(batch.users, batch.items, batch.actions.tolist(), batch.ts.tolist())
        ):
            key = (user, item, action)
            prev = last.get(key)
            if prev is not None and 0 <= ts - prev < window:
                keep[i] = False
            else:
                last[key] = ts
                last.move_to_end(key)
        self.newest_ts = max(self.newest_ts, int(batch.ts.max()))
        while len(last) > self.max_keys:
            last.popitem(last=False)
        dropped = int((~keep).sum())
        return (batch.select(np.flatnonzero(keep)) if dropped else batch), dropped
