"""Prequential quality on the synthetic generator's stream, in process, as the job would see it: the generator's
events parsed and cleaned by the job's own stages, each micro-batch tested (RMSE, HR@10 and its cold-start slices)
before the model trains on it, with the job's weights and positives (``clean.action_weights``, ``eval.*``).

    python -m benchmarks.synthetic_quality [--events 100000] [--batch-size 256] [--set model.cold.unknown_users=...]
"""
from __future__ import annotations

import argparse
import logging

import numpy as np
from tqdm import tqdm

from flink_job.config import JobConfig
from flink_job.schema import ACTIONS, RATING_CODE
from flink_job.stages.clean import Cleaner
from flink_job.stages.parse import EventBatch, ParseRules, parse_lines
from flink_job.tools.generate import SyntheticConfig, generate
from model.mf import OnlineBiasedMF
from model.prequential import Prequential

log = logging.getLogger(__name__)


def cleaned_stream(syn: SyntheticConfig, cfg: JobConfig) -> EventBatch:
    """The generator's valid events through the job's parser and cleaner, in stream order."""
    rules = ParseRules(cfg.clean.max_id_length, cfg.model.rating_min, cfg.model.rating_max)
    lines = [f"0,{n},{r.payload.decode()}" for n, r in enumerate(generate(syn)) if r.kind == "event"]
    batch, dead = parse_lines(lines, rules, now_ms=syn.start_ts_ms + 10**12)
    kept, rejected = Cleaner(cfg.clean).apply(batch)
    if dead or rejected:
        raise RuntimeError(f"synthetic: {len(dead) + len(rejected)} events rejected by the job's stages")
    return kept


def run(stream: EventBatch, cfg: JobConfig, batch_size: int) -> dict[str, float]:
    """Test then train, batch by batch; the final prequential summary."""
    model = OnlineBiasedMF(cfg.model, RATING_CODE)
    ev = Prequential(cfg.eval.k, cfg.model.rating_min, cfg.model.rating_max)
    weight = np.array([float(cfg.clean.action_weights.get(a, 1.0)) for a in ACTIONS], np.float32)  # (A,)
    positive_action = np.array([a in cfg.eval.positive_action_list for a in ACTIONS], bool)  # (A,)
    for s in tqdm(range(0, len(stream), batch_size), desc="model", disable=None, mininterval=1.0):
        b = stream.slice(s, s + batch_size)
        is_rating = b.actions == RATING_CODE
        ratings = np.where(is_rating, b.values, np.nan)
        positive = np.where(is_rating, b.values >= cfg.eval.positive_rating, positive_action[b.actions])

        def test(part: slice, offset: np.ndarray, b: EventBatch = b) -> None:  # each sub-step, as the job tests it
            ev.evaluate(model, b.users[part], b.items[part], ratings[part], positive[part], offset)
        model.learn_many(b.users, b.items, b.actions, b.values, weight[b.actions] * b.values, b.ts, evaluate=test)
    return ev.summary()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=100_000)
    p.add_argument("--users", type=int, default=5_000)
    p.add_argument("--items", type=int, default=2_000)
    p.add_argument("--seed", type=int, default=42, help="the generator's seed")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="a job setting")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = JobConfig.load(overrides=args.set)
    syn = SyntheticConfig(n_users=args.users, n_items=args.items, n_events=args.events, seed=args.seed)
    s = run(cleaned_stream(syn, cfg), cfg, args.batch_size)
    print(f"synthetic seed {args.seed}, {args.events:,} events, batch {args.batch_size}, settings {args.set or 'none'}"
          f": RMSE {s['rmse']:.4f} HR@10 {s['hr']:.4f} "
          f"cold users {s['hr_cold_users']:.4f} ({s['positives_cold_users']:,}) cold items {s['hr_cold_items']:.4f} "
          f"({s['positives_cold_items']:,}), {s['positives']:,} positives")


if __name__ == "__main__":
    main()
