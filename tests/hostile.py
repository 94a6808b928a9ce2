"""A corpus of hostile input records: each kind is a Kafka record value (None: a record without a value) that the
job must dead-letter, once, without failing its task. Shared by the job's integration test and the stage's
property test, so that both see the same hostile kinds."""
from __future__ import annotations

import orjson

# A well-formed click whose fields each kind below breaks in one way (the ts is filled in by ``corpus``).
_BASE = {"event_id": "h", "user_id": "hostile-user", "item_id": "hostile-item", "action": "click", "ts": 0}


def _event(at: int, **changes: object) -> bytes:
    event = {**_BASE, "ts": at, **changes}
    return orjson.dumps({k: v for k, v in event.items() if v is not _DROP})


_DROP = object()


def corpus(now_ms: int) -> dict[str, bytes | None]:
    """Kind -> record value, for a stream whose event times are around ``now_ms``. Every value is one the job must
    reject; event ids are unique per kind so that no two are de-duplication copies of each other."""
    ts = now_ms - 60_000

    def ev(kind: str, **changes: object) -> bytes:
        return _event(ts, event_id=f"h-{kind}", **changes)

    deep = 5_000
    kinds: dict[str, bytes | None] = {
        # Not an event at all
        "null_value": None,
        "empty": b"",
        "whitespace": b"   \n\t ",
        "json_null": b"null",
        "json_true": b"true",
        "json_number": b"123",
        "json_string": b'"an event"',
        "json_array": b"[]",
        "empty_object": b"{}",
        "truncated": ev("truncated")[:-7],
        "trailing_garbage": ev("trailing_garbage") + b"}}",
        "two_objects": ev("two_objects_a") + ev("two_objects_b"),
        "nested_objects": b'{"a":' * deep + b"1" + b"}" * deep,
        "nested_arrays": b"[" * 20_000 + b"]" * 20_000,
        "nested_inside_event": ev("nested_inside_event")[:-1] + b',"x":' + b"[" * deep + b"]" * deep + b"}",
        "too_large": ev("too_large", item_id="i" * 100, pad="x" * 200_000),
        "invalid_utf8": b'{"event_id":"h-invalid_utf8","user_id":"\xff\xfe","item_id":"i","action":"click","ts":'
                        + str(ts).encode() + b"}",
        "lone_surrogate": ev("lone_surrogate").replace(b'"hostile-user"', b'"\\ud800"'),
        "nul_in_id": ev("nul_in_id", user_id="a\u0000b"),
        "control_char_in_id": ev("control_char_in_id", item_id="a\u0007b"),
        "bom_prefix": b"\xef\xbb\xbf" + ev("bom_prefix"),
        "utf16": ev("utf16").decode().encode("utf-16"),
        "comment": b"/* hi */" + ev("comment"),
        "single_quotes": ev("single_quotes").replace(b'"', b"'"),
        "nan_literal": ev("nan_literal")[:-1] + b',"value":NaN}',
        "infinity_literal": ev("infinity_literal")[:-1] + b',"value":Infinity}',
        # Missing or empty fields
        "missing_event_id": _event(ts, event_id=_DROP),
        "missing_user_id": ev("missing_user_id", user_id=_DROP),
        "missing_item_id": ev("missing_item_id", item_id=_DROP),
        "missing_action": ev("missing_action", action=_DROP),
        "missing_ts": ev("missing_ts", ts=_DROP),
        "null_user_id": ev("null_user_id", user_id=None),
        "empty_user_id": ev("empty_user_id", user_id=""),
        "blank_item_id": ev("blank_item_id", item_id="   "),
        "id_too_long": ev("id_too_long", user_id="u" * 1_000),
        # Wrong types
        "user_id_object": ev("user_id_object", user_id={"id": "u"}),
        "user_id_array": ev("user_id_array", user_id=["u"]),
        "user_id_bool": ev("user_id_bool", user_id=True),
        "user_id_float": ev("user_id_float", user_id=1.5),
        "event_id_float": _event(ts, event_id=2.5),
        "action_number": ev("action_number", action=3),
        "action_unknown": ev("action_unknown", action="teleport"),
        "action_upper_case": ev("action_upper_case", action="CLICK"),
        "ts_string": ev("ts_string", ts=str(ts)),
        "ts_bool": ev("ts_bool", ts=True),
        "ts_float": ev("ts_float", ts=ts + 0.5),
        "ts_negative": ev("ts_negative", ts=-5),
        "ts_huge_int": ev("ts_huge_int").replace(str(ts).encode(), b"1" + b"0" * 30),
        "ts_huge_float": ev("ts_huge_float").replace(str(ts).encode(), b"1e300"),
        "ts_far_future": ev("ts_far_future", ts=now_ms + 23 * 3600 * 1000),
        "value_string": ev("value_string", value="5"),
        "value_bool": ev("value_bool", value=True),
        "value_beyond_float32": ev("value_beyond_float32", value=1e39),
        "value_beyond_double": ev("value_beyond_double")[:-1] + b',"value":1e400}',
        "value_huge_int": ev("value_huge_int")[:-1] + b',"value":' + b"9" * 400 + b"}",
        "value_negative": ev("value_negative", value=-1e6),
        "value_zero": ev("value_zero", value=0),
        "rating_without_value": ev("rating_without_value", action="rating"),
        "rating_too_high": ev("rating_too_high", action="rating", value=6),
        "rating_too_low": ev("rating_too_low", action="rating", value=0),
        "rating_nan_string": ev("rating_nan_string", action="rating", value="NaN"),
        "dwell_negative": ev("dwell_negative", dwell_ms=-1),
        "dwell_string": ev("dwell_string", dwell_ms="long"),
        "dwell_beyond_double": ev("dwell_beyond_double")[:-1] + b',"dwell_ms":1e999}',
        "price_object": ev("price_object", price={"amount": 3}),
        "category_number": ev("category_number", category=7),
        "category_control_chars": ev("category_control_chars", category="a\u0001b"),
        "category_too_long": ev("category_too_long", category="c" * 1_000),
        # Ambiguous identity: the JVM's de-duplication key and the parser could disagree on whose event it is
        "duplicate_user_id": ev("duplicate_user_id")[:-1] + b',"user_id":"someone-else"}',
        "duplicate_escaped_user_id": ev("duplicate_escaped_user_id")[:-1] + b',"user\\u005fid":"someone-else"}',
        "duplicate_event_id": ev("duplicate_event_id")[:-1] + b',"event_id":"h-other"}',
    }
    return kinds


def valid_event(n: int, ts: int, users: int = 50, items: int = 40) -> bytes:
    """The ``n``-th valid event of a stream: a click or a rating."""
    event: dict[str, object] = {"event_id": f"v{n}", "user_id": f"u{n % users}", "item_id": f"i{(n * 7) % items}",
                                "action": "click", "ts": ts}
    if n % 3 == 0:
        event.update(action="rating", value=float(1 + n % 5))
    return orjson.dumps(event)
