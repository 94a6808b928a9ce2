"""Embedding records published per event as the ids grow, with negatives published on drift only
(``publish.negative_tolerance``, default 0.05) and as before issue 18 (0: every row a batch moved).

    python -m benchmarks.publish_records [--events 300000] [--chunk 2000]

Drives ``TrainStage`` in process (as ``benchmarks.stage_steps`` does) with generator events (seed 7) at a few
user/item counts, chunks 100 ms apart in processing time at the default publish intervals (users 250 ms, items
1 s). The first third of the events warms the stage up and is not counted: what is left is the steady state, where
a record per event that grows with the ids is what the setting is for.
"""
from __future__ import annotations

import argparse
import time

from flink_job.config import JobConfig
from flink_job.stages.train import TrainStage
from flink_job.tools.generate import SyntheticConfig, generate

WORLDS = ((5_000, 2_000), (200_000, 50_000))
TOLERANCES = (0.0, 0.05)


def records_per_event(users: int, items: int, tolerance: float, events: int, chunk: int) -> dict[str, float]:
    syn = SyntheticConfig(n_users=users, n_items=items, n_events=events, seed=7)
    lines = [f"{n % 2},{n},{r.payload.decode()}" for n, r in enumerate(generate(syn))]
    stage = TrainStage(JobConfig.load(overrides=[f"publish.negative_tolerance={tolerance}"]))
    warm = events // 3 // chunk * chunk
    counts = {"user": 0, "item": 0}
    base = int(time.time() * 1000)  # event times must not lie ahead of processing time
    for i in range(0, len(lines), chunk):
        out = stage.on_chunk(lines[i:i + chunk], base + i // chunk * 100)
        if i >= warm:
            for key, value in out.embeddings:
                if value is not None:
                    counts[key.split(":", 1)[0]] += 1
    counted = len(lines) - warm
    assert stage.counters.trained > 0.9 * len(lines), stage.counters  # generator events are all valid ones
    return {"distinct users": len(stage.model.users), "distinct items": len(stage.model.items),
            "users/event": counts["user"] / counted, "items/event": counts["item"] / counted}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=300_000)
    p.add_argument("--chunk", type=int, default=2000)
    args = p.parse_args()
    print("| users | items | negative_tolerance | ids known at the end (users / items) | user records per event"
          " | item records per event | records per event |\n|---|---|---|---|---|---|---|")
    for users, items in WORLDS:
        for tolerance in TOLERANCES:
            r = records_per_event(users, items, tolerance, args.events, args.chunk)
            print(f"| {users:,} | {items:,} | {tolerance} | {r['distinct users']:,} / {r['distinct items']:,}"
                  f" | {r['users/event']:.3f} | {r['items/event']:.3f} | {r['users/event'] + r['items/event']:.3f} |",
                  flush=True)


if __name__ == "__main__":
    main()
