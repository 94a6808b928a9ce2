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
  stage that produced those outputs: Flink's changelog state backend in miniature. The snapshot is written as
  chunks of at most ``chunk_bytes``, the entries of a ``MapState`` (``StageChunks``), so that no single state value
  grows with the table: a Java ``byte[]`` holds at most 2 GiB, and RocksDB keeps each map entry as a value of its
  own (a ``ListState`` is one value there).

A call is a ``flink_job.stages.calls.Call``. ``snapshot``, ``chunks`` and ``calls`` are a Flink ``ValueState``,
``MapState`` and ``ListState`` of pickled values; they are only touched from the caller's (task) thread. Either
mode restores what the other wrote: the snapshot from whichever of ``snapshot`` and ``chunks`` holds it, then the
logged calls.
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


class StageChunks:
    """The stage's bytes as the entries 0..n-1 of a ``MapState`` of at most ``chunk_bytes`` each.

    >>> state = {}
    >>> class Map:  # the calls of PyFlink's MapState used here, on a dict
    ...     items = state.items; keys = state.keys; put_all = state.update; remove = state.pop; clear = state.clear
    >>> chunks = StageChunks(Map(), 4)
    >>> chunks.write(b"0123456789"); sorted(state.items())
    [(0, b'0123'), (1, b'4567'), (2, b'89')]
    >>> chunks.write(b"abc"); state, chunks.read()
    ({0: b'abc'}, b'abc')
    """

    def __init__(self, chunks: Any, chunk_bytes: int) -> None:
        self.chunks = chunks
        self.chunk_bytes = chunk_bytes
        self.count: int | None = None  # entries in the state now; None: not read since this run started

    def read(self) -> bytes | None:
        """The bytes last written, or None if there are none."""
        entries = sorted(self.chunks.items() or [])
        self.count = len(entries)
        if not entries:
            return None
        if [i for i, _ in entries] != list(range(len(entries))):
            raise ValueError(f"train: the stage's state chunks are {[i for i, _ in entries]}, not 0..{len(entries) - 1}")
        return b"".join(chunk for _, chunk in entries)

    def write(self, data: bytes) -> None:
        if self.count is None:
            self.count = sum(1 for _ in self.chunks.keys())
        view = memoryview(data)
        size = self.chunk_bytes
        chunks = {n: bytes(view[start:start + size]) for n, start in enumerate(range(0, len(data), size))} or {0: b""}
        self.chunks.put_all(chunks)
        for n in range(len(chunks), self.count):
            self.chunks.remove(n)
        self.count = len(chunks)

    def clear(self) -> None:
        self.chunks.clear()
        self.count = 0


class BundleSnapshots:
    """Process mode: the whole stage as one value (``snapshot``), written at each bundle's commit. ``chunks`` and
    ``calls`` are read at a restore only: a snapshot and log that thread mode left are replayed, then cleared."""

    def __init__(self, snapshot: Any, chunks: StageChunks, calls: Any) -> None:
        self.snapshot = snapshot
        self.chunks = chunks
        self.calls = calls
        self.pickled: PickledOnCommit | None = None
        self.logged = False

    def load(self) -> tuple[bytes | None, list[Call]]:
        calls = list(self.calls.get() or [])
        chunked = self.chunks.read()
        self.logged = bool(calls) or chunked is not None
        return (chunked if chunked is not None else self.snapshot.value()), calls

    def record(self, call: Call, stage: Any, stage_bytes: Callable[[], bytes]) -> None:
        if self.pickled is None or self.pickled.stage is not stage:
            self.pickled = PickledOnCommit(stage)
        self.snapshot.update(self.pickled)
        if self.logged:
            self.calls.clear()
            self.chunks.clear()
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
    """Thread mode. ``snapshot`` is read at a restore only: a stage that process mode (or a version before the
    chunks) left is loaded, then cleared at the first snapshot."""

    def __init__(self, snapshot: Any, chunks: StageChunks, calls: Any, interval_ms: int, share: float = 0.0) -> None:
        self.snapshot = snapshot
        self.chunks = chunks
        self.calls = calls
        self.schedule = SnapshotSchedule(interval_ms, share)
        self.whole = False  # ``snapshot`` holds a stage

    def load(self) -> tuple[bytes | None, list[Call]]:
        """The last snapshot (None if there is none) and the calls made after it, in order."""
        saved = self.chunks.read()
        if saved is None:
            saved = self.snapshot.value()
            self.whole = saved is not None
        return saved, list(self.calls.get() or [])

    def record(self, call: Call, stage: Any, stage_bytes: Callable[[], bytes]) -> None:
        """Makes the state reflect ``call``, made just now on ``stage``."""
        now_ms = call[1]
        if self.schedule.due(now_ms):
            start = time.perf_counter()
            self.chunks.write(stage_bytes())
            if self.whole:
                self.snapshot.clear()
                self.whole = False
            self.calls.clear()
            self.schedule.taken(now_ms, (time.perf_counter() - start) * 1000)
        else:
            self.calls.add(call)
