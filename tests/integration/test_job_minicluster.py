"""The real job on a Flink mini-cluster against the real broker."""
from __future__ import annotations

from collections import Counter

import orjson
import pytest

from flink_job.kafka.produce import Record
from flink_job.tools.generate import SyntheticConfig, generate
from flink_job.kafka.produce import send
from flink_job.tools.produce import synthetic_timed
from flink_job.flink.runner import LocalJob
from flink_job.kafka.topics import json_values, read_all
from flink_job.stages.binary_records import is_binary
from flink_job.stages.publish import decode

pytestmark = pytest.mark.integration


def _truth(records: list[Record]) -> tuple[list[dict], Counter]:
    valid = [orjson.loads(r.payload) for r in records if r.kind == "event"]
    malformed = Counter(r.kind for r in records if r.kind not in ("event", "duplicate"))
    return valid, malformed


@pytest.mark.parametrize("fmt", ["json", "binary"])
def test_job_trains_and_publishes_every_user_and_item(topics, fmt: str) -> None:
    cfg = topics(f"job-{fmt}", overrides=["batch.size=512", f"publish.format={fmt}"])
    syn = SyntheticConfig(n_users=300, n_items=150, n_events=4_000, duplicate_rate=0.05, malformed_rate=0.02, seed=11)
    records = list(generate(syn))
    valid, malformed = _truth(records)
    send(synthetic_timed(syn), cfg.kafka.bootstrap, cfg.kafka.input_topic)

    with LocalJob(cfg) as job:
        result = job.wait_idle(idle_s=4.0, timeout_s=300, min_received=len(records) - syn.n_events // 10)
    last = result.last
    assert last["trained"] == len(valid)
    assert last["dead_lettered"] == sum(malformed.values())
    assert last["received"] == len(valid) + sum(malformed.values())  # duplicates never reach Python

    dead_records = read_all(cfg.kafka.bootstrap, cfg.kafka.dead_letter_topic)
    dead = list(json_values(dead_records))
    assert len({(d["partition"], d["offset"]) for d in dead}) == len(dead) == sum(malformed.values())  # each its own
    assert all(d["reason"] and d["stage"] == "parse" and d["offset"] >= 0 for d in dead)
    assert [k for k, *_ in dead_records] == [f"{d['partition']}-{d['offset']}".encode() for d in dead]

    embeddings = read_all(cfg.kafka.bootstrap, cfg.kafka.embeddings_topic)
    versions: dict[bytes, list[int]] = {}
    for key, value, _p, _o in embeddings:
        assert is_binary(value) == (fmt == "binary")
        rec = decode(value)
        assert key == f"{rec['kind']}:{rec['id']}".encode()
        assert len(rec["vector"]) == cfg.model.dim
        versions.setdefault(key, []).append(rec["version"])
    assert {f"user:{e['user_id']}".encode() for e in valid} <= set(versions)
    assert {f"item:{e['item_id']}".encode() for e in valid} <= set(versions)
    for key, seq in versions.items():
        assert all(b > a for a, b in zip(seq, seq[1:])), f"versions of {key!r} do not increase: {seq}"


def test_a_duplicated_event_is_trained_once(topics) -> None:
    """The user's published ``events`` counter counts the events its row was trained on: each once."""
    cfg = topics("dedup", overrides=["batch.size=64", "publish.interval_ms=0"])
    base = 1_700_000_000_000

    def rating(n: int, user: str = "dupe-user") -> Record:
        payload = orjson.dumps({"event_id": f"r{n}", "user_id": user, "item_id": f"i{n % 7}", "action": "rating",
                                "value": 4.0, "ts": base + n})
        return Record(user.encode(), payload, "event", f"r{n}")

    first = [rating(n) for n in range(5)]
    # The same five events again, interleaved with another user's events, then a late copy of r0.
    stream = first + [rating(100 + n, "other") for n in range(20)] + first + [first[0]]
    send(((r, n) for n, r in enumerate(stream)), cfg.kafka.bootstrap, cfg.kafka.input_topic)

    with LocalJob(cfg) as job:
        result = job.wait_idle(idle_s=4.0, timeout_s=300, min_received=25)
    assert result.last["trained"] == 25
    assert result.last["received"] == 25
    latest = max(
        (orjson.loads(v) for k, v, _p, _o in read_all(cfg.kafka.bootstrap, cfg.kafka.embeddings_topic)
         if k == b"user:dupe-user"),
        key=lambda r: r["version"],
    )
    assert latest["events"] == 5


def test_expired_ids_reach_the_compacted_topic_as_tombstones(topics) -> None:
    """Users idle longer than ``model.ids.ttl_ms`` (event time) leave the model and the changelog: a null value."""
    day = 24 * 3600 * 1000
    cfg = topics("expiry", overrides=["batch.size=16", "publish.interval_ms=0", f"model.ids.ttl_ms={day}",
                                      "clean.out_of_orderness_ms=0"])
    now = 1_700_000_000_000
    base = now - 3 * day

    def click(n: int, user: str, ts: int) -> tuple[Record, int]:
        payload = orjson.dumps({"event_id": f"c{n}", "user_id": user, "item_id": f"i{n % 5}", "action": "click",
                                "ts": ts})
        return Record(user.encode(), payload, "event", f"c{n}"), ts

    early = [click(n, f"idle{n % 4}", base + n) for n in range(16)]
    late = [click(100 + n, "active", base + 2 * day + n) for n in range(48)]
    send(early + late, cfg.kafka.bootstrap, cfg.kafka.input_topic)
    with LocalJob(cfg) as job:
        job.wait_idle(idle_s=4.0, timeout_s=300, min_received=len(early) + len(late))
    records = read_all(cfg.kafka.bootstrap, cfg.kafka.embeddings_topic)
    tombstones = {k.decode() for k, v, _p, _o in records if v is None}
    assert {f"user:idle{u}" for u in range(4)} <= tombstones
    assert "user:active" not in tombstones
    last = {k.decode(): v for k, v, _p, _o in sorted(records, key=lambda r: (r[2], r[3]))}
    assert all(last[f"user:idle{u}"] is None for u in range(4))  # nothing published for them after the tombstone
