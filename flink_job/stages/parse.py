"""Parse and validate chunk lines into a columnar batch of events; bad records become dead letters.

A chunk line is ``"<partition>,<offset>,<payload>"`` (see ``flink_job.flink.sql``). Parsing runs on a whole
chunk at once without a JVM (so it is tested without one) and costs about 2 µs per record: a typed decoder checks
the common event in C, and only records it rejects pay for the slower path that names the reason.

>>> batch, dead = parse_lines(['0,7,{"event_id":"e1","user_id":"u1","item_id":"i1","action":"view","ts":5}',
...                            '0,8,{"event_id":"e2"'])
>>> batch.users, batch.offsets.tolist()
(['u1'], [7])
>>> dead[0].reason, dead[0].offset
('invalid_json', 8)

No record fails the call: a line without a payload (a Kafka record whose value is null) is the dead letter
``null_value``, and an exception while judging one record is the dead letter ``internal_error`` naming its type.
"""
from __future__ import annotations

import functools
import logging
import math
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import msgspec
import numpy as np
import orjson
from msgspec import UNSET, UnsetType

from model.arrays import Array

from flink_job.schema import ACTIONS, CONTEXT_FIELDS, FLOAT32_MAX, N_FEATURES, RATING_CODE, Event

log = logging.getLogger(__name__)
ACTION_CODES = {a: n for n, a in enumerate(ACTIONS)}
RATING = RATING_CODE
STAGE = "parse"
MAX_TS_MS = 10**14  # year 5138: anything above is not a millisecond timestamp
# Deepest nesting a record may have: the JVM's JSON parser (Jackson's StreamReadConstraints, EVENT_KEY) refuses
# deeper records, so the parser does too; otherwise the two would disagree on whether the record has an identity.
MAX_DEPTH = 1_000
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # integer ids: the range EVENT_KEY reads as a JVM long


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
    ``flink_job.stages.clean`` fills them and adds ``features``, which stays empty, (0, F), until then.
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
    features: Array = field(default_factory=lambda: np.zeros((0, N_FEATURES), np.float32))  # (N, F) or (0, F)

    def __len__(self) -> int:
        return len(self.users)

    @property
    def has_features(self) -> bool:
        return len(self.features) == len(self.users) and len(self.users) > 0

    @staticmethod
    def concat(parts: list[EventBatch]) -> EventBatch:
        if len(parts) == 1:
            return parts[0]
        with_features = [p.has_features for p in parts if len(p)]
        if any(with_features) and not all(with_features):
            raise ValueError("EventBatch.concat: some parts have features (cleaned) and some do not")
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
            features=np.concatenate([p.features for p in parts]),
        )

    def slice(self, start: int, stop: int) -> EventBatch:
        return EventBatch(
            self.event_ids[start:stop], self.users[start:stop], self.items[start:stop],
            self.actions[start:stop], self.values[start:stop], self.ts[start:stop],
            self.partitions[start:stop], self.offsets[start:stop], self.payloads[start:stop],
            dwell_ms=self.dwell_ms[start:stop], price=self.price[start:stop], categories=self.categories[start:stop],
            features=self.features[start:stop],
        )

    def select(self, idx: Array) -> EventBatch:
        """The events at positions ``idx`` (N,), in that order."""
        ix = idx.tolist()  # Python ints index lists faster than numpy scalars
        return EventBatch(
            [self.event_ids[i] for i in ix], [self.users[i] for i in ix], [self.items[i] for i in ix],
            self.actions[idx], self.values[idx], self.ts[idx], self.partitions[idx], self.offsets[idx],
            [self.payloads[i] for i in ix] if self.payloads else [],
            dwell_ms=self.dwell_ms[idx], price=self.price[idx], categories=[self.categories[i] for i in ix],
            features=self.features[idx] if self.has_features else self.features,
        )


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


def _ambiguous(payload: str) -> list[str]:
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


def _describe(ex: BaseException) -> str:
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
        raise _Bad(f"missing_{name}")
    if isinstance(v, bool) or not isinstance(v, (str, int)):
        raise _Bad(f"bad_type_{name}", type(v).__name__)
    if isinstance(v, int) and not INT64_MIN <= v <= INT64_MAX:
        raise _Bad(f"bad_type_{name}", "an integer beyond 64 bits")
    s = str(v)  # an integer id is its decimal string, as EVENT_KEY writes it: 42 and "42" are one id
    if not s.strip():
        raise _Bad(f"empty_{name}")
    if len(s) > rules.max_id_length:
        raise _Bad(f"{name}_too_long", str(len(s)))
    if any(ord(c) < 32 or 127 <= ord(c) < 160 or 0xD800 <= ord(c) < 0xE000 for c in s):
        # Control characters never belong in an id, and the de-duplication key joins ids with one (flink_job.flink.sql);
        # lone surrogates cannot be written out as UTF-8.
        raise _Bad(f"control_chars_in_{name}")
    if "\ufffd" in s:
        raise _Bad(f"invalid_utf8_in_{name}")  # the bytes were not UTF-8; the source decoded them to U+FFFD
    return s


class _Bad(Exception):
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


def _context_number(d: dict[str, Any], name: str) -> float | None:
    v = d.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise _Bad(f"bad_{name}", _show(v))
    if v < 0:
        raise _Bad(f"negative_{name}", _show(v))
    if v > FLOAT32_MAX:  # inf in the float32 features, and its square overflows the running statistics
        raise _Bad(f"bad_{name}", f"{_show(v)} beyond float32")
    return float(v)


def _category(d: dict[str, Any], rules: ParseRules) -> str | None:
    v = d.get("category")
    if v is None:
        return None
    if not isinstance(v, str):
        raise _Bad("bad_category", type(v).__name__)
    if len(v) > rules.max_id_length:
        raise _Bad("bad_category", f"{len(v)} chars")
    if any(ord(c) < 32 or 127 <= ord(c) < 160 for c in v):
        raise _Bad("bad_category", "control characters")
    return v if v.strip() else None  # a blank category says nothing: treated as absent


def _event(
    d: object, rules: ParseRules, now_ms: int
) -> tuple[str, str, str, int, float, int, float | None, float | None, str | None]:
    """The slow path: every check, naming the first one that fails. Returns the fields of one row."""
    if not isinstance(d, dict):
        raise _Bad("not_an_object", type(d).__name__)
    eid = _id(d, "event_id", rules)
    user = _id(d, "user_id", rules)
    item = _id(d, "item_id", rules)
    action = d.get("action")
    if action is None:
        raise _Bad("missing_action")
    code = ACTION_CODES.get(action) if isinstance(action, str) else None
    if code is None:
        raise _Bad("unknown_action", _show(action))
    ts = d.get("ts")
    if ts is None:
        raise _Bad("missing_ts")
    if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not math.isfinite(ts) or ts != int(ts):
        raise _Bad("bad_ts", _show(ts))
    if not 0 <= ts <= MAX_TS_MS:
        raise _Bad("ts_out_of_range", _show(ts))
    if ts > now_ms + rules.max_future_ms:
        raise _Bad("future_ts", f"{int(ts) - now_ms} ms ahead of processing time; at most {rules.max_future_ms}")
    value = d.get("value")
    if value is None:
        if code == RATING:
            raise _Bad("missing_value")
        value = 1.0
    elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _Bad("bad_value", _show(value))
    if code == RATING:
        if not rules.rating_min <= value <= rules.rating_max:
            raise _Bad("rating_out_of_range", _show(value))
    elif not 0 < value <= rules.max_value:
        raise _Bad("value_out_of_range", f"{_show(value)} not in (0, {rules.max_value:g}]")
    dwell = _context_number(d, "dwell_ms")
    price = _context_number(d, "price")
    category = _category(d, rules)
    return eid, user, item, code, float(value), int(ts), dwell, price, category


@functools.lru_cache(maxsize=4)
def _fast_decoder(max_id_length: int) -> msgspec.json.Decoder[Any]:
    """A decoder for the common well-formed event; the fields it does not name are ignored."""
    ident = Annotated[str, msgspec.Meta(min_length=1, max_length=max_id_length)]
    amount = Annotated[float, msgspec.Meta(ge=0, le=FLOAT32_MAX)]
    fast_event = msgspec.defstruct(
        "FastEvent",
        [
            ("event_id", ident), ("user_id", ident), ("item_id", ident),
            ("action", Literal[ACTIONS]),
            ("ts", Annotated[int, msgspec.Meta(ge=0, le=MAX_TS_MS)]),
            ("value", float | UnsetType, UNSET),  # finite: the decoder rejects numbers beyond double range
            ("dwell_ms", amount | None, None),
            ("price", amount | None, None),
            ("category", Annotated[str, msgspec.Meta(min_length=1, max_length=max_id_length)] | None, None),
        ],
    )
    return msgspec.json.Decoder(fast_event)


def parse_lines(
    lines: Iterable[str], rules: ParseRules = ParseRules(), now_ms: int | None = None
) -> tuple[EventBatch, list[DeadLetter]]:
    """Lines -> (valid events in input order, dead letters). ``now_ms`` is the processing time."""
    # One function, about 120 lines: the per-record loop is the job's hottest Python (about 2 µs a record), and
    # its locals and column lists stay in one frame rather than paying a call per record and per field.
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    latest_ts = min(MAX_TS_MS, now_ms + rules.max_future_ms)
    eids: list[str] = []
    users: list[str] = []
    items: list[str] = []
    codes: list[int] = []
    values: list[float] = []
    tss: list[int] = []
    dwells: list[float | None] = []
    prices: list[float | None] = []
    cats: list[str | None] = []
    parts: list[int] = []
    offs: list[int] = []
    payloads: list[str] = []
    dead: list[DeadLetter] = []
    lo, hi, max_value = rules.rating_min, rules.rating_max, rules.max_value
    codes_of = ACTION_CODES
    decode = _fast_decoder(rules.max_id_length).decode
    ok: bool
    e: Any
    # One event's fields: read from the decoded record, their types checked at run time below.
    eid: Any
    user: Any
    item: Any
    code: Any
    value: Any
    ts: Any
    dwell: Any
    price: Any
    cat: Any
    for line in lines:
        try:
            p, o, payload = line.split(",", 2)
            part, off = int(p), int(o)
        except Exception:
            dead.append(bad_line(line))
            continue
        # Whatever a record holds, judging it must not fail the call (a poison pill restarts the job for ever):
        # an exception becomes this record's dead letter. Free on the common path (zero-cost try).
        try:
            if len(payload) > rules.max_record_chars:
                dead.append(DeadLetter("record_too_large", STAGE, payload, part, off, str(len(payload))))
                continue
            if len(payload) > MAX_DEPTH and nesting_depth(payload) > MAX_DEPTH:  # short records cannot be too deep
                dead.append(DeadLetter("too_deep", STAGE, payload, part, off, f"more than {MAX_DEPTH} levels"))
                continue
            # Cheap test for an ambiguous identity (an id member named twice, or any escape, which a name may hide
            # behind: one memchr, where looking for "\u" costs 10x more); such a record takes the slow path, which
            # applies the exact rule on the decoded names.
            suspect = payload.count('"event_id"') > 1 or payload.count('"user_id"') > 1 or "\\" in payload
            # Fast path: a typed decoder checks the common well-formed event's types, id lengths, action, ts range
            # and number bounds in C (2x faster than orjson plus checks in Python); what it cannot express is checked
            # inline. Anything unusual takes the slow path, orjson and _event, which names the reason.
            e = None
            if not suspect:
                try:
                    e = decode(payload)
                except (msgspec.ValidationError, msgspec.DecodeError, RecursionError):
                    pass  # RecursionError: nesting deeper than msgspec follows; orjson names it below
            if e is not None:
                eid, user, item, ts, value = e.event_id, e.user_id, e.item_id, e.ts, e.value
                code = codes_of[e.action]
                dwell, price, cat = e.dwell_ms, e.price, e.category
                if (
                    ts <= latest_ts
                    and not (eid.isspace() or user.isspace() or item.isspace())
                    and eid.isprintable() and user.isprintable() and item.isprintable()
                    and "\ufffd" not in eid and "\ufffd" not in user and "\ufffd" not in item
                    and (cat is None or (cat.isprintable() and not cat.isspace()))
                ):
                    if value is UNSET:
                        value = 1.0
                        ok = code != RATING  # a rating must carry its value
                    else:
                        ok = lo <= value <= hi if code == RATING else 0 < value <= max_value
                else:
                    ok = False
            else:
                ok = False
            if not ok:
                try:
                    d = orjson.loads(payload)
                except orjson.JSONDecodeError as ex:
                    dead.append(DeadLetter("invalid_json", STAGE, payload, part, off, str(ex)[:80]))
                    continue
                repeated = _ambiguous(payload) if suspect else None
                if repeated:
                    dead.append(DeadLetter("duplicate_keys", STAGE, payload, part, off, ",".join(repeated)))
                    continue
                try:
                    eid, user, item, code, value, ts, dwell, price, cat = _event(d, rules, now_ms)
                except _Bad as bad:
                    dead.append(DeadLetter(bad.reason, STAGE, payload, part, off, bad.detail))
                    continue
        except Exception as ex:
            log.warning("parse: record at %d/%d dead-lettered as internal_error: %s", part, off, _describe(ex))
            dead.append(DeadLetter("internal_error", STAGE, payload, part, off, _describe(ex)))
            continue
        eids.append(eid)
        users.append(user)
        items.append(item)
        codes.append(code)
        values.append(value)
        tss.append(ts)
        dwells.append(dwell)
        prices.append(price)
        cats.append(cat)
        parts.append(part)
        offs.append(off)
        payloads.append(payload)
    batch = EventBatch(
        eids, users, items,
        np.array(codes, np.int8), np.array(values, np.float32), np.array(tss, np.int64),
        np.array(parts, np.int32), np.array(offs, np.int64), payloads,
        dwell_ms=np.array(dwells, np.float64), price=np.array(prices, np.float64), categories=cats,
    )
    return batch, dead


def parse_event(raw: bytes | str) -> Event:
    """One record's payload as an ``Event``, judged by the job's own rules; raises ``ValueError`` with the reason.

    >>> e = Event("e-1", "u1", "i2", "click", 1.0, 1700000000000)
    >>> parse_event(e.to_json()) == e
    True
    >>> parse_event('{"event_id": "e-2"}')
    Traceback (most recent call last):
    ...
    ValueError: event: missing_user_id : '{"event_id": "e-2"}'
    """
    text = raw.decode() if isinstance(raw, bytes) else raw
    batch, dead = parse_lines([f"0,0,{text}"])  # partition and offset do not matter for one payload
    if dead:
        raise ValueError(f"event: {dead[0].reason} {dead[0].detail}: {text[:80]!r}")
    context = {k: v for k, v in orjson.loads(text).items() if k in CONTEXT_FIELDS}
    return Event(batch.event_ids[0], batch.users[0], batch.items[0], ACTIONS[int(batch.actions[0])],
                 float(batch.values[0]), int(batch.ts[0]), context)


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
