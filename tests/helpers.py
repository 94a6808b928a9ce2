"""Helpers shared by the integration tests that run the job on a session cluster: the truth of a generated stream,
the job's arguments, following the stats topic, and the exactly-once reconciliation of the output topics."""
from __future__ import annotations

import dataclasses
import itertools
import math
import os
import pickle
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import yaml

from deploy.cluster import SessionCluster
from deploy.cluster_rest import ENDED
from deploy.kafka import Broker
from flink_job.config import JobConfig
from flink_job.kafka.produce import Record
from flink_job.secrets import write_private
from flink_job.stages.publish import decode
from flink_job.stages.train_output import combine_latest
from flink_job.kafka.topics import Follower, read_all

PROJECT = Path(__file__).resolve().parent.parent
# MovieLens 100K: beside the project in ../shared, or wherever $STREAMREC_ML100K says (a worktree, CI).
ML100K = Path(os.environ.get("STREAMREC_ML100K", PROJECT.parent / "shared" / "datasets" / "ml-100k"))


@dataclass(frozen=True)
class Truth:
    """What the job must make of a generated stream."""

    valid: int  # unique well-formed events: trained
    duplicates: int  # dropped by the de-duplication
    malformed: int  # dead-lettered (malformed and late records)
    users: frozenset[str]
    items: frozenset[str]
    user_events: dict[str, int] = field(default_factory=dict, hash=False)  # valid events per user

    @classmethod
    def of(cls, records: list[Record]) -> Truth:
        events = [orjson.loads(r.payload) for r in records if r.kind == "event"]
        duplicates = sum(r.kind == "duplicate" for r in records)
        return cls(len(events), duplicates, len(records) - len(events) - duplicates,
                   frozenset(e["user_id"] for e in events), frozenset(e["item_id"] for e in events),
                   dict(Counter(e["user_id"] for e in events)))

    @property
    def total(self) -> int:
        return self.valid + self.duplicates + self.malformed

    @property
    def received(self) -> int:
        """Records that pass the de-duplication and reach the trainer."""
        return self.valid + self.malformed


def job_args(cfg: JobConfig, tmp_path: Path) -> list[str]:
    """The job's arguments: a YAML file with the whole configuration (this test's topics and settings), as one would
    deploy it; the job name (and so the Kafka transactional-id prefix) is unique per test."""
    tree = cfg.to_dict()
    tree["flink"]["job_name"] = f"streamrec-{cfg.kafka.group_id}"
    path = tmp_path / "job.yaml"
    write_private(path, yaml.safe_dump(tree))  # as one would deploy it: flink.options may hold secrets
    return ["--config", str(path)]


def follow_stats(cluster: SessionCluster, job_id: str, stats: Follower, done: Callable[[list[dict[str, Any]]], bool],
                 idle_s: float = 3.0, timeout_s: float = 120.0) -> list[dict[str, Any]]:
    """The stats records that arrive until ``done(records)`` holds and nothing new came for ``idle_s``."""
    seen: list[dict[str, Any]] = []
    changed = time.monotonic()
    deadline = changed + timeout_s
    while time.monotonic() < deadline:
        new = [orjson.loads(v) for _k, v, _p, _o in stats.poll(0.5)]
        if new:
            seen.extend(new)
            changed = time.monotonic()
        if seen and done(seen) and time.monotonic() - changed >= idle_s:
            return seen
        state = cluster.job_status(job_id)
        if state not in ("RUNNING", "RESTARTING", "CREATED", "INITIALIZING"):
            pytest.fail(f"job {job_id} is {state}: {cluster.exception(job_id)}\nlogs: {cluster.log_dir}")
    pytest.fail(f"job {job_id}: not done within {timeout_s}s; last stats {seen[-1] if seen else 'none'}; "
                f"logs: {cluster.log_dir}")


def trained(stats: list[dict[str, Any]]) -> int:
    """Events trained in these batches: independent of whether the trainer's counters survive a restore."""
    return sum(s["events"] for s in stats if s["kind"] == "batch")


def submitted(cluster: SessionCluster, args: list[str], savepoint: str | None = None, **submit: Any) -> str:
    job_id = cluster.submit(args, savepoint=savepoint, **submit)
    cluster.wait_running(job_id)
    return job_id


def cancel_if_running(cluster: SessionCluster, job_id: str) -> None:
    if cluster.job_status(job_id) not in ENDED:
        cluster.cancel(job_id)


def finite(x: Any) -> bool:
    """A JSON number that is finite (the job's encoder writes a non-finite float as null)."""
    return isinstance(x, (int, float)) and math.isfinite(x)


def latest_by_id(records: list[tuple[bytes | None, bytes | None, int, int]]) -> dict[str, dict[str, Any]]:
    """The last record per key in topic order (tombstones drop the key), decoded."""
    out: dict[str, dict[str, Any]] = {}
    for key, value, _p, _o in sorted(records, key=lambda r: (r[2], r[3])):
        k = (key or b"").decode()
        if value is None:
            out.pop(k, None)
        else:
            out[k] = decode(value)
    return out


def assert_reconciled(cfg: JobConfig, truth: Truth) -> dict[str, dict[str, Any]]:
    """The exactly-once reconciliation of the three output topics, read with ``read_committed``:

    - the last committed stats record: trained + de-duplicated + dead-lettered = input, each count exact;
    - the dead-letter topic: exactly the malformed records, each once;
    - the embeddings topic: every expected id present, versions strictly increasing per id in topic order, every
      vector finite, and each user's last ``events`` counter equal to its number of valid events (each event
      trained exactly once, none lost).

    Returns the last committed embedding record per key.
    """
    bootstrap = cfg.kafka.bootstrap
    stats = [orjson.loads(v) for _k, v, _p, _o in sorted(read_all(bootstrap, cfg.kafka.stats_topic, True),
                                                         key=lambda r: (r[2], r[3]))]
    assert stats, "no committed stats record"
    last = combine_latest(stats)  # of user-sharded trainers, each one's last record
    counts = {k: last[k] for k in ("received", "trained", "dead_lettered", "near_duplicates")}
    assert counts == {"received": truth.received, "trained": truth.valid, "dead_lettered": truth.malformed,
                      "near_duplicates": 0}, f"stats {counts} for {truth.total} records"
    assert last["trained"] + (truth.total - last["received"]) + last["dead_lettered"] == truth.total

    dead = read_all(bootstrap, cfg.kafka.dead_letter_topic, True)
    positions = Counter((d["partition"], d["offset"]) for d in (orjson.loads(v) for _k, v, _p, _o in dead))
    assert len(dead) == truth.malformed, f"{len(dead)} committed dead letters, {truth.malformed} malformed records"
    assert max(positions.values(), default=1) == 1, "a dead letter was committed twice"

    records = read_all(bootstrap, cfg.kafka.embeddings_topic, True)
    versions: dict[str, list[int]] = defaultdict(list)
    for key, value, _p, _o in sorted(records, key=lambda r: (r[2], r[3])):
        assert value is not None, f"unexpected tombstone for {key!r}"
        rec = decode(value)
        assert key == f"{rec['kind']}:{rec['id']}".encode()
        assert all(finite(x) for x in rec["vector"]) and finite(rec["bias"]), f"non-finite {key!r}: {rec}"
        versions[key.decode()].append(rec["version"])
    expected = {f"user:{u}" for u in truth.users} | {f"item:{i}" for i in truth.items}
    missing = sorted(expected - versions.keys())
    assert not missing, f"{len(missing)} ids never committed, e.g. {missing[:10]}"
    not_increasing = {k: v for k, v in versions.items() if any(b <= a for a, b in itertools.pairwise(v))}
    assert not not_increasing, f"versions not increasing in topic order: {dict(list(not_increasing.items())[:5])}"
    latest = latest_by_id(records)
    events = {k.removeprefix("user:"): r["events"] for k, r in latest.items() if r["kind"] == "user"}
    wrong = {u: (events.get(u), n) for u, n in truth.user_events.items() if events.get(u) != n}
    assert not wrong, f"{len(wrong)} users' (trained, valid) events differ, e.g. {dict(list(wrong.items())[:10])}"
    return latest


def fresh_topics(bootstrap: str, prefix: str, tmp_path: Path, overrides: list[str] | None = None,
                 input_partitions: int = 2) -> JobConfig:
    """Fresh topics on the broker at ``bootstrap`` and a JobConfig pointing at them (the ``topics`` fixture for a
    broker other than the session's)."""
    import uuid

    from deploy.kafka import create_topics, job_topics

    run = f"{prefix}-{uuid.uuid4().hex[:8]}"
    cfg = JobConfig.load(overrides=[
        f"kafka.bootstrap={bootstrap}",
        f"kafka.input_topic={run}.events",
        f"kafka.embeddings_topic={run}.embeddings",
        f"kafka.dead_letter_topic={run}.dead-letters",
        f"kafka.stats_topic={run}.stats",
        f"kafka.item_delta_topic={run}.item-deltas",
        f"kafka.group_id={run}",
        f"flink.checkpoint_dir={(tmp_path / 'checkpoints').as_uri()}",
        *(overrides or []),
    ])
    all_topics = job_topics(cfg)
    security = cfg.kafka.librdkafka_properties()
    create_topics(bootstrap, {cfg.kafka.input_topic: all_topics.pop(cfg.kafka.input_topic)}, input_partitions, security)
    create_topics(bootstrap, all_topics, 1, security)
    return cfg


@contextmanager
def session_cluster(rest_port: int, rpc_port: int, run_dir: Path,
                    extra_settings: dict[str, Any] | None = None) -> Iterator[SessionCluster]:
    """A session cluster of its own (ports, run dir), cleared of an aborted run's leftovers and stopped even when
    the tests using it fail."""
    import shutil

    c = SessionCluster(rest_port, rpc_port, run_dir, extra_settings=extra_settings or {})
    c.stop()  # left over from an aborted run
    shutil.rmtree(c.run_dir, ignore_errors=True)
    try:
        c.start()
        yield c
    finally:
        c.stop()


@contextmanager
def locked_broker(first_port: int, slots: int, name: str, sasl_users: tuple[tuple[str, str], ...] = ()
                  ) -> Iterator[Broker]:
    """A KRaft broker on the first free of ``slots`` port pairs from ``first_port`` (steps of 10), data in
    ``.run/<name>-<port>``, removed before it starts and stopped afterwards. With ``sasl_users`` it also listens
    for SASL_PLAINTEXT/PLAIN clients on the slot's port + 2.

    Each user holds a lock on its folder, so a second test session running at the same time (another checkout's
    CI, a developer's run) takes the next slot instead of stopping this one's broker, and a broker left running in
    an unlocked folder is a leftover of a dead session, stopped and replaced.
    """
    import fcntl
    import shutil

    for slot in range(slots):
        port = first_port + 10 * slot
        run_dir = PROJECT / ".run" / f"{name}-{port}"
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = open(run_dir.with_name(run_dir.name + ".lock"), "w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            continue  # a live session owns this slot
        broker = Broker(port, port + 1, run_dir, sasl_port=port + 2 if sasl_users else 0, sasl_users=sasl_users)
        broker.stop()  # a leftover of a session that died
        shutil.rmtree(run_dir, ignore_errors=True)
        try:
            broker.start()
        except RuntimeError:
            lock.close()
            continue  # the port is taken by something else
        try:
            yield broker
        finally:
            broker.stop()
            lock.close()
        return
    raise RuntimeError(f"tests: no free slot for a test Kafka broker ({name}, {slots} slots from {first_port})")


def same_state(a: object, b: object) -> bool:
    """Equal stage states, compared by value (pickle's bytes also depend on which objects were shared)."""
    if isinstance(a, bytes) and isinstance(b, bytes) and a[:1] == b[:1] == b"\x80":
        a, b = pickle.loads(a), pickle.loads(b)
    if type(a) is not type(b):
        return False
    if dataclasses.is_dataclass(a):
        a, b = ({f.name: getattr(x, f.name) for f in dataclasses.fields(x)} for x in (a, b))  # type: ignore[arg-type]
    if isinstance(a, dict):
        return list(a) == list(b) and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b))
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b, equal_nan=a.dtype.kind == "f")
    return bool(a == b) or (a != a and b != b)  # NaN equals NaN here


NOW = 1_700_000_000_000  # the processing time of the unit tests' flood streams


def flood_lines(n: int, start: int = 0, items: int = 5) -> list[str]:
    """``n`` chunk lines of events, each of a new user, on a few items, one second apart in event time."""
    return [
        f'0,{k},{{"event_id":"e{k}","user_id":"flood{k}","item_id":"i{k % items}","action":"click",'
        f'"ts":{NOW - 10**7 + 1000 * k}}}'
        for k in range(start, start + n)
    ]
