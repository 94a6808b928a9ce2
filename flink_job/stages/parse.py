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
import time
from collections.abc import Iterable
from typing import Annotated, Any, Literal

import msgspec
import numpy as np
import orjson
from msgspec import UNSET, UnsetType

from flink_job.schema import ACTIONS, CONTEXT_FIELDS, FLOAT32_MAX, Event
from flink_job.stages.events import DeadLetter, EventBatch
from flink_job.stages.parse_rules import (
    ACTION_CODES, MAX_DEPTH, MAX_TS_MS, RATING, STAGE, ParseRules, Rejected, ambiguous_ids, bad_line, describe,
    judge_record, line_position, nesting_depth,
)

# The batch container and the slow path's rules live beside this module; users import them from here too.
__all__ = ["DeadLetter", "EventBatch", "ParseRules", "line_position", "nesting_depth", "parse_event", "parse_lines"]

log = logging.getLogger(__name__)


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
    lo, hi, max_value, max_chars = rules.rating_min, rules.rating_max, rules.max_value, rules.max_record_chars
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
            if len(payload) > max_chars:
                dead.append(DeadLetter("record_too_large", STAGE, payload, part, off, str(len(payload))))
                continue
            if len(payload) > MAX_DEPTH and nesting_depth(payload) > MAX_DEPTH:  # short records cannot be too deep
                dead.append(DeadLetter("too_deep", STAGE, payload, part, off, f"more than {MAX_DEPTH} levels"))
                continue
            # Fast path: a typed decoder checks the common well-formed event's types, id lengths, action, ts range
            # and number bounds in C (2x faster than orjson plus checks in Python); what it cannot express is checked
            # inline. Anything unusual takes the slow path, orjson and judge_record, which names the reason.
            # A record that may name an id member twice is suspect and takes the slow path too, which applies the
            # exact rule on the decoded names. Any escape makes it suspect (a name may hide behind one: one memchr).
            suspect = "\\" in payload
            e = None
            if not suspect:
                try:
                    e = decode(payload)
                except (msgspec.ValidationError, msgspec.DecodeError, RecursionError):
                    pass  # RecursionError: nesting deeper than msgspec follows; orjson names it below
                # Without escapes, a decoded record names event_id, user_id and item_id at least once each: exactly
                # three '_id"' in it mean once each, one scan where counting the two names costs two.
                if e is None or payload.count('_id"') != 3:
                    suspect = payload.count('"event_id"') > 1 or payload.count('"user_id"') > 1
                    if suspect:
                        e = None
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
                repeated = ambiguous_ids(payload) if suspect else None
                if repeated:
                    dead.append(DeadLetter("duplicate_keys", STAGE, payload, part, off, ",".join(repeated)))
                    continue
                try:
                    eid, user, item, code, value, ts, dwell, price, cat = judge_record(d, rules, now_ms)
                except Rejected as bad:
                    dead.append(DeadLetter(bad.reason, STAGE, payload, part, off, bad.detail))
                    continue
        except Exception as ex:
            log.warning("parse: record at %d/%d dead-lettered as internal_error: %s", part, off, describe(ex))
            dead.append(DeadLetter("internal_error", STAGE, payload, part, off, describe(ex)))
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


