"""Checkpoint storage that fails for a while does not fail the job (issue 15, item 8): the real job on the local
mini-cluster and the real broker; checkpoints observed over the mini-cluster's REST API."""
from __future__ import annotations

import json
import socket
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest

from flink_job.config import JobConfig
from flink_job.tools.generate import SyntheticConfig
from flink_job.kafka.produce import send
from flink_job.tools.produce import synthetic_timed
from flink_job.flink.runner import LocalJob

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Rest:
    """Flink's REST API of the local mini-cluster (its port fixed by flink.options)."""

    def __init__(self, port: int, job_id: str) -> None:
        self.base = f"http://127.0.0.1:{port}/jobs/{job_id}"

    def get(self, path: str = "") -> Any:
        with urllib.request.urlopen(self.base + path, timeout=10) as resp:
            return json.loads(resp.read())

    def checkpoints(self) -> dict[str, int]:
        """``completed``, ``failed``, ``in_progress``, ``restored`` ..."""
        counts: dict[str, int] = self.get("/checkpoints")["counts"]
        return counts

    def restarts(self) -> int:
        metric = self.get("/metrics?get=numRestarts")
        return int(metric[0]["value"]) if metric else 0

    def state(self) -> str:
        return str(self.get()["state"])


def _wait(job: LocalJob, what: str, done: Callable[[], bool], timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() > deadline:
            pytest.fail(f"not {what} within {timeout_s}s; last stats {job.result.last}")
        job.poll_stats(0.5)


def test_unwritable_checkpoint_storage_neither_fails_nor_restarts_the_job(
    topics: Callable[..., JobConfig], tmp_path: Path
) -> None:
    """The job's checkpoint directory is replaced by a regular file for a while (as root, permissions would not
    stop the writes): checkpoints fail with ENOTDIR, the job stays RUNNING without a restart and keeps training,
    and once the directory is back, checkpoints complete again."""
    port = _free_port()
    cfg = topics("ckpt-storage", overrides=[
        "batch.size=64", "flink.checkpoint_interval_ms=1000",
        f"flink.options={{rest.bind-port: '{port}', rest.port: '{port}'}}",
    ])
    syn = SyntheticConfig(n_users=200, n_items=100, n_events=3_000, seed=71)
    records = list(synthetic_timed(syn))
    phases = [records[:1_000], records[1_000:2_000], records[2_000:]]

    def trained() -> int:
        return int(job.result.last.get("trained", 0))

    with LocalJob(cfg) as job:
        rest = Rest(port, job.job_id)
        job_dir = Path(urlparse(cfg.flink.checkpoint_dir).path) / job.job_id
        send(phases[0], cfg.kafka.bootstrap, cfg.kafka.input_topic)
        _wait(job, "trained the first 1,000 events after a checkpoint",
              lambda: trained() >= 1_000 and rest.checkpoints()["completed"] >= 1)

        aside = job_dir.with_name(job_dir.name + ".aside")
        job_dir.rename(aside)
        job_dir.write_text("the checkpoint storage is unavailable\n")
        try:
            failed_before = rest.checkpoints()["failed"]
            send(phases[1], cfg.kafka.bootstrap, cfg.kafka.input_topic)
            _wait(job, "trained the second 1,000 events while three checkpoints failed",
                  lambda: trained() >= 2_000 and rest.checkpoints()["failed"] >= failed_before + 3)
            assert (rest.state(), rest.restarts()) == ("RUNNING", 0)
            failed = [c for c in rest.get("/checkpoints")["history"] if c["status"] == "FAILED"]
            assert failed and all(c["failure_message"] for c in failed), failed
            print("failed checkpoint:", failed[0]["failure_message"][:300])
            completed_while_broken = rest.checkpoints()["completed"]
        finally:
            job_dir.unlink()
            aside.rename(job_dir)

        send(phases[2], cfg.kafka.bootstrap, cfg.kafka.input_topic)
        _wait(job, "trained all 3,000 events and completed two checkpoints after the storage returned",
              lambda: trained() >= 3_000 and rest.checkpoints()["completed"] >= completed_while_broken + 2)
        assert (rest.state(), rest.restarts()) == ("RUNNING", 0)
        # Checkpoints keep coming every second and Flink retains one, so the checkpoint REST calls latest may be
        # deleted by the time we look: what must be on disk is that one or a newer one, with its metadata.
        latest = rest.get("/checkpoints")["latest"]["completed"]
        on_disk = [int(m.parent.name.removeprefix("chk-")) for m in job_dir.glob("chk-*/_metadata")]
        assert Path(urlparse(latest["external_path"]).path).parent == job_dir
        assert on_disk and max(on_disk) >= latest["id"], (on_disk, latest["id"])
        assert trained() == syn.n_events  # nothing was replayed: no restore happened
