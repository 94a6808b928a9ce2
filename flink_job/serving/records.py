"""The embedding records the serving index reads: validated in full before the index changes, each fault a
``Malformed`` with a short reason (the metric label) and what is wrong. A value is JSON or binary
(``flink_job.stages.binary_records``), told apart by its first byte, so a topic may hold both; a binary value that
cannot be read is ``Malformed("binary", ...)``, skipped and counted like any other."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import orjson

from flink_job.stages.binary_records import decode_binary, is_binary

if TYPE_CHECKING:
    from flink_job.serving.config import ServingConfig

INT64_MAX = 2**63 - 1


class Malformed(ValueError):
    """A record the index skips: ``reason`` is one of a few names (the metric label), ``detail`` says what."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


class Record(NamedTuple):
    """A validated embedding record."""

    kind: str
    id: str
    version: int
    step: int
    bias: float
    vector: np.ndarray
    events: int
    seen: tuple[str, ...] | None
    event_ts: int
    partition: int
    offset: int




def parse_key(key: bytes | None, required: bool, max_id_length: int) -> tuple[str, str]:
    """``(kind, id)`` of a key ``<user|item>:<id>``; ``("", "")`` for no key where none is required."""
    if key is None:
        if required:
            raise Malformed("key", "no key")
        return "", ""
    try:
        text = key.decode("utf-8")
    except UnicodeDecodeError:
        raise Malformed("key", "not UTF-8") from None
    kind, sep, ident = text.partition(":")
    if not sep or kind not in ("user", "item"):
        raise Malformed("key", f"not '<user|item>:<id>': {text[:100]!r}")
    check_id(ident, "key", max_id_length)
    return kind, ident

def check_id(ident: object, reason: str, max_id_length: int) -> None:
    if not isinstance(ident, str) or not 0 < len(ident) <= max_id_length:
        shown = repr(ident)[:100]
        raise Malformed(reason, f"id must be a string of 1..{max_id_length} characters, got {shown}")

def parse_record(key: bytes | None, value: bytes, config: ServingConfig, dim: int | None) -> Record:
    """The record validated in full, or ``Malformed`` naming what is wrong; ``dim``: the index's vector length, once
    it has one."""
    key_kind, key_id = parse_key(key, False, config.max_id_length)
    rec = _fields(value)
    kind, ident = rec.get("kind"), rec.get("id")
    if not isinstance(kind, str) or kind not in ("user", "item"):
        raise Malformed("kind", f"kind must be 'user' or 'item', got {repr(kind)[:100]}")
    check_id(ident, "id", config.max_id_length)
    assert isinstance(ident, str)
    if key is not None and (key_kind, key_id) != (kind, ident):
        raise Malformed("key", f"the key {key_kind}:{key_id[:100]} does not match the value's {kind}:{ident[:100]}")
    seen = rec.get("seen")
    return Record(
        kind, ident,
        version=_integer(rec, "version", None, 0, INT64_MAX),
        step=_integer(rec, "step", None, -1, INT64_MAX),
        bias=_number(rec.get("bias"), "bias", config.max_abs_value),
        vector=_vector(rec.get("vector"), config, dim),
        events=_integer(rec, "events", 0, 0, INT64_MAX),
        seen=None if seen is None else _seen(seen, config),
        event_ts=_integer(rec, "event_ts", -1, -INT64_MAX - 1, INT64_MAX),
        partition=_integer(rec, "partition", -1, -1, 2**31 - 1),
        offset=_integer(rec, "offset", -1, -1, INT64_MAX),
    )


def _fields(value: bytes) -> dict[str, Any]:
    """The value's fields, of either format."""
    if is_binary(value):
        try:
            return decode_binary(value)
        except ValueError as ex:
            raise Malformed("binary", str(ex)[:200]) from None
    try:
        rec = orjson.loads(value)
    except orjson.JSONDecodeError as ex:
        raise Malformed("json", str(ex)[:200]) from None
    if not isinstance(rec, dict):
        raise Malformed("json", f"the value is a {type(rec).__name__}, not an object")
    return rec


def _vector(values: object, config: ServingConfig, dim: int | None) -> np.ndarray:
    """A JSON list of numbers, or a binary record's float32 array."""
    if not isinstance(values, list | np.ndarray) or not 0 < len(values) <= config.max_dim:
        raise Malformed("vector", f"must be a list of 1..{config.max_dim} numbers, got {repr(values)[:100]}")
    if dim is not None and len(values) != dim:
        raise Malformed("vector", f"has {len(values)} values, expected {dim}")
    if isinstance(values, list) and not all(type(v) is float or type(v) is int for v in values):
        raise Malformed("vector", "holds a value that is not a number")
    vec = np.asarray(values, np.float64)
    if not np.isfinite(vec).all() or float(np.abs(vec).max()) > config.max_abs_value:
        raise Malformed("vector", f"holds a value that is not finite or beyond +-{config.max_abs_value:g}")
    return vec.astype(np.float32)

def _seen(seen: object, config: ServingConfig) -> tuple[str, ...]:
    limit = config.max_id_length
    if (not isinstance(seen, list) or len(seen) > config.max_seen
            or not all(isinstance(s, str) and len(s) <= limit for s in seen)):
        raise Malformed("seen", f"must be a list of at most {config.max_seen} ids, got {repr(seen)[:100]}")
    return tuple(dict.fromkeys(seen))  # a tuple: far smaller than a set, and only iterated


def _integer(rec: dict[str, Any], name: str, default: int | None, lo: int, hi: int) -> int:
    """An integer field in ``lo..hi`` (a bool, float or string is not one); ``default`` when absent, if allowed."""
    value = rec.get(name, default)
    if type(value) is not int or not lo <= value <= hi:
        raise Malformed(name, f"must be an integer in {lo}..{hi}, got {repr(value)[:100]}")
    return value


def _number(value: object, name: str, limit: float) -> float:
    if type(value) not in (int, float) or not abs(float(value)) <= limit:  # type: ignore[arg-type]
        raise Malformed(name, f"must be a number within +-{limit:g}, got {repr(value)[:100]}")
    return float(value)  # type: ignore[arg-type]


def example_record(kind: str, ident: str, version: int, vector: list[float], bias: float = 0.0, step: int = 1,
         **extra: Any) -> bytes:
    """A hand-made embedding record value in the job's format (``flink_job.stages.publish``), for examples and tests."""
    return orjson.dumps({"kind": kind, "id": ident, "version": version, "step": step, "bias": bias,
                         "vector": vector, "event_ts": 0, "produced_ms": 0, **extra})
