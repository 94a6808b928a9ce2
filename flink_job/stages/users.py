"""Per-user state of the cleaning stage, in columns: one row per user, numpy arrays per field.

The stage serialises its whole state at every bundle, so the state's shape is a cost on the job's critical path:
a user as a Python list pickles in about 0.7 µs, a row of arrays in about 0.05 µs. Columns also let a batch update
every user it touches with a few vectorised operations instead of a Python loop per event.

A user's row holds its newest event time (for the TTL and eviction), its counts per action, running sums and counts
of its observed context values (for ``user_mean`` fills) and a ring of its last ``recent`` items, stored as codes
into an item table that is compacted when the items no user holds anymore outnumber the ones held.

>>> t = UserTable(n_actions=5, recent=2)
>>> rows = t.rows(["a", "b", "a"])
>>> rows.tolist(), len(t), "a" in t
([0, 1, 0], 2, True)
>>> t.push_items(rows, ["x", "y", "z"]); t.recent_items(["a", "b", "nobody"])
[['x', 'z'], ['y'], []]
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from itertools import repeat
from typing import Any

import numpy as np

from model.arrays import Array

# Column name -> (dtype, fill of a new or reset row). ``action_counts`` and ``recent`` have a second axis.
_COLUMNS: dict[str, tuple[type, int | float]] = {
    "last_ts": (np.int64, 0), "recent_written": (np.int64, 0),
    "dwell_sum": (np.float64, 0.0), "dwell_n": (np.int64, 0), "price_sum": (np.float64, 0.0), "price_n": (np.int64, 0),
}
EMPTY = -1  # an empty slot of the item ring


class UserTable:
    def __init__(self, n_actions: int, recent: int) -> None:
        self.n_actions = n_actions
        self.recent = recent
        self.index: dict[str, int] = {}  # user id -> row
        self.ids: list[str | None] = []  # row -> user id, None for a free row
        self.free: list[int] = []
        # row -> holds a user, kept as rows are added and released: an eviction scan reads it instead of building
        # it from the index's values (~10 ms a scan at 262,144 users)
        self.live = np.zeros(0, bool)
        self.cols: dict[str, Array] = {name: np.zeros(0, dtype) for name, (dtype, _) in _COLUMNS.items()}
        self.action_counts = np.zeros((0, n_actions), np.int64)  # (R, A)
        self.ring = np.zeros((0, recent), np.int32)  # (R, K) item codes, EMPTY where nothing was written
        self.item_index: dict[str, int] = {}  # item id -> code
        self.item_ids: list[str] = []  # code -> item id

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, user: object) -> bool:
        return user in self.index

    def __iter__(self) -> Iterator[str]:
        return iter(self.index)

    def __getattr__(self, name: str) -> Array:  # the columns as attributes: t.last_ts, t.dwell_sum, ...
        cols = self.__dict__.get("cols")
        if cols is not None and name in cols:
            return cols[name]  # type: ignore[no-any-return]
        raise AttributeError(name)

    # ------------------------------------------------------------------------------------------------ rows

    def rows(self, users: Sequence[str]) -> Array:
        """(N,) the row of each user, new users getting fresh rows in order of first appearance."""
        return self.add_missing(users, self.lookup(users))

    def lookup(self, users: Sequence[str]) -> Array:
        """(N,) the row of each user, -1 for users not held."""
        return np.fromiter(map(self.index.get, users, repeat(-1)), np.int64, len(users))  # map: no frame per user

    def add_missing(self, users: Sequence[str], rows: Array) -> Array:
        """``rows`` (N,) from ``lookup`` with the -1 entries replaced by fresh rows for those users."""
        new = np.flatnonzero(rows < 0).tolist()
        for j in new:
            rows[j] = self._add(users[j])
        if new:
            self.reset(rows[new])  # once for the batch's new rows: a reset costs ~20 µs however many rows it takes
        return rows

    def row(self, user: str) -> int | None:
        return self.index.get(user)

    def _add(self, user: str) -> int:
        row = self.index.get(user)
        if row is not None:  # an earlier event of the same batch added it
            return row
        if self.free:
            row = self.free.pop()
            self.ids[row] = user
        else:
            row = len(self.ids)
            self.ids.append(user)
            self._grow(row + 1)
        self.live[row] = True
        self.index[user] = row
        return row

    def _grow(self, n: int) -> None:
        cap = len(self.cols["last_ts"])
        if n <= cap:
            return
        cap = max(n, 2 * cap, 1024)
        for name, col in self.cols.items():
            self.cols[name] = _resized(col, cap)
        self.action_counts = _resized(self.action_counts, cap)
        self.ring = _resized(self.ring, cap, EMPTY)
        self.live = _resized(self.live, cap)

    def reset(self, rows: Array) -> None:
        """Rows start afresh: no events, no sums, no items."""
        for name, (_, fill) in _COLUMNS.items():
            self.cols[name][rows] = fill
        self.action_counts[rows] = 0
        self.ring[rows] = EMPTY

    def release(self, rows: Array) -> None:
        """Forgets the users of ``rows``; their rows are reused."""
        for row in rows.tolist():
            user = self.ids[row]
            if user is not None:
                del self.index[user]
                self.ids[row] = None
                self.live[row] = False
                self.free.append(row)
        self.reset(rows)

    def live_rows(self) -> Array:
        """The rows that hold a user, in the order the users were added."""
        return np.fromiter(self.index.values(), np.int64, len(self.index))

    def live_mask(self) -> Array:
        """(rows,) True for the rows that hold a user."""
        return self.live[: len(self.ids)].copy()

    # ------------------------------------------------------------------------------------------------ items

    def push_items(self, rows: Array, items: Sequence[str]) -> None:
        """Appends each event's item to its user's ring, in input order (``rows`` (N,) may repeat)."""
        n, k = len(rows), self.recent
        if not n or not k:
            return
        index = self.item_index
        codes = np.fromiter(map(index.get, items, repeat(-1)), np.int32, n)
        for j in np.flatnonzero(codes < 0).tolist():  # items new to the table get codes in order of appearance
            c = index.get(items[j])
            if c is None:
                c = index[items[j]] = len(self.item_ids)
                self.item_ids.append(items[j])
            codes[j] = c
        order, rank, counts = group_ranks(rows)  # events grouped by row in input order
        written = self.cols["recent_written"]
        sorted_rows = rows[order]
        keep = rank >= counts[sorted_rows] - k  # only each user's last k events of the batch stay in its ring
        slot = (written[sorted_rows] + rank) % k
        self.ring[sorted_rows[keep], slot[keep]] = codes[order][keep]
        np.add.at(written, rows, 1)

    def recent_items(self, users: Sequence[str], since_ts: int | None = None) -> list[list[str]]:
        """Each user's last items, most recent last: [] for a user not held, or (with ``since_ts``) idle since
        before that event time."""
        k = self.recent
        rows = self.lookup(users)
        known = rows >= 0
        if since_ts is not None:
            known &= self.cols["last_ts"][np.maximum(rows, 0)] >= since_ts
        out: list[list[str]] = [[] for _ in users]
        if not k or not known.any():
            return out
        sel = np.flatnonzero(known)
        written = self.cols["recent_written"][rows[sel]]  # (S,)
        held = np.minimum(written, k)
        start = np.where(written > k, written % k, 0)
        slots = (start[:, None] + np.arange(k)[None, :]) % k  # (S, K) oldest first
        codes = self.ring[rows[sel][:, None], slots]
        names = np.asarray(self.item_ids, dtype=object)
        for s, j in enumerate(sel.tolist()):
            out[j] = names[codes[s, : held[s]]].tolist()
        return out

    def compact_items(self) -> None:
        """Drops items no ring holds anymore once they are the majority of the item table, renumbering codes."""
        live = self.live_rows()
        held = np.unique(self.ring[live]) if len(live) else np.zeros(0, np.int32)
        held = held[held != EMPTY]
        if len(self.item_ids) <= max(1024, 2 * len(held)):
            return
        remap = np.full(len(self.item_ids), EMPTY, np.int32)
        remap[held] = np.arange(len(held), dtype=np.int32)
        ring = self.ring
        ring[live] = np.where(ring[live] == EMPTY, EMPTY, remap[np.maximum(ring[live], 0)])
        self.item_ids = [self.item_ids[c] for c in held.tolist()]
        self.item_index = {item: c for c, item in enumerate(self.item_ids)}

    def resize_ring(self, recent: int) -> None:
        """A new ring length (a changed ``clean.recent_items``): each user keeps its last ``recent`` items."""
        if recent == self.recent:
            return
        n = len(self.ids)
        old_k, written = self.recent, self.cols["recent_written"][:n]
        held = np.minimum(written, old_k)
        start = np.where(written > old_k, written % old_k, 0) if old_k else np.zeros(n, np.int64)
        slots = (start[:, None] + np.arange(old_k)[None, :]) % max(old_k, 1)  # (R, K_old) oldest first
        ordered = self.ring[np.arange(n)[:, None], slots] if old_k else np.zeros((n, 0), np.int32)
        new = np.full((len(self.ring), recent), EMPTY, np.int32)
        take = np.minimum(held, recent)
        for r in np.flatnonzero(take).tolist():  # once per restore with a new setting
            new[r, : take[r]] = ordered[r, held[r] - take[r]: held[r]]
        self.ring, self.recent = new, recent
        self.cols["recent_written"][:n] = take

    # ------------------------------------------------------------------------------------------------ state

    def state(self) -> dict[str, Any]:
        n = len(self.ids)
        return {
            "ids": self.ids, "recent": self.recent, "item_ids": self.item_ids,
            "cols": {name: col[:n] for name, col in self.cols.items()},
            "action_counts": self.action_counts[:n], "ring": self.ring[:n],
        }

    @classmethod
    def from_state(cls, state: dict[str, Any], n_actions: int, recent: int) -> UserTable:
        """The table ``state()`` wrote; columns an older version kept and this one does not (``events``, the event
        count the recency feature read) are dropped."""
        t = cls(n_actions, state["recent"])
        t.ids = list(state["ids"])
        t.index = {u: r for r, u in enumerate(t.ids) if u is not None}
        t.free = [r for r, u in enumerate(t.ids) if u is None]
        t._grow(len(t.ids))
        t.live[list(t.index.values())] = True
        n = len(t.ids)
        for name, col in state["cols"].items():
            if name in t.cols:
                t.cols[name][:n] = col
        t.action_counts[:n] = state["action_counts"]
        t.ring[:n] = state["ring"]
        t.item_ids = list(state["item_ids"])
        t.item_index = {item: c for c, item in enumerate(t.item_ids)}
        t.resize_ring(recent)
        return t


def group_ranks(rows: Array) -> tuple[Array, Array, Array]:
    """Groups events by row, keeping input order within a group: ``(order (N,), rank (N,), counts (R,))`` where
    ``rows[order]`` is grouped, ``rank[k]`` is the position of event ``order[k]`` within its group and ``counts``
    the events per row.

    >>> order, rank, counts = group_ranks(np.array([3, 1, 3, 3]))
    >>> order.tolist(), rank.tolist(), counts[[1, 3]].tolist()
    ([1, 0, 2, 3], [0, 0, 1, 2], [1, 3])
    """
    order = np.argsort(rows, kind="stable")
    sorted_rows = rows[order]
    first = np.ones(len(rows), bool)
    first[1:] = sorted_rows[1:] != sorted_rows[:-1]
    starts = np.flatnonzero(first)
    rank = np.arange(len(rows)) - np.repeat(starts, np.diff(np.append(starts, len(rows))))
    counts = np.bincount(rows, minlength=int(rows.max()) + 1 if len(rows) else 0)
    return order, rank, counts


def _resized(a: Array, cap: int, fill: int = 0) -> Array:
    out = np.full((cap, *a.shape[1:]), fill, a.dtype)
    out[: len(a)] = a
    return out


def table_from_lists(users: dict[str, list[Any]], n_actions: int, recent: int) -> dict[str, Any]:
    """Per-user state written as ``{user: [last_ts, events, action_counts, recent_items, dwell_sum, dwell_n,
    price_sum, price_n]}`` (before the columns), as ``UserTable.state()`` (the event count is dropped)."""
    table = UserTable(n_actions, recent)
    for user, (last_ts, _events, actions, items, dwell_sum, dwell_n, price_sum, price_n) in users.items():
        row = table.rows([user])
        table.push_items(np.repeat(row, len(items)), items)
        r = int(row[0])
        for name, value in (("last_ts", last_ts), ("dwell_sum", dwell_sum),
                            ("dwell_n", dwell_n), ("price_sum", price_sum), ("price_n", price_n)):
            table.cols[name][r] = value
        table.action_counts[r] = actions
    return table.state()
