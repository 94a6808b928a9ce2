"""Embedding records: one per touched user or item id, keyed ``"<kind>:<id>"`` for a compacted topic.

The version of a record is the model step it was published at, so it only grows per id, also across an expiry
(a tombstone) and a re-admission; ``updates`` counts the moves of the id's row. A user
record also carries the input position of the newest event of that user it reflects (``partition``, ``offset``),
which is what freshness is measured against. A value is JSON or, with ``publish.format: binary``, the layout of
``flink_job.stages.binary_records``; ``decode`` reads both.

>>> rec = decode(encode_records("user", ["u1"], np.ones((1, 2), np.float32), np.zeros(1, np.float32),
...                             np.array([3]), 9, np.array([5]), np.array([0]), np.array([41]))[0][1])
>>> rec["id"], rec["version"], rec["updates"], rec["vector"], rec["offset"]
('u1', 9, 3, [1.0, 1.0], 41)
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from flink_job.stages.binary_records import decode_binary, encode_binary, is_binary
from model.arrays import Array


def encode_records(
    kind: str,
    ids: list[str],
    vectors: Array,  # (N, D)
    biases: Array,  # (N,)
    updates: Array,  # (N,) how often each row was moved
    step: int,  # the model step: also each record's version, which therefore grows per id
    event_ts: Array,  # (N,) newest event time reflected, -1 if none
    partitions: Array | None = None,  # (N,) users only
    offsets: Array | None = None,  # (N,) users only
    events: Array | None = None,  # (N,) events each id was trained on
    seen: list[list[str]] | None = None,  # (N,) users only: the user's recent items, for serving to exclude
    fmt: str = "json",  # or "binary" (publish.format)
) -> list[tuple[str, bytes]]:
    """``(key, value)`` pairs for the embeddings topic, the values in format ``fmt``."""
    now = int(time.time() * 1000)
    vecs = np.ascontiguousarray(vectors, np.float32)  # float32 serialises in its shortest form: half the bytes
    # Columns as Python numbers once, for both formats: converting a NumPy scalar per field and record cost more
    # than the encoding.
    upd, bias, ts = updates.tolist(), biases.tolist(), event_ts.tolist()
    evs = events.tolist() if events is not None else None
    position = partitions is not None and offsets is not None
    parts = partitions.tolist() if position else None  # type: ignore[union-attr]
    offs = offsets.tolist() if position else None  # type: ignore[union-attr]
    if fmt == "binary":
        return [
            (f"{kind}:{key}", encode_binary(
                kind, key, vecs[n], bias[n], upd[n], step, step, ts[n], now,
                parts[n] if parts is not None else -1, offs[n] if offs is not None else -1,
                evs[n] if evs is not None else None, seen[n] if seen is not None else None))
            for n, key in enumerate(ids)
        ]
    dumps, option = orjson.dumps, orjson.OPT_SERIALIZE_NUMPY
    out = []
    for n, key in enumerate(ids):
        rec: dict[str, Any] = {"kind": kind, "id": key, "version": step, "step": step, "updates": upd[n],
                               "bias": bias[n], "vector": vecs[n], "event_ts": ts[n], "produced_ms": now}
        if evs is not None:
            rec["events"] = evs[n]
        if parts is not None and offs is not None:
            rec["partition"] = parts[n]
            rec["offset"] = offs[n]
        if seen is not None:
            rec["seen"] = seen[n]
        out.append((f"{kind}:{key}", dumps(rec, option=option)))
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
        self.cursor = 0  # where the next capped drain starts

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

    def touch(self, rows: Array, ts: Array | None = None, partitions: Array | None = None,
              offsets: Array | None = None) -> None:
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

    def drain(self, limit: int = 0, only: Array | None = None) -> tuple[Array, Array, Array, Array]:
        """Takes the dirty rows (of ``only``, if given), at most ``limit`` of them (0: all), and clears them.

        Under a cap, the rows taken continue where the last capped drain stopped, so no row waits forever.

        >>> d = DirtyRows()
        >>> d.touch(np.array([1, 3, 5, 7]))
        >>> d.drain(limit=2)[0].tolist(), d.drain(limit=2, only=np.array([7, 8]))[0].tolist(), d.drain()[0].tolist()
        ([1, 3], [7], [5])
        """
        if only is None:
            rows = np.flatnonzero(self.mask)
        else:
            only = only[only < len(self.mask)]
            rows = np.unique(only[self.mask[only]])
        if limit and len(rows) > limit:
            taken = np.roll(rows, -int(np.searchsorted(rows, self.cursor)))[:limit]
            self.cursor = int(taken[-1]) + 1
            rows = np.sort(taken)
        out = rows, self.event_ts[rows].copy(), self.partition[rows].copy(), self.offset[rows].copy()
        self.mask[rows] = False
        self.event_ts[rows] = -1
        self.offset[rows] = -1
        return out

    def state(self) -> dict[str, Any]:
        """The dirty rows only (with their times and positions): what a checkpoint needs, a fraction of the arrays.

        >>> d = DirtyRows()
        >>> d.touch(np.array([5]), np.array([9]), np.array([1]), np.array([70]))
        >>> e = DirtyRows.from_state(d.state())
        >>> [a.tolist() for a in e.drain()]
        [[5], [9], [1], [70]]
        """
        rows = np.flatnonzero(self.mask)
        return {"rows": rows, "event_ts": self.event_ts[rows], "partition": self.partition[rows],
                "offset": self.offset[rows], "cursor": self.cursor, "size": len(self.mask)}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> DirtyRows:
        d = cls()
        if "mask" in state:  # written before only the dirty rows were kept: the whole arrays
            for name in ("mask", "event_ts", "partition", "offset", "cursor"):
                setattr(d, name, state[name])
            return d
        d._grow(int(state["size"]))
        rows = state["rows"]
        d.mask[rows] = True
        d.event_ts[rows] = state["event_ts"]
        d.partition[rows] = state["partition"]
        d.offset[rows] = state["offset"]
        d.cursor = int(state["cursor"])
        return d


class Drift:
    """The vectors of one table as last published, to tell which touched rows moved by more than a tolerance.

    >>> d = Drift()
    >>> d.published(np.array([0, 1]), np.array([[1.0, 0.0], [0.0, 1.0]], np.float32))
    >>> d.moved(np.array([0, 1, 2]), np.array([[1.05, 0.0], [0.0, 2.0], [1.0, 1.0]], np.float32), 0.1).tolist()
    [False, True, True]
    """

    def __init__(self) -> None:
        self.vectors = np.zeros((0, 0), np.float32)  # (R, D) as last published; rows never published are zero
        self.known = np.zeros(0, bool)  # (R,)

    def published(self, rows: Array, vectors: Array) -> None:
        if not len(rows):
            return
        need = int(rows.max()) + 1
        if need > len(self.known) or self.vectors.shape[1] != vectors.shape[1]:
            cap = max(need, 2 * len(self.known), 1024)
            grown = np.zeros((cap, vectors.shape[1]), np.float32)
            known = np.zeros(cap, bool)
            if self.vectors.shape[1] == vectors.shape[1]:
                grown[: len(self.known)] = self.vectors
                known[: len(self.known)] = self.known
            self.vectors, self.known = grown, known
        self.vectors[rows] = vectors
        self.known[rows] = True

    def moved(self, rows: Array, vectors: Array, tolerance: float) -> Array:
        """(N,) whether each row's vector differs from its published one by more than ``tolerance`` relative to
        the published norm; a row never published counts as moved."""
        known = np.zeros(len(rows), bool)
        inside = rows < len(self.known)
        known[inside] = self.known[rows[inside]]
        old = np.zeros_like(vectors)
        if known.any():
            old[known] = self.vectors[rows[known]]
        change = np.linalg.norm(vectors - old, axis=1)
        moved: Array = ~known | (change > tolerance * np.maximum(np.linalg.norm(old, axis=1), 1e-6))
        return moved


SNAPSHOT_FILE = "embeddings.npz"


def write_snapshot(folder: Path, model: Any) -> Path:
    """Writes every user and item row as NumPy arrays with an id index to ``folder/embeddings.npz``, replacing the
    previous file atomically (a reader never sees half a file).

    Arrays: ``<kind>_ids`` (N,) str, ``<kind>_vectors`` (N, D) float32, ``<kind>_bias`` (N,), ``<kind>_updates``
    (N,), for kind user and item, and ``step`` (the version of every row in the file). Load with ``numpy.load(path)``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, Array] = {"step": np.array(model.step)}
    for kind, idmap in (("user", model.users), ("item", model.items)):
        rows = np.flatnonzero(idmap.live_mask())  # rows holding an id: not the fallback row, not free rows
        vectors, biases, updates = model.vectors(kind, rows)
        arrays.update({f"{kind}_ids": np.array(idmap.ids(rows), dtype=str), f"{kind}_vectors": vectors,
                       f"{kind}_bias": biases, f"{kind}_updates": updates})
    tmp = folder / f".{SNAPSHOT_FILE}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    path = folder / SNAPSHOT_FILE
    os.replace(tmp, path)
    return path


def decode(value: str | bytes) -> dict[str, Any]:
    """A record value of either format as a dict (a binary one's vector as a list, as JSON has it)."""
    if isinstance(value, bytes) and is_binary(value):
        rec = decode_binary(value)
        rec["vector"] = rec["vector"].tolist()
        return rec
    loaded: dict[str, Any] = orjson.loads(value)
    return loaded
