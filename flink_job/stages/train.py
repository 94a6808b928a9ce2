"""The training stage: chunks of lines in, embedding records, dead letters and batch statistics out.

``TrainStage`` chains parse, lateness, near-duplicates and cleaning, trains on full batches and publishes the rows
that moved. It is plain Python, tested without a JVM; its Flink shell is ``flink_job.flink.train_function``.
"""
from __future__ import annotations

import io
import logging
import pickle
import time
from pathlib import Path
from typing import Any

import numpy as np

from model.arrays import Array

from flink_job.stages.batch import MicroBatcher
from flink_job.stages.clean import Cleaner
from flink_job.config import JobConfig
from flink_job.schema import ACTIONS, RATING_CODE
from flink_job.stages.lateness import Watermarks
from flink_job.stages.near_dups import NearDuplicates
from flink_job.stages.parse import DeadLetter, EventBatch, ParseRules, parse_lines, line_position
from flink_job.stages.publish import DirtyRows, Drift, encode_records, write_snapshot
from flink_job.stages.calls import CHUNK, TIMER, Call
from flink_job.stages.train_output import STAGE, Counters, Output, skipped_dead_letters, stats_record
from model.batch import BatchStats
from model.mf import OnlineBiasedMF
from model.prequential import Prequential, combine
from model.sequential import Evaluate

log = logging.getLogger(__name__)


STATE_VERSION = 1
# What a checkpoint holds besides the model: per component, the attributes that are state (not configuration), so
# a job restarted with a new configuration keeps what it learned and applies the new settings from then on.
_STATE_ATTRS: dict[str, tuple[str, ...]] = {
    "counters": tuple(Counters.__dataclass_fields__),
    "batcher": ("_parts", "pending"),
    "watermarks": ("max_ts",),
    "near_duplicates": ("last", "newest_ts"),
}
_DIRTY = ("dirty_users", "dirty_items")  # DirtyRows, kept as their dirty rows only
_STATE_SCALARS = ("last_publish_ms", "last_item_publish_ms", "pending_since_ms", "first_chunk_ms", "last_snapshot_ms",
                  "dirty_since_ms")
_NO_ROWS = np.zeros(0, np.int64)


class TrainStage:
    def __init__(self, cfg: JobConfig) -> None:
        self.cfg = cfg
        self.settings = cfg.stage_settings()  # written with every snapshot (restore); cfg is frozen, so once
        self.rules = ParseRules(
            cfg.clean.max_id_length, cfg.model.rating_min, cfg.model.rating_max, cfg.clean.max_record_chars,
            cfg.clean.max_future_ms, cfg.clean.max_value,
        )
        self.model = (
            OnlineBiasedMF.from_file_bytes(Path(cfg.flink.initial_model).read_bytes(), cfg.model,
                                           what=f"flink.initial_model {cfg.flink.initial_model}",
                                           rating_code=RATING_CODE)
            if cfg.flink.initial_model else OnlineBiasedMF(cfg.model, RATING_CODE)
        )
        # (A,) weight per action code; an implicit action missing from the mapping weighs 1.
        self.action_weight = np.array(
            [float(cfg.clean.action_weights.get(a, 1.0)) for a in ACTIONS], np.float32
        )
        self.batcher = MicroBatcher(cfg.batch.size)
        self.watermarks = Watermarks(cfg.clean.out_of_orderness_ms, cfg.clean.allowed_lateness_ms,
                                     cfg.clean.max_future_ms)
        # Per-id memory outside the model is capped at the model's row cap (docs/model.md, "Ids and bounded memory").
        self.near_duplicates = NearDuplicates(cfg.clean.near_duplicate_window_ms, cfg.model.ids.max_rows)
        self.cleaner = Cleaner(cfg.clean, cfg.model.ids.max_rows)
        self.counters = Counters()
        self.dirty_users = DirtyRows()
        self.dirty_items = DirtyRows()
        # Not checkpointed: after a restore every touched row counts as moved once, which only publishes it early.
        self.drift_users = Drift()
        self.drift_items = Drift()
        self.last_publish_ms = 0  # of users
        self.last_item_publish_ms = 0
        self.last_snapshot_ms = 0
        self.dirty_since_ms = 0  # when the oldest change not yet published was made (0: none waiting)
        self.quality = (
            Prequential(cfg.eval.k, cfg.model.rating_min, cfg.model.rating_max, cfg.eval.user_sample,
                        max_items=cfg.model.ids.max_rows, max_seen=cfg.model.ids.max_rows)
            if cfg.eval.enabled else None
        )
        # (A,) whether each action code is a positive for ranking; ratings are judged by value instead.
        self.positive_action = np.array([a in cfg.eval.positive_action_list for a in ACTIONS], bool)
        self.pending_since_ms = 0
        self.first_chunk_ms = 0
        self.now_ms = 0  # the current call's clock, so that a replayed call (flink_job.stages.calls) does the same
        self.replayed_calls = 0  # how many logged calls this run's restore replayed (not state)

    def state_bytes(self) -> bytes:
        """Everything the stage has learned and holds: the model and optimiser, counters, watermarks, the
        near-duplicate memory, the pending partial batch and the rows not yet published."""
        parts: dict[str, Any] = {name: {a: getattr(getattr(self, name), a) for a in attrs}
                                 for name, attrs in _STATE_ATTRS.items()}
        parts["scalars"] = {a: getattr(self, a) for a in _STATE_SCALARS}
        parts.update({name: getattr(self, name).state() for name in _DIRTY})
        parts["cleaner"] = self.cleaner.state_dict()
        parts["quality"] = self.quality.state_dict() if self.quality else None
        return pickle.dumps(
            {"version": STATE_VERSION, "model": self.model.state_bytes(), "parts": parts,
             "settings": self.settings},
            pickle.HIGHEST_PROTOCOL,
        )

    @classmethod
    def from_bytes(cls, cfg: JobConfig, data: bytes) -> TrainStage:
        """The stage as ``state_bytes`` saw it, under configuration ``cfg`` (which may differ from the old one)."""
        return cls._from_state(cfg, _load_state(data))

    @classmethod
    def _from_state(cls, cfg: JobConfig, state: dict[str, Any]) -> TrainStage:
        stage = cls(cfg)
        stage.model = OnlineBiasedMF.from_bytes(state["model"], cfg.model, RATING_CODE)
        parts = state["parts"]
        for name, attrs in _STATE_ATTRS.items():
            for a in attrs:
                if a in parts[name]:  # state written by an older version may lack an attribute added since
                    setattr(getattr(stage, name), a, parts[name][a])
        for name in _DIRTY:
            setattr(stage, name, DirtyRows.from_state(parts[name]))
        for a in _STATE_SCALARS:
            if a in parts["scalars"]:
                setattr(stage, a, parts["scalars"][a])
        stage.cleaner.load_state_dict(parts["cleaner"])
        if stage.quality and parts.get("quality"):
            try:
                stage.quality.load_state_dict(parts["quality"])
            except ValueError as ex:  # evaluated with other settings before: the new ones start from zero
                log.warning("train: prequential quality restarts: %s", ex)
        return stage

    @classmethod
    def restore(cls, cfg: JobConfig, saved: bytes | None, calls: list[Call]) -> TrainStage:
        """The stage from its last snapshot (a new one if there is none) with the calls made since replayed; their
        outputs went out before the checkpoint and are dropped.

        The calls are replayed under the settings they first ran with, which the snapshot holds, so that an upgrade
        that changes them (a new learning rate, say) still rebuilds the stage that made the published outputs; the
        new settings apply from the next call, as they do when a snapshot alone is restored."""
        state = _load_state(saved) if saved is not None else None
        ran = cfg.with_stage_settings(state["settings"]) if state and calls and "settings" in state else cfg
        stage = cls._from_state(ran, state) if state else cls(cfg)
        for call in calls:
            stage.call(call)
        if ran != cfg:
            log.info("train: %d logged calls replayed under the settings they ran with, the new ones apply now",
                     len(calls))
            stage = cls.from_bytes(cfg, stage.state_bytes())
        stage.replayed_calls = len(calls)
        return stage

    def call(self, call: Call) -> Output:
        """``on_chunk`` or ``on_time``, as ``call`` (a ``flink_job.stages.calls`` record) says."""
        kind, now_ms, lines = call
        if kind == CHUNK:
            return self.on_chunk(lines or [], now_ms)
        if kind == TIMER:
            return self.on_time(now_ms)
        raise ValueError(f"train: unknown call {kind!r}")

    def on_chunk(self, lines: list[str], now_ms: int | None = None) -> Output:
        """Parse a chunk, train on every full batch it completes, publish if the publish interval has passed."""
        now_ms = self.now_ms = _now_ms() if now_ms is None else now_ms
        out = Output()
        if not self.first_chunk_ms:
            self.first_chunk_ms = now_ms
        batch, dead, out.near_duplicates = self._admit_guarded(lines, now_ms)
        self.counters.near_duplicates += out.near_duplicates
        batch.payloads = []  # no stage after cleaning rejects by payload: the pending batch (in state) is lighter
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
        self._maybe_snapshot(now_ms)
        return out

    def _admit(self, lines: list[str], now_ms: int) -> tuple[EventBatch, list[DeadLetter], int]:
        """Parse, lateness, near-duplicates and cleaning: ``(events to train, dead letters, near-duplicates)``."""
        batch, dead = parse_lines(lines, self.rules, now_ms)
        batch, late = self.watermarks.split(batch, now_ms)
        dead.extend(late)
        batch, near = self.near_duplicates.filter(batch)
        batch, rejected = self.cleaner.apply(batch)
        dead.extend(rejected)
        return batch, dead, near

    def _admit_guarded(self, lines: list[str], now_ms: int) -> tuple[EventBatch, list[DeadLetter], int]:
        """``_admit``, but no record can fail the call: the parser dead-letters what it cannot judge, and if a later
        stage raises anyway (a bug the data found) the chunk is admitted again line by line, each line that still
        raises becoming an ``internal_error`` dead letter, so the rest of the chunk is kept and every line is
        accounted for once. The stages' state may hold the part of a failed pass that ran before the exception."""
        try:
            return self._admit(lines, now_ms)
        except Exception:
            log.exception("train: a chunk of %d lines raised; admitting it line by line", len(lines))
        batches: list[EventBatch] = []
        dead: list[DeadLetter] = []
        near = 0
        for line in lines:
            try:
                batch, letters, n = self._admit([line], now_ms)
            except Exception as ex:
                part, off, payload = line_position(line)
                dead.append(DeadLetter("internal_error", STAGE, payload, part, off, f"{type(ex).__name__}: {ex}"[:200]))
                continue
            batches.append(batch)
            dead.extend(letters)
            near += n
        kept = [b for b in batches if len(b)]
        return (EventBatch.concat(kept) if kept else parse_lines([])[0]), dead, near

    def on_time(self, now_ms: int | None = None) -> Output:
        """Time bounds: train a partial batch that waited ``max_wait_ms``; publish when the interval has passed."""
        now_ms = self.now_ms = _now_ms() if now_ms is None else now_ms
        out = Output()
        if self.batcher.pending and now_ms - self.pending_since_ms >= self.cfg.batch.max_wait_ms:
            for rest in self.batcher.take_rest():
                self._train(rest, out)
        self._maybe_publish(out, now_ms)
        self._maybe_snapshot(now_ms)
        return out

    def next_deadline_ms(self) -> int | None:
        """When ``on_time`` next has work to do, or None while nothing is pending or unpublished."""
        deadlines = []
        if self.batcher.pending:
            deadlines.append(self.pending_since_ms + self.cfg.batch.max_wait_ms)
        deadlines.extend(d for d in self._publish_deadlines() if d is not None)
        return min(deadlines) if deadlines else None

    def _publish_deadlines(self) -> tuple[int | None, int | None]:
        """When the touched users and the touched items are next due for publishing (None: none touched)."""
        cfg = self.cfg.publish
        return (self.last_publish_ms + cfg.interval_ms if len(self.dirty_users) else None,
                self.last_item_publish_ms + cfg.item_interval_ms if len(self.dirty_items) else None)

    @property
    def unpublished(self) -> bool:
        return len(self.dirty_users) > 0 or len(self.dirty_items) > 0

    def _maybe_publish(self, out: Output, now_ms: int) -> None:
        """Publishes the touched users and the touched items whose intervals have passed."""
        users, items = (due is not None and now_ms >= due for due in self._publish_deadlines())
        if not (users or items):
            return
        start = time.perf_counter()
        n_users, n_items = self._publish(out, None if users else _NO_ROWS, None if items else _NO_ROWS)
        published = n_users + n_items
        self.counters.published += published
        if self.dirty_since_ms:
            out.publish_lag_ms = now_ms - self.dirty_since_ms
        self.dirty_since_ms = now_ms if self.unpublished else 0
        if users:
            self.last_publish_ms = now_ms
        if n_items:  # items left out by publish.max_records stay due
            self.last_item_publish_ms = now_ms
        out.stats.append(self._stats("publish", embeddings=published, publish_ms=(time.perf_counter() - start) * 1000))

    def _train(self, batch: EventBatch, out: Output) -> None:
        model = self.model
        figures: list[dict[str, float]] = []
        start = time.perf_counter()
        weights = self.action_weight[batch.actions] * batch.values  # (B,) used by implicit events only
        # Each sub-step of the batch is tested just before the model trains on it (test, then train).
        stats = model.learn_many(batch.users, batch.items, batch.actions, batch.values, weights, batch.ts,
                                 self._evaluate(batch, figures))
        quality = {k: round(float(v), 5) for k, v in combine(figures).items()} if figures else None
        train_ms = (time.perf_counter() - start) * 1000
        out.batches += 1
        out.batch_sizes.append(len(batch))
        out.train_ms.append(train_ms)
        out.losses.append((stats.rating_loss, stats.bpr_loss))
        self.counters.batches += 1
        if stats.skipped:
            self._skipped(batch, out)
        else:
            self._touch(stats, batch, out)
            out.trained += len(batch)
            self.counters.trained += len(batch)
        out.stats.append(
            self._stats(
                "batch", events=len(batch), ratings=stats.ratings, rating_mse=stats.rating_loss,
                bpr_loss=stats.bpr_loss, train_ms=train_ms, max_event_ts=int(batch.ts.max()), skipped=stats.skipped,
                quality=quality,
            )
        )
        every = self.cfg.eval.log_every_batches
        if self.quality and every and self.counters.batches % every == 0:
            q = self.quality.summary()
            log.info("train: batch %d, %d events trained; prequential RMSE %.4f MAE %.4f HR@%d %.4f NDCG@%d %.4f "
                     "(%d ratings, %d positives ranked)", self.counters.batches, self.counters.trained, q["rmse"],
                     q["mae"], self.cfg.eval.k, q["hr"], self.cfg.eval.k, q["ndcg"], q["rated"], q["positives"])

    def _skipped(self, batch: EventBatch, out: Output) -> None:
        """The model refused the batch (a non-finite loss or gradient) and rolled its rows back: nothing of it was
        learned or is published, and its events go to the dead letters (re-encoded; the parser keeps no original
        bytes), so every input record is still accounted for."""
        out.skipped_batches += 1
        self.counters.skipped_batches += 1
        self.counters.dead_lettered += len(batch)
        log.warning("train: batch %d skipped (%d events dead-lettered): non-finite loss or gradient, rows rolled back",
                    self.counters.batches, len(batch))
        out.dead_letters.extend(skipped_dead_letters(batch, self.counters.batches))

    def _evaluate(self, batch: EventBatch, figures: list[dict[str, float]]) -> Evaluate | None:
        """The test of a part of the batch against the model as it is, its figures added to ``figures``."""
        quality = self.quality
        if quality is None:
            return None
        is_rating = batch.actions == RATING_CODE
        ratings = np.where(is_rating, batch.values, np.nan)
        positive = np.where(is_rating, batch.values >= self.cfg.eval.positive_rating,
                            self.positive_action[batch.actions])

        def evaluate(part: slice) -> None:
            figures.append(quality.evaluate(self.model, batch.users[part], batch.items[part], ratings[part],
                                            positive[part]))
        return evaluate

    def _touch(self, stats: BatchStats, batch: EventBatch, out: Output) -> None:
        """Marks the rows the batch moved for publishing; row 0, the shared vector of ids not admitted yet, is no
        id's own and is not published. Ids the model expired or evicted go out as tombstones."""
        if not len(self.dirty_users) and not len(self.dirty_items):
            self.dirty_since_ms = self.now_ms
        own = stats.event_user_rows > 0
        self.dirty_users.touch(stats.event_user_rows[own], batch.ts[own], batch.partitions[own], batch.offsets[own])
        self.dirty_users.touch(stats.user_rows[stats.user_rows > 0])  # users of replayed events moved too
        own = stats.event_item_rows > 0
        self.dirty_items.touch(stats.event_item_rows[own], batch.ts[own])
        self.dirty_items.touch(stats.item_rows[stats.item_rows > 0])  # sampled negatives moved too
        for counter, (gone_users, gone_items) in (("evicted", self.model.drain_evicted()),
                                                  ("expired", self.model.drain_expired())):
            if gone_users or gone_items:
                out.embeddings.extend((f"user:{u}", None) for u in gone_users)
                out.embeddings.extend((f"item:{i}", None) for i in gone_items)
                setattr(self.counters, counter, getattr(self.counters, counter) + len(gone_users) + len(gone_items))
        if self.cfg.publish.tolerance > 0:
            self._publish_moved(out, stats.event_user_rows[stats.event_user_rows > 0],
                                stats.item_rows[stats.item_rows > 0])

    def _stats(self, kind: str, **fields: Any) -> str:
        return stats_record(kind, fields, self.counters, self.model, self.cleaner.counts,
                            self.quality.summary() if self.quality else None, self.first_chunk_ms, self.replayed_calls)

    def _publish(self, out: Output, users: Array | None = None,
                 items: Array | None = None) -> tuple[int, int]:
        """Encodes the rows touched since they were last published (of ``users``/``items`` if given), once each,
        at most ``publish.max_records`` of them: users first, the rest stay pending for the next publish.
        Returns how many users and items it published.

        A record's ``version`` is the model step it was published at, so it grows per id even across an expiry
        and a re-admission (which restart the row's update count)."""
        cap = self.cfg.publish.max_records
        rows, ts, parts, offs = self.dirty_users.drain(cap, users)
        n = self._encode("user", out, rows, ts, parts, offs)
        if cap and n >= cap:
            return n, 0
        irows, its, _, _ = self.dirty_items.drain(cap - n if cap else 0, items)
        return n, self._encode("item", out, irows, its)

    def _encode(self, kind: str, out: Output, rows: Array, ts: Array, parts: Array | None = None,
                offs: Array | None = None) -> int:
        model = self.model
        ids = (model.users if kind == "user" else model.items).ids(rows)
        live = np.array([bool(k) for k in ids], bool)  # a row freed by expiry since it was touched has no id
        if not live.all():
            rows, ts, ids = rows[live], ts[live], [k for k in ids if k]
            parts, offs = (None, None) if parts is None or offs is None else (parts[live], offs[live])
        if not len(rows):
            return 0
        vectors, biases, updates = model.vectors(kind, rows)
        seen = self.cleaner.recent_items_of(ids) if kind == "user" else None
        out.embeddings.extend(
            encode_records(kind, ids, vectors, biases, updates, model.step, ts, parts, offs,
                           model.event_counts(kind, rows), seen)
        )
        model.mark_published(kind, rows)
        if self.cfg.publish.tolerance > 0:
            (self.drift_users if kind == "user" else self.drift_items).published(rows, vectors)
        return len(rows)

    def _publish_moved(self, out: Output, user_rows: Array, item_rows: Array) -> None:
        """Publishes at once the rows a batch moved by more than ``publish.tolerance`` since their last publish."""
        tolerance = self.cfg.publish.tolerance
        users, items = np.unique(user_rows), np.unique(item_rows)
        moved_users = users[self.drift_users.moved(users, self.model.vectors("user", users)[0], tolerance)]
        moved_items = items[self.drift_items.moved(items, self.model.vectors("item", items)[0], tolerance)]
        if len(moved_users) or len(moved_items):
            self.counters.published += sum(self._publish(out, moved_users, moved_items))

    def _maybe_snapshot(self, now_ms: int) -> None:
        """The file sink: every table as NumPy arrays with an id index, replaced atomically."""
        cfg = self.cfg.publish
        if cfg.snapshot_dir and now_ms - self.last_snapshot_ms >= cfg.snapshot_interval_ms:
            write_snapshot(Path(cfg.snapshot_dir), self.model)
            self.last_snapshot_ms = now_ms


def _now_ms() -> int:
    return int(time.time() * 1000)


# Modules of the stages before they moved into flink_job.stages: a checkpoint or savepoint taken before names its
# classes (the pending batch's EventBatch) by these paths.
_MOVED_MODULES = {f"flink_job.{m}": f"flink_job.stages.{m}"
                  for m in ("parse", "lateness", "near_dups", "clean", "users", "batch", "publish", "train")}


class _StateUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        return super().find_class(_MOVED_MODULES.get(module, module), name)


def _load_state(data: bytes) -> dict[str, Any]:
    state: dict[str, Any] = _StateUnpickler(io.BytesIO(data)).load()
    if state.get("version") != STATE_VERSION:
        raise ValueError(f"train: state version {state.get('version')} is not {STATE_VERSION}")
    return state
