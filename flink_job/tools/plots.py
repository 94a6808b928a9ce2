"""The report's PNG plots, drawn on matplotlib's Agg canvas (no display, no pyplot state): prequential quality,
training time per batch, and freshness latency per delivery mode."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from flink_job.tools.run_stats import (STAGE, Freshness, ReportError, RunStats, final_prequential, finite,
                                       percentiles, windowed_quality)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

COLORS: tuple[str, ...] = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")
PERCENTILE_STYLES: dict[int, str] = {50: ":", 95: "--", 99: "-."}


def _figure(width: float, height: float) -> Figure:
    """A figure on the Agg canvas: no display, no pyplot state."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as ex:
        raise ReportError(f"{STAGE}: matplotlib is missing: pip install -e '.[report]'") from ex
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def plot_prequential(run: RunStats, path: Path, k: int, window: int) -> bool:
    """Running HR@k and RMSE against events trained, the last ``window`` batches' figures lighter; False when the
    stats carry no prequential figures."""
    if final_prequential(run.batches) is None:
        return False
    x = np.array([float(b["trained"]) for b in run.batches])
    running = [b.get("prequential") or {} for b in run.batches]
    hr_w, rmse_w = windowed_quality([b.get("quality") for b in run.batches], window)
    fig = _figure(10, 6.5)
    ax_hr, ax_rmse = fig.subplots(2, 1, sharex=True)
    for ax, key, win, name, color in ((ax_hr, "hr", hr_w, f"HR@{k}", "tab:blue"),
                                      (ax_rmse, "rmse", rmse_w, "RMSE", "tab:red")):
        ax.plot(x, win, color=color, alpha=0.3, lw=1, label=f"last {window} batches")
        ax.plot(x, [r.get(key) if finite(r.get(key)) else np.nan for r in running], color=color, lw=2,
                label="running")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(loc="best")
    ax_hr.set_title("Prequential quality (each batch tested before it trains)")
    ax_rmse.set_xlabel("events trained")
    fig.savefig(path)
    return True


def plot_batch_latency(run: RunStats, path: Path) -> None:
    """``train_ms`` per batch over the run, and its histogram with p50/p95/p99."""
    ms = np.array([float(b["train_ms"]) for b in run.batches])
    n = np.array([float(b.get("batch", i + 1)) for i, b in enumerate(run.batches)])
    fig = _figure(12, 4.5)
    ax_run, ax_hist = fig.subplots(1, 2, width_ratios=[2, 1])
    ax_run.plot(n, ms, color="tab:blue", lw=0.8, alpha=0.6, label="train_ms")
    pct = percentiles(ms)
    for p, v in pct.items():
        ax_run.axhline(v, color="black", ls=PERCENTILE_STYLES[p], lw=1, label=f"p{p} {v:.1f} ms")
    ax_run.set_xlabel("batch")
    ax_run.set_ylabel("train_ms")
    ax_run.set_title("Training time per batch")
    ax_run.grid(alpha=0.3)
    ax_run.legend(loc="upper right")
    ax_hist.hist(ms, bins=min(50, max(5, len(ms) // 5)), color="tab:blue", alpha=0.7)
    for p, v in pct.items():
        ax_hist.axvline(v, color="black", ls=PERCENTILE_STYLES[p], lw=1)
    ax_hist.set_xlabel("train_ms")
    ax_hist.set_ylabel("batches")
    ax_hist.set_title("Distribution")
    fig.savefig(path)


def plot_freshness(freshness: Sequence[Freshness], path: Path) -> None:
    """Latency histograms, one per delivery mode, on shared bins (logarithmic when they span over 100x)."""
    every = np.concatenate([f.latencies_ms for f in freshness])
    lo, hi = float(every.min()), float(every.max())
    log_x = lo > 0 and hi / lo > 100
    bins = np.geomspace(lo, hi, 60) if log_x else np.linspace(lo, hi if hi > lo else lo + 1, 60)
    fig = _figure(12, 5)
    ax = fig.subplots()
    for i, f in enumerate(freshness):
        color = COLORS[i % len(COLORS)]
        ax.hist(f.latencies_ms, bins=bins.tolist(), color=color, alpha=0.45, label=f"{f.label} ({len(f.latencies_ms):,})")
        for p, v in percentiles(f.latencies_ms).items():
            ax.axvline(v, color=color, ls=PERCENTILE_STYLES[p], lw=1.2, label=f"{f.label} p{p} {v:.0f} ms")
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel("latency from input append to readable embedding (ms)")
    ax.set_ylabel("events")
    ax.set_title("Freshness")
    ax.grid(alpha=0.3)
    fig.legend(loc="outside right upper", fontsize="small")
    fig.savefig(path)

