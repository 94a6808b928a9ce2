"""The model's admission, expiry, eviction, optimisers, proximal penalty, NaN guard and published rows: small
tensors, exact checks."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from flink_job.tools.generate import SyntheticConfig, generate
from flink_job.stages.parse import parse_lines
from model.config import (ExtrasConfig, IdsConfig, ModelConfig, ObjectiveConfig, OptimizerConfig,
                          StabilityConfig)
from model.idmap import FALLBACK_ROW
from model.memory import memory_report
from model.mf import OnlineBiasedMF
from model.serialise import load_pickle
from tests.helpers import PROJECT
from tests.model_seams import poison_every, poison_next_batch

R = 4  # rating action code
V = 0  # view


def _stream(n: int, seed: int = 5, users: int = 200, items: int = 100):
    syn = SyntheticConfig(n_users=users, n_items=items, n_events=n, seed=seed)
    batch, _ = parse_lines(f"0,{k},{r.payload.decode()}" for k, r in enumerate(generate(syn)))
    return batch


def _learn(m: OnlineBiasedMF, users: list[str], items: list[str], action: int = R, value: float = 4.0,
           ts: list[int] | None = None):
    n = len(users)
    return m.learn_many(users, items, np.full(n, action), np.full(n, value), None,
                        None if ts is None else np.array(ts))


# ------------------------------------------------------------------------------------------------ 1. admission

def test_ids_share_the_fallback_row_until_their_admit_after_th_sighting() -> None:
    m = OnlineBiasedMF(ModelConfig(dim=4, seed=1, ids=IdsConfig(admit_after=3)))
    fallback_before = m.user_table.params[FALLBACK_ROW].clone()
    s1 = _learn(m, ["a", "b"], ["x", "x"])
    assert s1.event_user_rows.tolist() == [FALLBACK_ROW, FALLBACK_ROW] and "a" not in m.users
    assert not torch.equal(m.user_table.params[FALLBACK_ROW], fallback_before)  # the unknown user is trained
    s2 = _learn(m, ["a", "a"], ["y", "x"])  # second and third sighting of a: its own row from the third
    assert s2.event_user_rows[0] == FALLBACK_ROW and s2.event_user_rows[1] != FALLBACK_ROW
    assert "a" in m.users and "b" not in m.users and len(m.users) == 1
    assert "x" in m.items and "y" not in m.items
    # The fallback row counts the events of ids not admitted; an admitted id counts only its own.
    assert m.event_counts("user", np.array([FALLBACK_ROW, m.users.get("a")])).tolist() == [3, 1]


def test_sightings_are_bounded_and_forget_the_least_recently_seen() -> None:
    m = OnlineBiasedMF(ModelConfig(dim=4, ids=IdsConfig(admit_after=2, admit_capacity=2)))
    _learn(m, ["a"], ["x"])
    _learn(m, ["b"], ["x"])
    _learn(m, ["c"], ["x"])  # a is forgotten: capacity 2
    assert len(m.lifecycle.user_sightings) == 2
    _learn(m, ["a", "c"], ["x", "x"])
    assert "a" not in m.users and "c" in m.users


def test_memory_report_counts_bytes_per_admitted_id() -> None:
    m = OnlineBiasedMF(ModelConfig(dim=8, optimizer=OptimizerConfig(name="adam")))
    _learn(m, [f"u{k}" for k in range(100)], [f"i{k % 10}" for k in range(100)])
    rep = memory_report(m)
    assert rep["user"]["ids"] == 100 and rep["item"]["ids"] == 10
    # Adam: params (D + 2) + first moment (D + 2) floats, 3 second moments, 3 int64 counters, bookkeeping.
    assert rep["user"]["row_bytes"] == 4 * (10 + 10 + 3) + 8 * 3 + 1 + 24
    assert rep["user"]["bytes_per_id"] > rep["user"]["row_bytes"]  # plus the id map and spare capacity


# -------------------------------------------------------------------------------------------------- 2. expiry

def test_idle_ids_expire_and_their_rows_are_recycled_without_collisions() -> None:
    m = OnlineBiasedMF(ModelConfig(dim=4, ids=IdsConfig(ttl_ms=1000, sweep_rows=64)))
    _learn(m, ["a", "b", "c"], ["x", "y", "z"], ts=[0, 0, 0])
    row_a = m.users.get("a")
    _learn(m, ["b"], ["y"], ts=[1500])  # a and c idle for 1500 ms > ttl
    assert "a" not in m.users and "c" not in m.users and "b" in m.users
    users, items = m.drain_expired()
    assert sorted(users) == ["a", "c"] and sorted(items) == ["x", "z"]
    assert m.drain_expired() == ([], [])
    size = m.users.size
    _learn(m, ["d", "e"], ["y", "y"], ts=[1600, 1600])
    assert m.users.size == size  # recycled rows, no growth
    assert row_a in {m.users.get("d"), m.users.get("e")}
    rows = [m.users.get(k) for k in ("b", "d", "e")]
    assert len(set(rows)) == 3 and m.users.ids(rows) == ["b", "d", "e"]
    r = m.users.get("d")
    assert m.event_counts("user", np.array([r])).tolist() == [1]  # the new holder starts from zero


def test_expiry_sweep_is_amortised() -> None:
    m = OnlineBiasedMF(ModelConfig(dim=4, ids=IdsConfig(ttl_ms=10, sweep_rows=2)))
    _learn(m, [f"u{k}" for k in range(6)], ["x"] * 6, ts=[0] * 6)
    _learn(m, ["u0"], ["x"], ts=[100])  # everyone but u0 is idle, but only 2 rows are checked per batch
    assert len(m.users) >= 6 - 2
    for _ in range(4):
        _learn(m, ["u0"], ["x"], ts=[100])
    assert list(m.users.ids([m.users.get("u0")])) == ["u0"] and len(m.users) == 1


def test_memory_stays_bounded_on_an_endless_stream_of_new_ids() -> None:
    m = OnlineBiasedMF(ModelConfig(dim=4, ids=IdsConfig(ttl_ms=50, sweep_rows=256)))
    for t in range(200):
        _learn(m, [f"u{t}-{k}" for k in range(10)], [f"i{t}-{k}" for k in range(10)], ts=[t * 10] * 10)
    assert m.users.size < 200 and m.items.size < 200  # 2,000 ids went through each table


def test_at_the_row_cap_the_least_recently_used_id_is_evicted() -> None:
    m = OnlineBiasedMF(ModelConfig(dim=4, ids=IdsConfig(max_rows=4, ttl_ms=0)))
    for user in ("a", "b", "c", "d"):
        _learn(m, [user], ["x"])
    _learn(m, ["a"], ["x"])  # a is used again: b is now the least recently used
    assert m.drain_evicted() == ([], [])
    stats = _learn(m, ["e"], ["x"])
    assert "b" not in m.users and all(u in m.users for u in "acde") and len(m.users) == 4
    assert m.drain_evicted() == (["b"], []) and m.lifecycle.evictions == [1, 0] and m.drain_evicted() == ([], [])
    assert m.users.size == 5 and stats.event_user_rows[0] != FALLBACK_ROW  # e took b's row: no growth
    assert m.event_counts("user", stats.event_user_rows).tolist() == [1]  # and starts from zero


def test_rows_and_allocation_stay_bounded_after_many_distinct_ids() -> None:
    cap = 64
    m = OnlineBiasedMF(ModelConfig(dim=4, ids=IdsConfig(max_rows=cap, ttl_ms=0)))
    for t in range(125):  # 2,000 distinct users and items, 16 per batch
        _learn(m, [f"u{t}-{k}" for k in range(16)], [f"i{t}-{k}" for k in range(16)])
    for idmap, table, kind in ((m.users, m.user_table, 0), (m.items, m.item_table, 1)):
        assert len(idmap) <= cap and idmap.size <= cap + 1 and table.params.shape[0] <= cap + 1
        assert len(idmap.state()["free"]) + len(idmap) + 1 == idmap.size
        assert m.lifecycle.evictions[kind] == 2_000 - len(idmap)
    users, items = m.drain_evicted()
    assert len(users) == m.lifecycle.evictions[0] and len(set(users)) == len(users)
    assert "u124-15" in m.users and "u0-0" not in m.users  # the newest stay, the oldest went


def test_a_batch_with_more_new_ids_than_the_cap_admits_only_up_to_it() -> None:
    m = OnlineBiasedMF(ModelConfig(dim=4, ids=IdsConfig(max_rows=4, ttl_ms=0)))
    stats = _learn(m, [f"u{k}" for k in range(10)], ["x"] * 10)
    assert len(m.users) == 4 and (stats.event_user_rows == FALLBACK_ROW).sum() == 6
    assert not stats.skipped


def test_eviction_restores_exactly_and_evicts_alike_after_a_restore() -> None:
    cfg = ModelConfig(dim=4, seed=3, ids=IdsConfig(max_rows=32, ttl_ms=0))
    m = OnlineBiasedMF(cfg)
    for t in range(10):
        _learn(m, [f"u{t}-{k % 12}" for k in range(24)], [f"i{k % 40}" for k in range(24)])
    assert m.lifecycle.evictions[0] > 0
    copy = OnlineBiasedMF.from_bytes(m.state_bytes())
    for model in (m, copy):
        for t in range(10, 20):
            _learn(model, [f"u{t}-{k % 12}" for k in range(24)], [f"i{k % 40}" for k in range(24)])
    assert m.drain_evicted() == copy.drain_evicted() and m.lifecycle.evictions == copy.lifecycle.evictions
    assert m.users.state() == copy.users.state()
    assert torch.equal(m.user_table.params, copy.user_table.params)
    assert np.array_equal(m.user_table.last_used, copy.user_table.last_used)


def test_the_defaults_bound_every_table() -> None:
    cfg = ModelConfig()
    assert cfg.ids.max_rows > 0 and cfg.ids.ttl_ms > 0 and cfg.ids.admit_capacity > 0
    with pytest.raises(ValueError, match="max_rows must be positive"):
        ModelConfig(ids=IdsConfig(max_rows=0))


# ---------------------------------------------------------------------------------------------- 3. objectives


@pytest.mark.parametrize("loss,negatives", [("bpr", "uniform"), ("bpr", "popularity"), ("bpr", "in_batch"),
                                            ("sampled_softmax", "in_batch"), ("sampled_softmax", "popularity"),
                                            ("sampled_softmax", "uniform")])
def test_every_objective_learns_a_planted_structure(loss: str, negatives: str) -> None:
    batch = _stream(30_000, seed=6)
    train, test = batch.slice(0, 25_000), batch.slice(25_000, len(batch))
    m = OnlineBiasedMF(ModelConfig(dim=16, seed=2, objective=ObjectiveConfig(implicit_loss=loss, negatives=negatives)))
    for s in range(0, len(train), 512):
        b = train.slice(s, s + 512)
        m.learn_many(b.users, b.items, b.actions, b.values)
    items = sorted(set(train.items))
    pop = {i: 0 for i in items}
    for i in train.items:
        pop[i] += 1
    top_pop = set(sorted(items, key=lambda i: -pop[i])[:10])
    scores = m.score_items(list(test.users), items)  # (T, I)
    top = np.argsort(-scores, 1)[:, :10]
    hr_model = np.mean([test.items[t] in {items[j] for j in top[t]} for t in range(len(test))])
    hr_pop = np.mean([i in top_pop for i in test.items])
    assert hr_model > 1.5 * hr_pop


# -------------------------------------------------------------------------------------------- 4. optimisers

def test_clip_norm_bounds_each_row_step() -> None:
    # One summed step for the 50 events (no sub-steps), the rating biases at the vectors' step.
    sgd = OptimizerConfig(name="sgd", lr=1.0, clip_norm=0.1, l2=0.0, rating_bias_lr=1.0, sub_step_budget=0,
                          rating_bias_prior=0)
    m = OnlineBiasedMF(ModelConfig(dim=4, optimizer=sgd,
                                   objective=ObjectiveConfig(rating_implicit_weight=0)))
    _learn(m, ["a"], ["x"], value=5.0)
    before = m.user_table.params[1].clone()
    _learn(m, ["a"] * 50, ["x"] * 50, value=1.0)  # a large summed gradient
    assert float((m.user_table.params[1] - before).norm()) == pytest.approx(0.1, rel=1e-4)


def test_lr_schedules() -> None:
    lrs = {}
    for schedule in ("constant", "warmup_constant", "warmup_rsqrt"):
        m = OnlineBiasedMF(ModelConfig(optimizer=OptimizerConfig(lr=1.0, lr_schedule=schedule, warmup_steps=4)))
        seq = []
        for _ in range(16):
            seq.append(m._lr())
            m.step += 1
        lrs[schedule] = seq
    assert lrs["constant"] == [1.0] * 16
    assert lrs["warmup_constant"][:5] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert lrs["warmup_rsqrt"][3] == 1.0 and lrs["warmup_rsqrt"][15] == pytest.approx(0.5)


# ---------------------------------------------------------------------------------------------- 5. stability

def test_replayed_events_train_but_are_not_counted() -> None:
    m = OnlineBiasedMF(ModelConfig(dim=4, seed=3, stability=StabilityConfig(replay_size=8, replay_ratio=2.0)))
    _learn(m, ["a", "b"], ["x", "y"])
    stats = _learn(m, ["c"], ["z"])
    assert stats.replayed == 2 and m.reservoir.seen == 3
    assert set(m.users.ids(stats.user_rows)) >= {"c"} and len(stats.user_rows) >= 2  # past users moved too
    rows = np.array([m.users.get(k) for k in ("a", "b", "c")])
    assert m.event_counts("user", rows).tolist() == [1, 1, 1]


def test_replay_budget_leaves_full_batches_alone_and_fills_small_ones() -> None:
    """A batch at the budget replays nothing (high traffic costs what it did without replay); a small one replays
    up to the ratio, and one in between fills the budget."""
    m = OnlineBiasedMF(ModelConfig(dim=4, seed=3, stability=StabilityConfig(replay_size=64, replay_ratio=2.0,
                                                                            replay_budget=6)))
    _learn(m, [f"u{k}" for k in range(8)], [f"i{k}" for k in range(8)])  # 8 >= budget: none replayed
    assert m.reservoir.seen == 8
    assert _learn(m, ["a"], ["x"]).replayed == 2  # 1 event: 2 x 1, within 6 - 1
    assert _learn(m, ["b", "c", "d"], ["x", "y", "z"]).replayed == 3  # 2 x 3 = 6 capped at 6 - 3
    assert _learn(m, [f"v{k}" for k in range(6)], [f"i{k}" for k in range(6)]).replayed == 0


def test_proximal_penalty_pulls_toward_the_published_rows() -> None:
    moved = {}
    for strength in (0.0, 50.0):
        m = OnlineBiasedMF(ModelConfig(dim=4, stability=StabilityConfig(proximal=strength),
                                       objective=ObjectiveConfig(rating_implicit_weight=0),
                                       optimizer=OptimizerConfig(name="sgd", lr=0.01, rating_bias_lr=1.0)))
        _learn(m, ["a"], ["x"], value=5.0)
        m.mark_published("user", np.array([m.users.get("a")]))
        anchor = m.user_table.params[1].clone()
        for _ in range(50):
            _learn(m, ["a"], ["x"], value=1.0)
        moved[strength] = float((m.user_table.params[1] - anchor).norm())
    assert moved[50.0] < 0.5 * moved[0.0]


def test_a_nan_batch_is_skipped_and_rolled_back() -> None:
    m = OnlineBiasedMF(ModelConfig(dim=4, seed=4, optimizer=OptimizerConfig(inner_steps=2)))
    _learn(m, ["a", "b"], ["x", "y"], action=V, value=1.0)
    before = {t: (getattr(m, t).params.clone(), getattr(m, t).acc.clone(), getattr(m, t).updates.clone())
              for t in ("user_table", "item_table")}
    events = m.event_counts("user", np.array([1, 2])).tolist()
    poison_next_batch(m)
    stats = _learn(m, ["a", "b"], ["y", "x"])
    assert stats.skipped and m.skipped_batches == 1 and m.step == 1
    for t, (params, acc, updates) in before.items():
        table = getattr(m, t)
        assert torch.equal(table.params[: len(params)], params) and torch.equal(table.acc[: len(acc)], acc)
        assert torch.equal(table.updates[: len(updates)], updates)
    assert m.event_counts("user", np.array([1, 2])).tolist() == events
    assert not _learn(m, ["a"], ["x"]).skipped


def test_poisoned_batches_and_overflow_never_reach_the_tables() -> None:
    m = OnlineBiasedMF(ModelConfig(dim=4, optimizer=OptimizerConfig(name="sgd", lr=1e30),
                                   objective=ObjectiveConfig(rating_implicit_weight=0)))
    poison_every(m, 3)
    for k in range(6):
        _learn(m, ["a"], ["x"], value=5.0)
    assert m.skipped_batches >= 2  # every third, plus any step that overflowed
    assert bool(torch.isfinite(m.user_table.params).all()) and bool(torch.isfinite(m.item_table.params).all())


# ---------------------------------------------------------------------------------------------- state, warm start

def test_round_trip_with_every_feature_on_continues_bit_identically() -> None:
    cfg = ModelConfig(dim=8, seed=4, ids=IdsConfig(admit_after=2, ttl_ms=20_000, sweep_rows=16),
                      stability=StabilityConfig(replay_size=500, replay_ratio=0.5, proximal=0.1),
                      optimizer=OptimizerConfig(name="adam", inner_steps=2, clip_norm=1.0, lr_schedule="warmup_rsqrt",
                                                warmup_steps=3),
                      objective=ObjectiveConfig(implicit_loss="sampled_softmax", negatives="popularity"))
    batch = _stream(6_000, users=300, items=150)
    a = OnlineBiasedMF(cfg)
    for s in range(0, 3_000, 500):
        b = batch.slice(s, s + 500)
        st = a.learn_many(b.users, b.items, b.actions, b.values, None, b.ts)
        a.mark_published("user", st.event_user_rows)
    restored = OnlineBiasedMF.from_bytes(a.state_bytes())
    for m in (a, restored):
        for s in range(3_000, 6_000, 500):
            b = batch.slice(s, s + 500)
            m.learn_many(b.users, b.items, b.actions, b.values, None, b.ts)
    assert a.state_bytes() == restored.state_bytes()


# ---------------------------------------------------------------------------------------------- ranking extras


def test_replay_weight_scales_the_replayed_events_only() -> None:
    moved = {}
    for weight in (1.0, 0.0):
        m = OnlineBiasedMF(ModelConfig(dim=4, seed=1, optimizer=OptimizerConfig(name="sgd", lr=0.1, l2=0.0),
                                       stability=StabilityConfig(replay_size=10, replay_ratio=1.0,
                                                                  replay_weight=weight),
                                       objective=ObjectiveConfig(rating_implicit_weight=0)))
        _learn(m, ["a"], ["x"], value=5.0)
        before = m.user_table.params[m.users.get("a")].clone()
        _learn(m, ["b"], ["y"], value=1.0)  # replays a's event
        moved[weight] = float((m.user_table.params[m.users.get("a")] - before).norm())
    assert moved[1.0] > 0 and moved[0.0] == 0.0
    with pytest.raises(ValueError, match="replay_weight"):
        ModelConfig(stability=StabilityConfig(replay_weight=-1.0))


def _server_scores(m: OnlineBiasedMF, users: list[str], items: list[str]) -> np.ndarray:
    """What flink_job.serving.index computes from the published rows: ``bias_i + u . q_i`` in float32 NumPy."""
    u_vec, _, _ = m.vectors("user", np.array([m.users.get(u) for u in users]))
    i_vec, i_bias, _ = m.vectors("item", np.array([m.items.get(i) for i in items]))
    return np.asarray(i_bias[None, :] + u_vec @ i_vec.T)


def test_published_rows_reproduce_score_items_with_history_and_popularity() -> None:
    cfg = ModelConfig(dim=8, seed=6,
                      extras=ExtrasConfig(history_size=5, history_weight=2.0, popularity_weight=0.5,
                                          popularity_halflife=500.0),
                      optimizer=OptimizerConfig(name="sgd", lr=0.1),
                      stability=StabilityConfig(replay_size=1000, replay_ratio=2.0, replay_weight=0.2))
    batch = _stream(4_000, users=60, items=40)
    m = OnlineBiasedMF(cfg)
    published_u: dict[str, np.ndarray] = {}
    published_i: dict[str, tuple[float, np.ndarray]] = {}
    for s in range(0, len(batch), 50):
        b = batch.slice(s, s + 50)
        st = m.learn_many(b.users, b.items, b.actions, b.values)
        # The job publishes the rows a batch moved; the server's copy of the others stays as it was.
        for row, vec in zip(st.user_rows, m.vectors("user", st.user_rows)[0], strict=True):
            published_u[m.users.ids([row])[0]] = vec
        vec_i, bias_i, _ = m.vectors("item", st.item_rows)
        for row, vec, bias in zip(st.item_rows, vec_i, bias_i, strict=True):
            published_i[m.items.ids([row])[0]] = (float(bias), vec)
    users, items = sorted(published_u), sorted(published_i)
    served = np.array([[published_i[i][0] + published_i[i][1] @ published_u[u] for i in items] for u in users])
    scored = m.score_items(users, items)
    np.testing.assert_allclose(scored, served, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(scored, _server_scores(m, users, items), rtol=1e-5, atol=1e-5)
    assert (np.argsort(-scored, 1)[:, :5] == np.argsort(-served, 1)[:, :5]).mean() > 0.99
    # The terms are on: the published user vector is not p_u alone and the item bias not c_i alone.
    rows = m.users.rows(users[:3])
    assert not np.allclose(m.vectors("user", rows)[0], m.user_table.weight[torch.from_numpy(rows)].numpy())
    irows = m.items.rows(items[:3])
    assert not np.allclose(m.vectors("item", irows)[1], m.item_table.bias[torch.from_numpy(irows)].numpy())


def test_rows_a_batch_does_not_move_keep_their_published_values() -> None:
    m = OnlineBiasedMF(ModelConfig(dim=4, seed=2, extras=ExtrasConfig(history_size=4, popularity_weight=1.0)))
    _learn(m, ["a", "a", "b"], ["x", "y", "z"])
    ua, bx = m.vectors("user", m.users.rows(["a"]))[0], m.vectors("item", m.items.rows(["x"]))
    st = _learn(m, ["b", "c"], ["y", "z"], action=R)  # moves y (a's history) but not a, and x only as a negative
    assert m.users.get("a") not in st.user_rows
    np.testing.assert_array_equal(m.vectors("user", m.users.rows(["a"]))[0], ua)  # the stored history term
    if m.items.get("x") not in st.item_rows:
        np.testing.assert_array_equal(m.vectors("item", m.items.rows(["x"]))[1], bx[1])  # fixed popularity frame


def test_round_trip_keeps_the_stored_history_term() -> None:
    cfg = ModelConfig(dim=4, seed=3, extras=ExtrasConfig(history_size=6, popularity_weight=0.5))
    batch = _stream(2_000, users=40, items=30)
    a = OnlineBiasedMF(cfg)
    for s in range(0, 1_000, 100):
        b = batch.slice(s, s + 100)
        a.learn_many(b.users, b.items, b.actions, b.values)
    restored = OnlineBiasedMF.from_bytes(a.state_bytes())
    rows = np.flatnonzero(a.users.live_mask())
    np.testing.assert_array_equal(restored.vectors("user", rows)[0], a.vectors("user", rows)[0])
    for m in (a, restored):
        for s in range(1_000, 2_000, 100):
            b = batch.slice(s, s + 100)
            m.learn_many(b.users, b.items, b.actions, b.values)
    for kind in ("user", "item"):  # (the pickled bytes may differ in their memo layout, not in content)
        rows = np.flatnonzero((a.users if kind == "user" else a.items).live_mask())
        for x, y in zip(a.vectors(kind, rows), restored.vectors(kind, rows), strict=True):
            np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(a.extras.user_context[: a.users.size].numpy(),
                                  restored.extras.user_context[: restored.users.size].numpy())


def _same(a: object, b: object) -> bool:
    """Deep equality of unpickled states (arrays by value, NaN equal to NaN)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return bool(np.array_equal(a, b, equal_nan=np.asarray(a).dtype.kind == "f"))
    return a == b


def test_a_state_written_before_the_model_was_split_restores_every_part() -> None:
    """tests/data/model_state_v4.pkl was written by the single-class model (commit 1ea0916) with every part on: row
    cap, admission, expiry, history, popularity, co-occurrence, replay, proximal anchors, popularity negatives and
    Adam. Loaded, it must write back the same content, key for key (less the retired test seam's setting), and go on
    training."""
    old = (PROJECT / "tests" / "data" / "model_state_v4.pkl").read_bytes()
    m = OnlineBiasedMF.from_bytes(old)
    assert m.lifecycle.evictions == [24, 0] and len(m.users) == 10 and m.step == 12
    written, was = load_pickle(m.state_bytes()), load_pickle(old)
    assert was["config"].pop("inject_nan_every") == 0  # model.config.RETIRED
    added = set(written["config"]) - set(was["config"])  # settings added since take their defaults
    assert added <= {"sub_batch", "sub_step_budget", "user_once", "row_mean", "rating_bias_prior", "rating_bias_window",
                     "replay_budget"}
    written["config"] = {k: v for k, v in written["config"].items() if k not in added}
    assert _same(written, was)
    stats = m.learn_many(["u1", "new"], ["i1", "i2"], np.array([R, V]), np.array([4.0, 1.0]), ts=np.array([1_200] * 2))
    assert not stats.skipped and m.step == 13
