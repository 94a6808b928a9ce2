"""The cleaning stage: missing values, outliers, per-user state and its pickling."""
from __future__ import annotations

import json
import math
import pickle
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st


from flink_job.stages.clean import COUNTERS, Cleaner
from flink_job.config import CleanConfig, JobConfig
from flink_job.stages.events import EventBatch
from flink_job.stages.parse import parse_lines

NOW = 2_000_000_000_000
T0 = 1_700_000_000_000  # 2023-11-14 22:13:20 UTC
ABSENT = object()


def ev(n: int, user: str = "u", item: str = "i", ts: int | None = None, **ctx: Any) -> str:
    """One chunk line (partition 0, offset n); context fields given as ABSENT are left out."""
    d: dict[str, Any] = {"event_id": f"e{n}", "user_id": user, "item_id": item, "action": "view",
                         "ts": T0 + n * 1000 if ts is None else ts}
    d.update({k: v for k, v in ctx.items() if v is not ABSENT})
    return f"0,{n},{json.dumps(d)}"


def batch_of(*lines: str) -> EventBatch:
    batch, dead = parse_lines(list(lines), now_ms=NOW)
    assert dead == []
    return batch


def cleaner(**settings_: Any) -> Cleaner:
    return Cleaner(CleanConfig(**settings_))


def letters(dead: list) -> list[tuple]:
    return [(d.reason, d.stage, d.partition, d.offset) for d in dead]


# Missing values


def test_default_policy_fills_the_configured_values() -> None:
    c = cleaner(missing={"dwell_ms": "default", "price": "default", "category": "default"},
                defaults={"dwell_ms": 5.0, "price": 1.5, "category": "misc"})
    kept, dead = c.apply(batch_of(ev(0, dwell_ms=100, price=3.0, category="c"), ev(1), ev(2, dwell_ms=None)))
    assert dead == []
    assert kept.dwell_ms.tolist() == [100.0, 5.0, 5.0]
    assert kept.price.tolist() == [3.0, 1.5, 1.5]
    assert kept.categories == ["c", "misc", "misc"]
    assert (c.counts["missing_dwell_ms_default"], c.counts["missing_price_default"],
            c.counts["missing_category_default"]) == (2, 2, 2)


def test_global_mean_is_the_default_until_a_value_is_seen_then_the_running_mean() -> None:
    c = cleaner(missing={"price": "global_mean"}, defaults={"price": 7.0})
    kept, _ = c.apply(batch_of(ev(0)))
    assert kept.price.tolist() == [7.0] and c.counts["missing_price_default"] == 1
    kept, _ = c.apply(batch_of(ev(1, price=10.0), ev(2, user="v", price=20.0), ev(3, user="w")))
    assert kept.price.tolist() == [10.0, 20.0, 15.0]  # the batch's own values count
    kept, _ = c.apply(batch_of(ev(4, price=60.0), ev(5)))
    assert kept.price.tolist() == [60.0, 30.0]
    assert c.counts["missing_price_global_mean"] == 2


def test_user_mean_sees_the_users_earlier_events_and_falls_back_to_global_mean_then_default() -> None:
    c = cleaner(missing={"dwell_ms": "user_mean"}, defaults={"dwell_ms": 1.0})
    kept, _ = c.apply(batch_of(ev(0, user="new")))
    assert kept.dwell_ms.tolist() == [1.0] and c.counts["missing_dwell_ms_default"] == 1
    # u's first event has no value and u has no mean yet: the global mean (100 and 300) fills it.
    kept, _ = c.apply(batch_of(ev(1, user="u"), ev(2, user="u", dwell_ms=100), ev(3, user="v", dwell_ms=300),
                               ev(4, user="u"), ev(5, user="u", dwell_ms=200), ev(6, user="u")))
    assert kept.dwell_ms.tolist() == [200.0, 100.0, 300.0, 100.0, 200.0, 150.0]
    kept, _ = c.apply(batch_of(ev(7, user="v"), ev(8, user="w")))
    assert kept.dwell_ms.tolist() == [300.0, 200.0]
    assert c.counts["missing_dwell_ms_user_mean"] == 3
    assert c.counts["missing_dwell_ms_global_mean"] == 2


def test_drop_policy_dead_letters_with_reason_stage_and_position() -> None:
    c = cleaner(missing={"dwell_ms": "drop", "category": "drop"})
    lines = [ev(0, dwell_ms=10, category="c"), ev(1, category="c"), ev(2, dwell_ms=10), ev(3), ev(4, dwell_ms=5,
                                                                                             category="c")]
    kept, dead = c.apply(batch_of(*lines))
    assert kept.event_ids == ["e0", "e4"]
    # An event breaking two rules gets the first one's reason (dwell_ms before category) and one dead letter.
    assert letters(dead) == [("missing_dwell_ms", "clean", 0, 1), ("missing_category", "clean", 0, 2),
                             ("missing_dwell_ms", "clean", 0, 3)]
    assert dead[0].payload == lines[1].split(",", 2)[2] and "dwell_ms" in dead[0].detail
    assert (c.counts["missing_dwell_ms_dropped"], c.counts["missing_category_dropped"]) == (2, 1)


def test_everything_dropped_gives_an_empty_batch() -> None:
    kept, dead = cleaner(missing={"price": "drop"}).apply(batch_of(ev(0), ev(1)))
    assert len(kept) == 0 and [d.reason for d in dead] == ["missing_price", "missing_price"]


# Outliers


def _normal_dwell(n: int, seed: int = 0) -> list[float]:
    return np.random.default_rng(seed).lognormal(8.5, 1.0, n).round().tolist()


def _warm(c: Cleaner, values: list[float], start: int = 0) -> None:
    c.apply(batch_of(*(ev(start + k, dwell_ms=v) for k, v in enumerate(values))))


def test_outliers_are_clipped_to_the_robust_bound_only_after_warm_up() -> None:
    c = cleaner(outlier_warmup=100, outlier_window=1000, outlier_k=6.0)
    history = _normal_dwell(99)
    _warm(c, history)
    kept, _ = c.apply(batch_of(ev(100, dwell_ms=1e9)))  # 99 values seen: not yet
    assert kept.dwell_ms.tolist() == [1e9] and c.counts["outlier_dwell_ms_clipped"] == 0
    logs = np.log1p(np.array([*history, 1e9]))
    med = np.median(logs)
    spread = 6.0 * 1.4826 * np.median(np.abs(logs - med))
    kept, dead = c.apply(batch_of(ev(101, dwell_ms=1e9), ev(102, dwell_ms=0), ev(103, dwell_ms=5000)))
    assert dead == []
    assert kept.dwell_ms.tolist() == pytest.approx([math.expm1(med + spread), math.expm1(med - spread), 5000.0])
    assert c.counts["outlier_dwell_ms_clipped"] == 2


def test_outlier_drop_policy_dead_letters_and_off_keeps_the_value() -> None:
    dropping = cleaner(outliers={"dwell_ms": "drop"}, outlier_warmup=50)
    keeping = cleaner(outliers={"dwell_ms": "off"}, outlier_warmup=50)
    for c in (dropping, keeping):
        _warm(c, _normal_dwell(60))
    kept, dead = dropping.apply(batch_of(ev(60, dwell_ms=1e9), ev(61, dwell_ms=4000)))
    assert kept.event_ids == ["e61"] and letters(dead) == [("outlier_dwell_ms", "clean", 0, 60)]
    assert "dwell_ms=1e+09 outside" in dead[0].detail and dropping.counts["outlier_dwell_ms_dropped"] == 1
    kept, dead = keeping.apply(batch_of(ev(60, dwell_ms=1e9)))
    assert dead == [] and kept.dwell_ms.tolist() == [1e9] and keeping.counts["outlier_dwell_ms_clipped"] == 0


def test_no_outliers_while_all_values_are_equal() -> None:
    c = cleaner(outlier_warmup=10)
    c.apply(batch_of(*(ev(k, price=9.99) for k in range(20))))
    kept, _ = c.apply(batch_of(ev(20, price=500.0)))
    assert kept.price.tolist() == [500.0]


# Per-user state


def test_recent_items_are_capped_most_recent_last_and_repeats_kept() -> None:
    c = cleaner(recent_items=3)
    c.apply(batch_of(*(ev(k, item=f"i{k}") for k in range(4))))
    c.apply(batch_of(ev(4, item="i4"), ev(5, item="i2"), ev(6, user="other", item="x")))
    assert c.recent_items("u") == ["i3", "i4", "i2"]
    c.apply(batch_of(ev(7, item="i2")))
    assert c.recent_items("u") == ["i4", "i2", "i2"]
    assert c.recent_items("nobody") == []
    assert c.users.action_counts[c.users.row("u"), 0] == 7


def test_a_users_newest_event_time_is_the_latest_seen_also_out_of_order() -> None:
    """The time the TTL and the eviction at the user cap count from."""
    c = cleaner()
    c.apply(batch_of(ev(0, user="u", ts=T0 + 10_000), ev(1, user="v", ts=T0 + 5_000), ev(2, user="u", ts=T0)))
    c.apply(batch_of(ev(3, user="u", ts=T0 + 70_000), ev(4, user="u", ts=T0 + 65_000), ev(5, user="v", ts=T0)))
    newest = {u: int(c.users.last_ts[c.users.row(u)]) for u in ("u", "v")}
    assert newest == {"u": T0 + 70_000, "v": T0 + 5_000} and c.newest_ts == T0 + 70_000


def test_idle_users_expire_by_event_time_and_are_counted_once() -> None:
    c = cleaner(user_ttl_ms=60_000)
    c.apply(batch_of(ev(0, user="idle", item="a", ts=T0, dwell_ms=50)))
    c.apply(batch_of(ev(1, user="busy", ts=T0 + 120_000)))
    assert c.recent_items("idle") == []  # expired, though not swept yet
    kept, _ = c.apply(batch_of(ev(2, user="idle", item="b", ts=T0 + 121_000)))
    assert kept.dwell_ms.tolist() == [50.0]  # starts afresh: its own mean is gone; the global mean fills
    assert c.users.dwell_n[c.users.row("idle")] == 0
    assert c.recent_items("idle") == ["b"] and c.counts["users_expired"] == 1
    # The sweep: once max(1024, users held) events have passed, users idle for longer than the TTL are forgotten.
    c.apply(batch_of(*(ev(10 + k, user=f"x{k}", ts=T0 + 121_000 + k) for k in range(1100))))
    assert "busy" in c.users and "idle" in c.users and c.since_sweep == 0  # swept, but 1 s and 0 s behind: fresh
    c.apply(batch_of(*(ev(2000 + k, user="late", ts=T0 + 200_000 + k) for k in range(1000))))
    assert len(c.users) == 1103  # 1000 events since the sweep: not yet
    c.apply(batch_of(*(ev(3000 + k, user="late", ts=T0 + 201_000 + k) for k in range(200))))
    assert set(c.users) == {"late"}
    assert c.counts["users_expired"] == 1 + 2 + 1100


# State


def _outputs(kept: EventBatch, dead: list) -> tuple:
    return (kept.event_ids, kept.dwell_ms.tolist(), kept.price.tolist(), kept.categories,
            [(d.reason, d.offset, d.detail) for d in dead])


def _stream(seed: int, start: int, n: int) -> EventBatch:
    rng = np.random.default_rng(seed)
    lines = []
    for k in range(n):
        dwell = float(rng.lognormal(8, 1)) if rng.random() < 0.95 else 1e9  # some outliers
        ctx = {"dwell_ms": dwell if rng.random() < 0.8 else ABSENT,
               "price": float(rng.lognormal(3, 1)) if rng.random() < 0.7 else None,
               "category": f"c{rng.integers(3)}" if rng.random() < 0.9 else ABSENT}
        lines.append(ev(start + k, user=f"u{rng.integers(20)}", item=f"i{rng.integers(50)}",
                        ts=T0 + int(rng.integers(0, 10**8)), **ctx))
    return batch_of(*lines)


def test_pickled_cleaner_and_state_dict_continue_identically() -> None:
    cfg = CleanConfig(outlier_warmup=20, outlier_window=64, outliers={"dwell_ms": "drop"}, recent_items=5)
    c = Cleaner(cfg)
    for b in range(3):
        c.apply(_stream(b, b * 100, 100))
    copy = pickle.loads(pickle.dumps(c))
    restored = Cleaner(cfg)
    restored.load_state_dict(pickle.loads(pickle.dumps(c.state_dict())))
    for b in range(3, 6):
        batch = _stream(b, b * 100, 100)
        expected = _outputs(*c.apply(batch))
        assert _outputs(*copy.apply(batch)) == expected
        assert _outputs(*restored.apply(batch)) == expected
    assert copy.counts == c.counts == restored.counts and copy.counts["outlier_dwell_ms_dropped"] > 0
    assert all(copy.recent_items(u) == c.recent_items(u) == restored.recent_items(u) for u in c.users)


def test_input_batch_is_left_untouched() -> None:
    batch = batch_of(ev(0), ev(1, dwell_ms=10, price=2.0))
    before = (batch.dwell_ms.copy(), batch.price.copy(), list(batch.categories))
    cleaner().apply(batch)
    assert np.array_equal(batch.dwell_ms, before[0], equal_nan=True)
    assert np.array_equal(batch.price, before[1], equal_nan=True)
    assert batch.categories == before[2] == [None, None]


def test_cleaned_batches_concatenate_slice_and_select_with_their_filled_columns() -> None:
    c = cleaner()
    a, _ = c.apply(batch_of(ev(0, dwell_ms=1, category="x"), ev(1, dwell_ms=2)))
    b, _ = c.apply(batch_of(ev(2, dwell_ms=3, price=4.0)))
    both = EventBatch.concat([a, b])
    assert both.dwell_ms.tolist() == [1.0, 2.0, 3.0] and both.categories == ["x", "unknown", "unknown"]
    assert both.slice(1, 3).dwell_ms.tolist() == [2.0, 3.0]
    assert both.select(np.array([2, 0])).price.tolist() == [4.0, 0.0]


def test_a_state_written_with_the_feature_statistics_restores_without_them() -> None:
    """States written while the cleaner derived features hold the z-score moments (``logs``) and a per-user event
    count (``events``); they restore, dropping both, and the cleaner goes on as if they had never been written."""
    cfg = CleanConfig(outlier_warmup=20, outlier_window=64, recent_items=5)
    c = Cleaner(cfg)
    for b in range(2):
        c.apply(_stream(b, b * 100, 100))
    old = pickle.loads(pickle.dumps(c.state_dict()))
    old["logs"] = {f: (100, 5.0, 80.0) for f in ("dwell_ms", "price")}
    old["users"]["cols"]["events"] = np.arange(len(old["users"]["ids"]), dtype=np.int64)
    restored = Cleaner(cfg)
    restored.load_state_dict(old)
    assert "logs" not in restored.state_dict() and "events" not in restored.state_dict()["users"]["cols"]
    batch = _stream(2, 200, 100)
    assert _outputs(*restored.apply(batch)) == _outputs(*c.apply(batch))
    assert restored.counts == c.counts


# Properties

context = {
    "dwell_ms": st.one_of(st.just(ABSENT), st.none(), st.floats(0, 1e7), st.integers(0, 10**6)),
    "price": st.one_of(st.just(ABSENT), st.none(), st.floats(0, 1e5)),
    "category": st.one_of(st.just(ABSENT), st.none(), st.sampled_from(["a", "b"])),
}
events = st.lists(st.tuples(st.sampled_from("uvw"), st.integers(0, 10**9), st.fixed_dictionaries(context)),
                  max_size=40)
configs = st.builds(
    CleanConfig,
    missing=st.fixed_dictionaries({"dwell_ms": st.sampled_from(["default", "global_mean", "user_mean", "drop"]),
                                   "price": st.sampled_from(["default", "global_mean", "user_mean", "drop"]),
                                   "category": st.sampled_from(["default", "drop"])}),
    outliers=st.fixed_dictionaries({"dwell_ms": st.sampled_from(["clip", "drop", "off"]),
                                    "price": st.sampled_from(["clip", "drop", "off"])}),
    outlier_warmup=st.integers(0, 8), outlier_window=st.just(8), user_ttl_ms=st.integers(1, 10**9),
)


@settings(max_examples=150, deadline=None)
@given(configs, events, events)
def test_every_event_is_kept_in_order_or_dead_lettered(cfg: CleanConfig, first: list, second: list) -> None:
    c = Cleaner(cfg)
    offset = 0
    for chunk in (first, second):
        lines = [ev(offset + k, user=u, ts=T0 + t, **ctx) for k, (u, t, ctx) in enumerate(chunk)]
        offset += len(chunk)
        batch = batch_of(*lines) if lines else EventBatch()
        kept, dead = c.apply(batch)
        dead_offsets = {d.offset for d in dead}
        assert len(kept) + len(dead) == len(batch) and len(dead_offsets) == len(dead)
        survivors = [k for k, o in enumerate(batch.offsets.tolist()) if o not in dead_offsets]
        assert kept.offsets.tolist() == batch.offsets[survivors].tolist()
        assert kept.event_ids == [batch.event_ids[k] for k in survivors]
        assert all(d.stage == "clean" and d.reason.startswith(("missing_", "outlier_")) for d in dead)
        assert not np.isnan(kept.dwell_ms).any() and not np.isnan(kept.price).any() and None not in kept.categories
        assert np.isfinite(kept.dwell_ms).all() and np.isfinite(kept.price).all()
    assert set(c.counts) == set(COUNTERS) and all(v >= 0 for v in c.counts.values())


# Configuration


@pytest.mark.parametrize(
    ("settings_", "message"),
    [
        ({"missing": {"price": "median"}}, r"clean.missing.price = 'median' is not allowed \(dwell_ms: default \|"),
        ({"missing": {"category": "user_mean"}}, r"clean.missing.category = 'user_mean'.*category: default \| drop"),
        ({"missing": {"colour": "default"}}, "clean.missing.colour"),
        ({"outliers": {"price": "winsorize"}}, r"clean.outliers.price = 'winsorize'.*clip \| drop \| off"),
        ({"outliers": {"category": "clip"}}, "clean.outliers.category"),
        ({"missing": "drop"}, "clean.missing must be a mapping"),
        ({"defaults": {"price": -1}}, "clean.defaults.price must be a finite number >= 0"),
        ({"defaults": {"category": 3}}, "clean.defaults.category must be a string"),
        ({"defaults": {"weight": 1}}, "clean.defaults takes dwell_ms, price, category"),
        ({"outlier_warmup": 5000}, "clean.outlier_warmup"),
        ({"outlier_k": 0}, "clean.outlier_k"),
        ({"user_ttl_ms": 0}, "clean.user_ttl_ms"),
        ({"max_value": 0}, r"clean.max_value must be a number in \(0, 3.40282e\+38\]"),
        ({"max_value": 1e39}, "clean.max_value"),
        ({"max_value": math.inf}, "clean.max_value"),
        ({"max_future_ms": -1}, "clean.max_future_ms must be an integer >= 0"),
    ],
)
def test_bad_clean_config_is_rejected_with_the_key_and_choices(settings_: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CleanConfig(**settings_)


def test_a_policy_override_keeps_the_other_fields_defaults() -> None:
    cfg = JobConfig.load(overrides=["clean.missing={price: drop}", "clean.outliers={dwell_ms: off}"])
    assert cfg.clean.missing == {"dwell_ms": "user_mean", "price": "drop", "category": "default"}
    assert cfg.clean.outliers == {"dwell_ms": "off", "price": "clip"}
    with pytest.raises(ValueError, match="clean.missing.price = 'sometimes'"):
        JobConfig.load(overrides=["clean.missing={price: sometimes}"])


def test_defaults_bound_future_event_time_to_minutes_and_implicit_values() -> None:
    cfg = CleanConfig()
    assert cfg.max_future_ms == 5 * 60 * 1000 and cfg.max_value == 100.0


@pytest.mark.parametrize("name", ["dwell_ms", "price"])
def test_no_context_number_becomes_inf_or_nan_after_cleaning(name: str) -> None:
    # Values near the double limit overflowed the running sums (mean inf, variance NaN), and the next missing value
    # was filled with inf. They are dead-lettered by the parser now (beyond float32); the largest float32 is fine.
    huge = [ev(n, user=f"u{n % 3}", **{name: 1.7e308}) for n in range(4)]
    largest = [ev(n, user=f"u{n % 3}", **{name: 3.4e38}) for n in range(4, 8)]
    missing = [ev(n, user=f"u{n % 3}") for n in range(8, 12)]
    c = cleaner(outlier_warmup=0)
    kept, late_dead = [], []
    for chunk in (huge, largest, missing):
        batch, dead = parse_lines(chunk, now_ms=NOW)
        late_dead += dead
        out, rejected = c.apply(batch)
        late_dead += rejected
        kept.append(out)
    assert [d.reason for d in late_dead] == [f"bad_{name}"] * 4
    for out in kept[1:]:
        assert len(out) == 4
        assert np.isfinite(out.dwell_ms).all() and np.isfinite(out.price).all()
    assert math.isfinite(c.raw[name].mean) and math.isfinite(c.raw[name].std)
