"""The ML-100K benchmark through the job, its live-traffic mode: the events arrive at ``--rate`` while the job runs."""
from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.ml100k_job import _run_job

pytestmark = pytest.mark.integration


def test_events_sent_at_a_rate_while_the_job_runs_are_all_evaluated_as_they_arrive(kafka, tmp_path: Path) -> None:
    data = tmp_path / "u.data"
    data.write_text("".join(f"{1 + n % 40}\t{1 + n % 70}\t{1 + n % 5}\t{880000000 + n}\n" for n in range(400)))
    summary, seconds = _run_job(kafka, data, 64, "", [], rate=200.0)
    assert summary["rated"] == 400  # every event scored before it trained, none lost
    # 400 events at 200 a second reach the job over 2 s; a backlog of them is trained in a fraction of that.
    assert seconds >= 1.5, seconds
