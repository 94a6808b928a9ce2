"""Which ids hold table rows: admission, eviction at the row cap, and expiry of idle ids.

An id gets its own row at its ``admit_after``-th sighting (before that it shares the fallback row); a batch whose
new ids would pass ``max_rows`` first evicts the least recently used ids; ids without an event for ``ttl_ms`` of
event time give their row back. Freed rows are reset for their next holder, the owner's ``on_release`` hook clears
what else it keeps per row, and the ids that lost their rows wait in ``drain_expired`` / ``drain_evicted`` for the
job to publish tombstones.

>>> import torch
>>> from model.config import IdsConfig, ModelConfig
>>> tables = tuple(EmbeddingTable(2, 0.1, torch.device("cpu"), torch.Generator()) for _ in range(2))
>>> ids = IdLifecycle(ModelConfig(ids=IdsConfig(max_rows=2)), tables, lambda kind, rows: None)
>>> event_u, event_i = ids.admit(["a", "b"], ["x", "x"], None)
>>> event_u.tolist(), event_i.tolist(), len(ids.users)
([1, 2], [1, 1], 2)
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from model.arrays import Rows
from model.config import ModelConfig
from model.idmap import FALLBACK_ROW, IdMap, Sightings, least_recently_used
from model.tables import EmbeddingTable

EVICT_SHARE = 64  # at the row cap, one eviction scan frees at least 1/64 of the cap (amortises the scan)
SCALARS = ("clock_ms", "sweep_cursor", "expired", "evicted", "evictions")  # in the model's state, in this order


class IdLifecycle:
    def __init__(self, config: ModelConfig, tables: tuple[EmbeddingTable, EmbeddingTable],
                 on_release: Callable[[int, Rows], None]) -> None:
        self.config = config
        self.tables = tables  # users, items
        self.on_release = on_release  # (kind, rows): clears the owner's per-row state of freed rows
        self.users = IdMap()
        self.items = IdMap()
        self.user_sightings = Sightings(config.ids.admit_capacity)
        self.item_sightings = Sightings(config.ids.admit_capacity)
        self.clock_ms = 0  # newest event time seen
        self.sweep_cursor = [1, 1]  # next row to check for expiry, users and items
        self.expired: tuple[list[str], list[str]] = ([], [])  # ids expired since the last drain_expired
        self.evicted: tuple[list[str], list[str]] = ([], [])  # ids evicted at the row cap since the last drain_evicted
        self.evictions = [0, 0]  # ids evicted at the row cap so far, users and items

    def idmap(self, kind: int) -> IdMap:
        return self.users if kind == 0 else self.items

    def admit(self, users: Sequence[str], items: Sequence[str], times: np.ndarray[Any, Any] | None
              ) -> tuple[Rows, Rows]:
        """The rows of a batch's events ``(users (B,), items (B,))``, admitting new ids (after making room at the row
        cap); ``times`` (B,) event times advance the clock expiry runs on."""
        cfg = self.config
        if times is not None:
            self.clock_ms = max(self.clock_ms, int(times.max()))
        self._make_room(0, users)
        self._make_room(1, items)
        event_u = self.users.rows(users, self.user_sightings, cfg.ids.admit_after, cfg.ids.max_rows)  # (B,)
        event_i = self.items.rows(items, self.item_sightings, cfg.ids.admit_after, cfg.ids.max_rows)  # (B,)
        return event_u, event_i

    def admit_items(self, ids: Sequence[str]) -> Rows:
        """Rows of item ``ids`` admitted now, whatever ``admit_after`` (another replica admitted them already), after
        making room at the row cap; the fallback row for those the cap leaves out."""
        self._make_room(1, ids)
        return self.items.rows(ids, max_ids=self.config.ids.max_rows)

    def touch(self, event_u: Rows, event_i: Rows, times: np.ndarray[Any, Any] | None, batch: int) -> None:
        """Marks the batch's rows as seen at their event times and used at batch number ``batch`` (the tables must
        hold the rows already)."""
        user_table, item_table = self.tables
        _mark_seen(user_table, event_u, times)
        _mark_seen(item_table, event_i, times)
        user_table.last_used[event_u] = batch  # the fallback row too: it is never evicted
        item_table.last_used[event_i] = batch

    def expire(self) -> None:
        """Checks the next ``sweep_rows`` rows of each table for ids idle longer than ``ttl_ms`` (event time)."""
        cfg = self.config
        if not cfg.ids.ttl_ms:
            return
        cutoff = self.clock_ms - cfg.ids.ttl_ms
        for k in (0, 1):
            span = self.idmap(k).size - 1
            if span <= 0:
                continue
            n = min(cfg.ids.sweep_rows, span)
            rows = 1 + (self.sweep_cursor[k] - 1 + np.arange(n)) % span  # (n,) wraps past the last row
            self.sweep_cursor[k] = int(1 + (self.sweep_cursor[k] - 1 + n) % span)
            old = rows[self.tables[k].last_seen[rows] < cutoff]
            if len(old):
                self.expired[k].extend(self._release(k, old))

    def _make_room(self, kind: int, ids: Sequence[str]) -> None:
        """Evicts the least recently used ids of table ``kind`` (0 users, 1 items) when the batch's new ids would
        take it past ``max_rows``; the ids of the batch itself stay. One scan frees room for at least 1/64 of the
        cap, so a flood of new ids costs a table scan per cap/64 new ids, not per batch."""
        cap = self.config.ids.max_rows
        idmap = self.idmap(kind)
        if len(idmap) + len(ids) <= cap:  # room for every id of the batch: the usual case, no look-ups
            return
        over = len(idmap) + idmap.new_ids(ids) - cap
        if over <= 0:
            return
        mask = idmap.live_mask()
        mask[idmap.lookup(ids)] = False  # the batch's own ids are in use (the fallback row is never live)
        rows = least_recently_used(self.tables[kind].last_used, np.flatnonzero(mask), max(over, cap // EVICT_SHARE))
        self.evicted[kind].extend(self._release(kind, rows))
        self.evictions[kind] += len(rows)

    def _release(self, kind: int, rows: Rows) -> list[str]:
        """Frees ``rows`` of table ``kind`` for new holders; returns the ids that held them."""
        ids = self.idmap(kind).release(rows)
        self.tables[kind].reset(rows)
        self.on_release(kind, rows)
        return ids

    def drain_expired(self) -> tuple[list[str], list[str]]:
        """``(user ids, item ids)`` expired since the last call."""
        out = self.expired
        self.expired = ([], [])
        return out

    def drain_evicted(self) -> tuple[list[str], list[str]]:
        """``(user ids, item ids)`` evicted at the row cap since the last call."""
        out = self.evicted
        self.evicted = ([], [])
        return out

    def state(self) -> dict[str, Any]:
        """The id maps and the sightings (the counters are in ``scalars``)."""
        return {"users": self.users.state(), "items": self.items.state(),
                "user_sightings": self.user_sightings.counts, "item_sightings": self.item_sightings.counts}

    def load(self, state: dict[str, Any]) -> None:
        self.users = IdMap.from_state(state["users"])
        self.items = IdMap.from_state(state["items"])
        self.user_sightings.counts = OrderedDict(state["user_sightings"])
        self.item_sightings.counts = OrderedDict(state["item_sightings"])

    def scalars(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in SCALARS}


def _mark_seen(table: EmbeddingTable, rows: Rows, times: np.ndarray[Any, Any] | None) -> None:
    own = rows != FALLBACK_ROW
    r = rows[own]
    if times is None:
        table.last_seen[r] = np.minimum(table.last_seen[r], 0)  # seen, but without a clock nothing ages
        return
    table.last_seen[r] = np.iinfo(np.int64).min
    np.maximum.at(table.last_seen, r, times[own])
