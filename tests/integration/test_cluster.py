"""The job on a standalone Flink session cluster, submitted with ``flink run`` as in production, on the real broker.

What the mini-cluster tests cannot show: the code shipped with --pyFiles imports on the TaskManager, the connector
jar in ``pipeline.jars`` reaches the cluster, the venv's python runs the workers, and a savepoint taken on the
cluster restores the source offsets and the de-duplication state after a resubmission.
"""
from __future__ import annotations

import itertools
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from deploy.cluster import SessionCluster
from flink_job.config import JobConfig
from flink_job.tools.generate import SyntheticConfig, generate
from flink_job.kafka.produce import send
from flink_job.tools.produce import synthetic_timed
from flink_job.kafka.topics import Follower, json_values, read_all
from tests.integration.conftest import Jobs
from tests.helpers import PROJECT, Truth, follow_stats, job_args, trained, session_cluster

pytestmark = pytest.mark.integration
REST_PORT = 18081  # not 8081: a development cluster may be running
RPC_PORT = 16123


@pytest.fixture(scope="module")
def cluster() -> Iterator[SessionCluster]:
    """A session cluster of its own (ports, run dir), stopped even when the module's tests fail."""
    with session_cluster(REST_PORT, RPC_PORT, PROJECT / ".run" / "test-flink-cluster") as c:
        yield c


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_job_on_session_cluster(
    cluster: SessionCluster, topics: Callable[..., JobConfig], tmp_path: Path, mode: str, jobs: Jobs
) -> None:
    cfg = topics(f"cluster-{mode}", overrides=[f"flink.python_execution_mode={mode}"])
    syn = SyntheticConfig(n_users=200, n_items=100, n_events=3000, duplicate_rate=0.05, malformed_rate=0.02,
                          seed=23)
    truth = Truth.of(list(generate(syn)))
    assert truth.duplicates and truth.malformed  # the stream exercises both paths
    send(synthetic_timed(syn), cfg.kafka.bootstrap, cfg.kafka.input_topic, total=syn.n_events)
    stats = Follower(cfg.kafka.bootstrap, cfg.kafka.stats_topic)
    job_id = jobs.submit(cluster, job_args(cfg, tmp_path))
    try:
        received = truth.valid + truth.malformed  # the duplicates are dropped on the cluster
        last = follow_stats(cluster, job_id, stats, lambda seen: seen[-1]["received"] >= received)[-1]

        assert cluster.job_status(job_id) == "RUNNING"
        assert any(j["jid"] == job_id for j in cluster.jobs())
        workers = [Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") for pid in cluster.python_worker_pids()]
        if mode == "process":  # the workers run through the launcher, tuned by flink_job.flink.worker
            assert workers and all(
                cmd[1:5] == [b"-m", b"flink_job.flink.worker", b"-m", b"pyflink.fn_execution.beam.beam_boot"] for cmd in workers
            ), workers
        else:  # no worker process: a TaskManager JVM has CPython loaded
            assert not workers, workers
            assert any(b"libpython3" in Path(f"/proc/{pid}/maps").read_bytes() for pid in cluster.daemon_pids())
        for gauge in ("implicitLossMicro", "prequential.positives"):  # the values the stage set reach Flink
            assert train_metric(cluster, job_id, gauge, lambda v: int(v) > 0)
        assert last["received"] == received
        assert last["trained"] == truth.valid
        assert last["dead_lettered"] == truth.malformed
        assert len(read_all(cfg.kafka.bootstrap, cfg.kafka.dead_letter_topic)) == truth.malformed

        versions: dict[str, list[int]] = defaultdict(list)
        records = sorted(read_all(cfg.kafka.bootstrap, cfg.kafka.embeddings_topic), key=lambda r: (r[2], r[3]))
        for (key, _v, _p, _o), rec in zip(records, json_values(records), strict=True):
            assert key == f"{rec['kind']}:{rec['id']}".encode()
            versions[f"{rec['kind']}:{rec['id']}"].append(rec["version"])
        expected = {f"user:{u}" for u in truth.users} | {f"item:{i}" for i in truth.items}
        assert not expected - versions.keys(), f"ids never published: {sorted(expected - versions.keys())[:10]}"
        not_increasing = {k: v for k, v in versions.items() if any(b <= a for a, b in itertools.pairwise(v))}
        assert not not_increasing, f"versions not increasing in topic order: {dict(list(not_increasing.items())[:5])}"

        assert cluster.cancel(job_id) == "CANCELED"
        # Metrics fetched after the cancel must not call into a closed interpreter (flink_job.flink.gauges): the
        # TaskManager that ran the job is still up and registered.
        tms = cluster.daemon_pids()
        for _ in range(5):
            cluster.rest("GET", "/taskmanagers/metrics")
            cluster.jobs()
            time.sleep(1.0)
        assert cluster.daemon_pids() == tms and cluster.wait_ready(10)["taskmanagers"] == 1
    finally:
        stats.close()


def train_metric(cluster: SessionCluster, job_id: str, suffix: str, ok: Callable[[str], bool],
                 timeout_s: float = 45.0) -> str:
    """The value of the training operator's metric whose name ends with ``suffix``, once ``ok`` holds for it (the
    JobManager fetches metrics every 10 s)."""
    (vertex,) = [v["id"] for v in cluster.rest("GET", f"/jobs/{job_id}")["vertices"] if v["name"].startswith("train")]
    path = f"/jobs/{job_id}/vertices/{vertex}/metrics"
    deadline = time.monotonic() + timeout_s
    seen = None
    while time.monotonic() < deadline:
        names = [m["id"] for m in cluster.rest("GET", path) if m["id"].endswith(f".{suffix}")]
        if names:
            (metric,) = cluster.rest("GET", f"{path}?get={names[0]}")
            seen = str(metric["value"])
            if ok(seen):
                return seen
        time.sleep(1.0)
    raise AssertionError(f"metric *.{suffix} on {vertex}: {seen} after {timeout_s}s")


def test_stop_with_savepoint_and_resume(
    cluster: SessionCluster, topics: Callable[..., JobConfig], tmp_path: Path, jobs: Jobs
) -> None:
    """An upgrade: stop with a savepoint, resubmit from it; nothing is read twice and old duplicates stay dropped."""
    cfg = topics("cluster-savepoint")
    before = SyntheticConfig(n_users=50, n_items=40, n_events=400, seed=31, id_prefix="a")
    after = SyntheticConfig(n_users=50, n_items=40, n_events=300, seed=32, id_prefix="b")
    old = list(synthetic_timed(before))
    send(old, cfg.kafka.bootstrap, cfg.kafka.input_topic, total=len(old))
    stats = Follower(cfg.kafka.bootstrap, cfg.kafka.stats_topic)
    args = job_args(cfg, tmp_path)
    job_id = jobs.submit(cluster, args)
    resumed = None
    try:
        assert trained(follow_stats(cluster, job_id, stats, lambda seen: trained(seen) >= before.n_events,
                                    idle_s=2.0)) == before.n_events
        savepoint = cluster.stop_with_savepoint(job_id, tmp_path / "savepoints")
        assert cluster.job_status(job_id) == "FINISHED"
        assert Path(savepoint.removeprefix("file:")).is_dir()

        # While the job is down: new events, and a re-delivery of old ones that only the restored state can drop.
        send([*synthetic_timed(after), *old[:100]], cfg.kafka.bootstrap, cfg.kafka.input_topic)
        resumed = jobs.submit(cluster, args, savepoint=savepoint)
        # Offsets restored: the old events are not read again; de-duplication state restored: the re-delivered
        # ones are dropped. Either failure shows up as more events trained.
        new = follow_stats(cluster, resumed, stats, lambda seen: trained(seen) >= after.n_events)
        assert trained(new) == after.n_events
        assert cluster.cancel(resumed) == "CANCELED"
    finally:
        stats.close()


def test_a_warm_start_model_shipped_with_pyarch(
    cluster: SessionCluster, topics: Callable[..., JobConfig], tmp_path: Path
) -> None:
    """``-pyarch``: a model pre-trained in batch travels with the job as an archive, the workers find it by a path
    relative to their working directory, and the job continues from it (every published step is past it)."""
    import zipfile

    from model.mf import OnlineBiasedMF
    from model.warm_start import main as warm_start

    history = tmp_path / "u.data"
    history.write_text("".join(f"h{k % 7}\t{k % 11}\t{1 + k % 5}\t{880000000 + k}\n" for k in range(400)))
    state = tmp_path / "state.bin"
    warm_start(["--input", str(history), "--out", str(state), "--epochs", "3", "--batch-size", "50"])
    pretrained = OnlineBiasedMF.from_file_bytes(state.read_bytes()).step
    assert pretrained >= 20
    archive = tmp_path / "warm.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(state, "state.bin")

    cfg = topics("cluster-pyarch", overrides=["flink.initial_model=warm/state.bin", "batch.size=64"])
    syn = SyntheticConfig(n_users=30, n_items=20, n_events=300, seed=41)
    send(synthetic_timed(syn), cfg.kafka.bootstrap, cfg.kafka.input_topic, total=syn.n_events)
    stats = Follower(cfg.kafka.bootstrap, cfg.kafka.stats_topic)
    job_id = cluster.submit(job_args(cfg, tmp_path), archives=[f"{archive}#warm"])
    try:
        cluster.wait_running(job_id)
        assert trained(follow_stats(cluster, job_id, stats, lambda seen: trained(seen) >= syn.n_events)) == syn.n_events
        steps = [rec["step"] for rec in json_values(read_all(cfg.kafka.bootstrap, cfg.kafka.embeddings_topic))]
        assert steps and min(steps) > pretrained
        assert cluster.cancel(job_id) == "CANCELED"
    finally:
        stats.close()


def test_secrets_stay_off_the_command_lines_and_out_of_the_logs_of_the_cluster(
    cluster: SessionCluster, topics: Callable[..., JobConfig], tmp_path: Path, jobs: Jobs
) -> None:
    """A job submitted with secret Flink options given as ``--set`` overrides: while it is submitted and runs, no
    process of the cluster (the ``flink run`` client, the job's Python client, the JobManager and TaskManager)
    carries them on its command line, no log of the cluster shows them, and the cluster's config file is private."""
    import secrets
    import stat
    import threading

    secret = f"lit-{secrets.token_hex(8)}"
    cfg = topics("cluster-secrets")
    seen: dict[int, bytes] = {}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            for pid in cluster.processes():
                try:
                    seen[pid] = Path(f"/proc/{pid}/cmdline").read_bytes()
                except OSError:
                    continue
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    overrides = ["--set", f"flink.options={{s3.secret-key: {secret}, streamrec.test.passphrase: {secret}-2}}"]
    try:
        job_id = jobs.submit(cluster, job_args(cfg, tmp_path) + overrides)
        time.sleep(2.0)
    finally:
        stop.set()
        sampler.join()
    assert cluster.job_status(job_id) == "RUNNING"
    assert any(b"flink_job" in c and b"--config" in c for c in seen.values())  # the job's client was seen
    for pid, cmdline in seen.items():
        assert secret.encode() not in cmdline, (pid, cmdline)
    for log in cluster.log_dir.glob("*"):
        assert secret.encode() not in log.read_bytes(), log
    assert stat.S_IMODE((cluster.conf_dir / "config.yaml").stat().st_mode) == 0o600
    assert not list((cluster.run_dir / "submit").glob("*.yaml"))  # the private copy is gone once submitted
