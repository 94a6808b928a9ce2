"""Report of a run: PNG plots and a short Markdown summary, from the job-stats records and freshness results.

    python -m flink_job.tools.report --stats-file run.jsonl --out report/ [--freshness fresh.json ...]
    python -m flink_job.tools.report --bootstrap 127.0.0.1:9092 --stats-topic streamrec.job-stats --out report/ \\
        [--save-stats run.jsonl]

Inputs: the records the job writes to its stats topic (``TrainStage._stats``: one ``batch`` record per trained batch,
one ``publish`` record per publish, each with the cumulative counters), read from the topic or from a JSON-lines file
(one record per line; ``--save-stats`` writes such a file from the topic, so a run can be reported later), and
optionally the result files of ``python -m benchmarks.freshness --latencies-out F`` (``{"delivery": ...,
"latencies_ms": [...], ...}``), one per delivery mode.

Outputs in ``--out``: ``prequential.png`` (running HR@k and RMSE against events trained, with a lighter line for a
window of recent batches), ``batch_latency.png`` (``train_ms`` per batch and its distribution), ``freshness.png``
(latency histogram per delivery mode, p50/p95/p99 marked; only with ``--freshness``) and ``summary.md``.

After a restart from a checkpoint the job may write the records after the checkpoint again; a batch record whose
``batch`` number was seen already replaces the earlier one, and so does a publish record with the same ``batch`` and
``published`` counters.

>>> hr, rmse = windowed_quality([{"hits": 1, "positives": 2, "rmse": 1.0, "rated": 1},
...                              {"hits": 0, "positives": 2, "rmse": 2.0, "rated": 4}], window=2)
>>> hr.tolist(), rmse.round(3).tolist()
([0.5, 0.25], [1.0, 1.844])
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeGuard

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

STAGE = "report"
PERCENTILES: tuple[int, ...] = (50, 95, 99)
PREQUENTIAL_PNG = "prequential.png"
LATENCY_PNG = "batch_latency.png"
FRESHNESS_PNG = "freshness.png"
SUMMARY_MD = "summary.md"
COLORS: tuple[str, ...] = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")
PERCENTILE_STYLES: dict[int, str] = {50: ":", 95: "--", 99: "-."}


class ReportError(ValueError):
    """Unusable input: a missing or empty stats source, a malformed record or freshness file."""


@dataclass(frozen=True)
class RunStats:
    """The job-stats records of one run, repeats after a restart removed, batches in training order."""

    batches: list[dict[str, Any]]
    publishes: list[dict[str, Any]]
    last: dict[str, Any]  # the record with the highest cumulative counters
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
        if kind == "batch":
            batches[rec.get("batch", ("at", i))] = rec
        elif kind == "publish":
            key = (rec["batch"], rec["published"]) if "batch" in rec and "published" in rec else ("at", i)
            publishes[key] = rec
        else:
            log.warning("%s: %s: record %d has kind %r, left out", STAGE, source, i, kind)
    if not batches:
        raise ReportError(f"{STAGE}: no batch records among the {len(records)} stats records in {source}")
    for rec in batches.values():
        missing = [k for k in ("events", "train_ms", "trained") if k not in rec]
        if missing:
            raise ReportError(f"{STAGE}: {source}: batch record without {', '.join(missing)}: {str(rec)[:200]}")
    ordered = sorted(batches.values(), key=lambda r: (r.get("batch", 0), r.get("trained", 0)))
    everything = [*ordered, *publishes.values()]
    last = max(everything, key=lambda r: (r.get("received", 0), r.get("trained", 0), r.get("published", 0),
                                           r.get("at_ms", 0)))
    repeats = len(records) - len(everything) - sum(r.get("kind") not in ("batch", "publish") for r in records)
    if repeats:
        log.info("%s: %d repeated stats records dropped (a restart from a checkpoint)", STAGE, repeats)
    return RunStats(ordered, list(publishes.values()), last, repeats, source)


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
        return float(rmse) ** 2 * rated if rated and _finite(rmse) else 0.0
    value = q.get(key)
    return float(value) if _finite(value) else 0.0


def _finite(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and math.isfinite(value)


def summarise(run: RunStats, freshness: Sequence[Freshness]) -> dict[str, Any]:
    """The figures of the summary, as plain values."""
    last = run.last
    train_ms = np.array([float(b["train_ms"]) for b in run.batches])
    clean = last.get("clean") or {}
    clean_dead = {k: int(v) for k, v in clean.items() if k.endswith("_dropped") and v}
    publish_ms = [float(p["publish_ms"]) for p in run.publishes if _finite(p.get("publish_ms"))]
    at = [b["at_ms"] for b in run.batches if "at_ms" in b]
    return {
        "source": run.source,
        "events": {k: int(last.get(k) or 0) for k in ("received", "trained", "dead_lettered", "near_duplicates")},
        "batches": len(run.batches),
        "skipped_batches": int(last.get("skipped_batches") or sum(bool(b.get("skipped")) for b in run.batches)),
        "repeats": run.repeats,
        "span_s": (max(at) - min(at)) / 1000 if len(at) > 1 else None,
        "clean_dead": clean_dead,
        "other_dead": int(last.get("dead_lettered") or 0) - sum(clean_dead.values()),
        "clean_kept": {k: int(v) for k, v in clean.items() if not k.endswith("_dropped") and v},
        "prequential": _final_prequential(run.batches),
        "train_ms": {**percentiles(train_ms), "mean": float(train_ms.mean()), "max": float(train_ms.max())},
        "publishes": len(run.publishes),
        "embeddings_published": int(last.get("published") or 0),
        "publish_ms": percentiles(publish_ms) if publish_ms else None,
        "freshness": [{"label": f.label, "events": len(f.latencies_ms), **percentiles(f.latencies_ms),
                       "max": float(f.latencies_ms.max())} for f in freshness],
    }


def _final_prequential(batches: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    for b in reversed(batches):
        if b.get("prequential"):
            return dict(b["prequential"])
    return None


def render_summary(s: dict[str, Any], k: int, images: Sequence[str], notes: Sequence[str]) -> str:
    """The Markdown summary of ``summarise``'s figures."""
    ev = s["events"]
    lines = [
        "# Run report", "",
        f"Stats from `{s['source']}`: {s['batches']:,} batch records, {s['publishes']:,} publish records"
        + (f", {s['repeats']:,} repeated records dropped" if s["repeats"] else "")
        + (f", over {s['span_s']:,.1f} s." if s["span_s"] is not None else "."), "",
        "## Events", "",
        "| | count |", "|---|---:|",
        f"| received | {ev['received']:,} |",
        f"| trained | {ev['trained']:,} |",
        f"| dead-lettered | {ev['dead_lettered']:,} |",
        f"| near-duplicates | {ev['near_duplicates']:,} |",
        f"| batches | {s['batches']:,} |",
        f"| skipped batches | {s['skipped_batches']:,} |",
        "",
        "## Dead letters by cleaning outcome", "",
        "| outcome | dead letters |", "|---|---:|",
        *(f"| {name} | {n:,} |" for name, n in sorted(s["clean_dead"].items())),
        f"| parse, lateness (before cleaning) | {s['other_dead']:,} |",
        f"| total | {ev['dead_lettered']:,} |",
        "",
    ]
    if s["clean_kept"]:
        lines += ["Cleaning outcomes that kept the event: "
                  + ", ".join(f"{name} {n:,}" for name, n in sorted(s["clean_kept"].items())) + ".", ""]
    lines += ["## Prequential quality (final, running)", ""]
    q = s["prequential"]
    if q is None:
        lines += ["No prequential figures in the stats (evaluation was off).", ""]
    else:
        lines += [
            f"| HR@{k} | NDCG@{k} | RMSE | MAE | ratings | positives ranked |", "|---:|---:|---:|---:|---:|---:|",
            f"| {_fmt(q.get('hr'))} | {_fmt(q.get('ndcg'))} | {_fmt(q.get('rmse'))} | {_fmt(q.get('mae'))} "
            f"| {int(q.get('rated') or 0):,} | {int(q.get('positives') or 0):,} |", "",
        ]
    t = s["train_ms"]
    lines += [
        "## Batch latency (train_ms)", "",
        "| p50 | p95 | p99 | mean | max |", "|---:|---:|---:|---:|---:|",
        f"| {t[50]:.2f} | {t[95]:.2f} | {t[99]:.2f} | {t['mean']:.2f} | {t['max']:.2f} |", "",
        "## Publishing", "",
        f"{s['publishes']:,} publishes, {s['embeddings_published']:,} embedding records published"
        + (f"; publish_ms p50 {s['publish_ms'][50]:.2f}, p95 {s['publish_ms'][95]:.2f}, "
           f"p99 {s['publish_ms'][99]:.2f}." if s["publish_ms"] else "."), "",
        "## Freshness (ms from input append to a readable embedding)", "",
    ]
    if s["freshness"]:
        lines += ["| delivery | events | p50 | p95 | p99 | max |", "|---|---:|---:|---:|---:|---:|",
                  *(f"| {f['label']} | {f['events']:,} | {f[50]:,.1f} | {f[95]:,.1f} | {f[99]:,.1f} | {f['max']:,.1f} |"
                    for f in s["freshness"]), ""]
    else:
        lines += [f"No freshness input (--freshness): {FRESHNESS_PNG} not written.", ""]
    if notes:
        lines += [*(f"- {n}" for n in notes), ""]
    lines += ["## Plots", "", *(f"![{Path(i).stem}]({i})" for i in images), ""]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    return f"{float(value):.4f}" if _finite(value) else "n/a"


# ---------------------------------------------------------------------------------------------------------- plots


def _figure(width: float, height: float) -> Figure:
    """A figure on the Agg canvas: no display, no pyplot state."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as ex:
        raise ReportError(f"{STAGE}: matplotlib is missing: pip install -e '.[report]'") from ex
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def plot_prequential(run: RunStats, path: Path, k: int, window: int) -> bool:
    """Running HR@k and RMSE against events trained, the last ``window`` batches' figures lighter; False when the
    stats carry no prequential figures."""
    if _final_prequential(run.batches) is None:
        return False
    x = np.array([float(b["trained"]) for b in run.batches])
    running = [b.get("prequential") or {} for b in run.batches]
    hr_w, rmse_w = windowed_quality([b.get("quality") for b in run.batches], window)
    fig = _figure(10, 6.5)
    ax_hr, ax_rmse = fig.subplots(2, 1, sharex=True)
    for ax, key, win, name, color in ((ax_hr, "hr", hr_w, f"HR@{k}", "tab:blue"),
                                      (ax_rmse, "rmse", rmse_w, "RMSE", "tab:red")):
        ax.plot(x, win, color=color, alpha=0.3, lw=1, label=f"last {window} batches")
        ax.plot(x, [r.get(key) if _finite(r.get(key)) else np.nan for r in running], color=color, lw=2,
                label="running")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(loc="best")
    ax_hr.set_title("Prequential quality (each batch tested before it trains)")
    ax_rmse.set_xlabel("events trained")
    fig.savefig(path)
    return True


def plot_batch_latency(run: RunStats, path: Path) -> None:
    """``train_ms`` per batch over the run, and its histogram with p50/p95/p99."""
    ms = np.array([float(b["train_ms"]) for b in run.batches])
    n = np.array([float(b.get("batch", i + 1)) for i, b in enumerate(run.batches)])
    fig = _figure(12, 4.5)
    ax_run, ax_hist = fig.subplots(1, 2, width_ratios=[2, 1])
    ax_run.plot(n, ms, color="tab:blue", lw=0.8, alpha=0.6, label="train_ms")
    pct = percentiles(ms)
    for p, v in pct.items():
        ax_run.axhline(v, color="black", ls=PERCENTILE_STYLES[p], lw=1, label=f"p{p} {v:.1f} ms")
    ax_run.set_xlabel("batch")
    ax_run.set_ylabel("train_ms")
    ax_run.set_title("Training time per batch")
    ax_run.grid(alpha=0.3)
    ax_run.legend(loc="upper right")
    ax_hist.hist(ms, bins=min(50, max(5, len(ms) // 5)), color="tab:blue", alpha=0.7)
    for p, v in pct.items():
        ax_hist.axvline(v, color="black", ls=PERCENTILE_STYLES[p], lw=1)
    ax_hist.set_xlabel("train_ms")
    ax_hist.set_ylabel("batches")
    ax_hist.set_title("Distribution")
    fig.savefig(path)


def plot_freshness(freshness: Sequence[Freshness], path: Path) -> None:
    """Latency histograms, one per delivery mode, on shared bins (logarithmic when they span over 100x)."""
    every = np.concatenate([f.latencies_ms for f in freshness])
    lo, hi = float(every.min()), float(every.max())
    log_x = lo > 0 and hi / lo > 100
    bins = np.geomspace(lo, hi, 60) if log_x else np.linspace(lo, hi if hi > lo else lo + 1, 60)
    fig = _figure(12, 5)
    ax = fig.subplots()
    for i, f in enumerate(freshness):
        color = COLORS[i % len(COLORS)]
        ax.hist(f.latencies_ms, bins=bins.tolist(), color=color, alpha=0.45, label=f"{f.label} ({len(f.latencies_ms):,})")
        for p, v in percentiles(f.latencies_ms).items():
            ax.axvline(v, color=color, ls=PERCENTILE_STYLES[p], lw=1.2, label=f"{f.label} p{p} {v:.0f} ms")
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel("latency from input append to readable embedding (ms)")
    ax.set_ylabel("events")
    ax.set_title("Freshness")
    ax.grid(alpha=0.3)
    fig.legend(loc="outside right upper", fontsize="small")
    fig.savefig(path)


# ---------------------------------------------------------------------------------------------------------- command


def write_report(run: RunStats, freshness: Sequence[Freshness], out: Path, k: int = 10,
                 window: int = 20) -> dict[str, Any]:
    """Writes the plots and ``summary.md`` into ``out``; returns the summary's figures."""
    out.mkdir(parents=True, exist_ok=True)
    images, notes = [], []
    if plot_prequential(run, out / PREQUENTIAL_PNG, k, window):
        images.append(PREQUENTIAL_PNG)
    else:
        notes.append(f"{PREQUENTIAL_PNG} not written: no prequential figures in the stats.")
    plot_batch_latency(run, out / LATENCY_PNG)
    images.append(LATENCY_PNG)
    if freshness:
        plot_freshness(freshness, out / FRESHNESS_PNG)
        images.append(FRESHNESS_PNG)
    figures = summarise(run, freshness)
    (out / SUMMARY_MD).write_text(render_summary(figures, k, images, notes), encoding="utf-8")
    log.info("%s: wrote %s and %s", STAGE, ", ".join(images), out / SUMMARY_MD)
    return figures


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m flink_job.tools.report", description=__doc__.split("\n\n>>>")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stats-file", type=Path, help="job-stats records, one JSON object per line")
    p.add_argument("--bootstrap", help="Kafka bootstrap servers, with --stats-topic")
    p.add_argument("--stats-topic", help="the job's stats topic, with --bootstrap")
    p.add_argument("--config", type=Path, default=None,
                   help="the job's YAML config, for its kafka.client_properties (security) with --bootstrap")
    p.add_argument("--save-stats", type=Path, help="also write the stats records read to this JSON-lines file")
    p.add_argument("--freshness", type=Path, action="append", default=[],
                   help="a benchmarks.freshness --latencies-out file; repeat for each delivery mode")
    p.add_argument("--out", type=Path, required=True, help="folder for the PNGs and summary.md")
    p.add_argument("--k", type=int, default=10, help="the job's eval.k, for the labels (default 10)")
    p.add_argument("--window", type=int, default=20, help="batches in the windowed quality line (default 20)")
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    from_kafka = args.bootstrap is not None or args.stats_topic is not None
    if from_kafka and not (args.bootstrap and args.stats_topic):
        p.error("--bootstrap and --stats-topic go together")
    if from_kafka == (args.stats_file is not None):
        p.error("give either --stats-file or --bootstrap with --stats-topic")
    try:
        if args.stats_file is not None:
            records, source = load_stats_file(args.stats_file), str(args.stats_file)
        else:
            from flink_job.config import JobConfig

            security = JobConfig.load(args.config).kafka.librdkafka_properties() if args.config else None
            records = load_stats_topic(args.bootstrap, args.stats_topic, security)
            source = f"{args.stats_topic}@{args.bootstrap}"
            log.info("%s: read %d records from %s", STAGE, len(records), source)
        run = run_stats(records, source)
        if args.save_stats is not None:
            save_stats(records, args.save_stats)
        write_report(run, load_freshness(args.freshness), args.out, args.k, args.window)
    except ReportError as ex:
        print(f"error: {ex}", file=sys.stderr)
        return 2
    print(args.out / SUMMARY_MD)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(main())
