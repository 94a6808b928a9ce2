"""The training stage (flink_job.stages.train): batching by size and time, action weights, lateness and
near-duplicates in the chain, and exact restores from a snapshot and from replayed calls."""
from __future__ import annotations

import pickle

import orjson
import pytest
import torch

from tests.helpers import same_state
from flink_job.config import JobConfig
from flink_job.tools.generate import SyntheticConfig, generate
from flink_job.stages.train import TrainStage








def _lines(n: int, prefix: str = "e") -> list[str]:
    return [
        f'0,{k},{{"event_id":"{prefix}{k}","user_id":"u{k % 5}","item_id":"i{k % 7}","action":"view","ts":{k}}}'
        for k in range(n)
    ]


def test_train_stage_batches_by_size_flushes_by_time_and_coalesces_publishes() -> None:
    cfg = JobConfig.load(overrides=["batch.size=10", "batch.max_wait_ms=200", "publish.interval_ms=1000"])
    stage = TrainStage(cfg)
    out = stage.on_chunk(_lines(25) + ["0,99,{broken"], now_ms=10_000)
    assert out.trained == 20 and [d.reason for d in out.dead_letters] == ["invalid_json"]
    assert len(out.embeddings) == 5 + 7  # the first publish is due at once
    assert stage.next_deadline_ms() == 10_200  # the 5 pending events wait at most max_wait_ms
    assert stage.on_time(now_ms=10_100).trained == 0
    late = stage.on_time(now_ms=10_200)
    # A batch closed short of batch.size: traffic is low, so its users are published at once; items keep their
    # own interval (publish.item_interval_ms, one second after the first publish).
    assert late.trained == 5 and sorted(k for k, _ in late.embeddings) == [f"user:u{u}" for u in range(5)]
    assert stage.next_deadline_ms() == 11_000  # the touched items, one item interval after the last publish
    more = stage.on_chunk(_lines(10, prefix="f"), now_ms=10_500)
    assert more.trained == 10 and more.embeddings == []  # a full batch: trained, not yet published
    due = stage.on_time(now_ms=11_200)  # one user interval after 10,200
    keys = [k for k, _ in due.embeddings]
    assert len(keys) == len(set(keys)) == 5 + 7  # every id touched since the last publish, once
    assert stage.next_deadline_ms() is None
    stats = [orjson.loads(s) for s in out.stats + late.stats + more.stats + due.stats]
    assert [s["kind"] for s in stats] == ["batch", "batch", "publish", "batch", "publish", "batch", "publish"]
    assert [s["trained"] for s in stats] == [10, 20, 20, 25, 25, 35, 35]
    assert stats[-1]["received"] == 36 and stats[-1]["dead_lettered"] == 1 and stats[-1]["published"] == 29


def test_published_user_records_carry_the_newest_input_position() -> None:
    stage = TrainStage(JobConfig.load(overrides=["batch.size=25", "publish.interval_ms=0"]))
    out = stage.on_chunk(_lines(25), now_ms=1)
    users = {orjson.loads(v)["id"]: orjson.loads(v) for k, v in out.embeddings if k.startswith("user:")}
    assert users["u0"]["offset"] == 20 and users["u4"]["offset"] == 24
    assert users["u0"]["event_ts"] == 20 and users["u0"]["version"] > 0


def test_implicit_actions_train_with_their_configured_weights() -> None:
    """A purchase moves the item's score further than a view; a zero weight does not move it at all."""
    def score_gain(action: str, weights: str) -> float:
        cfg = JobConfig.load(overrides=["batch.size=1", f"clean.action_weights={weights}", "model.seed=3"])
        stage = TrainStage(cfg)
        stage.on_chunk(['0,0,{"event_id":"w0","user_id":"u","item_id":"other","action":"view","ts":1}'], now_ms=2)
        m = stage.model
        before = float(m.item_table.bias[m.items.rows(["i"])[0]]) if "i" in m.items else 0.0
        stage.on_chunk([f'0,1,{{"event_id":"w1","user_id":"u","item_id":"i","action":"{action}","ts":1}}'], now_ms=3)
        return float(m.item_table.bias[m.items.rows(["i"])[0]]) - before

    weights = "{view: 0.1, click: 0.5, cart: 0.75, purchase: 1.0}"
    assert score_gain("purchase", weights) > score_gain("view", weights) > 0
    assert score_gain("view", "{view: 0.0}") == 0
    with pytest.raises(ValueError, match="action_weights"):
        JobConfig.load(overrides=["clean.action_weights={teleport: 1.0}"])


def test_late_events_are_dead_lettered_and_not_trained() -> None:
    cfg = JobConfig.load(overrides=["batch.size=100", "clean.out_of_orderness_ms=1000",
                                    "clean.allowed_lateness_ms=500"])
    stage = TrainStage(cfg)

    def line(offset: int, ts: int, partition: int = 0) -> str:
        return (f'{partition},{offset},{{"event_id":"e{partition}-{offset}","user_id":"u","item_id":"i",'
                f'"action":"view","ts":{ts}}}')

    stage.on_chunk([line(0, 10_000), line(0, 10_000, partition=1)], now_ms=20_000)
    # Watermark 9,000: 8,600 is within the allowed lateness, 8,400 is late; partition 1 is judged alike.
    out = stage.on_chunk([line(1, 8_600), line(2, 8_400), line(1, 7_000, partition=1)], now_ms=20_001)
    assert [(d.reason, d.stage, d.partition, d.offset) for d in out.dead_letters] == [
        ("late", "lateness", 0, 2), ("late", "lateness", 1, 1)]
    assert '"ts":8400' in out.dead_letters[0].payload
    flushed = stage.on_time(now_ms=30_000)
    assert flushed.trained == 3 and stage.counters.dead_lettered == 2 and stage.counters.received == 5


def test_near_duplicates_count_once_and_every_event_is_accounted_for() -> None:
    cfg = JobConfig.load(overrides=["batch.size=100", "clean.near_duplicate_window_ms=1000"])
    stage = TrainStage(cfg)
    lines = [
        f'0,{n},{{"event_id":"e{n}","user_id":"u","item_id":"{item}","action":"{action}","ts":{ts}}}'
        for n, (item, action, ts) in enumerate(
            [("i", "click", 0), ("i", "click", 400), ("i", "view", 500), ("j", "click", 600), ("i", "click", 1200)]
        )
    ]
    stage.on_chunk(lines + ["0,99,[]"], now_ms=10**6)
    stage.on_time(now_ms=10**7)
    c = stage.counters
    assert (c.trained, c.near_duplicates, c.dead_lettered) == (4, 1, 1)
    assert c.trained + c.near_duplicates + c.dead_lettered == c.received == 6


NOW = 1_800_000_000_000  # processing time after the synthetic streams' event times


def _synthetic_lines(n: int, seed: int = 3, **rates: float) -> list[str]:
    syn = SyntheticConfig(n_users=40, n_items=30, n_events=n, seed=seed, **rates)
    return [f"{i % 2},{i},{r.payload.decode(errors='replace')}" for i, r in enumerate(generate(syn))]


def test_stage_state_restores_exactly_and_continues_identically() -> None:
    """A stage restored from ``state_bytes`` mid-stream, pending batch included, produces what the original does."""
    cfg = JobConfig.load(overrides=["batch.size=300", "publish.interval_ms=500", "clean.near_duplicate_window_ms=50"])
    lines = _synthetic_lines(3_000, malformed_rate=0.05, late_rate=0.05)
    original = TrainStage(cfg)
    for n, start in enumerate(range(0, 1_500, 250)):
        original.on_chunk(lines[start:start + 250], now_ms=NOW + 100 * n)
    assert original.batcher.pending > 0 and original.unpublished  # there is in-flight state to lose
    restored = TrainStage.from_bytes(cfg, original.state_bytes())
    assert restored.counters == original.counters
    outputs = []
    for stage in (original, restored):
        outs = [stage.on_chunk(lines[s:s + 250], now_ms=NOW + 100 * n) for n, s in enumerate(range(1_500, 3_000, 250))]
        outs.append(stage.on_time(now_ms=NOW + 10**6))
        outputs.append(([e for o in outs for e in o.embeddings], [d.offset for o in outs for d in o.dead_letters]))
    (emb_a, dead_a), (emb_b, dead_b) = outputs
    strip = [(k, {f: v for f, v in orjson.loads(j).items() if f != "produced_ms"}) for k, j in emb_a]
    assert strip == [(k, {f: v for f, v in orjson.loads(j).items() if f != "produced_ms"}) for k, j in emb_b]
    assert dead_a == dead_b and restored.counters == original.counters
    assert restored.model.step == original.model.step


def test_a_snapshot_and_the_replayed_calls_since_rebuild_the_stage_exactly() -> None:
    """``TrainStage.restore``: an early snapshot plus the calls logged after it (chunks and timer calls, a batch
    trained and a publish among them) give the stage, byte for byte, that made those calls, and it goes on alike."""
    cfg = JobConfig.load(overrides=["batch.size=300", "publish.interval_ms=500", "clean.near_duplicate_window_ms=50"])
    lines = _synthetic_lines(3_000, malformed_rate=0.05, late_rate=0.05)
    calls: list = [("chunk", NOW + 100 * n, lines[s:s + 250]) for n, s in enumerate(range(0, 1_500, 250))]
    calls.insert(3, ("timer", NOW + 260, None))
    calls.append(("timer", NOW + 10**5, None))  # trains the partial batch and publishes
    original = TrainStage(cfg)
    outputs = [original.call(c) for c in calls]
    snapshot_after = 2
    replayed_outputs = sum(o.batches for o in outputs[snapshot_after:]) + sum(len(o.embeddings) for o in outputs[snapshot_after:])
    assert replayed_outputs > 0  # the replayed calls trained and published, so their outputs were dropped
    early = TrainStage(cfg)
    for c in calls[:snapshot_after]:
        early.call(c)
    rebuilt = TrainStage.restore(cfg, early.state_bytes(), calls[snapshot_after:])
    assert same_state(rebuilt.state_bytes(), original.state_bytes())
    assert same_state(TrainStage.restore(cfg, None, calls).state_bytes(), original.state_bytes())  # no snapshot yet
    assert not same_state(early.state_bytes(), original.state_bytes())
    more = [("chunk", NOW + 10**5 + 100 * n, lines[s:s + 250]) for n, s in enumerate(range(1_500, 3_000, 250))]
    for c in more:
        a, b = original.call(c), rebuilt.call(c)
        assert [k for k, _ in a.embeddings] == [k for k, _ in b.embeddings] and a.trained == b.trained
    assert same_state(rebuilt.state_bytes(), original.state_bytes())
    with pytest.raises(ValueError, match="unknown call"):
        rebuilt.call(("nap", NOW, None))


def test_an_upgrade_replays_the_logged_calls_under_the_settings_they_ran_with() -> None:
    """A restore with changed model settings (tests/test_upgrade.py's upgrade) rebuilds the stage that made the
    published outputs, then takes the new settings: what a snapshot taken after the last call would have given."""
    old = JobConfig.load(overrides=["batch.size=200", "model.optimizer.lr=0.05"])
    new = JobConfig.load(overrides=["batch.size=200", "model.optimizer.lr=0.02", "model.stability.proximal=0.1"])
    lines = _synthetic_lines(2_000)
    calls: list = [("chunk", NOW + 100 * n, lines[s:s + 250]) for n, s in enumerate(range(0, 2_000, 250))]
    early = TrainStage(old)
    early.call(calls[0])
    original = TrainStage.from_bytes(old, early.state_bytes())
    for c in calls[1:]:
        original.call(c)
    expected = TrainStage.from_bytes(new, original.state_bytes())

    rebuilt = TrainStage.restore(new, early.state_bytes(), calls[1:])
    ran = rebuilt.model.config
    assert ran.optimizer.lr == 0.02 and ran.stability.proximal == 0.1 and rebuilt.replayed_calls == 7
    assert same_state(rebuilt.state_bytes(), expected.state_bytes())
    # Replayed under the new settings, the calls would train other rows than the ones published.
    naive = TrainStage.from_bytes(new, early.state_bytes())
    for c in calls[1:]:
        naive.call(c)
    assert not torch.allclose(naive.model.user_table.weight, original.model.user_table.weight)


def test_restored_stage_takes_the_new_configuration() -> None:
    old = TrainStage(JobConfig.load(overrides=["batch.size=100"]))
    old.on_chunk(_synthetic_lines(250), now_ms=NOW)
    new_cfg = JobConfig.load(overrides=["batch.size=1000", "model.optimizer.lr=0.01"])
    new = TrainStage.from_bytes(new_cfg, old.state_bytes())
    assert new.batcher.size == 1000 and new.model.config.optimizer.lr == 0.01
    assert new.batcher.pending == old.batcher.pending == 50 and new.counters == old.counters
    with pytest.raises(ValueError, match="state version"):
        TrainStage.from_bytes(JobConfig(), pickle.dumps({"version": -1}))


def test_late_events_do_not_depend_on_how_the_input_is_chunked() -> None:
    from flink_job.stages.lateness import Watermarks
    from flink_job.stages.parse import parse_lines

    lines = _synthetic_lines(3_000, late_rate=0.1)
    verdicts = []
    for chunk in (1, 7, 500, 3_000):
        w = Watermarks(out_of_orderness_ms=5 * 60_000, allowed_lateness_ms=3_600_000, max_ahead_ms=5 * 60_000)
        late = [d.offset for s in range(0, len(lines), chunk)
                for d in w.split(parse_lines(lines[s:s + chunk], now_ms=2 * 10**12)[0], now_ms=2 * 10**12)[1]]
        verdicts.append(late)
    expected = [i for i, line in enumerate(lines) if f'"ts":{1_700_000_000_000 + i - 3 * 3600 * 1000},' in line]
    assert len(expected) > 150
    assert all(v == expected for v in verdicts)


def test_a_state_saved_before_the_stages_moved_restores(monkeypatch) -> None:
    """Checkpoints and savepoints taken before the stages moved into flink_job.stages name the pending batch's class
    flink_job.parse.EventBatch; the stage restores them all the same."""
    import sys

    from flink_job.stages import parse

    stage = TrainStage(JobConfig.load(overrides=["batch.size=1000"]))
    stage.on_chunk(_lines(10), NOW)
    assert stage.batcher.pending  # a partial batch, so the state holds an EventBatch
    monkeypatch.setitem(sys.modules, "flink_job.parse", parse)
    monkeypatch.setattr(parse.EventBatch, "__module__", "flink_job.parse")
    old = stage.state_bytes()
    monkeypatch.undo()
    assert b"flink_job.parse" in old and b"flink_job.stages.parse" not in old and "flink_job.parse" not in sys.modules
    restored = TrainStage.from_bytes(stage.cfg, old)
    assert same_state(restored.state_bytes(), stage.state_bytes())


def test_a_snapshot_with_the_flat_model_settings_of_older_versions_replays_under_them() -> None:
    """Snapshots written before the model sections recorded flat model keys (``{"lr": 0.05, "optimizer": ...}``);
    a restore must read them as the nested settings they became, or the replay would run under the new ones."""
    old = JobConfig.load(overrides=["batch.size=200", "model.optimizer.lr=0.05", "model.optimizer.name=sgd"])
    new = JobConfig.load(overrides=["batch.size=200", "model.optimizer.lr=0.02", "model.stability.proximal=0.1"])
    lines = _synthetic_lines(1_000)
    calls: list = [("chunk", NOW + 100 * n, lines[s:s + 250]) for n, s in enumerate(range(0, 1_000, 250))]
    early = TrainStage(old)
    early.call(calls[0])
    state = pickle.loads(early.state_bytes())
    state["settings"]["model"] = early.model.config.to_flat()  # as the previous version recorded it
    assert state["settings"]["model"]["lr"] == 0.05 and state["settings"]["model"]["optimizer"] == "sgd"
    flat_snapshot = pickle.dumps(state)
    assert new.with_stage_settings(state["settings"]).model == old.model

    rebuilt = TrainStage.restore(new, flat_snapshot, calls[1:])
    expected = TrainStage.restore(new, early.state_bytes(), calls[1:])  # the nested record of this version
    assert rebuilt.model.config == new.model and same_state(rebuilt.state_bytes(), expected.state_bytes())
