"""Event time cannot be poisoned: a partition's newest event time never runs ahead of processing time by more than
``clean.max_future_ms``, events further ahead are dead-lettered as ``future_ts``, and a state that ran ahead (an
old checkpoint) is brought back when it is read."""
from __future__ import annotations

import json

import numpy as np

from flink_job.config import JobConfig
from flink_job.stages.lateness import Watermarks
from flink_job.stages.parse import parse_lines
from flink_job.stages.train import TrainStage

NOW = 1_800_000_000_000
DAY = 24 * 3600 * 1000
MINUTE = 60_000


def line(n: int, ts: int, partition: int = 0) -> str:
    d = {"event_id": f"e{n}", "user_id": f"u{n % 7}", "item_id": f"i{n % 11}", "action": "view", "ts": ts}
    return f"{partition},{n},{json.dumps(d)}"


def test_an_event_a_day_ahead_is_dead_lettered_and_later_real_events_are_trained() -> None:
    stage = TrainStage(JobConfig.load(overrides=["batch.size=10"]))
    out = stage.on_chunk([line(0, NOW + DAY), line(1, NOW + DAY, partition=1)], now_ms=NOW)
    assert [(d.reason, d.stage) for d in out.dead_letters] == [("future_ts", "parse")] * 2
    real = [line(n, NOW - 10 * MINUTE + n * 1000, partition=n % 2) for n in range(2, 22)]
    out = stage.on_chunk(real, now_ms=NOW + 1000)
    assert out.dead_letters == [] and out.trained == 20


def test_the_watermark_never_runs_ahead_of_processing_time_plus_the_margin() -> None:
    w = Watermarks(out_of_orderness_ms=5 * MINUTE, allowed_lateness_ms=60 * MINUTE, max_ahead_ms=5 * MINUTE)
    # Events ahead of the margin (which the parser would reject) move the watermark only as far as it.
    batch, _ = parse_lines([line(0, NOW + DAY)], now_ms=NOW + DAY)
    kept, late = w.split(batch, now_ms=NOW)
    assert len(kept) == 1 and late == [] and w.max_ts == {(0, 0): NOW + 5 * MINUTE}
    assert w.watermark(now_ms=NOW) == NOW
    batch, _ = parse_lines([line(1, NOW - 30 * MINUTE), line(2, NOW - 2 * 3600 * 1000)], now_ms=NOW)
    kept, late = w.split(batch, now_ms=NOW)
    assert kept.event_ids == ["e1"] and [d.reason for d in late] == ["late"]


def test_a_restored_state_that_ran_a_day_ahead_is_brought_back_when_read() -> None:
    cfg = JobConfig.load(overrides=["batch.size=10"])
    old = TrainStage(cfg)
    old.admission.watermarks.max_ts = {0: NOW + DAY, 1: NOW + DAY}  # written by a version that let one event move it
    stage = TrainStage.from_bytes(cfg, old.state_bytes())
    real = [line(n, NOW - 10 * MINUTE + n * 1000, partition=n % 2) for n in range(20)]
    out = stage.on_chunk(real, now_ms=NOW)
    assert out.dead_letters == [] and out.trained == 20
    assert max(stage.admission.watermarks.max_ts.values()) <= NOW + cfg.clean.max_future_ms
    # Partition keys of a state written before sources had shards are read as shard 0's.
    assert set(stage.admission.watermarks.max_ts) == {(0, 0), (1, 0)}


def test_the_margin_follows_processing_time() -> None:
    w = Watermarks(out_of_orderness_ms=0, allowed_lateness_ms=0, max_ahead_ms=1000)
    batch, _ = parse_lines([line(0, NOW + 10_000)], now_ms=NOW + 10_000)
    w.split(batch, now_ms=NOW)
    assert w.max_ts[(0, 0)] == NOW + 1000
    later, _ = parse_lines([line(1, NOW + 10_000)], now_ms=NOW + 10_000)
    kept, late = w.split(later, now_ms=NOW + 20_000)  # now the event is in the past: it moves the watermark
    assert len(kept) == 1 and late == [] and w.max_ts[(0, 0)] == NOW + 10_000
    assert np.array_equal(kept.ts, [NOW + 10_000])


def test_a_backlog_cut_into_shard_chunks_is_not_late() -> None:
    """One processing-time window of a backlog holds days of event time, cut into one chunk per user shard: the
    second shard's chunk starts days before the first one ended, and none of it is late."""
    cfg = JobConfig.load(overrides=["batch.size=100000"])
    stage = TrainStage(cfg)
    backlog = [line(n, NOW - 3 * DAY + n * MINUTE, partition=n % 2) for n in range(400)]
    by_shard: dict[int, list[str]] = {0: [], 1: []}
    for n, text in enumerate(backlog):
        by_shard[(n // 2) % 2].append(text)
    late = []
    for shard in (0, 1):
        out = stage.call(("chunk", NOW, (shard, by_shard[shard])))
        late += [d for d in out.dead_letters if d.reason == "late"]
    assert late == [] and stage.counters.dead_lettered == 0
    # Within one source the watermark still holds: an event far behind its own shard's newest is late.
    old = line(1000, NOW - 4 * DAY, partition=0)
    out = stage.call(("chunk", NOW, (0, [old])))
    assert [d.reason for d in out.dead_letters] == ["late"]


def test_a_chunk_logged_as_a_plain_list_is_shard_zero() -> None:
    stage = TrainStage(JobConfig.load(overrides=["batch.size=100000"]))
    stage.call(("chunk", NOW, [line(0, NOW - MINUTE)]))
    assert set(stage.admission.watermarks.max_ts) == {(0, 0)}
    stage.call(("chunk", NOW, (3, [line(1, NOW - MINUTE)])))
    assert set(stage.admission.watermarks.max_ts) == {(0, 0), (0, 3)}
