"""A half-star rating stream (0.5-5) through the real broker and the job on the mini-cluster keeps its half stars."""
from __future__ import annotations

from pathlib import Path

import pytest

from flink_job.flink.runner import LocalJob
from flink_job.kafka.produce import send
from flink_job.tools.produce import movielens_records

pytestmark = pytest.mark.integration

HALF_STARS = (0.5, 1.5, 2.5, 3.5, 4.5, 5.0, 3.0)


def test_a_half_star_stream_keeps_its_half_stars_end_to_end(topics, tmp_path: Path) -> None:
    n = 704  # 11 full batches: nothing waits on batch.max_wait_ms
    ratings = [HALF_STARS[j % len(HALF_STARS)] for j in range(n)]
    lines = [f"{j % 37}\t{j % 53}\t{r}\t{1_700_000_000 + j}" for j, r in enumerate(ratings)]
    (tmp_path / "u.data").write_text("\n".join(lines) + "\n")
    cfg = topics("halfstar", overrides=["batch.size=64", "model.rating_min=0.5", "eval.user_sample=1.0"])
    sent = send(movielens_records(tmp_path / "u.data", rating_min=cfg.model.rating_min), cfg.kafka.bootstrap,
                cfg.kafka.input_topic)
    assert sent == n

    with LocalJob(cfg) as job:
        last = job.wait_idle(idle_s=4.0, timeout_s=300, min_received=n).last
    assert (last["received"], last["trained"], last["dead_lettered"]) == (n, n, 0)  # 0.5 is in range, none rejected
    # The model's rating mean is the exact mean of the half stars (truncation or rounding would move it).
    assert last["rating_mean"] == pytest.approx(sum(ratings) / n, abs=1e-9)
    q = last["prequential"]
    assert q["rated"] == n and q["positives"] == sum(r >= 4.0 for r in ratings)
