"""Recovery from preference drift: the online model against a copy frozen at the drift point.

A small planted world: users and items fall into clusters; a user picks an item of its cluster's preferred item
cluster with probability ``--focus`` and any item otherwise. At the drift point every user cluster switches to
another item cluster. Both models are tested before training on each micro-batch (HR@10 over all items, windowed);
the frozen copy is restored from the online model's ``state_bytes`` at the drift point and never trained again.

    python -m benchmarks.drift [--events 120000] [--batch 256] [--window 4096] [--seed 7]
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from model.config import ModelConfig
from model.mf import OnlineBiasedMF

VIEW = 1  # click


def stream(n: int, users: int, items: int, clusters: int, focus: float, drift_at: int,
           seed: int) -> tuple[list[str], list[str]]:
    rng = np.random.default_rng(seed)
    user_cluster = rng.integers(0, clusters, users)
    item_cluster = rng.integers(0, clusters, items)
    by_cluster = [np.flatnonzero(item_cluster == c) for c in range(clusters)]
    before = rng.permutation(clusters)
    after = (before + 1 + rng.integers(0, clusters - 1)) % clusters  # every user cluster moves elsewhere
    u = rng.integers(0, users, n)
    pref = np.where(np.arange(n) < drift_at, before[user_cluster[u]], after[user_cluster[u]])
    own = np.array([by_cluster[c][rng.integers(0, len(by_cluster[c]))] for c in pref])
    i = np.where(rng.random(n) < focus, own, rng.integers(0, items, n))
    return [f"u{x}" for x in u], [f"i{x}" for x in i]


def hits(model: OnlineBiasedMF, users: list[str], items: list[str], catalogue: list[str]) -> np.ndarray:
    """(B,) whether each event's item is in the user's top 10 of the whole catalogue, before training."""
    scores = model.score_items(users, catalogue)  # (B, I)
    col = np.array([int(x[1:]) for x in items])
    own = scores[np.arange(len(items)), col]
    return (scores > own[:, None]).sum(1) < 10  # type: ignore[no-any-return]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=120_000)
    p.add_argument("--users", type=int, default=1_000)
    p.add_argument("--items", type=int, default=500)
    p.add_argument("--clusters", type=int, default=8)
    p.add_argument("--focus", type=float, default=0.8)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--window", type=int, default=4_096)
    p.add_argument("--recover", type=float, default=0.95, help="recovered at this share of the pre-drift HR@10")
    p.add_argument("--seed", type=int, default=7)
    args = p.parse_args()
    drift_at = args.events // 2
    users, items = stream(args.events, args.users, args.items, args.clusters, args.focus, drift_at, args.seed)
    catalogue = [f"i{k}" for k in range(args.items)]
    online = OnlineBiasedMF(ModelConfig(seed=args.seed))
    frozen: OnlineBiasedMF | None = None
    hit_online, hit_frozen = [], []
    start = time.perf_counter()
    for s in range(0, args.events, args.batch):
        if s >= drift_at and frozen is None:
            frozen = OnlineBiasedMF.from_bytes(online.state_bytes())
        bu, bi = users[s:s + args.batch], items[s:s + args.batch]
        hit_online.append(hits(online, bu, bi, catalogue))
        if frozen is not None:
            hit_frozen.append(hits(frozen, bu, bi, catalogue))
        n = len(bu)
        online.learn_many(bu, bi, np.full(n, VIEW), np.ones(n, np.float32))
    h_on = np.concatenate(hit_online)
    h_fr = np.concatenate(hit_frozen)
    w = args.window
    pre = float(h_on[drift_at - w:drift_at].mean())
    after = h_on[drift_at:]
    windowed = np.convolve(after, np.ones(w) / w, "valid")  # (n - w + 1,) HR over the window ending at k + w
    ok = np.flatnonzero(windowed >= args.recover * pre)
    recovered = int(ok[0] + w) if len(ok) else None
    frozen_windowed = np.convolve(h_fr, np.ones(w) / w, "valid")
    print(json.dumps({
        "events": args.events, "drift_at": drift_at, "batch": args.batch, "window": w, "seed": args.seed,
        "hr10_before_drift_online": round(pre, 4),
        "hr10_popularity_level": round(10 / args.items, 4),
        "events_after_drift_until_online_recovers": recovered,
        "recover_threshold": round(args.recover * pre, 4),
        "hr10_last_window_online": round(float(h_on[-w:].mean()), 4),
        "hr10_last_window_frozen": round(float(h_fr[-w:].mean()), 4),
        "frozen_ever_recovers": bool((frozen_windowed >= args.recover * pre).any()),
        "seconds": round(time.perf_counter() - start, 1),
    }, indent=2))


if __name__ == "__main__":
    main()
