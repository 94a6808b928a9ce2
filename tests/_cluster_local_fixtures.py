"""TEMPORARY (remove before hand-over): a private broker so that developing test_cluster.py does not share
.run/test-kafka with another engineer's concurrently running test session."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.kafka import Broker

PROJECT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def kafka() -> Iterator[Broker]:
    broker = Broker(19392, 19393, PROJECT / ".run" / "cluster-dev-kafka")
    broker.start()
    yield broker
    broker.stop()
