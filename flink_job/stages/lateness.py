"""Event time: a watermark per source with a bounded out-of-orderness; events too far behind it are late.

A source is an input partition as one chunk shard sees it: ``(partition, shard)``. The SQL part cuts each
processing-time window into one chunk per user shard, so the stage receives a partition's events as several
streams, each in input order but not in order with each other: in a backlog one window holds hours of event time,
and the second shard's chunk starts hours before the first one ended. A watermark per partition alone made those
events late (a 2.8-day backlog lost 2,933 of 3,734 valid events); one per source does not.

The watermark is the smallest, over the sources seen, of the newest event time minus the allowed
out-of-orderness (a source that has not been seen holds nothing back, and a source's first event is on time). An
event older than the watermark minus the allowed lateness goes to the dead-letter topic as ``late`` rather than
being silently dropped or trained out of order. Each event is judged against the watermark of the events before
it, in input order within a chunk too, so the outcome does not depend on how the input was cut into chunks (a
replay after a restore cuts it differently).

Event time cannot be poisoned: the newest event time a partition holds never runs ahead of processing time (the
call's ``now_ms``, which a replay reuses) by more than ``max_ahead_ms``, and a held time that did (a state written
before this rule, or by a clock that was ahead) is brought back when it is read. Otherwise one event a day in the
future would make every real event after it late for a day, and the checkpoint would keep it so.

>>> from flink_job.stages.parse import parse_lines
>>> line = '0,{o},{{"event_id":"e{o}","user_id":"u","item_id":"i","action":"view","ts":{ts}}}'
>>> w = Watermarks(out_of_orderness_ms=10, allowed_lateness_ms=5, max_ahead_ms=0)
>>> on_time, late = w.split(parse_lines([line.format(o=0, ts=100)], now_ms=10**6)[0], now_ms=10**6)
>>> on_time, late = w.split(parse_lines([line.format(o=1, ts=86), line.format(o=2, ts=84)], now_ms=10**6)[0],
...                         now_ms=10**6)
>>> on_time.event_ids, [(d.reason, d.offset) for d in late], w.watermark()
(['e1'], [('late', 2)], 90)
>>> w.max_ts[(0, 0)] = 10**9  # held from a clock a day ahead: read back as no later than processing time
>>> w.watermark(now_ms=1_000)
990
"""
from __future__ import annotations

from typing import Any

import numpy as np

from flink_job.stages.events import DeadLetter, EventBatch

STAGE = "lateness"


class Watermarks:
    def __init__(self, out_of_orderness_ms: int, allowed_lateness_ms: int, max_ahead_ms: int) -> None:
        """``allowed_lateness_ms < 0`` turns the check off (every event is on time); ``max_ahead_ms``: how far
        ahead of processing time a partition's newest event time may be (``clean.max_future_ms``)."""
        self.out_of_orderness_ms = out_of_orderness_ms
        self.allowed_lateness_ms = allowed_lateness_ms
        self.max_ahead_ms = max_ahead_ms
        # (partition, shard) -> newest event time seen, at most now + max_ahead_ms
        self.max_ts: dict[tuple[int, int], int] = {}

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps (the settings come from the configuration)."""
        return {"max_ts": self.max_ts}

    def load_state(self, state: dict[str, Any]) -> None:
        held = state.get("max_ts", self.max_ts)
        # Written before sources had shards: a partition's time was every shard's, as shard 0's it holds nothing back.
        self.max_ts = {(k if isinstance(k, tuple) else (int(k), 0)): int(v) for k, v in held.items()}

    def watermark(self, now_ms: int | None = None) -> int | None:
        """The watermark; with ``now_ms``, as the next ``split`` at that time will read it."""
        if not self.max_ts:
            return None
        newest = min(self.max_ts.values())
        if now_ms is not None:
            newest = min(newest, now_ms + self.max_ahead_ms)
        return newest - self.out_of_orderness_ms

    def split(self, batch: EventBatch, now_ms: int, shard: int = 0) -> tuple[EventBatch, list[DeadLetter]]:
        """``(events on time, dead letters for the late ones)`` of one chunk of ``shard``; the watermark advances
        with every event, up to processing time ``now_ms`` plus ``max_ahead_ms``."""
        cap = now_ms + self.max_ahead_ms
        for source, held in self.max_ts.items():
            if held > cap:
                self.max_ts[source] = cap
        if not len(batch):
            return batch, []
        parts, ts = batch.partitions, batch.ts  # (N,), (N,)
        names = sorted(set(self.max_ts) | {(p, shard) for p in np.unique(parts).tolist()})
        unseen = np.iinfo(np.int64).min
        # (S, N+1): per source, the newest event time before each event (column 0: before the chunk) and after it;
        # an event ahead of the cap moves it only as far as the cap (the parser rejects those, this holds anyway).
        newest = np.empty((len(names), len(batch) + 1), np.int64)
        capped = np.minimum(ts, cap)
        own = np.empty(len(batch), np.intp)  # (N,) each event's source row
        for r, (part, s) in enumerate(names):
            newest[r, 0] = self.max_ts.get((part, s), unseen)
            mine = (parts == part) if s == shard else np.zeros(len(batch), bool)
            newest[r, 1:] = np.where(mine, capped, unseen)
            own[mine] = r
        np.maximum.accumulate(newest, axis=1, out=newest)
        for r, key in enumerate(names):
            if newest[r, -1] != unseen:
                self.max_ts[key] = int(newest[r, -1])
        if self.allowed_lateness_ms < 0:
            return batch, []
        before = np.where(newest[:, :-1] == unseen, np.iinfo(np.int64).max, newest[:, :-1]).min(axis=0)  # (N,)
        seen = newest[own, np.arange(len(batch))] != unseen  # a source's first event is on time
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
