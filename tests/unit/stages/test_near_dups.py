"""Near-duplicate memory: capped, keeping the recent keys."""
from __future__ import annotations
from flink_job.stages.near_dups import NearDuplicates
from flink_job.stages.parse import parse_lines


NOW = 1_700_000_000_000


def _flood(n: int, start: int = 0, items: int = 5) -> list[str]:
    """``n`` events, each of a new user, on a few items, one second apart in event time."""
    return [
        f'0,{k},{{"event_id":"e{k}","user_id":"flood{k}","item_id":"i{k % items}","action":"click",'
        f'"ts":{NOW - 10**7 + 1000 * k}}}'
        for k in range(start, start + n)
    ]


def test_near_duplicate_memory_is_capped_and_keeps_the_recent_keys() -> None:
    nd = NearDuplicates(window_ms=10**9, max_keys=5)
    batch, _ = parse_lines(_flood(100), now_ms=NOW)
    kept, dropped = nd.filter(batch)
    assert len(nd.last) == 5 and dropped == 0 and len(kept) == 100
    again, _ = parse_lines([line.replace('"event_id":"e', '"event_id":"x') for line in _flood(100)], now_ms=NOW)
    kept, dropped = nd.filter(again)
    assert dropped == 5  # the last five keys are remembered, the rest were forgotten

