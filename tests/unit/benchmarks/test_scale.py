"""The scale benchmark's helpers: the process-tree and checkpoint-directory sampler, and its figures."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from benchmarks.sampling import Sampler, largest_checkpoint, tree_rss
from benchmarks.scale import checkpoint_figures, expected_distinct, operator_figures, operator_table, table


def test_tree_rss_counts_a_child_holding_memory() -> None:
    # A child that holds 64 MB resident: its pid shows under this process with at least that much.
    child = subprocess.Popen([sys.executable, "-c", "import sys; b = b'x' * (64 << 20); sys.stdout.write('x\\n');"
                              "sys.stdout.flush(); sys.stdin.read()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None and child.stdout.readline() == b"x\n"
        rss = tree_rss(os.getpid())
        assert rss[os.getpid()] > 0
        assert rss[child.pid] >= 64 << 20
        assert set(tree_rss(child.pid)) == {child.pid}  # a root without children: itself only
    finally:
        child.kill()
        child.wait()


def test_largest_checkpoint_is_the_biggest_chk_directory(tmp_path: Path) -> None:
    assert largest_checkpoint(tmp_path) == 0
    for name, sizes in {"chk-1": [100, 50], "chk-2": [400], "shared": [10_000]}.items():
        d = tmp_path / "job" / name
        d.mkdir(parents=True)
        for i, size in enumerate(sizes):
            (d / f"f{i}").write_bytes(b"x" * size)
    assert largest_checkpoint(tmp_path) == 400


def test_sampler_keeps_peaks(tmp_path: Path) -> None:
    (tmp_path / "job" / "chk-3").mkdir(parents=True)
    (tmp_path / "job" / "chk-3" / "_metadata").write_bytes(b"x" * (3 << 20))
    with Sampler(os.getpid(), tmp_path, interval_s=0.05) as sampler:
        sampler.sample()
    figures = sampler.figures()
    assert figures["memory_samples"] >= 2
    assert figures["peak_checkpoint_dir_mb"] == 3.0
    assert figures["peak_rss_total_mb"] >= figures["peak_rss_self_mb"] > 0


def test_checkpoint_figures_read_the_rest_summary() -> None:
    doc = {"counts": {"completed": 4, "failed": 1},
           "summary": {"state_size": {"min": 1 << 20, "max": 8 << 20, "avg": 3 << 20},
                       "checkpointed_size": {"min": 1 << 19, "max": 4 << 20, "avg": 1 << 20},
                       "end_to_end_duration": {"min": 100, "max": 2_500, "avg": 900}},
           "history": [{"status": "IN_PROGRESS", "checkpointed_size": 0},
                       {"status": "COMPLETED", "checkpointed_size": 2 << 20},
                       {"status": "COMPLETED", "checkpointed_size": 1 << 19}]}
    assert checkpoint_figures(doc) == {
        "checkpoints_completed": 4, "checkpoints_failed": 1, "checkpoint_state_max_mb": 8.0,
        "checkpoint_state_avg_mb": 3.0, "checkpoint_written_avg_mb": 1.0, "checkpoint_written_mb": [0.5, 2.0],
        "checkpoint_duration_max_s": 2.5,
        "checkpoint_duration_avg_s": 0.9,
    }
    assert checkpoint_figures({})["checkpoints_completed"] == 0


def test_expected_distinct_and_table() -> None:
    assert round(expected_distinct(10_000_000, 1_000_000)) == 951_626
    assert expected_distinct(5_000, 1_000_000) == 5_000.0
    lines = table([{"users": 5_000, "events_per_s": 12_345}]).splitlines()
    assert lines[2].startswith("| 5,000 | 12,345 | - |")


def test_operator_figures_read_each_vertex_of_the_job() -> None:
    vertices = [{"name": "Source: events -> clean", "parallelism": 2,
                 "metrics": {"read-records": 0, "accumulated-busy-time": 1_500.0, "accumulated-idle-time": 20_000,
                             "accumulated-backpressured-time": 7_250}},
                {"name": "train", "parallelism": 1,
                 "metrics": {"read-records": 4_000, "accumulated-busy-time": 2_000.0, "accumulated-idle-time": 0,
                             "accumulated-backpressured-time": 0}}]
    source, train = operator_figures(vertices)
    assert source == {"name": "Source: events -> clean", "parallelism": 2, "received": 0, "busy_s": 1.5,
                      "backpressured_s": 7.2, "idle_s": 20.0, "busy_us_per_record": None}
    assert (train["received"], train["busy_s"], train["busy_us_per_record"]) == (4_000, 2.0, 500.0)
    assert operator_table([train]).splitlines()[2] == "| train | 1 | 4000 | 2.0 | 0.0 | 0.0 | 500.0 |"
