"""Cleaning: fill missing context values, tame outliers and derive per-event features, before micro-batching.

Runs on the events that survived parsing, lateness and near-duplicate filtering. Every rule is declared in
``CleanConfig``; an event a rule rejects becomes a dead letter (stage ``clean``), never silently lost, and every
outcome is counted in ``Cleaner.counts``.

When things move: statistics move once per batch, per-user state once per event. Outlier bounds come from the values
accepted *before* the batch (a burst of outliers cannot widen its own bound); global means and the normalisation
statistics include the batch's own kept values; a user's state (previous event time, running means, recent items)
is updated event by event in input order, so events of one user in one batch see each other.

Per-user state expires by event time: a user whose newest event is more than ``user_ttl_ms`` older than the newest
event seen starts afresh (counted in ``users_expired``); expired users are removed from memory by an amortised sweep.

>>> from flink_job.config import CleanConfig
>>> from flink_job.parse import parse_lines
>>> line = '0,{n},{{"event_id":"e{n}","user_id":"u","item_id":"i{n}","action":"view","ts":{ts}{ctx}}}'
>>> batch, _ = parse_lines([line.format(n=0, ts=0, ctx=',"dwell_ms":1000,"price":9.5,"category":"books"'),
...                         line.format(n=1, ts=60_000, ctx='')], now_ms=10**6)
>>> cleaner = Cleaner(CleanConfig())
>>> kept, dead = cleaner.apply(batch)
>>> kept.dwell_ms.tolist(), kept.price.tolist(), kept.categories, dead
([1000.0, 1000.0], [9.5, 9.5], ['books', 'unknown'], [])
>>> round(float(kept.features[1, FEATURE_NAMES.index("recency_log_s")]), 3)  # log1p(60 s)
4.111
>>> cleaner.recent_items("u"), cleaner.counts["missing_dwell_ms_user_mean"], cleaner.counts["missing_category_default"]
(['i0', 'i1'], 1, 1)
"""
from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from flink_job.events import ACTIONS
from flink_job.parse import DeadLetter, EventBatch, N_FEATURES

if TYPE_CHECKING:
    from flink_job.config import CleanConfig

STAGE = "clean"
NUMERIC_FIELDS: tuple[str, ...] = ("dwell_ms", "price")
MISSING_POLICIES: dict[str, tuple[str, ...]] = {
    "dwell_ms": ("default", "global_mean", "user_mean", "drop"),
    "price": ("default", "global_mean", "user_mean", "drop"),
    "category": ("default", "drop"),
}
OUTLIER_POLICIES: tuple[str, ...] = ("clip", "drop", "off")
FEATURE_NAMES: tuple[str, ...] = ("dwell_z", "price_z", "hour_sin", "hour_cos", "dow_sin", "dow_cos", "recency_log_s")
# One counter per rule outcome. A filled value is counted under the source it came from: a user_mean policy
# falls back to the global mean, then to the default, and each fallback has its own counter.
COUNTERS: tuple[str, ...] = (
    *(f"missing_{f}_{how}" for f in NUMERIC_FIELDS for how in ("default", "global_mean", "user_mean", "dropped")),
    "missing_category_default", "missing_category_dropped",
    *(f"outlier_{f}_{how}" for f in NUMERIC_FIELDS for how in ("clipped", "dropped")),
    "users_expired",
)
Z_LIMIT = 5.0
MAD_TO_STD = 1.4826  # the MAD of a normal distribution times this is its standard deviation
MEAN_AD_TO_STD = 1.2533  # sqrt(pi / 2): the same for the mean absolute deviation, used when the MAD is 0
MS_PER_DAY = 86_400_000
EPOCH_WEEKDAY = 3  # 1970-01-01 was a Thursday; Monday is day 0
SWEEP_MIN_EVENTS = 1024


# What the cleaner remembers about one user: a plain list, indexed by the constants below. The job pickles every
# user's state at each bundle; a list pickles about ten times faster than a slotted object (measured: 28 ms against
# 3 ms for 5,000 users) and reads and writes as fast in the per-event loop.
UserState = list
LAST_TS = 0  # newest event time of the user's events
EVENTS = 1
ACTION_COUNTS = 2  # (A,) events per action code
# The last ``recent_items`` items, most recent last. Not de-duplicated: coming back to an item is a signal, and
# appending stays O(1).
RECENT = 3
DWELL_SUM, DWELL_N, PRICE_SUM, PRICE_N = 4, 5, 6, 7  # over observed (not filled) kept values, for user_mean


def new_user(ts: int) -> UserState:
    return [ts, 0, [0] * len(ACTIONS), [], 0.0, 0, 0.0, 0]


@dataclass
class Moments:
    """Count, mean and sum of squared deviations, merged a batch at a time (Chan et al.'s parallel Welford)."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def add(self, x: np.ndarray) -> None:
        nb = len(x)
        if not nb:
            return
        mean_b = float(x.mean())
        m2_b = float(np.square(x - mean_b).sum())
        n = self.n + nb
        delta = mean_b - self.mean
        self.mean += delta * nb / n
        self.m2 += m2_b + delta * delta * self.n * nb / n
        self.n = n

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.n) if self.n > 1 else 0.0


class Ring:
    """The last ``size`` values added, in a fixed numpy buffer."""

    def __init__(self, size: int) -> None:
        self.values = np.zeros(size, np.float64)
        self.pos = 0
        self.filled = 0

    def add(self, x: np.ndarray) -> None:
        size = len(self.values)
        if len(x) >= size:
            self.values[:] = x[len(x) - size:]
            self.pos, self.filled = 0, size
            return
        end = self.pos + len(x)
        if end <= size:
            self.values[self.pos:end] = x
        else:
            split = size - self.pos
            self.values[self.pos:] = x[:split]
            self.values[:end - size] = x[split:]
        self.pos = end % size
        self.filled = min(size, self.filled + len(x))

    def current(self) -> np.ndarray:
        """The values held, in no particular order (until full, they sit at the front)."""
        return self.values[:self.filled]

    def ordered(self) -> np.ndarray:
        """The values held, oldest first."""
        if self.filled < len(self.values):
            return self.values[:self.filled].copy()
        return np.concatenate([self.values[self.pos:], self.values[:self.pos]])


class Cleaner:
    """Missing values, outliers, normalisation, time features and per-user state; see the module docstring."""

    def __init__(self, cfg: CleanConfig) -> None:
        self.cfg = cfg
        self.missing = dict(cfg.missing)
        self.defaults = dict(cfg.defaults)
        self.outliers = dict(cfg.outliers)
        self.users: dict[str, UserState] = {}
        self.newest_ts = 0  # the newest event time seen; the TTL counts back from it
        self.since_sweep = 0  # events since the last sweep of expired users
        self.rings = {f: Ring(cfg.outlier_window) for f in NUMERIC_FIELDS}  # log1p of accepted values
        self.raw = {f: Moments() for f in NUMERIC_FIELDS}  # of accepted observed values: the global means
        self.logs = {f: Moments() for f in NUMERIC_FIELDS}  # of log1p(accepted observed values): the z-scores
        self.counts: dict[str, int] = dict.fromkeys(COUNTERS, 0)

    # The job keeps this in Flink state. The config is left out: a restored job runs with the config it was
    # started with, and a changed window or recent-items cap is applied to the restored state.
    def state_dict(self) -> dict[str, Any]:
        """The state to pickle; it shares the per-user states with the cleaner, so pickle it before the next apply."""
        return {
            "users": self.users,
            "newest_ts": self.newest_ts, "since_sweep": self.since_sweep,
            "rings": {f: r.ordered() for f, r in self.rings.items()},
            "raw": {f: dataclasses.astuple(m) for f, m in self.raw.items()},
            "logs": {f: dataclasses.astuple(m) for f, m in self.logs.items()},
            "counts": dict(self.counts),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.users = state["users"]
        cap = self.cfg.recent_items
        for s in self.users.values():
            del s[RECENT][:max(0, len(s[RECENT]) - cap)]
        self.newest_ts, self.since_sweep = state["newest_ts"], state["since_sweep"]
        for f in NUMERIC_FIELDS:
            self.rings[f] = Ring(self.cfg.outlier_window)
            self.rings[f].add(state["rings"][f])
            self.raw[f] = Moments(*state["raw"][f])
            self.logs[f] = Moments(*state["logs"][f])
        self.counts = {**dict.fromkeys(COUNTERS, 0), **state["counts"]}

    def recent_items(self, user: str) -> list[str]:
        """The user's last items, most recent last; empty for an unknown or expired user."""
        s = self.users.get(user)
        if s is None or s[LAST_TS] < self.newest_ts - self.cfg.user_ttl_ms:
            return []
        return list(s[RECENT])

    def apply(self, batch: EventBatch) -> tuple[EventBatch, list[DeadLetter]]:
        """``(events kept, in input order, with context filled and features, dead letters)``."""
        n = len(batch)
        if not n:
            return batch, []
        counts = self.counts
        reason = np.zeros(n, np.int8)  # (N,) 0: kept; else 1 + the index of the rule that rejects the event
        rules: list[tuple[str, str]] = []  # (reason, counter) per rule, in order of precedence
        bounds: dict[str, tuple[float, float]] = {}
        for name in NUMERIC_FIELDS:
            x = getattr(batch, name)  # (N,)
            if self.missing[name] == "drop":
                self._reject(reason, np.isnan(x), rules, f"missing_{name}", f"missing_{name}_dropped")
            b = self._bounds(name)
            if b is not None:
                bounds[name] = b
                if self.outliers[name] == "drop":
                    self._reject(reason, (x < b[0]) | (x > b[1]), rules, f"outlier_{name}", f"outlier_{name}_dropped")
        if self.missing["category"] == "drop":
            absent = np.array([c is None for c in batch.categories], bool)
            self._reject(reason, absent, rules, "missing_category", "missing_category_dropped")

        dead: list[DeadLetter] = []
        if rules and reason.any():
            for i in np.flatnonzero(reason).tolist():
                why, counter = rules[reason[i] - 1]
                counts[counter] += 1
                dead.append(DeadLetter(why, STAGE, batch.payloads[i], int(batch.partitions[i]),
                                       int(batch.offsets[i]), self._detail(batch, i, why, bounds)))
            batch = batch.select(np.flatnonzero(reason == 0))
            if not len(batch):
                return batch, dead
        m = len(batch)

        # Numeric fields: clip, then learn the statistics from the observed (not filled) kept values.
        cols: dict[str, np.ndarray] = {}
        for name in NUMERIC_FIELDS:
            x = getattr(batch, name).astype(np.float64)  # (M,) a copy: the input batch is left as it was
            observed = ~np.isnan(x)
            if name in bounds and self.outliers[name] == "clip":
                lo, hi = bounds[name]
                out = (x < lo) | (x > hi)
                if out.any():
                    counts[f"outlier_{name}_clipped"] += int(out.sum())
                    np.clip(x, lo, hi, out=x)  # NaN stays NaN
            seen = x[observed]
            self.raw[name].add(seen)
            logs = np.log1p(seen)
            self.logs[name].add(logs)
            self.rings[name].add(logs)
            cols[name] = x

        gaps = self._users(batch, cols)

        # Fill what is still missing: the user_mean fills happened in _users, in input order.
        for name in NUMERIC_FIELDS:
            x, policy = cols[name], self.missing[name]
            holes = np.isnan(x)
            if holes.any():
                k = int(holes.sum())
                if policy != "default" and self.raw[name].n:
                    x[holes] = self.raw[name].mean
                    counts[f"missing_{name}_global_mean"] += k
                else:
                    x[holes] = float(self.defaults[name])
                    counts[f"missing_{name}_default"] += k
        categories = batch.categories
        k = categories.count(None)  # under the drop policy there are none left
        if k:
            fill = str(self.defaults["category"])
            categories = [fill if c is None else c for c in categories]
            counts["missing_category_default"] += k

        features = np.zeros((m, N_FEATURES), np.float32)  # (M, F) in FEATURE_NAMES order
        for col, name in enumerate(NUMERIC_FIELDS):
            mom = self.logs[name]
            std = mom.std
            if mom.n >= 2 and std > 0:
                features[:, col] = np.clip((np.log1p(cols[name]) - mom.mean) / std, -Z_LIMIT, Z_LIMIT)
        ts = batch.ts
        day_angle = (2 * np.pi / MS_PER_DAY) * (ts % MS_PER_DAY)  # (M,) fractional hour of day, as an angle
        week_angle = (2 * np.pi / 7) * ((ts // MS_PER_DAY + EPOCH_WEEKDAY) % 7)  # (M,) day of week, Monday 0
        features[:, 2] = np.sin(day_angle)
        features[:, 3] = np.cos(day_angle)
        features[:, 4] = np.sin(week_angle)
        features[:, 5] = np.cos(week_angle)
        features[:, 6] = np.log1p(np.array(gaps, np.float64) / 1000.0)
        return (
            dataclasses.replace(batch, dwell_ms=cols["dwell_ms"], price=cols["price"], categories=categories,
                                features=features),
            dead,
        )

    def _users(self, batch: EventBatch, cols: dict[str, np.ndarray]) -> list[int]:
        """One pass in input order: per-user state, user_mean fills; returns ms since each user's previous event."""
        m = len(batch)
        cfg = self.cfg
        state = self.users
        newest = max(self.newest_ts, int(batch.ts.max()))
        horizon = newest - cfg.user_ttl_ms  # a user last seen before this has expired
        cap, n_actions = cfg.recent_items, len(ACTIONS)
        intern = sys.intern
        # Only the fields with a user_mean policy pay for it: their values go through the loop as lists.
        dwell = cols["dwell_ms"].tolist() if self.missing["dwell_ms"] == "user_mean" else None
        price = cols["price"].tolist() if self.missing["price"] == "user_mean" else None
        gaps = [0] * m
        expired = dwell_filled = price_filled = 0
        for j, (user, item, code, t) in enumerate(zip(batch.users, batch.items, batch.actions.tolist(),
                                                      batch.ts.tolist())):
            s = state.get(user)
            if s is None or s[0] < horizon:  # literal indices in this loop: LAST_TS, EVENTS, ... (no global lookups)
                if s is not None:
                    expired += 1  # found before a sweep: starts afresh, as if it had been swept
                s = state[user] = [t, 0, [0] * n_actions, [], 0.0, 0, 0.0, 0]
            elif t > s[0]:
                gaps[j] = t - s[0]  # an event older than the user's newest has gap 0
                s[0] = t
            s[1] += 1
            s[2][code] += 1
            recent = s[3]
            recent.append(intern(item))  # one object per item id: pickled once per snapshot, then by reference
            if len(recent) > cap:
                del recent[0]
            if dwell is not None:
                v = dwell[j]
                if v == v:  # not NaN: observed
                    s[4] += v
                    s[5] += 1
                elif s[5]:
                    dwell[j] = s[4] / s[5]
                    dwell_filled += 1
            if price is not None:
                v = price[j]
                if v == v:
                    s[6] += v
                    s[7] += 1
                elif s[7]:
                    price[j] = s[6] / s[7]
                    price_filled += 1
        if dwell_filled:
            cols["dwell_ms"][:] = dwell
            self.counts["missing_dwell_ms_user_mean"] += dwell_filled
        if price_filled:
            cols["price"][:] = price
            self.counts["missing_price_user_mean"] += price_filled
        self.newest_ts = newest
        # Expired users are swept out now and then, not per event: once at least max(1024, users held) events have
        # passed, so a sweep looks at no more than one user per event, and the users held at most double between
        # sweeps. An expired user met before the sweep starts afresh all the same (above).
        self.since_sweep += m
        if self.since_sweep >= max(SWEEP_MIN_EVENTS, len(state)):
            self.since_sweep = 0
            stale = [u for u, s in state.items() if s[LAST_TS] < horizon]
            for u in stale:
                del state[u]
            expired += len(stale)
        self.counts["users_expired"] += expired
        return gaps

    def _bounds(self, name: str) -> tuple[float, float] | None:
        """``(low, high)`` on the original scale, from the median and MAD of log1p over the accepted values."""
        ring = self.rings[name]
        if self.outliers[name] == "off" or ring.filled < max(1, self.cfg.outlier_warmup):
            return None
        v = ring.current()
        med = float(np.median(v))
        dev = np.abs(v - med)
        scale = MAD_TO_STD * float(np.median(dev))
        if scale == 0:  # more than half the values are equal: fall back to the mean absolute deviation
            scale = MEAN_AD_TO_STD * float(dev.mean())
        if scale == 0:
            return None  # all equal: there is no spread to judge a value against
        half = self.cfg.outlier_k * scale
        return math.expm1(med - half), math.expm1(min(med + half, 700.0))  # 700: expm1 overflows past ~709

    @staticmethod
    def _reject(reason: np.ndarray, mask: np.ndarray, rules: list[tuple[str, str]], why: str, counter: str) -> None:
        """Marks the events ``mask`` selects with this rule, unless an earlier rule already rejected them."""
        rules.append((why, counter))
        reason[mask & (reason == 0)] = len(rules)

    def _detail(self, batch: EventBatch, i: int, why: str, bounds: dict[str, tuple[float, float]]) -> str:
        kind, _, name = why.partition("_")
        if kind == "missing":
            return f"{name} absent or null; policy drop"
        lo, hi = bounds[name]
        return f"{name}={float(getattr(batch, name)[i]):g} outside [{max(lo, 0.0):.6g}, {hi:.6g}]"
