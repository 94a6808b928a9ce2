"""The training stage's snapshot (flink_job.stages.train_state): a state of version 1, written before the stage was
split into components, restores into the components.

tests/data/train_state_v1.pkl was written by the TrainStage of commit 98244f3 (state version 1) after ``calls()``
under ``CONFIG``; a stage of this version that makes the same calls must hold exactly what the restored one holds.
"""
from __future__ import annotations

import pickle

from flink_job.config import JobConfig
from flink_job.stages.train import TrainStage
from flink_job.tools.generate import SyntheticConfig, generate
from tests.helpers import PROJECT, same_state

CONFIG = ["batch.size=100", "model.dim=8", "publish.interval_ms=1000", "clean.near_duplicate_window_ms=50"]
NOW = 1_800_000_000_000  # processing time after the synthetic stream's event times


def _lines(n: int, seed: int) -> list[str]:
    syn = SyntheticConfig(n_users=40, n_items=30, n_events=n, seed=seed, malformed_rate=0.05, late_rate=0.05)
    return [f"{i % 2},{i},{r.payload.decode(errors='replace')}" for i, r in enumerate(generate(syn))]


def calls() -> list[tuple[str, int, list[str] | None]]:
    """Chunks that train batches, leave a partial one pending and touched rows unpublished, and a timer call."""
    lines = _lines(460, seed=7)
    made: list[tuple[str, int, list[str] | None]] = [
        ("chunk", NOW + 100 * n, lines[s:s + 60]) for n, s in enumerate(range(0, 460, 60))]
    made.insert(3, ("timer", NOW + 250, None))
    return made


def test_a_version_1_state_restores_with_the_same_counters_pending_batch_and_model() -> None:
    cfg = JobConfig.load(overrides=CONFIG)
    old = (PROJECT / "tests" / "data" / "train_state_v1.pkl").read_bytes()
    assert pickle.loads(old)["version"] == 1
    restored = TrainStage.from_bytes(cfg, old)
    same = TrainStage(cfg)
    for call in calls():
        same.call(call)
    assert restored.counters == same.counters and restored.counters.trained >= 300
    assert restored.batcher.pending == same.batcher.pending > 0
    assert same_state(restored.batcher.state(), same.batcher.state())
    assert same_state(restored.model.state_bytes(), same.model.state_bytes())
    assert restored.unpublished and same_state(restored.state_bytes(), same.state_bytes())  # every component
    more = _lines(200, seed=8)
    a, b = restored.on_chunk(more, now_ms=NOW + 5_000), same.on_chunk(more, now_ms=NOW + 5_000)
    assert a.trained == b.trained > 0 and a.embeddings and [k for k, _ in a.embeddings] == [k for k, _ in b.embeddings]
    assert same_state(restored.state_bytes(), same.state_bytes())
