"""Near-duplicates: the same user, item and action again within a short window (a double-click) counts once.

Exact duplicates (same event id) are removed in the JVM before Python sees them; these are distinct events that
mean the same thing. They are counted as de-duplicated, not dead-lettered: nothing is wrong with them.

>>> from flink_job.parse import parse_lines
>>> line = '0,{n},{{"event_id":"e{n}","user_id":"u","item_id":"i","action":"click","ts":{ts}}}'
>>> nd = NearDuplicates(window_ms=500)
>>> kept, dropped = nd.filter(parse_lines([line.format(n=n, ts=ts) for n, ts in enumerate([0, 300, 900, 1000])],
...                                       now_ms=10**6)[0])
>>> kept.event_ids, dropped
(['e0', 'e2'], 2)
"""
from __future__ import annotations

import numpy as np

from flink_job.parse import EventBatch


class NearDuplicates:
    def __init__(self, window_ms: int, max_keys: int = 1_000_000) -> None:
        """``window_ms <= 0`` turns the rule off. Keys older than the window are forgotten past ``max_keys``."""
        self.window_ms = window_ms
        self.max_keys = max_keys
        self.last: dict[tuple[str, str, int], int] = {}  # (user, item, action) -> event time of the last kept one
        self.newest_ts = 0

    def filter(self, batch: EventBatch) -> tuple[EventBatch, int]:
        """``(events kept, how many were near-duplicates)``; events are judged in input order."""
        if self.window_ms <= 0 or not len(batch):
            return batch, 0
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
        self.newest_ts = max(self.newest_ts, int(batch.ts.max()))
        if len(last) > self.max_keys:
            horizon = self.newest_ts - window
            self.last = {k: t for k, t in last.items() if t >= horizon}
        dropped = int((~keep).sum())
        return (batch.select(np.flatnonzero(keep)) if dropped else batch), dropped
