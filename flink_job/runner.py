"""Runs the job on a local mini-cluster from Python and follows its progress through the stats topic.

A streaming job never finishes by itself, and Flink drops pending processing-time timers when a bounded source
ends, so bounded runs (the run command, tests, benchmarks) start the unbounded job, wait until the stats show
that it has gone idle after consuming its input, and cancel it.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from flink_job.config import JobConfig
from flink_job.topics import Follower

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    submitted_at: float  # wall clock, seconds
    stats: list[dict[str, Any]] = field(default_factory=list)

    @property
    def last(self) -> dict[str, Any]:
        return self.stats[-1] if self.stats else {}

    @property
    def first_chunk_s(self) -> float:
        """When the trainer received its first chunk (wall clock, seconds)."""
        return min(s["first_chunk_ms"] for s in self.stats) / 1000 if self.stats else float("nan")

    @property
    def last_batch_s(self) -> float:
        """When the output last changed: the last batch or publish (wall clock, seconds)."""
        return max(s["at_ms"] for s in self.stats) / 1000 if self.stats else float("nan")


class LocalJob:
    """``with LocalJob(cfg) as job: job.wait_idle(...)``: the job runs in a mini-cluster until the block ends."""

    def __init__(self, cfg: JobConfig) -> None:
        self.cfg = cfg
        self.client: Any = None
        self.result = RunResult(time.time())
        self.follower: Follower | None = None

    def __enter__(self) -> LocalJob:
        from flink_job.job import create_env

        self.follower = Follower(self.cfg.kafka.bootstrap, self.cfg.kafka.stats_topic)
        env = create_env(self.cfg)
        self.result.submitted_at = time.time()
        self.client = env.execute_async(self.cfg.flink.job_name)
        log.info("runner: job %s submitted to the local mini-cluster", self.client.get_job_id())
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()
        if self.follower:
            self.follower.close()

    def cancel(self) -> None:
        if self.client is not None:
            try:
                self.client.cancel().result()
            except Exception as ex:  # noqa: BLE001 - the job may have failed already; that is reported elsewhere
                log.info("runner: cancel: %s", ex)
            self.client = None

    def status(self) -> str:
        return str(self.client.get_job_status().result()) if self.client else "CANCELED"

    def poll_stats(self, max_wait_s: float = 0.5) -> list[dict[str, Any]]:
        assert self.follower is not None
        new = [orjson.loads(v) for _k, v, _p, _o in self.follower.poll(max_wait_s)]
        self.result.stats.extend(new)
        return new

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
            if status in ("FAILED", "CANCELED", "FINISHED"):
                raise RuntimeError(f"runner: job ended as {status} before its input was consumed")
        raise TimeoutError(
            f"runner: job not idle after {timeout_s}s; last stats: {self.result.last or 'none yet'}"
        )
