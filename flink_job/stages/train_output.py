"""What the training stage hands out: one call's ``Output``, its cumulative ``Counters``, the job-stats records and
the dead letters of a batch the model refused."""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from flink_job.schema import ACTIONS
from flink_job.stages.events import DeadLetter, EventBatch
from model.mf import OnlineBiasedMF

STAGE = "train"


@dataclass
class Counters:
    received: int = 0  # lines that reached Python (after de-duplication)
    dead_lettered: int = 0
    near_duplicates: int = 0  # distinct events that repeat a user, item and action within the window
    trained: int = 0
    batches: int = 0
    published: int = 0
    skipped_batches: int = 0
    expired: int = 0  # ids the model forgot after their TTL; published as tombstones
    evicted: int = 0  # ids the model evicted at its row cap (model.ids.max_rows); published as tombstones

    def state(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    def load_state(self, state: dict[str, int]) -> None:
        """``state`` written by an older version may lack a counter added since: it stays 0."""
        for name in dataclasses.fields(self):
            if name.name in state:
                setattr(self, name.name, state[name.name])


@dataclass
class Output:
    """What one call produced: embedding records, dead letters and one stats record per batch trained."""

    embeddings: list[tuple[str, bytes | None]] = field(default_factory=list)  # a None value is a tombstone
    dead_letters: list[DeadLetter] = field(default_factory=list)
    stats: list[str] = field(default_factory=list)
    trained: int = 0
    near_duplicates: int = 0
    batches: int = 0
    skipped_batches: int = 0  # batches the model refused (non-finite loss or gradient) and rolled back
    batch_sizes: list[int] = field(default_factory=list)
    train_ms: list[float] = field(default_factory=list)
    losses: list[tuple[float, float]] = field(default_factory=list)  # (rating MSE, implicit loss) per batch
    publish_lag_ms: int | None = None  # from the first change waiting for a publish to that publish
    deltas: list[tuple[str, bytes]] = field(default_factory=list)  # item delta records for the other trainers


def stats_record(kind: str, fields: dict[str, Any], c: Counters, model: OnlineBiasedMF, clean: dict[str, int],
                 prequential: dict[str, Any] | None, first_chunk_ms: int, replayed_calls: int) -> str:
    """One job-stats record: what happened (a batch or a publish) and the cumulative counters."""
    return orjson.dumps(
        {
            "kind": kind,
            **{k: round(v, 3) if isinstance(v, float) else v for k, v in fields.items()},
            "batch": c.batches,
            "step": model.step,
            "received": c.received,
            "dead_lettered": c.dead_lettered,
            "near_duplicates": c.near_duplicates,
            "clean": clean,
            "trained": c.trained,
            "published": c.published,
            "skipped_batches": c.skipped_batches,
            "expired": c.expired,
            "evicted": c.evicted,
            "prequential": prequential,
            # the mean of the ratings trained on (None before the first): exact for half stars, a check of the scale
            "rating_mean": model.global_mean if model.rating_count else None,
            "known_users": len(model.users),
            "known_items": len(model.items),
            "first_chunk_ms": first_chunk_ms,
            "replayed_calls": replayed_calls,
            "at_ms": int(time.time() * 1000),
        }
    ).decode()


def skipped_dead_letters(batch: EventBatch, batch_no: int) -> list[DeadLetter]:
    """The events of a batch the model refused, re-encoded (the parser keeps no original bytes) as dead letters."""
    letters = []
    for n in range(len(batch)):
        event = {"event_id": batch.event_ids[n], "user_id": batch.users[n], "item_id": batch.items[n],
                 "action": ACTIONS[batch.actions[n]], "value": float(batch.values[n]), "ts": int(batch.ts[n])}
        letters.append(DeadLetter(
            "non_finite_batch", STAGE, orjson.dumps(event).decode(), int(batch.partitions[n]),
            int(batch.offsets[n]), f"batch {batch_no} skipped by the model's guard",
        ))
    return letters


# Cumulative counters of a stats record that are one trainer's share of the job's (user-sharded trainers).
SUMMED = ("batch", "received", "dead_lettered", "near_duplicates", "trained", "published", "skipped_batches",
          "expired", "evicted", "known_users", "replayed_calls")


def combine_latest(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The job's cumulative figures from its stats records: each trainer's latest record (``trainer``, 0 when
    absent), its counters summed, the prequential figures pooled, the rest from the latest record of all.

    >>> combine_latest([{"trainer": 0, "received": 5, "at_ms": 1}, {"trainer": 1, "received": 2, "at_ms": 2},
    ...                 {"trainer": 0, "received": 7, "at_ms": 3}])["received"]
    9
    """
    if not records:
        return {}
    latest = {r.get("trainer", 0): r for r in records}
    if len(latest) == 1:
        return records[-1]
    parts = list(latest.values())
    out = dict(records[-1])
    for key in SUMMED:
        if key in out:
            out[key] = sum(r.get(key, 0) for r in parts)
    if "clean" in out:
        out["clean"] = {k: sum(r["clean"].get(k, 0) for r in parts) for k in out["clean"]}
    for key, combine in (("step", max), ("known_items", max), ("at_ms", max)):
        if key in out:
            out[key] = combine(r[key] for r in parts)
    started = [r["first_chunk_ms"] for r in parts if r.get("first_chunk_ms")]
    out["first_chunk_ms"] = min(started) if started else 0
    out["prequential"] = pooled_quality([r["prequential"] for r in parts if r.get("prequential")])
    return out


def pooled_quality(parts: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Prequential summaries of disjoint sets of users as one: rates weighted by what each was measured over."""
    if not parts:
        return None
    pooled: dict[str, Any] = {k: sum(p.get(k, 0) for p in parts) for k in ("rated", "positives", "events")}
    weights = {"rmse": "rated", "mae": "rated", "hr": "positives", "ndcg": "positives",
               "hr_cold_users": "positives_cold_users", "hr_cold_items": "positives_cold_items"}
    for rate, weight in weights.items():
        total = sum(p.get(weight, 0) for p in parts)
        if rate == "rmse":
            value = math.sqrt(sum(p[rate] ** 2 * p[weight] for p in parts if p.get(weight)) / total) if total else None
        else:
            value = sum(p[rate] * p[weight] for p in parts if p.get(weight)) / total if total else None
        pooled[rate] = value
        if weight not in pooled:
            pooled[weight] = total
    return pooled
