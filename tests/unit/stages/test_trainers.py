"""User-sharded trainers as plain Python: two stages, each fed its own users, exchanging item deltas as the job's
delta topic carries them (``flink_job.stages.trainers``)."""
from __future__ import annotations

import json
import zlib

import numpy as np
import orjson
import pytest

from flink_job.config import JobConfig
from flink_job.stages.train import TrainStage
from flink_job.stages.train_output import Output, combine_latest
from flink_job.stages.trainers import Trainer

NOW = 1_800_000_000_000
CFG = JobConfig.load(overrides=["batch.size=32", "publish.interval_ms=0", "publish.item_interval_ms=0",
                                "publish.negative_tolerance=0", "kafka.item_delta_tolerance=0"])


def line(n: int) -> str:
    rng = np.random.default_rng(n)
    d = {"event_id": f"e{n}", "user_id": f"u{n % 23}", "item_id": f"i{int(rng.integers(40))}", "action": "rating",
         "value": float(rng.integers(1, 6)), "ts": NOW - 100_000 + n}
    return f"0,{n},{json.dumps(d)}"


def user_trainer(text: str, count: int = 2) -> int:
    return zlib.crc32(json.loads(text.split(",", 2)[2])["user_id"].encode()) % count


def published_items(out: Output) -> set[str]:
    return {k.split(":", 1)[1] for k, v in out.embeddings if k.startswith("item:") and v is not None}


def run_pair(n_events: int = 400, concurrent: bool = False, cfg: JobConfig = CFG, held: list[int] | None = None,
             ) -> tuple[list[TrainStage], list[set[str]]]:
    """Two trainers, each fed its users' events a chunk at a time, each delta handed to the other at once, or
    (``concurrent``) once both have trained on the chunk, so that both admit the same new items. ``held`` gets the
    rows each trainer held back after each chunk."""
    stages = [TrainStage(cfg, Trainer(i, 2)) for i in range(2)]
    published: list[set[str]] = [set(), set()]
    lines = [line(n) for n in range(n_events)]
    for start in range(0, n_events, 40):
        sent: list[tuple[int, Output]] = []
        for i, stage in enumerate(stages):
            chunk = [t for t in lines[start:start + 40] if user_trainer(t) == i]
            out = stage.call(("chunk", NOW + start, (i, chunk)))
            published[i] |= published_items(out)
            sent.append((i, out))
            if held is not None and stage.exchange is not None:
                held.append(stage.exchange.sync.used)
            if not concurrent:
                deliver(stages, published, sent.pop(), NOW + start)
        for each in sent:
            deliver(stages, published, each, NOW + start)
    for i, stage in enumerate(stages):  # the partial batches
        out = stage.on_time(NOW + 10**9)
        published[i] |= published_items(out)
        for key, payload in out.deltas:
            published[1 - i] |= published_items(stages[1 - i].on_delta(key, payload, NOW + 10**9))
    return stages, published


def counters(state: dict[str, object]) -> dict[str, object]:
    """An exchange's state without its journal (arrays)."""
    return {k: v for k, v in state.items() if k != "journal"}


def deliver(stages: list[TrainStage], published: list[set[str]], sent: tuple[int, Output], now: int) -> None:
    i, out = sent
    for key, payload in out.deltas:
        published[1 - i] |= published_items(stages[1 - i].call(("delta", now, (key, payload))))


@pytest.mark.parametrize("concurrent", [False, True])
def test_the_replicas_agree_and_each_item_is_published_by_its_owner_only(concurrent: bool) -> None:
    stages, published = run_pair(concurrent=concurrent)
    a, b = (s.model for s in stages)
    assert set(a.items.ids(np.arange(1, len(a.items) + 1))) == set(b.items.ids(np.arange(1, len(b.items) + 1)))
    ids = [i for i in a.items.ids(np.arange(1, len(a.items) + 1)) if i]
    va = a.vectors("item", a.items.lookup(ids))
    vb = b.vectors("item", b.items.lookup(ids))
    assert np.allclose(va[0], vb[0], atol=1e-5) and np.allclose(va[1], vb[1], atol=1e-5)
    assert a.global_mean == pytest.approx(b.global_mean)
    for i in range(2):
        assert published[i] and all(Trainer(i, 2).owns_items(sorted(published[i])))
    # Every item trained on is published, by one trainer, also those only the other trainer's users rated.
    assert published[0] | published[1] == set(ids) and not published[0] & published[1]
    # The users are split: each trainer holds only its own.
    for i, stage in enumerate(stages):
        users = [u for u in stage.model.users.ids(np.arange(1, len(stage.model.users) + 1)) if u]
        assert users and all(zlib.crc32(u.encode()) % 2 == i for u in users)


def test_rows_held_back_under_the_tolerance_go_out_when_a_batch_closes_short() -> None:
    """Full batches hold back rows moved only a little as negatives; the partial batch closed by max_wait (low
    traffic) sends them, and the replicas then agree exactly."""
    cfg = JobConfig.load(overrides=["batch.size=32", "publish.interval_ms=0", "publish.item_interval_ms=0",
                                    "publish.negative_tolerance=0", "kafka.item_delta_tolerance=0.5"])
    held: list[int] = []
    stages, _ = run_pair(cfg=cfg, held=held)
    assert max(held) > 0
    assert all(s.exchange is not None and s.exchange.sync.used == 0 for s in stages)
    a, b = (s.model for s in stages)
    ids = [i for i in a.items.ids(np.arange(1, len(a.items) + 1)) if i]
    va, vb = a.vectors("item", a.items.lookup(ids)), b.vectors("item", b.items.lookup(ids))
    assert np.allclose(va[0], vb[0], atol=1e-5) and np.allclose(va[1], vb[1], atol=1e-5)


def test_own_and_repeated_deltas_are_skipped_and_a_bad_one_is_a_dead_letter() -> None:
    stages = [TrainStage(CFG, Trainer(i, 2)) for i in range(2)]
    out = stages[0].on_chunk([line(n) for n in range(64) if user_trainer(line(n)) == 0], NOW)
    assert out.batches and len(out.deltas) == 1
    key, payload = out.deltas[0]
    assert key == "0:0"
    before = stages[0].state_bytes()
    assert stages[0].on_delta(key, payload, NOW).dead_letters == []  # its own: nothing happens
    assert stages[1].on_delta(key, payload, NOW).dead_letters == []
    moved = stages[1].model.item_table.params.clone()
    stages[1].on_delta(key, payload, NOW)  # read twice: applied once
    assert bool((stages[1].model.item_table.params == moved).all())
    assert stages[1].exchange is not None and stages[1].exchange.applied == {0: 0}
    bad = stages[1].on_delta("0:1", b"not a delta", NOW)
    assert [(d.reason, d.stage) for d in bad.dead_letters] == [("bad_item_delta", "item_sync")]
    assert stages[1].exchange.applied == {0: 0}
    sender = TrainStage.from_bytes(CFG, before, Trainer(0, 2)).exchange
    assert sender is not None and counters(sender.state()) == {"sent": 1, "applied": {}, "applied_count": 0}
    assert len(sender.state()["journal"]["rows"]) == 0  # at tolerance 0 nothing is held back


def test_the_exchange_survives_a_snapshot_and_another_number_of_trainers_is_refused() -> None:
    stages, _ = run_pair(200)
    restored = TrainStage.from_bytes(CFG, stages[1].state_bytes(), Trainer(1, 2))
    assert restored.exchange is not None and stages[1].exchange is not None
    assert counters(restored.exchange.state()) == counters(stages[1].exchange.state()) and restored.exchange.applied
    for other in (Trainer(), Trainer(1, 4)):
        with pytest.raises(ValueError, match="2 user-sharded trainers"):
            TrainStage.from_bytes(CFG, stages[1].state_bytes(), other)
    with pytest.raises(ValueError, match="1 user-sharded trainers"):
        TrainStage.from_bytes(CFG, TrainStage(CFG).state_bytes(), Trainer(0, 2))


def test_a_replayed_call_log_rebuilds_the_replica() -> None:
    """A restore replays the logged calls, deltas among them, and rebuilds the same replica."""
    stages = [TrainStage(CFG, Trainer(i, 2)) for i in range(2)]
    calls = []
    for start in range(0, 200, 40):
        out = stages[0].call(("chunk", NOW + start, (0, [line(n) for n in range(start, start + 40)
                                                         if user_trainer(line(n)) == 0])))
        for key, payload in out.deltas:
            call = ("delta", NOW + start, (key, payload))
            calls.append(call)
            stages[1].call(call)
    replayed = TrainStage.restore(CFG, None, calls, Trainer(1, 2))
    assert bool((replayed.model.item_table.params == stages[1].model.item_table.params).all())


def test_stats_records_of_several_trainers_combine() -> None:
    stages, _ = run_pair()
    records = []
    for stage in stages:
        out = stage.on_chunk([], NOW + 10**9 + 1)
        records += [orjson.loads(s) for s in out.stats] or [orjson.loads(stage._stats("probe"))]
    assert {r["trainer"] for r in records} == {0, 1}
    whole = combine_latest(records)
    assert whole["received"] == 400 == sum(s.counters.received for s in stages)
    assert whole["trained"] == sum(s.counters.trained for s in stages)
    q = [s.quality.summary() for s in stages if s.quality]
    rated = sum(x["rated"] for x in q)
    assert whole["prequential"]["rated"] == rated
    assert whole["prequential"]["rmse"] == pytest.approx(np.sqrt(sum(x["rmse"] ** 2 * x["rated"] for x in q) / rated))



def test_a_large_delta_goes_out_as_several_records_each_applied_once() -> None:
    """More item rows than one record may hold (kafka.item_delta_record_bytes): several records, each its own
    sequence, each under the bound; the other trainer applies them all, and a repeat of any is skipped."""
    cfg = JobConfig.load(overrides=["batch.size=32", "publish.interval_ms=0", "publish.item_interval_ms=0",
                                    "kafka.item_delta_record_bytes=2048"])
    stages = [TrainStage(cfg, Trainer(i, 2)) for i in range(2)]
    out = stages[0].on_chunk([line(n) for n in range(400) if user_trainer(line(n)) == 0], NOW)
    assert len(out.deltas) > 1 and all(len(v) <= 2048 for _, v in out.deltas)
    assert [k for k, _ in out.deltas] == [f"0:{s}" for s in range(len(out.deltas))]
    for key, payload in out.deltas:
        stages[1].on_delta(key, payload, NOW)
    assert stages[1].exchange is not None and stages[1].exchange.applied_count == len(out.deltas)
    key, payload = out.deltas[0]
    assert not stages[1].on_delta(key, payload, NOW).dead_letters and stages[1].exchange.applied_count == len(out.deltas)
    a, b = (s.model for s in stages)
    ids = [i for i in a.items.ids(np.arange(1, len(a.items) + 1)) if i]
    assert np.allclose(a.vectors("item", a.items.lookup(ids))[0], b.vectors("item", b.items.lookup(ids))[0], atol=1e-6)
    with pytest.raises(ValueError, match="item_delta_record_bytes"):
        JobConfig.load(overrides=["kafka.item_delta_record_bytes=10"])


def test_a_trainer_of_four_learns_its_quarter_of_a_batch_in_as_many_sub_steps_as_one_trainer_learns_it() -> None:
    """Each of P trainers gets 1/P of the stream's events per batch; with the whole sub-step budget each, P
    trainers made P^2 times one trainer's sub-steps, and at P = 4 cost 6x one trainer's CPU at 2,000 events/s."""
    from model.sequential import split, step_size

    cfg = JobConfig()
    one, four = Trainer().model_config(cfg.model).optimizer, Trainer(2, 4).model_config(cfg.model).optimizer
    assert four.sub_step_budget * 4 == one.sub_step_budget == cfg.model.optimizer.sub_step_budget
    for n in (64, 256, 1024):  # (below ~45 events a sub-step is one event, whatever the budget)
        steps_one = len(split(np.arange(4 * n), step_size(4 * n, one.sub_batch, one.sub_step_budget))) - 1
        steps_four = len(split(np.arange(n), step_size(n, four.sub_batch, four.sub_step_budget))) - 1
        assert steps_four == steps_one > 1, n
    # The stage's model has its trainer's share, also once restored from its bytes; the recorded settings do not.
    stage = TrainStage(cfg, Trainer(1, 4))
    assert stage.model.config.optimizer.sub_step_budget == four.sub_step_budget
    restored = TrainStage.from_bytes(cfg, stage.state_bytes(), Trainer(1, 4))
    assert restored.model.config.optimizer.sub_step_budget == four.sub_step_budget
    assert stage.settings == cfg.stage_settings()
    # A budget of 0 (one sub-step a batch) stays 0, and a small one does not round down to it.
    none = JobConfig.load(overrides=["model.optimizer.sub_step_budget=0", "model.stability.replay_budget=3"])
    assert Trainer(0, 4).model_config(none.model).optimizer.sub_step_budget == 0
    assert Trainer(0, 4).model_config(none.model).stability.replay_budget == 1
