"""MovieLens files: ratings read as numbers on a configured scale, genres as categories, in both readers."""
from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from benchmarks.ml100k import load_stream
from flink_job.tools.movielens import item_genres, read_ratings
from flink_job.tools.produce import movielens_records

HALF_STARS = "1\t10\t3.5\t300\n2\t20\t0.5\t100\n3\t10\t4.5\t200\n1\t30\t5\t300\n"
# u.item: id|title|date|video date|url|19 genre flags
ITEM = "{id}|Movie {id}|01-Jan-1995||http://x|" + "|".join(["0"] * 19)


def _folder(tmp_path: Path, ratings: str = HALF_STARS) -> Path:
    (tmp_path / "u.data").write_text(ratings)
    flags = {"10": (3, 5), "20": ()}  # Animation|Comedy; none flagged: unknown
    lines = []
    for item, on in flags.items():
        parts = ITEM.format(id=item).split("|")
        for g in on:
            parts[5 + g] = "1"
        lines.append("|".join(parts))
    (tmp_path / "u.item").write_text("\n".join(lines) + "\n", encoding="latin-1")
    return tmp_path


def test_the_benchmark_loader_keeps_half_stars(tmp_path: Path) -> None:
    s = load_stream(_folder(tmp_path), rating_min=0.5)
    assert s.ratings.tolist() == [0.5, 4.5, 3.5, 5.0]  # not truncated to 0, 4, 3
    assert s.users == ["2", "3", "1", "1"] and s.times.tolist() == [100, 200, 300, 300]
    assert s.positive.tolist() == [False, True, False, True]


def test_a_rating_outside_the_scale_fails_naming_the_line(tmp_path: Path) -> None:
    _folder(tmp_path)
    with pytest.raises(ValueError, match=r"line 2 .*rating 0.5 outside the scale \[1.0, 5.0\]"):
        load_stream(tmp_path)  # the default 1-5 scale has no half star below 1
    (tmp_path / "u.data").write_text("1\t10\tfour\t300\n")
    with pytest.raises(ValueError, match="line 1"):
        read_ratings(tmp_path, 0.5, 5.0)


def test_the_producer_sends_half_stars_and_genres(tmp_path: Path) -> None:
    events = [orjson.loads(r.payload) for r, _ts in movielens_records(_folder(tmp_path) / "u.data", rating_min=0.5)]
    assert [e["value"] for e in events] == [0.5, 4.5, 3.5, 5.0]
    assert [e.get("category") for e in events] == ["unknown", "Animation|Comedy", "Animation|Comedy", None]


def test_genres_of_the_shared_ml100k(tmp_path: Path) -> None:
    from tests.helpers import ML100K

    if not (ML100K / "u.item").is_file():
        pytest.skip(f"MovieLens 100K is not at {ML100K}")
    genres = item_genres(ML100K)
    assert len(genres) == 1682 and genres["1"] == "Animation|Children's|Comedy"
