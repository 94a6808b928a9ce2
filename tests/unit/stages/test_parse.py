"""Parsing and validation: each kind of bad record gets its reason; good records come through unchanged."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flink_job.schema import ACTIONS
from flink_job.stages.parse import ParseRules, parse_lines
from flink_job.stages.parse_rules import Rejected, judge_record

NOW = 1_800_000_000_000
GOOD = {"event_id": "e1", "user_id": "u1", "item_id": "i1", "action": "rating", "value": 4.0, "ts": 1_700_000_000_000}


def with_(**changes: object) -> str:
    d = dict(GOOD)
    for k, v in changes.items():
        if v is ...:
            del d[k]
        else:
            d[k] = v
    return json.dumps(d)


BAD = [
    ("invalid_json", "{not json"),
    ("invalid_json", with_()[:-5]),
    ("invalid_json", ""),
    ("invalid_json", '{"event_id": NaN}'),
    ("not_an_object", "[1, 2, 3]"),
    ("not_an_object", '"a string"'),
    ("not_an_object", "42"),
    ("missing_event_id", with_(event_id=...)),
    ("missing_user_id", with_(user_id=...)),
    ("missing_item_id", with_(item_id=...)),
    ("missing_action", with_(action=...)),
    ("missing_ts", with_(ts=...)),
    ("missing_event_id", with_(event_id=None)),
    ("empty_user_id", with_(user_id="")),
    ("empty_item_id", with_(item_id="   ")),
    ("user_id_too_long", with_(user_id="u" * 129)),
    ("bad_type_user_id", with_(user_id=["u1"])),
    ("bad_type_item_id", with_(item_id={"id": 1})),
    ("bad_type_event_id", with_(event_id=True)),
    ("control_chars_in_user_id", with_(user_id="u\u001f1")),
    ("control_chars_in_event_id", with_(event_id="e\n1")),
    ("unknown_action", with_(action="teleport")),
    ("unknown_action", with_(action=3)),
    ("bad_ts", with_(ts="yesterday")),
    ("bad_ts", with_(ts=1.5)),
    ("bad_ts", with_(ts=True)),
    ("ts_out_of_range", with_(ts=-1)),
    ("ts_out_of_range", with_(ts=10**20)),
    ("bad_value", with_(value="five")),
    ("bad_value", with_(value=[4])),
    ("missing_value", with_(value=...)),
    ("rating_out_of_range", with_(value=9.0)),
    ("rating_out_of_range", with_(value=0)),
    ("invalid_json", '{"event_id": "e1", "value": Infinity}'),
    ("invalid_json", with_().replace("4.0", "1e400")),
    ("invalid_json", with_()[:1] + "\x00" + with_()[1:]),
    ("invalid_json", "\ufeff" + with_()),
    ("record_too_large", with_(category="x" * 70_000)),
    ("duplicate_keys", '{"event_id":"e1","event_id":"e2","user_id":"u1","item_id":"i1","action":"view","ts":5}'),
    ("duplicate_keys", with_(context={"user_id": "someone-else"})),
    # three '_id"' but no item_id: the decoder rejects it, and the repeated name is still found
    ("duplicate_keys", '{"event_id":"e1","user_id":"u1","user_id":"u2","action":"view","ts":5}'),
    ("future_ts", with_(ts=NOW + 2 * 24 * 3600 * 1000)),
    ("future_ts", with_(ts=NOW + 6 * 60 * 1000)),  # the default allows minutes, not a day
    ("duplicate_keys", with_()[:-1] + ', "user\\u005fid": "u2"}'),  # named again, with an escape
    ("duplicate_keys", with_()[:-1] + ', "context": {"\\u0065vent_id": "e2"}}'),
    ("value_out_of_range", with_(action="view", value=1e39)),  # inf as float32
    ("value_out_of_range", with_(action="view", value=-1e6)),
    ("value_out_of_range", with_(action="click", value=0)),
    ("value_out_of_range", with_(action="purchase", value=100.5)),
    ("bad_price", with_(price=1e39)),  # beyond float32
    ("bad_dwell_ms", with_(dwell_ms=3.5e38)),
    ("bad_type_user_id", with_(user_id=2**63)),
    ("bad_type_event_id", with_(event_id=-(2**63) - 1)),
    ("too_deep", '{"a":' * 5000 + "1" + "}" * 5000),  # deeper than the JVM's parser (and so this one) follows
    ("invalid_utf8_in_user_id", with_(user_id="u\ufffd")),
    ("bad_type_user_id", with_(user_id=[{"nested": ["junk", {"deeper": None}]}])),
    ("not_an_object", "null"),
    ("bad_value", with_(value={"rating": 4})),
    ("bad_dwell_ms", with_(dwell_ms="300")),
    ("bad_dwell_ms", with_(dwell_ms=True)),
    ("bad_dwell_ms", with_(dwell_ms=[300])),
    ("bad_dwell_ms", with_(dwell_ms={"ms": 300})),
    ("negative_dwell_ms", with_(dwell_ms=-1)),
    ("negative_dwell_ms", with_(dwell_ms=-0.5)),
    ("bad_price", with_(price="9.99")),
    ("bad_price", with_(price=False)),
    ("bad_price", with_(price={"amount": 9.99})),
    ("negative_price", with_(price=-0.01)),
    ("bad_category", with_(category=3)),
    ("bad_category", with_(category=True)),
    ("bad_category", with_(category=["books"])),
    ("bad_category", with_(category="c" * 129)),
    ("bad_category", with_(category="books\n")),
    ("bad_category", with_(category="c\u0085")),
    ("invalid_json", with_().replace('"ts"', '"dwell_ms": NaN, "ts"')),
    ("invalid_json", with_().replace('"ts"', '"price": Infinity, "ts"')),
]


@pytest.mark.parametrize(("reason", "payload"), BAD)
def test_bad_record_is_dead_lettered_with_its_reason(reason: str, payload: str) -> None:
    batch, dead = parse_lines([f"1,42,{payload}"], now_ms=NOW)
    assert len(batch) == 0
    assert [(d.reason, d.partition, d.offset, d.payload, d.stage) for d in dead] == [(reason, 1, 42, payload, "parse")]


def test_good_record_with_ints_and_context_is_kept() -> None:
    batch, dead = parse_lines([f"0,1,{with_(value=5, dwell_ms=300, price=9.5)}", "0,2," + with_(action="view", value=...)])
    assert dead == []
    assert batch.users == ["u1", "u1"] and batch.values.tolist() == [5.0, 1.0]
    assert batch.actions.tolist() == [ACTIONS.index("rating"), ACTIONS.index("view")]


def test_context_fields_are_carried_nan_or_none_when_absent_or_null() -> None:
    lines = [
        with_(dwell_ms=1500, price=9.99, category="books"),
        with_(dwell_ms=None, price=None, category=None),
        with_(),
        with_(dwell_ms=0, price=0, category="   "),  # a blank category says nothing: absent
        with_(dwell_ms=2.5, price=10**6, category="c\u2028"),  # unusual but valid: takes the slow path
    ]
    batch, dead = parse_lines([f"0,{n},{x}" for n, x in enumerate(lines)], now_ms=NOW)
    assert dead == []
    assert np.array_equal(batch.dwell_ms, [1500.0, np.nan, np.nan, 0.0, 2.5], equal_nan=True)
    assert np.array_equal(batch.price, [9.99, np.nan, np.nan, 0.0, 1e6], equal_nan=True)
    assert batch.categories == ["books", None, None, None, "c\u2028"]
    assert batch.dwell_ms.dtype == batch.price.dtype == np.float64


@pytest.mark.parametrize(("name", "value", "reason"), [("dwell_ms", math.nan, "bad_dwell_ms"),
                                                       ("price", math.inf, "bad_price"),
                                                       ("price", -math.inf, "bad_price")])
def test_non_finite_context_numbers_are_bad(name: str, value: float, reason: str) -> None:
    # orjson never produces these; the slow path checks anyway, for records decoded some other way.
    with pytest.raises(Rejected) as bad:
        judge_record({**GOOD, name: value}, ParseRules(), NOW)
    assert bad.value.reason == reason


def test_unicode_ids_and_context_that_mentions_field_names_are_valid() -> None:
    payload = with_(user_id="用户-ü-🎧", item_id="i\u00e9", category="event_id")
    batch, dead = parse_lines([f"0,1,{payload}"], now_ms=NOW)
    assert dead == [] and batch.users == ["用户-ü-🎧"] and batch.items == ["i\u00e9"]


def test_a_null_value_is_its_own_dead_letter_and_an_empty_one_is_not() -> None:
    # CONCAT_WS in flink_job.flink.sql leaves a NULL payload out: the line has no third field.
    batch, dead = parse_lines(["3,7", "3,8,", f"3,9,{with_()}"], now_ms=NOW)
    assert [(d.reason, d.partition, d.offset, d.payload) for d in dead] == [
        ("null_value", 3, 7, ""), ("invalid_json", 3, 8, "")]
    assert batch.offsets.tolist() == [9]


def test_a_line_that_is_not_a_chunk_line_is_an_internal_error_not_a_crash() -> None:
    batch, dead = parse_lines(["no commas here", "x,y,{}", f"0,1,{with_()}"], now_ms=NOW)
    assert [(d.reason, d.offset, d.payload) for d in dead] == [
        ("internal_error", -1, "no commas here"), ("internal_error", -1, "x,y,{}")]
    assert len(batch) == 1


def test_an_exception_while_judging_a_record_dead_letters_that_record(monkeypatch: pytest.MonkeyPatch) -> None:
    import flink_job.stages.parse as parse

    def broken(d: object, rules: ParseRules, now_ms: int) -> tuple:
        raise ZeroDivisionError("a bug the data found")

    monkeypatch.setattr(parse, "judge_record", broken)
    slow = with_(user_id=7)  # an integer id takes the slow path
    batch, dead = parse_lines([f"0,1,{slow}", f"0,2,{with_()}"], now_ms=NOW)
    assert [(d.reason, d.offset, d.payload, d.stage) for d in dead] == [("internal_error", 1, slow, "parse")]
    assert "ZeroDivisionError" in dead[0].detail and batch.offsets.tolist() == [2]


def test_implicit_values_are_bounded_by_max_value_and_kept_as_sent() -> None:
    lines = [f"0,{n},{with_(action='view', value=v)}" for n, v in enumerate([0.5, 10, 10.5])]
    batch, dead = parse_lines(lines, ParseRules(max_value=10.0), now_ms=NOW)
    assert batch.values.tolist() == [0.5, 10.0] and [(d.reason, d.offset) for d in dead] == [("value_out_of_range", 2)]
    assert np.isfinite(batch.values).all()


def test_escaped_names_and_values_read_as_the_same_ids() -> None:
    plain = with_(event_id="e\"1", user_id="用户")
    escaped = plain.replace('"event_id"', '"event\\u005fid"').replace("用户", "\\u7528\\u6237")
    batch, dead = parse_lines([f"0,0,{plain}", f"0,1,{escaped}"], now_ms=NOW)
    assert dead == [] and batch.event_ids == ['e"1', 'e"1'] and batch.users == ["用户", "用户"]


def test_integer_ids_are_their_decimal_strings() -> None:
    batch, dead = parse_lines([f"0,0,{with_(user_id=42, event_id=-0)}", f"0,1,{with_(user_id='42')}",
                               f"0,2,{with_(item_id=2**63 - 1)}"], now_ms=NOW)
    assert dead == [] and batch.users == ["42", "42", "u1"] and batch.event_ids[0] == "0"
    assert batch.items[2] == str(2**63 - 1)


def test_other_members_ending_in_id_leave_a_record_valid_unless_an_id_repeats() -> None:
    lines = [f"0,0,{with_(session_id='s1')}", f"0,1,{with_(session_id='s1')[:-1]}, \"user_id\": \"u2\"}}"]
    batch, dead = parse_lines(lines, now_ms=NOW)
    assert batch.offsets.tolist() == [0] and [(d.reason, d.offset) for d in dead] == [("duplicate_keys", 1)]


def test_a_mention_of_an_id_name_that_is_not_a_member_is_not_ambiguous() -> None:
    payloads = [with_(category="event_id"), with_(note='"user_id": "x"'), with_(note="\u0075")]
    batch, dead = parse_lines([f"0,{n},{p}" for n, p in enumerate(payloads)], now_ms=NOW)
    assert dead == [] and len(batch) == 3


def test_there_are_at_least_forty_kinds_of_bad_records() -> None:
    assert len(BAD) >= 40 and len({reason for reason, _ in BAD}) >= 25


def test_id_length_limit_is_configurable() -> None:
    _, dead = parse_lines([f"0,1,{with_(user_id='u' * 10)}"], ParseRules(max_id_length=5))
    assert [d.reason for d in dead] == ["user_id_too_long"]


ids = st.text(st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="\ufffd"), min_size=1,
              max_size=20).filter(lambda s: s.strip())


ABSENT = object()
numbers = st.one_of(st.just(ABSENT), st.none(), st.integers(0, 10**12), st.floats(0, 1e12))
categories = st.one_of(st.just(ABSENT), st.none(), ids.filter(lambda s: len(s) <= 128))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(ids, ids, ids, st.sampled_from(ACTIONS), st.integers(0, 10**13),
                          st.floats(1, 5, allow_nan=False), numbers, numbers, categories), max_size=30))
def test_valid_events_are_never_dropped(events: list) -> None:
    lines = []
    for n, (e, u, i, a, t, v, dwell, price, category) in enumerate(events):
        d = {"event_id": e, "user_id": u, "item_id": i, "action": a, "ts": t, "value": v}
        d.update({k: x for k, x in (("dwell_ms", dwell), ("price", price), ("category", category)) if x is not ABSENT})
        lines.append(f"0,{n}," + json.dumps(d))
    batch, dead = parse_lines(lines, now_ms=10**13)
    assert dead == []
    assert batch.event_ids == [e[0] for e in events]
    assert batch.users == [e[1] for e in events]
    assert batch.offsets.tolist() == list(range(len(events)))

    def number(x: object) -> float:
        return math.nan if x is ABSENT or x is None else float(x)  # type: ignore[arg-type]

    assert np.array_equal(batch.dwell_ms, np.array([number(e[6]) for e in events], np.float64), equal_nan=True)
    assert np.array_equal(batch.price, np.array([number(e[7]) for e in events], np.float64), equal_nan=True)
    assert batch.categories == [None if c is ABSENT else c for c in (e[8] for e in events)]
