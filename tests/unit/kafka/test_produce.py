"""The producer's pacing: by rate and by event-time speed."""
from __future__ import annotations
import time
from flink_job.kafka.produce import Pacing, _pace


def test_pacing_by_rate_and_by_speed() -> None:
    start = time.monotonic()
    for n in range(21):
        _pace(Pacing(rate=100.0), n, 0, start)
    assert 0.18 < time.monotonic() - start < 0.5  # 20 intervals of 10 ms
    start = time.monotonic()
    _pace(Pacing(speed=1000.0), 0, 150_000, start)  # 150 s of event time at 1000x
    assert 0.13 < time.monotonic() - start < 0.4

