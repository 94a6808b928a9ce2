"""The training stage: chunks of lines in, embedding records, dead letters and batch statistics out.

``TrainStage`` is the orchestrator: ``Admission`` (``flink_job.stages.admission``) turns lines into events and dead
letters, a ``MicroBatcher`` gathers them into batches, the stage evaluates (prequential) and trains the model on
each, and ``Publisher`` (``flink_job.stages.publisher``) sends the rows that moved. Each component owns its state
and its part of the snapshot (``flink_job.stages.train_state``). It is plain Python, tested without a JVM; its Flink
shell is ``flink_job.flink.train_function``.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, cast

import numpy as np

from flink_job.config import JobConfig
from flink_job.schema import ACTIONS, RATING_CODE
from flink_job.stages.admission import Admission
from flink_job.stages.batch import MicroBatcher
from flink_job.stages.calls import CHUNK, DELTA, TIMER, Call
from flink_job.stages.clean import Cleaner
from flink_job.stages.parse import EventBatch
from flink_job.stages.publisher import Publisher
from flink_job.stages.train_output import STAGE, Counters, Output, skipped_dead_letters, stats_record
from flink_job.stages.train_state import STATE_VERSION, dump_state, load_state
from flink_job.stages.trainers import ItemExchange, Trainer
from model.batch import BatchStats
from model.mf import OnlineBiasedMF
from model.prequential import Prequential, combine
from model.sequential import Evaluate

__all__ = ["STAGE", "STATE_VERSION", "Output", "TrainStage"]
log = logging.getLogger(__name__)


class TrainStage:
    def __init__(self, cfg: JobConfig, trainer: Trainer | None = None) -> None:
        """``trainer``: which of ``flink.parallelism`` user-sharded trainers this stage is (the only one if None)."""
        self.cfg = cfg
        self.trainer = trainer or Trainer()
        self.settings = cfg.stage_settings()  # written with every snapshot (restore); cfg is frozen, so once
        self.admission = Admission(cfg)
        self.batcher = MicroBatcher(cfg.batch.size)
        self.model_config = self.trainer.model_config(cfg.model)  # this trainer's share of the stream's budgets
        self.model = (
            OnlineBiasedMF.from_file_bytes(Path(cfg.flink.initial_model).read_bytes(), self.model_config,
                                           what=f"flink.initial_model {cfg.flink.initial_model}",
                                           rating_code=RATING_CODE)
            if cfg.flink.initial_model else OnlineBiasedMF(self.model_config, RATING_CODE)
        )
        # (A,) weight per action code; an implicit action missing from the mapping weighs 1.
        self.action_weight = np.array(
            [float(cfg.clean.action_weights.get(a, 1.0)) for a in ACTIONS], np.float32
        )
        self.quality = (
            Prequential(cfg.eval.k, cfg.model.rating_min, cfg.model.rating_max, cfg.eval.user_sample,
                        max_items=cfg.model.ids.max_rows, max_seen=cfg.model.ids.max_rows)
            if cfg.eval.enabled else None
        )
        # (A,) whether each action code is a positive for ranking; ratings are judged by value instead.
        self.positive_action = np.array([a in cfg.eval.positive_action_list for a in ACTIONS], bool)
        self.publisher = Publisher(cfg.publish, self.cleaner.recent_items_of, self.trainer,
                                   lambda: self.exchange.applied_count if self.exchange else 0)
        self.exchange = (ItemExchange(self.trainer, self.model, cfg.kafka.item_delta_record_bytes,
                                      cfg.kafka.item_delta_tolerance)
                         if self.trainer.count > 1 else None)
        self.counters = Counters()
        self.pending_since_ms = 0
        self.first_chunk_ms = 0
        self.now_ms = 0  # the current call's clock, so that a replayed call (flink_job.stages.calls) does the same
        self.replayed_calls = 0  # how many logged calls this run's restore replayed (not state)

    @property
    def cleaner(self) -> Cleaner:
        return self.admission.cleaner

    # ----------------------------------------------------------------------------------------------- snapshot

    def state_bytes(self) -> bytes:
        """Everything the stage has learned and holds: the model and optimiser, counters, watermarks, the
        near-duplicate memory, the pending partial batch and the rows not yet published."""
        return dump_state({
            "model": self.model.state_bytes(),
            "settings": self.settings,
            "stage": {"pending_since_ms": self.pending_since_ms, "first_chunk_ms": self.first_chunk_ms},
            "counters": self.counters.state(),
            "batcher": self.batcher.state(),
            "admission": self.admission.state(),
            "publisher": self.publisher.state(),
            "quality": self.quality.state_dict() if self.quality else None,
            "trainers": self.trainer.count,
            "exchange": self.exchange.state() if self.exchange else None,
        })

    @classmethod
    def from_bytes(cls, cfg: JobConfig, data: bytes, trainer: Trainer | None = None) -> TrainStage:
        """The stage as ``state_bytes`` saw it, under configuration ``cfg`` (which may differ from the old one)."""
        return cls._from_state(cfg, load_state(data), trainer)

    @classmethod
    def _from_state(cls, cfg: JobConfig, state: dict[str, Any], trainer: Trainer | None = None) -> TrainStage:
        """A checkpoint holds state, not configuration: a job restarted with a new configuration keeps what it
        learned and applies the new settings from then on. Not the number of trainers, though: each holds its own
        users' rows, so a state of one of N trainers is refused by a job of another number (the job refuses
        before this: the trainers' max parallelism is their number, docs/sharding.md)."""
        stage = cls(cfg, trainer)
        written_by = state.get("trainers", 1)
        if written_by != stage.trainer.count:
            raise ValueError(f"train: this state is one of {written_by} user-sharded trainers; it cannot be restored "
                             f"by {stage.trainer.count} (flink.parallelism must stay as it was)")
        stage.model = OnlineBiasedMF.from_bytes(state["model"], stage.model_config, RATING_CODE)
        if stage.exchange is not None:
            stage.exchange = ItemExchange(stage.trainer, stage.model, cfg.kafka.item_delta_record_bytes,
                                          cfg.kafka.item_delta_tolerance)
            stage.exchange.load_state(state["exchange"])
        for name, value in state["stage"].items():
            setattr(stage, name, value)
        stage.counters.load_state(state["counters"])
        stage.batcher.load_state(state["batcher"])
        stage.admission.load_state(state["admission"])
        stage.publisher.load_state(state["publisher"])
        if stage.quality and state.get("quality"):
            try:
                stage.quality.load_state_dict(state["quality"])
            except ValueError as ex:  # evaluated with other settings before: the new ones start from zero
                log.warning("train: prequential quality restarts: %s", ex)
        return stage

    @classmethod
    def restore(cls, cfg: JobConfig, saved: bytes | None, calls: list[Call],
                trainer: Trainer | None = None) -> TrainStage:
        """The stage from its last snapshot (a new one if there is none) with the calls made since replayed; their
        outputs went out before the checkpoint and are dropped.

        The calls are replayed under the settings they first ran with, which the snapshot holds, so that an upgrade
        that changes them (a new learning rate, say) still rebuilds the stage that made the published outputs; the
        new settings apply from the next call, as they do when a snapshot alone is restored."""
        state = load_state(saved) if saved is not None else None
        ran = cfg.with_stage_settings(state["settings"]) if state and calls and "settings" in state else cfg
        stage = cls._from_state(ran, state, trainer) if state else cls(cfg, trainer)
        for call in calls:
            stage.call(call)
        if ran != cfg:
            log.info("train: %d logged calls replayed under the settings they ran with, the new ones apply now",
                     len(calls))
            stage = cls.from_bytes(cfg, stage.state_bytes(), trainer)
        stage.replayed_calls = len(calls)
        return stage

    # ------------------------------------------------------------------------------------------------- calls

    def call(self, call: Call) -> Output:
        """``on_chunk``, ``on_time`` or ``on_delta``, as ``call`` (a ``flink_job.stages.calls`` record) says."""
        kind, now_ms, arg = call
        if kind == CHUNK:
            shard, lines = cast(tuple[int, list[str]], arg) if isinstance(arg, tuple) else (0, arg or [])
            return self.on_chunk(lines, now_ms, shard)
        if kind == TIMER:
            return self.on_time(now_ms)
        if kind == DELTA:
            key, payload = cast(tuple[str, bytes], arg)
            return self.on_delta(key, payload, now_ms)
        raise ValueError(f"train: unknown call {kind!r}")

    def on_chunk(self, lines: list[str], now_ms: int | None = None, shard: int = 0) -> Output:
        """Admit a chunk of ``shard`` (its user shard in the SQL part), train on every full batch it completes,
        publish if the publish interval has passed."""
        now_ms = self.now_ms = _now_ms() if now_ms is None else now_ms
        out = Output()
        if not self.first_chunk_ms:
            self.first_chunk_ms = now_ms
        batch, dead, out.near_duplicates = self.admission.admit(lines, now_ms, shard)
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
        self._send_items(out)
        self._publish(out, now_ms)
        return out

    def on_time(self, now_ms: int | None = None) -> Output:
        """Time bounds: train a partial batch that waited ``max_wait_ms``; publish when the interval has passed."""
        now_ms = self.now_ms = _now_ms() if now_ms is None else now_ms
        out = Output()
        partial = bool(self.batcher.pending) and now_ms - self.pending_since_ms >= self.cfg.batch.max_wait_ms
        if partial:
            for rest in self.batcher.take_rest():
                self._train(rest, out)
        self._send_items(out, flush=partial)
        # A batch that closed short of batch.size means traffic below it: its users go out at once, not after
        # publish.interval_ms, which only coalesces repeat users when full batches come faster than it.
        self._publish(out, now_ms, users_now=partial)
        return out

    def on_delta(self, key: str, payload: bytes, now_ms: int | None = None) -> Output:
        """Applies another trainer's item delta record (``flink_job.stages.trainers``); the items it moved that
        this trainer owns wait for publishing."""
        now_ms = self.now_ms = _now_ms() if now_ms is None else now_ms
        out = Output()
        if self.exchange is None:
            raise ValueError("train: an item delta reached the only trainer")
        rows, dead = self.exchange.apply(key, payload)
        if dead is not None:
            log.warning("train: item delta record %r is not a delta: %s", key, dead.detail)
            out.dead_letters.append(dead)
        if rows is not None:
            self.publisher.touch_items(rows, now_ms)
        self._publish(out, now_ms)
        return out

    def _send_items(self, out: Output, flush: bool = False) -> None:
        """After a call that trained, what it changed on item rows goes to the other trainers; after a batch closed
        short of batch.size (``flush``: traffic below it, time to spare) also what was held back under
        ``kafka.item_delta_tolerance``, so that replicas agree exactly whenever traffic is low."""
        if self.exchange is not None and out.batches:
            out.deltas.extend(self.exchange.take(flush))

    def next_deadline_ms(self) -> int | None:
        """When ``on_time`` next has work to do, or None while nothing is pending or unpublished."""
        deadlines = []
        if self.batcher.pending:
            deadlines.append(self.pending_since_ms + self.cfg.batch.max_wait_ms)
        deadlines.extend(d for d in self.publisher.deadlines() if d is not None)
        return min(deadlines) if deadlines else None

    @property
    def unpublished(self) -> bool:
        return self.publisher.unpublished

    # -------------------------------------------------------------------------------------- train, evaluate

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
        self._log_quality()

    def _log_quality(self) -> None:
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

        def evaluate(part: slice, rating_offset: np.ndarray[Any, Any]) -> None:
            figures.append(quality.evaluate(self.model, batch.users[part], batch.items[part], ratings[part],
                                            positive[part], rating_offset))
        return evaluate

    # ------------------------------------------------------------------------------------------------ publish

    def _touch(self, stats: BatchStats, batch: EventBatch, out: Output) -> None:
        """The rows a trained batch moved wait for publishing, those past ``publish.tolerance`` go out now, and
        the ids the model expired or evicted go out as tombstones."""
        self.publisher.touch(stats, batch, self.now_ms, self.model)
        for counter, n in self.publisher.tombstones(out, self.model).items():
            setattr(self.counters, counter, getattr(self.counters, counter) + n)
        self.counters.published += self.publisher.publish_moved(out, self.model, stats)

    def _publish(self, out: Output, now_ms: int, users_now: bool = False) -> None:
        """Publishes the touched users (all of them if ``users_now``) and items whose intervals have passed, then
        writes the file snapshot if due."""
        start = time.perf_counter()
        published = self.publisher.publish_due(out, now_ms, self.model, users_now)
        if published is not None:
            self.counters.published += published
            out.stats.append(self._stats("publish", embeddings=published,
                                         publish_ms=(time.perf_counter() - start) * 1000))
        self.publisher.maybe_snapshot(now_ms, self.model)

    def _stats(self, kind: str, **fields: Any) -> str:
        fields["trainer"] = self.trainer.index
        return stats_record(kind, fields, self.counters, self.model, self.cleaner.counts,
                            self.quality.summary() if self.quality else None, self.first_chunk_ms, self.replayed_calls)


def _now_ms() -> int:
    return int(time.time() * 1000)
