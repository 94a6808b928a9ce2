"""The rules one record must meet, checked one at a time, naming the first that fails: the parser's slow path, for
the records its typed decoder rejects. Also the chunk line framing, ``"<partition>,<offset>,<payload>"``.

>>> line_position("3,17,{}"), line_position("no commas")
((3, 17, '{}'), (-1, -1, 'no commas'))
>>> judge_record({"event_id": "e1", "user_id": "u1", "item_id": "i1", "action": "view", "ts": 5}, ParseRules(), 0)
('e1', 'u1', 'i1', 0, 1.0, 5, None, None, None)
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import orjson

from flink_job.schema import ACTIONS, FLOAT32_MAX, RATING_CODE
from flink_job.stages.events import DeadLetter

ACTION_CODES = {a: n for n, a in enumerate(ACTIONS)}
RATING = RATING_CODE
STAGE = "parse"
MAX_TS_MS = 10**14  # year 5138: anything above is not a millisecond timestamp
# Deepest nesting a record may have: the JVM's JSON parser (Jackson's StreamReadConstraints, EVENT_KEY) refuses
# deeper records, so the parser does too; otherwise the two would disagree on whether the record has an identity.
MAX_DEPTH = 1_000
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # integer ids: the range EVENT_KEY reads as a JVM long


@dataclass(frozen=True)
class ParseRules:
    max_id_length: int = 128
    rating_min: float = 1.0
    rating_max: float = 5.0
    max_record_chars: int = 65_536  # a record larger than this is not an event
    max_future_ms: int = 5 * 60 * 1000  # event time may run ahead of processing time by at most this
    max_value: float = 100.0  # the largest value (weight) of an implicit action; it must also be > 0


# The members that make an event's identity for de-duplication (EVENT_KEY in flink_job/flink/jvm reads the same). A record
# naming one of them twice, at any depth and whether or not the name is written with escapes, is ambiguous: the
# JVM gives it no key and the parser dead-letters it. Names are compared decoded, as both JSON readers see them.
ID_MEMBERS = ("event_id", "user_id")
# Every string of a well-formed JSON text, in order, and whether it is a member name (a colon follows).
_STRINGS = re.compile(r'"((?:[^"\\]|\\.)*)"(\s*:)?')


def ambiguous_ids(payload: str) -> list[str]:
    """The identity members ``payload`` (well-formed JSON) names more than once, sorted; empty if none."""
    seen: list[str] = []
    for m in _STRINGS.finditer(payload):
        if m.group(2) is None:
            continue
        name = m.group(1)
        if "\\" in name:
            name = orjson.loads(f'"{name}"')
        if name in ID_MEMBERS:
            seen.append(name)
    return sorted({n for n in seen if seen.count(n) > 1})


def _show(v: object) -> str:
    """A value for a dead letter's detail: short, and never the repr of a deep structure (that can recurse)."""
    if isinstance(v, str):
        return v[:40]
    if isinstance(v, (int, float)):
        return str(v)[:40]
    return type(v).__name__


def describe(ex: BaseException) -> str:
    return f"{type(ex).__name__}: {str(ex)[:120]}"


def line_position(line: object) -> tuple[int, int, str]:
    """``(partition, offset, payload)`` of a chunk line; ``(-1, -1, the line)`` for one that is not. Never raises."""
    try:
        p, o, payload = line.split(",", 2)  # type: ignore[attr-defined]
        return int(p), int(o), payload
    except Exception:
        return -1, -1, line if isinstance(line, str) else repr(line)[:1000]


def bad_line(line: object) -> DeadLetter:
    """The dead letter for a chunk line that is not ``"<partition>,<offset>,<payload>"``: ``null_value`` for a line
    without a payload (a Kafka record whose value is null, or only a key: ``CONCAT_WS`` in flink_job.flink.sql leaves
    the NULL out), else ``internal_error``."""
    parts = line.split(",") if isinstance(line, str) else []
    if len(parts) == 2 and all(_is_int(x) for x in parts):
        return DeadLetter("null_value", STAGE, "", int(parts[0]), int(parts[1]), "the record has no value (null)")
    text = line if isinstance(line, str) else repr(line)[:1000]
    return DeadLetter("internal_error", STAGE, text, -1, -1, f"not a chunk line: {type(line).__name__}")


def _is_int(text: str) -> bool:
    try:
        int(text)
        return True
    except ValueError:
        return False


def _id(d: dict[str, Any], name: str, rules: ParseRules) -> str:
    v = d.get(name)
    if v is None:
        raise Rejected(f"missing_{name}")
    if isinstance(v, bool) or not isinstance(v, (str, int)):
        raise Rejected(f"bad_type_{name}", type(v).__name__)
    if isinstance(v, int) and not INT64_MIN <= v <= INT64_MAX:
        raise Rejected(f"bad_type_{name}", "an integer beyond 64 bits")
    s = str(v)  # an integer id is its decimal string, as EVENT_KEY writes it: 42 and "42" are one id
    if not s.strip():
        raise Rejected(f"empty_{name}")
    if len(s) > rules.max_id_length:
        raise Rejected(f"{name}_too_long", str(len(s)))
    if any(ord(c) < 32 or 127 <= ord(c) < 160 or 0xD800 <= ord(c) < 0xE000 for c in s):
        # Control characters never belong in an id, and the de-duplication key joins ids with one (flink_job.flink.sql);
        # lone surrogates cannot be written out as UTF-8.
        raise Rejected(f"control_chars_in_{name}")
    if "\ufffd" in s:
        raise Rejected(f"invalid_utf8_in_{name}")  # the bytes were not UTF-8; the source decoded them to U+FFFD
    return s


class Rejected(Exception):
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


def _context_number(d: dict[str, Any], name: str) -> float | None:
    v = d.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise Rejected(f"bad_{name}", _show(v))
    if v < 0:
        raise Rejected(f"negative_{name}", _show(v))
    if v > FLOAT32_MAX:  # inf in the float32 features, and its square overflows the running statistics
        raise Rejected(f"bad_{name}", f"{_show(v)} beyond float32")
    return float(v)


def _category(d: dict[str, Any], rules: ParseRules) -> str | None:
    v = d.get("category")
    if v is None:
        return None
    if not isinstance(v, str):
        raise Rejected("bad_category", type(v).__name__)
    if len(v) > rules.max_id_length:
        raise Rejected("bad_category", f"{len(v)} chars")
    if any(ord(c) < 32 or 127 <= ord(c) < 160 for c in v):
        raise Rejected("bad_category", "control characters")
    return v if v.strip() else None  # a blank category says nothing: treated as absent


def judge_record(
    d: object, rules: ParseRules, now_ms: int
) -> tuple[str, str, str, int, float, int, float | None, float | None, str | None]:
    """The slow path: every check, naming the first one that fails. Returns the fields of one row."""
    if not isinstance(d, dict):
        raise Rejected("not_an_object", type(d).__name__)
    eid = _id(d, "event_id", rules)
    user = _id(d, "user_id", rules)
    item = _id(d, "item_id", rules)
    action = d.get("action")
    if action is None:
        raise Rejected("missing_action")
    code = ACTION_CODES.get(action) if isinstance(action, str) else None
    if code is None:
        raise Rejected("unknown_action", _show(action))
    ts = d.get("ts")
    if ts is None:
        raise Rejected("missing_ts")
    if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not math.isfinite(ts) or ts != int(ts):
        raise Rejected("bad_ts", _show(ts))
    if not 0 <= ts <= MAX_TS_MS:
        raise Rejected("ts_out_of_range", _show(ts))
    if ts > now_ms + rules.max_future_ms:
        raise Rejected("future_ts", f"{int(ts) - now_ms} ms ahead of processing time; at most {rules.max_future_ms}")
    value = d.get("value")
    if value is None:
        if code == RATING:
            raise Rejected("missing_value")
        value = 1.0
    elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise Rejected("bad_value", _show(value))
    if code == RATING:
        if not rules.rating_min <= value <= rules.rating_max:
            raise Rejected("rating_out_of_range", _show(value))
    elif not 0 < value <= rules.max_value:
        raise Rejected("value_out_of_range", f"{_show(value)} not in (0, {rules.max_value:g}]")
    dwell = _context_number(d, "dwell_ms")
    price = _context_number(d, "price")
    category = _category(d, rules)
    return eid, user, item, code, float(value), int(ts), dwell, price, category



def nesting_depth(payload: str) -> int:
    """How deep a JSON text nests objects and arrays, brackets inside strings not counted.

    >>> nesting_depth('{"a": [1, {"b": "[[["}]}')
    3
    """
    depth = deepest = 0
    for c in _STRINGS.sub("", payload):
        if c in "{[":
            depth += 1
            deepest = max(deepest, depth)
        elif c in "}]":
            depth -= 1
    return deepest
