"""Serving: an in-memory index of the newest embeddings, following the job's compacted embeddings topic.

The topic is a changelog keyed ``"<kind>:<id>"``; the index reads it as a table: for every ``(kind, id)`` the record
with the highest ``version`` (a re-delivered or out-of-order record with a lower or equal version is ignored), and a
tombstone (null value) removes the id. Item vectors live in one contiguous float32 matrix with an id -> row map, so
the top-N of a user is one matrix-vector product and an ``argpartition``. The score is the model's: ``b_i + p_u . q_i``
(``model/mf.py``). Every answer names the versions it was computed from. Records are validated by
``flink_job.serving.records``.

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
import math
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from flink_job.serving.records import Malformed, Record, parse_key, parse_record

log = logging.getLogger(__name__)

ISOLATION_LEVELS = ("read_committed", "read_uncommitted")
RawRecord = tuple[bytes | None, bytes | None]  # (key, value); value None is a tombstone


@dataclass(frozen=True)
class ServingConfig:
    """Bounds of the index: what a record may hold and how many ids it keeps, and when it counts as behind.

    The caps bound memory whatever the topic holds: an id beyond ``max_users``/``max_items`` evicts the least recently
    updated one of its kind, and ``max_removed`` bounds the memory of removed (tombstoned or evicted) ids. Measured
    with tracemalloc at dim 32: a user about 0.55 KB plus 70 bytes per ``seen`` id (1.9 KB with 20), an item about
    0.43 KB (``4 * dim`` bytes of it the vector), a remembered removed id 0.22 KB; so about 2.6 GB at most with the
    defaults and 20 ``seen`` ids per user.
    """

    max_users: int = 1_000_000
    max_items: int = 1_000_000
    # Removed ids remembered with their version, so that an older re-delivered record does not bring them back;
    # beyond this the oldest are forgotten (such a record would then be served again until a newer one replaces it).
    max_removed: int = 1_000_000
    dim: int = 0  # the vector length every record must have; 0: the first valid record sets it
    max_dim: int = 4096
    max_id_length: int = 1024
    max_seen: int = 10_000  # items in a user record's ``seen`` list
    max_abs_value: float = 1e6  # |bias| and |vector entries|: scores stay finite in float32
    max_lag_s: float = 60.0  # /healthz is unhealthy once the index has been behind the topic for longer than this
    lag_check_s: float = 5.0  # how often the consumer compares its positions with the topic's end offsets

    def __post_init__(self) -> None:
        for name in ("max_users", "max_items", "max_removed", "max_dim", "max_id_length", "max_seen"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"config: serving.{name} must be a positive integer, got {value!r}")
        if isinstance(self.dim, bool) or not isinstance(self.dim, int) or not 0 <= self.dim <= self.max_dim:
            raise ValueError(f"config: serving.dim must be in 0..{self.max_dim} (0: from the first record), "
                             f"got {self.dim!r}")
        for name in ("max_abs_value", "max_lag_s", "lag_check_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"config: serving.{name} must be a finite number > 0, got {value!r}")


@dataclass(frozen=True, slots=True)  # slots: a million of them cost a third less
class UserVector:
    """The newest published record of one user."""

    id: str
    version: int
    step: int
    bias: float
    vector: np.ndarray  # (D,) float32
    seen: tuple[str, ...] | None  # items the user interacted with (each once), when the job publishes them
    event_ts: int = -1
    events: int = 0
    partition: int = -1
    offset: int = -1


@dataclass(frozen=True)
class Scored:
    id: str
    score: float
    version: int  # the version of the item's vector the score used


@dataclass(frozen=True)
class Recommendation:
    """Top-N for a user. ``fallback``: the user is unknown and the items are ranked by popularity (score = events)."""

    user: str
    items: list[Scored]
    fallback: bool
    user_version: int | None  # None when the fallback was used
    user_step: int | None
    item_step: int  # the index's item watermark: the highest training step of any item record applied
    excluded_seen: int = 0  # candidates left out because the user had interacted with them
    seen_published: bool = False  # whether the user record carried a ``seen`` list

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Similar:
    """Items nearest to ``item`` by cosine similarity of their vectors (the item itself excluded)."""

    item: str
    item_version: int
    items: list[Scored]
    item_step: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Items:
    """Item rows: vectors (C, D), biases, versions, steps and event counts (C,); ``live`` marks rows in use."""

    dim: int
    capacity: int = 0
    vectors: np.ndarray = field(init=False)
    norms: np.ndarray = field(init=False)
    bias: np.ndarray = field(init=False)
    version: np.ndarray = field(init=False)
    events: np.ndarray = field(init=False)
    live: np.ndarray = field(init=False)
    row_of: dict[str, int] = field(default_factory=dict)
    id_of: list[str | None] = field(default_factory=list)
    free: list[int] = field(default_factory=list)
    used: int = 0  # rows [0, used) have been handed out at least once
    limit: int = 2**62  # rows never grow beyond this (the index's item cap)
    order: OrderedDict[str, None] = field(default_factory=OrderedDict)  # least recently updated first

    def __post_init__(self) -> None:
        self.vectors = np.zeros((self.capacity, self.dim), np.float32)
        self.norms = np.zeros(self.capacity, np.float32)
        self.bias = np.zeros(self.capacity, np.float32)
        self.version = np.zeros(self.capacity, np.int64)
        self.events = np.zeros(self.capacity, np.int64)
        self.live = np.zeros(self.capacity, bool)

    def row(self, item: str) -> int:
        """The row of ``item``, allocating one (a freed row first, else a new one, doubling the arrays) if new."""
        if item in self.row_of:
            return self.row_of[item]
        if self.free:
            r = self.free.pop()
        else:
            if self.used == self.capacity:
                self._grow(min(max(2 * self.capacity, 64), self.limit))
            r = self.used
            self.used += 1
            self.id_of.append(None)
        self.row_of[item] = r
        self.id_of[r] = item
        return r

    def touch(self, item: str) -> None:
        self.order[item] = None
        self.order.move_to_end(item)

    def remove(self, item: str) -> None:
        r = self.row_of.pop(item)
        self.order.pop(item, None)
        self.id_of[r] = None
        self.live[r] = False
        self.vectors[r] = 0.0
        self.free.append(r)

    def _grow(self, cap: int) -> None:
        for name in ("vectors", "norms", "bias", "version", "events", "live"):
            old = getattr(self, name)
            new = np.zeros((cap, *old.shape[1:]), old.dtype)
            new[: len(old)] = old
            setattr(self, name, new)
        self.capacity = cap


class EmbeddingIndex:
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
        self._items: _Items | None = None
        # (kind, id) -> version it had when a tombstone or the cap removed it; oldest first, at most max_removed
        self._removed: OrderedDict[tuple[str, str], int] = OrderedDict()
        self._dim: int | None = self.config.dim or None
        self._item_step = -1
        self._popular: list[Scored] | None = None  # the cold-start answer, rebuilt after the items change
        self._popular_k = 0
        self._positions: dict[int, int] = {}  # partition -> next offset to read
        self._start_ends: dict[int, int] = {}  # partition -> end offset when the index started
        self._at_eof: set[int] = set()
        # partition -> (when seen, end offset) the index has not reached yet, oldest first: dates how far behind it is
        self._behind: dict[int, deque[tuple[float, int]]] = {}
        self._last_loop = time.monotonic()
        self._last_check = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._consumer: Any = None

    # ---- following the topic ----

    def start(self) -> EmbeddingIndex:
        from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

        self._consumer = Consumer(
            {
                "bootstrap.servers": self.bootstrap,
                "group.id": f"streamrec-serving-{uuid.uuid4().hex[:8]}",  # offsets are never committed
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "enable.partition.eof": True,
                "isolation.level": self.isolation_level,
                **self.client_properties,
            }
        )
        meta = self._consumer.list_topics(self.topic, timeout=10).topics[self.topic]
        if meta.error is not None:
            self._consumer.close()
            raise RuntimeError(f"serving: cannot read topic {self.topic!r}: {meta.error}")
        for p in meta.partitions:
            _low, high = self._consumer.get_watermark_offsets(TopicPartition(self.topic, p), timeout=10)
            self._start_ends[p] = high
            self._positions[p] = 0
        self._consumer.assign([TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in meta.partitions])
        log.info("serving: following %s from the beginning, end offsets at start %s (%s)", self.topic,
                 self._start_ends, self.isolation_level)
        self._last_loop = self._last_check = time.monotonic()
        self._thread = threading.Thread(target=self._run, name=f"serving-{self.topic}", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None

    def __enter__(self) -> EmbeddingIndex:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self) -> None:
        from confluent_kafka import KafkaError

        while not self._stop.is_set():
            self._last_loop = time.monotonic()
            if self._last_loop - self._last_check >= self.config.lag_check_s:
                self._check_lag()
            try:
                msgs = self._consumer.consume(self.max_batch, timeout=self.poll_timeout_s)
            except Exception as ex:  # noqa: BLE001 - reported through healthz, not lost in a thread
                self._fail(f"consume: {ex}")
                return
            batch: list[RawRecord] = []
            eof: list[tuple[int, int]] = []
            last: dict[int, int] = {}
            for m in msgs:
                err = m.error()
                if err is None:
                    batch.append((m.key(), m.value()))
                    last[m.partition()] = m.offset() + 1
                elif err.code() == KafkaError._PARTITION_EOF:
                    eof.append((m.partition(), m.offset()))
                elif err.fatal():
                    self._fail(f"reading {self.topic}: {err}")
                    return
                else:
                    log.warning("serving: reading %s: %s", self.topic, err)
            if not msgs:
                continue
            with self._changed:
                self.apply(batch)  # skips what it cannot apply: no record stops the index
                for p, nxt in last.items():
                    self._positions[p] = max(self._positions.get(p, 0), nxt)
                for p, off in eof:  # past control records (transaction markers) too
                    self._positions[p] = max(self._positions.get(p, 0), off)
                    self._at_eof.add(p)
                self._drain_behind()
                self._changed.notify_all()

    def _check_lag(self) -> None:
        """Notes the topic's end offsets the index has not reached yet, with the time they were seen."""
        from confluent_kafka import TopicPartition

        now = time.monotonic()
        self._last_check = now
        ends: dict[int, int] = {}
        for p in self._start_ends:
            try:
                _low, ends[p] = self._consumer.get_watermark_offsets(
                    TopicPartition(self.topic, p), timeout=min(5.0, self.config.lag_check_s), cached=False)
            except Exception as ex:  # noqa: BLE001 - the broker may be away for a while: counted, tried again
                with self._lock:
                    self.counts["watermark_errors"] += 1
                log.warning("serving: cannot read the end offsets of %s: %s", self.topic, ex)
                return
        with self._lock:
            for p, end in ends.items():
                seen = self._behind.setdefault(p, deque())
                if end > self._positions.get(p, 0) and (not seen or seen[-1][1] < end):
                    if len(seen) >= 64:  # keep the oldest: it dates the lag
                        seen.pop()
                    seen.append((now, end))
            self._drain_behind()

    def _drain_behind(self) -> None:
        for p, seen in self._behind.items():
            while seen and self._positions.get(p, 0) >= seen[0][1]:
                seen.popleft()

    def lag_s(self) -> float:
        """How long the index has been behind the topic: the age of the oldest end offset seen and not yet reached."""
        with self._lock:
            oldest = min((seen[0][0] for seen in self._behind.values() if seen), default=None)
        return 0.0 if oldest is None else time.monotonic() - oldest

    def health(self) -> tuple[bool, str | None]:
        """``(healthy, reason)``: unhealthy when stopped, still catching up, or behind the topic for too long."""
        with self._lock:
            if self.error is not None:
                return False, f"the index stopped following {self.topic}: {self.error}"
            if not self.ready:
                return False, "the index is still catching up with the topic"
            limit = self.config.max_lag_s
            stalled = time.monotonic() - self._last_loop
            if stalled > limit:
                return False, f"the index has not read {self.topic} for {stalled:.0f}s (serving.max_lag_s {limit:g})"
            lag = self.lag_s()
            if lag > limit:
                return False, f"the index has been behind {self.topic} for {lag:.0f}s (serving.max_lag_s {limit:g})"
            return True, None

    def _fail(self, reason: str) -> None:
        log.error("serving: stopped following %s: %s", self.topic, reason)
        with self._changed:
            self.error = reason
            self._changed.notify_all()

    @property
    def ready(self) -> bool:
        """Caught up: every partition read up to its end offset at start (or to its end, for read_committed)."""
        with self._lock:
            return self.error is None and self._thread is not None and all(
                self._positions.get(p, 0) >= end or p in self._at_eof for p, end in self._start_ends.items()
            )

    def positions(self) -> dict[int, int]:
        """Partition -> next offset the index will read (everything before it has been applied)."""
        with self._lock:
            return dict(self._positions)

    def wait_until(self, predicate: Callable[[EmbeddingIndex], bool], timeout: float) -> None:
        """Blocks until ``predicate(index)`` holds (checked after every applied batch); TimeoutError after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate(self):
                if self.error is not None:
                    raise RuntimeError(f"serving: index stopped: {self.error}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"serving: condition not met within {timeout}s; index: {self.stats()}")
                self._changed.wait(min(left, 0.5))

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
        items = self._items if self._items is not None else _Items(len(rec.vector), limit=self.config.max_items)
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
        _check_n(n)
        with self._lock:
            u, it = self._users.get(user), self._items
            if u is None:
                return Recommendation(user, self._popular_top(n), True, None, None, self._item_step)
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
            items = _top(scores, n, it)
            return Recommendation(user, items, False, u.version, u.step, self._item_step, excluded,
                                  u.seen is not None)

    def _popular_top(self, n: int) -> list[Scored]:
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
        _check_n(n)
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
            return Similar(item, int(it.version[r]), _top(sims, n, it), self._item_step)

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


def _top(scores: np.ndarray, n: int, it: _Items) -> list[Scored]:
    """The ``n`` best finite scores (M,), best first."""
    k = min(n, int(np.isfinite(scores).sum()))
    if k == 0:
        return []
    best = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
    best = best[np.argsort(-scores[best], kind="stable")]
    best = best[np.isfinite(scores[best])][:k]
    return [Scored(str(it.id_of[r]), float(scores[r]), int(it.version[r])) for r in best]


def _check_n(n: int) -> None:
    if not 1 <= n <= 10_000:
        raise ValueError(f"serving: n must be in 1..10000, got {n}")
