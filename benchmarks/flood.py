"""Memory under a flood of new ids: two million distinct random user ids (one event each) among normal traffic, with
the default configuration, and what the defaults bound (docs/model.md, "Ids and bounded memory").

    python -m benchmarks.flood --mode stage [--ids 2000000]     # TrainStage fed chunks in this process
    python -m benchmarks.flood --mode job [--ids 2000000]       # the real job on the local mini-cluster

``stage`` records this process's RSS, the rows of each table and of the cleaner, the size of the stage's pickled
state and the tombstones as the flood goes. ``job`` produces the same stream into Kafka (``benchmarks.throughput``'s
broker and producer), runs the job with the defaults and records the TaskManager JVM's RSS (thread mode: the stage
lives in it), the largest checkpoint and, at the end, the records and live keys of the embeddings topic.
``--set model.ids.max_rows=100000000`` lifts the caps, for the picture without them.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from flink_job.config import PROJECT_ROOT, JobConfig
from flink_job.kafka.produce import Record

log = logging.getLogger("benchmarks.flood")
START_TS = 1_700_000_000_000  # event time of the first event, ms
REGULAR_USERS = 1_000
ITEMS = 1_000


def events(ids: int, regular_share: float, seed: int) -> Iterator[tuple[Record, int]]:
    """``ids`` events of distinct random users and, between them, ``regular_share`` of all events from
    ``REGULAR_USERS`` returning users, 1 ms of event time apart: ``(record, ts)``."""
    rng = np.random.default_rng(seed)
    total = int(ids / (1 - regular_share))
    n, flood = 0, 0
    while n < total:
        block = min(100_000, total - n)
        regular = rng.random(block) < regular_share
        items = rng.integers(ITEMS, size=block)
        regulars = rng.integers(REGULAR_USERS, size=block)
        tags = rng.integers(2**63, size=block, dtype=np.int64)
        for j in range(block):
            if regular[j] or flood >= ids:
                user = f"r{regulars[j]}"
            else:
                user = f"f{tags[j]:x}"  # random 63-bit id: distinct with overwhelming probability
                flood += 1
            ts = START_TS + n
            payload = (f'{{"event_id":"e{n}","user_id":"{user}","item_id":"i{items[j]}","action":"click",'
                       f'"value":1.0,"ts":{ts}}}').encode()
            yield Record(user.encode(), payload, "event", f"e{n}"), ts
            n += 1


def rss_mb(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def java_children(pid: int) -> list[int]:
    """The java processes started by ``pid`` (the local mini-cluster's JVM)."""
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid=,comm="], capture_output=True, text=True, check=True).stdout
    rows = [line.split(None, 2) for line in out.splitlines()]
    return [int(p) for p, pp, comm in rows if int(pp) == pid and "java" in comm]


def dir_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20 if path.exists() else 0.0


def run_stage(cfg: JobConfig, args: argparse.Namespace) -> list[dict[str, float]]:
    from flink_job.stages.train import TrainStage

    stage = TrainStage(cfg)
    samples: list[dict[str, float]] = []
    tombstones = 0
    chunk: list[str] = []
    now = START_TS
    start = time.perf_counter()
    for n, (rec, _ts) in enumerate(events(args.ids, args.regular, args.seed), 1):
        chunk.append(f"0,{n},{rec.payload.decode()}")
        if len(chunk) < args.chunk:
            continue
        now += 100
        out = stage.on_chunk(chunk, now_ms=now)
        tombstones += sum(v is None for _k, v in out.embeddings)
        chunk = []
        if n % args.sample_every < args.chunk:
            m = stage.model
            row = {
                "events": n, "seconds": round(time.perf_counter() - start, 1), "python_rss_mb": round(rss_mb(), 1),
                "user_ids": len(m.users), "user_rows_allocated": m.user_table.params.shape[0],
                "item_ids": len(m.items), "cleaner_users": len(stage.cleaner.users),
                "evaluator_users": len(stage.quality._seen_users) if stage.quality else 0,
                "state_mb": round(len(stage.state_bytes()) / 2**20, 1), "tombstones": tombstones,
                "evicted": stage.counters.evicted,
            }
            samples.append(row)
            log.info("flood: %s", row)
    return samples


def run_job(cfg: JobConfig, args: argparse.Namespace) -> tuple[list[dict[str, float]], dict[str, int]]:
    from deploy.jars import export_job_jars
    from deploy.kafka import Broker, create_topics, job_topics
    from flink_job.kafka.produce import send
    from flink_job.flink.runner import LocalJob
    from flink_job.kafka.topics import end_offsets, read_all

    export_job_jars()
    broker = Broker(args.port, args.port + 1, PROJECT_ROOT / ".run" / "bench-flood-kafka")
    run = time.strftime("%H%M%S")
    topic = f"flood.input.{args.ids}.{args.seed}"
    cfg = JobConfig.load(overrides=[
        f"kafka.bootstrap={broker.bootstrap}", f"kafka.input_topic={topic}",
        f"kafka.embeddings_topic=flood.{run}.embeddings", f"kafka.dead_letter_topic=flood.{run}.dead-letters",
        f"kafka.stats_topic=flood.{run}.stats", f"kafka.group_id=flood-{run}", *args.overrides,
    ])
    samples: list[dict[str, float]] = []
    with broker.running(keep=args.keep):  # stopped however this ends, unless --keep
        topics = job_topics(cfg)
        create_topics(broker.bootstrap, {topic: topics.pop(topic)}, 2)
        create_topics(broker.bootstrap, topics)
        n_input = sum(end_offsets(broker.bootstrap, topic).values())
        if n_input < args.ids:
            n_input = send(events(args.ids, args.regular, args.seed), broker.bootstrap, topic)
        start = time.perf_counter()
        with LocalJob(cfg, scratch_checkpoints=True) as job:
            checkpoints = Path(job.cfg.flink.checkpoint_dir.removeprefix("file://"))
            jvms = java_children(os.getpid())
            last_sample = 0.0

            def sample(stats: dict[str, int]) -> None:
                nonlocal last_sample
                if time.perf_counter() - last_sample < args.sample_s:
                    return
                last_sample = time.perf_counter()
                chk = [dir_mb(p) for p in checkpoints.rglob("chk-*")]
                row = {
                    "seconds": round(last_sample - start, 1), "received": stats.get("received", 0),
                    "trained": stats.get("trained", 0), "known_users": stats.get("known_users", 0),
                    "evicted": stats.get("evicted", 0), "expired": stats.get("expired", 0),
                    "jvm_rss_mb": round(sum(rss_mb(p) for p in jvms), 1), "client_rss_mb": round(rss_mb(), 1),
                    "largest_checkpoint_mb": round(max(chk, default=0.0), 1),
                }
                samples.append(row)
                log.info("flood: %s", row)

            job.wait_idle(idle_s=10.0, timeout_s=args.timeout, min_received=int(n_input * 0.99), progress=sample)
            last_sample = 0.0
            sample(job.result.last)
        records = read_all(broker.bootstrap, cfg.kafka.embeddings_topic)
        latest: dict[bytes | None, bool] = {}
        for key, value, _p, _o in records:
            latest[key] = value is not None
        topic_figures = {
            "records": len(records), "tombstones": sum(v is None for _k, v, _p, _o in records),
            "live_user_keys": sum(live for k, live in latest.items() if k and k.startswith(b"user:")),
            "live_item_keys": sum(live for k, live in latest.items() if k and k.startswith(b"item:")),
        }
        return samples, topic_figures


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=("stage", "job"), default="stage")
    p.add_argument("--ids", type=int, default=2_000_000, help="distinct random user ids, one event each")
    p.add_argument("--regular", type=float, default=0.1, help="share of events from returning users")
    p.add_argument("--chunk", type=int, default=2_000, help="lines per on_chunk call (stage mode)")
    p.add_argument("--sample-every", type=int, default=200_000, help="events between samples (stage mode)")
    p.add_argument("--sample-s", type=float, default=15.0, help="seconds between samples (job mode)")
    p.add_argument("--timeout", type=float, default=3600.0)
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--port", type=int, default=19592)
    p.add_argument("--keep", action="store_true", help="job mode: leave the broker this run started running "
                   "afterwards (default: stop it, even on error)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--out", type=Path, default=None, help="append the result as a JSON line to this file")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = JobConfig.load(overrides=args.overrides)
    m = cfg.model
    bound = {"max_rows": m.ids.max_rows, "ttl_ms": m.ids.ttl_ms, "admit_after": m.ids.admit_after,
             "bytes_per_row": 4 * (m.dim + 2) + 12 + 3 * 8 + 1 + 3 * 8}
    result: dict[str, object] = {"date": time.strftime("%Y-%m-%d"), "mode": args.mode, "ids": args.ids,
                                 "regular_share": args.regular, "overrides": args.overrides, "bound": bound}
    if args.mode == "stage":
        result["samples"] = run_stage(cfg, args)
    else:
        result["samples"], result["embeddings_topic"] = run_job(cfg, args)
    print(json.dumps(result, indent=1))
    if args.out:
        with args.out.open("a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
