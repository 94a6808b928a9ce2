"""The training stage's snapshot (flink_job.stages.train_state): a state of version 1, written before the stage was
split into components, restores into the components.

tests/data/train_state_v1.pkl was written by the TrainStage of commit 98244f3 (state version 1) after the calls in
tests/data/train_state_v1_calls.json under ``CONFIG``; a stage of this version that makes the same calls must hold
exactly what the restored one holds. The calls are stored, not generated, so that a change to the generator cannot
make them differ from the ones the old stage saw.
"""
from __future__ import annotations

import json
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
    """Chunks that train batches, leave a partial one pending and touched rows unpublished, and a timer call (made
    from 460 synthetic events of seed 7 in chunks of 60, the timer fourth)."""
    stored = json.loads((PROJECT / "tests" / "data" / "train_state_v1_calls.json").read_text())
    return [(kind, now, lines) for kind, now, lines in stored]


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
    # Every component but the evaluator's cold-start memory, which states written before it (version 1 among them)
    # lack: their ids all count as warm.
    assert restored.unpublished and same_state(_without_cold(restored), _without_cold(same))
    assert restored.quality is not None and same.quality is not None
    assert restored.quality.summary()["hr"] == same.quality.summary()["hr"]
    more = _lines(200, seed=8)
    a, b = restored.on_chunk(more, now_ms=NOW + 5_000), same.on_chunk(more, now_ms=NOW + 5_000)
    assert a.trained == b.trained > 0 and a.embeddings and [k for k, _ in a.embeddings] == [k for k, _ in b.embeddings]
    assert same_state(_without_cold(restored), _without_cold(same))


def _without_cold(stage: TrainStage) -> dict[str, object]:
    state = pickle.loads(stage.state_bytes())
    quality = state["quality"]
    for key in [k for k in quality if "cold" in k]:
        del quality[key]
    return state
