"""Offline speed of the Python half on one core: parsing, cleaning, the model's ``learn_many`` and the training stage.

    python -m benchmarks.train_speed [--events 200000] [--batch 4096] [--dim 32]
    python -m benchmarks.train_speed --grid [--batches 256,1024,4096] [--dims 16,32,64]   # learn_many samples/s

The grid runs ``learn_many`` alone on the configured device (CUDA when present, else the CPU) for every batch size
and dimension and prints a Markdown table of samples/s.
"""
from __future__ import annotations

import argparse
import json
import time

from flink_job.stages.clean import Cleaner
from flink_job.config import CleanConfig, JobConfig
from flink_job.tools.generate import SyntheticConfig, generate
from flink_job.stages.parse import parse_lines
from flink_job.stages.train import TrainStage
from model.config import ModelConfig
from model.mf import OnlineBiasedMF


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=200_000)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--grid", action="store_true", help="learn_many samples/s per batch size and dimension")
    p.add_argument("--batches", default="256,1024,4096")
    p.add_argument("--dims", default="16,32,64")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = p.parse_args()
    if args.grid:
        grid([int(b) for b in args.batches.split(",")], [int(d) for d in args.dims.split(",")], args.events,
             args.device)
        return
    lines = [f"0,{n},{r.payload.decode()}" for n, r in enumerate(generate(SyntheticConfig(n_events=args.events)))]

    start = time.perf_counter()
    batch, _ = parse_lines(lines)
    parse_s = time.perf_counter() - start

    parts = [batch.slice(i, i + args.batch) for i in range(0, len(batch) - args.batch + 1, args.batch)]
    cleaner = Cleaner(CleanConfig())
    cleaner.apply(parts[0])  # warm-up
    start = time.perf_counter()
    for b in parts[1:]:
        cleaner.apply(b)
    clean_s = time.perf_counter() - start

    model = OnlineBiasedMF(ModelConfig(dim=args.dim))
    model.learn_many(parts[0].users, parts[0].items, parts[0].actions, parts[0].values)  # warm-up
    start = time.perf_counter()
    for b in parts[1:]:
        model.learn_many(b.users, b.items, b.actions, b.values)
    train_s = time.perf_counter() - start

    stage = TrainStage(JobConfig.load(overrides=[f"batch.size={args.batch}", f"model.dim={args.dim}"]))
    start = time.perf_counter()
    for i in range(0, len(lines), 2000):
        stage.on_chunk(lines[i:i + 2000])
    stage.on_time(now_ms=2**62)
    stage_s = time.perf_counter() - start

    print(json.dumps({
        "events": len(lines), "batch": args.batch, "dim": args.dim, "device": str(model.device),
        "parse_lines_per_s": round(len(lines) / parse_s),
        "clean_events_per_s": round((len(parts) - 1) * args.batch / clean_s),
        "clean_us_per_event": round(clean_s / ((len(parts) - 1) * args.batch) * 1e6, 3),
        "learn_many_ms_per_batch": round(train_s / (len(parts) - 1) * 1000, 2),
        "learn_many_events_per_s": round((len(parts) - 1) * args.batch / train_s),
        "train_stage_events_per_s": round(len(lines) / stage_s),
    }, indent=2))


def grid(batches: list[int], dims: list[int], events: int, device: str) -> None:
    batch, _ = parse_lines([f"0,{n},{r.payload.decode()}" for n, r in enumerate(
        generate(SyntheticConfig(n_events=events)))])
    print("| batch | " + " | ".join(f"dim {d}" for d in dims) + " |")
    print("|---|" + "---|" * len(dims))
    for size in batches:
        parts = [batch.slice(i, i + size) for i in range(0, len(batch) - size + 1, size)]
        row = []
        for dim in dims:
            model = OnlineBiasedMF(ModelConfig(dim=dim, device=device))
            model.learn_many(parts[0].users, parts[0].items, parts[0].actions, parts[0].values)  # warm-up
            start = time.perf_counter()
            for b in parts[1:]:
                model.learn_many(b.users, b.items, b.actions, b.values)
            row.append(f"{(len(parts) - 1) * size / (time.perf_counter() - start):,.0f}")
        print(f"| {size} | " + " | ".join(row) + f" |  <!-- {model.device} -->")


if __name__ == "__main__":
    main()
