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



def test_the_item_delta_sink_keeps_each_trainers_records_in_one_partition() -> None:
    """Receivers apply a sender's deltas in sequence order: the fixed partitioner sends each sink subtask (one per
    trainer) to one partition, where a key hash would spread them over the topic's partitions."""
    ddl = sql.sink_ddl(JobConfig.load(), "item_delta_sink", "deltas", "BYTES", "fixed")
    assert "'sink.partitioner' = 'fixed'" in ddl
    assert "sink.partitioner" not in sql.sink_ddl(JobConfig.load(), "t", "topic-a")
