"""The produce command's sources: MovieLens replay order and ids."""
from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from flink_job.tools.produce import movielens_records

from tests.helpers import ML100K

SHARED_ML100K = ML100K / "u.data"


def test_movielens_replay_is_in_stable_event_time_order(tmp_path: Path) -> None:
    f = tmp_path / "u.data"
    f.write_text("1\t10\t5\t300\n2\t20\t3\t100\n3\t30\t4\t300\n4\t40\t1\t200\n")
    out = list(movielens_records(f, repeat=2))
    events = [orjson.loads(r.payload) for r, _ts in out]
    assert [e["user_id"] for e in events[:4]] == ["u2", "u4", "u1", "u3"]  # ties (300) keep the file's order
    assert [ts for _r, ts in out[:4]] == [100_000, 200_000, 300_000, 300_000]
    assert all(e["action"] == "rating" and 1 <= e["value"] <= 5 for e in events)
    assert len({e["event_id"] for e in events}) == 8  # the repeat gets fresh event ids ...
    assert out[4][1] > out[3][1]  # ... and later times
    assert out[0][0].key == b"u2"


def test_movielens_replay_rejects_a_malformed_line(tmp_path: Path) -> None:
    f = tmp_path / "u.data"
    f.write_text("1\t10\t5\n")
    with pytest.raises(ValueError, match="line 1"):
        list(movielens_records(f))




@pytest.mark.skipif(not SHARED_ML100K.exists(), reason=f"MovieLens 100K not found at {SHARED_ML100K}")
def test_ml100k_replays_all_ratings_in_time_order() -> None:
    out = list(movielens_records(SHARED_ML100K))
    assert len(out) == 100_000
    times = [ts for _r, ts in out]
    assert times == sorted(times)
