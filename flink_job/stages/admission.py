"""Admission: what of a chunk of lines is trained on. Parse, lateness, near-duplicates and cleaning, in that order;
every line comes out either as an event to train, a near-duplicate (counted) or a dead letter.

``Admission`` owns the four stages' memory (watermarks, the near-duplicate window, the cleaner's per-user state)
and its part of the training stage's snapshot.
"""
from __future__ import annotations

import logging
from typing import Any

from flink_job.config import JobConfig
from flink_job.stages.clean import Cleaner
from flink_job.stages.lateness import Watermarks
from flink_job.stages.near_dups import NearDuplicates
from flink_job.stages.parse import DeadLetter, EventBatch, ParseRules, line_position, parse_lines
from flink_job.stages.train_output import STAGE

log = logging.getLogger(__name__)


class Admission:
    def __init__(self, cfg: JobConfig) -> None:
        self.rules = ParseRules(
            cfg.clean.max_id_length, cfg.model.rating_min, cfg.model.rating_max, cfg.clean.max_record_chars,
            cfg.clean.max_future_ms, cfg.clean.max_value,
        )
        self.watermarks = Watermarks(cfg.clean.out_of_orderness_ms, cfg.clean.allowed_lateness_ms,
                                     cfg.clean.max_future_ms)
        # Per-id memory outside the model is capped at the model's row cap (docs/model.md, "Ids and bounded memory").
        self.near_duplicates = NearDuplicates(cfg.clean.near_duplicate_window_ms, cfg.model.ids.max_rows)
        self.cleaner = Cleaner(cfg.clean, cfg.model.ids.max_rows)

    def state(self) -> dict[str, Any]:
        return {"watermarks": self.watermarks.state(), "near_duplicates": self.near_duplicates.state(),
                "cleaner": self.cleaner.state_dict()}

    def load_state(self, state: dict[str, Any]) -> None:
        self.watermarks.load_state(state["watermarks"])
        self.near_duplicates.load_state(state["near_duplicates"])
        self.cleaner.load_state_dict(state["cleaner"])

    def admit(self, lines: list[str], now_ms: int, shard: int = 0) -> tuple[EventBatch, list[DeadLetter], int]:
        """``(events to train, dead letters, near-duplicates)``, and no record can fail the call: the parser
        dead-letters what it cannot judge, and if a later stage raises anyway (a bug the data found) the chunk is
        admitted again line by line, each line that still raises becoming an ``internal_error`` dead letter, so the
        rest of the chunk is kept and every line is accounted for once. The stages' state may hold the part of a
        failed pass that ran before the exception."""
        try:
            return self._admit(lines, now_ms, shard)
        except Exception:
            log.exception("train: a chunk of %d lines raised; admitting it line by line", len(lines))
        batches: list[EventBatch] = []
        dead: list[DeadLetter] = []
        near = 0
        for line in lines:
            try:
                batch, letters, n = self._admit([line], now_ms, shard)
            except Exception as ex:
                part, off, payload = line_position(line)
                dead.append(DeadLetter("internal_error", STAGE, payload, part, off, f"{type(ex).__name__}: {ex}"[:200]))
                continue
            batches.append(batch)
            dead.extend(letters)
            near += n
        kept = [b for b in batches if len(b)]
        return (EventBatch.concat(kept) if kept else parse_lines([])[0]), dead, near

    def _admit(self, lines: list[str], now_ms: int, shard: int) -> tuple[EventBatch, list[DeadLetter], int]:
        """Parse, lateness, near-duplicates and cleaning: ``(events to train, dead letters, near-duplicates)``."""
        batch, dead = parse_lines(lines, self.rules, now_ms)
        batch, late = self.watermarks.split(batch, now_ms, shard)
        dead.extend(late)
        batch, near = self.near_duplicates.filter(batch)
        batch, rejected = self.cleaner.apply(batch)
        dead.extend(rejected)
        return batch, dead, near
