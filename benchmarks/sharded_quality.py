"""What user-sharded trainers cost in prequential quality: P model replicas, each training its users' events and
keeping a replica of the item table that it synchronises by exchanging item deltas (``model.item_sync``).

Each transport batch is split by a stable hash of the user (CRC-32) into P sub-batches, in event order; each shard's
model tests and then trains its sub-batch as the job's train stage does (``learn_many(..., evaluate=...)``), all
tested by one prequential evaluator (the merged figures); every ``--sync-every`` batches each shard's item delta is
applied to every other shard, a shard holding back rows moved only as negatives under ``--tolerance`` (the job's
``kafka.item_delta_tolerance`` by default). A replica therefore sees the other shards' item updates of the batch it is in, and of
the batches since the last exchange, one exchange later. P = 1 is ``benchmarks.ml100k``'s model run exactly (and
``benchmarks.synthetic_quality``'s).

    python -m benchmarks.sharded_quality --data ML100K_DIR [--shards 1,2,4] [--batch-size 4096] [--sync-every 1]
                                         [--tolerance T]
    python -m benchmarks.sharded_quality --synthetic [--events 100000] [--batch-size 256]
"""
from __future__ import annotations

import argparse
import logging
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm import tqdm

from benchmarks.ml100k import _Tester, load_stream, model_config
from benchmarks.synthetic_quality import cleaned_stream
from flink_job.config import JobConfig
from flink_job.schema import ACTIONS, RATING_CODE
from flink_job.tools.generate import SyntheticConfig
from model.config import ModelConfig
from model.item_delta import decode, encode
from model.item_sync import ItemSync
from model.mf import OnlineBiasedMF
from model.prequential import Prequential

log = logging.getLogger(__name__)
Array = np.ndarray[Any, Any]


@dataclass(frozen=True)
class Events:
    """A stream as the train stage gets it, with what the evaluator tests (``ratings`` NaN where none)."""

    users: list[str]
    items: list[str]
    actions: Array  # (N,) codes
    values: Array  # (N,)
    weights: Array | None  # (N,) implicit weights; None: 1
    ts: Array | None  # (N,) event times (ms); None: no expiry
    ratings: Array  # (N,) float64, NaN: not a rating
    positive: Array  # (N,) bool: ranked by the evaluator

    def __len__(self) -> int:
        return len(self.users)

    def select(self, idx: Array) -> Events:
        def pick(a: Array | None) -> Array | None:
            return None if a is None else a[idx]

        return Events([self.users[j] for j in idx], [self.items[j] for j in idx], self.actions[idx],
                      self.values[idx], pick(self.weights), pick(self.ts), self.ratings[idx], self.positive[idx])


@dataclass(frozen=True)
class Outcome:
    shards: int
    batch_size: int
    sync_every: int
    scale: float
    tolerance: float
    summary: dict[str, float]
    delta_bytes: int  # bytes of every encoded delta written (each is read by the P - 1 other shards)


def shard_of(users: list[str], shards: int) -> Array:
    """(N,) the shard of each user: CRC-32 of its UTF-8 id modulo ``shards`` (stable across processes)."""
    return np.array([zlib.crc32(u.encode()) % shards for u in users], np.int64)


def run(stream: Events, config: ModelConfig, shards: int, batch_size: int, sync_every: int = 1,
        scale: float = 1.0, k: int = 10, tolerance: float = 0.0) -> Outcome:
    """Test then train each batch on P shards, exchanging item deltas every ``sync_every`` batches (module
    docstring); ``scale`` multiplies the parameter changes a shard applies from the others; ``tolerance`` is each
    shard's ``kafka.item_delta_tolerance``."""
    models = [OnlineBiasedMF(config, RATING_CODE) for _ in range(shards)]
    syncs = [ItemSync(m, tolerance) for m in models] if shards > 1 else []
    ev = Prequential(k, config.rating_min, config.rating_max)
    owner = shard_of(stream.users, shards)
    sent = 0
    starts = range(0, len(stream), batch_size)
    for n, s in enumerate(tqdm(starts, desc=f"P={shards} batch={batch_size}", disable=None, mininterval=2.0)):
        here = owner[s:s + batch_size]
        for p, model in enumerate(models):
            part = stream.select(s + np.flatnonzero(here == p))
            if len(part):
                model.learn_many(part.users, part.items, part.actions, part.values, part.weights, part.ts,
                                 evaluate=_Tester(ev, model, part, part.positive))  # type: ignore[arg-type]
        if syncs and ((n + 1) % sync_every == 0 or n == len(starts) - 1):
            sent += exchange(syncs, scale)
    return Outcome(shards, batch_size, sync_every, scale, tolerance, ev.summary(), sent)


def exchange(syncs: list[ItemSync], scale: float = 1.0) -> int:
    """Every shard's item delta applied to every other shard, through the wire format; the bytes written."""
    payloads = [encode(s.take()) for s in syncs]
    for p, sync in enumerate(syncs):
        for q, data in enumerate(payloads):
            if q != p:
                sync.apply(decode(data), scale)
    return sum(len(d) for d in payloads)


def ml100k_events(path: str) -> Events:
    """ML-100K as ``benchmarks.ml100k`` feeds its model: ratings only, no weights, no event times."""
    s = load_stream(path)
    return Events(s.users, s.items, np.full(len(s), RATING_CODE), s.ratings, None, None, s.ratings, s.positive)


def synthetic_events(syn: SyntheticConfig, cfg: JobConfig) -> Events:
    """The synthetic stream as ``benchmarks.synthetic_quality`` feeds its model (the job's weights and positives)."""
    b = cleaned_stream(syn, cfg)
    weight = np.array([float(cfg.clean.action_weights.get(a, 1.0)) for a in ACTIONS], np.float32)  # (A,)
    positive_action = np.array([a in cfg.eval.positive_action_list for a in ACTIONS], bool)  # (A,)
    is_rating = b.actions == RATING_CODE
    ratings = np.where(is_rating, b.values, np.nan).astype(np.float64)
    positive = np.where(is_rating, b.values >= cfg.eval.positive_rating, positive_action[b.actions])
    return Events(b.users, b.items, b.actions, b.values, weight[b.actions] * b.values, b.ts, ratings, positive)


def table(outcomes: list[Outcome], events: int) -> str:
    base = {o.batch_size: o.summary for o in outcomes if o.shards == 1}
    lines = ["| P | batch | sync every | scale | tolerance | RMSE | ΔRMSE | HR@10 | ΔHR@10 | NDCG@10 | HR@10 cold users | "
             "HR@10 cold items | delta bytes/event |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for o in outcomes:
        s, b = o.summary, base.get(o.batch_size)
        d_rmse = f"{s['rmse'] - b['rmse']:+.4f}" if b else "–"
        d_hr = f"{(s['hr'] / b['hr'] - 1) * 100:+.1f}%" if b else "–"
        lines.append(f"| {o.shards} | {o.batch_size} | {o.sync_every} | {o.scale:g} | {o.tolerance:g} | {s['rmse']:.4f} | {d_rmse} "
                     f"| {s['hr']:.4f} | {d_hr} | {s['ndcg']:.4f} | {s['hr_cold_users']:.4f} "
                     f"| {s['hr_cold_items']:.4f} | {o.delta_bytes / events:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="the ml-100k folder (or its u.data)")
    p.add_argument("--synthetic", action="store_true", help="the synthetic drifting stream instead of ML-100K")
    p.add_argument("--events", type=int, default=100_000, help="synthetic: events")
    p.add_argument("--shards", default="1,2,4", help="comma-separated parallelisms")
    p.add_argument("--batch-size", default="4096", help="comma-separated transport batch sizes")
    p.add_argument("--sync-every", type=int, default=1, help="batches between item delta exchanges")
    p.add_argument("--scale", type=float, default=1.0, help="multiplier of the parameter changes applied")
    p.add_argument("--limit", type=int, default=0, help="only the first N events (0: all)")
    cfg = JobConfig.load()
    p.add_argument("--tolerance", type=float, default=cfg.kafka.item_delta_tolerance,
                   help="kafka.item_delta_tolerance of every shard (default: the job's)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.synthetic:
        stream = synthetic_events(SyntheticConfig(n_events=args.events, n_users=5_000, n_items=2_000, seed=42), cfg)
        config = cfg.model
    elif args.data:
        stream, config = ml100k_events(args.data), model_config(0, "", [])  # as benchmarks.ml100k
    else:
        raise SystemExit("sharded_quality: --data or --synthetic")
    if args.limit:
        stream = stream.select(np.arange(min(args.limit, len(stream))))
    outcomes = [run(stream, config, int(p_), int(b), args.sync_every if int(p_) > 1 else 1, args.scale,
                    tolerance=args.tolerance)
                for b in args.batch_size.split(",") for p_ in args.shards.split(",")]
    print(table(outcomes, len(stream)))
    print(f"\n{'synthetic seed 42' if args.synthetic else args.data}: {len(stream):,} events, ModelConfig defaults"
          f"{' (job config)' if args.synthetic else ''}; users sharded by CRC-32; one evaluator over all shards; "
          "Δ against P=1 at the same batch size; delta bytes: encoded deltas written per event.")


if __name__ == "__main__":
    main()
