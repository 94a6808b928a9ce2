"""Warm start: train the model on a historical log before the stream, and write its state for the job to load.

Reads either a delimited file of ``user item rating [ts]`` rows (tab, comma or space separated, like MovieLens'
``u.data``; ``ts`` in seconds, as there) or JSON lines in the job's event format (``user_id``, ``item_id``,
``action``, ``value``, ``ts`` in ms). Events are trained in time order (stable), and the written file is
``OnlineBiasedMF.file_bytes()``: the model's whole state as a NumPy ``.npz`` archive, which the job reads without
pickle (``model.portable``), so a file from elsewhere cannot run code in it.

    python -m model.warm_start --input ML100K_DIR/u.data --out state.npz [--epochs 1] [--set dim=32]

>>> import tempfile, os
>>> path = os.path.join(tempfile.mkdtemp(), "log.tsv")
>>> _ = open(path, "w").write("1\\t10\\t4\\t100\\n2\\t10\\t2\\t50\\n")
>>> log = read_log(path)
>>> log.users, log.items, log.actions.tolist(), log.ts.tolist()
(['2', '1'], ['10', '10'], [4, 4], [50000, 100000])
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import yaml  # type: ignore[import-untyped, unused-ignore]  # stubs only where types-PyYAML is installed

from model.arrays import Array
from model.config import ModelConfig, canonical_path
from model.mf import RATING_CODE, OnlineBiasedMF

log = logging.getLogger(__name__)
ACTIONS = ("view", "click", "cart", "purchase", "rating")  # the codes of flink_job.schema.ACTIONS, in order


@dataclass(frozen=True)
class Log:
    users: list[str]
    items: list[str]
    actions: Array  # (N,) action codes
    values: Array  # (N,)
    ts: Array  # (N,) event time, ms


def read_log(path: str | Path) -> Log:
    """A historical log in time order; JSON lines if the first non-blank character is ``{``."""
    text = Path(path).read_text()
    if text.lstrip().startswith("{"):
        rows = [orjson.loads(line) for line in text.splitlines() if line.strip()]
        users = [str(r["user_id"]) for r in rows]
        items = [str(r["item_id"]) for r in rows]
        unknown = {r["action"] for r in rows} - set(ACTIONS)
        if unknown:
            raise ValueError(f"warm start: {path} has unknown actions {sorted(unknown)} (known: {ACTIONS})")
        actions = np.array([ACTIONS.index(r["action"]) for r in rows], np.int64)
        values = np.array([float(r.get("value", 1.0)) for r in rows], np.float32)
        ts = np.array([int(r.get("ts", 0)) for r in rows], np.int64)
    else:
        parts = [line.replace(",", " ").split() for line in text.splitlines() if line.strip()]
        bad = [n for n, p in enumerate(parts) if len(p) < 3]
        if bad:
            raise ValueError(f"warm start: {path} line {bad[0] + 1} has fewer than 3 fields (user item rating [ts])")
        users = [p[0] for p in parts]
        items = [p[1] for p in parts]
        actions = np.full(len(parts), RATING_CODE, np.int64)
        values = np.array([float(p[2]) for p in parts], np.float32)
        ts = np.array([int(p[3]) * 1000 if len(p) > 3 else 0 for p in parts], np.int64)
    order = np.argsort(ts, kind="stable")
    return Log([users[k] for k in order], [items[k] for k in order], actions[order], values[order], ts[order])


def warm_start(model: OnlineBiasedMF, data: Log, epochs: int = 1, batch_size: int = 1024) -> int:
    """Trains ``model`` on ``data``; returns the batches trained."""
    return model.pretrain(data.users, data.items, data.actions, data.values, ts=data.ts, epochs=epochs,
                          batch_size=batch_size)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="u.data-like delimited file or JSON lines of events")
    p.add_argument("--out", required=True, help="where to write the model state (.npz)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a model setting below model., e.g. optimizer.lr=0.1 (older flat keys such as lr also work)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings: dict[str, Any] = {}
    for item in args.set:
        key, _, raw = item.partition("=")
        value = yaml.safe_load(raw)
        *section, name = canonical_path(key, value) if "." not in key else tuple(key.split("."))
        target = settings
        for part in section:
            target = target.setdefault(part, {})
        if not isinstance(target, dict):
            raise SystemExit(f"warm start: {'.'.join(section)} is a value, not a section: {item!r}")
        target[name] = value
    try:
        model = OnlineBiasedMF(ModelConfig.from_dict(settings))
    except (TypeError, ValueError) as ex:
        raise SystemExit(f"warm start: {ex}") from None
    data = read_log(args.input)
    batches = warm_start(model, data, args.epochs, args.batch_size)
    Path(args.out).write_bytes(model.file_bytes())
    log.info("warm start: %d events, %d batches, %d users, %d items -> %s", len(data.users), batches,
             len(model.users), len(model.items), args.out)


if __name__ == "__main__":
    main()
