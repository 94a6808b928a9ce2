"""Shared fixtures: one real Kafka broker for the session, fresh topics per test."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from deploy.kafka import Broker
from flink_job.config import JobConfig
from tests.helpers import fresh_topics

PROJECT = Path(__file__).resolve().parent.parent
TEST_PORT = 19292


@pytest.fixture(scope="session")
def kafka() -> Iterator[Broker]:
    """A KRaft broker on 127.0.0.1:19292 with its data in .run/test-kafka, removed before it starts.

    A second test session running at the same time (another checkout's CI, a developer's run) gets the next free
    port pair and its own data folder instead of stopping this one's broker: each session holds a lock on the
    folder it uses, and a broker left running in an unlocked folder is a leftover of a dead session.
    """
    import fcntl
    import shutil

    for slot in range(16):
        port = TEST_PORT + 10 * slot
        run_dir = PROJECT / ".run" / ("test-kafka" if slot == 0 else f"test-kafka-{port}")
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = open(run_dir.with_name(run_dir.name + ".lock"), "w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            continue  # a live session owns this slot
        broker = Broker(port, port + 1, run_dir)
        broker.stop()  # a leftover of a session that died
        shutil.rmtree(run_dir, ignore_errors=True)
        try:
            broker.start()
        except RuntimeError:
            lock.close()
            continue  # the port is taken by something else
        yield broker
        broker.stop()
        lock.close()
        return
    raise RuntimeError("tests: no free slot for a test Kafka broker (16 sessions running?)")


@pytest.fixture
def topics(kafka: Broker, tmp_path: Path) -> Callable[..., JobConfig]:
    """``topics(prefix, input_partitions=2, overrides=[...])``: fresh topics and a JobConfig pointing at them."""

    def make(prefix: str, input_partitions: int = 2, overrides: list[str] | None = None) -> JobConfig:
        return fresh_topics(kafka.bootstrap, prefix, tmp_path, overrides, input_partitions)

    return make
