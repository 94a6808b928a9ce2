"""An upgrade on the standalone session cluster: stop with a savepoint, change the job, resubmit from the savepoint.

The new version runs with another configuration (learning rate, publish interval, a proximal pull toward the last
published rows, a NumPy snapshot sink) and must restore every operator's state without
``--allowNonRestoredState``: what the model learned, its optimiser state, the per-id counters, the Kafka offsets and
the de-duplication memory.
"""
from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import orjson
import pytest

from deploy.cluster import SessionCluster
from deploy.cluster_rest import ENDED
from deploy.kafka import create_topics
from flink_job.config import JobConfig
from flink_job.tools.generate import SyntheticConfig, generate
from flink_job.kafka.produce import Record, send
from flink_job.tools.produce import synthetic_timed
from flink_job.stages.publish import SNAPSHOT_FILE
from flink_job.kafka.topics import Follower, end_offsets, read_all
from flink_job.stages.train_output import combine_latest
from tests.integration.conftest import Jobs
from tests.helpers import PROJECT, Truth, follow_stats, job_args, latest_by_id, session_cluster

pytestmark = pytest.mark.integration
REST_PORT = 18381  # test_cluster.py uses 18081/16123, test_faults.py 18281/16323
RPC_PORT = 16423


@pytest.fixture(scope="module")
def cluster() -> Iterator[SessionCluster]:
    with session_cluster(REST_PORT, RPC_PORT, PROJECT / ".run" / "test-upgrade-cluster") as c:
        yield c


def item_events(syn: SyntheticConfig) -> Counter[str]:
    return Counter(orjson.loads(r.payload)["item_id"] for r in generate(syn) if r.kind == "event")


def refusal(cluster: SessionCluster, args: list[str], savepoint: str, allow_non_restored: bool) -> str:
    """Why the cluster refused to start a job from ``savepoint``: at submission, or as the job's failure."""
    try:
        job_id = cluster.submit(args, savepoint=savepoint, allow_non_restored=allow_non_restored)
    except Exception as ex:  # noqa: BLE001 - refused at submission: the message is what matters
        return str(ex)
    deadline = time.monotonic() + 120
    while cluster.job_status(job_id) not in ENDED and time.monotonic() < deadline:
        time.sleep(0.5)
    status = cluster.job_status(job_id)
    if status == "RUNNING":
        cluster.cancel(job_id)
    return f"{status}: {cluster.exception(job_id)}"


def first_stream(cfg: JobConfig, before: SyntheticConfig, after: SyntheticConfig, tmp_path: Path
                 ) -> tuple[Truth, Truth, list[tuple[Record, int]], Follower]:
    """Sends the stream before the upgrade; ``(its truth, the truth of the one after, its records, a follower of
    the stats)``, and folders for the job versions' arguments."""
    old = list(synthetic_timed(before))
    send(old, cfg.kafka.bootstrap, cfg.kafka.input_topic, total=len(old))
    for version in ("v1", "v2", "p1", "p4"):
        (tmp_path / version).mkdir()
    return (Truth.of(list(generate(before))), Truth.of(list(generate(after))), old,
            Follower(cfg.kafka.bootstrap, cfg.kafka.stats_topic))


@pytest.mark.parametrize("mode", ["process", "thread"])
def test_upgrade_from_a_savepoint_keeps_what_was_learned(
    cluster: SessionCluster, topics: Callable[..., JobConfig], tmp_path: Path, mode: str, jobs: Jobs
) -> None:
    """In thread mode the savepoint holds the stage's first snapshot and every call since (flink_job.flink.stage_log):
    the restore replays them under the old settings, then takes the new ones."""
    # Tolerance 0: every row a step moves is published, so the snapshot can be compared with the topic exactly (rows
    # moved only as negatives otherwise wait for a 5% drift; tests/unit/stages/test_publish_negatives.py).
    cfg = topics(f"upgrade-{mode}", overrides=[f"flink.python_execution_mode={mode}",
                                               "flink.state_snapshot_interval_ms=3600000",
                                               "publish.negative_tolerance=0"])
    before = SyntheticConfig(n_users=300, n_items=150, n_events=8_000, duplicate_rate=0.02, malformed_rate=0.01,
                             seed=71, id_prefix="a")
    # After the upgrade only the 30 most active users have events: the other 270 must keep their vectors exactly.
    after = SyntheticConfig(n_users=30, n_items=150, n_events=1_500, seed=72, id_prefix="b")
    truth_a, truth_b, old, stats = first_stream(cfg, before, after, tmp_path)
    job_id = jobs.submit(cluster, job_args(cfg, tmp_path / "v1"))
    resumed = None
    try:
        follow_stats(cluster, job_id, stats, lambda seen: seen[-1]["received"] >= truth_a.received)
        published = latest_by_id(read_all(cfg.kafka.bootstrap, cfg.kafka.embeddings_topic))
        assert {k.removeprefix("user:"): r["events"] for k, r in published.items() if r["kind"] == "user"} \
            == truth_a.user_events
        savepoint = cluster.stop_with_savepoint(job_id, tmp_path / "savepoints")
        assert cluster.job_status(job_id) == "FINISHED"
        stopped_at = end_offsets(cfg.kafka.bootstrap, cfg.kafka.embeddings_topic)

        # The new version: other settings, a model option that keeps the table shapes, a snapshot sink.
        snapshots = tmp_path / "snapshots"
        upgraded = dataclasses.replace(
            cfg,
            model=dataclasses.replace(cfg.model, optimizer=dataclasses.replace(cfg.model.optimizer, lr=0.02),
                                      stability=dataclasses.replace(cfg.model.stability, proximal=0.1)),
            publish=dataclasses.replace(cfg.publish, interval_ms=500, snapshot_dir=str(snapshots),
                                        snapshot_interval_ms=1),
        )
        # New events for a few users, and a re-delivery of old ones that only the restored state can drop.
        send([*synthetic_timed(after), *old[:200]], cfg.kafka.bootstrap, cfg.kafka.input_topic)
        resumed = jobs.submit(cluster, job_args(upgraded, tmp_path / "v2"), savepoint=savepoint)  # no -n
        received = truth_a.received + truth_b.received
        last = follow_stats(cluster, resumed, stats, lambda seen: seen[-1]["received"] >= received)[-1]
        # Counters restored and continued; offsets and de-duplication restored: nothing read or trained twice.
        assert (last["received"], last["trained"]) == (received, truth_a.valid + truth_b.valid)
        assert last["replayed_calls"] > 10 if mode == "thread" else last["replayed_calls"] == 0

        records = read_all(cfg.kafka.bootstrap, cfg.kafka.embeddings_topic)
        republished = latest_by_id([r for r in records if r[3] >= stopped_at[r[2]]])
        assert republished, "nothing published after the upgrade"
        # Versions continue from the restored model step; event counters continue from where they were.
        for key, rec in republished.items():
            assert key not in published or rec["version"] > published[key]["version"], key
        for user, n in truth_b.user_events.items():
            assert republished[f"user:{user}"]["events"] == truth_a.user_events.get(user, 0) + n, user
        items_total = item_events(before) + item_events(after)
        for key, rec in republished.items():
            if rec["kind"] == "item":
                assert rec["events"] == items_total[rec["id"]], key

        # Every row as the new version holds it: ids it did not touch have exactly the vectors learned before the
        # upgrade; the ones it touched, exactly what it published last.
        snap = np.load(snapshots / SNAPSHOT_FILE)
        assert int(snap["step"]) == last["step"]
        untouched = 0
        for kind in ("user", "item"):
            rows = {str(i): n for n, i in enumerate(snap[f"{kind}_ids"])}
            for key, rec in {**published, **republished}.items():
                if rec["kind"] != kind:
                    continue
                vector = snap[f"{kind}_vectors"][rows[rec["id"]]]
                expected = (republished.get(key) or published[key])["vector"]
                np.testing.assert_array_equal(vector, np.array(expected, np.float32), err_msg=key)
                untouched += key not in republished
        users_untouched = sum(1 for k in published if k.startswith("user:") and k not in republished)
        assert users_untouched >= len(truth_a.users) - len(truth_b.users), users_untouched
        assert untouched >= users_untouched
        assert cluster.cancel(resumed) == "CANCELED"
    finally:
        stats.close()


@pytest.mark.parametrize("mode", ["process", "thread"])
def test_four_trainers_rescale_from_two_subtasks_to_four_and_to_one(
    cluster: SessionCluster, topics: Callable[..., JobConfig], tmp_path: Path, mode: str, jobs: Jobs
) -> None:
    """Four user-sharded trainers (``flink.trainers=4``) on two subtasks stop with a savepoint, resume on four
    subtasks, stop again and resume on one: every count, offset and de-duplication entry survives both rescales, and
    every user's rows (Flink moves each trainer's key group whole). A resume with another number of trainers is
    refused, since each trainer holds its own users' rows (their max parallelism is their number: Flink itself
    refuses the restore)."""
    # Thread mode writes each stage as 4 KiB entries here, so each trainer's key group moves as many state values.
    cfg = topics(f"rescale-{mode}", overrides=["flink.parallelism=2", "flink.trainers=4", "publish.negative_tolerance=0",
                                               f"flink.python_execution_mode={mode}", "flink.state_chunk_bytes=4096"])
    # An item-delta topic of three partitions: each sender's records must stay in one of them, whichever subtask runs
    # the sender (streamrec.SenderPartitioner), or a receiver could read a later sequence first and skip the earlier.
    deltas = f"{cfg.kafka.item_delta_topic}-3"
    create_topics(cfg.kafka.bootstrap, {deltas: {}}, 3)
    cfg = dataclasses.replace(cfg, kafka=dataclasses.replace(cfg.kafka, item_delta_topic=deltas))
    first = SyntheticConfig(n_users=300, n_items=150, n_events=6_000, duplicate_rate=0.02, malformed_rate=0.01,
                            seed=73, id_prefix="a")
    second = SyntheticConfig(n_users=40, n_items=150, n_events=1_500, seed=74, id_prefix="b")
    third = SyntheticConfig(n_users=40, n_items=150, n_events=1_500, seed=75, id_prefix="c")
    truth_a, truth_b, old, stats = first_stream(cfg, first, second, tmp_path)
    truth_c = Truth.of(list(generate(third)))

    def at(parallelism: int) -> JobConfig:
        return dataclasses.replace(cfg, flink=dataclasses.replace(cfg.flink, parallelism=parallelism))

    try:
        job_id = jobs.submit(cluster, job_args(cfg, tmp_path / "v1"))
        seen = follow_stats(cluster, job_id, stats, lambda s: combine_latest(s)["received"] >= truth_a.received)
        assert {s["trainer"] for s in seen} == {0, 1, 2, 3}
        savepoint = cluster.stop_with_savepoint(job_id, tmp_path / "savepoints")

        # Two trainers (one per subtask) where the state holds four: refused.
        two = dataclasses.replace(cfg, flink=dataclasses.replace(cfg.flink, trainers=2))
        message = refusal(cluster, job_args(two, tmp_path / "p1"), savepoint, False)
        assert "max parallelism mismatch" in message.lower(), message[-3000:]

        # Re-delivered events only: a malformed record without ids is keyed by its new position and counts again.
        send([*synthetic_timed(second), *[r for r in old[:200] if r[0].kind == "event"]], cfg.kafka.bootstrap,
             cfg.kafka.input_topic)
        resumed = jobs.submit(cluster, job_args(at(4), tmp_path / "p4"), savepoint=savepoint)
        received = truth_a.received + truth_b.received
        seen += follow_stats(cluster, resumed, stats, lambda s: combine_latest(seen + s)["received"] >= received)
        savepoint = cluster.stop_with_savepoint(resumed, tmp_path / "savepoints")

        send(list(synthetic_timed(third)), cfg.kafka.bootstrap, cfg.kafka.input_topic)
        resumed = jobs.submit(cluster, job_args(at(1), tmp_path / "v2"), savepoint=savepoint)
        received += truth_c.received
        new = follow_stats(cluster, resumed, stats, lambda s: combine_latest(seen + s)["received"] >= received)
        last = combine_latest(seen + new)
        # Counters restored and continued; offsets and de-duplication restored: nothing read or trained twice.
        assert (last["received"], last["trained"]) == (received, truth_a.valid + truth_b.valid + truth_c.valid)
        assert {s["trainer"] for s in new} == {0, 1, 2, 3}, "one subtask runs all four trainers"
        published = latest_by_id(read_all(cfg.kafka.bootstrap, cfg.kafka.embeddings_topic))
        events = {k.removeprefix("user:"): r["events"] for k, r in published.items() if r["kind"] == "user"}
        assert events == dict(Counter(truth_a.user_events) + Counter(truth_b.user_events)
                              + Counter(truth_c.user_events))
        # Each sender's deltas went to partition sender mod 3 on every subtask that ran it.
        partitions: dict[int, set[int]] = {}
        for key, _v, partition, _o in read_all(cfg.kafka.bootstrap, cfg.kafka.item_delta_topic):
            partitions.setdefault(int(key.decode().split(":")[0]), set()).add(partition)
        assert partitions == {s: {s % 3} for s in range(4)}, partitions
        assert cluster.cancel(resumed) == "CANCELED"
    finally:
        stats.close()
