"""The training stage's Flink state, written after every call so that a checkpoint barrier between any two calls
finds the stage that produced the outputs before it. Two ways, one per PyFlink execution mode:

- ``BundleSnapshots`` (process mode): PyFlink encodes a state value only when it commits a bundle's state writes,
  at the end of each bundle and before each barrier, so the function hands the state a ``PickledOnCommit`` after
  every call and the stage is serialised once per bundle.
- ``StageLog`` (thread mode): PyFlink encodes a state value when it is written, and serialising the whole stage
  (model, optimiser, per-user state: 9-14 ms for 2.7 MB) after every call costs more than the call's own work.
  Instead the whole stage is written at most every ``interval_ms`` (longer where writing it takes long:
  ``SnapshotSchedule``) and, in between, each call's arguments are
  appended to a list state. A restore loads the snapshot and replays the logged calls, dropping their outputs,
  which went out before the checkpoint. The stage is a deterministic function of its state and a call's
  arguments (the clock comes in as an argument, the random generators are state), so the replay rebuilds the
  stage that produced those outputs: Flink's changelog state backend in miniature.

A call is a ``flink_job.stages.calls.Call``. ``snapshot`` and ``calls`` are a Flink
``ValueState`` and ``ListState`` of pickled values; they are only touched from the caller's (task) thread.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from flink_job.stages.calls import Call


class PickledOnCommit:
    """Stands in for the stage in a ``ValueState`` that PyFlink encodes at the bundle's commit: it pickles as the
    stage's bytes at that moment.

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


class BundleSnapshots:
    """Process mode. ``calls`` is read at a restore only: a log that thread mode left is replayed, then cleared."""

    def __init__(self, snapshot: Any, calls: Any) -> None:
        self.snapshot = snapshot
        self.calls = calls
        self.pickled: PickledOnCommit | None = None
        self.logged = False

    def load(self) -> tuple[bytes | None, list[Call]]:
        calls = list(self.calls.get() or [])
        self.logged = bool(calls)
        return self.snapshot.value(), calls

    def record(self, call: Call, stage: Any, stage_bytes: Callable[[], bytes]) -> None:
        if self.pickled is None or self.pickled.stage is not stage:
            self.pickled = PickledOnCommit(stage)
        self.snapshot.update(self.pickled)
        if self.logged:
            self.calls.clear()
            self.logged = False


class SnapshotSchedule:
    """When thread mode next writes the whole stage: ``interval_ms`` after the last time, or later where writing it
    takes long. A snapshot that took ``t`` ms waits at least ``t / share`` ms, so that snapshots take at most
    ``share`` of the trainer's time however large its state grows (0: the interval alone). At a million users the
    stage is ~200 MB and takes 0.35-0.5 s to write: every 2 s that was a fifth of the trainer's time.

    >>> s = SnapshotSchedule(2_000, 0.05)
    >>> s.due(0), s.taken(0, 400.0), s.due(7_999), s.due(8_000)
    (True, None, False, True)
    >>> s.taken(8_000, 10.0), s.due(10_000)
    (None, True)
    """

    def __init__(self, interval_ms: int, share: float) -> None:
        self.interval_ms = interval_ms
        self.share = share
        self.last_ms: int | None = None  # None: no snapshot since this run started, write one next
        self.wait_ms = float(interval_ms)

    def due(self, now_ms: int) -> bool:
        return self.last_ms is None or now_ms - self.last_ms >= self.wait_ms

    def taken(self, now_ms: int, took_ms: float) -> None:
        self.last_ms = now_ms
        self.wait_ms = max(float(self.interval_ms), took_ms / self.share if self.share > 0 else 0.0)


class StageLog:
    """Thread mode."""

    def __init__(self, snapshot: Any, calls: Any, interval_ms: int, share: float = 0.0) -> None:
        self.snapshot = snapshot
        self.calls = calls
        self.schedule = SnapshotSchedule(interval_ms, share)

    def load(self) -> tuple[bytes | None, list[Call]]:
        """The last snapshot (None if there is none) and the calls made after it, in order."""
        return self.snapshot.value(), list(self.calls.get() or [])

    def record(self, call: Call, stage: Any, stage_bytes: Callable[[], bytes]) -> None:
        """Makes the state reflect ``call``, made just now on ``stage``."""
        now_ms = call[1]
        if self.schedule.due(now_ms):
            start = time.perf_counter()
            self.snapshot.update(stage_bytes())
            self.calls.clear()
            self.schedule.taken(now_ms, (time.perf_counter() - start) * 1000)
        else:
            self.calls.add(call)
