"""The synthetic generator: seeded, with planted duplicates, malformed records and drift."""
from __future__ import annotations
from flink_job.tools.generate import MALFORMED_KINDS, SyntheticConfig, generate


def test_generator_is_seeded_and_plants_duplicates_and_malformed_records() -> None:
    cfg = SyntheticConfig(n_users=30, n_items=20, n_events=3_000, duplicate_rate=0.1, malformed_rate=0.05, seed=9)
    recs = list(generate(cfg))
    assert [r.payload for r in recs] == [r.payload for r in generate(cfg)]
    assert [r.payload for r in recs] != [r.payload for r in generate(SyntheticConfig(**{**cfg.__dict__, "seed": 10}))]
    kinds = [r.kind for r in recs]
    assert 0.07 < kinds.count("duplicate") / len(kinds) < 0.13
    assert 0.03 < sum(k in MALFORMED_KINDS for k in kinds) / len(kinds) < 0.07
    firsts = {r.event_id: r.payload for r in recs if r.kind == "event"}
    assert all(firsts[r.event_id] == r.payload for r in recs if r.kind == "duplicate")


def test_generator_drift_moves_user_preferences() -> None:
    from flink_job.tools.generate import PlantedWorld
    import numpy as np

    world = PlantedWorld(SyntheticConfig(n_users=50, n_items=40, drift=1.0, seed=1))
    users = np.arange(50)
    before, after = world.affinity(users, 0.0), world.affinity(users, 1.0)
    assert np.mean(np.argmax(before, 1) != np.argmax(after, 1)) > 0.5

