"""Serving: an in-memory index of the newest embeddings, following the job's compacted embeddings topic.

The topic is a changelog keyed ``"<kind>:<id>"``; the index reads it as a table: for every ``(kind, id)`` the record
with the highest ``version`` (a re-delivered or out-of-order record with a lower or equal version is ignored), and a
tombstone (null value) removes the id. Item vectors live in one contiguous float32 matrix with an id -> row map, so
the top-N of a user is one matrix-vector product and an ``argpartition``. The score is the model's: ``b_i + p_u . q_i``
(``model/mf.py``). Every answer names the versions it was computed from. Records are validated by
``flink_job.serving.records``; the item matrix is ``flink_job.serving.items``, the consumer thread
``flink_job.serving.follower``.

>>> from flink_job.serving.records import example_record
>>> ix = EmbeddingIndex("unused:9092", "unused")   # no consumer until start(): fed by hand here
>>> ix.apply([(b"item:a", example_record("item", "a", 1, [1.0, 0.0], bias=0.5, events=3)),
...           (b"item:b", example_record("item", "b", 1, [0.0, 1.0], events=9)),
...           (b"user:u", example_record("user", "u", 2, [1.0, 0.0], seen=["b"])),
...           (b"user:u", example_record("user", "u", 1, [0.0, 1.0]))])   # stale: version 1 after version 2
>>> ix.counts["stale"], ix.user_version("u")
(1, 2)
>>> [s.id for s in ix.recommend("u").items]                      # "b" was seen
['a']
>>> r = ix.recommend("stranger")
>>> r.fallback, [s.id for s in r.items]                          # by popularity
(True, ['b', 'a'])
>>> ix.apply([(b"item:b", None)]); ix.similar("a").items          # tombstone
[]
"""
from __future__ import annotations

import heapq
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from flink_job.serving.answers import Recommendation, Scored, Similar, UserVector
from flink_job.serving.config import ISOLATION_LEVELS, ServingConfig
from flink_job.serving.follower import RawRecord, TopicFollower
from flink_job.serving.items import ItemRows, check_n, top
from flink_job.serving.records import Malformed, Record, parse_key, parse_record

log = logging.getLogger(__name__)


class EmbeddingIndex(TopicFollower):
    """The newest user and item embeddings of a topic, kept up to date by a background consumer thread.

    ``start()`` assigns every partition from the beginning and notes its end offsets; ``ready`` turns true once the
    consumer has reached them. Reads take a lock, so they are safe from any thread while the index follows the topic.
    ``isolation_level`` is ``read_committed`` by default, so records of an aborted or open transaction of the job's
    exactly-once mode are never served. ``client_properties`` go to the consumer as they are (security settings).
    No record stops the index: a malformed one is skipped and counted by reason (``malformed_reasons``), and the
    ids it keeps are bounded by ``config`` (:class:`ServingConfig`).
    """

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        isolation_level: str = "read_committed",
        client_properties: dict[str, str] | None = None,
        poll_timeout_s: float = 0.2,
        max_batch: int = 5_000,
        config: ServingConfig | None = None,
    ) -> None:
        if isolation_level not in ISOLATION_LEVELS:
            raise ValueError(f"serving: isolation_level must be one of {ISOLATION_LEVELS}, got {isolation_level!r}")
        self.bootstrap = bootstrap
        self.topic = topic
        self.isolation_level = isolation_level
        self.client_properties = dict(client_properties or {})
        self.poll_timeout_s = poll_timeout_s
        self.max_batch = max_batch
        self.config = config if config is not None else ServingConfig()
        self.counts = {"records": 0, "applied": 0, "stale": 0, "tombstones": 0, "malformed": 0, "evicted": 0,
                       "forgotten": 0, "popular_rebuilds": 0, "watermark_errors": 0}
        self.malformed_reasons: dict[str, int] = {}
        self.last_malformed: dict[str, str] | None = None
        self.error: str | None = None  # a fatal consumer error: the index stopped following the topic
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._users: OrderedDict[str, UserVector] = OrderedDict()  # least recently updated first
        self._items: ItemRows | None = None
        # (kind, id) -> version it had when a tombstone or the cap removed it; oldest first, at most max_removed
        self._removed: OrderedDict[tuple[str, str], int] = OrderedDict()
        self._dim: int | None = self.config.dim or None
        self._item_step = -1
        self._popular: list[Scored] | None = None  # the cold-start answer, rebuilt after the items change
        self._popular_k = 0
        self._init_follower()

    # ---- applying records ----

    def apply(self, records: Iterable[RawRecord]) -> None:
        """Applies ``(key, value)`` records in topic order: newer versions replace, tombstones remove; a record that
        cannot be applied, whatever is wrong with it, is skipped and counted."""
        with self._lock:
            for key, value in records:
                self.counts["records"] += 1
                try:
                    self._apply_one(key, value)
                except Malformed as ex:
                    self._skip(key, ex.reason, str(ex))
                except Exception as ex:  # noqa: BLE001 - no record may stop the index; counted as "internal"
                    self._skip(key, "internal", f"{type(ex).__name__}: {ex}")

    def _skip(self, key: bytes | None, reason: str, detail: str) -> None:
        self.counts["malformed"] += 1
        self.malformed_reasons[reason] = self.malformed_reasons.get(reason, 0) + 1
        shown = None if key is None else key[:100].decode("utf-8", "backslashreplace")
        self.last_malformed = {"key": repr(shown), "reason": reason, "detail": detail[:300]}
        if self.counts["malformed"] <= 10 or self.counts["malformed"] % 1000 == 0:
            log.warning("serving: skipped malformed record %d with key %r: %s", self.counts["malformed"], shown,
                        detail[:300])

    def _apply_one(self, key: bytes | None, value: bytes | None) -> None:
        if value is None:
            try:
                kind, ident = parse_key(key, True, self.config.max_id_length)
            except Malformed as ex:
                raise Malformed("tombstone", str(ex)) from None
            self._remove(kind, ident)
            return
        rec = parse_record(key, value, self.config, self._dim)  # validated in full before anything changes
        if rec.kind == "user":
            self._apply_user(rec)
        else:
            self._apply_item(rec)
        if self._dim is None:
            self._dim = len(rec.vector)
        self._removed.pop((rec.kind, rec.id), None)
        self.counts["applied"] += 1

    def _apply_user(self, rec: Record) -> None:
        old = self._users.get(rec.id)
        if self._stale("user", rec.id, rec.version, None if old is None else old.version):
            return
        if old is None and len(self._users) >= self.config.max_users:
            ident, evicted = self._users.popitem(last=False)
            self._evicted("user", ident, evicted.version)
        self._users[rec.id] = UserVector(rec.id, rec.version, rec.step, rec.bias, rec.vector, rec.seen, rec.event_ts,
                                          rec.events, rec.partition, rec.offset)
        self._users.move_to_end(rec.id)

    def _apply_item(self, rec: Record) -> None:
        items = self._items if self._items is not None else ItemRows(len(rec.vector), limit=self.config.max_items)
        self._items = items
        r = items.row_of.get(rec.id)
        if self._stale("item", rec.id, rec.version, None if r is None else int(items.version[r])):
            return
        if r is None and len(items.row_of) >= self.config.max_items:
            oldest = next(iter(items.order))
            self._evicted("item", oldest, int(items.version[items.row_of[oldest]]))
            items.remove(oldest)
        r = items.row(rec.id)
        items.vectors[r] = rec.vector
        items.norms[r] = np.linalg.norm(rec.vector)
        items.bias[r] = rec.bias
        items.version[r] = rec.version
        items.events[r] = rec.events
        items.live[r] = True
        items.touch(rec.id)
        self._item_step = max(self._item_step, rec.step)
        self._popular = None

    def _stale(self, kind: str, ident: str, version: int, current: int | None) -> bool:
        floor = current if current is not None else self._removed.get((kind, ident))
        if floor is not None and version <= floor:
            self.counts["stale"] += 1
            return True
        return False

    def _remove(self, kind: str, ident: str) -> None:
        self.counts["tombstones"] += 1
        if kind == "user" and ident in self._users:
            self._remember(kind, ident, self._users.pop(ident).version)
        elif kind == "item" and self._items is not None and ident in self._items.row_of:
            self._remember(kind, ident, int(self._items.version[self._items.row_of[ident]]))
            self._items.remove(ident)
            self._popular = None

    def _evicted(self, kind: str, ident: str, version: int) -> None:
        self.counts["evicted"] += 1
        self._remember(kind, ident, version)
        if kind == "item":
            self._popular = None

    def _remember(self, kind: str, ident: str, version: int) -> None:
        """Remembers a removed id's version (bounded: the oldest memories go first)."""
        self._removed[(kind, ident)] = version
        self._removed.move_to_end((kind, ident))
        while len(self._removed) > self.config.max_removed:
            self._removed.popitem(last=False)
            self.counts["forgotten"] += 1

    # ---- reading ----

    def user(self, user: str) -> UserVector | None:
        with self._lock:
            return self._users.get(user)

    def user_version(self, user: str) -> int | None:
        u = self.user(user)
        return None if u is None else u.version

    def item_ids(self) -> list[str]:
        with self._lock:
            return sorted(self._items.row_of) if self._items is not None else []

    def user_ids(self) -> list[str]:
        with self._lock:
            return sorted(self._users)

    def item(self, item: str) -> tuple[int, float, np.ndarray] | None:
        """``(version, bias, vector (D,))`` of an item, or None."""
        with self._lock:
            if self._items is None or item not in self._items.row_of:
                return None
            r = self._items.row_of[item]
            return int(self._items.version[r]), float(self._items.bias[r]), self._items.vectors[r].copy()

    def scores(self, user: str, items: Sequence[str]) -> dict[str, float]:
        """``b_i + p_u . q_i`` of a known user for the given known items (unknown ones are left out)."""
        with self._lock:
            u, it = self._users.get(user), self._items
            if u is None or it is None:
                return {}
            rows = [(i, it.row_of[i]) for i in items if i in it.row_of]
            return {i: float(it.bias[r] + it.vectors[r] @ u.vector) for i, r in rows}

    def recommend(self, user: str, n: int = 10) -> Recommendation:
        """Top-``n`` items for ``user`` by ``b_i + p_u . q_i``, without the items in the user's ``seen`` list; an
        unknown user gets the ``n`` most popular items (most events trained on)."""
        check_n(n)
        with self._lock:
            u, it = self._users.get(user), self._items
            if u is None:
                return Recommendation(user, self._populartop(n), True, None, None, self._item_step)
            if it is None:
                return Recommendation(user, [], False, u.version, u.step, self._item_step,
                                      seen_published=u.seen is not None)
            m = it.used
            scores = it.bias[:m] + it.vectors[:m] @ u.vector  # (M,)
            scores[~it.live[:m]] = -np.inf
            excluded = 0
            if u.seen:
                seen_rows = [it.row_of[s] for s in u.seen if s in it.row_of]
                scores[seen_rows] = -np.inf
                excluded = len(seen_rows)
            items = top(scores, n, it)
            return Recommendation(user, items, False, u.version, u.step, self._item_step, excluded,
                                  u.seen is not None)

    def _populartop(self, n: int) -> list[Scored]:
        """The ``n`` most popular items, from the cached answer: rebuilt only after the items changed (or for an
        ``n`` beyond the one it was built for), not on every request."""
        if self._popular is None or n > self._popular_k:
            self._popular_k = max(n, self._popular_k, 100)
            self._popular = self._rank_popular(self._popular_k)
            self.counts["popular_rebuilds"] += 1
        return self._popular[:n]

    def _rank_popular(self, n: int) -> list[Scored]:
        """The ``n`` items trained on the most events, ties by id for a stable answer (score = events)."""
        it = self._items
        if it is None or not it.live.any():
            return []
        live = np.flatnonzero(it.live[: it.used])
        events = it.events[live]  # (L,)
        k = min(n, len(live))
        kth = np.partition(events, len(events) - k)[len(events) - k]
        above = live[events > kth].tolist()
        ties = heapq.nsmallest(k - len(above), live[events == kth].tolist(), key=lambda r: str(it.id_of[r]))
        order = sorted(above, key=lambda r: (-int(it.events[r]), str(it.id_of[r]))) + ties
        return [Scored(str(it.id_of[r]), float(it.events[r]), int(it.version[r])) for r in order]

    def similar(self, item: str, n: int = 10) -> Similar:
        """The ``n`` items with the highest cosine similarity to ``item``; KeyError if the item is unknown."""
        check_n(n)
        with self._lock:
            it = self._items
            if it is None or item not in it.row_of:
                raise KeyError(item)
            r, m = it.row_of[item], it.used
            denom = it.norms[:m] * it.norms[r]  # (M,)
            dots = it.vectors[:m] @ it.vectors[r]  # (M,)
            sims = np.divide(dots, denom, out=np.zeros(m, np.float32), where=denom > 0)
            sims[~it.live[:m]] = -np.inf
            sims[r] = -np.inf
            return Similar(item, int(it.version[r]), top(sims, n, it), self._item_step)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            healthy, reason = self.health()
            return {
                "topic": self.topic,
                "healthy": healthy,
                "reason": reason,
                "ready": self.ready,
                "error": self.error,
                "lag_s": round(self.lag_s(), 3),
                "users": len(self._users),
                "items": len(self._items.row_of) if self._items is not None else 0,
                "removed_remembered": len(self._removed),
                "item_step": self._item_step,
                "positions": {str(p): o for p, o in sorted(self._positions.items())},
                "end_offsets_at_start": {str(p): o for p, o in sorted(self._start_ends.items())},
                **self.counts,
                "malformed_reasons": dict(sorted(self.malformed_reasons.items())),
                "last_malformed": self.last_malformed,
            }

