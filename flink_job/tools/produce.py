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

import orjson

from flink_job.kafka.produce import Pacing, Record, send
from flink_job.tools.movielens import item_genres, ratings_file, read_ratings
from flink_job.tools.generate import SyntheticConfig, generate

log = logging.getLogger(__name__)


def movielens_records(path: Path, id_prefix: str = "ml", repeat: int = 1, rating_min: float = 1.0,
                      rating_max: float = 5.0) -> Iterator[tuple[Record, int]]:
    """MovieLens ``user item rating unix_seconds`` lines as rating events, stably sorted by time; the rating as the
    number written (3.5 stays 3.5), checked against ``[rating_min, rating_max]``, and the movie's genres as the
    event's ``category`` when ``u.item`` lies beside the file (``flink_job.tools.movielens``).

    Yields ``(record, ts_ms)``; ``repeat`` > 1 replays the file again with fresh event ids and shifted times.
    """
    rows = read_ratings(path, rating_min, rating_max)
    genres = item_genres(ratings_file(path))
    span = rows[-1].ts - rows[0].ts + 1
    for rep in range(repeat):
        for r in rows:
            ts_ms = (r.ts + rep * span) * 1000
            eid = f"{id_prefix}{rep}-{r.line}"
            event = {"event_id": eid, "user_id": f"u{r.user}", "item_id": f"i{r.item}", "action": "rating",
                     "value": r.rating, "ts": ts_ms}
            if r.item in genres:
                event["category"] = genres[r.item]
            yield Record(f"u{r.user}".encode(), orjson.dumps(event), "event", eid), ts_ms


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
    m.add_argument("--rating-min", type=float, default=None,
                   help="lowest rating of the file's scale (default: the job config's model.rating_min)")
    m.add_argument("--rating-max", type=float, default=None,
                   help="highest rating (default: model.rating_max); e.g. --rating-min 0.5 for half stars")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    pacing = Pacing(rate=args.rate, speed=args.speed)
    # Security settings (SASL/SSL) from the job's configuration: STREAMREC__KAFKA__CLIENT_PROPERTIES or --config.
    job_cfg = JobConfig.load(args.config)
    security = job_cfg.kafka.librdkafka_properties()
    if args.source == "synthetic":
        cfg = SyntheticConfig(
            n_users=args.users, n_items=args.items, n_events=args.events, dim=args.dim, seed=args.seed,
            drift=args.drift, duplicate_rate=args.duplicates, malformed_rate=args.malformed, late_rate=args.late, id_prefix=args.id_prefix,
        )
        log.info("synthetic stream: seed %d, %d events", cfg.seed, cfg.n_events)
        n = send(synthetic_timed(cfg), args.bootstrap, args.topic, pacing, total=cfg.n_events, extra_config=security)
    else:
        lo = job_cfg.model.rating_min if args.rating_min is None else args.rating_min
        hi = job_cfg.model.rating_max if args.rating_max is None else args.rating_max
        n = send(movielens_records(args.path, args.id_prefix, args.repeat, lo, hi), args.bootstrap, args.topic,
                 pacing, extra_config=security)
    log.info("sent %d records to %s", n, args.topic)


if __name__ == "__main__":
    main()
