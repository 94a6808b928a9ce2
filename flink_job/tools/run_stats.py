"""Reading a run for the report: the job-stats records (from a topic or a JSON-lines file, repeats after a restart
dropped) and the freshness results, and the figures computed from them (percentiles, windowed quality).

>>> hr, rmse = windowed_quality([{"hits": 1, "positives": 2, "rmse": 1.0, "rated": 1},
...                              {"hits": 0, "positives": 2, "rmse": 2.0, "rated": 4}], window=2)
>>> hr.tolist(), rmse.round(3).tolist()
([0.5, 0.25], [1.0, 1.844])
"""
from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

import numpy as np
import numpy.typing as npt

from flink_job.stages.train_output import combine_latest

log = logging.getLogger("flink_job.tools.report")  # the report's logger, as before the split

STAGE = "report"
PERCENTILES: tuple[int, ...] = (50, 95, 99)


class ReportError(ValueError):
    """Unusable input: a missing or empty stats source, a malformed record or freshness file."""


@dataclass(frozen=True)
class RunStats:
    """The job-stats records of one run, repeats after a restart removed, batches in training order."""

    batches: list[dict[str, Any]]
    publishes: list[dict[str, Any]]
    last: dict[str, Any]  # the cumulative counters: each trainer's record with the highest, combined
    repeats: int  # records dropped as repeats of earlier ones
    source: str


@dataclass(frozen=True)
class Freshness:
    """One freshness benchmark result: the per-event latencies of one delivery mode."""

    label: str
    latencies_ms: npt.NDArray[np.float64]  # (N,)
    source: str


# ---------------------------------------------------------------------------------------------------------- inputs


def parse_lines(lines: Iterable[str], source: str) -> list[dict[str, Any]]:
    """Stats records from JSON lines; blank lines are skipped, a line that is no JSON object is an error."""
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as ex:
            raise ReportError(f"{STAGE}: {source} line {n} is not JSON: {line[:80]!r}") from ex
        if not isinstance(rec, dict):
            raise ReportError(f"{STAGE}: {source} line {n} is not a JSON object: {line[:80]!r}")
        records.append(rec)
    return records


def load_stats_file(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise ReportError(f"{STAGE}: stats file {path} does not exist")
    with open(path, encoding="utf-8") as f:
        return parse_lines(f, str(path))


def load_stats_topic(bootstrap: str, topic: str, security: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Every record now in the stats topic (a topic that does not exist reads as empty); ``security``: librdkafka
    settings, ``KafkaConfig.librdkafka_properties()``."""
    from flink_job.kafka.topics import json_values, read_all

    return list(json_values(read_all(bootstrap, topic, security=security)))


def save_stats(records: Sequence[dict[str, Any]], path: Path) -> None:
    """Writes records as JSON lines, readable by ``--stats-file``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")


def run_stats(records: Sequence[dict[str, Any]], source: str) -> RunStats:
    """Splits records into batches and publishes, drops the repeats a restart can write, orders batches."""
    if not records:
        raise ReportError(f"{STAGE}: no stats records in {source}")
    batches: dict[Any, dict[str, Any]] = {}
    publishes: dict[Any, dict[str, Any]] = {}
    for i, rec in enumerate(records):
        kind = rec.get("kind")
        trainer = rec.get("trainer", 0)  # user-sharded trainers count their batches apart
        if kind == "batch":
            batches[(trainer, rec.get("batch", ("at", i)))] = rec
        elif kind == "publish":
            key = (trainer, rec["batch"], rec["published"]) if "batch" in rec and "published" in rec else ("at", i)
            publishes[key] = rec
        else:
            log.warning("%s: %s: record %d has kind %r, left out", STAGE, source, i, kind)
    if not batches:
        raise ReportError(f"{STAGE}: no batch records among the {len(records)} stats records in {source}")
    for rec in batches.values():
        missing = [k for k in ("events", "train_ms", "trained") if k not in rec]
        if missing:
            raise ReportError(f"{STAGE}: {source}: batch record without {', '.join(missing)}: {str(rec)[:200]}")
    ordered = sorted(batches.values(), key=lambda r: (r.get("batch", 0), r.get("trainer", 0), r.get("trained", 0)))
    everything = [*ordered, *publishes.values()]
    newest: dict[int, dict[str, Any]] = {}  # each trainer's record with the highest counters
    for r in everything:
        held = newest.get(r.get("trainer", 0))
        if held is None or _progress(r) > _progress(held):
            newest[r.get("trainer", 0)] = r
    last = combine_latest(list(newest.values()))
    repeats = len(records) - len(everything) - sum(r.get("kind") not in ("batch", "publish") for r in records)
    if repeats:
        log.info("%s: %d repeated stats records dropped (a restart from a checkpoint)", STAGE, repeats)
    return RunStats(ordered, list(publishes.values()), last, repeats, source)


def _progress(r: dict[str, Any]) -> tuple[int, int, int, int]:
    return r.get("received", 0), r.get("trained", 0), r.get("published", 0), r.get("at_ms", 0)


def load_freshness(paths: Sequence[Path]) -> list[Freshness]:
    """Freshness results, labelled by their delivery mode (and file name when two share a mode)."""
    loaded = []
    for path in paths:
        if not path.is_file():
            raise ReportError(f"{STAGE}: freshness file {path} does not exist")
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as ex:
            raise ReportError(f"{STAGE}: freshness file {path} is not JSON") from ex
        lat = doc.get("latencies_ms") if isinstance(doc, dict) else None
        if not isinstance(lat, list) or not lat:
            raise ReportError(f"{STAGE}: freshness file {path} has no latencies_ms list (write it with "
                              "python -m benchmarks.freshness --latencies-out FILE)")
        values = np.asarray(lat, dtype=np.float64)
        if not np.isfinite(values).all():
            raise ReportError(f"{STAGE}: freshness file {path}: latencies_ms holds non-finite values")
        loaded.append((str(doc.get("delivery") or path.stem), values, str(path)))
    labels = [label for label, _v, _s in loaded]
    return [Freshness(f"{label} ({Path(src).stem})" if labels.count(label) > 1 else label, values, src)
            for label, values, src in loaded]


# ---------------------------------------------------------------------------------------------------------- figures


def percentiles(values: npt.ArrayLike) -> dict[int, float]:
    """p50/p95/p99 (numpy's linear interpolation, as the benchmarks use).

    >>> percentiles([1.0, 2.0, 3.0, 4.0, 5.0])
    {50: 3.0, 95: 4.8, 99: 4.96}
    """
    arr = np.asarray(values, dtype=np.float64)
    return {p: round(float(np.percentile(arr, p)), 6) for p in PERCENTILES}


def windowed_quality(quality: Sequence[dict[str, Any] | None],
                     window: int) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """HR and RMSE over the last ``window`` batches, from each batch's prequential figures (None: not evaluated).

    HR is hits over positives and RMSE pools the squared errors (``rmse**2 * rated``) of the batches in the window;
    a window without positives (or ratings) is NaN.
    """
    if window <= 0:
        raise ReportError(f"{STAGE}: window must be positive, got {window}")
    hits, pos, sq, rated = (np.array([_num(q, k) for q in quality]) for k in ("hits", "positives", "sq", "rated"))

    def rolling(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:  # (B,) sums over the last `window`
        c = np.concatenate([[0.0], np.cumsum(x)])
        return c[1:] - c[np.maximum(np.arange(1, len(x) + 1) - window, 0)]

    with np.errstate(invalid="ignore", divide="ignore"):
        p, r = rolling(pos), rolling(rated)
        hr = np.where(p > 0, rolling(hits) / p, np.nan)
        rmse = np.where(r > 0, np.sqrt(rolling(sq) / r), np.nan)
    return hr, rmse


def _num(q: dict[str, Any] | None, key: str) -> float:
    """A batch's figure as a number; ``sq`` is its summed squared rating error. Missing or NaN: 0."""
    if not q:
        return 0.0
    if key == "sq":
        rmse, rated = q.get("rmse"), q.get("rated") or 0
        return float(rmse) ** 2 * rated if rated and finite(rmse) else 0.0
    value = q.get(key)
    return float(value) if finite(value) else 0.0


def finite(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and math.isfinite(value)



def final_prequential(batches: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    for b in reversed(batches):
        if b.get("prequential"):
            return dict(b["prequential"])
    return None
