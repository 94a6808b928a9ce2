"""When thread mode writes the whole stage: the interval, lengthened so that writing takes a bounded share."""
from __future__ import annotations

import pytest

from flink_job.config import JobConfig
from flink_job.flink.stage_log import SnapshotSchedule


def test_a_slow_snapshot_waits_in_proportion_and_a_fast_one_keeps_the_interval() -> None:
    s = SnapshotSchedule(2_000, 0.05)
    assert s.due(123)  # the first call of a run writes one
    s.taken(0, 500.0)  # 0.5 s to write: the next waits 10 s, so writing takes 5% of the time
    assert not s.due(9_999) and s.due(10_000)
    s.taken(10_000, 20.0)  # the state shrank: back to the interval
    assert not s.due(11_999) and s.due(12_000)


def test_share_zero_is_the_interval_alone() -> None:
    s = SnapshotSchedule(2_000, 0.0)
    s.taken(0, 60_000.0)
    assert s.due(2_000)


def test_the_share_is_validated() -> None:
    assert JobConfig.load().flink.state_snapshot_share == 0.05
    with pytest.raises(ValueError, match="state_snapshot_share"):
        JobConfig.load(overrides=["flink.state_snapshot_share=1.5"])
