"""Where the training stage's time goes, offline: CPU µs per event of each step of ``TrainStage.on_chunk`` at the
default configuration, on generator events like the throughput benchmark's (seed 7, 2% duplicates, 1% malformed).

    python -m benchmarks.stage_steps [--events 200000] [--chunk 2000]
    python -m benchmarks.stage_steps --events 600000 --users 1000000 --items 50000   # issue 18's scale stream

Each step is timed by wrapping it (a few calls per chunk, so the wrappers cost nothing measurable) with
``time.process_time``: CPU time, which a shared machine's other processes inflate less than the wall clock. A step
called inside another (the prequential evaluation inside ``learn_many``) counts in its own line only: the outer line
is its time without the inner. The first 20,000 events warm the stage up and are not counted; chunks are 100 ms
apart in processing time. With ``--users`` the users are drawn uniformly and each event's item from 256 random
items of ``--items``, as ``benchmarks.scale`` feeds the job; without it, the generator's Zipf stream (5,000 users,
2,000 items).
"""
from __future__ import annotations

import argparse
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import flink_job.stages.admission as admission
import flink_job.stages.publisher as publisher
from flink_job.config import JobConfig
from flink_job.stages.clean import Cleaner
from flink_job.stages.lateness import Watermarks
from flink_job.stages.near_dups import NearDuplicates
from flink_job.stages.train import TrainStage
from flink_job.tools.generate import SyntheticConfig, generate
from model.mf import OnlineBiasedMF
from model.prequential import Prequential

WARM_UP = 20_000
STEPS: list[tuple[Any, str, str]] = [  # (owner, attribute, label) in the order the stage runs them
    (admission, "parse_lines", "parse"),
    (Watermarks, "split", "lateness"),
    (NearDuplicates, "filter", "near-duplicates"),
    (Cleaner, "apply", "clean"),
    (Prequential, "evaluate", "evaluation"),
    (OnlineBiasedMF, "learn_many", "model learn_many"),
    (TrainStage, "_touch", "touch dirty rows"),
    (TrainStage, "_publish", "publish (all)"),
    (publisher, "encode_records", "  of which encode_records"),
    (TrainStage, "_stats", "stats records"),
]


def _timed(spent: dict[str, float], fn: Callable[..., Any], label: str) -> Callable[..., Any]:
    """``fn`` whose CPU time, less that of the timed steps it calls, adds to ``spent[label]``."""
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.process_time()
        inner = spent["_nested"]
        try:
            return fn(*args, **kwargs)
        finally:
            took = time.process_time() - start
            spent[label] += took - (spent["_nested"] - inner)
            if not label.startswith(" "):  # an "of which" line is inside its outer one already
                spent["_nested"] = inner + took
    return wrapper


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=200_000)
    p.add_argument("--chunk", type=int, default=2000)
    p.add_argument("--users", type=int, default=0, help="distinct users drawn uniformly (0: the Zipf stream)")
    p.add_argument("--items", type=int, default=50_000, help="the catalogue, with --users")
    args = p.parse_args()
    syn = SyntheticConfig(n_events=args.events, seed=7, duplicate_rate=0.02, malformed_rate=0.01)
    if args.users:
        syn = replace(syn, n_users=args.users, n_items=args.items, user_activity="uniform", item_candidates=256)
    lines = [f"{n % 2},{n},{r.payload.decode()}" for n, r in enumerate(generate(syn))]
    spent: dict[str, float] = defaultdict(float)
    for owner, name, label in STEPS:
        setattr(owner, name, _timed(spent, getattr(owner, name), label))
    stage = TrainStage(JobConfig.load())
    base = int(time.time() * 1000)
    chunks = [(i, lines[i:i + args.chunk]) for i in range(0, len(lines), args.chunk)]
    for i, chunk in chunks:
        if i == WARM_UP:
            spent.clear()
            start = time.process_time()
        stage.on_chunk(chunk, base + i // args.chunk * 100)
    stage.on_time(base + 10**9)
    total = time.process_time() - start
    n = len(lines) - WARM_UP
    print(f"| step | CPU µs per event ({n:,} events, chunks of {args.chunk}) |\n|---|---|")
    for _, _, label in STEPS:
        print(f"| {label} | {spent[label] / n * 1e6:.2f} |")
    timed = sum(v for k, v in spent.items() if not k.startswith((" ", "_")))
    print(f"| everything else | {(total - timed) / n * 1e6:.2f} |\n| on_chunk in all | {total / n * 1e6:.2f} |")


if __name__ == "__main__":
    main()
