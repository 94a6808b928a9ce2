"""User-sharded trainers: which trainer this stage is, which items it publishes, and the exchange of item deltas that
keeps every trainer's item replica in step (``model.item_sync``, docs/sharding.md).

With ``flink.parallelism`` P > 1 the job runs P trainers, each owning the users of its chunk shards and a replica of
every item. After every call that trained, a trainer takes what its own training changed on item rows and sends it
as delta records of at most ``kafka.item_delta_record_bytes`` each, keyed ``"<trainer>:<sequence>"``; every
trainer applies the deltas of the others, each sequence number of a sender once (a record read twice, as an
at-least-once topic may deliver it, is skipped). One trainer owns each item (``crc32(id) mod P``) and is the only
one that publishes it, so serving never sees competing versions of an item; the owner republishes the items that
other trainers' deltas moved.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from flink_job.stages.events import DeadLetter
from model.arrays import Array
from model.config import ModelConfig
from model.idmap import FALLBACK_ROW
from model.item_delta import decode, encode, split
from model.item_sync import ItemSync
from model.mf import OnlineBiasedMF

STAGE = "item_sync"


@dataclass(frozen=True)
class Trainer:
    """Trainer ``index`` of ``count`` (the trainer operator's subtask and parallelism)."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"train: trainer {self.index} of {self.count} does not exist")

    def model_config(self, model: ModelConfig) -> ModelConfig:
        """``model`` for one of ``count`` trainers. A trainer's batch holds 1/P of the stream's events over the same
        time, so it takes 1/P of the budgets that size a batch's sub-steps and replay (``optimizer.sub_step_budget``,
        ``stability.replay_budget``): a batch of n/P events then takes about budget / n sub-steps, as one trainer's
        batch of n does, and each trainer does one trainer's sub-steps per second whatever P. With the whole budget
        each, P trainers made P times one trainer's sub-steps each, P^2 in all: at 2,000 events/s ML-100K at P = 4
        cost 6x the CPU of one trainer (docs/sharding.md, "Sub-steps per trainer").

        >>> m = ModelConfig()
        >>> Trainer(0, 4).model_config(m).optimizer.sub_step_budget * 4 == m.optimizer.sub_step_budget
        True
        >>> Trainer().model_config(m) is m
        True
        """
        if self.count == 1:
            return model

        def share(budget: int) -> int:
            return max(1, budget // self.count) if budget > 0 else 0  # 0 means "none" (one sub-step, no bound)

        return replace(model, optimizer=replace(model.optimizer, sub_step_budget=share(model.optimizer.sub_step_budget)),
                       stability=replace(model.stability, replay_budget=share(model.stability.replay_budget)))

    def owns_items(self, ids: list[str]) -> Array:
        """(N,) whether this trainer publishes each item: ``crc32(id) mod count == index``.

        >>> Trainer(0, 2).owns_items(["c", "d"]).tolist(), Trainer(1, 2).owns_items(["c", "d"]).tolist()
        ([False, True], [True, False])
        """
        if self.count == 1:
            return np.ones(len(ids), bool)
        return np.array([zlib.crc32(i.encode()) % self.count == self.index for i in ids], bool)


def delta_key(sender: int, sequence: int) -> str:
    return f"{sender}:{sequence}"


def parse_delta_key(key: str) -> tuple[int, int]:
    """``(sender, sequence)`` of a delta record's key; ValueError if it is not one.

    >>> parse_delta_key("3:17")
    (3, 17)
    """
    sender, _, sequence = key.partition(":")
    return int(sender), int(sequence)


class ItemExchange:
    """One trainer's side of the exchange: its journal (``ItemSync``), the sequence of the deltas it sent and the last
    sequence it applied per sender. Between calls (the stage takes after every call that trained) the journal holds
    only the rows held back under ``kafka.item_delta_tolerance``, which are part of the state."""

    def __init__(self, trainer: Trainer, model: OnlineBiasedMF, max_record_bytes: int,
                 tolerance: float = 0.0) -> None:
        self.trainer = trainer
        self.max_record_bytes = max_record_bytes  # larger deltas go out as several records
        self.sync = ItemSync(model, tolerance)
        self.sent = 0  # deltas sent
        self.applied: dict[int, int] = {}  # sender -> the last sequence applied
        self.applied_count = 0  # deltas applied

    def state(self) -> dict[str, Any]:
        return {"sent": self.sent, "applied": dict(self.applied), "applied_count": self.applied_count,
                "journal": self.sync.state()}

    def load_state(self, state: dict[str, Any]) -> None:
        self.sent = int(state["sent"])
        self.applied = {int(k): int(v) for k, v in state["applied"].items()}
        self.applied_count = int(state["applied_count"])
        if "journal" in state:  # states before the tolerance held nothing back
            self.sync.load_state(state["journal"])

    def take(self, flush: bool = False) -> list[tuple[str, bytes]]:
        """This trainer's item changes since the last take as keyed records, each of at most ``max_record_bytes``
        (a batch over a large catalogue moves more item rows than one Kafka message holds) and each with its own
        sequence number; none if nothing changed. ``flush``: the rows held back under the tolerance too."""
        delta = self.sync.take(flush)
        if not len(delta) and not (delta.rating_count or delta.events_counted):
            return []
        records = []
        for part in split(delta, self.max_record_bytes):
            records.append((delta_key(self.trainer.index, self.sent), encode(part)))
            self.sent += 1
        return records

    def apply(self, key: str, payload: bytes) -> tuple[Array | None, DeadLetter | None]:
        """Applies another trainer's delta record: ``(rows it moved that this trainer owns, None)``; ``(None, None)``
        for this trainer's own records and repeats; ``(None, dead letter)`` for a record that is not a delta."""
        try:
            sender, sequence = parse_delta_key(key)
            if sender == self.trainer.index or sequence <= self.applied.get(sender, -1):
                return None, None
            delta = decode(payload)
            rows = self.sync.apply(delta)
        except ValueError as ex:
            return None, DeadLetter("bad_item_delta", STAGE, f"key {key!r}, {len(payload)} bytes", -1, -1,
                                    str(ex)[:200])
        self.applied[sender] = sequence
        self.applied_count += 1
        known = rows != FALLBACK_ROW
        owned = self.trainer.owns_items([i for i, k in zip(delta.ids, known) if k])
        return rows[known][owned], None
