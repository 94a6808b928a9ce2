"""The parser's cost per record on the generator's well-formed events (the common, fast path).

    python -m benchmarks.parse_speed [--events 100000] [--repeat 9]
"""
from __future__ import annotations

import argparse
import time

from flink_job.tools.generate import SyntheticConfig, generate
from flink_job.stages.parse import parse_lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=9)
    args = ap.parse_args()
    cfg = SyntheticConfig(n_users=10_000, n_items=2_000, n_events=args.events, duplicate_rate=0, malformed_rate=0)
    lines = [f"0,{n},{r.payload.decode()}" for n, r in enumerate(generate(cfg))]
    times = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        batch, dead = parse_lines(lines, now_ms=2 * 10**12)
        times.append(time.perf_counter() - start)
        assert len(batch) == len(lines) and not dead
    times.sort()
    print(f"parse_lines: {times[0] / len(lines) * 1e6:.3f} µs/record best, {times[len(times) // 2] / len(lines) * 1e6:.3f} "
          f"median of {args.repeat}, {len(lines)} records")


if __name__ == "__main__":
    main()
