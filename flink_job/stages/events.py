"""The containers the stages pass along: a columnar batch of events, and the dead letter of a record the job
could not use."""
from __future__ import annotations

import time
from dataclasses import dataclass, field, fields

import numpy as np
import orjson

from model.arrays import Array


@dataclass(frozen=True)
class DeadLetter:
    """A record the job could not use: why, where in the pipeline, where in the input, and its original text."""

    reason: str
    stage: str
    payload: str
    partition: int = -1
    offset: int = -1
    detail: str = ""
    at_ms: int = field(default_factory=lambda: int(time.time() * 1000))

    def to_json(self) -> str:
        record = {
            "reason": self.reason,
            "stage": self.stage,
            "detail": self.detail,
            "partition": self.partition,
            "offset": self.offset,
            "at_ms": self.at_ms,
            "payload": self.payload,
        }
        try:
            return orjson.dumps(record).decode()
        except orjson.JSONEncodeError:  # lone surrogates, which UTF-8 cannot carry: written as escapes instead
            text = {k: v.encode("utf-8", "backslashreplace").decode() if isinstance(v, str) else v
                    for k, v in record.items()}
            return orjson.dumps(text).decode()


@dataclass
class EventBatch:
    """Events in columns. Ids stay strings; the model maps them to rows.

    The optional context fields are NaN (numbers) or None (category) where the event did not carry them;
    ``flink_job.stages.clean`` fills them.
    """

    event_ids: list[str] = field(default_factory=list)
    users: list[str] = field(default_factory=list)
    items: list[str] = field(default_factory=list)
    actions: Array = field(default_factory=lambda: np.zeros(0, np.int8))  # (N,)
    values: Array = field(default_factory=lambda: np.zeros(0, np.float32))  # (N,)
    ts: Array = field(default_factory=lambda: np.zeros(0, np.int64))  # (N,)
    partitions: Array = field(default_factory=lambda: np.zeros(0, np.int32))  # (N,)
    offsets: Array = field(default_factory=lambda: np.zeros(0, np.int64))  # (N,)
    # The original records, for dead letters further on; empty once no later stage can reject an event.
    payloads: list[str] = field(default_factory=list)
    # Context, after payloads so that positional callers keep working.
    dwell_ms: Array = field(default_factory=lambda: np.zeros(0, np.float64))  # (N,) NaN: absent
    price: Array = field(default_factory=lambda: np.zeros(0, np.float64))  # (N,) NaN: absent
    categories: list[str | None] = field(default_factory=list)  # None: absent

    def __len__(self) -> int:
        return len(self.users)

    def __setstate__(self, state: dict[str, object]) -> None:
        """Unpickling a batch a checkpoint holds: columns an older version had and this one does not (the cleaner's
        ``features``) are dropped."""
        names = {f.name for f in fields(self)}
        self.__dict__.update({k: v for k, v in state.items() if k in names})

    @staticmethod
    def concat(parts: list[EventBatch]) -> EventBatch:
        if len(parts) == 1:
            return parts[0]
        return EventBatch(
            [e for p in parts for e in p.event_ids],
            [u for p in parts for u in p.users],
            [i for p in parts for i in p.items],
            np.concatenate([p.actions for p in parts]),
            np.concatenate([p.values for p in parts]),
            np.concatenate([p.ts for p in parts]),
            np.concatenate([p.partitions for p in parts]),
            np.concatenate([p.offsets for p in parts]),
            [x for p in parts for x in p.payloads],
            dwell_ms=np.concatenate([p.dwell_ms for p in parts]),
            price=np.concatenate([p.price for p in parts]),
            categories=[c for p in parts for c in p.categories],
        )

    def slice(self, start: int, stop: int) -> EventBatch:
        return EventBatch(
            self.event_ids[start:stop], self.users[start:stop], self.items[start:stop],
            self.actions[start:stop], self.values[start:stop], self.ts[start:stop],
            self.partitions[start:stop], self.offsets[start:stop], self.payloads[start:stop],
            dwell_ms=self.dwell_ms[start:stop], price=self.price[start:stop], categories=self.categories[start:stop],
        )

    def select(self, idx: Array) -> EventBatch:
        """The events at positions ``idx`` (N,), in that order."""
        ix = idx.tolist()  # Python ints index lists faster than numpy scalars
        return EventBatch(
            [self.event_ids[i] for i in ix], [self.users[i] for i in ix], [self.items[i] for i in ix],
            self.actions[idx], self.values[idx], self.ts[idx], self.partitions[idx], self.offsets[idx],
            [self.payloads[i] for i in ix] if self.payloads else [],
            dwell_ms=self.dwell_ms[idx], price=self.price[idx], categories=[self.categories[i] for i in ix],
        )

