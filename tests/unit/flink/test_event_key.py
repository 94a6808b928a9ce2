"""EVENT_KEY, the job's Java SQL function (flink_job/flink/jvm), in Flink's own SQL runtime: which payloads get the
de-duplication key ``user_id U+001F event_id`` and which get none (so that they pass de-duplication alone, keyed
by their input position, and reach the parser, which dead-letters them with a reason)."""
from __future__ import annotations

from collections.abc import Iterator

import pytest

from deploy.jars import udf_jar
from flink_job.flink import sql
from flink_job.stages.parse import parse_lines

SEP = "\x1f"
CASES: list[tuple[str, str, str | None]] = [
    ("compact", '{"event_id":"e1","user_id":"u1","item_id":"i1","action":"view","ts":5}', f"u1{SEP}e1"),
    ("any key order", '{"ts":5,"user_id":"u1","action":"view","event_id":"e1"}', f"u1{SEP}e1"),
    ("whitespace", ' { "event_id" : "e1" ,\n "user_id" : "u1" } ', f"u1{SEP}e1"),
    ("escapes are decoded", r'{"event_id":"e\"1","user_id":"\u0075\u0031"}', f'u1{SEP}e"1'),
    ("unicode", '{"event_id":"é-1","user_id":"用户"}', f"用户{SEP}é-1"),
    ("nested objects and arrays are skipped", '{"ctx":{"a":[1,{"b":2}]},"event_id":"e1","user_id":"u1","x":[]}',
     f"u1{SEP}e1"),
    ("an id named again in a nested object", '{"ctx":{"user_id":"x"},"event_id":"e1","user_id":"u1"}', None),
    ("an id named again inside an array", '{"a":[{"event_id":"x"}],"event_id":"e1","user_id":"u1"}', None),
    ("escaped member names are decoded", r'{"event\u005fid":"e1","\u0075ser_id":"u1"}', f"u1{SEP}e1"),
    ("an id named again with escapes", r'{"event_id":"e1","user_id":"u1","user\u005fid":"u2"}', None),
    ("empty ids are still a key", '{"event_id":"","user_id":""}', SEP),
    ("truncated", '{"event_id":"e1","user_id":"u1","item_id":"i', None),
    ("trailing garbage", '{"event_id":"e1","user_id":"u1"} x', None),
    ("two objects", '{"event_id":"e1","user_id":"u1"}{"event_id":"e2","user_id":"u1"}', None),
    ("missing event id", '{"user_id":"u1"}', None),
    ("missing user id", '{"event_id":"e1"}', None),
    ("integer id", '{"event_id":1,"user_id":"u1"}', f"u1{SEP}1"),
    ("integer ids are canonical", '{"event_id":-0,"user_id":-9223372036854775808}', f"-9223372036854775808{SEP}0"),
    ("integer id beyond 64 bits", '{"event_id":9223372036854775808,"user_id":"u1"}', None),
    ("fractional id", '{"event_id":1.0,"user_id":"u1"}', None),
    ("exponent id", '{"event_id":1e3,"user_id":"u1"}', None),
    ("escaped control character in an id", r'{"event_id":"e\u001f","user_id":"u1"}', None),
    ("C1 control character in an id", '{"event_id":"e\u0085","user_id":"u1"}', None),
    ("bytes that were not UTF-8 in an id", '{"event_id":"e\ufffd","user_id":"u1"}', None),
    ("lone surrogate in an id", r'{"event_id":"e\ud800","user_id":"u1"}', None),
    ("surrogate pair in an id", r'{"event_id":"\ud83c\udfa7","user_id":"u1"}', f"u1{SEP}\U0001f3a7"),
    ("huge number elsewhere", '{"event_id":"e1","user_id":"u1","v":1' + "0" * 2000 + '}', None),
    ("null id", '{"event_id":null,"user_id":"u1"}', None),
    ("object id", '{"event_id":{"v":"e1"},"user_id":"u1"}', None),
    ("repeated user id", '{"event_id":"e1","user_id":"u1","user_id":"u2"}', None),
    ("repeated event id", '{"event_id":"e1","event_id":"e1","user_id":"u1"}', None),
    ("a JSON array", '[{"event_id":"e1","user_id":"u1"}]', None),
    ("a JSON string", '"e1"', None),
    ("not JSON", "event e1 of u1", None),
    ("empty", "", None),
    ("raw control character in a string", '{"event_id":"e\n1","user_id":"u1"}', None),
    ("single quotes", "{'event_id':'e1','user_id':'u1'}", None),
]


# Payloads beyond what a literal holds comfortably, as SQL expressions: EVENT_KEY must return, never throw.
IDS = '{"event_id":"e1","user_id":"u1","x":'
EXTREMES: list[tuple[str, str, str | None]] = [
    ("arrays nested 100,000 deep", f"CONCAT('{IDS}', REPEAT('[', 100000), REPEAT(']', 100000), '}}')", None),
    ("objects nested 100,000 deep", f"""CONCAT('{IDS}', REPEAT('{{"a":', 100000), '1', REPEAT('}}', 100001))""",
     None),
    ("a 10 MB string", f"""CONCAT('{IDS}"', REPEAT('x', 10000000), '"}}')""", f"u1{SEP}e1"),
    ("a number of 100,000 digits", f"CONCAT('{IDS}', REPEAT('9', 100000), '}}')", None),
]

# The JVM's key and the Python parser's ids agree: for a record the parser keeps, EVENT_KEY is its user_id U+001F
# event_id; for one it dead-letters for its identity, EVENT_KEY is NULL (it is de-duplicated by nothing and
# dead-lettered alone). Each case names the parser's verdict: "keep" or the dead-letter reason.
EVENT = '"item_id":"i1","action":"view","ts":5'
AGREEMENT: list[tuple[str, str, str]] = [
    ("plain", f'{{"event_id":"e1","user_id":"u1",{EVENT}}}', "keep"),
    ("escaped names", rf'{{"event\u005fid":"e1","\u0075ser_id":"u1",{EVENT}}}', "keep"),
    ("escaped values", rf'{{"event_id":"e\u00e9\"1","user_id":"\u7528\u6237",{EVENT}}}', "keep"),
    ("surrogate pair", rf'{{"event_id":"\ud83c\udfa7","user_id":"u1",{EVENT}}}', "keep"),
    ("integer ids", f'{{"event_id":17,"user_id":-42,{EVENT}}}', "keep"),
    ("the same ids as strings", f'{{"event_id":"17","user_id":"-42",{EVENT}}}', "keep"),
    ("int64 bounds", f'{{"event_id":-0,"user_id":9223372036854775807,{EVENT}}}', "keep"),
    ("an id's name as a value", f'{{"event_id":"e1","user_id":"u1","category":"event_id",{EVENT}}}', "keep"),
    ("an id's name in a string", rf'{{"event_id":"e1","user_id":"u1","note":"\"user_id\": 2",{EVENT}}}', "keep"),
    ("integer beyond int64", f'{{"event_id":9223372036854775808,"user_id":"u1",{EVENT}}}', "bad_type_event_id"),
    ("integer beyond uint64", f'{{"event_id":18446744073709551616,"user_id":"u1",{EVENT}}}', "bad_type_event_id"),
    ("fractional id", f'{{"event_id":1.5,"user_id":"u1",{EVENT}}}', "bad_type_event_id"),
    ("repeated", f'{{"event_id":"e1","user_id":"u1","user_id":"u2",{EVENT}}}', "duplicate_keys"),
    ("repeated, nested", f'{{"event_id":"e1","user_id":"u1","ctx":{{"user_id":"u2"}},{EVENT}}}', "duplicate_keys"),
    ("repeated, escaped", rf'{{"event_id":"e1","user_id":"u1","user\u005fid":"u2",{EVENT}}}', "duplicate_keys"),
    ("repeated, both escaped", rf'{{"\u0065vent_id":"e1","event\u005fid":"e2","user_id":"u1",{EVENT}}}',
     "duplicate_keys"),
    ("repeated, same value", f'{{"event_id":"e1","event_id":"e1","user_id":"u1",{EVENT}}}', "duplicate_keys"),
    ("escaped control character", rf'{{"event_id":"e\u0000","user_id":"u1",{EVENT}}}', "control_chars_in_event_id"),
    ("C1 control character", f'{{"event_id":"e1","user_id":"u\u009b",{EVENT}}}', "control_chars_in_user_id"),
    ("not UTF-8", f'{{"event_id":"e1","user_id":"u1\ufffd",{EVENT}}}', "invalid_utf8_in_user_id"),
    ("lone surrogate", rf'{{"event_id":"e\ud800","user_id":"u1",{EVENT}}}', "invalid_json"),
    ("nested 1,100 deep", f'{{"event_id":"e1","user_id":"u1","x":{"[" * 1100}{"]" * 1100},{EVENT}}}', "too_deep"),
    # The limit, 1,000 levels with the event's own object, is the same on both sides.
    ("nested 1,000 deep", f'{{"event_id":"e1","user_id":"u1","x":{"[" * 999}{"]" * 999},{EVENT}}}', "keep"),
    ("nested 1,001 deep", f'{{"event_id":"e1","user_id":"u1","x":{"[" * 1000}{"]" * 1000},{EVENT}}}', "too_deep"),
]


@pytest.fixture(scope="module")
def event_keys() -> Iterator[dict[str, str | None]]:
    """EVENT_KEY of every case's payload, computed by one batch query on a local Flink."""
    from pyflink.table import EnvironmentSettings, TableEnvironment

    t_env = TableEnvironment.create(EnvironmentSettings.in_batch_mode())
    t_env.get_config().set("pipeline.jars", udf_jar().resolve().as_uri())
    t_env.get_config().set("parallelism.default", "1")
    sql.register_functions(t_env)
    rows = [(name, _literal(payload)) for name, payload, _ in CASES]
    rows += [(f"agree: {name}", _literal(payload)) for name, payload, _ in AGREEMENT]
    rows += [(name, expr) for name, expr, _ in EXTREMES]
    values = ", ".join(f"({_literal(name)}, CAST({expr} AS STRING))" for name, expr in rows)
    query = f"SELECT name, EVENT_KEY(payload) FROM (VALUES {values}) AS t(name, payload)"
    with t_env.execute_sql(query).collect() as results:
        yield {row[0]: row[1] for row in results}


def _literal(text: str) -> str:
    """A SQL string literal holding ``text`` exactly, control characters included (Unicode escapes)."""
    return "U&'" + "".join(c if c.isprintable() and c not in "'\\" else f"\\{ord(c):04x}" for c in text) + "'"


@pytest.mark.parametrize("name,payload,expected", CASES, ids=[c[0] for c in CASES])
def test_event_key(event_keys: dict[str, str | None], name: str, payload: str, expected: str | None) -> None:
    assert name in event_keys, f"no result row for {name!r}"
    assert event_keys[name] == expected, payload


@pytest.mark.parametrize("name,expr,expected", EXTREMES, ids=[c[0] for c in EXTREMES])
def test_event_key_returns_on_extreme_input(event_keys: dict[str, str | None], name: str, expr: str,
                                            expected: str | None) -> None:
    assert name in event_keys, f"no result row for {name!r}"
    assert event_keys[name] == expected


@pytest.mark.parametrize("name,payload,verdict", AGREEMENT, ids=[c[0] for c in AGREEMENT])
def test_jvm_key_agrees_with_the_parsers_ids(event_keys: dict[str, str | None], name: str, payload: str,
                                            verdict: str) -> None:
    batch, dead = parse_lines([f"0,0,{payload}"], now_ms=10**12)
    assert (verdict, len(batch)) == ("keep", 1) if verdict == "keep" else [d.reason for d in dead] == [verdict]
    python_key = f"{batch.users[0]}{SEP}{batch.event_ids[0]}" if len(batch) else None
    assert event_keys[f"agree: {name}"] == python_key, payload


def test_integer_and_string_ids_are_one_identity(event_keys: dict[str, str | None]) -> None:
    assert event_keys["agree: integer ids"] == event_keys["agree: the same ids as strings"] == f"-42{SEP}17"
