"""The training stage's publishing rules: cap per publish, tolerance-triggered publishes, the user's seen items,
the NumPy file sink, tombstones, skipped batches and warm starts."""
from __future__ import annotations

import numpy as np
import orjson
import pytest

from flink_job.config import JobConfig
from flink_job.schema import RATING_CODE
from flink_job.stages.publish import SNAPSHOT_FILE, DirtyRows
from flink_job.stages.train import TrainStage
from model import rating_offsets
from model.mf import OnlineBiasedMF
from tests.model_seams import poison_next_batch


def _lines(n: int, users: int = 5, items: int = 7, start: int = 0) -> list[str]:
    return [
        f'0,{k},{{"event_id":"e{k}","user_id":"u{k % users}","item_id":"i{k % items}","action":"click","ts":{k}}}'
        for k in range(start, start + n)
    ]


def _published(out) -> dict[str, dict]:  # type: ignore[no-untyped-def]
    return {k: orjson.loads(v) for k, v in out.embeddings}


def test_capped_drains_take_turns_so_every_row_is_published() -> None:
    d = DirtyRows()
    d.touch(np.arange(10))
    taken = [d.drain(limit=4)[0].tolist() for _ in range(3)]
    assert taken == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    d.touch(np.array([1, 8, 9]))
    assert d.drain(limit=2)[0].tolist() == [8, 9] and d.drain(limit=2)[0].tolist() == [1]  # from the cursor on
    assert len(d) == 0


def test_publish_cap_defers_the_rest_to_the_next_publish() -> None:
    cfg = JobConfig.load(overrides=["batch.size=20", "publish.interval_ms=100", "publish.item_interval_ms=100",
                                    "publish.max_records=4"])
    stage = TrainStage(cfg)
    first = _published(stage.on_chunk(_lines(20, users=5, items=7), now_ms=1_000))
    assert len(first) == 4 and stage.unpublished  # 5 users + 7 items touched, 4 published
    later: dict[str, dict] = {}
    for t in range(1_100, 2_000, 100):
        later.update(_published(stage.on_time(now_ms=t)))
    assert set(first) | set(later) == {f"user:u{u}" for u in range(5)} | {f"item:i{i}" for i in range(7)}
    assert not set(first) & set(later) and not stage.unpublished


def test_items_wait_for_their_own_longer_interval_users_do_not() -> None:
    cfg = JobConfig.load(overrides=["batch.size=10", "publish.interval_ms=100", "publish.item_interval_ms=1000"])
    stage = TrainStage(cfg)
    kinds: list[set[str]] = []
    for n, t in enumerate(range(1_000, 3_100, 100)):  # a chunk every 100 ms for 2.1 s
        out = stage.on_chunk(_lines(10, start=10 * n), now_ms=t)
        kinds.append({k.split(":")[0] for k in _published(out)})
    assert all("user" in k for k in kinds)  # every 100 ms
    assert [n for n, k in enumerate(kinds) if "item" in k] == [0, 10, 20]  # at 1,000, 2,000 and 3,000 ms
    assert not _published(stage.on_chunk(_lines(10, start=500), now_ms=3_050))
    assert stage.next_deadline_ms() == 3_100  # the users' deadline comes first
    assert {k.split(":")[0] for k in _published(stage.on_time(now_ms=3_100))} == {"user"}
    assert stage.next_deadline_ms() == 4_000 and len(stage.publisher.dirty_items) and not len(stage.publisher.dirty_users)


def test_tolerance_publishes_moved_rows_before_the_interval() -> None:
    overrides = ["batch.size=20", "publish.interval_ms=60000", "publish.item_interval_ms=60000"]
    lazy = TrainStage(JobConfig.load(overrides=overrides))
    eager = TrainStage(JobConfig.load(overrides=[*overrides, "publish.tolerance=0.01"]))
    for stage in (lazy, eager):
        stage.publisher.last_publish_ms = stage.publisher.last_item_publish_ms = 1_000  # the intervals have not passed below
    assert _published(lazy.on_chunk(_lines(20), now_ms=2_000)) == {}
    first = _published(eager.on_chunk(_lines(20), now_ms=2_000))
    assert "user:u0" in first and "item:i0" in first  # never published: moved by definition
    # A huge tolerance: the same rows, moved a little again, wait for the interval.
    stage = TrainStage(JobConfig.load(overrides=[*overrides, "publish.tolerance=1000"]))
    stage.publisher.last_publish_ms = stage.publisher.last_item_publish_ms = 1_000
    stage.on_chunk(_lines(20), now_ms=2_000)
    assert _published(stage.on_chunk(_lines(20, start=20), now_ms=3_000)) == {}
    assert stage.unpublished


def test_user_records_carry_recent_items_for_serving_to_exclude() -> None:
    stage = TrainStage(JobConfig.load(overrides=["batch.size=6", "publish.interval_ms=0"]))
    recs = _published(stage.on_chunk(_lines(6, users=2, items=6), now_ms=1_000))
    assert recs["user:u0"]["seen"] == ["i0", "i2", "i4"] and recs["user:u1"]["seen"] == ["i1", "i3", "i5"]
    assert "seen" not in recs["item:i0"]


def test_snapshot_sink_writes_every_row_with_its_id(tmp_path) -> None:
    cfg = JobConfig.load(overrides=["batch.size=10", f"publish.snapshot_dir={tmp_path}",
                                    "publish.snapshot_interval_ms=1000"])
    stage = TrainStage(cfg)
    stage.on_chunk(_lines(10), now_ms=5_000)
    with np.load(tmp_path / SNAPSHOT_FILE) as snap:
        assert sorted(snap["user_ids"].tolist()) == [f"u{u}" for u in range(5)]
        assert snap["item_vectors"].shape == (7, cfg.model.dim)
        vectors, _, updates = stage.model.vectors("user", np.array([stage.model.users.get("u3")]))
        row = snap["user_ids"].tolist().index("u3")
        np.testing.assert_array_equal(snap["user_vectors"][row], vectors[0])
        assert snap["user_updates"][row] == updates[0] and int(snap["step"]) == stage.model.step
    stage.on_chunk(_lines(10, start=10, users=8), now_ms=5_500)  # within the interval: not rewritten
    with np.load(tmp_path / SNAPSHOT_FILE) as snap:
        assert len(snap["user_ids"]) == 5
    stage.on_chunk(_lines(10, start=20, users=8), now_ms=6_000)
    with np.load(tmp_path / SNAPSHOT_FILE) as snap:
        assert len(snap["user_ids"]) == 8
    assert [p.name for p in tmp_path.iterdir()] == [SNAPSHOT_FILE]  # no temporary file left behind




def _rated(n: int, users: int = 4, items: int = 6, start: int = 0, ts0: int = 0) -> list[str]:
    return [
        f'0,{k},{{"event_id":"r{k}","user_id":"u{k % users}","item_id":"i{k % items}","action":"rating",'
        f'"value":{1 + k % 5},"ts":{ts0 + k}}}'
        for k in range(start, start + n)
    ]


def test_each_batch_is_evaluated_before_it_trains() -> None:
    # One sub-step per batch (no sub-step budget), so that the whole first batch meets the untrained model.
    stage = TrainStage(JobConfig.load(overrides=["batch.size=12", "eval.user_sample=1.0", "publish.interval_ms=0",
                                                 "model.optimizer.sub_step_budget=0"]))
    out = stage.on_chunk(_rated(24), now_ms=1_000)
    batches = [orjson.loads(r) for r in out.stats if orjson.loads(r)["kind"] == "batch"]
    assert [b["quality"]["events"] for b in batches] == [12, 12]
    first, second = batches[0]["quality"], batches[1]["quality"]
    # The first batch is scored by the untrained model (its ids admitted, nothing learned): exactly its error.
    untrained = OnlineBiasedMF(stage.cfg.model, RATING_CODE)
    users, items = [f"u{k % 4}" for k in range(12)], [f"i{k % 6}" for k in range(12)]
    untrained.admit(users, items, None)
    u, i = untrained.users.lookup(users), untrained.items.lookup(items)
    ratings = np.array([1.0 + k % 5 for k in range(12)])
    offset = rating_offsets.in_step(untrained, u, i, ratings, np.ones(12, bool))  # the batch's earlier ratings
    pred = np.clip(untrained.predict_ratings(users, items) + offset, 1.0, 5.0)
    expected = np.sqrt(np.mean((ratings - pred) ** 2))
    assert first["rmse"] == pytest.approx(expected, abs=1e-4)
    assert second["positives"] == sum(1 + k % 5 >= 4 for k in range(12, 24))
    running = batches[-1]["prequential"]
    assert running["rated"] == 24 and running["positives"] == first["positives"] + second["positives"]


def test_expired_ids_are_published_as_tombstones_and_never_as_vectors() -> None:
    day = 24 * 3600 * 1000
    stage = TrainStage(JobConfig.load(overrides=[
        "batch.size=12", "publish.interval_ms=0", f"model.ids.ttl_ms={day}", "clean.out_of_orderness_ms=0",
    ]))
    stage.on_chunk(_rated(12, users=4), now_ms=1_000)
    # Two days later only u0's events arrive; the other users fall out of the model.
    later = [line.replace('"u1"', '"u0"').replace('"u2"', '"u0"').replace('"u3"', '"u0"')
             for line in _rated(36, users=4, start=12, ts0=2 * day)]
    out = stage.on_chunk(later, now_ms=2 * day)
    tombstones = {k for k, v in out.embeddings if v is None}
    assert {"user:u1", "user:u2", "user:u3"} <= tombstones and "user:u0" not in tombstones
    assert stage.counters.expired >= 3
    assert all(orjson.loads(v)["id"] for _k, v in out.embeddings if v is not None)


def test_a_poisoned_batch_is_skipped_dead_lettered_and_never_published() -> None:
    stage = TrainStage(JobConfig.load(overrides=["batch.size=12", "publish.interval_ms=0"]))
    stage.on_chunk(_rated(12), now_ms=1_000)
    vectors_before = stage.model.vectors("user", np.array([stage.model.users.get("u0")]))[0]
    poison_next_batch(stage.model)
    out = stage.on_chunk(_rated(12, start=12), now_ms=2_000)
    batch = [orjson.loads(r) for r in out.stats if orjson.loads(r)["kind"] == "batch"][0]
    assert batch["skipped"] and stage.counters.skipped_batches == 1
    # Nothing of the batch was learned or published; its events are dead letters, so the accounting still closes.
    assert out.embeddings == [] and out.trained == 0
    assert sorted(d.offset for d in out.dead_letters) == list(range(12, 24))
    assert {d.reason for d in out.dead_letters} == {"non_finite_batch"}
    assert orjson.loads(out.dead_letters[0].payload)["event_id"] == "r12"
    np.testing.assert_array_equal(stage.model.vectors("user", np.array([stage.model.users.get("u0")]))[0],
                                  vectors_before)
    assert stage.counters.trained + stage.counters.dead_lettered == stage.counters.received == 24
    follow = stage.on_chunk(_rated(12, start=24), now_ms=3_000)  # the job goes on training
    assert not [orjson.loads(r) for r in follow.stats if orjson.loads(r)["kind"] == "batch"][0]["skipped"]
    assert follow.trained == 12 and all(np.isfinite(orjson.loads(v)["vector"]).all() for _k, v in follow.embeddings)


def test_ids_not_admitted_yet_are_not_published() -> None:
    stage = TrainStage(JobConfig.load(overrides=["batch.size=8", "publish.interval_ms=0", "model.ids.admit_after=2"]))
    lines = [f'0,{k},{{"event_id":"a{k}","user_id":"u{k}","item_id":"i0","action":"click","ts":{k}}}'
             for k in range(8)]  # eight users seen once each: none admitted; i0 seen 8 times: admitted
    recs = _published(stage.on_chunk(lines, now_ms=1_000))
    assert not [k for k in recs if k.startswith("user:")] and "item:i0" in recs
    assert all(r["id"] for r in recs.values())


def test_a_warm_started_model_continues_on_the_stream(tmp_path) -> None:
    from model.warm_start import main as warm_start

    history = tmp_path / "u.data"
    history.write_text("".join(f"{1 + k % 6}\t{1 + k % 9}\t{1 + k % 5}\t{880000000 + k}\n" for k in range(300)))
    state = tmp_path / "state.bin"
    warm_start(["--input", str(history), "--out", str(state), "--epochs", "2"])
    # The history is from 1997: under the default TTL (30 days of event time) the stream would expire all of it.
    stage = TrainStage(JobConfig.load(overrides=["batch.size=12", f"flink.initial_model={state}", "model.ids.ttl_ms=0"]))
    pretrained = stage.model.step
    assert pretrained > 0 and len(stage.model.users) == 6 and len(stage.model.items) == 9
    stage.on_chunk(_rated(12), now_ms=1_000)
    assert stage.model.step == pretrained + 1 and len(stage.model.users) == 6 + 4


def test_users_of_a_batch_closed_by_max_wait_are_published_at_once() -> None:
    """Below batch.size per max_wait_ms the job has time to spare: a partial batch's users go out when it trains;
    full batches' users still wait for publish.interval_ms, which coalesces repeat users under load."""
    cfg = JobConfig.load(overrides=["batch.size=10", "batch.max_wait_ms=200", "publish.interval_ms=60000",
                                    "publish.item_interval_ms=60000"])
    stage = TrainStage(cfg)
    stage.publisher.last_publish_ms = stage.publisher.last_item_publish_ms = 1_000  # the intervals have not passed
    full = stage.on_chunk(_lines(14, users=5), now_ms=1_000)  # one full batch, 4 events pending
    assert full.batches == 1 and not full.embeddings
    assert not stage.on_time(now_ms=1_100).embeddings  # the rest has not waited max_wait_ms yet
    partial = stage.on_time(now_ms=1_200)
    assert partial.batches == 1
    assert set(_published(partial)) == {f"user:u{u}" for u in range(5)}  # the full batch's users went out too
    assert stage.publisher.dirty_items and not any(k.startswith("item:") for k in _published(partial))
