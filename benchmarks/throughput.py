"""End-to-end throughput, as docs/evaluation.md defines it: a pre-filled input topic, the job on the local mini-cluster,
the clock from the first chunk the trainer receives to the last batch reflected in the output.

    python -m benchmarks.throughput --events 1000000 [--set batch.size=8192] [--keep]

Start-up (submission to first chunk) is reported apart. The broker this run starts is stopped when it ends; its
data stays, so the 1M-event input is produced once. ``--keep`` leaves the broker running (for benchmarks.stages).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from deploy.jars import export_job_jars
from deploy.kafka import Broker, create_topics, job_topics
from flink_job.config import PROJECT_ROOT, JobConfig
from flink_job.tools.generate import SyntheticConfig
from flink_job.kafka.produce import send
from flink_job.tools.produce import synthetic_timed
from flink_job.flink.runner import LocalJob, RunResult
from flink_job.stages.train_output import combine_latest
from flink_job.kafka.topics import end_offsets

log = logging.getLogger("benchmarks.throughput")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=1_000_000)
    p.add_argument("--partitions", type=int, default=2)
    p.add_argument("--duplicates", type=float, default=0.02)
    p.add_argument("--malformed", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--port", type=int, default=19492)
    p.add_argument("--keep", "--reuse", dest="keep", action="store_true",
                   help="leave the broker this run started running afterwards, with its pre-filled topic "
                   "(default: stop it, even on error; a broker found running is left running)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--out", type=Path, default=None, help="append the result as a JSON line to this file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    export_job_jars()
    broker = Broker(args.port, args.port + 1, PROJECT_ROOT / ".run" / "bench-kafka")
    syn = SyntheticConfig(n_events=args.events, seed=args.seed, duplicate_rate=args.duplicates,
                          malformed_rate=args.malformed)
    input_topic = f"bench.input.{syn.n_events}.{syn.seed}.{args.partitions}"
    cfg = bench_config(broker, input_topic, args.overrides)
    with broker.running(keep=args.keep):  # stopped however this ends, unless --keep
        n_input = prefill(broker, cfg, syn, args.partitions)
        with LocalJob(cfg, scratch_checkpoints=True) as job:
            result = job.wait_idle(idle_s=5.0, timeout_s=1800, min_received=int(n_input * (1 - 2 * args.duplicates)))
        row = summary(result, n_input, cfg, args)
        print(json.dumps(row, indent=2))
        if args.out:
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")


def bench_config(broker: Broker, input_topic: str, overrides: list[str]) -> JobConfig:
    """The default configuration reading ``input_topic``, with output topics and group of this run's own."""
    run = time.strftime("%H%M%S")
    return JobConfig.load(overrides=[
        f"kafka.bootstrap={broker.bootstrap}", f"kafka.input_topic={input_topic}",
        f"kafka.embeddings_topic=bench.{run}.embeddings", f"kafka.dead_letter_topic=bench.{run}.dead-letters",
        f"kafka.stats_topic=bench.{run}.stats", f"kafka.item_delta_topic=bench.{run}.item-deltas",
        f"kafka.group_id=bench-{run}", *overrides,
    ])


def prefill(broker: Broker, cfg: JobConfig, syn: SyntheticConfig, partitions: int) -> int:
    """Creates the job's topics and fills the input topic with ``syn``'s stream unless a run before did; returns
    the number of records in the input topic."""
    topics = job_topics(cfg)
    input_topic = cfg.kafka.input_topic
    create_topics(broker.bootstrap, {input_topic: topics.pop(input_topic)}, partitions)
    create_topics(broker.bootstrap, topics)
    if sum(end_offsets(broker.bootstrap, input_topic).values()) < syn.n_events:
        log.info("pre-filling %s with %d events (seed %d)", input_topic, syn.n_events, syn.seed)
        send(synthetic_timed(syn), broker.bootstrap, input_topic, total=syn.n_events)
    return sum(end_offsets(broker.bootstrap, input_topic).values())


def by_trainer(stats: list[dict[str, Any]], key: str) -> dict[int, int]:
    """Milliseconds of ``key`` per trainer (user-sharded trainers report theirs apart)."""
    totals: dict[int, float] = {}
    for s in stats:
        totals[s.get("trainer", 0)] = totals.get(s.get("trainer", 0), 0.0) + s.get(key, 0)
    return {t: round(ms) for t, ms in sorted(totals.items())}


def summary(result: RunResult, n_input: int, cfg: JobConfig, args: argparse.Namespace) -> dict[str, Any]:
    """The run's row: ``result`` is what ``LocalJob.wait_idle`` saw."""
    last = result.last
    processing_s = result.last_batch_s - result.first_chunk_s
    # Second half of the run, after JIT warm-up: input events per second, scaling the records that reached the
    # trainer by the input/received ratio (duplicates never reach it).
    mid_ms = (result.first_chunk_s + processing_s / 2) * 1000
    mid = combine_latest([s for s in result.stats if s["at_ms"] <= mid_ms])  # every trainer's count by then
    steady = (last["received"] - mid["received"]) * n_input / last["received"] / ((last["at_ms"] - mid["at_ms"]) / 1000)
    return {
        "date": time.strftime("%Y-%m-%d"),
        "events": n_input,
        "events_per_s": round(n_input / processing_s),
        "processing_s": round(processing_s, 2),
        "second_half_events_per_s": round(steady),
        "startup_s": round(result.first_chunk_s - result.submitted_at, 2),
        "trained": last["trained"],
        "dead_lettered": last["dead_lettered"],
        "deduplicated": n_input - last["received"] + last["near_duplicates"],
        "batches": last["batch"],
        "embeddings_published": last["published"],
        "batch_size": cfg.batch.size,
        "parallelism": cfg.flink.parallelism,
        "trainers": cfg.trainer_count,
        "python_mode": cfg.flink.python_execution_mode,
        "partitions": args.partitions,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "overrides": args.overrides,
        "train_ms_total": round(sum(s.get("train_ms", 0) for s in result.stats)),  # of all trainers together
        "train_ms_by_trainer": by_trainer(result.stats, "train_ms"),
        "publish_ms_by_trainer": by_trainer(result.stats, "publish_ms"),
        "publish_ms_total": round(sum(s.get("publish_ms", 0) for s in result.stats)),
    }

if __name__ == "__main__":
    main()
