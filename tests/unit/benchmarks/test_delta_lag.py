"""The delta-lag benchmark replays a stream through the job's training stages with delayed deltas."""
from __future__ import annotations

import pytest

from benchmarks import delta_lag
from tests.helpers import ML100K

needs_ml100k = pytest.mark.skipif(not (ML100K / "u.data").is_file(), reason=f"MovieLens 100K is not at {ML100K}")


@needs_ml100k
def test_every_event_is_trained_and_the_lag_costs_quality(capsys: pytest.CaptureFixture[str]) -> None:
    """Two trainers over the first 20,000 events, deltas at once and two seconds (20,000 events) late: everything
    trains either way, and the replicas that learn the other trainer's item updates only at the end predict worse."""
    delta_lag.main(["--data", str(ML100K), "--events", "20000", "--trainers", "2", "--batch-size", "1024",
                    "--lag-ms", "0,2000", "--rate", "10000"])
    rows = [line.strip("|").split("|") for line in capsys.readouterr().out.splitlines()[2:]]
    assert len(rows) == 2
    for _, _, _, _, rmse, hr, trained, batches, _ in rows:
        assert int(trained.replace(",", "")) == 20000  # nothing is left pending or lost
        assert int(batches.replace(",", "")) >= 20000 // 1024
        assert 0.5 < float(rmse) < 2.0 and 0 <= float(hr) <= 1
    assert float(rows[1][4]) > float(rows[0][4])


@needs_ml100k
def test_the_stream_is_the_job_input_in_time_order() -> None:
    lines, users = delta_lag.stream(ML100K, 50)
    assert len(lines) == len(users) == 50 and all(line.startswith(f"0,{n},") for n, line in enumerate(lines))


def test_the_synthetic_stream_is_job_input_with_its_users() -> None:
    lines, users = delta_lag.synthetic_stream(300)
    assert len(lines) == len(users) == 300 and all(line.startswith(f"0,{n},{{") for n, line in enumerate(lines))
    assert all(f'"{u}"' in line for u, line in zip(users, lines, strict=True))  # each line is its user's event
    assert len(set(users)) > 50  # many users, as the generator draws them
