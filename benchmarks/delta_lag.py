"""What the item exchange's delivery lag costs user-sharded trainers in prequential quality.

The job's own training stages (``TrainStage``, one per trainer, as the job runs them) replay ML-100K at a fixed rate
on a simulated clock: every ``--chunk-ms`` each trainer gets its users' events of that window as one chunk, and each
item delta a trainer sends reaches every other trainer ``--lag-ms`` later (in the job: the trip through the delta
sink, Kafka and the delta source). Timers fire when the stages ask for them. No Flink or Kafka: this isolates the
one quantity those add to the model, the lag, so that the job's quality at P > 1 can be read against it
(``benchmarks.ml100k_job``; docs/sharding.md, "Delivery lag").

    python -m benchmarks.delta_lag --data ML100K_DIR [--trainers 4] [--batch-size 4096] [--lag-ms 0,300,1000]
                                   [--rate 20000] [--events N] [--set KEY=VALUE ...]
    python -m benchmarks.delta_lag --synthetic 100000 ...   # the generator's stream (flink_job.tools.generate)
"""
from __future__ import annotations

import argparse
import heapq
import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.sharded_quality import shard_of
from flink_job.config import JobConfig
from flink_job.stages.train import TrainStage
from flink_job.stages.train_output import Output, pooled_quality
from flink_job.stages.trainers import Trainer
from flink_job.tools.generate import SyntheticConfig, generate
from flink_job.tools.produce import movielens_records

START_MS = 1_800_000_000_000
DRAIN_LIMIT_MS = 600_000  # after the last chunk, simulated time allowed for the last batches and deltas


@dataclass
class Replay:
    """``trainers`` training stages fed ``lines`` at ``rate`` events/s, deltas delivered ``lag_ms`` after sending."""

    cfg: JobConfig
    trainers: int
    lag_ms: int
    stages: list[TrainStage] = field(init=False)
    queue: list[tuple[int, int, int, str, bytes]] = field(default_factory=list)  # (due, tie, to, key, payload)
    ties: itertools.count[int] = field(default_factory=itertools.count)

    def __post_init__(self) -> None:
        self.stages = [TrainStage(self.cfg, Trainer(i, self.trainers)) for i in range(self.trainers)]

    def sent(self, sender: int, out: Output, now: int) -> None:
        for key, payload in out.deltas:
            for to in range(self.trainers):
                if to != sender:
                    heapq.heappush(self.queue, (now + self.lag_ms, next(self.ties), to, key, payload))

    def advance(self, until: int) -> None:
        """Delivers the deltas due and fires the timers due, in time order, up to ``until``."""
        while True:
            due = [(d, i) for i, s in enumerate(self.stages) if (d := s.next_deadline_ms()) is not None and d <= until]
            delta = self.queue[0][0] if self.queue and self.queue[0][0] <= until else None
            if delta is not None and (not due or delta <= min(due)[0]):
                at, _, to, key, payload = heapq.heappop(self.queue)
                self.sent(to, self.stages[to].call(("delta", at, (key, payload))), at)
            elif due:
                at, i = min(due)
                self.sent(i, self.stages[i].on_time(at), at)
                again = self.stages[i].next_deadline_ms()
                if again is not None and again <= at:  # the job's timer would fire without end
                    raise RuntimeError(f"delta_lag: trainer {i} is due again at {again} right after its timer at {at}")
            else:
                return

    def run(self, lines: list[str], owners: list[int], rate: float, chunk_ms: int) -> int:
        """Replays ``lines`` (each for trainer ``owners[n]``); returns the simulated ms until all was trained."""
        per_chunk = max(1, round(rate * chunk_ms / 1000))
        now = START_MS
        for start in range(0, len(lines), per_chunk):
            now += chunk_ms
            self.advance(now)
            for i, stage in enumerate(self.stages):
                chunk = [lines[n] for n in range(start, min(start + per_chunk, len(lines))) if owners[n] == i]
                self.sent(i, stage.call(("chunk", now, (i, chunk))), now)
        end = now + DRAIN_LIMIT_MS
        while now < end and (self.queue or any(s.next_deadline_ms() is not None for s in self.stages)):
            now += chunk_ms
            self.advance(now)
        return now - START_MS

    def figures(self) -> dict[str, float]:
        """The trainers' prequential figures pooled as the job's stats are (``pooled_quality``), and their counts."""
        pooled = pooled_quality([s.quality.summary() for s in self.stages if s.quality]) or {}
        return {"rmse": pooled.get("rmse") or float("nan"), "hr": pooled.get("hr") or float("nan"),
                "trained": sum(s.counters.trained for s in self.stages),
                "batches": sum(s.counters.batches for s in self.stages)}


def stream(data: Path, events: int | None) -> tuple[list[str], list[str]]:
    """ML-100K as the job's input lines, in time order, and each line's user."""
    return _lines((record for record, _ in movielens_records(data)), events)


def synthetic_stream(events: int, seed: int = 42) -> tuple[list[str], list[str]]:
    """The generator's stream at its defaults (5,000 Zipf users, 2,000 items, no duplicates or malformed records):
    a second stream, with other users, items, actions and context fields than ML-100K's ratings."""
    return _lines(generate(SyntheticConfig(n_events=events, seed=seed)), events)


def _lines(records: Iterable[Any], events: int | None) -> tuple[list[str], list[str]]:
    lines, users = [], []
    for n, record in enumerate(records):
        if events is not None and n >= events:
            break
        lines.append(f"0,{n},{record.payload.decode()}")
        users.append(record.key.decode())
    return lines, users


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path, help="the ml-100k folder (or its u.data)")
    source.add_argument("--synthetic", type=int, metavar="EVENTS", help="the generator's stream of EVENTS events")
    p.add_argument("--trainers", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=JobConfig().batch.size, help="per trainer, as in the job")
    p.add_argument("--lag-ms", default="0,300,1000", help="delta delivery lags to run, comma-separated")
    p.add_argument("--rate", type=float, default=20_000.0, help="events per second of the replay")
    p.add_argument("--chunk-ms", type=int, default=JobConfig().batch.chunk_ms)
    p.add_argument("--events", type=int, default=None, help="only the first N events")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="a setting of the job's configuration (repeatable)")
    args = p.parse_args(argv)
    lines, users = stream(args.data, args.events) if args.data else synthetic_stream(args.synthetic)
    owners = shard_of(users, args.trainers).tolist()  # users split as the model-level sharding benchmark splits them
    print("| trainers | batch | lag ms | lag in events | RMSE | HR@10 | trained | batches | simulated s |")
    print("|---|---|---|---|---|---|---|---|---|")
    cfg = JobConfig.load(overrides=[f"batch.size={args.batch_size}", "eval.user_sample=1.0", *args.overrides])
    for lag in (int(x) for x in args.lag_ms.split(",")):
        replay = Replay(cfg, args.trainers, lag)
        took = replay.run(lines, owners, args.rate, args.chunk_ms)
        f = replay.figures()
        print(f"| {args.trainers} | {args.batch_size} | {lag} | {round(lag * args.rate / 1000):,} | {f['rmse']:.4f} | "
              f"{f['hr']:.4f} | {f['trained']:,} | {f['batches']:,} | {took / 1000:.1f} |", flush=True)


if __name__ == "__main__":
    main()
