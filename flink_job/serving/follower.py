"""The serving index's topic follower: a consumer thread that reads the embeddings topic from the beginning, hands
each batch to the index, tracks its positions against the topic's end offsets, and says whether it is healthy.

A mixin of :class:`flink_job.serving.index.EmbeddingIndex`, which owns the records it applies; kept apart so that
the data structure reads without the Kafka plumbing."""
from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, Self

from flink_job.serving.config import ServingConfig

log = logging.getLogger("flink_job.serving.index")  # one logger for the index and its follower, as before
RawRecord = tuple[bytes | None, bytes | None]  # (key, value); value None is a tombstone


def watermark_timeout_s(lag_check_s: float) -> float:
    """How long one end-offset request may take: the check interval, but at least 1 s, since a broker under load
    answers in more than a frequent check's 0.1 s and an answer that times out dates no lag at all (the index then
    never reports itself behind), and at most 5 s, since the request blocks the loop that reads the topic.

    >>> watermark_timeout_s(0.1), watermark_timeout_s(2.0), watermark_timeout_s(60.0)
    (1.0, 2.0, 5.0)
    """
    return min(5.0, max(1.0, lag_check_s))


class TopicFollower:
    """Follows ``topic`` on a background thread and applies what it reads with ``apply`` (the index's)."""

    bootstrap: str
    topic: str
    isolation_level: str
    client_properties: dict[str, str]
    poll_timeout_s: float
    max_batch: int
    config: ServingConfig
    counts: dict[str, int]
    error: str | None
    _lock: threading.RLock
    _changed: threading.Condition

    def _init_follower(self) -> None:
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

    def apply(self, records: Iterable[RawRecord]) -> None:
        raise NotImplementedError  # the index's

    def stats(self) -> dict[str, Any]:
        raise NotImplementedError  # the index's

    def start(self) -> Self:
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

    def __enter__(self) -> Self:
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
                    TopicPartition(self.topic, p), timeout=watermark_timeout_s(self.config.lag_check_s), cached=False)
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

    def wait_until(self, predicate: Callable[[Self], bool], timeout: float) -> None:
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

