"""What one replica's training changed on item rows, keyed by item id, and its compact wire format.

A user-sharded trainer owns its users' rows and keeps a replica of the whole item table; replicas stay in step by
exchanging ``ItemDelta`` records (``model.item_sync`` takes and applies them). Ids, not row numbers: each replica has
its own id map. Everything is a difference that adds up over replicas (parameters, optimiser sums, counts), except
``pop`` (the log of the decayed event count added, combined by ``logaddexp``), ``last_seen`` (newest event time,
combined by max) and ``origin`` (the starting parameters of rows the sender admitted, so that a replica admitting
the id from the delta starts where the sender did).

>>> d = ItemDelta.empty(dim=2, moment=False)
>>> decode(encode(d)).ids, len(encode(d))
([], 49)
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

Array = np.ndarray[Any, Any]
MAGIC = b"SRID"
VERSION = 1
# magic, version, dim, has Adam moments, rows, origin rows, then the scalar deltas: rating sum, rating count,
# events counted, clock (newest event time, ms)
_HEAD = struct.Struct("<4sHHBIIdqqq")


@dataclass
class ItemDelta:
    """Changes of ``n`` item rows since the sender's last take, row ``k`` for ``ids[k]``."""

    ids: list[str]  # (n,)
    params: Array  # (n, D + 2) float32: vector | ranking bias | rating bias
    acc: Array  # (n, 3) float32: Adagrad sums (or Adam second moments); column 2 the Newton rating count
    moment: Array  # (n, D + 2) float32 under Adam, (n, 0) otherwise
    steps: Array  # (n,) int64 optimiser steps
    updates: Array  # (n,) int64 times moved
    events: Array  # (n,) int64 events trained
    pop: Array  # (n,) float64 log of the decayed event count added; -inf: none
    last_seen: Array  # (n,) int64 newest event time (ms) of the row at the sender
    origin_index: Array  # (m,) int64 positions in ``ids`` of rows the sender admitted since its last take
    origin: Array  # (m, D + 2) float32 their parameters as admitted (before any training)
    rating_sum: float = 0.0  # global rating mean: sum and count of the ratings the sender trained
    rating_count: int = 0
    events_counted: int = 0  # events added to the popularity frame (model.ranking_extras)
    clock_ms: int = field(default=np.iinfo(np.int64).min)  # the sender's newest event time

    @classmethod
    def empty(cls, dim: int, moment: bool) -> ItemDelta:
        f = np.zeros((0, dim + 2), np.float32)
        i = np.zeros(0, np.int64)
        return cls([], f, np.zeros((0, 3), np.float32), f if moment else np.zeros((0, 0), np.float32), i, i, i,
                   np.zeros(0), i, i, f)

    @property
    def dim(self) -> int:
        return int(self.params.shape[1]) - 2

    def __len__(self) -> int:
        return len(self.ids)


def encode(d: ItemDelta) -> bytes:
    """The delta in ``VERSION``'s layout: a header, the ids (UTF-8, length-prefixed), then the columns
    (float32 parameters and optimiser state, int32 counts, float64 popularity, int64 times)."""
    n, m = len(d), len(d.origin_index)
    head = _HEAD.pack(MAGIC, VERSION, d.dim, bool(d.moment.shape[1]), n, m, d.rating_sum, d.rating_count,
                      d.events_counted, d.clock_ms)
    raw = [k.encode() for k in d.ids]
    lengths = np.array([len(k) for k in raw], "<u4")
    columns = [d.params.astype("<f4"), d.acc.astype("<f4"), d.moment.astype("<f4"), _int32(d.steps),
               _int32(d.updates), _int32(d.events), d.pop.astype("<f8"), d.last_seen.astype("<i8"),
               d.origin_index.astype("<u4"), d.origin.astype("<f4")]
    return b"".join([head, lengths.tobytes(), *raw, *(c.tobytes() for c in columns)])


def split(d: ItemDelta, max_bytes: int) -> list[ItemDelta]:
    """``d`` cut into consecutive runs of rows whose records each ``encode`` to at most ``max_bytes`` (a single row
    larger than that alone), so that no record outgrows a Kafka message. Applied in order, the parts add up to
    ``d``: the scalar deltas travel with the first part, the clock with each (it combines by max).

    >>> d = ItemDelta.empty(dim=2, moment=False)
    >>> [len(p) for p in split(d, 1000)], len(encode(d))
    ([0], 49)
    """
    n, width = len(d), d.params.shape[1]
    origin_of = np.zeros(n, bool)
    origin_of[d.origin_index] = True
    # Each row's bytes in encode's layout: its id (length-prefixed), its columns, and its origin if it has one.
    per_row = (4 + np.array([len(k.encode()) for k in d.ids], np.int64) + 4 * width + 12 + 4 * d.moment.shape[1]
               + 12 + 8 + 8 + origin_of * (4 + 4 * width))
    if _HEAD.size + int(per_row.sum()) <= max_bytes:  # the usual case: no per-row walk after every trained call
        return [d]
    bounds, size = [0], _HEAD.size
    for k, b in enumerate(per_row.tolist()):
        if size + b > max_bytes and k > bounds[-1]:
            bounds.append(k)
            size = _HEAD.size
        size += b
    bounds.append(n)
    parts = []
    for j, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=False)):
        mine = (d.origin_index >= a) & (d.origin_index < b)
        first = j == 0
        parts.append(ItemDelta(
            d.ids[a:b], d.params[a:b], d.acc[a:b], d.moment[a:b], d.steps[a:b], d.updates[a:b], d.events[a:b],
            d.pop[a:b], d.last_seen[a:b], d.origin_index[mine] - a, d.origin[mine],
            d.rating_sum if first else 0.0, d.rating_count if first else 0, d.events_counted if first else 0,
            d.clock_ms))
    return parts


def decode(data: bytes) -> ItemDelta:
    """The delta ``encode`` wrote; ``ValueError`` for anything else (wrong magic, version, sizes or content)."""
    if len(data) < _HEAD.size:
        raise ValueError(f"item delta: {len(data)} bytes is shorter than the {_HEAD.size}-byte header")
    magic, version, dim, has_moment, n, m, rsum, rcount, counted, clock = _HEAD.unpack_from(data)
    if magic != MAGIC or version != VERSION:
        raise ValueError(f"item delta: header {magic!r} version {version}, expected {MAGIC!r} version {VERSION}")
    r = _Reader(data, _HEAD.size)
    lengths = r.take("<u4", n).astype(np.int64)
    ids = r.strings(lengths)
    d, md = dim + 2, (dim + 2) * bool(has_moment)
    out = ItemDelta(ids, r.take("<f4", n * d).reshape(n, d), r.take("<f4", n * 3).reshape(n, 3),
                    r.take("<f4", n * md).reshape(n, md), r.take("<i4", n).astype(np.int64),
                    r.take("<i4", n).astype(np.int64), r.take("<i4", n).astype(np.int64), r.take("<f8", n),
                    r.take("<i8", n), r.take("<u4", m).astype(np.int64), r.take("<f4", m * d).reshape(m, d),
                    rsum, rcount, counted, clock)
    if r.pos != len(data):
        raise ValueError(f"item delta: {len(data) - r.pos} bytes left over after {n} rows")
    if m and int(out.origin_index.max()) >= n:
        raise ValueError(f"item delta: an origin row points past the {n} rows")
    finite = [out.params, out.acc, out.moment, out.origin]
    if not all(np.isfinite(a).all() for a in finite) or np.isnan(out.pop).any() or np.isposinf(out.pop).any():
        raise ValueError("item delta: non-finite numbers")
    return out


class _Reader:
    def __init__(self, data: bytes, pos: int) -> None:
        self.data, self.pos = data, pos

    def take(self, dtype: str, count: int) -> Array:
        size = np.dtype(dtype).itemsize * count
        if self.pos + size > len(self.data):
            raise ValueError(f"item delta: truncated at byte {self.pos} (needs {size} more)")
        out = np.frombuffer(self.data, dtype, count, self.pos).copy()
        self.pos += size
        return out

    def strings(self, lengths: Array) -> list[str]:
        total = int(lengths.sum())
        if self.pos + total > len(self.data):
            raise ValueError(f"item delta: truncated in the ids at byte {self.pos}")
        ends = self.pos + np.cumsum(lengths)
        starts = ends - lengths
        try:
            ids = [self.data[a:b].decode() for a, b in zip(starts.tolist(), ends.tolist(), strict=True)]
        except UnicodeDecodeError as ex:
            raise ValueError(f"item delta: an id is not UTF-8 ({ex})") from ex
        self.pos += total
        return ids


def _int32(a: Array) -> Array:
    if len(a) and (a.min() < -(2**31) or a.max() >= 2**31):
        raise ValueError("item delta: a count delta does not fit in 32 bits")
    return a.astype("<i4")
