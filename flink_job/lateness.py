"""Event time: a watermark per input partition with a bounded out-of-orderness; events too far behind it are late.

The watermark is the smallest, over the partitions seen, of the newest event time minus the allowed
out-of-orderness (a partition that has not been seen holds nothing back). An event older than the watermark minus
the allowed lateness goes to the dead-letter topic as ``late`` rather than being silently dropped or trained out of
order. The watermark moves at chunk boundaries, so a chunk is judged against what came before it.

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
        """``(events on time, dead letters for the late ones)``; then advances the watermark with this chunk."""
        wm = self.watermark()
        late_letters: list[DeadLetter] = []
        if wm is not None and self.allowed_lateness_ms >= 0 and len(batch):
            late = batch.ts < wm - self.allowed_lateness_ms  # (N,)
            if late.any():
                for i in np.flatnonzero(late):
                    late_letters.append(
                        DeadLetter("late", STAGE, batch.payloads[i], int(batch.partitions[i]), int(batch.offsets[i]),
                                   f"{wm - int(batch.ts[i])} ms behind the watermark")
                    )
                batch = batch.select(np.flatnonzero(~late))
        for p in np.unique(batch.partitions):
            newest = int(batch.ts[batch.partitions == p].max())
            self.max_ts[int(p)] = max(self.max_ts.get(int(p), newest), newest)
        return batch, late_letters
