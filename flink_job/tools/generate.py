"""Synthetic user-behaviour streams with a planted structure, drift, duplicates and malformed records.

Users and items get latent vectors (and each item a category near its vector); each event picks a user (Zipf-like
activity, or uniformly with ``user_activity="uniform"``), then an item by sampling from the softmax of the user's
affinities (Gumbel-max, vectorised per block; over ``item_candidates`` items drawn at random when set, which keeps
large catalogues fast). Preference drift moves every user's vector from its first
planted vector toward a second one as the stream advances. A seeded ``numpy`` generator makes every stream
reproducible: the same config yields the same bytes.

>>> cfg = SyntheticConfig(n_users=20, n_items=30, n_events=100, seed=7)
>>> a = [r.payload for r in generate(cfg)]
>>> b = [r.payload for r in generate(cfg)]
>>> a == b and len(a) == 100
True
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from flink_job.kafka.produce import Record
from flink_job.schema import ACTIONS

# How likely each action is, and the training weight an implicit action carries when produced.
ACTION_PROBS = np.array([0.45, 0.25, 0.10, 0.05, 0.15])
N_CATEGORIES = 20
LATE_AFTER = 1_000  # no late events among the first ones: before a watermark exists nothing is late
MALFORMED_KINDS: tuple[str, ...] = (
    "truncated_json", "missing_user_id", "unknown_action", "ts_not_a_number", "not_an_object", "empty_item_id",
)


@dataclass(frozen=True)
class SyntheticConfig:
    n_users: int = 5_000
    n_items: int = 2_000
    n_events: int = 100_000
    dim: int = 16
    seed: int = 42
    temperature: float = 0.25  # lower: users are more predictable
    drift: float = 0.0  # share of the way from the first to the second planted user vectors at stream end
    duplicate_rate: float = 0.0
    malformed_rate: float = 0.0
    late_rate: float = 0.0  # valid events whose event time is late_by_ms behind the stream's
    late_by_ms: int = 3 * 3600 * 1000  # beyond the job's default out-of-orderness plus allowed lateness (1 h 5 min)
    start_ts_ms: int = 1_700_000_000_000
    events_per_second: float = 1_000.0  # event-time spacing, not the producing rate
    id_prefix: str = "s"
    block: int = 8_192
    # "zipf": a few users produce many events (float64 planted vectors, the streams of existing seeds); "uniform":
    # every user equally likely, vectors in float32 (and no second set without drift), for millions of users.
    user_activity: str = "zipf"
    # 0: each event's item is drawn from the softmax over the whole catalogue (cost per event grows with n_items);
    # k > 0: over k items drawn uniformly for that event, an approximation for large catalogues.
    item_candidates: int = 0

    def __post_init__(self) -> None:
        for name in ("n_users", "n_items", "n_events", "dim", "block"):
            if getattr(self, name) <= 0:
                raise ValueError(f"synthetic config: {name} must be positive, got {getattr(self, name)}")
        for name in ("duplicate_rate", "malformed_rate", "late_rate", "drift"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"synthetic config: {name} must be in [0, 1], got {getattr(self, name)}")
        if self.user_activity not in ("zipf", "uniform"):
            raise ValueError(f"synthetic config: user_activity is zipf or uniform, got {self.user_activity!r}")
        if self.item_candidates < 0:
            raise ValueError(f"synthetic config: item_candidates must be >= 0, got {self.item_candidates}")


class PlantedWorld:
    """The hidden truth: user and item vectors (two sets of user vectors for drift) and item popularity."""

    def __init__(self, cfg: SyntheticConfig) -> None:
        rng = np.random.default_rng(cfg.seed)
        scale = 1.0 / np.sqrt(cfg.dim)
        self.user_p: np.ndarray | None = None  # None: uniform
        if cfg.user_activity == "uniform":
            # float32 and only the sets that are used: two float64 sets of 10M users would take 2.6 GB.
            self.users_before = _normal32(rng, (cfg.n_users, cfg.dim), np.sqrt(scale))  # (U, D)
            self.users_after = _normal32(rng, (cfg.n_users, cfg.dim), np.sqrt(scale)) if cfg.drift else self.users_before
        else:
            self.users_before = rng.normal(0.0, 1.0, (cfg.n_users, cfg.dim)) * np.sqrt(scale)  # (U, D)
            self.users_after = rng.normal(0.0, 1.0, (cfg.n_users, cfg.dim)) * np.sqrt(scale)  # (U, D)
        self.items = rng.normal(0.0, 1.0, (cfg.n_items, cfg.dim)) * np.sqrt(scale)  # (I, D)
        self.item_bias = rng.normal(0.0, 0.5, cfg.n_items)  # (I,)
        # Categories that say something about an item: the nearest of N_CATEGORIES random directions to its
        # planted vector (drawn last, so the draws above are those of streams made before categories).
        self.item_category = np.argmax(self.items @ rng.normal(0.0, 1.0, (cfg.dim, N_CATEGORIES)), 1)  # (I,)
        if cfg.user_activity == "zipf":
            # Zipf-like activity: a few users produce many events.
            activity = 1.0 / np.arange(1, cfg.n_users + 1) ** 0.8
            self.user_p = activity / activity.sum()
        self.cfg = cfg

    def draw_users(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if self.user_p is None:
            return rng.integers(self.cfg.n_users, size=n)  # (B,)
        return rng.choice(self.cfg.n_users, size=n, p=self.user_p)  # (B,)

    def draw_items(self, rng: np.random.Generator, users: np.ndarray, progress: float) -> tuple[np.ndarray, np.ndarray]:
        """Each user's item, Gumbel-max over the softmax of its affinities / temperature, and that affinity."""
        n, t = len(users), self.cfg.temperature
        if not self.cfg.item_candidates:
            scores = self.affinity(users, progress) / t  # (B, I)
            items = np.argmax(scores + rng.gumbel(size=scores.shape), axis=1)  # (B,)
            return items, scores[np.arange(n), items] * t
        candidates = rng.integers(self.cfg.n_items, size=(n, self.cfg.item_candidates))  # (B, K)
        vectors = self.user_vectors(users, progress)  # (B, D)
        scores = np.einsum("bd,bkd->bk", vectors, self.items[candidates]) + self.item_bias[candidates]  # (B, K)
        best = np.argmax(scores / t + rng.gumbel(size=scores.shape), axis=1)  # (B,)
        return candidates[np.arange(n), best], scores[np.arange(n), best]

    def user_vectors(self, users: np.ndarray, progress: float) -> np.ndarray:
        a = self.cfg.drift * progress
        return (1.0 - a) * self.users_before[users] + a * self.users_after[users]  # (B, D)

    def affinity(self, users: np.ndarray, progress: float) -> np.ndarray:
        return self.user_vectors(users, progress) @ self.items.T + self.item_bias  # (B, I)


def generate(cfg: SyntheticConfig) -> Iterator[Record]:
    """Yields ``cfg.n_events`` records (events, duplicates and malformed ones together), in event-time order."""
    world = PlantedWorld(cfg)
    rng = np.random.default_rng(cfg.seed + 1)
    step_ms = 1000.0 / cfg.events_per_second
    recent: list[Record] = []
    emitted = 0
    while emitted < cfg.n_events:
        n = min(cfg.block, cfg.n_events - emitted)
        progress = emitted / cfg.n_events
        users = world.draw_users(rng, n)  # (B,)
        items, chosen = world.draw_items(rng, users, progress)  # (B,), (B,)
        actions = rng.choice(len(ACTIONS), size=n, p=ACTION_PROBS)
        ratings = np.clip(np.rint(3.0 + 1.5 * chosen + rng.normal(0.0, 0.5, n)), 1, 5)
        dwell = rng.lognormal(8.5, 1.0, n).astype(np.int64)
        price = np.round(rng.lognormal(3.0, 0.8, n), 2)
        kind_draw = rng.random(n)
        for j in range(n):
            idx = emitted + j
            ts = cfg.start_ts_ms + int(idx * step_ms)
            eid = f"{cfg.id_prefix}{cfg.seed}-{idx}"
            if kind_draw[j] < cfg.duplicate_rate and recent:
                twin = recent[int(rng.integers(len(recent)))]
                yield Record(twin.key, twin.payload, "duplicate", twin.event_id)
                continue
            user = f"u{users[j]}"
            if kind_draw[j] > 1.0 - cfg.malformed_rate:
                kind = MALFORMED_KINDS[int(rng.integers(len(MALFORMED_KINDS)))]
                yield Record(user.encode(), _malformed(kind, eid, user, f"i{items[j]}", ts), kind, eid)
                continue
            action = ACTIONS[actions[j]]
            value = float(ratings[j]) if action == "rating" else 1.0
            # Late events come after the first ones, so that a watermark exists to be late against.
            late = cfg.late_rate > 0 and idx >= LATE_AFTER and kind_draw[j] > 1.0 - cfg.malformed_rate - cfg.late_rate
            if late:
                ts -= cfg.late_by_ms
            payload = (
                f'{{"event_id":"{eid}","user_id":"{user}","item_id":"i{items[j]}","action":"{action}",'
                f'"value":{value},"ts":{ts},"dwell_ms":{dwell[j]},"price":{price[j]},'
                f'"category":"c{world.item_category[items[j]]}"}}'
            ).encode()
            rec = Record(user.encode(), payload, "late" if late else "event", eid)
            if late:
                yield rec
                continue
            if len(recent) < 256:
                recent.append(rec)
            else:
                recent[int(rng.integers(256))] = rec
            yield rec
        emitted += n


def _normal32(rng: np.random.Generator, shape: tuple[int, int], std: float) -> np.ndarray:
    out = rng.standard_normal(shape, dtype=np.float32)
    out *= np.float32(std)
    return out


def _malformed(kind: str, eid: str, user: str, item: str, ts: int) -> bytes:
    good = {"event_id": eid, "user_id": user, "item_id": item, "action": "click", "value": 1.0, "ts": ts}
    if kind == "truncated_json":
        return json.dumps(good).encode()[:-7]
    if kind == "missing_user_id":
        del good["user_id"]
    elif kind == "unknown_action":
        good["action"] = "teleport"
    elif kind == "ts_not_a_number":
        good["ts"] = "yesterday"
    elif kind == "not_an_object":
        return json.dumps([eid, user, item]).encode()
    elif kind == "empty_item_id":
        good["item_id"] = ""
    return json.dumps(good).encode()
