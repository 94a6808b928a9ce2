"""Bytes per embedding record and CPU µs to encode one, JSON against binary (``publish.format``), in process.

    python -m benchmarks.record_format [--rows 100000] [--dim 32]

``encode_records`` on random float32 rows (seed 7) as the publisher calls it: items (id, vector, bias, counters),
and users, which also carry their input position and 20 recent items (``clean.recent_items``), ids like the
generator's. The best of three runs of each, in ``time.process_time``; the serving side's decode of each format
(``flink_job.serving.records.parse_record``) is timed the same way.
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from flink_job.serving.config import ServingConfig
from flink_job.serving.records import parse_record
from flink_job.stages.publish import encode_records


def _best(fn: Callable[[], Any], repeat: int = 3) -> tuple[float, Any]:
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.process_time()
        result = fn()
        best = min(best, time.process_time() - start)
    return best, result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=32)
    args = p.parse_args()
    n, rng = args.rows, np.random.default_rng(7)
    common = dict(vectors=rng.normal(0, 0.1, (n, args.dim)).astype(np.float32),
                  biases=rng.normal(0, 0.5, n).astype(np.float32), updates=rng.integers(1, 10_000, n),
                  step=123_456, event_ts=rng.integers(1_700_000_000_000, 1_800_000_000_000, n),
                  events=rng.integers(1, 5_000, n))
    kinds = {
        "item": dict(ids=[f"s-item-{k}" for k in range(n)]),
        "user": dict(ids=[f"s-user-{k}" for k in range(n)], partitions=rng.integers(0, 8, n),
                     offsets=rng.integers(0, 10**9, n), seen=[[f"s-item-{k + j}" for j in range(20)] for k in range(n)]),
    }
    config = ServingConfig()
    print(f"| kind | format | bytes per record | encode µs per record | serving decode µs per record |"
          f" ({n:,} rows, dim {args.dim})\n|---|---|---|---|---|")
    for kind, extra in kinds.items():
        for fmt in ("json", "binary"):
            took, records = _best(lambda: encode_records(kind, **common, **extra, fmt=fmt))  # type: ignore[arg-type]  # noqa: B023
            raw = [(k.encode(), v) for k, v in records]
            read, _ = _best(lambda: [parse_record(k, v, config, args.dim) for k, v in raw])  # noqa: B023
            size = sum(len(v) for _, v in records) / n
            print(f"| {kind} | {fmt} | {size:.0f} | {took / n * 1e6:.2f} | {read / n * 1e6:.2f} |", flush=True)


if __name__ == "__main__":
    main()
