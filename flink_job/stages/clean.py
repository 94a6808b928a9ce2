"""Cleaning: fill missing context values and tame outliers, before micro-batching.

Runs on the events that survived parsing, lateness and near-duplicate filtering. Every rule is declared in
``CleanConfig``; an event a rule rejects becomes a dead letter (stage ``clean``), never silently lost, and every
outcome is counted in ``Cleaner.counts``.

When things move: statistics move once per batch, per-user state once per event. Outlier bounds come from the values
accepted *before* the batch (a burst of outliers cannot widen its own bound); global means include the batch's own
kept values; a user's state (newest event time, running means, recent items) is updated event by event in input
order, so events of one user in one batch see each other.

The cleaned columns are the context the batch carries on; the model does not read them (context terms were measured
and did not help: BENCHMARKS.md, "Cold start and side features"), so no features are derived from them.

Per-user state expires by event time: a user whose newest event is more than ``user_ttl_ms`` older than the newest
event seen starts afresh (counted in ``users_expired``); expired users are removed from memory by an amortised sweep.
At most ``max_users`` users are held (the job passes the model's row cap): a batch whose new users would pass it
first evicts the users with the oldest newest event (counted in ``users_evicted``), at least 1/64 of the cap at once.

>>> from flink_job.config import CleanConfig
>>> from flink_job.stages.parse import parse_lines
>>> line = '0,{n},{{"event_id":"e{n}","user_id":"u","item_id":"i{n}","action":"view","ts":{ts}{ctx}}}'
>>> batch, _ = parse_lines([line.format(n=0, ts=0, ctx=',"dwell_ms":1000,"price":9.5,"category":"books"'),
...                         line.format(n=1, ts=60_000, ctx='')], now_ms=10**6)
>>> cleaner = Cleaner(CleanConfig())
>>> kept, dead = cleaner.apply(batch)
>>> kept.dwell_ms.tolist(), kept.price.tolist(), kept.categories, dead
([1000.0, 1000.0], [9.5, 9.5], ['books', 'unknown'], [])
>>> cleaner.recent_items("u"), cleaner.counts["missing_dwell_ms_user_mean"], cleaner.counts["missing_category_default"]
(['i0', 'i1'], 1, 1)
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import numpy as np

from model.arrays import Array

from flink_job.schema import ACTIONS, NUMERIC_FIELDS
from flink_job.stages.clean_stats import Moments, Ring, outlier_bounds
from flink_job.stages.events import DeadLetter, EventBatch
from flink_job.stages.users import UserTable, group_ranks, table_from_lists
from model.idmap import least_recently_used

if TYPE_CHECKING:
    from flink_job.config import CleanConfig

STAGE = "clean"
# One counter per rule outcome. A filled value is counted under the source it came from: a user_mean policy
# falls back to the global mean, then to the default, and each fallback has its own counter.
COUNTERS: tuple[str, ...] = (
    *(f"missing_{f}_{how}" for f in NUMERIC_FIELDS for how in ("default", "global_mean", "user_mean", "dropped")),
    "missing_category_default", "missing_category_dropped",
    *(f"outlier_{f}_{how}" for f in NUMERIC_FIELDS for how in ("clipped", "dropped")),
    "users_expired", "users_evicted",
)
SWEEP_MIN_EVENTS = 1024
EVICT_SHARE = 64  # at the user cap, one eviction scan frees room for at least 1/64 of the cap


class Cleaner:
    """Missing values, outliers and per-user state; see the module docstring."""

    def __init__(self, cfg: CleanConfig, max_users: int = 0) -> None:
        self.cfg = cfg
        self.max_users = max_users  # 0: no cap
        self.missing = dict(cfg.missing)
        self.defaults = dict(cfg.defaults)
        self.outliers = dict(cfg.outliers)
        self.users = UserTable(len(ACTIONS), cfg.recent_items)
        self.newest_ts = 0  # the newest event time seen; the TTL counts back from it
        self.since_sweep = 0  # events since the last sweep of expired users
        self.rings = {f: Ring(cfg.outlier_window) for f in NUMERIC_FIELDS}  # log1p of accepted values
        self.raw = {f: Moments() for f in NUMERIC_FIELDS}  # of accepted observed values: the global means
        self.counts: dict[str, int] = dict.fromkeys(COUNTERS, 0)

    # The job keeps this in Flink state. The config is left out: a restored job runs with the config it was
    # started with, and a changed window or recent-items cap is applied to the restored state. A state written by an
    # older version may hold more (``logs``, the moments of the z-score features): what is not read here is dropped.
    def state_dict(self) -> dict[str, Any]:
        """The state to pickle; it shares the per-user states with the cleaner, so pickle it before the next apply."""
        return {
            "users": self.users.state(),
            "newest_ts": self.newest_ts, "since_sweep": self.since_sweep,
            "rings": {f: r.ordered() for f, r in self.rings.items()},
            "raw": {f: dataclasses.astuple(m) for f, m in self.raw.items()},
            "counts": dict(self.counts),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        users = state["users"]
        if isinstance(users, dict) and "ids" not in users:  # written before the columns: {user: [fields]}
            users = table_from_lists(users, len(ACTIONS), self.cfg.recent_items)
        self.users = UserTable.from_state(users, len(ACTIONS), self.cfg.recent_items)
        self.newest_ts, self.since_sweep = state["newest_ts"], state["since_sweep"]
        for f in NUMERIC_FIELDS:
            self.rings[f] = Ring(self.cfg.outlier_window)
            self.rings[f].add(state["rings"][f])
            self.raw[f] = Moments(*state["raw"][f])
        self.counts = {**dict.fromkeys(COUNTERS, 0), **state["counts"]}

    def recent_items(self, user: str) -> list[str]:
        """The user's last items, most recent last; empty for an unknown or expired user."""
        return self.recent_items_of([user])[0]

    def recent_items_of(self, users: list[str]) -> list[list[str]]:
        """``recent_items`` of each user, in one pass over the columns."""
        return self.users.recent_items(users, since_ts=self.newest_ts - self.cfg.user_ttl_ms)

    def apply(self, batch: EventBatch) -> tuple[EventBatch, list[DeadLetter]]:
        """``(events kept, in input order, with context filled, dead letters)``."""
        # One function, about 75 lines: the rules run column-wise over the whole batch in a fixed order (missing,
        # outliers, statistics, fills), and every step reads the masks the ones before it left.
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

        # Numeric fields: clip, then learn the statistics from the observed (not filled) kept values.
        cols: dict[str, Array] = {}
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
            self.rings[name].add(np.log1p(seen))
            cols[name] = x

        self._users(batch, cols)

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

        return (
            dataclasses.replace(batch, dwell_ms=cols["dwell_ms"], price=cols["price"], categories=categories),
            dead,
        )

    def _users(self, batch: EventBatch, cols: dict[str, Array]) -> None:
        """Per-user state and user_mean fills, as if event by event in input order (vectorised per user: events of
        one user in the batch see each other)."""
        cfg, table = self.cfg, self.users
        ts = batch.ts  # (M,)
        newest = max(self.newest_ts, int(ts.max()))
        horizon = newest - cfg.user_ttl_ms  # a user last seen before this has expired
        rows = table.lookup(batch.users)  # (M,) -1: new
        held = np.unique(rows[rows >= 0])
        stale = held[table.last_ts[held] < horizon]
        table.reset(stale)  # met again after expiring, before a sweep: starts afresh, as if it had been swept
        expired = len(stale)
        self._make_room(batch.users, rows)
        rows = table.add_missing(batch.users, rows)

        np.maximum.at(table.last_ts, rows, ts)  # a new or reset row holds 0, and event times are >= 0
        np.add.at(table.action_counts, (rows, batch.actions.astype(np.int64)), 1)
        table.push_items(rows, batch.items)
        means = [name for name in NUMERIC_FIELDS if self.missing[name] == "user_mean"]
        if means:  # only the fields with a user_mean policy pay for grouping the events by user
            order, rank, _ = group_ranks(rows)  # (M,) events grouped by user, input order within a user
            first = rank == 0  # (M,) each user's first event of the batch
            group = np.cumsum(first) - 1  # (M,) group number of each sorted event
            starts = np.flatnonzero(first)  # (G,)
            for name in means:
                self._user_mean(name, cols[name], order, rows[order], starts, group)
        self.newest_ts = newest
        # Expired users are swept out now and then, not per event: once at least max(1024, users held) events have
        # passed, so a sweep looks at no more than one user per event, and the users held at most double between
        # sweeps. An expired user met before the sweep starts afresh all the same (above).
        self.since_sweep += len(ts)
        if self.since_sweep >= max(SWEEP_MIN_EVENTS, len(table)):
            self.since_sweep = 0
            live = table.live_rows()
            gone = live[table.last_ts[live] < horizon]
            table.release(gone)
            table.compact_items()
            expired += len(gone)
        self.counts["users_expired"] += expired
        if self.max_users and len(table) > self.max_users:  # a chunk with more new users than the cap: the oldest go
            gone = least_recently_used(table.last_ts, np.sort(table.live_rows()), len(table) - self.max_users)
            table.release(gone)
            self.counts["users_evicted"] += len(gone)

    def _make_room(self, users: list[str], rows: Array) -> None:
        """Evicts the users with the oldest newest event (ties: the lower row) when the batch's new users (``rows``
        -1) would take the table past ``max_users``; the batch's own users stay."""
        cap, table = self.max_users, self.users
        if not cap or len(table) + len(users) <= cap:
            return
        over = len(table) + len({u for u, r in zip(users, rows.tolist()) if r < 0}) - cap
        if over <= 0:
            return
        live = table.live_mask()
        live[rows[rows >= 0]] = False
        gone = least_recently_used(table.last_ts, np.flatnonzero(live), max(over, cap // EVICT_SHARE))
        table.release(gone)
        self.counts["users_evicted"] += len(gone)

    def _user_mean(self, name: str, x: Array, order: Array, srows: Array, starts: Array,
                   group: Array) -> None:
        """Fills each missing ``x`` (M,) with the mean of the user's observed values before it, in input order, and
        adds the observed ones to the user's sums."""
        table = self.users
        total, count = table.cols[f"{name[:5]}_sum"], table.cols[f"{name[:5]}_n"]
        xs = x[order]  # (M,) grouped
        seen = ~np.isnan(xs)
        v = np.where(seen, xs, 0.0)
        c = seen.astype(np.int64)
        # Sums and counts of each event's earlier observed values within the batch (exclusive, per group).
        cv, cc = np.cumsum(v), np.cumsum(c)
        before_v = cv - v - (cv[starts] - v[starts])[group]
        before_c = cc - c - (cc[starts] - c[starts])[group]
        sum_before = total[srows] + before_v
        n_before = count[srows] + before_c
        fill = ~seen & (n_before > 0)
        if fill.any():
            xs[fill] = sum_before[fill] / n_before[fill]
            x[order] = xs
            self.counts[f"missing_{name}_user_mean"] += int(fill.sum())
        np.add.at(total, srows[seen], v[seen])
        np.add.at(count, srows[seen], 1)

    def _bounds(self, name: str) -> tuple[float, float] | None:
        """``(low, high)`` on the original scale from the accepted values before the batch; None: no bound."""
        ring = self.rings[name]
        if self.outliers[name] == "off" or ring.filled < max(1, self.cfg.outlier_warmup):
            return None
        return outlier_bounds(ring.current(), self.cfg.outlier_k)

    @staticmethod
    def _reject(reason: Array, mask: Array, rules: list[tuple[str, str]], why: str, counter: str) -> None:
        """Marks the events ``mask`` selects with this rule, unless an earlier rule already rejected them."""
        rules.append((why, counter))
        reason[mask & (reason == 0)] = len(rules)

    def _detail(self, batch: EventBatch, i: int, why: str, bounds: dict[str, tuple[float, float]]) -> str:
        kind, _, name = why.partition("_")
        if kind == "missing":
            return f"{name} absent or null; policy drop"
        lo, hi = bounds[name]
        return f"{name}={float(getattr(batch, name)[i]):g} outside [{max(lo, 0.0):.6g}, {hi:.6g}]"

