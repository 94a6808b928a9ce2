"""The online biased MF: learns a planted structure, touches only the rows it trains, round-trips its state."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import orjson
import pytest
import torch

from flink_job.config import JobConfig
from flink_job.tools.generate import SyntheticConfig, generate
from flink_job.stages.parse import parse_lines
from model.config import ModelConfig, ObjectiveConfig, OptimizerConfig, subtask_device
from model.mf import OnlineBiasedMF, gpu_count, pick_device


def _stream(n: int, seed: int = 5):
    syn = SyntheticConfig(n_users=200, n_items=100, n_events=n, seed=seed)
    batch, _ = parse_lines(f"0,{k},{r.payload.decode()}" for k, r in enumerate(generate(syn)))
    return batch


def test_rating_error_falls_while_learning_a_planted_structure() -> None:
    batch = _stream(40_000)
    m = OnlineBiasedMF(ModelConfig(dim=16, seed=1))
    losses = []
    for start in range(0, len(batch), 1024):
        b = batch.slice(start, start + 1024)
        losses.append(m.learn_many(b.users, b.items, b.actions, b.values).rating_loss)
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:3])


def test_implicit_ranking_beats_popularity_on_planted_preferences() -> None:
    batch = _stream(60_000)
    train, test = batch.slice(0, 50_000), batch.slice(50_000, len(batch))
    m = OnlineBiasedMF(ModelConfig(dim=16, seed=2))
    for start in range(0, len(train), 1024):
        b = train.slice(start, start + 1024)
        m.learn_many(b.users, b.items, b.actions, b.values)
    popularity: dict[str, int] = {}
    for i in train.items:
        popularity[i] = popularity.get(i, 0) + 1
    items = sorted(popularity)
    pop_top = set(sorted(items, key=lambda i: -popularity[i])[:10])
    rows = m.items.rows(items)
    q, b_i, _ = m.vectors("item", rows)
    hits_model = hits_pop = 0
    for u, i in zip(test.users, test.items):
        p, _, _ = m.vectors("user", m.users.rows([u]))
        top = {items[k] for k in np.argsort(-(b_i + q @ p[0]))[:10]}
        hits_model += i in top
        hits_pop += i in pop_top
    assert hits_model > 1.5 * hits_pop


@pytest.mark.parametrize("optimizer", ["adagrad", "adam", "sgd"])
def test_only_touched_rows_change(optimizer: str) -> None:
    m = OnlineBiasedMF(ModelConfig(dim=4, seed=3, objective=ObjectiveConfig(rating_implicit_weight=0),
                                   optimizer=OptimizerConfig(name=optimizer, clip_norm=1.0)))
    m.learn_many(["a", "b", "c"], ["x", "y", "z"], np.array([4, 4, 4]), np.array([3.0, 4.0, 5.0]))
    before = {k: getattr(t, k)[:4].clone() for t in (m.user_table, m.item_table) for k in ("params", "acc", "moment")}
    before_u, before_i = m.user_table.params[:4].clone(), m.item_table.params[:4].clone()
    before_acc = m.user_table.acc[:4].clone()
    stats = m.learn_many(["b"], ["z"], np.array([4]), np.array([1.0]))
    assert m.users.ids(stats.user_rows) == ["b"] and m.items.ids(stats.item_rows) == ["z"]
    changed_u = (m.user_table.params[:4] != before_u).any(dim=1).tolist()
    changed_i = (m.item_table.params[:4] != before_i).any(dim=1).tolist()
    assert changed_u == [False, False, True, False] and changed_i == [False, False, False, True]  # row 0: fallback
    untouched = [0, 1, 3]
    assert torch.equal(m.user_table.acc[untouched], before_acc[untouched])  # bit-identical, optimiser state too
    assert before  # (gathered for the assertion above)
    assert m.user_table.updates[1:4].tolist() == [1, 2, 1]


def test_state_round_trip_is_exact_and_training_continues_identically() -> None:
    batch = _stream(6_000)
    a = OnlineBiasedMF(ModelConfig(dim=8, seed=4))
    first, second = batch.slice(0, 3_000), batch.slice(3_000, len(batch))
    a.learn_many(first.users, first.items, first.actions, first.values)
    b = OnlineBiasedMF.from_bytes(a.state_bytes())
    for m in (a, b):
        m.learn_many(second.users, second.items, second.actions, second.values)
    assert a.users.state() == b.users.state() and a.items.state() == b.items.state()
    for name in ("params", "acc", "updates", "events"):
        assert torch.equal(getattr(a.user_table, name)[: a.user_table.rows], getattr(b.user_table, name)[: b.user_table.rows])
        assert torch.equal(getattr(a.item_table, name)[: a.item_table.rows], getattr(b.item_table, name)[: b.item_table.rows])


def test_cpu_fallback_and_clear_error_for_missing_gpu() -> None:
    assert pick_device("cpu").type == "cpu"
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        for setting in ("cuda", "cuda:0"):
            with pytest.raises(ValueError, match="no CUDA device"):
                pick_device(setting)
    with pytest.raises(ValueError, match="'cuda:64' requested"):  # no machine here has 65 GPUs
        pick_device("cuda:64")


def test_parallel_trainers_spread_over_the_gpus_and_keep_a_cpu_fallback() -> None:
    assert [subtask_device("auto", i, 2) for i in range(4)] == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]
    assert subtask_device("cuda", 7, 4) == "cuda:3"
    assert [subtask_device(s, 3, 0) for s in ("auto", "cpu")] == ["auto", "cpu"]  # no GPU: the setting as it is
    assert subtask_device("cpu", 1, 8) == "cpu" and subtask_device("cuda:2", 0, 8) == "cuda:2"  # chosen by the user
    # The model takes the subtask's setting: on this machine's GPUs, or on the CPU where it has none.
    placed = JobConfig().on_subtask(5, gpu_count()).model
    assert OnlineBiasedMF(replace(placed, dim=4)).device == pick_device(placed.device)
    assert ModelConfig(device="cuda:3").device == "cuda:3"
    with pytest.raises(ValueError, match="model.device must be one of auto, cpu, cuda or cuda:N, got 'gpu'"):
        ModelConfig(device="gpu")


def test_predictions_are_clipped_to_the_rating_range_and_unknown_ids_get_the_mean() -> None:
    m = OnlineBiasedMF(ModelConfig(dim=4, seed=5))
    m.learn_many(["a"], ["x"], np.array([4]), np.array([5.0]))
    pred = m.predict_ratings(["a", "nobody"], ["x", "nothing"])
    assert 1.0 <= pred[0] <= 5.0
    assert pred[1] == pytest.approx(m.global_mean)


def test_state_bytes_are_plain_bytes() -> None:
    m = OnlineBiasedMF(ModelConfig(dim=4))
    data = m.state_bytes()
    assert isinstance(data, bytes) and len(data) > 0
    with pytest.raises(Exception):
        orjson.loads(data)


def test_event_counters_count_each_trained_event_once_and_not_negatives() -> None:
    batch = _stream(3_000)
    m = OnlineBiasedMF(ModelConfig(dim=8, seed=3, objective=ObjectiveConfig(implicit_negatives=4)))
    for start in range(0, len(batch), 500):
        b = batch.slice(start, start + 500)
        m.learn_many(b.users, b.items, b.actions, b.values)
    users, counts = np.unique(np.array(batch.users), return_counts=True)
    assert m.event_counts("user", m.users.rows(list(users))).tolist() == counts.tolist()
    items, item_counts = np.unique(np.array(batch.items), return_counts=True)
    assert m.event_counts("item", m.items.rows(list(items))).tolist() == item_counts.tolist()
    # Versions count row moves: implicit events move a user's row once per sampled negative, so they run ahead.
    _, _, versions = m.vectors("user", m.users.rows(list(users)))
    assert (versions >= counts).all() and (versions > counts).any()
    restored = OnlineBiasedMF.from_bytes(m.state_bytes())
    assert restored.event_counts("user", m.users.rows(list(users))).tolist() == counts.tolist()
