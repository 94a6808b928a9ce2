"""MovieLens files as the producer and the benchmarks read them: ratings as numbers (half stars stay half stars) and
each movie's genres as one category string.

``u.data`` lines are ``user item rating unix_seconds``, tab-separated (the 100K layout); the rating may be any number
(3.5), checked against the configured scale. ``u.item`` lines are ``|``-separated with the 19 genre flags last, in
the order of ``u.genre``; a movie's category is its genres joined by ``|`` in that order ("Animation|Comedy").

>>> import tempfile
>>> d = Path(tempfile.mkdtemp())
>>> _ = (d / "u.data").write_text("1\\t10\\t3.5\\t300\\n2\\t20\\t0.5\\t100\\n")
>>> [(r.user, r.item, r.rating, r.ts) for r in read_ratings(d, 0.5, 5.0)]
[('2', '20', 0.5, 100), ('1', '10', 3.5, 300)]
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
          "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western")


@dataclass(frozen=True)
class Rating:
    user: str
    item: str
    rating: float
    ts: int  # unix seconds
    line: int  # 0-based line number in the file (ties in time keep this order)


def ratings_file(path: str | Path) -> Path:
    """``path`` itself, or its ``u.data`` when it is a folder."""
    p = Path(path)
    return p / "u.data" if p.is_dir() else p


def read_ratings(path: str | Path, rating_min: float = 1.0, rating_max: float = 5.0) -> list[Rating]:
    """The ratings of ``u.data`` (``path`` or its folder) stable-sorted by time; a line that is not four fields, a
    rating that is not a number in ``[rating_min, rating_max]`` or a time that is not an integer raises
    ``ValueError`` naming the file and the line."""
    p = ratings_file(path)
    if not p.is_file():
        raise FileNotFoundError(f"movielens: no ratings file at {p}")
    rows = []
    for n, line in enumerate(p.read_text().splitlines()):
        parts = line.split("\t")
        try:
            if len(parts) != 4:
                raise ValueError(f"{len(parts)} fields, expected 4")
            rating = float(parts[2])
            if not rating_min <= rating <= rating_max:  # NaN fails too
                raise ValueError(f"rating {parts[2]} outside the scale [{rating_min}, {rating_max}]")
            rows.append(Rating(parts[0], parts[1], rating, int(parts[3]), n))
        except ValueError as ex:
            raise ValueError(f"movielens: line {n + 1} of {p}: {ex}: {line!r}") from None
    rows.sort(key=lambda r: (r.ts, r.line))
    return rows


def item_genres(path: str | Path) -> dict[str, str]:
    """Movie id -> its genres joined by ``|`` (``"unknown"`` when none is flagged), from ``u.item`` beside the
    ratings file (``path`` is the folder or any file in it); empty when there is no ``u.item``."""
    p = Path(path)
    p = (p if p.is_dir() else p.parent) / "u.item"
    if not p.is_file():
        return {}
    out: dict[str, str] = {}
    for n, line in enumerate(p.read_text(encoding="latin-1").splitlines()):
        parts = line.split("|")
        if len(parts) < 1 + len(GENRES):
            raise ValueError(f"movielens: line {n + 1} of {p} has {len(parts)} fields, expected at least "
                             f"{1 + len(GENRES)}")
        out[parts[0]] = category(parts[-len(GENRES):])
    return out


def category(flags: Sequence[str]) -> str:
    """The genres flagged ``1`` in ``u.genre`` order, joined by ``|``; ``"unknown"`` when none is.

    >>> category(["0", "1", "0", "1"] + ["0"] * 15)
    'Action|Animation'
    """
    names = [g for g, f in zip(GENRES, flags, strict=True) if f.strip() == "1"]
    return "|".join(names) or GENRES[0]
