"""The item-exchange benchmark runs at a small size and reports records within the job's bound."""
from __future__ import annotations

import sys

import pytest

from benchmarks import item_exchange
from flink_job.config import JobConfig


def test_the_exchange_benchmark_reports_each_timed_batch(monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "argv", ["item_exchange", "--items", "3000", "--users", "500", "--batch", "2048",
                                      "--warmup", "1", "--batches", "2"])
    item_exchange.main()
    rows = [line.strip("|").split("|") for line in capsys.readouterr().out.splitlines()[2:]]
    assert len(rows) == 2
    limit = JobConfig.load().kafka.item_delta_record_bytes
    for moved, held, size, records, *ms in rows:
        n, h, total, k = (int(x.replace(",", "")) for x in (moved, held, size, records))
        assert n > 2048  # sampled negatives move more item rows than the batch has events
        assert h >= 0
        assert k in (-(-total // limit), -(-total // limit) + 1)  # parts filled close to the bound
        assert all(float(x) >= 0 for x in ms)
