"""The training stage: chunks of lines in, embedding records, dead letters and batch statistics out.

``TrainStage`` is plain Python (tested without a JVM); ``TrainFunction`` is the thin Flink shell that owns it,
registers the flush timer and hands its outputs to the main stream and the side outputs.
"""
from __future__ import annotations

import gc
import logging
import pickle
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from flink_job.batch import MicroBatcher
from flink_job.clean import COUNTERS, Cleaner
from flink_job.config import JobConfig
from flink_job.events import ACTIONS
from flink_job.lateness import Watermarks
from flink_job.near_dups import NearDuplicates
from flink_job.parse import DeadLetter, EventBatch, ParseRules, parse_lines
from flink_job.publish import DirtyRows, encode_records
from model.mf import OnlineBiasedMF

log = logging.getLogger(__name__)
STAGE = "train"
TIMER_TICK_MS = 50
GC_YOUNG_THRESHOLD = 50_000


@dataclass
class Counters:
    received: int = 0  # lines that reached Python (after de-duplication)
    dead_lettered: int = 0
    near_duplicates: int = 0  # distinct events that repeat a user, item and action within the window
    trained: int = 0
    batches: int = 0
    published: int = 0


@dataclass
class Output:
    """What one call produced: embedding records, dead letters and one stats record per batch trained."""

    embeddings: list[tuple[str, str]] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    stats: list[str] = field(default_factory=list)
    trained: int = 0
    near_duplicates: int = 0


STATE_VERSION = 1
# What a checkpoint holds besides the model: per component, the attributes that are state (not configuration), so
# a job restarted with a new configuration keeps what it learned and applies the new settings from then on.
_STATE_ATTRS: dict[str, tuple[str, ...]] = {
    "counters": tuple(Counters.__dataclass_fields__),
    "batcher": ("_parts", "pending"),
    "watermarks": ("max_ts",),
    "near_duplicates": ("last", "newest_ts"),
    "dirty_users": ("mask", "event_ts", "partition", "offset"),
    "dirty_items": ("mask", "event_ts", "partition", "offset"),
}
_STATE_SCALARS = ("last_publish_ms", "pending_since_ms", "first_chunk_ms")


class TrainStage:
    def __init__(self, cfg: JobConfig) -> None:
        self.cfg = cfg
        self.rules = ParseRules(
            cfg.clean.max_id_length, cfg.model.rating_min, cfg.model.rating_max, cfg.clean.max_record_chars,
            cfg.clean.max_future_ms,
        )
        self.model = OnlineBiasedMF(cfg.model)
        # (A,) weight per action code; an implicit action missing from the mapping weighs 1.
        self.action_weight = np.array(
            [float(cfg.clean.action_weights.get(a, 1.0)) for a in ACTIONS], np.float32
        )
        self.batcher = MicroBatcher(cfg.batch.size)
        self.watermarks = Watermarks(cfg.clean.out_of_orderness_ms, cfg.clean.allowed_lateness_ms)
        self.near_duplicates = NearDuplicates(cfg.clean.near_duplicate_window_ms)
        self.cleaner = Cleaner(cfg.clean)
        self.counters = Counters()
        self.dirty_users = DirtyRows()
        self.dirty_items = DirtyRows()
        self.last_publish_ms = 0
        self.pending_since_ms = 0
        self.first_chunk_ms = 0

    def state_bytes(self) -> bytes:
        """Everything the stage has learned and holds: the model and optimiser, counters, watermarks, the
        near-duplicate memory, the pending partial batch and the rows not yet published."""
        parts = {name: {a: getattr(getattr(self, name), a) for a in attrs} for name, attrs in _STATE_ATTRS.items()}
        parts["scalars"] = {a: getattr(self, a) for a in _STATE_SCALARS}
        parts["cleaner"] = self.cleaner.state_dict()
        return pickle.dumps(
            {"version": STATE_VERSION, "model": self.model.state_bytes(), "parts": parts}, pickle.HIGHEST_PROTOCOL
        )

    @classmethod
    def from_bytes(cls, cfg: JobConfig, data: bytes) -> TrainStage:
        """The stage as ``state_bytes`` saw it, under configuration ``cfg`` (which may differ from the old one)."""
        state = pickle.loads(data)
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"train: state version {state.get('version')} is not {STATE_VERSION}")
        stage = cls(cfg)
        stage.model = OnlineBiasedMF.from_bytes(state["model"], cfg.model)
        parts = state["parts"]
        for name, attrs in _STATE_ATTRS.items():
            for a in attrs:
                setattr(getattr(stage, name), a, parts[name][a])
        for a in _STATE_SCALARS:
            setattr(stage, a, parts["scalars"][a])
        stage.cleaner.load_state_dict(parts["cleaner"])
        return stage

    def on_chunk(self, lines: list[str], now_ms: int | None = None) -> Output:
        """Parse a chunk, train on every full batch it completes, publish if the publish interval has passed."""
        now_ms = _now_ms() if now_ms is None else now_ms
        out = Output()
        if not self.first_chunk_ms:
            self.first_chunk_ms = now_ms
        batch, dead = parse_lines(lines, self.rules, now_ms)
        batch, late = self.watermarks.split(batch)
        dead.extend(late)
        batch, out.near_duplicates = self.near_duplicates.filter(batch)
        self.counters.near_duplicates += out.near_duplicates
        batch, rejected = self.cleaner.apply(batch)
        dead.extend(rejected)
        self.counters.received += len(lines)
        self.counters.dead_lettered += len(dead)
        out.dead_letters.extend(dead)
        if len(batch) and not self.batcher.pending:
            self.pending_since_ms = now_ms
        self.batcher.add(batch)
        for full in self.batcher.take_full():
            self._train(full, out)
            self.pending_since_ms = now_ms
        self._maybe_publish(out, now_ms)
        return out

    def on_time(self, now_ms: int | None = None) -> Output:
        """Time bounds: train a partial batch that waited ``max_wait_ms``; publish when the interval has passed."""
        now_ms = _now_ms() if now_ms is None else now_ms
        out = Output()
        if self.batcher.pending and now_ms - self.pending_since_ms >= self.cfg.batch.max_wait_ms:
            for rest in self.batcher.take_rest():
                self._train(rest, out)
        self._maybe_publish(out, now_ms)
        return out

    def next_deadline_ms(self) -> int | None:
        """When ``on_time`` next has work to do, or None while nothing is pending or unpublished."""
        deadlines = []
        if self.batcher.pending:
            deadlines.append(self.pending_since_ms + self.cfg.batch.max_wait_ms)
        if self.unpublished:
            deadlines.append(self.last_publish_ms + self.cfg.publish.interval_ms)
        return min(deadlines) if deadlines else None

    @property
    def unpublished(self) -> bool:
        return len(self.dirty_users) > 0 or len(self.dirty_items) > 0

    def _maybe_publish(self, out: Output, now_ms: int) -> None:
        if not (self.unpublished and now_ms - self.last_publish_ms >= self.cfg.publish.interval_ms):
            return
        start = time.perf_counter()
        published = self._publish(out)
        self.counters.published += published
        self.last_publish_ms = now_ms
        out.stats.append(self._stats("publish", embeddings=published, publish_ms=(time.perf_counter() - start) * 1000))

    def _train(self, batch: EventBatch, out: Output) -> None:
        start = time.perf_counter()
        model = self.model
        weights = self.action_weight[batch.actions] * batch.values  # (B,) used by implicit events only
        stats = model.learn_many(batch.users, batch.items, batch.actions, batch.values, weights)
        train_ms = (time.perf_counter() - start) * 1000
        self.dirty_users.touch(stats.event_user_rows, batch.ts, batch.partitions, batch.offsets)
        self.dirty_items.touch(stats.event_item_rows, batch.ts)
        self.dirty_items.touch(stats.item_rows)  # sampled negatives moved too
        out.trained += len(batch)
        self.counters.trained += len(batch)
        self.counters.batches += 1
        out.stats.append(
            self._stats(
                "batch", events=len(batch), ratings=stats.ratings, rating_mse=stats.rating_loss,
                bpr_loss=stats.bpr_loss, train_ms=train_ms, max_event_ts=int(batch.ts.max()),
            )
        )

    def _stats(self, kind: str, **fields: float) -> str:
        """One job-stats record: what happened (a batch or a publish) and the cumulative counters."""
        c = self.counters
        return orjson.dumps(
            {
                "kind": kind,
                **{k: round(v, 3) if isinstance(v, float) else v for k, v in fields.items()},
                "batch": c.batches,
                "step": self.model.step,
                "received": c.received,
                "dead_lettered": c.dead_lettered,
                "near_duplicates": c.near_duplicates,
                "clean": self.cleaner.counts,
                "trained": c.trained,
                "published": c.published,
                "known_users": len(self.model.users),
                "known_items": len(self.model.items),
                "first_chunk_ms": self.first_chunk_ms,
                "at_ms": _now_ms(),
            }
        ).decode()

    def _publish(self, out: Output) -> int:
        """Encodes every row touched since the last publish, once each."""
        model = self.model
        rows, ts, parts, offs = self.dirty_users.drain()
        vectors, biases, versions = model.vectors("user", rows)
        out.embeddings.extend(
            encode_records("user", model.users.ids(rows), vectors, biases, versions, model.step, ts, parts, offs,
                           model.event_counts("user", rows))
        )
        irows, its, _, _ = self.dirty_items.drain()
        vectors, biases, versions = model.vectors("item", irows)
        out.embeddings.extend(
            encode_records("item", model.items.ids(irows), vectors, biases, versions, model.step, its,
                           events=model.event_counts("item", irows))
        )
        return len(rows) + len(irows)


def _now_ms() -> int:
    return int(time.time() * 1000)


class PickledOnCommit:
    """Stands in for the stage's state in a Flink ``ValueState``.

    PyFlink encodes a state value only when it commits the bundle's state writes, which it does at the end of
    every bundle and before every checkpoint barrier. Handing the state this object after each call costs nothing;
    it serialises the stage once per bundle, as the stage is at that moment, so a checkpoint holds exactly the
    state that produced the outputs before its barrier.

    >>> import pickle
    >>> class Stage:
    ...     def state_bytes(self): return b"now"
    >>> pickle.loads(pickle.dumps(PickledOnCommit(Stage())))
    b'now'
    """

    __slots__ = ("stage",)

    def __init__(self, stage: Any) -> None:
        self.stage = stage

    def __reduce__(self) -> tuple[type[bytes], tuple[bytes]]:
        return bytes, (self.stage.state_bytes(),)


def make_train_function(cfg: JobConfig):  # type: ignore[no-untyped-def]
    """The Flink ``KeyedProcessFunction`` around ``TrainStage``; built here so importing this module needs no JVM."""
    from pyflink.common import Row, Types
    from pyflink.datastream import KeyedProcessFunction, RuntimeContext
    from pyflink.datastream.state import ValueStateDescriptor

    # The module, not its tags: tags cache JVM handles once used, and the function is pickled for each job.
    from flink_job import outputs

    class TrainFunction(KeyedProcessFunction):  # type: ignore[misc]
        def __init__(self) -> None:
            self.stage: TrainStage | None = None

        def open(self, runtime_context: RuntimeContext) -> None:
            # Every parsed record is a dict, so the collector's youngest generation fills every 700 records and its
            # older ones rescan the per-user state; collecting less often made the stage 12% faster (BENCHMARKS.md).
            gc.set_threshold(GC_YOUNG_THRESHOLD, 20, 100)
            # The whole stage lives in keyed state (one key: one model), restored on the first call after a restart.
            self.state = runtime_context.get_state(ValueStateDescriptor("stage", Types.PICKLED_BYTE_ARRAY()))
            self.snapshot: PickledOnCommit | None = None
            group = runtime_context.get_metrics_group().add_group(STAGE)
            self.m_batches = group.counter("batches")
            self.m_trained = group.counter("eventsTrained")
            self.m_received = group.counter("eventsReceived")
            self.m_dead = group.counter("deadLettered")
            self.m_near = group.counter("nearDuplicates")
            self.m_reasons = group.add_group("deadLetterReason")
            clean = runtime_context.get_metrics_group().add_group("clean")
            self.m_clean = {name: clean.counter(name) for name in COUNTERS}
            self.clean_reported: dict[str, int] = {}  # cleaning counts already added to the metrics
            self.reason_counters: dict[str, Any] = {}  # one counter per reason, made when first seen

        def _stage(self) -> TrainStage:
            if self.stage is None:
                saved = self.state.value()
                self.stage = TrainStage.from_bytes(cfg, saved) if saved is not None else TrainStage(cfg)
                self.snapshot = PickledOnCommit(self.stage)
                self.clean_reported = dict(self.stage.cleaner.counts)  # metrics count from this run's start
                m = self.stage.model
                log.info("train: %s; model on %s with %d users, %d items, step %d; batch size %d",
                         "restored" if saved is not None else "new", m.device, len(m.users), len(m.items), m.step,
                         cfg.batch.size)
            return self.stage

        def process_element(self, value: Row, ctx: KeyedProcessFunction.Context) -> Iterator[object]:
            lines = list(value[1])
            self.m_received.inc(len(lines))
            out = self._stage().on_chunk(lines, ctx.timer_service().current_processing_time())
            self.state.update(self.snapshot)
            yield from self._emit(out)
            self._schedule(ctx)

        def on_timer(self, timestamp: int, ctx: KeyedProcessFunction.OnTimerContext) -> Iterator[object]:
            out = self._stage().on_time(ctx.timer_service().current_processing_time())
            self.state.update(self.snapshot)
            yield from self._emit(out)
            self._schedule(ctx)

        def _schedule(self, ctx: KeyedProcessFunction.Context) -> None:
            """A timer at the stage's next deadline, rounded up to a tick so that Flink, which keeps one timer per
            key and time, merges the registrations of successive calls. Every call registers: the function keeps no
            memory of its timers, which a restore from a checkpoint would make stale."""
            assert self.stage is not None
            due = self.stage.next_deadline_ms()
            if due is not None:
                ctx.timer_service().register_processing_time_timer(-(-due // TIMER_TICK_MS) * TIMER_TICK_MS)

        def _emit(self, out: Output) -> Iterator[object]:
            self.m_trained.inc(out.trained)
            self.m_near.inc(out.near_duplicates)
            if out.embeddings:
                yield Row(dict(out.embeddings))
            for d in out.dead_letters:
                yield outputs.DEAD_LETTER_TAG, Row(d.key(), d.to_json())
                counter = self.reason_counters.get(d.reason)
                if counter is None:
                    counter = self.reason_counters[d.reason] = self.m_reasons.counter(d.reason)
                counter.inc()
            for s in out.stats:
                yield outputs.STATS_TAG, Row("stats", s)
            self.m_dead.inc(len(out.dead_letters))
            self.m_batches.inc(len(out.stats))
            self._report_cleaning()

        def _report_cleaning(self) -> None:
            """Adds what the cleaning rules did since the last call to the metrics."""
            assert self.stage is not None
            counts = self.stage.cleaner.counts
            for name, n in counts.items():
                delta = n - self.clean_reported.get(name, 0)
                if delta:
                    self.m_clean[name].inc(delta)
                    self.clean_reported[name] = n

    return TrainFunction()
