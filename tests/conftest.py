"""Shared fixtures: one real Kafka broker for the session, fresh topics per test."""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from deploy.kafka import Broker
from flink_job.config import JobConfig
from tests.helpers import fresh_topics, locked_broker

PROJECT = Path(__file__).resolve().parent.parent
TEST_PORT = 19292


@functools.cache
def _job_jars() -> dict[str, str]:
    from deploy.jars import connector_jar, udf_jar
    from flink_job.flink.job import CONNECTOR_JAR_ENV, UDF_JAR_ENV

    return {CONNECTOR_JAR_ENV: str(connector_jar()), UDF_JAR_ENV: str(udf_jar())}


@pytest.fixture
def job_jars(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The job's jars in the environment, where a job started in this process finds them, as from every starter
    outside flink_job (which never imports deploy)."""
    jars = _job_jars()
    for name, value in jars.items():
        monkeypatch.setenv(name, value)
    return jars


@pytest.fixture(autouse=True)
def _integration_jars(request: pytest.FixtureRequest) -> None:
    """Integration tests start jobs, so they get the jars; unit tests that build a plan ask for ``job_jars``."""
    if request.node.get_closest_marker("integration") is not None:
        request.getfixturevalue("job_jars")


@pytest.fixture(scope="session")
def kafka() -> Iterator[Broker]:
    """A KRaft broker on 127.0.0.1:19292 (or the next free slot, when another test session runs) with its data in
    .run/test-kafka-<port>, removed before it starts."""
    with locked_broker(TEST_PORT, 16, "test-kafka") as broker:
        yield broker


@pytest.fixture
def topics(kafka: Broker, tmp_path: Path) -> Callable[..., JobConfig]:
    """``topics(prefix, input_partitions=2, overrides=[...])``: fresh topics and a JobConfig pointing at them."""

    def make(prefix: str, input_partitions: int = 2, overrides: list[str] | None = None) -> JobConfig:
        return fresh_topics(kafka.bootstrap, prefix, tmp_path, overrides, input_partitions)

    return make
