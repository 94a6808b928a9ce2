"""No record can fail the training stage: whatever the lines of a chunk hold, ``TrainStage.on_chunk`` returns, and
every line ends as exactly one of trained (or pending in the batcher), near-duplicate or dead-lettered, each dead
letter once."""
from __future__ import annotations

import json
from functools import lru_cache

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flink_job.config import JobConfig
from flink_job.schema import ACTIONS
from flink_job.stages.train import TrainStage

NOW = 1_800_000_000_000
DAY = 24 * 3600 * 1000
CFG = JobConfig.load(overrides=["batch.size=8", "publish.interval_ms=0", "publish.item_interval_ms=0",
                                "clean.near_duplicate_window_ms=1000"])

# --- valid events: ids of any printable text or integers, written with or without escapes -------------------------
ids = st.one_of(
    st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp"), blacklist_characters="\ufffd\x85"),
            min_size=1, max_size=12).filter(lambda s: s.strip() and s.isprintable()),
    st.integers(-(2**63), 2**63 - 1),
)


@st.composite
def valid_events(draw: st.DrawFn) -> dict:
    action = draw(st.sampled_from(ACTIONS))
    d = {"event_id": draw(ids), "user_id": draw(ids), "item_id": draw(ids), "action": action,
         "ts": draw(st.integers(NOW - 30 * 60_000, NOW))}
    if action == "rating":
        d["value"] = draw(st.floats(1, 5))
    elif draw(st.booleans()):
        d["value"] = draw(st.floats(1e-3, 100))
    for name in ("dwell_ms", "price"):
        if draw(st.booleans()):
            d[name] = draw(st.one_of(st.none(), st.integers(0, 10**6), st.floats(0, 1e6)))
    return d


# --- hostile records: none of them is an event ----------------------------------------------------------------------
def nested(depth: int, kind: str) -> str:
    return ('{"a":' * depth + "1" + "}" * depth) if kind == "object" else ("[" * depth + "]" * depth)


@lru_cache(maxsize=1)
def ten_megabytes() -> str:
    return '{"event_id":"e","user_id":"u","item_id":"i","action":"view","ts":1,"x":"' + "x" * 10_000_000 + '"}'


NON_FINITE = ["1e999", "-1e400", "NaN", "Infinity", "-Infinity"]
# Per required or context field, numbers that are never valid there: beyond its range, non-finite, or of a wrong kind.
BAD_NUMBERS = {
    "ts": st.one_of(st.integers(16, 5000).map(lambda k: "9" * k), st.sampled_from([*NON_FINITE, "-5", "1.5", "1e39"])),
    "event_id": st.one_of(st.integers(20, 5000).map(lambda k: "9" * k), st.sampled_from([*NON_FINITE, "1.5", "1e3"])),
    "user_id": st.one_of(st.integers(20, 5000).map(lambda k: "-" + "9" * k), st.sampled_from([*NON_FINITE, "0.0"])),
    "dwell_ms": st.one_of(st.integers(40, 5000).map(lambda k: "9" * k), st.sampled_from([*NON_FINITE, "-1", "3.5e38"])),
    "price": st.one_of(st.integers(40, 5000).map(lambda k: "9" * k), st.sampled_from([*NON_FINITE, "-0.5", "1e39"])),
}


@st.composite
def spoiled_events(draw: st.DrawFn) -> str:
    """A valid event with one field made bad: a huge or non-finite number, a deep value, a repeated or escaped id
    member, a value out of bounds, a time far in the future."""
    d = draw(valid_events())
    text = json.dumps(d)[:-1]
    how = draw(st.sampled_from(["number", "deep", "repeat", "escaped_repeat", "value", "future", "nested_id"]))
    if how == "number":
        field = draw(st.sampled_from(sorted(BAD_NUMBERS)))
        d.pop(field, None)
        return json.dumps(d)[:-1] + f', "{field}": {draw(BAD_NUMBERS[field])}}}'
    if how == "deep":
        return text + f', "context": {nested(draw(st.integers(1_025, 20_000)), draw(st.sampled_from(["object", "array"])))}}}'
    if how == "repeat":
        return text + ', "user_id": "someone-else"}'
    if how == "escaped_repeat":
        return text + ', "event\\u005fid": "other"}'
    if how == "nested_id":
        return text + ', "ctx": {"user_id": 1}}'
    if how == "value":
        d["action"] = "view"
        d["value"] = draw(st.sampled_from([0, -1e6, 1e39, 100.5, -0.0]))
        return json.dumps(d)
    d["ts"] = NOW + draw(st.integers(6 * 60_000, DAY))
    return json.dumps(d)


def not_an_event(s: str) -> bool:
    return '"event_id"' not in s and "event\\u" not in s


hostile_payloads = st.one_of(
    st.binary(max_size=200).map(lambda b: b.decode("utf-8", "replace")).filter(not_an_event),
    st.text(st.characters(blacklist_categories=()), max_size=100).filter(not_an_event),  # lone surrogates too
    st.tuples(st.integers(1, 100_000), st.sampled_from(["object", "array"])).map(lambda t: nested(*t)),
    st.just("").map(lambda _: ten_megabytes()),
    st.one_of(st.integers(), st.integers(20, 5000).map(lambda k: "9" * k), st.sampled_from(NON_FINITE)).map(str),
    spoiled_events(),
)


@st.composite
def records(draw: st.DrawFn) -> tuple[str, str]:
    """``(kind, line)``: kind is ``valid``, ``hostile`` (a line with a payload), ``null`` (a Kafka record with a
    null value) or ``garbage`` (not a chunk line at all)."""
    kind = draw(st.sampled_from(["valid", "valid", "hostile", "hostile", "null", "garbage"]))
    if kind == "valid":
        return kind, json.dumps(draw(valid_events()), ensure_ascii=draw(st.booleans()))
    if kind == "hostile":
        return kind, draw(hostile_payloads)
    if kind == "garbage":
        return kind, draw(st.text(max_size=30).filter(lambda s: s.count(",") < 1))
    return kind, ""


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(st.lists(records(), max_size=20), min_size=1, max_size=4), st.data())
def test_no_record_fails_the_stage_and_every_record_is_accounted_for_once(chunks: list, data: st.DataObject) -> None:
    stage = TrainStage(CFG)
    expected_dead: list[tuple[int, int]] = []
    valid = 0
    dead = []
    trained = near = 0
    offset = 0
    for n, chunk in enumerate(chunks):
        lines = []
        for kind, payload in chunk:
            part = data.draw(st.integers(0, 3))
            if kind == "garbage":
                lines.append(payload)
                expected_dead.append((-1, -1))
                continue
            lines.append(f"{part},{offset}" if kind == "null" else f"{part},{offset},{payload}")
            if kind == "valid":
                valid += 1
            else:
                expected_dead.append((part, offset))
            offset += 1
        out = stage.on_chunk(lines, now_ms=NOW + n)
        dead += out.dead_letters
        trained += out.trained
        near += out.near_duplicates
    flushed = stage.on_time(now_ms=NOW + 10**6)
    dead += flushed.dead_letters
    trained += flushed.trained
    c = stage.counters
    assert c.received == sum(len(chunk) for chunk in chunks)
    assert c.received == c.trained + stage.batcher.pending + c.near_duplicates + c.dead_lettered
    assert (c.trained, c.near_duplicates, c.dead_lettered) == (trained, near, len(dead))
    assert sorted((d.partition, d.offset) for d in dead) == sorted(expected_dead), [
        (d.reason, d.detail, d.payload[:80]) for d in dead]
    assert trained + near == valid and stage.batcher.pending == 0
    for d in dead:
        assert json.loads(d.to_json())["reason"] == d.reason  # every dead letter can be written out


def test_a_stage_that_raises_after_parsing_keeps_the_rest_of_the_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    # The last-resort guard: a bug in a later stage, found by one record, costs that record alone.
    stage = TrainStage(JobConfig.load(overrides=["batch.size=4"]))
    apply = stage.cleaner.apply

    def fussy(batch):  # type: ignore[no-untyped-def]
        if "poison" in batch.users:
            raise RuntimeError("a bug only this user finds")
        return apply(batch)

    monkeypatch.setattr(stage.cleaner, "apply", fussy)
    events = [{"event_id": f"e{n}", "user_id": "poison" if n == 2 else f"u{n}", "item_id": "i", "action": "view",
               "ts": NOW - n} for n in range(5)]
    out = stage.on_chunk([f"1,{n},{json.dumps(e)}" for n, e in enumerate(events)], now_ms=NOW)
    assert [(d.reason, d.stage, d.partition, d.offset) for d in out.dead_letters] == [("internal_error", "train", 1, 2)]
    assert "RuntimeError" in out.dead_letters[0].detail and out.dead_letters[0].payload == json.dumps(events[2])
    assert out.trained == 4 and stage.counters.received == 5 and stage.counters.dead_lettered == 1
