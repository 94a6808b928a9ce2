"""ML-100K through the real job: the stream goes into Kafka, the job on the local mini-cluster evaluates every
micro-batch before training on it (docs/evaluation.md's prequential protocol), and its own figures are printed beside
River's ``reco.BiasedMF`` and popularity, computed in this process on the same stream.

    python -m benchmarks.ml100k_job --data ML100K_DIR [--batch-size 4096] [--profile ml100k_served] [--rate EV_PER_S]

The broker it starts is stopped when it ends (also on an error, Ctrl-C or SIGTERM) unless ``--keep``.

By default the job runs at its own default settings (no profile, batch 4,096) apart from the input's single shard and
the evaluation of every event; ``--batch-size 1`` takes about 6 minutes on 2 cores.

Without ``--rate`` the whole stream is in Kafka before the job starts, and the job replays it as fast as it can: a
backlog, as after an outage. With ``--rate`` the job starts first and the events arrive at that rate while it runs,
as live traffic does; a rate the job keeps up with leaves no queue in front of the trainers (docs/sharding.md,
"Delivery lag").

The input topic has one partition and the job gathers chunks in one shard (``batch.shards=1``), so the job sees the
events in the file's time order, the order River and popularity see. Every event is evaluated (``eval.user_sample
=1``); predictions are clipped to 1..5.
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

from deploy.jars import export_job_jars
from deploy.kafka import Broker, create_topics, job_topics
from benchmarks.ml100k import PROFILES, dotted, Result, load_stream, run_popularity, run_river, table
from flink_job.config import PROJECT_ROOT, JobConfig
from flink_job.kafka.produce import Pacing, send
from flink_job.tools.produce import movielens_records
from flink_job.flink.runner import LocalJob

log = logging.getLogger("benchmarks.ml100k_job")


def run_job(data: Path, batch_size: int, profile: str, port: int, extra: list[str],
            keep: bool = False, rate: float | None = None) -> tuple[dict[str, Any], float]:
    """The job's final prequential summary and its processing seconds (first chunk to last batch); the broker it
    starts is stopped afterwards unless ``keep``. ``rate``: events per second sent while the job runs (None: the
    whole stream before it starts)."""
    export_job_jars()
    broker = Broker(port, port + 1, PROJECT_ROOT / ".run" / "bench-kafka")
    with broker.running(keep=keep):
        return _run_job(broker, data, batch_size, profile, extra, rate)


def _run_job(broker: Broker, data: Path, batch_size: int, profile: str, extra: list[str],
             rate: float | None = None) -> tuple[dict[str, Any], float]:
    run = f"ml100k.{time.strftime('%H%M%S')}"
    model = list(dotted("model", PROFILES.get(profile, {})))
    # One chunk per window and trainer keeps the stream's order inside each trainer (user-sharded trainers need
    # a shard each at least).
    shards = JobConfig.load(overrides=extra).trainer_count
    cfg = JobConfig.load(overrides=[
        f"kafka.bootstrap={broker.bootstrap}", f"kafka.input_topic={run}.events", f"kafka.group_id={run}",
        f"kafka.embeddings_topic={run}.embeddings", f"kafka.dead_letter_topic={run}.dead-letters",
        f"kafka.stats_topic={run}.stats", f"kafka.item_delta_topic={run}.item-deltas", f"batch.size={batch_size}",
        f"batch.shards={shards}", "eval.user_sample=1.0",
        "eval.log_every_batches=500", *model, *extra,
    ])
    create_topics(broker.bootstrap, job_topics(cfg), 1)
    records = movielens_records(data, rating_min=cfg.model.rating_min, rating_max=cfg.model.rating_max)
    if rate is None:
        sent = send(records, broker.bootstrap, cfg.kafka.input_topic)
    with LocalJob(cfg, scratch_checkpoints=True) as job:
        if rate is not None:
            job.wait_running()
            sent = send(list(records), broker.bootstrap, cfg.kafka.input_topic, Pacing(rate=rate))
        result = job.wait_idle(idle_s=5.0, timeout_s=1800, min_received=sent)
    last = result.last
    if last["trained"] != sent:
        raise RuntimeError(f"ml100k: the job trained {last['trained']} of {sent} events; see the dead-letter topic")
    return last["prequential"], result.last_batch_s - result.first_chunk_s


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="the ml-100k folder (or its u.data)")
    p.add_argument("--batch-size", type=int, default=4096, help="micro-batch size (the job's default)")
    p.add_argument("--profile", default="", choices=["", *PROFILES], help="a named set of model settings (none: defaults)")
    p.add_argument("--port", type=int, default=19492)
    p.add_argument("--rate", type=float, default=None,
                   help="send the events at this many per second while the job runs (default: all before it starts)")
    p.add_argument("--keep", action="store_true",
                   help="leave the broker this run started running afterwards (default: stop it, even on error)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    summary, seconds = run_job(args.data, args.batch_size, args.profile, args.port, args.overrides,
                               args.keep, args.rate)
    model = JobConfig.load(overrides=args.overrides).model  # the rating scale River and popularity read with
    scale = (model.rating_min, model.rating_max)
    stream = load_stream(args.data, *scale)
    paced = f", {args.rate:,.0f} ev/s" if args.rate else ""
    job = Result(f"streamrec job (batch {args.batch_size}, profile {args.profile or 'defaults'}{paced})", summary, seconds,
                 seconds)
    print(table([job, run_river(stream, scale=scale), run_popularity(stream)]))


if __name__ == "__main__":
    main()
