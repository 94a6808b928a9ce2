"""When thread mode writes the whole stage: the interval, lengthened so that writing takes a bounded share."""
from __future__ import annotations

import pickle

import pytest

from flink_job.config import JobConfig
from flink_job.flink.stage_log import BundleSnapshots, SnapshotSchedule, StageChunks, StageLog


def test_a_slow_snapshot_waits_in_proportion_and_a_fast_one_keeps_the_interval() -> None:
    s = SnapshotSchedule(2_000, 0.05)
    assert s.due(123)  # the first call of a run writes one
    s.taken(0, 500.0)  # 0.5 s to write: the next waits 10 s, so writing takes 5% of the time
    assert not s.due(9_999) and s.due(10_000)
    s.taken(10_000, 20.0)  # the state shrank: back to the interval
    assert not s.due(11_999) and s.due(12_000)


def test_share_zero_is_the_interval_alone() -> None:
    s = SnapshotSchedule(2_000, 0.0)
    s.taken(0, 60_000.0)
    assert s.due(2_000)


def test_the_share_is_validated() -> None:
    assert JobConfig.load().flink.state_snapshot_share == 0.05
    with pytest.raises(ValueError, match="state_snapshot_share"):
        JobConfig.load(overrides=["flink.state_snapshot_share=1.5"])


class Value:
    """The calls of PyFlink's ValueState the stage log makes, on a plain attribute."""

    def __init__(self) -> None:
        self.v: object = None

    def value(self) -> object:
        return self.v

    def update(self, v: object) -> None:
        self.v = v

    def clear(self) -> None:
        self.v = None


class Listed(list):  # ListState: get, add, clear
    def get(self) -> list:
        return list(self)

    add = list.append


class Mapped(dict):  # MapState: items, put_all, remove, clear
    put_all = dict.update
    remove = dict.pop


class Stage:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def state_bytes(self) -> bytes:
        return self.data


def _log(chunk_bytes: int, value: Value | None = None, chunks: Mapped | None = None,
         calls: Listed | None = None) -> tuple[StageLog, Value, Mapped, Listed]:
    value, chunks, calls = value or Value(), chunks if chunks is not None else Mapped(), calls or Listed()
    return StageLog(value, StageChunks(chunks, chunk_bytes), calls, 0), value, chunks, calls


def test_thread_mode_writes_the_stage_in_chunks_of_bounded_size_and_reads_it_back() -> None:
    log, _, chunks, calls = _log(1_000)
    big = bytes(range(256)) * 20  # 5,120 bytes: six chunks
    log.record(("chunk", 0, None), Stage(big), lambda: big)
    assert sorted(chunks) == list(range(6)) and max(map(len, chunks.values())) <= 1_000
    assert _log(1_000, chunks=chunks)[0].load() == (big, [])
    # The stage shrinks: the entries past its end go, so a restore does not append stale bytes.
    small = b"x" * 1_500
    log.record(("chunk", 1, None), Stage(small), lambda: small)
    assert sorted(chunks) == [0, 1] and not calls
    restarted = _log(1_000, chunks=chunks)[0]
    assert restarted.load() == (small, [])
    # A later run (state just read) shrinks it again, to one entry.
    restarted.record(("chunk", 2, None), Stage(b"y"), lambda: b"y")
    assert chunks == {0: b"y"}
    # Written without a read first, it still removes what an earlier run left past its end.
    chunks.update({1: b"old", 2: b"old"})
    StageChunks(chunks, 1_000).write(b"z")
    assert chunks == {0: b"z"}


def test_chunks_with_a_gap_are_refused_rather_than_joined() -> None:
    with pytest.raises(ValueError, match="not 0..1"):
        _log(10, chunks=Mapped({0: b"a", 2: b"c"}))[0].load()


def test_each_mode_restores_the_other_and_clears_what_it_left() -> None:
    # Process mode left one value: thread mode loads it, writes chunks at its first snapshot and clears the value.
    value = Value()
    value.update(b"whole stage")
    log, _, chunks, calls = _log(4, value=value, calls=Listed([("chunk", 5, None)]))
    assert log.load() == (b"whole stage", [("chunk", 5, None)])
    log.record(("chunk", 6, None), Stage(b"stage after"), lambda: b"stage after")
    assert value.value() is None and b"".join(chunks[i] for i in sorted(chunks)) == b"stage after" and not calls
    # Thread mode left chunks and calls: process mode loads them and clears both at its first commit.
    bundles = BundleSnapshots(value, StageChunks(chunks, 4), Listed([("timer", 7, None)]))
    assert bundles.load() == (b"stage after", [("timer", 7, None)])
    bundles.record(("timer", 8, None), Stage(b"new"), lambda: b"new")
    assert not chunks and not bundles.calls and pickle.loads(pickle.dumps(value.value())) == b"new"
