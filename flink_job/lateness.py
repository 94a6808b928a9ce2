"""Event time: a watermark per input partition with a bounded out-of-orderness; events too far behind it are late.

The watermark is the smallest, over the partitions seen, of the newest event time minus the allowed
out-of-orderness (a partition that has not been seen holds nothing back). An event older than the watermark minus
the allowed lateness goes to the dead-letter topic as ``late`` rather than being silently dropped or trained out of
order. Each event is judged against the watermark of the events before it, in input order within a chunk too, so
the outcome does not depend on how the input was cut into chunks (a replay after a restore cuts it differently).

>>> from flink_job.parse import parse_lines
>>> line = '0,{o},{{"event_id":"e{o}","user_id":"u","item_id":"i","action":"view","ts":{ts}}}'
>>> w = Watermarks(out_of_orderness_ms=10, allowed_lateness_ms=5)
>>> on_time, late = w.split(parse_lines([line.format(o=0, ts=100)], now_ms=10**6)[0])
>>> on_time, late = w.split(parse_lines([line.format(o=1, ts=86), line.format(o=2, ts=84)], now_ms=10**6)[0])
>>> on_time.event_ids, [(d.reason, d.offset) for d in late], w.watermark()
(['e1'], [('late', 2)], 90)
"""
from __future__ import annotations

import numpy as np

from flink_job.parse import DeadLetter, EventBatch

STAGE = "lateness"


class Watermarks:
    def __init__(self, out_of_orderness_ms: int, allowed_lateness_ms: int) -> None:
        """``allowed_lateness_ms < 0`` turns the check off (every event is on time)."""
        self.out_of_orderness_ms = out_of_orderness_ms
        self.allowed_lateness_ms = allowed_lateness_ms
        self.max_ts: dict[int, int] = {}  # partition -> newest event time seen

    def watermark(self) -> int | None:
        if not self.max_ts:
            return None
        return min(self.max_ts.values()) - self.out_of_orderness_ms

    def split(self, batch: EventBatch) -> tuple[EventBatch, list[DeadLetter]]:
        """``(events on time, dead letters for the late ones)``; the watermark advances with every event."""
        if not len(batch):
            return batch, []
        parts, ts = batch.partitions, batch.ts  # (N,), (N,)
        names = sorted(set(self.max_ts) | set(np.unique(parts).tolist()))
        unseen = np.iinfo(np.int64).min
        # (P, N+1): per partition, the newest event time before each event (column 0: before the chunk) and after it.
        newest = np.empty((len(names), len(batch) + 1), np.int64)
        for r, p in enumerate(names):
            newest[r, 0] = self.max_ts.get(p, unseen)
            newest[r, 1:] = np.where(parts == p, ts, unseen)
        np.maximum.accumulate(newest, axis=1, out=newest)
        for r, p in enumerate(names):
            if newest[r, -1] != unseen:
                self.max_ts[p] = int(newest[r, -1])
        if self.allowed_lateness_ms < 0:
            return batch, []
        before = np.where(newest[:, :-1] == unseen, np.iinfo(np.int64).max, newest[:, :-1]).min(axis=0)  # (N,)
        seen = before != np.iinfo(np.int64).max
        limit = before - self.out_of_orderness_ms - self.allowed_lateness_ms
        late = seen & (ts < limit)  # (N,)
        if not late.any():
            return batch, []
        letters = [
            DeadLetter("late", STAGE, batch.payloads[i], int(parts[i]), int(batch.offsets[i]),
                       f"{int(before[i]) - self.out_of_orderness_ms - int(ts[i])} ms behind the watermark")
            for i in np.flatnonzero(late)
        ]
        return batch.select(np.flatnonzero(~late)), letters
