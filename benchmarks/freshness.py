"""Freshness, as docs/evaluation.md defines it: for each input event, the time from its append to the input topic to the
moment a consumer of the embeddings topic can read an embedding of the event's user that includes it.

    python -m benchmarks.freshness --rate 10000 --seconds 60 [--delivery exactly_once] [--set KEY=VALUE ...] [--keep]

The input topic stamps records with the broker's append time (``LogAppendTime``); a consumer thread follows the
embeddings topic (read_committed in exactly-once mode) and notes the wall-clock time it reads each user record,
which carries the newest input offset it reflects. An event's latency is the read time of the first record of its
user on its partition with an offset at or past the event's, minus the event's append time. The first
``--warmup`` seconds of input are left out (JIT and Python worker warm-up).
"""
from __future__ import annotations

import argparse
import bisect
import json
import logging
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from deploy.jars import export_job_jars
from deploy.kafka import Broker, create_topics, job_topics
from flink_job.config import PROJECT_ROOT, JobConfig
from flink_job.stages.publish import decode
from flink_job.tools.generate import SyntheticConfig
from flink_job.kafka.produce import Pacing, send
from flink_job.tools.produce import synthetic_timed
from flink_job.flink.runner import LocalJob
from flink_job.kafka.topics import Follower, consumer

log = logging.getLogger("benchmarks.freshness")


class Reflections:
    """Follows the embeddings topic: per (partition, user), the offsets reflected and when each was first read."""

    def __init__(self, bootstrap: str, topic: str, read_committed: bool) -> None:
        self.follower = Follower(bootstrap, topic, read_committed)
        # (partition, user) -> (offsets reflected, when each was first read, when the trainer encoded it)
        self.seen: dict[tuple[int, str], tuple[list[int], list[float], list[float]]] = defaultdict(
            lambda: ([], [], []))
        self.records = 0
        self.sent: list[float] = []  # per user record: from the trainer's encoding to its append to the topic
        self.delivered: list[float] = []  # and from the append to being read
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        # Short consume calls, each batch stamped as it returns: Follower.poll gathers records until the topic goes
        # quiet, which on a busy topic would stamp every record with the end of a long poll.
        consumer = self.follower.consumer
        while not self.stop.is_set():
            msgs = consumer.consume(1000, timeout=0.005)
            now = time.time()
            for m in msgs:
                if m.error() or m.value() is None:
                    continue
                rec = decode(m.value())  # JSON or binary (publish.format)
                self.records += 1
                if rec.get("kind") != "user" or rec.get("offset", -1) < 0:
                    continue
                offsets, times, produced = self.seen[(rec["partition"], rec["id"])]
                if not offsets or rec["offset"] > offsets[-1]:
                    offsets.append(rec["offset"])
                    times.append(now)
                    produced.append(rec["produced_ms"] / 1000.0)
                    self.sent.append(m.timestamp()[1] / 1000.0 - rec["produced_ms"] / 1000.0)  # appended by the broker
                    self.delivered.append(now - m.timestamp()[1] / 1000.0)

    def read_time(self, partition: int, user: str, offset: int) -> tuple[float, float] | None:
        """``(read, produced)``: when an embedding of ``user`` reflecting input ``offset`` on ``partition`` was first
        readable, and when the trainer encoded that record (its ``produced_ms``)."""
        offsets, times, produced = self.seen.get((partition, user), ([], [], []))
        k = bisect.bisect_left(offsets, offset)
        return (times[k], produced[k]) if k < len(offsets) else None


def input_events(bootstrap: str, topic: str) -> list[tuple[int, int, str, float]]:
    """``(partition, offset, user, append time s)`` of every record in the input topic."""
    from confluent_kafka import OFFSET_BEGINNING, TopicPartition

    c = consumer(bootstrap)
    meta = c.list_topics(topic, timeout=10).topics[topic]
    c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in meta.partitions])
    ends = {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in meta.partitions}
    out, done = [], {p for p, end in ends.items() if end == 0}
    while len(done) < len(ends):
        for m in c.consume(10_000, timeout=1.0):
            if m.error():
                continue
            out.append((m.partition(), m.offset(), (m.key() or b"").decode(), m.timestamp()[1] / 1000.0))
            if m.offset() + 1 >= ends[m.partition()]:
                done.add(m.partition())
    c.close()
    return out


def measure(broker: Broker, args: argparse.Namespace) -> tuple[list[tuple[int, int, str, float]], Reflections,
                                                                JobConfig, int, float]:
    """Runs the job on fresh topics at the offered rate; the input events, what the follower saw, the config, the
    events sent and the achieved rate."""
    run = f"fresh.{time.strftime('%H%M%S')}"
    cfg = JobConfig.load(overrides=[
        f"kafka.bootstrap={broker.bootstrap}", f"kafka.input_topic={run}.events", f"kafka.group_id={run}",
        f"kafka.embeddings_topic={run}.embeddings", f"kafka.dead_letter_topic={run}.dead-letters",
        f"kafka.stats_topic={run}.stats", f"publish.delivery={args.delivery}", *args.overrides,
    ])
    topics = job_topics(cfg)
    topics[cfg.kafka.input_topic] = {"message.timestamp.type": "LogAppendTime"}
    # The embeddings too, so that a record's timestamp tells when the job's sink got it to the broker.
    topics[cfg.kafka.embeddings_topic] = {**topics[cfg.kafka.embeddings_topic], "message.timestamp.type": "LogAppendTime"}
    create_topics(broker.bootstrap, {cfg.kafka.input_topic: topics.pop(cfg.kafka.input_topic)}, 2)
    create_topics(broker.bootstrap, topics)
    n_events = int(args.rate * args.seconds)
    syn = SyntheticConfig(n_events=n_events, seed=11, events_per_second=args.rate)
    reflections = Reflections(broker.bootstrap, cfg.kafka.embeddings_topic, args.delivery == "exactly_once")
    reflections.thread.start()
    try:  # the follower's thread ends before the broker stops, also on an error
        with LocalJob(cfg, scratch_checkpoints=True) as job:
            job.wait_running()
            records = list(synthetic_timed(syn))  # generated beforehand: the producer only paces and sends
            began = time.monotonic()
            sent = send(records, broker.bootstrap, cfg.kafka.input_topic, Pacing(rate=args.rate), total=n_events)
            achieved = sent / (time.monotonic() - began)
            events = input_events(broker.bootstrap, cfg.kafka.input_topic)
            # Done when nothing new was published for longer than a checkpoint interval (exactly-once commits then).
            quiet_s, last, last_change = cfg.flink.checkpoint_interval_ms / 1000 + 3, -1, time.time()
            while time.time() - last_change < quiet_s:
                if reflections.records != last:
                    last, last_change = reflections.records, time.time()
                time.sleep(0.5)
    finally:
        reflections.stop.set()
        reflections.thread.join()
    return events, reflections, cfg, sent, achieved


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", type=float, default=10_000, help="offered load, events per second")
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--warmup", type=float, default=10, help="seconds of input left out of the figures")
    p.add_argument("--delivery", choices=["at_least_once", "exactly_once"], default="at_least_once")
    p.add_argument("--port", type=int, default=19492)
    p.add_argument("--keep", action="store_true",
                   help="leave the broker this run started running afterwards (default: stop it, even on error)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--out", type=Path, default=None, help="append the result as a JSON line to this file")
    p.add_argument("--latencies-out", type=Path, default=None,
                   help="write the result with every latency (latencies_ms) as JSON, for python -m flink_job.tools.report")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    export_job_jars()
    broker = Broker(args.port, args.port + 1, PROJECT_ROOT / ".run" / "bench-kafka")
    with broker.running(keep=args.keep):
        events, reflections, cfg, sent, achieved = measure(broker, args)
    result, latencies_ms = summarise(events, reflections, args, cfg, sent)
    result["achieved_events_per_s"] = round(achieved)
    print(json.dumps(result, indent=2))
    if args.latencies_out:
        args.latencies_out.write_text(json.dumps({**result, "latencies_ms": latencies_ms}))
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(result) + "\n")


def summarise(events: list[tuple[int, int, str, float]], reflections: Reflections, args: Any, cfg: JobConfig,
              sent: int) -> tuple[dict[str, Any], list[float]]:
    start = min(t for *_x, t in events) + args.warmup
    latencies, to_trainer, unreflected = [], [], 0
    for part, offset, user, appended in events:
        if appended < start:
            continue
        seen = reflections.read_time(part, user, offset)
        if seen is None:
            unreflected += 1  # de-duplicated or dead-lettered, or never published within the wait
        else:
            latencies.append(seen[0] - appended)
            to_trainer.append(seen[1] - appended)
    ms = np.array(latencies) * 1000
    # Where the time goes: until the trainer encoded the record (source, chunk window, batch wait, training,
    # publish interval), and from then until it was readable (the worker's output, the JVM sink, the broker).
    encoded_ms = np.array(to_trainer) * 1000
    out_ms = ms - encoded_ms
    return {
        "date": time.strftime("%Y-%m-%d"),
        "delivery": args.delivery,
        "offered_events_per_s": args.rate,
        "seconds": args.seconds,
        "sent": sent,
        "measured_events": len(latencies),
        "unreflected": unreflected,
        "p50_ms": round(float(np.percentile(ms, 50)), 1),
        "p95_ms": round(float(np.percentile(ms, 95)), 1),
        "p99_ms": round(float(np.percentile(ms, 99)), 1),
        "max_ms": round(float(ms.max()), 1),
        "until_encoded_p50_ms": round(float(np.percentile(encoded_ms, 50)), 1),
        "until_encoded_p99_ms": round(float(np.percentile(encoded_ms, 99)), 1),
        "encoded_to_readable_p50_ms": round(float(np.percentile(out_ms, 50)), 1),
        "encoded_to_readable_p99_ms": round(float(np.percentile(out_ms, 99)), 1),
        "records_encoded_to_appended_p50_ms": round(float(np.percentile(np.array(reflections.sent) * 1000, 50)), 1),
        "records_appended_to_read_p50_ms": round(float(np.percentile(np.array(reflections.delivered) * 1000, 50)), 1),
        "checkpoint_interval_ms": cfg.flink.checkpoint_interval_ms,
        "bundle_time_ms": cfg.flink.bundle_time_ms,
        "publish_interval_ms": cfg.publish.interval_ms,
        "chunk_ms": cfg.batch.chunk_ms,
        "batch_max_wait_ms": cfg.batch.max_wait_ms,
        "overrides": args.overrides,
    }, [round(float(x), 2) for x in ms]


if __name__ == "__main__":
    main()
