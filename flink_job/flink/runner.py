"""Runs the job on a local mini-cluster from Python and follows its progress through the stats topic.

A streaming job never finishes by itself, and Flink drops pending processing-time timers when a bounded source
ends, so bounded runs (the run command, tests, benchmarks) start the unbounded job, wait until the stats show
that it has gone idle after consuming its input, and cancel it.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Self
from urllib.parse import urlparse

import orjson
import yaml

from flink_job.config import PROJECT_ROOT, JobConfig
from flink_job.secrets import open_private_log, write_private
from flink_job.kafka.topics import Follower
from flink_job.stages.train_output import combine_latest

log = logging.getLogger(__name__)
ENDED = ("FAILED", "CANCELED", "FINISHED")  # job states after which it reads no more input


@dataclass
class RunResult:
    submitted_at: float  # wall clock, seconds
    stats: list[dict[str, Any]] = field(default_factory=list)

    @property
    def last(self) -> dict[str, Any]:
        """The job's cumulative figures: the last record, or of user-sharded trainers each one's last, combined."""
        return combine_latest(self.stats)

    @property
    def first_chunk_s(self) -> float:
        """When the trainer received its first chunk (wall clock, seconds)."""
        return min(s["first_chunk_ms"] for s in self.stats) / 1000 if self.stats else float("nan")

    @property
    def last_batch_s(self) -> float:
        """When the output last changed: the last batch or publish (wall clock, seconds)."""
        return max(s["at_ms"] for s in self.stats) / 1000 if self.stats else float("nan")


class LocalJob:
    """``with LocalJob(cfg) as job: job.wait_idle(...)``: the job runs in a mini-cluster until the block ends.

    ``scratch_checkpoints``: checkpoints go to a directory of their own that is removed when the block ends, for
    runs that will never be restarted (benchmarks, the demo): a cancelled job keeps its last checkpoints, which
    for a benchmark's de-duplication state are hundreds of MB a run.
    """

    def __init__(self, cfg: JobConfig, scratch_checkpoints: bool = False) -> None:
        self.scratch: Path | None = None
        if scratch_checkpoints:
            root = PROJECT_ROOT / ".run"
            root.mkdir(parents=True, exist_ok=True)
            self.scratch = Path(tempfile.mkdtemp(prefix="scratch-checkpoints-", dir=root))
            cfg = replace(cfg, flink=replace(cfg.flink, checkpoint_dir=self.scratch.as_uri()))
        self.cfg = cfg
        self.client: Any = None
        self.result = RunResult(time.time())
        self.follower: Follower | None = None

    def __enter__(self) -> Self:
        # A job restored from a checkpoint follows only its own stats, not those of the run before it.
        self.follower = Follower(self.cfg.kafka.bootstrap, self.cfg.kafka.stats_topic,
                                 security=self.cfg.kafka.librdkafka_properties(),
                                 from_end=bool(self.cfg.flink.restore_from))
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()
        if self.follower:
            self.follower.close()
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)

    def start(self) -> None:
        from flink_job.flink.job import create_env

        env = create_env(self.cfg)
        self.result.submitted_at = time.time()  # start-up counts from submission, not from building the plan
        self.client = env.execute_async(self.cfg.flink.job_name)
        log.info("runner: job %s submitted to the local mini-cluster", self.job_id)

    def cancel(self) -> None:
        if self.client is not None:
            try:
                self.client.cancel().result()
            except Exception as ex:  # noqa: BLE001 - the job may have failed already; that is reported elsewhere
                log.info("runner: cancel: %s", ex)
            self.client = None

    @property
    def job_id(self) -> str:
        return str(self.client.get_job_id()) if self.client else ""

    def status(self) -> str:
        """The job's state by name (RUNNING, FAILED, ...): ``str`` of PyFlink's ``JobStatus`` is "JobStatus.FAILED"."""
        return str(self.client.get_job_status().result().name) if self.client else "CANCELED"

    def diagnosis(self) -> str:
        """What a timeout message should add about the job itself: here nothing, the job's log is this process's."""
        return ""

    def poll_stats(self, max_wait_s: float = 0.5) -> list[dict[str, Any]]:
        assert self.follower is not None
        new = [orjson.loads(v) for _k, v, _p, _o in self.follower.poll(max_wait_s)]
        self.result.stats.extend(new)
        return new

    def wait_running(self, timeout_s: float = 120.0, settle_s: float = 5.0) -> None:
        """Until the job runs, then ``settle_s`` more (operators deployed, the Python worker up), so that input sent
        at a rate from then on meets a running job; raises if the job ends or is not running after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while (status := self.status()) != "RUNNING":
            if status in ENDED or time.monotonic() > deadline:
                raise RuntimeError(f"runner: job {status} instead of running after {timeout_s:.0f}s{self.diagnosis()}")
            time.sleep(0.5)
        time.sleep(settle_s)

    def wait_idle(
        self, idle_s: float = 5.0, timeout_s: float = 600.0, min_received: int = 1, progress: Any = None
    ) -> RunResult:
        """Waits until at least ``min_received`` records reached the trainer and no batch came for ``idle_s``."""
        deadline = time.monotonic() + timeout_s
        last_new = time.monotonic()
        while time.monotonic() < deadline:
            new = self.poll_stats(0.5)
            if new:
                last_new = time.monotonic()
                if progress is not None:
                    progress(self.result.last)
            received = self.result.last.get("received", 0)
            if received >= min_received and time.monotonic() - last_new >= idle_s:
                return self.result
            status = self.status()
            if status in ENDED:
                raise RuntimeError(f"runner: job ended as {status} before its input was consumed")
        raise TimeoutError(
            f"runner: job not idle after {timeout_s}s; last stats: {self.result.last or 'none yet'}{self.diagnosis()}"
        )


class JobProcess(LocalJob):
    """The job in its own process (``python -m flink_job``) and mini-cluster; leaving the block kills the process
    group, JVM included, the way a crash would: nothing is cancelled or cleaned up, checkpoints stay.

    A process of its own also gives the SQL operators the same uids as the run before: the planner numbers its
    nodes from a counter that lives as long as the JVM, so a second job built in one process could not be matched
    to the first one's checkpoint.
    """

    def __init__(self, cfg: JobConfig, log_path: Path) -> None:
        super().__init__(cfg)
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        # The settings travel in a file only its owner reads, never on the command line: flink.options may hold
        # literal secrets (Kafka secrets are ${env:..}/${file:..} references, resolved in the job process).
        config = self.log_path.with_suffix(".yaml")
        write_private(config, yaml.safe_dump(self.cfg.to_dict()))
        self.result.submitted_at = time.time()  # here start-up includes the process's JVM and planning
        with os.fdopen(open_private_log(self.log_path), "ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "flink_job", "--config", str(config)], stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, env=_client_environment(),
            )
        log.info("runner: job process %d started, log in %s", self.process.pid, self.log_path)

    def cancel(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process = None

    @property
    def job_id(self) -> str:
        return "*"

    def diagnosis(self, lines: int = 60) -> str:
        """The job log's errors and its last lines: a job that never reports is otherwise a bare timeout."""
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError as ex:
            return f"; no job log: {ex}"
        errors = [ln for ln in text if "Exception" in ln or "Error" in ln or "FATAL" in ln][-20:]
        return (f"; job log {self.log_path} ({len(text)} lines), errors:\n" + "\n".join(errors)
                + "\nlast lines:\n" + "\n".join(text[-lines:]))

    def status(self) -> str:
        if self.process is None:
            return "CANCELED"
        return "RUNNING" if self.process.poll() is None else "FAILED"


# Set in this process once a job here has run Python functions in it (PyFlink's loopback worker); a job process
# inheriting them would take itself for a Python worker and refuse to start its own JVM.
_WORKER_VARIABLES = (
    "PYFLINK_GATEWAY_DISABLED", "PYTHON_LOOPBACK_SERVER_ADDRESS", "WORKER_ID", "PIPELINE_OPTIONS",
    "SEMI_PERSISTENT_DIRECTORY", "LOGGING_API_SERVICE_DESCRIPTOR", "CONTROL_API_SERVICE_DESCRIPTOR",
)
# Also set by the loopback worker, which takes the TaskManager's environment for its own: a job process inheriting
# FLINK_CONF_DIR read the mini-cluster's conf dir as a cluster's, and PYTHONPATH, python and the rest mislead it too.
# Kept when this process had them before it ran anything.
_LOOPBACK_VARIABLES = (
    "FLINK_CONF_DIR", "FLINK_HOME", "FLINK_LIB_DIR", "FLINK_OPT_DIR", "FLINK_PLUGINS_DIR", "FLINK_BIN_DIR",
    "PYTHONPATH", "python", "BOOT_LOG_DIR", "_PYFLINK_CONN_INFO_PATH", "_PYTHON_WORKER_MEMORY_LIMIT",
    "_PYTHON_WORKING_DIR", "TABLE_LOCAL_TIME_ZONE",
)
_INITIAL_VARIABLES = frozenset(os.environ)


def _client_environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if k not in _WORKER_VARIABLES and (k not in _LOOPBACK_VARIABLES or k in _INITIAL_VARIABLES)}


def latest_checkpoint(checkpoint_dir: str, job_id: str = "*") -> str | None:
    """The newest completed checkpoint (``chk-N`` with its ``_metadata``) of a job under a local checkpoint directory,
    as a URI to restart from (``flink.restore_from``); None if there is none yet."""
    root = Path(urlparse(checkpoint_dir).path) if "://" in checkpoint_dir or checkpoint_dir.startswith("file:") \
        else Path(checkpoint_dir)
    done = [(m.stat().st_mtime, m.parent) for m in root.glob(f"{job_id}/chk-*/_metadata")]
    return max(done)[1].as_uri() if done else None
