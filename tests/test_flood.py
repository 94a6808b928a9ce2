"""Bounded memory under a flood of new ids: the model's row cap as tombstones, and the caps on every other per-id
structure of the training stage (the cleaner's users, the evaluator's memory, the near-duplicate keys)."""
from __future__ import annotations

import numpy as np
import orjson

from flink_job.stages.clean import Cleaner
from flink_job.config import CleanConfig, JobConfig
from flink_job.stages.near_dups import NearDuplicates
from flink_job.stages.parse import parse_lines
from flink_job.stages.train import TrainStage
from model.prequential import Prequential
from tests.test_stages import _same_state

NOW = 1_700_000_000_000


def _flood(n: int, start: int = 0, items: int = 5) -> list[str]:
    """``n`` events, each of a new user, on a few items, one second apart in event time."""
    return [
        f'0,{k},{{"event_id":"e{k}","user_id":"flood{k}","item_id":"i{k % items}","action":"click",'
        f'"ts":{NOW - 10**7 + 1000 * k}}}'
        for k in range(start, start + n)
    ]


def _stage(cap: int = 32) -> TrainStage:
    return TrainStage(JobConfig.load(overrides=[
        "batch.size=16", "publish.interval_ms=0", "publish.item_interval_ms=0", f"model.max_rows={cap}",
        "eval.user_sample=1.0", "clean.near_duplicate_window_ms=1000",
    ]))


def test_a_flood_of_new_users_stays_within_the_caps_and_evicted_users_go_out_as_tombstones() -> None:
    stage = _stage(cap=32)
    outs = [stage.on_chunk(_flood(50, s), now_ms=NOW + s) for s in range(0, 400, 50)]
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
    assert len(stage.near_duplicates.last) <= 32
    assert orjson.loads(outs[-1].stats[-1])["evicted"] == stage.counters.evicted


def test_a_stage_restored_after_evictions_goes_on_exactly_as_the_original() -> None:
    cfg_stage = _stage(cap=24)
    for s in range(0, 200, 40):
        cfg_stage.on_chunk(_flood(40, s), now_ms=NOW + s)
    assert cfg_stage.counters.evicted > 0
    restored = TrainStage.from_bytes(cfg_stage.cfg, cfg_stage.state_bytes())
    assert _same_state(restored.state_bytes(), cfg_stage.state_bytes())
    for s in range(200, 400, 40):
        a, b = cfg_stage.on_chunk(_flood(40, s), now_ms=NOW + s), restored.on_chunk(_flood(40, s), now_ms=NOW + s)
        assert [k for k, v in a.embeddings if v is None] == [k for k, v in b.embeddings if v is None]
        assert [k for k, _ in a.embeddings] == [k for k, _ in b.embeddings]
    assert _same_state(restored.state_bytes(), cfg_stage.state_bytes())


def test_the_cleaner_holds_at_most_max_users_and_evicts_the_least_recent() -> None:
    cleaner = Cleaner(CleanConfig(), max_users=10)
    for s in range(0, 100, 5):
        batch, _ = parse_lines(_flood(5, s), now_ms=NOW)
        cleaner.apply(batch)
    users = cleaner.users
    assert len(users) == 10 and len(users.ids) <= 10 and cleaner.counts["users_evicted"] == 90
    assert sorted(users) == sorted(f"flood{k}" for k in range(90, 100))  # the newest events stay
    assert cleaner.recent_items("flood99") == ["i4"] and cleaner.recent_items("flood0") == []


def test_a_user_met_again_is_not_evicted_by_the_batch_that_meets_it() -> None:
    cleaner = Cleaner(CleanConfig(), max_users=3)
    batch, _ = parse_lines(_flood(3), now_ms=NOW)
    cleaner.apply(batch)
    again, _ = parse_lines([_flood(1, 0)[0].replace('"e0"', '"x0"'), *_flood(1, 3)], now_ms=NOW)
    cleaner.apply(again)  # flood0 (oldest event time) is in the batch: flood1 goes instead
    assert "flood0" in cleaner.users and "flood1" not in cleaner.users and len(cleaner.users) == 3


def test_the_evaluator_caps_its_candidates_and_seen_pairs_and_restores_exactly() -> None:
    class Zero:
        def predict_ratings(self, users, items):  # type: ignore[no-untyped-def]
            return np.full(len(users), 3.0)

        def score_items(self, users, items):  # type: ignore[no-untyped-def]
            return np.zeros((len(users), len(items)))

    ev = Prequential(k=5, max_items=16, max_seen=24)
    copy = None
    for t in range(40):
        users = [f"u{t}-{k % 3}" for k in range(8)]
        items = [f"i{t}-{k}" for k in range(8)]
        for e in ([ev] if copy is None else [ev, copy]):
            e.evaluate(Zero(), users, items, np.full(8, np.nan), np.ones(8, bool))
        assert len(ev.candidates) <= 16 and len(ev._seen_log) // 2 <= 24 and len(ev._seen_users) <= 24
        if t == 19:
            copy = Prequential(k=5, max_items=16, max_seen=24)
            copy.load_state_dict(ev.state_dict())
    assert copy is not None and copy.summary() == ev.summary() and copy.state_dict() == ev.state_dict()
    assert ev.summary()["positives"] == 320  # every positive is still ranked
    assert "i39-7" in ev.candidates and "i0-0" not in ev.candidates  # the least recently met went


def test_near_duplicate_memory_is_capped_and_keeps_the_recent_keys() -> None:
    nd = NearDuplicates(window_ms=10**9, max_keys=5)
    batch, _ = parse_lines(_flood(100), now_ms=NOW)
    kept, dropped = nd.filter(batch)
    assert len(nd.last) == 5 and dropped == 0 and len(kept) == 100
    again, _ = parse_lines([line.replace('"event_id":"e', '"event_id":"x') for line in _flood(100)], now_ms=NOW)
    kept, dropped = nd.filter(again)
    assert dropped == 5  # the last five keys are remembered, the rest were forgotten
