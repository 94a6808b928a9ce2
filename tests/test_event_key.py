"""EVENT_KEY, the job's Java SQL function (flink_job/jvm), in Flink's own SQL runtime: which payloads get the
de-duplication key ``user_id U+001F event_id`` and which get none (so that they pass de-duplication alone, keyed
by their input position, and reach the parser, which dead-letters them with a reason)."""
from __future__ import annotations

from collections.abc import Iterator

import pytest

from deploy.jars import udf_jar
from flink_job import sql

SEP = "\x1f"
CASES: list[tuple[str, str, str | None]] = [
    ("compact", '{"event_id":"e1","user_id":"u1","item_id":"i1","action":"view","ts":5}', f"u1{SEP}e1"),
    ("any key order", '{"ts":5,"user_id":"u1","action":"view","event_id":"e1"}', f"u1{SEP}e1"),
    ("whitespace", ' { "event_id" : "e1" ,\n "user_id" : "u1" } ', f"u1{SEP}e1"),
    ("escapes are decoded", r'{"event_id":"e\"1","user_id":"\u0075\u0031"}', f'u1{SEP}e"1'),
    ("unicode", '{"event_id":"é-1","user_id":"用户"}', f"用户{SEP}é-1"),
    ("nested ids are not the event's", '{"ctx":{"user_id":"x","event_id":"y"},"event_id":"e1","user_id":"u1"}',
     f"u1{SEP}e1"),
    ("ids inside an array", '{"a":[{"user_id":"x"}],"event_id":"e1","user_id":"u1"}', f"u1{SEP}e1"),
    ("empty ids are still a key", '{"event_id":"","user_id":""}', SEP),
    ("truncated", '{"event_id":"e1","user_id":"u1","item_id":"i', None),
    ("trailing garbage", '{"event_id":"e1","user_id":"u1"} x', None),
    ("two objects", '{"event_id":"e1","user_id":"u1"}{"event_id":"e2","user_id":"u1"}', None),
    ("missing event id", '{"user_id":"u1"}', None),
    ("missing user id", '{"event_id":"e1"}', None),
    ("numeric id", '{"event_id":1,"user_id":"u1"}', None),
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


@pytest.fixture(scope="module")
def event_keys() -> Iterator[dict[str, str | None]]:
    """EVENT_KEY of every case's payload, computed by one batch query on a local Flink."""
    from pyflink.table import EnvironmentSettings, TableEnvironment

    t_env = TableEnvironment.create(EnvironmentSettings.in_batch_mode())
    t_env.get_config().set("pipeline.jars", udf_jar().resolve().as_uri())
    t_env.get_config().set("parallelism.default", "1")
    sql.register_functions(t_env)
    rows = ", ".join(f"({_literal(name)}, {_literal(payload)})" for name, payload, _ in CASES)
    query = f"SELECT name, EVENT_KEY(payload) FROM (VALUES {rows}) AS t(name, payload)"
    with t_env.execute_sql(query).collect() as results:
        yield {row[0]: row[1] for row in results}


def _literal(text: str) -> str:
    """A SQL string literal holding ``text`` exactly, control characters included (Unicode escapes)."""
    return "U&'" + "".join(c if c.isprintable() and c not in "'\\" else f"\\{ord(c):04x}" for c in text) + "'"


@pytest.mark.parametrize("name,payload,expected", CASES, ids=[c[0] for c in CASES])
def test_event_key(event_keys: dict[str, str | None], name: str, payload: str, expected: str | None) -> None:
    assert name in event_keys, f"no result row for {name!r}"
    assert event_keys[name] == expected, payload
