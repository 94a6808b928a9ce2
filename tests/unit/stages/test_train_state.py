"""The training stage's snapshot (flink_job.stages.train_state): a state of version 1, written before the stage was
split into components, restores into the components.

tests/data/train_state_v1.pkl was written by the TrainStage of commit 98244f3 (state version 1) after the calls in
tests/data/train_state_v1_calls.json under ``CONFIG``.
"""
from __future__ import annotations

import pickle

import torch

from flink_job.config import JobConfig
from flink_job.stages.train import TrainStage
from model.mf import OnlineBiasedMF
from flink_job.tools.generate import SyntheticConfig, generate
from tests.helpers import PROJECT, same_state

CONFIG = ["batch.size=100", "model.dim=8", "publish.interval_ms=1000", "clean.near_duplicate_window_ms=50"]
NOW = 1_800_000_000_000  # processing time after the synthetic stream's event times


def _lines(n: int, seed: int) -> list[str]:
    syn = SyntheticConfig(n_users=40, n_items=30, n_events=n, seed=seed, malformed_rate=0.05, late_rate=0.05)
    return [f"{i % 2},{i},{r.payload.decode(errors='replace')}" for i, r in enumerate(generate(syn))]


def test_a_version_1_state_restores_with_the_same_counters_pending_batch_and_model() -> None:
    """Each component holds what the version-1 state held (compared with the old state's own values: the learning
    has changed since, so a stage of today making the same calls would hold another model), and it keeps going."""
    cfg = JobConfig.load(overrides=CONFIG)
    old = (PROJECT / "tests" / "data" / "train_state_v1.pkl").read_bytes()
    v1 = pickle.loads(old)
    assert v1["version"] == 1
    parts = v1["parts"]
    restored = TrainStage.from_bytes(cfg, old)
    now = pickle.loads(restored.state_bytes())
    assert now["version"] == 2
    assert now["counters"] == parts["counters"] and parts["counters"]["trained"] >= 300
    assert restored.batcher.pending == parts["batcher"]["pending"] > 0
    assert same_state(restored.batcher.state(), {"parts": parts["batcher"]["_parts"], "pending": parts["batcher"]["pending"]})
    # The cleaner's z-score moments and per-user event counts, which only its retired features read, are dropped.
    cleaner = {k: v for k, v in parts["cleaner"].items() if k != "logs"}
    cols = {k: v for k, v in cleaner["users"]["cols"].items() if k != "events"}
    assert len(cleaner) < len(parts["cleaner"]) and len(cols) < len(cleaner["users"]["cols"])
    cleaner["users"] = {**cleaner["users"], "cols": cols}
    # Version 1 kept a watermark per partition: now per (partition, chunk shard), the old one as shard 0's.
    watermarks = {"max_ts": {(p, 0): t for p, t in parts["watermarks"]["max_ts"].items()}}
    assert now["admission"]["watermarks"] == watermarks
    assert same_state(now["admission"], {"watermarks": watermarks, "near_duplicates": parts["near_duplicates"],
                                         "cleaner": cleaner})
    assert restored.unpublished and same_state(now["publisher"]["dirty_users"], parts["dirty_users"])
    assert same_state(now["publisher"]["dirty_items"], parts["dirty_items"])
    model = OnlineBiasedMF.from_bytes(v1["model"], cfg.model)
    for table in ("user_table", "item_table"):
        assert torch.equal(getattr(restored.model, table).params, getattr(model, table).params)
    assert restored.model.step == model.step > 0
    # The evaluator's figures carry over; its cold-start memory is new (ids of older states all count as warm).
    old_quality = {k: v for k, v in parts["quality"].items() if k != "version"}
    assert same_state({k: now["quality"][k] for k in old_quality}, old_quality)
    out = restored.on_chunk(_lines(200, seed=8), now_ms=NOW + 5_000)
    assert out.trained > 0 and out.embeddings and restored.counters.trained == parts["counters"]["trained"] + out.trained
