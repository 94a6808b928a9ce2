"""The binary value format of embedding records (``publish.format: binary``), beside JSON: the same fields, float32
vectors as they are, a third of the bytes of JSON at dimension 32 and no number formatting to encode.

A value is told from a JSON one by its first byte, ``MAGIC`` (0xEB), which no JSON text starts with, so one topic
can hold both while a job changes format; serving reads both (``flink_job.serving.records``). Layout, version 1,
little-endian, no padding::

    offset  type      field
    0       u8        MAGIC 0xEB
    1       u8        VERSION 1 (a reader rejects any other)
    2       u8        kind: 0 user, 1 item
    3       u8        flags: 1 events present, 2 partition and offset present, 4 seen present
    4       u16       D: vector length
    6       u16       L: id length in UTF-8 bytes
    8       i64 x 6   version, step, updates, event_ts, produced_ms, events (0 when absent)
    56      i32       partition (-1 when absent)
    60      i64       offset (-1 when absent)
    68      f32       bias
    72      L bytes   id, UTF-8
    72+L    f32 x D   vector
    then, with flag 4: u16 count C, u16 x C lengths of the seen items, and their UTF-8 bytes one after another

>>> value = encode_binary("item", "i7", np.array([0.5, -1.0], np.float32), 0.25, 3, 9, 9, 100, 5, events=4)
>>> len(value), value[:2].hex()
(82, 'eb01')
>>> rec = decode_binary(value)
>>> rec["id"], rec["vector"].tolist(), rec["bias"], rec["events"], "partition" in rec
('i7', [0.5, -1.0], 0.25, 4, False)
"""
from __future__ import annotations

import struct
from itertools import accumulate
from typing import Any

import numpy as np

from model.arrays import Array

MAGIC = 0xEB
VERSION = 1
KINDS = ("user", "item")
EVENTS, POSITION, SEEN = 1, 2, 4
HEADER = struct.Struct("<BBBBHHqqqqqqiqf")
_U16 = struct.Struct("<H")
_INTS = ("version", "step", "updates", "event_ts", "produced_ms")


def encode_binary(kind: str, ident: str, vector: Array, bias: float, updates: int, version: int, step: int,
                  event_ts: int, produced_ms: int, partition: int = -1, offset: int = -1, events: int | None = None,
                  seen: list[str] | None = None) -> bytes:
    """One record's value; ``vector`` float32 (D,). ``partition`` -1: no input position (items)."""
    key = ident.encode("utf-8")
    flags = (EVENTS if events is not None else 0) | (POSITION if partition >= 0 else 0) | (SEEN if seen is not None else 0)
    head = HEADER.pack(MAGIC, VERSION, KINDS.index(kind), flags, len(vector), len(key), version, step, updates,
                       event_ts, produced_ms, events or 0, partition, offset, bias)
    parts = [head, key, vector.tobytes()]
    if seen is not None:
        raws = [item.encode("utf-8") for item in seen]
        parts.append(struct.pack(f"<{len(raws) + 1}H", len(raws), *map(len, raws)))
        parts.extend(raws)
    return b"".join(parts)


def is_binary(value: bytes) -> bool:
    return value[:1] == bytes([MAGIC])


def decode_binary(value: bytes) -> dict[str, Any]:
    """The record's fields as the JSON format names them (``vector`` a float32 array), or ``ValueError`` saying what
    is wrong with the value: it never reads past the value's end."""
    if len(value) < HEADER.size:
        raise ValueError(f"{len(value)} bytes, shorter than the {HEADER.size}-byte header")
    (magic, version, kind, flags, dim, id_len, rec_version, step, updates, event_ts, produced_ms, events, partition,
     offset, bias) = HEADER.unpack_from(value)
    if magic != MAGIC or version != VERSION:
        raise ValueError(f"magic {magic:#x} version {version}: only {MAGIC:#x} version {VERSION} is known")
    if kind >= len(KINDS) or flags & ~(EVENTS | POSITION | SEEN):
        raise ValueError(f"kind {kind} or flags {flags:#x} unknown")
    at = HEADER.size + id_len
    end = at + 4 * dim
    if len(value) < end:
        raise ValueError(f"{len(value)} bytes, too short for an id of {id_len} bytes and {dim} floats")
    rec: dict[str, Any] = {"kind": KINDS[kind], "id": _text(value, HEADER.size, at, "id"), "bias": bias,
                           "vector": np.frombuffer(value, np.float32, dim, at).copy(),
                           **dict(zip(_INTS, (rec_version, step, updates, event_ts, produced_ms), strict=True))}
    if flags & EVENTS:
        rec["events"] = events
    if flags & POSITION:
        rec["partition"], rec["offset"] = partition, offset
    if flags & SEEN:
        rec["seen"], end = _seen(value, end)
    if end != len(value):
        raise ValueError(f"{len(value) - end} bytes left over after the record")
    return rec


def _seen(value: bytes, at: int) -> tuple[list[str], int]:
    if len(value) < at + 2:
        raise ValueError("the seen list's count is cut off")
    (count,), at = _U16.unpack_from(value, at), at + 2
    if len(value) < at + 2 * count:
        raise ValueError(f"the lengths of {count} seen items are cut off")
    lengths = struct.unpack_from(f"<{count}H", value, at)
    at += 2 * count
    end = at + sum(lengths)
    if end > len(value):
        raise ValueError(f"{count} seen items run past the value's end")
    try:
        text = value[at:end].decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("a seen item is not UTF-8") from None
    if len(text) == end - at:  # ASCII, as ids mostly are: cut the text where the bytes are cut
        bounds = list(accumulate(lengths, initial=0))
        return [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)], end
    seen, start = [], at
    for n in lengths:
        seen.append(_text(value, start, start + n, "a seen item"))
        start += n
    return seen, end


def _text(value: bytes, start: int, end: int, what: str) -> str:
    if end > len(value):
        raise ValueError(f"{what} runs past the value's end")
    try:
        return value[start:end].decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{what} is not UTF-8") from None
