"""The Flink shell of the training stage: a ``KeyedProcessFunction`` that owns one ``TrainStage``, keeps it in keyed
state (``flink_job.flink.stage_log``), registers the flush timer, reports metrics and hands the stage's outputs on
as one row per call (``flink_job.flink.outputs.STAGE_OUTPUT``). User-sharded trainers (more than one) are a
``KeyedCoProcessFunction`` of the same shell, whose second input is the other trainers' item deltas. Each trainer is
a key (its route key, ``flink_job.flink.topology.route_keys``) with a stage of its own; a subtask runs the trainers
whose keys Flink assigns it, one or several (``flink.trainers`` > ``flink.parallelism``).

``TrainFunction`` is a module-level class, so a TaskManager unpickles it by importing this module, which imports
torch off the task thread before anything imports the stage (see below).
"""
from __future__ import annotations

from flink_job.flink.torch_thread import Direct, TorchThread, import_off_thread

# In PyFlink's thread mode this module is first imported on the task thread, where importing torch hangs
# (flink_job.flink.torch_thread): a thread of its own imports torch, and what imports it, first.
import_off_thread("numpy", "torch", "model.mf", "model.prequential", "flink_job.stages.train")

import gc  # noqa: E402
import logging  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
from pyflink.common import Row, Types  # noqa: E402
from pyflink.datastream import KeyedCoProcessFunction, KeyedProcessFunction, RuntimeContext  # noqa: E402
from pyflink.datastream.state import ListStateDescriptor, MapStateDescriptor, ValueStateDescriptor  # noqa: E402

from flink_job.config import JobConfig  # noqa: E402
from flink_job.flink.gauges import SetGauge  # noqa: E402
from flink_job.flink.stage_log import BundleSnapshots, StageChunks, StageLog  # noqa: E402
from flink_job.stages.calls import CHUNK, DELTA, TIMER, Call  # noqa: E402
from flink_job.stages.clean import COUNTERS  # noqa: E402
from flink_job.stages.train import STAGE, Output, TrainStage  # noqa: E402
from flink_job.stages.trainers import Trainer  # noqa: E402
from model.mf import gpu_count  # noqa: E402

log = logging.getLogger(__name__)
TIMER_TICK_MS = 50
GC_YOUNG_THRESHOLD = 50_000
# The stage's metrics, in its group "train": counters and distributions by their key here and their Flink name.
COUNTER_METRICS = {
    "batches": "batches", "trained": "eventsTrained", "received": "eventsReceived", "dead": "deadLettered",
    "near": "nearDuplicates", "skipped": "skippedBatches", "published": "embeddingsPublished",
    "tombstones": "tombstonesPublished",
}
DISTRIBUTION_METRICS = {"batch_size": "batchSize", "train_ms": "trainMs", "publish_lag": "publishLagMs"}
LOSS_GAUGES = ("rating", "implicit")  # gauges "<key>LossMicro"
# Group "prequential": (gauge name, key in the quality summary, scale to an integer).
QUALITY_GAUGES = (("rmseMicro", "rmse", 1e6), ("maeMicro", "mae", 1e6), ("hitRateMicro", "hr", 1e6),
                  ("ndcgMicro", "ndcg", 1e6), ("rated", "rated", 1), ("positives", "positives", 1),
                  ("coldUserHitRateMicro", "hr_cold_users", 1e6), ("coldItemHitRateMicro", "hr_cold_items", 1e6))


def make_train_function(cfg: JobConfig, route_keys: list[int] | None = None) -> TrainFunction:
    """``route_keys``: trainer i's key at index i; None for one trainer (key 0)."""
    return TrainFunction(cfg) if not route_keys else ShardedTrainFunction(cfg, route_keys)


def key_value(key: Any) -> int:
    """The integer of a current key, which PyFlink gives as a ``Row(k)`` (the trainers are keyed by ``ROW<INT>``)."""
    return int(key[0]) if isinstance(key, (Row, tuple, list)) else int(key)


def subtask_index(runtime_context: RuntimeContext) -> int:
    """This subtask's index. In thread mode PyFlink 2.x's ``get_index_of_this_subtask`` calls a Java method that
    Flink 2.0 removed (``getIndexOfThisSubtask``; an AttributeError), so there it is read from the task's info."""
    try:
        return int(runtime_context.get_index_of_this_subtask())
    except AttributeError:
        return int(runtime_context._runtime_context.getTaskInfo().getIndexOfThisSubtask())


class TrainFunction(KeyedProcessFunction):  # type: ignore[misc]
    def __init__(self, cfg: JobConfig, route_keys: list[int] | None = None) -> None:
        self.cfg = cfg
        self.trainer_of_key = {k: i for i, k in enumerate(route_keys or [0])}
        self.stages: dict[int, TrainStage] = {}  # by trainer, made or restored on its first call on this subtask
        self.logs: dict[int, BundleSnapshots | StageLog] = {}
        self.clean_reported: dict[int, dict[str, int]] = {}  # by trainer: cleaning counts already in the metrics

    def open(self, runtime_context: RuntimeContext) -> None:
        cfg = self.cfg
        # Every parsed record is a dict, so the collector's youngest generation fills every 700 records and its older
        # ones rescan the per-user state: the stage collects less often.
        gc.set_threshold(GC_YOUNG_THRESHOLD, 20, 100)
        # In thread mode the stage runs on a thread of its own, where torch works (flink_job.flink.torch_thread).
        thread_mode = cfg.flink.python_execution_mode == "thread"
        self.torch: Direct | TorchThread = TorchThread() if thread_mode else Direct()
        # Parallel trainers spread over the machine's GPUs (model.config.subtask_device); one GPU or none: unchanged.
        gpus = self.torch.call(gpu_count)
        self.cfg = cfg.on_subtask(subtask_index(runtime_context), gpus)
        # Each trainer's whole stage lives in keyed state under its key (one key: one model), restored on its first
        # call after a restart; how it is written depends on the mode (flink_job.flink.stage_log). The state handles
        # read and write the current key's values, so every trainer of this subtask shares them.
        self.snapshot = runtime_context.get_state(ValueStateDescriptor("stage", Types.PICKLED_BYTE_ARRAY()))
        self.chunks = runtime_context.get_map_state(
            MapStateDescriptor("stage_chunks", Types.INT(), Types.PICKLED_BYTE_ARRAY()))
        self.calls = runtime_context.get_list_state(ListStateDescriptor("calls", Types.PICKLED_BYTE_ARRAY()))
        self.thread_mode = thread_mode
        self._register_metrics(runtime_context.get_metrics_group(), thread_mode)

    def _register_metrics(self, metrics: Any, thread_mode: bool) -> None:
        group = metrics.add_group(STAGE)
        self.count = {key: group.counter(name) for key, name in COUNTER_METRICS.items()}
        self.spread = {key: group.distribution(name) for key, name in DISTRIBUTION_METRICS.items()}
        self.m_reasons = group.add_group("deadLetterReason")
        # Flink gauges from Python carry integers: losses and quality figures are scaled to millionths. Each is set
        # after every call (flink_job.flink.gauges).
        self.m_loss = {key: SetGauge(group, f"{key}LossMicro", thread_mode) for key in LOSS_GAUGES}
        quality = metrics.add_group("prequential")
        self.m_quality = [(SetGauge(quality, name, thread_mode), key, scale) for name, key, scale in QUALITY_GAUGES]
        clean = metrics.add_group("clean")
        self.m_clean = {name: clean.counter(name) for name in COUNTERS}
        self.reason_counters: dict[str, Any] = {}  # one counter per reason, made when first seen

    def _stage(self, index: int) -> TrainStage:
        """Trainer ``index``'s stage; the current key must be its key."""
        stage = self.stages.get(index)
        if stage is None:
            cfg = self.cfg
            chunks = StageChunks(self.chunks, cfg.flink.state_chunk_bytes)
            self.logs[index] = (
                StageLog(self.snapshot, chunks, self.calls, cfg.flink.state_snapshot_interval_ms,
                         cfg.flink.state_snapshot_share) if self.thread_mode
                else BundleSnapshots(self.snapshot, chunks, self.calls)
            )
            saved, calls = self.logs[index].load()
            trainer = Trainer(index, len(self.trainer_of_key))
            stage = self.stages[index] = self.torch.call(TrainStage.restore, cfg, saved, calls, trainer)
            self.clean_reported[index] = dict(stage.cleaner.counts)  # metrics count from this run's start
            m = stage.model
            log.info("train: trainer %d of %d %s; model on %s with %d users, %d items, step %d; batch size %d",
                     trainer.index, trainer.count, "new" if saved is None and not calls else
                     f"restored ({'a snapshot' if saved is not None else 'no snapshot'} and {len(calls)} calls)",
                     m.device, len(m.users), len(m.items), m.step, cfg.batch.size)
        return stage

    def process_element(self, value: Row, ctx: KeyedProcessFunction.Context) -> Iterator[object]:
        shard, lines = int(value[0]), list(value[1])
        self.count["received"].inc(len(lines))
        yield from self._call((CHUNK, ctx.timer_service().current_processing_time(), (shard, lines)), ctx)

    def on_timer(self, timestamp: int, ctx: KeyedProcessFunction.OnTimerContext) -> Iterator[object]:
        yield from self._call((TIMER, ctx.timer_service().current_processing_time(), None), ctx)

    def _call(self, call: Call, ctx: KeyedProcessFunction.Context) -> Iterator[object]:
        # One trainer (the default) needs no key: reading it is a trip into the JVM in thread mode.
        index = 0 if len(self.trainer_of_key) == 1 else self.trainer_of_key[key_value(ctx.get_current_key())]
        stage = self._stage(index)
        out = self.torch.call(stage.call, call)
        self.logs[index].record(call, stage, lambda: self.torch.call(stage.state_bytes))
        yield from self._emit(out, index)
        self._schedule(ctx, stage)

    def close(self) -> None:
        self.torch.close()

    def _schedule(self, ctx: KeyedProcessFunction.Context, stage: TrainStage) -> None:
        """A timer at the stage's next deadline, rounded up to a tick so that Flink, which keeps one timer per key
        and time, merges the registrations of successive calls. Every call registers: the function keeps no memory
        of its timers, which a restore from a checkpoint would make stale."""
        due = stage.next_deadline_ms()
        if due is not None:
            ctx.timer_service().register_processing_time_timer(-(-due // TIMER_TICK_MS) * TIMER_TICK_MS)

    def _emit(self, out: Output, index: int) -> Iterator[object]:
        self.count["trained"].inc(out.trained)
        self.count["near"].inc(out.near_duplicates)
        for d in out.dead_letters:
            counter = self.reason_counters.get(d.reason)
            if counter is None:
                counter = self.reason_counters[d.reason] = self.m_reasons.counter(d.reason)
            counter.inc()
        if out.embeddings or out.dead_letters or out.stats or out.deltas:
            yield Row(dict(out.embeddings), [d.to_json() for d in out.dead_letters], out.stats, dict(out.deltas))
        self._report_counts(out)
        stage = self.stages[index]
        if out.batches:
            self._report_quality(stage)
        self._report_cleaning(stage, self.clean_reported[index])

    def _report_counts(self, out: Output) -> None:
        self.count["dead"].inc(len(out.dead_letters))
        self.count["batches"].inc(out.batches)
        self.count["skipped"].inc(out.skipped_batches)
        tombstones = sum(v is None for _k, v in out.embeddings)
        self.count["tombstones"].inc(tombstones)
        self.count["published"].inc(len(out.embeddings) - tombstones)
        for n in out.batch_sizes:
            self.spread["batch_size"].update(n)
        for ms in out.train_ms:
            self.spread["train_ms"].update(int(ms))
        if out.publish_lag_ms is not None:
            self.spread["publish_lag"].update(out.publish_lag_ms)
        # A skipped batch's losses are NaN, which an integer gauge cannot carry (it failed the task): the gauges
        # keep the last finite loss.
        for n, key in enumerate(LOSS_GAUGES):
            finite = [losses[n] for losses in out.losses if np.isfinite(losses[n])]
            if finite:
                self.m_loss[key].set(int(finite[-1] * 1e6))

    def _report_quality(self, stage: TrainStage) -> None:
        """The gauges of this subtask show the last trainer that trained (with several trainers on a subtask, the
        job's figures are in the job-stats records: ``train_output.combine_latest``)."""
        if stage.quality is None:
            return
        summary = stage.quality.summary()
        for gauge, key, scale in self.m_quality:
            gauge.set(int(summary[key] * scale) if np.isfinite(summary[key]) else 0)

    def _report_cleaning(self, stage: TrainStage, reported: dict[str, int]) -> None:
        """Adds what the cleaning rules did since the last call to the metrics; ``reported``: the trainer's counts
        already added, updated here."""
        for name, n in stage.cleaner.counts.items():
            delta = n - reported.get(name, 0)
            if delta:
                self.m_clean[name].inc(delta)
                reported[name] = n


class ShardedTrainFunction(TrainFunction, KeyedCoProcessFunction):  # type: ignore[misc]
    """One of several user-sharded trainers: input 1 its users' chunks, input 2 the other trainers' item deltas."""

    def process_element1(self, value: Row, ctx: KeyedCoProcessFunction.Context) -> Iterator[object]:
        yield from self.process_element(value, ctx)

    def process_element2(self, value: Row, ctx: KeyedCoProcessFunction.Context) -> Iterator[object]:
        call = (DELTA, ctx.timer_service().current_processing_time(), (str(value[0]), bytes(value[1])))
        yield from self._call(call, ctx)
