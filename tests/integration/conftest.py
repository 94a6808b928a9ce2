"""Integration tests: a real Kafka broker and real Flink. Every test here is marked ``integration``."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from deploy.cluster import SessionCluster
from tests.helpers import cancel_if_running, submitted

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.integration)


class Jobs:
    """The jobs a test submitted to a session cluster; all cancelled when the test ends, passed or failed, newest
    first. (A job on a local mini-cluster is ``with LocalJob(cfg) as job:``, which cancels it when the block ends.)"""

    def __init__(self) -> None:
        self._started: list[Callable[[], None]] = []

    def submit(self, cluster: SessionCluster, job_args: list[str], savepoint: str | None = None,
               **submit: Any) -> str:
        """``flink run`` on ``cluster``, waiting until the job runs; returns its id. ``submit``: more arguments of
        ``SessionCluster.submit`` (another job module, say)."""
        job_id = submitted(cluster, job_args, savepoint=savepoint, **submit)
        self._started.append(lambda: cancel_if_running(cluster, job_id))
        return job_id

    def stop_all(self) -> None:
        while self._started:
            self._started.pop()()


@pytest.fixture
def jobs() -> Iterator[Jobs]:
    """The one way a test submits a job and has it torn down: ``jobs.submit(cluster, args)``."""
    started = Jobs()
    try:
        yield started
    finally:
        started.stop_all()
