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

The records are read by ``flink_job.tools.run_stats`` and plotted by ``flink_job.tools.plots``.
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from flink_job.tools.plots import plot_batch_latency, plot_freshness, plot_prequential
from flink_job.tools.run_stats import (STAGE, Freshness, ReportError, RunStats, final_prequential, finite,
                                       load_freshness, load_stats_file, load_stats_topic, percentiles, run_stats,
                                       save_stats)

log = logging.getLogger(__name__)

PREQUENTIAL_PNG = "prequential.png"
LATENCY_PNG = "batch_latency.png"
FRESHNESS_PNG = "freshness.png"
SUMMARY_MD = "summary.md"


def summarise(run: RunStats, freshness: Sequence[Freshness]) -> dict[str, Any]:
    """The figures of the summary, as plain values."""
    last = run.last
    train_ms = np.array([float(b["train_ms"]) for b in run.batches])
    clean = last.get("clean") or {}
    clean_dead = {k: int(v) for k, v in clean.items() if k.endswith("_dropped") and v}
    publish_ms = [float(p["publish_ms"]) for p in run.publishes if finite(p.get("publish_ms"))]
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
        "prequential": final_prequential(run.batches),
        "train_ms": {**percentiles(train_ms), "mean": float(train_ms.mean()), "max": float(train_ms.max())},
        "publishes": len(run.publishes),
        "embeddings_published": int(last.get("published") or 0),
        "publish_ms": percentiles(publish_ms) if publish_ms else None,
        "freshness": [{"label": f.label, "events": len(f.latencies_ms), **percentiles(f.latencies_ms),
                       "max": float(f.latencies_ms.max())} for f in freshness],
    }


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
    return f"{float(value):.4f}" if finite(value) else "n/a"



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
