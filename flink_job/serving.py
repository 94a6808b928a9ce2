"""Serving: an in-memory index of the newest embeddings, following the job's compacted embeddings topic.

The topic is a changelog keyed ``"<kind>:<id>"``; the index reads it as a table: for every ``(kind, id)`` the record
with the highest ``version`` (a re-delivered or out-of-order record with a lower or equal version is ignored), and a
tombstone (null value) removes the id. Item vectors live in one contiguous float32 matrix with an id -> row map, so
the top-N of a user is one matrix-vector product and an ``argpartition``. The score is the model's: ``b_i + p_u . q_i``
(``model/mf.py``). Every answer names the versions it was computed from.

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

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import orjson

log = logging.getLogger(__name__)

ISOLATION_LEVELS = ("read_committed", "read_uncommitted")
RawRecord = tuple[bytes | None, bytes | None]  # (key, value); value None is a tombstone


@dataclass(frozen=True)
class UserVector:
    """The newest published record of one user."""

    id: str
    version: int
    step: int
    bias: float
    vector: np.ndarray  # (D,) float32
    seen: frozenset[str] | None  # items the user interacted with, when the job publishes them
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
                self._grow(max(2 * self.capacity, 64))
            r = self.used
            self.used += 1
            self.id_of.append(None)
        self.row_of[item] = r
        self.id_of[r] = item
        return r

    def remove(self, item: str) -> None:
        r = self.row_of.pop(item)
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
    """

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        isolation_level: str = "read_committed",
        client_properties: dict[str, str] | None = None,
        poll_timeout_s: float = 0.2,
        max_batch: int = 5_000,
    ) -> None:
        if isolation_level not in ISOLATION_LEVELS:
            raise ValueError(f"serving: isolation_level must be one of {ISOLATION_LEVELS}, got {isolation_level!r}")
        self.bootstrap = bootstrap
        self.topic = topic
        self.isolation_level = isolation_level
        self.client_properties = dict(client_properties or {})
        self.poll_timeout_s = poll_timeout_s
        self.max_batch = max_batch
        self.counts = {"records": 0, "applied": 0, "stale": 0, "tombstones": 0, "malformed": 0}
        self.error: str | None = None  # a fatal consumer error: the index stopped following the topic
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._users: dict[str, UserVector] = {}
        self._items: _Items | None = None
        self._removed: dict[tuple[str, str], int] = {}  # (kind, id) -> version it had when a tombstone removed it
        self._item_step = -1
        self._positions: dict[int, int] = {}  # partition -> next offset to read
        self._start_ends: dict[int, int] = {}  # partition -> end offset when the index started
        self._at_eof: set[int] = set()
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
                try:
                    self.apply(batch)
                except Exception as ex:  # noqa: BLE001 - a bug; stop and report it through healthz
                    self._fail(f"applying records: {ex!r}")
                    return
                for p, nxt in last.items():
                    self._positions[p] = max(self._positions.get(p, 0), nxt)
                for p, off in eof:  # past control records (transaction markers) too
                    self._positions[p] = max(self._positions.get(p, 0), off)
                    self._at_eof.add(p)
                self._changed.notify_all()

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
        """Applies ``(key, value)`` records in topic order: newer versions replace, tombstones remove."""
        with self._lock:
            for key, value in records:
                self.counts["records"] += 1
                try:
                    self._apply_one(key, value)
                except (ValueError, TypeError, KeyError, orjson.JSONDecodeError) as ex:
                    self.counts["malformed"] += 1
                    if self.counts["malformed"] <= 10:
                        log.warning("serving: skipped a malformed record with key %r: %s", key, ex)

    def _apply_one(self, key: bytes | None, value: bytes | None) -> None:
        if value is None:
            if key is None:
                raise ValueError("tombstone without a key")
            kind, _, ident = key.decode().partition(":")
            self._remove(kind, ident)
            return
        rec = orjson.loads(value)
        if not isinstance(rec, dict):
            raise ValueError(f"value is a {type(rec).__name__}, not an object")
        kind, ident, version = rec["kind"], str(rec["id"]), int(rec["version"])
        if key is not None and key.decode() != f"{kind}:{ident}":
            raise ValueError(f"key does not match the value's kind and id {kind}:{ident}")
        if kind == "user":
            old = self._users.get(ident)
            if self._stale(kind, ident, version, None if old is None else old.version):
                return
            seen = rec.get("seen")
            self._users[ident] = UserVector(
                ident, version, int(rec["step"]), float(rec["bias"]), _vector(rec["vector"], self._dim()),
                None if seen is None else frozenset(str(s) for s in seen), int(rec.get("event_ts", -1)),
                int(rec.get("events", 0)), int(rec.get("partition", -1)), int(rec.get("offset", -1)),
            )
        elif kind == "item":
            vec = _vector(rec["vector"], self._dim())
            items = self._items if self._items is not None else _Items(len(vec))
            self._items = items
            r = items.row_of.get(ident)
            if self._stale(kind, ident, version, None if r is None else int(items.version[r])):
                return
            r = items.row(ident)
            items.vectors[r] = vec
            items.norms[r] = np.linalg.norm(vec)
            items.bias[r] = float(rec["bias"])
            items.version[r] = version
            items.events[r] = int(rec.get("events", 0))
            items.live[r] = True
            self._item_step = max(self._item_step, int(rec["step"]))
        else:
            raise ValueError(f"unknown kind {kind!r}")
        self._removed.pop((kind, ident), None)
        self.counts["applied"] += 1

    def _stale(self, kind: str, ident: str, version: int, current: int | None) -> bool:
        floor = current if current is not None else self._removed.get((kind, ident))
        if floor is not None and version <= floor:
            self.counts["stale"] += 1
            return True
        return False

    def _remove(self, kind: str, ident: str) -> None:
        self.counts["tombstones"] += 1
        if kind == "user" and ident in self._users:
            self._removed[(kind, ident)] = self._users.pop(ident).version
        elif kind == "item" and self._items is not None and ident in self._items.row_of:
            self._removed[(kind, ident)] = int(self._items.version[self._items.row_of[ident]])
            self._items.remove(ident)

    def _dim(self) -> int | None:
        if self._items is not None:
            return self._items.dim
        return next((len(u.vector) for u in self._users.values()), None)

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
                return Recommendation(user, self._popular(n), True, None, None, self._item_step)
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

    def _popular(self, n: int) -> list[Scored]:
        """The ``n`` items trained on the most events, ties by id for a stable answer (score = events)."""
        it = self._items
        if it is None or not it.live.any():
            return []
        live = np.flatnonzero(it.live[: it.used])
        events = it.events[live]  # (L,)
        k = min(n, len(live))
        kth = np.partition(events, len(events) - k)[len(events) - k]
        candidates = live[events >= kth].tolist()
        order = sorted(candidates, key=lambda r: (-int(it.events[r]), str(it.id_of[r])))[:n]
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
            return {
                "topic": self.topic,
                "ready": self.ready,
                "error": self.error,
                "users": len(self._users),
                "items": len(self._items.row_of) if self._items is not None else 0,
                "item_step": self._item_step,
                "positions": {str(p): o for p, o in sorted(self._positions.items())},
                "end_offsets_at_start": {str(p): o for p, o in sorted(self._start_ends.items())},
                **self.counts,
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


def _vector(values: Any, dim: int | None) -> np.ndarray:
    vec = np.asarray(values, np.float32)
    if vec.ndim != 1 or (dim is not None and len(vec) != dim):
        raise ValueError(f"vector of shape {vec.shape}, expected ({dim},)")
    if not np.isfinite(vec).all():
        raise ValueError("vector has non-finite values")
    return vec


def _check_n(n: int) -> None:
    if not 1 <= n <= 10_000:
        raise ValueError(f"serving: n must be in 1..10000, got {n}")


def example_record(kind: str, ident: str, version: int, vector: list[float], bias: float = 0.0, step: int = 1,
         **extra: Any) -> bytes:
    """A hand-made embedding record value in the job's format (``flink_job.publish``), for examples and tests."""
    return orjson.dumps({"kind": kind, "id": ident, "version": version, "step": step, "bias": bias,
                         "vector": vector, "event_ts": 0, "produced_ms": 0, **extra})
