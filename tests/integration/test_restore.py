"""Exact accounting through a restore from a checkpoint: the real job and broker, a stream with duplicates,
malformed and late events, and the job cancelled mid-stream and restarted from its last checkpoint."""
from __future__ import annotations

import dataclasses
import itertools
import threading
import time
from collections import Counter

import orjson
import pytest

from flink_job.tools.generate import SyntheticConfig, generate
from flink_job.kafka.produce import Pacing, send
from flink_job.tools.produce import synthetic_timed
from flink_job.flink.runner import JobProcess, LocalJob, latest_checkpoint
from flink_job.kafka.topics import json_values, read_all

pytestmark = pytest.mark.integration


def _checkpoint_after(job: LocalJob, checkpoint_dir: str, received: int, timeout_s: float = 240) -> None:
    """Waits until the trainer has received ``received`` records and a checkpoint completed after that."""
    deadline = time.monotonic() + timeout_s
    before: str | None = None
    while time.monotonic() < deadline:
        job.poll_stats(0.3)
        if job.result.last.get("received", 0) >= received:
            if before is None:
                before = latest_checkpoint(checkpoint_dir, job.job_id) or ""
            latest = latest_checkpoint(checkpoint_dir, job.job_id)
            if latest and latest != before:
                return
    raise TimeoutError(f"no checkpoint after {received} records; last stats {job.result.last}{job.diagnosis()}")


@pytest.mark.parametrize(("mode", "backend"), [("process", "hashmap"), ("thread", "hashmap"), ("thread", "rocksdb")])
def test_every_event_is_accounted_for_once_across_a_restore_from_a_checkpoint(topics, tmp_path, mode, backend) -> None:
    """Both of PyFlink's execution modes (``flink_job.flink.stage_log``). In thread mode the stage's state is a snapshot
    and the calls made since; here it snapshots only at its first call (as 4 KiB map entries: even an empty stage is
    13 KB), so the restore must replay every later call the checkpoint logged. RocksDB restores from incremental
    checkpoints, each holding only the files written since the one before it."""
    cfg = topics(f"restore-{mode}-{backend}", overrides=["batch.size=256", "flink.checkpoint_interval_ms=1000",
                                                         f"flink.python_execution_mode={mode}",
                                                         f"flink.state_backend={backend}",
                                                         "flink.state_snapshot_interval_ms=3600000",
                                                         "flink.state_chunk_bytes=4096"])
    syn = SyntheticConfig(n_users=300, n_items=150, n_events=24_000, duplicate_rate=0.10, malformed_rate=0.05,
                          late_rate=0.05, seed=21)
    records = list(generate(syn))
    kinds = Counter("malformed" if r.kind not in ("event", "duplicate", "late") else r.kind for r in records)
    assert kinds["duplicate"] > 2_000 and kinds["malformed"] > 1_000 and kinds["late"] > 1_000
    # A first slice now, the rest (33 s at 700 records/s) once the first run is consuming, so that however slowly
    # the job starts, it is killed with much of the input still to come (finding a checkpoint past 6,000 records
    # took 18-20 s after submission, and over 34 s in a loaded full run, which then saw all the input).
    timed = synthetic_timed(syn)
    send(itertools.islice(timed, 500), cfg.kafka.bootstrap, cfg.kafka.input_topic)
    consuming = threading.Event()
    producer = threading.Thread(
        target=lambda: consuming.wait(300) and send(timed, cfg.kafka.bootstrap, cfg.kafka.input_topic,
                                                    Pacing(rate=700)),
        daemon=True,
    )
    producer.start()

    with JobProcess(cfg, tmp_path / "first.log") as job:
        deadline = time.monotonic() + 240
        while not job.result.last.get("received") and time.monotonic() < deadline:
            job.poll_stats(0.3)
        consuming.set()
        _checkpoint_after(job, cfg.flink.checkpoint_dir, received=6_000)
        time.sleep(1.5)  # more records go past the checkpoint: they are replayed after the restore
        job.poll_stats(0.3)
        assert job.result.last["received"] < len(records) - kinds["duplicate"], "the first run saw all input"
    # The process was killed: the newest checkpoint is the only one retained.
    checkpoint = latest_checkpoint(cfg.flink.checkpoint_dir)
    assert checkpoint is not None

    restored = dataclasses.replace(cfg, flink=dataclasses.replace(cfg.flink, restore_from=checkpoint))
    with JobProcess(restored, tmp_path / "restored.log") as job:
        result = job.wait_idle(idle_s=4.0, timeout_s=300, min_received=len(records) - kinds["duplicate"])
    producer.join(timeout=60)

    # Trained + de-duplicated (never reached the trainer) + dead-lettered = input, each exactly once.
    last = result.last
    assert last["replayed_calls"] > 10 if mode == "thread" else last["replayed_calls"] == 0
    assert last["trained"] == kinds["event"]
    assert last["dead_lettered"] == kinds["malformed"] + kinds["late"]
    assert last["received"] == len(records) - kinds["duplicate"]
    assert last["trained"] + (len(records) - last["received"]) + last["dead_lettered"] == len(records)

    # The dead-letter topic is at-least-once: records after the checkpoint may appear twice, never zero times.
    dead = {(d["partition"], d["offset"]): d for d in json_values(read_all(cfg.kafka.bootstrap,
                                                                           cfg.kafka.dead_letter_topic))}
    assert len(dead) == kinds["malformed"] + kinds["late"]
    late_payloads = {r.payload.decode() for r in records if r.kind == "late"}
    assert sorted(d["payload"] for d in dead.values() if d["reason"] == "late") == sorted(late_payloads)

    # The model's own per-id event counters: every user was trained on each of its valid events exactly once.
    expected = Counter(orjson.loads(r.payload)["user_id"] for r in records if r.kind == "event")
    trained: dict[str, int] = {}
    for key, value, _p, _o in read_all(cfg.kafka.bootstrap, cfg.kafka.embeddings_topic):
        rec = orjson.loads(value)
        if rec["kind"] == "user":
            trained[rec["id"]] = max(trained.get(rec["id"], 0), rec["events"])
    assert trained == dict(expected)
