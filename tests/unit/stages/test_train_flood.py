"""The training stage under a flood of new ids: the model's row cap as tombstones, and an exact restore after
evictions."""
from __future__ import annotations

import orjson

from flink_job.config import JobConfig
from flink_job.stages.train import TrainStage
from tests.helpers import NOW, flood_lines, same_state



def _stage(cap: int = 32) -> TrainStage:
    return TrainStage(JobConfig.load(overrides=[
        "batch.size=16", "publish.interval_ms=0", "publish.item_interval_ms=0", f"model.ids.max_rows={cap}",
        "eval.user_sample=1.0", "clean.near_duplicate_window_ms=1000",
    ]))


def test_a_flood_of_new_users_stays_within_the_caps_and_evicted_users_go_out_as_tombstones() -> None:
    stage = _stage(cap=32)
    outs = [stage.on_chunk(flood_lines(50, s), now_ms=NOW + s) for s in range(0, 400, 50)]
    records = [(k, v) for o in outs for k, v in o.embeddings]
    tombstones = [k for k, v in records if v is None]
    assert stage.counters.trained == 400 and stage.counters.evicted == len(tombstones) == 400 - 32
    assert len(set(tombstones)) == len(tombstones) and all(k.startswith("user:flood") for k in tombstones)
    # Every tombstone follows the user's last record, and the users still held were published and not deleted.
    last = {k: v for k, v in records}
    held = {f"user:{u}" for u in stage.model.users.ids(stage.model.users.live_rows())}
    assert len(held) == 32 and {k for k, v in last.items() if k.startswith("user:") and v is not None} == held
    assert len(stage.cleaner.users) <= 32 and stage.cleaner.counts["users_evicted"] >= 400 - 32 - 16
    assert stage.quality is not None and len(stage.quality._seen_users) <= 32
    assert len(stage.admission.near_duplicates.last) <= 32
    assert orjson.loads(outs[-1].stats[-1])["evicted"] == stage.counters.evicted


def test_a_stage_restored_after_evictions_goes_on_exactly_as_the_original() -> None:
    cfg_stage = _stage(cap=24)
    for s in range(0, 200, 40):
        cfg_stage.on_chunk(flood_lines(40, s), now_ms=NOW + s)
    assert cfg_stage.counters.evicted > 0
    restored = TrainStage.from_bytes(cfg_stage.cfg, cfg_stage.state_bytes())
    assert same_state(restored.state_bytes(), cfg_stage.state_bytes())
    for s in range(200, 400, 40):
        a, b = cfg_stage.on_chunk(flood_lines(40, s), now_ms=NOW + s), restored.on_chunk(flood_lines(40, s), now_ms=NOW + s)
        assert [k for k, v in a.embeddings if v is None] == [k for k, v in b.embeddings if v is None]
        assert [k for k, _ in a.embeddings] == [k for k, _ in b.embeddings]
    assert same_state(restored.state_bytes(), cfg_stage.state_bytes())








