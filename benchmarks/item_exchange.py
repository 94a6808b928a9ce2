"""What the item exchange of user-sharded trainers costs per batch, against the batch's own training, in process.

    python -m benchmarks.item_exchange [--items 50000] [--users 1000000] [--batch 4096] [--warmup 30] [--batches 5]
                                       [--tolerance T]

Two replicas at the default model settings: the sender learns batches of clicks by uniform users over ``--items``
items (as ``benchmarks.scale`` draws them), takes its item delta, cuts and encodes it as the job's records
(``kafka.item_delta_record_bytes``), holding back rows moved only as negatives under ``--tolerance`` (the job's
``kafka.item_delta_tolerance`` by default); the receiver decodes and applies every record. After ``--warmup`` batches, each
step of ``--batches`` more is timed (``time.process_time``, ms): what a trainer pays for every batch of its own
(learn, take, encode) and for every batch of each other trainer (decode and apply).
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from flink_job.config import JobConfig
from model.item_delta import decode, encode, split
from model.item_sync import ItemSync
from model.mf import OnlineBiasedMF


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=50_000)
    p.add_argument("--users", type=int, default=1_000_000)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--batches", type=int, default=5)
    cfg = JobConfig.load()
    p.add_argument("--tolerance", type=float, default=cfg.kafka.item_delta_tolerance,
                   help="kafka.item_delta_tolerance of the sender (default: the job's)")
    args = p.parse_args()
    limit = cfg.kafka.item_delta_record_bytes
    sender = OnlineBiasedMF(cfg.model)
    receiver = OnlineBiasedMF(JobConfig.load(overrides=["model.seed=1"]).model)
    out, into = ItemSync(sender, args.tolerance), ItemSync(receiver)
    rng = np.random.default_rng(7)
    n = args.batch
    print("| rows in the delta | rows held | bytes | records | learn ms | take ms | encode ms | decode and apply ms |")
    print("|---|---|---|---|---|---|---|---|")
    for step in range(args.warmup + args.batches):
        users = [f"u{k}" for k in rng.integers(0, args.users, n)]
        items = [f"i{k}" for k in rng.integers(0, args.items, n)]
        t0 = time.process_time()
        sender.learn_many(users, items, np.ones(n, np.int64), np.ones(n), ts=np.full(n, 1_800_000_000_000 + step))
        t1 = time.process_time()
        delta = out.take()
        t2 = time.process_time()
        records = [encode(part) for part in split(delta, limit)]
        t3 = time.process_time()
        for record in records:
            into.apply(decode(record))
        t4 = time.process_time()
        if step >= args.warmup:
            ms = [(b - a) * 1000 for a, b in ((t0, t1), (t1, t2), (t2, t3), (t3, t4))]
            print(f"| {len(delta):,} | {out.used:,} | {sum(map(len, records)):,} | {len(records)} | "
                  + " | ".join(f"{x:.0f}" for x in ms) + " |")


if __name__ == "__main__":
    main()
