"""The run report: plots and summary from job-stats records and freshness results."""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from flink_job.tools.report import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CLEAN_KEYS = ("missing_price_global_mean", "missing_dwell_ms_dropped", "outlier_price_dropped",
              "outlier_dwell_ms_clipped", "users_expired")


def stats_records(n_batches: int = 300, seed: int = 5, evaluate: bool = True) -> list[dict[str, Any]]:
    """Job-stats records as TrainStage writes them: a batch record per batch (its prequential figures and the running
    summary), a publish record every third batch, cumulative counters on every record."""
    rng = np.random.default_rng(seed)
    out: list[dict[str, Any]] = []
    c = dict(received=0, trained=0, dead_lettered=0, near_duplicates=0, published=0)
    clean = dict.fromkeys(CLEAN_KEYS, 0)
    sq = rated = hits = positives = ndcg = abs_err = 0.0
    at_ms = 1_700_000_000_000
    for b in range(1, n_batches + 1):
        events = 4096 if b < n_batches else 1234
        dropped = {"missing_dwell_ms_dropped": int(rng.integers(0, 5)), "outlier_price_dropped": int(rng.integers(0, 3))}
        other_dead = int(rng.integers(0, 40))  # parse and lateness
        for key, v in dropped.items():
            clean[key] += v
        clean["missing_price_global_mean"] += int(rng.integers(0, 100))
        clean["outlier_dwell_ms_clipped"] += int(rng.integers(0, 10))
        c["dead_lettered"] += other_dead + sum(dropped.values())
        c["near_duplicates"] += int(rng.integers(0, 20))
        c["received"] += events + other_dead + sum(dropped.values())
        c["trained"] += events
        at_ms += int(rng.integers(80, 120))
        quality = None
        if evaluate:
            b_rated, b_pos = int(rng.integers(200, 400)), (0 if b == 1 else int(rng.integers(10, 60)))
            b_hits = int(rng.binomial(b_pos, min(0.9, 0.05 + b / n_batches * 0.3)))
            b_rmse = float(1.4 - 0.4 * b / n_batches + rng.normal(0, 0.05))
            quality = {"events": events, "rated": b_rated, "positives": b_pos, "hits": b_hits,
                       "rmse": round(b_rmse, 5), "mae": round(b_rmse * 0.8, 5),
                       "hr": round(b_hits / b_pos, 5) if b_pos else None, "ndcg": None if not b_pos else 0.1}
            sq += b_rmse**2 * b_rated
            rated += b_rated
            abs_err += b_rmse * 0.8 * b_rated
            hits += b_hits
            positives += b_pos
            ndcg += 0.1 * b_pos
        running = None if not evaluate else {
            "rmse": math.sqrt(sq / rated), "mae": abs_err / rated, "hr": hits / positives if positives else None,
            "ndcg": ndcg / positives if positives else None, "rated": int(rated), "positives": int(positives),
            "events": c["trained"], "candidates": 1000 + b,
        }
        common = dict(batch=b, step=b, **c, skipped_batches=0, expired=0, clean=dict(clean), prequential=running,
                      known_users=100 + b, known_items=50 + b, first_chunk_ms=1_700_000_000_000)
        out.append(dict(kind="batch", events=events, ratings=quality["rated"] if quality else 0,
                        rating_mse=round(float(rng.uniform(0.5, 2)), 3), bpr_loss=round(float(rng.uniform(0.3, 0.7)), 3),
                        train_ms=round(float(rng.lognormal(3.0, 0.4)), 3), max_event_ts=at_ms - 5000, skipped=False,
                        quality=quality, **common, at_ms=at_ms))
        if b % 3 == 0:
            embeddings = int(rng.integers(100, 900))
            c["published"] += embeddings
            out.append(dict(kind="publish", embeddings=embeddings, publish_ms=round(float(rng.uniform(1, 9)), 3),
                            **{**common, "published": c["published"]}, at_ms=at_ms + 1))
    return out


def write_jsonl(records: list[dict[str, Any]], path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def freshness_file(path: Path, delivery: str, latencies: np.ndarray) -> Path:
    path.write_text(json.dumps({"delivery": delivery, "p50_ms": 0, "latencies_ms": latencies.round(2).tolist()}))
    return path


def assert_png(path: Path, width: int) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000, path
    assert data[12:16] == b"IHDR" and struct.unpack(">II", data[16:24])[0] == width


def row(summary: str, label: str) -> list[str]:
    """The cells of the Markdown table row starting with ``label``."""
    line = next(x for x in summary.splitlines() if x.startswith(f"| {label} |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def table_after(summary: str, heading: str) -> list[str]:
    """The cells of the first data row of the table under ``heading``."""
    lines = summary.split(f"## {heading}", 1)[1].splitlines()
    data = [x for x in lines if x.startswith("|")][2]
    return [cell.strip() for cell in data.strip("|").split("|")]


def test_report_from_a_stats_file_gives_the_plots_and_the_runs_figures(tmp_path: Path) -> None:
    records = stats_records()
    rng = np.random.default_rng(1)
    alo = rng.lognormal(6.0, 0.5, 5_000)
    eo = rng.lognormal(9.2, 0.3, 4_000)
    args = ["--stats-file", str(write_jsonl(records, tmp_path / "stats.jsonl")), "--out", str(tmp_path / "report"),
            "--freshness", str(freshness_file(tmp_path / "alo.json", "at_least_once", alo)),
            "--freshness", str(freshness_file(tmp_path / "eo.json", "exactly_once", eo))]
    assert main(args) == 0

    out = tmp_path / "report"
    assert_png(out / "prequential.png", 1000)
    assert_png(out / "batch_latency.png", 1200)
    assert_png(out / "freshness.png", 1200)
    summary = (out / "summary.md").read_text()
    batches = [r for r in records if r["kind"] == "batch"]
    last = records[-1]
    assert row(summary, "received")[1] == f"{last['received']:,}"
    assert row(summary, "trained")[1] == f"{sum(b['events'] for b in batches):,}"
    assert row(summary, "batches")[1] == "300"
    clean = last["clean"]
    assert row(summary, "missing_dwell_ms_dropped")[1] == f"{clean['missing_dwell_ms_dropped']:,}"
    assert row(summary, "outlier_price_dropped")[1] == f"{clean['outlier_price_dropped']:,}"
    other = last["dead_lettered"] - clean["missing_dwell_ms_dropped"] - clean["outlier_price_dropped"]
    assert row(summary, "parse, lateness (before cleaning)")[1] == f"{other:,}"
    # Final running figures, recomputed from every batch's own figures.
    q = [b["quality"] for b in batches]
    hr = sum(x["hits"] for x in q) / sum(x["positives"] for x in q)
    rmse = math.sqrt(sum(x["rmse"] ** 2 * x["rated"] for x in q) / sum(x["rated"] for x in q))
    hr_cell, _ndcg, rmse_cell, *_rest = table_after(summary, "Prequential quality")
    assert hr_cell == f"{hr:.4f}" and abs(float(rmse_cell) - rmse) < 1e-4
    train_ms = np.array([b["train_ms"] for b in batches])
    p50, p95, p99, _mean, top = table_after(summary, "Batch latency")
    assert (p50, p95, p99, top) == tuple(f"{v:.2f}" for v in (*np.percentile(train_ms, [50, 95, 99]), train_ms.max()))
    publishes = [r for r in records if r["kind"] == "publish"]
    assert f"{len(publishes):,} publishes, {sum(p['embeddings'] for p in publishes):,} embedding records" in summary
    for label, lat in (("at_least_once", alo), ("exactly_once", eo)):
        cells = row(summary, label)
        assert cells[1] == f"{len(lat):,}"
        assert cells[4] == f"{np.percentile(lat.round(2), 99):,.1f}"
    for png in ("prequential.png", "batch_latency.png", "freshness.png"):
        assert f"]({png})" in summary


def test_without_freshness_input_the_summary_says_so(tmp_path: Path) -> None:
    stats = write_jsonl(stats_records(60), tmp_path / "stats.jsonl")
    assert main(["--stats-file", str(stats), "--out", str(tmp_path / "r")]) == 0
    assert not (tmp_path / "r" / "freshness.png").exists()
    summary = (tmp_path / "r" / "summary.md").read_text()
    assert "No freshness input (--freshness): freshness.png not written." in summary
    assert "freshness.png)" not in summary and "](prequential.png)" in summary


def test_evaluation_off_leaves_out_the_quality_plot(tmp_path: Path) -> None:
    stats = write_jsonl(stats_records(40, evaluate=False), tmp_path / "stats.jsonl")
    assert main(["--stats-file", str(stats), "--out", str(tmp_path / "r")]) == 0
    assert not (tmp_path / "r" / "prequential.png").exists()
    assert_png(tmp_path / "r" / "batch_latency.png", 1200)
    assert "No prequential figures in the stats (evaluation was off)." in (tmp_path / "r" / "summary.md").read_text()


def test_records_repeated_after_a_restart_count_once(tmp_path: Path) -> None:
    records = stats_records(90)
    replayed = records[:100] + records[50:]  # the records after a checkpoint written again
    write_jsonl(records, tmp_path / "once.jsonl")
    write_jsonl(replayed, tmp_path / "twice.jsonl")
    assert main(["--stats-file", str(tmp_path / "once.jsonl"), "--out", str(tmp_path / "a")]) == 0
    assert main(["--stats-file", str(tmp_path / "twice.jsonl"), "--out", str(tmp_path / "b")]) == 0
    once, twice = ((tmp_path / d / "summary.md").read_text() for d in "ab")
    assert "50 repeated records dropped" in twice
    assert once.split("## Events")[1] == twice.split("## Events")[1]


@pytest.mark.parametrize("content, message", [
    (None, "stats file {path} does not exist"),
    ("", "no stats records in {path}"),
    ("\n\n", "no stats records in {path}"),
    ('{"kind": "publish", "embeddings": 3, "publish_ms": 1.0}\n', "no batch records among the 1 stats records"),
    ('{"kind": "batch", "events": 1, "train_ms": 1.0, "trained": 1}\nnot json\n', "{path} line 2 is not JSON"),
])
def test_a_missing_empty_or_malformed_stats_input_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                   content: str | None, message: str) -> None:
    path = tmp_path / "stats.jsonl"
    if content is not None:
        path.write_text(content)
    assert main(["--stats-file", str(path), "--out", str(tmp_path / "r")]) == 2
    assert message.format(path=path) in capsys.readouterr().err
    assert not (tmp_path / "r" / "summary.md").exists()


def test_a_freshness_file_without_latencies_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stats = write_jsonl(stats_records(10), tmp_path / "stats.jsonl")
    bad = tmp_path / "fresh.json"
    bad.write_text(json.dumps({"delivery": "at_least_once", "p50_ms": 300.0}))
    assert main(["--stats-file", str(stats), "--out", str(tmp_path / "r"), "--freshness", str(bad)]) == 2
    assert f"freshness file {bad} has no latencies_ms list" in capsys.readouterr().err


def test_exactly_one_stats_source_is_required(tmp_path: Path) -> None:
    for argv in ([], ["--bootstrap", "127.0.0.1:1"], ["--stats-file", "x", "--stats-topic", "t", "--bootstrap", "b"]):
        with pytest.raises(SystemExit) as exc:
            main([*argv, "--out", str(tmp_path)])
        assert exc.value.code == 2


def test_the_records_of_a_real_train_stage_make_a_report(tmp_path: Path) -> None:
    """The report reads what TrainStage writes, not only the records built above."""
    import orjson

    from flink_job.config import JobConfig
    from flink_job.stages.train import TrainStage

    stage = TrainStage(JobConfig.load(overrides=["batch.size=50", "publish.interval_ms=100", "eval.user_sample=1.0"]))
    actions = ("click", "rating", "view", "purchase")
    written: list[str] = []
    for chunk in range(8):
        lines = [f'0,{k},{{"event_id":"e{k}","user_id":"u{k % 13}","item_id":"i{k % 17}",'
                 f'"action":"{actions[k % 4]}","value":{1 + k % 5},"ts":{1_700_000_000_000 + k}}}'
                 for k in range(chunk * 100, chunk * 100 + 100)]
        written.extend(stage.on_chunk(lines, now_ms=1_700_000_000_000 + chunk * 200).stats)
    (tmp_path / "stats.jsonl").write_text("".join(s + "\n" for s in written))
    assert main(["--stats-file", str(tmp_path / "stats.jsonl"), "--out", str(tmp_path / "r")]) == 0
    summary = (tmp_path / "r" / "summary.md").read_text()
    assert row(summary, "trained")[1] == "800" and row(summary, "batches")[1] == "16"
    final = [r for r in map(orjson.loads, written) if r["kind"] == "batch"][-1]["prequential"]
    assert table_after(summary, "Prequential quality")[0] == f"{final['hr']:.4f}"
    assert_png(tmp_path / "r" / "prequential.png", 1000)






def test_the_records_of_two_trainers_are_kept_apart_and_summed() -> None:
    """User-sharded trainers number their batches apart: batch 1 of trainer 1 is not a repeat of trainer 0's."""
    from flink_job.tools.run_stats import run_stats

    records = [{"kind": "batch", "trainer": t, "batch": b, "events": 10, "train_ms": 1.0, "trained": 10 * b,
                "received": 10 * b, "published": 0, "at_ms": 100 * b + t} for b in (1, 2, 3) for t in (0, 1)]
    stats = run_stats(records[:-1], "test")  # trainer 1 is at its batch 2
    assert len(stats.batches) == 5 and stats.repeats == 0
    assert stats.last["received"] == 30 + 20 and stats.last["trained"] == 50
    repeated = run_stats([*records, records[0]], "test")  # a restart wrote trainer 0's batch 1 again
    assert len(repeated.batches) == 6 and repeated.repeats == 1 and repeated.last["received"] == 60
