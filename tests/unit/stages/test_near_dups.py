"""Near-duplicate memory: capped, keeping the recent keys."""
from __future__ import annotations
from flink_job.stages.near_dups import NearDuplicates
from flink_job.stages.parse import parse_lines
from tests.helpers import NOW, flood_lines




def test_near_duplicate_memory_is_capped_and_keeps_the_recent_keys() -> None:
    nd = NearDuplicates(window_ms=10**9, max_keys=5)
    batch, _ = parse_lines(flood_lines(100), now_ms=NOW)
    kept, dropped = nd.filter(batch)
    assert len(nd.last) == 5 and dropped == 0 and len(kept) == 100
    again, _ = parse_lines([line.replace('"event_id":"e', '"event_id":"x') for line in flood_lines(100)], now_ms=NOW)
    kept, dropped = nd.filter(again)
    assert dropped == 5  # the last five keys are remembered, the rest were forgotten

