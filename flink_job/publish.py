"""Embedding records: one per touched user or item id, keyed ``"<kind>:<id>"`` for a compacted topic.

The version of a record is the number of updates the id's row has received, so it only grows per id. A user
record also carries the input position of the newest event of that user it reflects (``partition``, ``offset``),
which is what freshness is measured against.

>>> rec = decode(encode_records("user", ["u1"], np.ones((1, 2), np.float32), np.zeros(1, np.float32),
...                             np.array([3]), 9, np.array([5]), np.array([0]), np.array([41]))[0][1])
>>> rec["id"], rec["version"], rec["vector"], rec["offset"]
('u1', 3, [1.0, 1.0], 41)
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import orjson


def encode_records(
    kind: str,
    ids: list[str],
    vectors: np.ndarray,  # (N, D)
    biases: np.ndarray,  # (N,)
    versions: np.ndarray,  # (N,)
    step: int,
    event_ts: np.ndarray,  # (N,) newest event time reflected, -1 if none
    partitions: np.ndarray | None = None,  # (N,) users only
    offsets: np.ndarray | None = None,  # (N,) users only
    events: np.ndarray | None = None,  # (N,) events each id was trained on
) -> list[tuple[str, str]]:
    """``(key, json value)`` pairs for the embeddings topic."""
    now = int(time.time() * 1000)
    out = []
    vecs = np.ascontiguousarray(vectors, np.float32)  # float32 serialises in its shortest form: half the bytes
    for n, key in enumerate(ids):
        rec: dict[str, Any] = {
            "kind": kind,
            "id": key,
            "version": int(versions[n]),
            "step": step,
            "bias": float(biases[n]),
            "vector": vecs[n],
            "event_ts": int(event_ts[n]),
            "produced_ms": now,
        }
        if events is not None:
            rec["events"] = int(events[n])
        if partitions is not None and offsets is not None:
            rec["partition"] = int(partitions[n])
            rec["offset"] = int(offsets[n])
        out.append((f"{kind}:{key}", orjson.dumps(rec, option=orjson.OPT_SERIALIZE_NUMPY).decode()))
    return out


class DirtyRows:
    """Rows of one table touched since the last publish, with the newest input position each reflects.

    Coalesces: a row touched by several batches between two publishes is published once.

    >>> d = DirtyRows()
    >>> d.touch(np.array([2, 2, 0]), np.array([10, 30, 20]), np.array([0, 0, 1]), np.array([5, 7, 6]))
    >>> rows, ts, parts, offs = d.drain()
    >>> rows.tolist(), ts.tolist(), offs.tolist()
    ([0, 2], [20, 30], [6, 7])
    >>> len(d)
    0
    """

    def __init__(self) -> None:
        self.mask = np.zeros(0, bool)
        self.event_ts = np.zeros(0, np.int64)
        self.partition = np.zeros(0, np.int64)
        self.offset = np.zeros(0, np.int64)

    def __len__(self) -> int:
        return int(self.mask.sum())

    def _grow(self, n: int) -> None:
        if n <= len(self.mask):
            return
        cap = max(n, 2 * len(self.mask), 1024)
        for name, fill in (("mask", False), ("event_ts", -1), ("partition", -1), ("offset", -1)):
            old = getattr(self, name)
            new = np.full(cap, fill, old.dtype)
            new[: len(old)] = old
            setattr(self, name, new)

    def touch(self, rows: np.ndarray, ts: np.ndarray | None = None, partitions: np.ndarray | None = None,
              offsets: np.ndarray | None = None) -> None:
        """Marks ``rows`` (B,) dirty; the per-entry event times and input positions (B,) keep their maximum."""
        if not len(rows):
            return
        self._grow(int(rows.max()) + 1)
        self.mask[rows] = True
        if ts is not None:
            np.maximum.at(self.event_ts, rows, ts)
        if offsets is not None and partitions is not None:
            # One partition per user (the input is keyed by user), so the newest offset is the one to keep.
            self.partition[rows] = partitions
            np.maximum.at(self.offset, rows, offsets)

    def drain(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        rows = np.flatnonzero(self.mask)
        out = rows, self.event_ts[rows].copy(), self.partition[rows].copy(), self.offset[rows].copy()
        self.mask[rows] = False
        self.event_ts[rows] = -1
        self.offset[rows] = -1
        return out


def decode(value: str | bytes) -> dict[str, Any]:
    rec: dict[str, Any] = orjson.loads(value)
    return rec
