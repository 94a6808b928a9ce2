"""The cleaner under a flood of new users: at most max_users, the least recent evicted."""
from __future__ import annotations
from flink_job.stages.clean import Cleaner
from flink_job.config import CleanConfig
from flink_job.stages.parse import parse_lines
from tests.helpers import NOW, flood_lines




def test_the_cleaner_holds_at_most_max_users_and_evicts_the_least_recent() -> None:
    cleaner = Cleaner(CleanConfig(), max_users=10)
    for s in range(0, 100, 5):
        batch, _ = parse_lines(flood_lines(5, s), now_ms=NOW)
        cleaner.apply(batch)
    users = cleaner.users
    assert len(users) == 10 and len(users.ids) <= 10 and cleaner.counts["users_evicted"] == 90
    assert sorted(users) == sorted(f"flood{k}" for k in range(90, 100))  # the newest events stay
    assert cleaner.recent_items("flood99") == ["i4"] and cleaner.recent_items("flood0") == []


def test_a_user_met_again_is_not_evicted_by_the_batch_that_meets_it() -> None:
    cleaner = Cleaner(CleanConfig(), max_users=3)
    batch, _ = parse_lines(flood_lines(3), now_ms=NOW)
    cleaner.apply(batch)
    again, _ = parse_lines([flood_lines(1, 0)[0].replace('"e0"', '"x0"'), *flood_lines(1, 3)], now_ms=NOW)
    cleaner.apply(again)  # flood0 (oldest event time) is in the batch: flood1 goes instead
    assert "flood0" in cleaner.users and "flood1" not in cleaner.users and len(cleaner.users) == 3

