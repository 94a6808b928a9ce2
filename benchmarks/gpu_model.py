"""Model-level GPU benchmark: ``OnlineBiasedMF.learn_many`` samples/s and the ML-100K prequential run, CUDA against CPU.

    python -m benchmarks.gpu_model --data ML100K_DIR [--devices cuda,cpu] [--out results.json]
    python -m benchmarks.gpu_model --devices cpu --quick --data ML100K_DIR   # a smoke test

Imports only ``model/`` and ``benchmarks.ml100k`` (NumPy, PyTorch, tqdm; River only if asked for there, never here),
so it runs on a machine without the job's packages (no PyFlink, orjson, msgspec, Kafka client).

(a) Training speed. A synthetic stream over a large id space (``--users`` x ``--items``, default 1,000,000 x 100,000)
with Zipf-like popularity on both sides (bounded Zipf, exponents ``--user-zipf`` / ``--item-zipf``, ranks shuffled
onto ids) and the job's action mix (view/click/cart/purchase/rating 45/25/10/5/15 %, ratings 1..5). Every id is
admitted into the model's id maps before the first batch, so the tables hold all rows and timed batches measure the
steady state (row lookups, negatives, gradients, row-wise Adagrad), not table growth. Per (device, dim, batch): the
ModelConfig defaults with ``dim`` and ``device`` set (BPR with 4 uniform negatives, ratings also on the ranking side,
one torch thread unless ``--cpu-threads`` says otherwise), ``--warmup`` batches, then batches until ``--time-box``
seconds have passed (at least ``--min-batches`` unless that takes three time boxes), timed between ``torch.cuda.synchronize()`` calls. ``idmap ms``
is the Python id-map lookup of the same batch, the same on every device: the floor a GPU cannot remove.

(b) ML-100K in process (``benchmarks.ml100k.run_model``): test-then-train in micro-batches with ModelConfig defaults,
the same seed, on each device; RMSE / MAE / HR@10 / NDCG@10 should agree across devices up to float rounding.

Every measurement is bounded (time box per grid point, ``--deadline`` for the whole run; what is left when the
deadline passes is skipped and marked so) and the JSON file is rewritten after each one, so a run cut short still
leaves its results.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.config import ModelConfig
from model.mf import RATING_CODE, OnlineBiasedMF

ACTION_PROBS = np.array([0.45, 0.25, 0.10, 0.05, 0.15])  # flink_job.tools.generate.ACTION_PROBS, not imported (PyFlink-free)


def zipf_draws(rng: np.random.Generator, n: int, support: int, exponent: float) -> np.ndarray[Any, Any]:
    """(n,) ids in [0, support) drawn with probability proportional to ``1 / (rank + 1) ** exponent``, ranks shuffled
    onto ids so that popular ids are spread over the id space."""
    cdf = np.cumsum(1.0 / np.arange(1, support + 1, dtype=np.float64) ** exponent)
    cdf /= cdf[-1]
    ranks = np.minimum(np.searchsorted(cdf, rng.random(n)), support - 1)
    return rng.permutation(support)[ranks]


class Stream:
    """A synthetic event stream as ``learn_many`` takes it: string ids, action codes, values."""

    def __init__(self, n: int, users: int, items: int, user_zipf: float, item_zipf: float, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.user_ids = [f"u{k}" for k in range(users)]
        self.item_ids = [f"i{k}" for k in range(items)]
        u = zipf_draws(rng, n, users, user_zipf)
        i = zipf_draws(rng, n, items, item_zipf)
        self.users = [self.user_ids[k] for k in u.tolist()]
        self.items = [self.item_ids[k] for k in i.tolist()]
        self.actions = rng.choice(len(ACTION_PROBS), size=n, p=ACTION_PROBS).astype(np.int64)
        self.values = np.where(self.actions == RATING_CODE, rng.integers(1, 6, n), 1).astype(np.float64)
        self.distinct_users = int(len(np.unique(u)))
        self.distinct_items = int(len(np.unique(i)))

    def __len__(self) -> int:
        return len(self.users)

    def batch(self, k: int, size: int) -> tuple[list[str], list[str], np.ndarray[Any, Any], np.ndarray[Any, Any]]:
        """The ``k``-th batch of ``size`` events, wrapping round the stream."""
        per = len(self) // size
        s = slice((k % per) * size, (k % per + 1) * size)
        return self.users[s], self.items[s], self.actions[s], self.values[s]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_point(stream: Stream, device: str, dim: int, size: int, args: argparse.Namespace, threads: int) -> dict[str, Any]:
    """samples/s of ``learn_many`` at one (device, dim, batch size)."""
    t_build = time.perf_counter()
    model = OnlineBiasedMF(ModelConfig(dim=dim, device=device, seed=args.seed, threads=threads))
    model.users.rows(stream.user_ids)  # admit every id: the tables take all rows in the first (warm-up) batch
    model.items.rows(stream.item_ids)
    for k in range(args.warmup):
        model.learn_many(*stream.batch(k, size))
        if time.perf_counter() - t_build > 2 * args.time_box:  # a slow point: one warm-up batch (table growth) will do
            break
    sync(model.device)
    setup_s = time.perf_counter() - t_build
    n = 0
    start = time.perf_counter()
    while True:
        model.learn_many(*stream.batch(args.warmup + n, size))
        n += 1
        if n >= args.min_batches and time.perf_counter() - start >= args.time_box:
            break
        if n >= args.max_batches or time.perf_counter() - start >= 3 * args.time_box:
            break
    sync(model.device)
    seconds = time.perf_counter() - start
    users, items, _, _ = stream.batch(args.warmup, size)
    t0 = time.perf_counter()
    model.users.lookup(users)
    model.items.lookup(items)
    idmap_ms = (time.perf_counter() - t0) * 1000
    out = {
        "device": str(model.device), "dim": dim, "batch": size, "threads": threads, "batches": n,
        "seconds": round(seconds, 4), "samples_per_s": round(n * size / seconds), "ms_per_batch": round(seconds / n * 1000, 3),
        "idmap_ms": round(idmap_ms, 3), "setup_s": round(setup_s, 2),
        "table_rows": [int(model.user_table.params.shape[0]), int(model.item_table.params.shape[0])],
    }
    if model.device.type == "cuda":
        out["max_memory_gib"] = round(torch.cuda.max_memory_allocated(model.device) / 2**30, 2)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return out


def ml100k_point(data: str, device: str, size: int, limit: int, seed: int) -> dict[str, Any]:
    from benchmarks.ml100k import load_stream, run_model  # tqdm and model/ only; River is imported lazily there

    stream = load_stream(data)
    if limit:
        stream = stream.head(limit)
    config = replace(ModelConfig(), seed=seed, device=device)
    if device == "cuda":  # CUDA context and kernels compiled before the clock starts, as on the training grid
        OnlineBiasedMF(replace(config, dim=8)).learn_many(["u"], ["i"], np.array([RATING_CODE]), np.array([4.0]))
        sync(torch.device("cuda"))
    r = run_model(stream, config, size)
    s = r.summary
    return {
        "device": device, "batch": size, "events": int(s["events"]), "rmse": s["rmse"], "mae": s["mae"], "hr10": s["hr"],
        "ndcg10": s["ndcg"], "positives": int(s["positives"]), "model_seconds": round(r.model_seconds, 3),
        "wall_seconds": round(r.wall_seconds, 3), "ms_per_batch": round(r.ms_per_batch, 3),
        "events_per_s": round(r.events_per_s),
    }


def environment() -> dict[str, Any]:
    env: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
        "cpu_count": os.cpu_count(), "platform": platform.platform(),
        "cuda_available": torch.cuda.is_available(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        env["cpu"] = names[0] if names else "?"
    except OSError:
        env["cpu"] = "?"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=torch.cuda.get_device_name(0), gpu_memory_gib=round(p.total_memory / 2**30, 1),
                   cuda=torch.version.cuda, sms=p.multi_processor_count)
    return env


def markdown(results: dict[str, Any]) -> str:
    lines = ["| device | threads | dim | batch | samples/s | ms/batch | idmap ms | batches |", "|---|---|---|---|---|---|---|---|"]
    for r in results["train"]:
        if "error" in r or "skipped" in r:
            lines.append(f"| {r['device']} | | {r['dim']} | {r['batch']} | {r.get('error') or r.get('skipped')} | | | |")
            continue
        lines.append(f"| {r['device']} | {r['threads']} | {r['dim']} | {r['batch']:,} | {r['samples_per_s']:,} "
                     f"| {r['ms_per_batch']:.2f} | {r['idmap_ms']:.2f} | {r['batches']} |")
    lines += ["", "| device | batch | RMSE | MAE | HR@10 | NDCG@10 | model s | wall s | ms/batch |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in results["ml100k"]:
        if "error" in r or "skipped" in r:
            lines.append(f"| {r['device']} | {r['batch']} | {r.get('error') or r.get('skipped')} | | | | | | |")
            continue
        lines.append(f"| {r['device']} | {r['batch']:,} | {r['rmse']:.4f} | {r['mae']:.4f} | {r['hr10']:.4f} "
                     f"| {r['ndcg10']:.4f} | {r['model_seconds']:.2f} | {r['wall_seconds']:.2f} | {r['ms_per_batch']:.2f} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", default="", help="comma-separated, in run order (default: cuda,cpu where CUDA is seen)")
    p.add_argument("--device", default="", help="alias of --devices")
    p.add_argument("--batches", default="4096,16384,65536")
    p.add_argument("--dims", default="32,128")
    p.add_argument("--users", type=int, default=1_000_000)
    p.add_argument("--items", type=int, default=100_000)
    p.add_argument("--user-zipf", type=float, default=0.8)
    p.add_argument("--item-zipf", type=float, default=1.0)
    p.add_argument("--events", type=int, default=1_048_576, help="length of the synthetic stream (batches wrap round)")
    p.add_argument("--warmup", type=int, default=2, help="untimed batches per grid point")
    p.add_argument("--min-batches", type=int, default=3)
    p.add_argument("--max-batches", type=int, default=10_000)
    p.add_argument("--time-box", type=float, default=4.0, help="timed seconds per grid point (at least --min-batches)")
    p.add_argument("--cpu-threads", default="1", help="comma-separated torch thread counts for the CPU grid")
    p.add_argument("--data", default="", help="the ml-100k folder (or its u.data); empty: no ML-100K part")
    p.add_argument("--ml-batches", default="4096,256")
    p.add_argument("--ml-limit", type=int, default=0, help="only the first N ML-100K events (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--deadline", type=float, default=290.0, help="seconds for the whole run; later points are skipped")
    p.add_argument("--quick", action="store_true", help="tiny sizes for a smoke test")
    p.add_argument("--out", default="", help="JSON results file (rewritten after every measurement)")
    args = p.parse_args(argv)
    if args.quick:
        args.batches, args.dims, args.users, args.items, args.events = "256,1024", "8,16", 20_000, 2_000, 8192
        args.warmup, args.min_batches, args.time_box, args.ml_limit = 1, 2, 0.3, args.ml_limit or 5_000
    return args


def plan(args: argparse.Namespace) -> list[tuple[str, Any]]:
    """The points to measure, in order: GPU grid (fast), ML-100K on every device, then the CPU grid (slowest;
    time-boxed per point)."""
    devices = [d for d in (args.devices or args.device or ("cuda,cpu" if torch.cuda.is_available() else "cpu")).split(",") if d]
    batches = [int(b) for b in args.batches.split(",")]
    dims = [int(d) for d in args.dims.split(",")]
    threads = [int(t) for t in args.cpu_threads.split(",")]
    points: list[tuple[str, Any]] = []
    for dev in devices:
        if dev != "cpu":
            points += [("train", (dev, d, b, 1)) for d in dims for b in batches]
    if args.data:
        points += [("ml100k", (dev, b)) for b in (int(x) for x in args.ml_batches.split(",")) for dev in devices]
    if "cpu" in devices:
        points += [("train", ("cpu", d, b, t)) for t in threads for d in dims for b in batches]
    return points


def measure(kind: str, point: Any, stream: Stream, args: argparse.Namespace) -> dict[str, Any]:
    """One point's figures; a failed point (out of memory, say) gives its error and must not lose the others."""
    try:
        if kind == "train":
            dev, d, b, t = point
            return train_point(stream, dev, d, b, args, t)
        dev, b = point
        return ml100k_point(args.data, dev, b, args.ml_limit, args.seed)
    except Exception as e:
        traceback.print_exc()
        return {**_point_fields(kind, point), "error": f"{type(e).__name__}: {e}"[:200]}


def _point_fields(kind: str, point: Any) -> dict[str, Any]:
    if kind == "train":
        return {"device": point[0], "dim": point[1], "batch": point[2]}
    return {"device": point[0], "batch": point[1]}


def main() -> None:
    args = parse_args()
    t_start = time.perf_counter()
    results: dict[str, Any] = {"command": " ".join([Path(sys.executable).name, "-m", "benchmarks.gpu_model", *sys.argv[1:]]),
                               "env": environment(), "args": vars(args), "train": [], "ml100k": []}
    print(json.dumps(results["env"]), flush=True)

    def save() -> None:
        results["elapsed_s"] = round(time.perf_counter() - t_start, 1)
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=1))

    points = plan(args)
    t0 = time.perf_counter()
    batches = [int(b) for b in args.batches.split(",")]
    stream = Stream(max(args.events, 2 * max(batches)), args.users, args.items, args.user_zipf, args.item_zipf, args.seed)
    results["stream"] = {"events": len(stream), "distinct_users": stream.distinct_users,
                         "distinct_items": stream.distinct_items, "build_s": round(time.perf_counter() - t0, 2)}
    print(json.dumps(results["stream"]), flush=True)
    for kind, point in points:
        if time.perf_counter() - t_start > args.deadline:
            entry = {**_point_fields(kind, point), "skipped": "deadline"}
            results[kind].append(entry)
            print(kind, json.dumps(entry), flush=True)
            continue
        entry = measure(kind, point, stream, args)
        results[kind].append(entry)
        print(kind, json.dumps(entry), f"t={time.perf_counter() - t_start:.1f}s", flush=True)
        save()
    save()
    print(markdown(results), flush=True)
    print(f"total {time.perf_counter() - t_start:.1f} s", flush=True)

if __name__ == "__main__":
    main()
