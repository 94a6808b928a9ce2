"""The SQL the job runs: every sink's delivery settings."""
from __future__ import annotations
import pytest
from flink_job.flink import sql
from flink_job.config import JobConfig


def test_delivery_mode_sets_transactions_on_every_sink() -> None:
    at_least = sql.sink_ddl(JobConfig.load(), "t", "topic-a")
    assert "'sink.delivery-guarantee' = 'at-least-once'" in at_least and "transactional" not in at_least
    cfg = JobConfig.load(overrides=["publish.delivery=exactly_once", "publish.transaction_timeout_ms=60000"])
    exactly = sql.sink_ddl(cfg, "t", "topic-a")
    assert "'sink.delivery-guarantee' = 'exactly-once'" in exactly
    assert "'properties.transaction.timeout.ms' = '60000'" in exactly
    assert "'sink.transactional-id-prefix' = 'streamrec-topic-a'" in exactly
    with pytest.raises(ValueError, match="publish.delivery"):
        JobConfig.load(overrides=["publish.delivery=maybe"])

