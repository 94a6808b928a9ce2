"""Cost against the number of distinct users (issue 18): the same number of events over 5,000 ... 10,000,000
users drawn uniformly (the catalogue fixed), the real job at its default configuration on the local mini-cluster.

    python -m benchmarks.scale --events 1000000 --users 5000,100000,1000000,10000000 --out scale.jsonl

Each size runs in a process of its own (a fresh JVM, so memory figures do not carry over), with the flow of
benchmarks.throughput: a pre-filled input topic (kept in the broker's data, produced once per size), the job until
it is idle, throughput.summary's figures. Added per size:

- published records (``embeddings_published``) and published records per input event;
- checkpoints from Flink's REST API of the mini-cluster (its port fixed with ``rest.port``), read before the job is
  cancelled: completed/failed counts, and over the completed ones the largest and mean state size
  (``state_size``, what a restore reads) and the largest and mean end-to-end duration;
- the largest ``chk-N`` directory on disk (sampled every second under the run's scratch checkpoint directory), the
  figure earlier measurements quoted;
- each operator chain's busy, back-pressured and idle seconds summed over its subtasks, and its records received
  (``/jobs/<id>``'s vertices), so that a slower size shows which operator took the extra time;
- peak resident memory, sampled every second from /proc over the run's process tree: this process (the Kafka
  follower and PyFlink's loopback worker) and its descendants (the mini-cluster's JVM, which embeds the Python
  trainer in thread mode, and Python workers in process mode). A sum of RSS counts a page shared by two processes twice.

Items: a catalogue of ``--items`` (50,000) with each event's item drawn from ``--candidates`` random items (the
generator's item_candidates; the exact softmax over 50,000 items would take ~40 min a million events to produce).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Any

from benchmarks.sampling import Sampler
from benchmarks.throughput import bench_config, prefill, summary
from deploy.jars import export_job_jars
from deploy.kafka import Broker
from flink_job.config import PROJECT_ROOT
from flink_job.flink.runner import LocalJob
from flink_job.tools.generate import SyntheticConfig

log = logging.getLogger("benchmarks.scale")
# Printed per size: (column, row key, format).
COLUMNS = (
    ("users", "users", "{:,}"), ("events/s", "events_per_s", "{:,}"),
    ("2nd half events/s", "second_half_events_per_s", "{:,}"), ("published", "embeddings_published", "{:,}"),
    ("published/event", "published_per_event", "{:.3f}"), ("checkpoints", "checkpoints_completed", "{}"),
    ("max checkpoint MB", "checkpoint_state_max_mb", "{:.1f}"), ("mean written MB", "checkpoint_written_avg_mb", "{:.1f}"),
    ("max checkpoint s", "checkpoint_duration_max_s", "{:.2f}"),
    ("mean checkpoint s", "checkpoint_duration_avg_s", "{:.2f}"), ("largest chk dir MB", "peak_checkpoint_dir_mb", "{:.1f}"),
    ("peak RSS MB", "peak_rss_total_mb", "{:,.0f}"),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=lambda s: [int(n) for n in s.split(",")], default=[5_000, 100_000, 1_000_000, 10_000_000])
    p.add_argument("--events", type=int, default=1_000_000)
    p.add_argument("--items", type=int, default=50_000)
    p.add_argument("--candidates", type=int, default=256, help="items each event's item is drawn from")
    p.add_argument("--partitions", type=int, default=2)
    p.add_argument("--duplicates", type=float, default=0.02)
    p.add_argument("--malformed", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--port", type=int, default=19592, help="the broker's (and +1 its controller's, +2 Flink's REST)")
    p.add_argument("--keep", action="store_true", help="leave the broker running afterwards")
    p.add_argument("--timeout", type=float, default=3600, help="seconds a size may take once its job runs")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--out", type=Path, default=None, help="append one JSON line per size to this file")
    p.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # a single size, in this process
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    broker = Broker(args.port, args.port + 1, PROJECT_ROOT / ".run" / "scale-kafka")
    if args.one is not None:
        with broker.running(keep=args.keep):
            row = run_size(broker, args.one, args)
        _append(args.out, [row])
        return
    rows: list[dict[str, Any]] = []
    with broker.running(keep=args.keep), tempfile.TemporaryDirectory() as tmp:  # the sizes find it running
        for users in args.users:
            out = Path(tmp) / f"{users}.jsonl"
            done = subprocess.run([sys.executable, "-m", "benchmarks.scale", *argv, "--one", str(users),
                                   "--out", str(out)], check=False)
            if done.returncode or not out.exists():
                log.error("scale: the run over %d users failed (exit %d)", users, done.returncode)
                continue
            rows.extend(json.loads(line) for line in out.read_text().splitlines())
    _append(args.out, rows)
    print(table(rows))
    for row in rows:
        print(f"\n{row['users']:,} users, per operator chain:\n" + operator_table(row.get("operators", [])))


def run_size(broker: Broker, users: int, args: argparse.Namespace) -> dict[str, Any]:
    """One size: pre-fill (once per size), run the job to idle while sampling, read checkpoints, summarise."""
    export_job_jars()
    syn = SyntheticConfig(n_users=users, n_items=args.items, n_events=args.events, seed=args.seed,
                          duplicate_rate=args.duplicates, malformed_rate=args.malformed, user_activity="uniform",
                          item_candidates=args.candidates)
    topic = f"scale.input.{syn.n_events}.{users}.{syn.n_items}.{syn.item_candidates}.{syn.seed}.{args.partitions}"
    cfg = bench_config(broker, topic, args.overrides)
    rest_port = args.port + 2
    # The REST API serves metrics fetched at most every metrics.fetcher.update-interval (10 s): 1 s, so that the
    # operators' figures read at the end cover the run.
    options = {**cfg.flink.options, "rest.bind-port": str(rest_port), "rest.port": str(rest_port),
               "metrics.fetcher.update-interval": "1000"}
    cfg = replace(cfg, flink=replace(cfg.flink, options=options))
    n_input = prefill(broker, cfg, syn, args.partitions)
    with LocalJob(cfg, scratch_checkpoints=True) as job, Sampler(os.getpid(), job.scratch) as sampler:
        result = job.wait_idle(idle_s=5.0, timeout_s=args.timeout, min_received=int(n_input * (1 - 2 * args.duplicates)))
        checkpoints = rest_get(rest_port, f"/jobs/{job.job_id}/checkpoints")
        rest_get(rest_port, f"/jobs/{job.job_id}")  # starts a fetch of the metrics; the next answer has them
        time.sleep(2.0)
        vertices = rest_get(rest_port, f"/jobs/{job.job_id}")["vertices"]
    row = summary(result, n_input, cfg, args)
    row.update(users=users, items=args.items, item_candidates=args.candidates,
               expected_distinct_users=round(expected_distinct(users, row["trained"])),
               published_per_event=round(row["embeddings_published"] / n_input, 4),
               **checkpoint_figures(checkpoints), **sampler.figures(), operators=operator_figures(vertices))
    print(json.dumps(row, indent=2))
    return row


def expected_distinct(users: int, draws: int) -> float:
    """How many of ``users`` are drawn at least once in ``draws`` uniform draws: ``users * (1 - (1 - 1/users)^draws)``."""
    return -users * math.expm1(draws * math.log1p(-1.0 / users)) if users > 1 else float(min(users, draws))


def rest_get(port: int, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
        return json.loads(resp.read())


def checkpoint_figures(doc: dict[str, Any]) -> dict[str, Any]:
    """The figures of a ``/jobs/<id>/checkpoints`` answer: counts and the summary over completed checkpoints
    (sizes in bytes become MB, durations in ms become s)."""
    counts, stats = doc.get("counts", {}), doc.get("summary", {})
    size, duration = stats.get("state_size", {}), stats.get("end_to_end_duration", {})
    # What each checkpoint wrote: all its state with the heap backend, the files new since the last with RocksDB's
    # incremental checkpoints.
    written = stats.get("checkpointed_size", {})
    return {
        "checkpoints_completed": counts.get("completed", 0),
        "checkpoints_failed": counts.get("failed", 0),
        "checkpoint_state_max_mb": round(size.get("max", 0) / 2**20, 1),
        "checkpoint_state_avg_mb": round(size.get("avg", 0) / 2**20, 1),
        "checkpoint_written_avg_mb": round(written.get("avg", 0) / 2**20, 1),
        # The last checkpoints (the REST API keeps 10), oldest first: base snapshots of the stage against call logs.
        "checkpoint_written_mb": [round(c.get("checkpointed_size", 0) / 2**20, 1)
                                  for c in reversed(doc.get("history", [])) if c.get("status") == "COMPLETED"],
        "checkpoint_duration_max_s": round(duration.get("max", 0) / 1000, 3),
        "checkpoint_duration_avg_s": round(duration.get("avg", 0) / 1000, 3),
    }


def operator_figures(vertices: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per operator chain of a ``/jobs/<id>`` answer: its name, parallelism, records received, and busy,
    back-pressured and idle time summed over its subtasks (ms become s), with the busy time per record received."""
    rows = []
    for v in vertices:
        m = v.get("metrics", {})
        received = int(m.get("read-records", 0))
        busy = float(m.get("accumulated-busy-time", 0)) / 1000
        rows.append({"name": v.get("name", "")[:120], "parallelism": v.get("parallelism"), "received": received,
                     "busy_s": round(busy, 1),
                     "backpressured_s": round(float(m.get("accumulated-backpressured-time", 0)) / 1000, 1),
                     "idle_s": round(float(m.get("accumulated-idle-time", 0)) / 1000, 1),
                     "busy_us_per_record": round(busy * 1e6 / received, 1) if received else None})
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(c for c, _k, _f in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join(f.format(row[k]) if k in row else "-" for _c, k, f in COLUMNS) + " |")
    return "\n".join(lines)


def operator_table(operators: list[dict[str, Any]]) -> str:
    keys = ("name", "parallelism", "received", "busy_s", "backpressured_s", "idle_s", "busy_us_per_record")
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(op.get(k)) for k in keys) + " |" for op in operators]
    return "\n".join(lines)


def _append(out: Path | None, rows: list[dict[str, Any]]) -> None:
    if out:
        with out.open("a") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)


if __name__ == "__main__":
    main()
