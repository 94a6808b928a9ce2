"""The run command: local Kafka, a synthetic stream, the job on a mini-cluster, then a summary.

    python -m deploy.demo [--events 200000] [--duplicates 0.02] [--malformed 0.01] [--port 9092] [--keep]

Starts a broker if none is running on the port (and stops it afterwards, also on an error, Ctrl-C or SIGTERM,
unless --keep; a broker found running is left running), recreates the job's topics, produces a
seeded synthetic stream, runs the job until it has consumed the stream, and prints what happened.
"""
from __future__ import annotations

import argparse
import logging
import time
from collections import Counter
from typing import Any

from tqdm import tqdm

from deploy.jars import export_job_jars
from deploy.kafka import Broker, create_topics, job_topics
from flink_job.config import JobConfig
from flink_job.tools.generate import SyntheticConfig
from flink_job.kafka.produce import send
from flink_job.tools.produce import synthetic_timed
from flink_job.flink.runner import LocalJob
from flink_job.serving.index import EmbeddingIndex
from flink_job.kafka.topics import end_offsets, json_values, read_all

log = logging.getLogger("streamrec")


def reset_topics(bootstrap: str, cfg: JobConfig, partitions: int) -> None:
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap, **cfg.kafka.librdkafka_properties()})
    topics = job_topics(cfg)
    existing = [t for t in topics if t in admin.list_topics(timeout=10).topics]
    if existing:
        for fut in admin.delete_topics(existing, operation_timeout=30).values():
            fut.result()
        time.sleep(2)  # deletion completes asynchronously on the broker
    create_topics(bootstrap, {cfg.kafka.input_topic: topics.pop(cfg.kafka.input_topic)}, partitions)
    create_topics(bootstrap, topics, 1)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=200_000)
    p.add_argument("--duplicates", type=float, default=0.02)
    p.add_argument("--malformed", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--port", type=int, default=9092)
    p.add_argument("--partitions", type=int, default=2)
    p.add_argument("--keep", action="store_true",
                   help="leave the broker this run started running afterwards (default: stop it, even on error)")
    p.add_argument("--config", default=None, help="job YAML config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    export_job_jars()
    broker = Broker(args.port, args.port + 1)
    with broker.running(keep=args.keep):
        cfg = JobConfig.load(args.config, [f"kafka.bootstrap={broker.bootstrap}", *args.overrides])
        reset_topics(broker.bootstrap, cfg, args.partitions)
        syn = SyntheticConfig(n_events=args.events, seed=args.seed, duplicate_rate=args.duplicates,
                              malformed_rate=args.malformed)
        log.info("producing %d synthetic events (seed %d)", syn.n_events, syn.seed)
        send(synthetic_timed(syn), broker.bootstrap, cfg.kafka.input_topic, total=syn.n_events)
        read = sum(end_offsets(broker.bootstrap, cfg.kafka.input_topic).values())

        log.info("running the job on a local mini-cluster")
        with tqdm(total=read, unit="ev", desc="trained+dead-lettered") as bar, LocalJob(cfg, scratch_checkpoints=True) as job:
            def progress(s: dict[str, Any]) -> None:
                bar.n = s["received"]
                bar.refresh()

            result = job.wait_idle(idle_s=5.0, progress=progress)
        last = result.last
        dead = list(json_values(read_all(broker.bootstrap, cfg.kafka.dead_letter_topic)))
        embeddings = read_all(broker.bootstrap, cfg.kafka.embeddings_topic)
        with EmbeddingIndex(broker.bootstrap, cfg.kafka.embeddings_topic,
                            client_properties=cfg.kafka.librdkafka_properties()) as index:
            index.wait_until(lambda ix: ix.ready, timeout=60)
            user = max(index.user_ids(), key=lambda u: index.user_version(u) or 0)
            rec = index.recommend(user, 10)
            ids = index.stats()
        secs = result.last_batch_s - result.first_chunk_s
        quality = last.get("prequential") or {}
        print("\n=== streamrec summary ===")
        print(f"events read:          {read}")
        print(f"dead-lettered:        {len(dead)}  {dict(Counter(d['reason'] for d in dead))}")
        print(f"de-duplicated:        {read - last['received']} exact (same event id, in the JVM), "
              f"{last['near_duplicates']} near (same user, item and action within the window)")
        print(f"trained:              {last['trained']}")
        print(f"batches:              {last['batch']} (size {cfg.batch.size})")
        if quality:
            print(f"prequential quality:  HR@{cfg.eval.k} {quality['hr']:.4f}, NDCG@{cfg.eval.k} {quality['ndcg']:.4f} "
                  f"over {quality['positives']} positives (users sampled: {cfg.eval.user_sample:.0%})")
        print(f"embeddings published: {len(embeddings)} records, {ids['users'] + ids['items']} ids")
        print(f"known users / items:  {last['known_users']} / {last['known_items']}")
        print(f"processing time:      {secs:.1f} s ({last['received'] / max(secs, 1e-9):,.0f} events/s after start-up)")
        print(f"top 10 items for {user} (user version {rec.user_version}, {rec.excluded_seen} seen items left out):")
        for scored in rec.items:
            print(f"  {scored.id:>8}  {scored.score:+.3f}  v{scored.version}")


if __name__ == "__main__":
    main()
