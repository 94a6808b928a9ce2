"""The id maps' caches: the live masks kept beside the model's and the cleaner's maps (for the eviction scans),
and the ranking's cached candidate rows agree with the maps through admissions, releases, growth and a round trip
through their state."""
from __future__ import annotations

import numpy as np

from flink_job.stages.users import UserTable
from model.config import ModelConfig
from model.idmap import FALLBACK_ROW, IdMap
from model.mf import OnlineBiasedMF


def _churn(rng: np.random.Generator, admit, release) -> None:
    """Admits 3,000 random ids (past a capacity of 1,024) and releases a random half of their rows, twice."""
    for _round in range(2):
        rows = sorted(set(admit([f"id{n}" for n in rng.integers(0, 5_000, 3_000)]).tolist()))
        release(np.sort(rng.choice(rows, len(rows) // 2, replace=False)))


def test_idmap_live_mask_follows_admissions_and_releases() -> None:
    rng = np.random.default_rng(3)
    m = IdMap()
    _churn(rng, m.rows, m.release)
    expected = np.zeros(m.size, bool)
    expected[[m.get(k) for k in m._row]] = True
    assert m.live_mask().tolist() == expected.tolist()
    assert not m.live_mask()[FALLBACK_ROW] and m.live_mask().sum() == len(m) > 1_024
    assert m.live_rows().tolist() == np.flatnonzero(expected).tolist()
    restored = IdMap.from_state(m.state())
    assert restored.live_mask().tolist() == expected.tolist()
    mask = m.live_mask()
    mask[:] = False  # a copy: the caller may change it
    assert m.live_mask().sum() == len(m)
    assert m.lookup(["id1", "nobody"]).tolist() == [m.get("id1") if "id1" in m else FALLBACK_ROW, FALLBACK_ROW]


def test_user_table_live_mask_follows_added_and_released_users() -> None:
    rng = np.random.default_rng(4)
    t = UserTable(n_actions=5, recent=2)
    _churn(rng, t.rows, t.release)
    expected = np.zeros(len(t.ids), bool)
    expected[t.live_rows()] = True
    assert t.live_mask().tolist() == expected.tolist() and expected.sum() == len(t) > 1_024
    restored = UserTable.from_state(t.state(), n_actions=5, recent=2)
    assert restored.live_mask().tolist() == expected.tolist()


def test_cached_candidate_rows_follow_admissions_releases_and_a_new_map() -> None:
    """The ranking's candidate rows are cached; after admissions only the ids without a row are looked up again,
    and after a release or a restored item map, every id: each call gives what a fresh look-up gives."""
    m = OnlineBiasedMF(ModelConfig(dim=4, seed=1))
    candidates = [f"i{n}" for n in range(6)]
    m.items.rows(candidates[:3])
    steps = [lambda: None, lambda: m.items.rows(["i4"]), lambda: m.items.release([m.items.get("i0")]),
             lambda: m.items.rows(["i5"]),  # takes the row i0 gave back
             lambda: setattr(m.lifecycle, "items", type(m.items).from_state(m.items.state()))]
    for step in steps:
        step()
        assert m._candidate_rows(candidates).tolist() == m.items.lookup(candidates).tolist()
    assert m._candidate_rows(candidates)[5] != FALLBACK_ROW

