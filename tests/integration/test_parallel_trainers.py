"""User-sharded trainers in the real job: ``flink.parallelism=2`` on a Flink mini-cluster against the real broker.
Each trainer owns its users, the two item replicas are kept in step through the item-delta topic, and one owner
publishes each item (docs/sharding.md)."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import orjson
import pytest

from flink_job.flink.runner import LocalJob
from flink_job.kafka.produce import send
from flink_job.kafka.topics import read_all
from flink_job.stages.publish import SNAPSHOT_FILE, decode
from flink_job.tools.generate import SyntheticConfig, generate
from flink_job.tools.produce import synthetic_timed
from tests.helpers import Truth

pytestmark = pytest.mark.integration


def test_two_trainers_share_the_items_and_train_every_event_once(topics, tmp_path: Path) -> None:
    snapshots = tmp_path / "snapshots"
    cfg = topics("par", overrides=["flink.parallelism=2", "batch.size=256", f"publish.snapshot_dir={snapshots}",
                                   "publish.snapshot_interval_ms=1", "publish.negative_tolerance=0"])
    syn = SyntheticConfig(n_users=300, n_items=150, n_events=4_000, duplicate_rate=0.05, malformed_rate=0.02, seed=5)
    records = list(generate(syn))
    truth = Truth.of(records)
    send(synthetic_timed(syn), cfg.kafka.bootstrap, cfg.kafka.input_topic)

    with LocalJob(cfg) as job:
        result = job.wait_idle(idle_s=5.0, timeout_s=300, min_received=truth.received)
    last = result.last
    assert {r["trainer"] for r in result.stats} == {0, 1}, "both trainers trained"
    assert (last["received"], last["trained"], last["dead_lettered"]) == (truth.received, truth.valid,
                                                                          truth.malformed)

    # Each trainer trained its own users' events only: a user's events, and so its record's counter, on one trainer.
    embeddings = read_all(cfg.kafka.bootstrap, cfg.kafka.embeddings_topic)
    versions: dict[str, list[int]] = defaultdict(list)
    latest: dict[str, dict] = {}
    for key, value, _p, _o in sorted(embeddings, key=lambda r: (r[2], r[3])):
        rec = decode(value)
        versions[key.decode()].append(rec["version"])
        latest[key.decode()] = rec
    assert {f"user:{u}" for u in truth.users} | {f"item:{i}" for i in truth.items} <= set(versions)
    events = {k.removeprefix("user:"): r["events"] for k, r in latest.items() if r["kind"] == "user"}
    assert events == truth.user_events
    # One publisher per item: versions (its trainer's step) increase in topic order for every id.
    assert all(all(b > a for a, b in zip(v, v[1:])) for v in versions.values())

    # The deltas went both ways: each trainer's replica holds every item, and the two agree.
    deltas = read_all(cfg.kafka.bootstrap, cfg.kafka.item_delta_topic)
    senders = {key.decode().split(":")[0] for key, *_ in deltas}
    assert senders == {"0", "1"}
    tables = [np.load(snapshots / f"trainer-{i}" / SNAPSHOT_FILE) for i in range(2)]
    for t in tables:
        assert set(t["item_ids"]) == truth.items and len(t["user_ids"])
    order = [np.argsort(t["item_ids"]) for t in tables]
    a, b = (t["item_vectors"][o] for t, o in zip(tables, order))
    assert np.allclose(a, b, atol=1e-4), f"replicas differ by up to {np.abs(a - b).max()}"
    assert not set(tables[0]["user_ids"]) & set(tables[1]["user_ids"]), "a user trained on both trainers"

    stats = [orjson.loads(v) for _k, v, _p, _o in read_all(cfg.kafka.bootstrap, cfg.kafka.stats_topic)]
    assert sum(s["events"] for s in stats if s["kind"] == "batch") == truth.valid
