"""What the training stage hands out: one call's ``Output``, its cumulative ``Counters``, the job-stats records and
the dead letters of a batch the model refused."""
from __future__ import annotations

import dataclasses
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
