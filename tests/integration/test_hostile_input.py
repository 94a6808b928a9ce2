"""The real job on a mini-cluster against the real broker, fed every kind of hostile record between valid events:
it must not restart once, train every valid event (those after the hostile block too), dead-letter each hostile
record exactly once and de-duplicate copies that differ only in how their ids are written."""
from __future__ import annotations

import socket
import time
import urllib.request
from collections import Counter
from typing import Any

import orjson
import pytest

from flink_job.flink.runner import LocalJob
from flink_job.kafka.topics import read_all
from tests.hostile import corpus, valid_event

pytestmark = pytest.mark.integration
PARTITIONS = 2
VALID_PER_BLOCK = 600


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rest(port: int, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        return orjson.loads(response.read())


def _stream(now_ms: int) -> tuple[list[tuple[int, bytes | None]], dict[str, int], dict[tuple[int, int], str]]:
    """(partition, value) records: valid events, the hostile block with a far-future event on every partition, then
    valid events again with copies of earlier events whose ids are written differently. Returns the records, the
    count per outcome and the hostile records' kinds by their future position."""
    records: list[tuple[int, bytes | None]] = []
    hostile: dict[int, str] = {}  # index in records -> kind
    ts = now_ms - 120_000

    def valid_block(first: int) -> None:
        for n in range(first, first + VALID_PER_BLOCK):
            records.append((n % PARTITIONS, valid_event(n, ts + n)))

    valid_block(0)
    kinds = list(corpus(now_ms).items())
    for n, (kind, value) in enumerate(kinds):
        hostile[len(records)] = kind
        records.append((n % PARTITIONS, value))
    for p in range(PARTITIONS):  # every partition's watermark is offered a day's jump
        hostile[len(records)] = "far_future_on_every_partition"
        records.append((p, orjson.dumps({"event_id": f"future{p}", "user_id": "u1", "item_id": "i1",
                                         "action": "click", "ts": now_ms + 20 * 3600 * 1000})))
    valid_block(VALID_PER_BLOCK)
    # Integer ids are ids: an event with integer ids, and a copy with the same ids as strings (de-duplicated).
    integer = {"event_id": 900_001, "user_id": 77, "item_id": 5, "action": "click", "ts": ts + 5_000}
    records.append((0, orjson.dumps(integer)))
    records.append((0, orjson.dumps({**integer, "event_id": "900001", "user_id": "77"})))
    # A copy of valid event v3 with its member names and id characters escaped (de-duplicated).
    original = orjson.loads(valid_event(3, ts + 3))
    escaped = (b'{"event\\u005fid":"\\u00763","user\\u005fid":"u\\u0033","item_id":"' + original["item_id"].encode()
               + b'","action":"rating","value":' + str(original["value"]).encode() + b',"ts":'
               + str(original["ts"]).encode() + b"}")
    records.append((3 % PARTITIONS, escaped))
    counts = {"valid": 2 * VALID_PER_BLOCK + 1, "duplicates": 2, "hostile": len(hostile)}
    positions: dict[int, int] = Counter()
    where: dict[tuple[int, int], str] = {}
    for i, (p, _v) in enumerate(records):
        if i in hostile:
            where[(p, positions[p])] = hostile[i]
        positions[p] += 1
    return records, counts, where


def _produce(bootstrap: str, topic: str, records: list[tuple[int, bytes | None]]) -> None:
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "message.max.bytes": 4_000_000})
    for p, value in records:
        producer.produce(topic, value, b"k", partition=p)
    assert producer.flush(60) == 0


def test_hostile_records_neither_stop_nor_starve_the_job(topics) -> None:
    port = _free_port()
    cfg = topics("hostile", input_partitions=PARTITIONS,
                 overrides=["batch.size=256", f'flink.options={{"rest.port": "{port}", "rest.bind-address": "127.0.0.1"}}'])
    now_ms = int(time.time() * 1000)
    records, counts, hostile = _stream(now_ms)
    _produce(cfg.kafka.bootstrap, cfg.kafka.input_topic, records)

    with LocalJob(cfg) as job:
        result = job.wait_idle(idle_s=6.0, timeout_s=300, min_received=counts["valid"] + counts["hostile"])
        details = _rest(port, f"/jobs/{job.job_id}")
        exceptions = _rest(port, f"/jobs/{job.job_id}/exceptions")
    # Never restarted: the job has no RESTARTING time stamp and no failure in its exception history.
    assert details["state"] == "RUNNING"
    assert details["timestamps"]["RESTARTING"] == 0, details["timestamps"]
    assert exceptions["exceptionHistory"]["entries"] == [], exceptions

    last = result.last
    assert (last["trained"], last["dead_lettered"], last["received"]) == (
        counts["valid"], counts["hostile"], counts["valid"] + counts["hostile"])

    dead = [orjson.loads(v) for _k, v, _p, _o in read_all(cfg.kafka.bootstrap, cfg.kafka.dead_letter_topic)]
    where = Counter((d["partition"], d["offset"]) for d in dead)
    assert max(where.values()) == 1, "a dead letter was written twice"
    assert set(where) == set(hostile), {
        "dead-lettered but not hostile": sorted(set(where) - set(hostile)),
        "hostile but not dead-lettered": sorted(hostile[k] for k in set(hostile) - set(where)),
    }
    reasons = {hostile[(d["partition"], d["offset"])]: d["reason"] for d in dead}
    assert reasons["null_value"] == "null_value"
    assert reasons["far_future_on_every_partition"] == reasons["ts_far_future"] == "future_ts"
    assert reasons["value_beyond_float32"] == reasons["value_negative"] == "value_out_of_range"
    assert reasons["duplicate_escaped_user_id"] == "duplicate_keys"
    assert "internal_error" not in reasons.values(), reasons  # every kind is judged by a rule of its own
    assert all("payload" in d and d["stage"] for d in dead)
