"""The producer command: writes a synthetic stream or a MovieLens file into the input topic, with a progress bar.

    python -m flink_job.tools.produce synthetic --events 100000 --duplicates 0.05 --malformed 0.01 --late 0.01
    python -m flink_job.tools.produce movielens ML100K_DIR/u.data --speed 3600 --rate 5000

``--rate`` caps the events per second sent; ``--speed`` replays in event time scaled by that factor
(3600: one hour of the file per second). Without either, records are sent as fast as the broker takes them.
"""
from __future__ import annotations

import argparse
import logging
from collections.abc import Iterator
from pathlib import Path

from flink_job.kafka.produce import Pacing, Record, send
from flink_job.tools.generate import SyntheticConfig, generate

log = logging.getLogger(__name__)


def movielens_records(path: Path, id_prefix: str = "ml", repeat: int = 1) -> Iterator[tuple[Record, int]]:
    """MovieLens ``user item rating unix_seconds`` lines as rating events, stably sorted by time.

    Yields ``(record, ts_ms)``; ``repeat`` > 1 replays the file again with fresh event ids and shifted times.
    """
    rows = []
    for n, line in enumerate(path.read_text().splitlines()):
        parts = line.split("\t")
        if len(parts) != 4:
            raise ValueError(f"movielens: line {n + 1} of {path} has {len(parts)} fields, expected 4: {line!r}")
        rows.append((int(parts[3]), n, parts[0], parts[1], float(parts[2])))
    rows.sort(key=lambda r: (r[0], r[1]))  # stable: ties keep the file's order
    span = rows[-1][0] - rows[0][0] + 1
    for rep in range(repeat):
        for ts, n, user, item, rating in rows:
            ts_ms = (ts + rep * span) * 1000
            eid = f"{id_prefix}{rep}-{n}"
            payload = (
                f'{{"event_id":"{eid}","user_id":"u{user}","item_id":"i{item}","action":"rating",'
                f'"value":{rating},"ts":{ts_ms}}}'
            ).encode()
            yield Record(f"u{user}".encode(), payload, "event", eid), ts_ms


def synthetic_timed(cfg: SyntheticConfig) -> Iterator[tuple[Record, int]]:
    step_ms = 1000.0 / cfg.events_per_second
    for n, rec in enumerate(generate(cfg)):
        yield rec, int(n * step_ms)


def main(argv: list[str] | None = None) -> None:
    from flink_job.config import JobConfig

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bootstrap", default=JobConfig().kafka.bootstrap)
    p.add_argument("--config", type=Path, default=None, help="job config whose kafka.client_properties to use")
    p.add_argument("--topic", default=JobConfig().kafka.input_topic)
    p.add_argument("--rate", type=float, default=None, help="cap on events per second")
    p.add_argument("--speed", type=float, default=None, help="event-time speed-up factor")
    sub = p.add_subparsers(dest="source", required=True)
    s = sub.add_parser("synthetic", help="planted-structure generator")
    s.add_argument("--events", type=int, default=100_000)
    s.add_argument("--users", type=int, default=5_000)
    s.add_argument("--items", type=int, default=2_000)
    s.add_argument("--dim", type=int, default=16)
    s.add_argument("--seed", type=int, default=42)
    s.add_argument("--drift", type=float, default=0.0)
    s.add_argument("--duplicates", type=float, default=0.0, help="share of records that repeat an earlier event")
    s.add_argument("--malformed", type=float, default=0.0, help="share of records that are malformed")
    s.add_argument("--late", type=float, default=0.0, help="share of events hours behind the stream's event time")
    s.add_argument("--id-prefix", default="s")
    m = sub.add_parser("movielens", help="replay a MovieLens u.data file in event-time order")
    m.add_argument("path", type=Path)
    m.add_argument("--repeat", type=int, default=1, help="replay the file N times with fresh event ids")
    m.add_argument("--id-prefix", default="ml")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    pacing = Pacing(rate=args.rate, speed=args.speed)
    # Security settings (SASL/SSL) from the job's configuration: STREAMREC__KAFKA__CLIENT_PROPERTIES or --config.
    security = JobConfig.load(args.config).kafka.librdkafka_properties()
    if args.source == "synthetic":
        cfg = SyntheticConfig(
            n_users=args.users, n_items=args.items, n_events=args.events, dim=args.dim, seed=args.seed,
            drift=args.drift, duplicate_rate=args.duplicates, malformed_rate=args.malformed, late_rate=args.late, id_prefix=args.id_prefix,
        )
        log.info("synthetic stream: seed %d, %d events", cfg.seed, cfg.n_events)
        n = send(synthetic_timed(cfg), args.bootstrap, args.topic, pacing, total=cfg.n_events, extra_config=security)
    else:
        n = send(movielens_records(args.path, args.id_prefix, args.repeat), args.bootstrap, args.topic, pacing,
                 extra_config=security)
    log.info("sent %d records to %s", n, args.topic)


if __name__ == "__main__":
    main()
