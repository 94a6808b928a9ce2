"""Publishing: which model rows go out when, as embedding records (``flink_job.stages.publish``).

``Publisher`` keeps the rows a batch moved until their interval passes (users and items apart), publishes at once a
row that moved by more than ``publish.tolerance``, sends tombstones for ids the model expired or evicted, and writes
the file snapshot. A row moved without an event of its own id (a sampled negative, a replayed event's user or item)
waits for publishing only once its ``(bias, vector)`` moved by more than ``publish.negative_tolerance`` since its
last publish: otherwise every item publish would send nearly the whole item table (four negatives per event move
nearly every item every batch), and the records published would grow with the ids rather than with the events. It owns the dirty rows and the publish clocks and their part of the training stage's snapshot;
the model is passed in, as the stage holds it.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from flink_job.config import PublishConfig
from flink_job.stages.parse import EventBatch
from flink_job.stages.publish import DirtyRows, Drift, encode_records, write_snapshot
from flink_job.stages.train_output import Output
from flink_job.stages.trainers import Trainer
from model.arrays import Array
from model.batch import BatchStats
from model.mf import OnlineBiasedMF

CLOCKS = ("last_publish_ms", "last_item_publish_ms", "last_snapshot_ms", "dirty_since_ms")
_NO_ROWS = np.zeros(0, np.int64)


class Publisher:
    def __init__(self, cfg: PublishConfig, recent_items_of: Callable[[list[str]], list[list[str]]],
                 trainer: Trainer | None = None, deltas_applied: Callable[[], int] = lambda: 0) -> None:
        """``recent_items_of``: each user's recent items, which a user record carries (the cleaner keeps them).
        ``trainer``: of user-sharded trainers, this one publishes the items it owns only, and writes its snapshot
        to ``trainer-<index>`` under ``publish.snapshot_dir``. ``deltas_applied``: how many of the other trainers'
        deltas this one applied, which move items too and so count in a record's version."""
        self.cfg = cfg
        self.recent_items_of = recent_items_of
        self.trainer = trainer or Trainer()
        self.deltas_applied = deltas_applied
        self.dirty_users = DirtyRows()
        self.dirty_items = DirtyRows()
        # (bias, vector) of each row as last published: bounded by the model's rows. Not checkpointed: after a
        # restore every row a batch moves counts as moved once, so each is republished once (early, not lost).
        self.drift = {"user": Drift(), "item": Drift()}
        self.last_publish_ms = 0  # of users
        self.last_item_publish_ms = 0
        self.last_snapshot_ms = 0
        self.dirty_since_ms = 0  # when the oldest change not yet published was made (0: none waiting)

    def state(self) -> dict[str, Any]:
        return {"dirty_users": self.dirty_users.state(), "dirty_items": self.dirty_items.state(),
                **{name: getattr(self, name) for name in CLOCKS}}

    def load_state(self, state: dict[str, Any]) -> None:
        """A clock that ``state`` (of an older version) lacks keeps its start value."""
        self.dirty_users = DirtyRows.from_state(state["dirty_users"])
        self.dirty_items = DirtyRows.from_state(state["dirty_items"])
        for name in CLOCKS:
            setattr(self, name, state.get(name, getattr(self, name)))

    @property
    def unpublished(self) -> bool:
        return len(self.dirty_users) > 0 or len(self.dirty_items) > 0

    def deadlines(self) -> tuple[int | None, int | None]:
        """When the touched users and the touched items are next due for publishing (None: none touched)."""
        return (self.last_publish_ms + self.cfg.interval_ms if len(self.dirty_users) else None,
                self.last_item_publish_ms + self.cfg.item_interval_ms if len(self.dirty_items) else None)

    def touch(self, stats: BatchStats, batch: EventBatch, now_ms: int, model: OnlineBiasedMF) -> None:
        """Marks the rows a batch moved for publishing: the rows of its events' users and items, and the other
        rows it moved (negatives, replay) that drifted past ``publish.negative_tolerance``. Row 0, the shared
        vector of ids not admitted yet, is no id's own and is not published."""
        if not self.unpublished:
            self.dirty_since_ms = now_ms
        own = stats.event_user_rows > 0
        self.dirty_users.touch(stats.event_user_rows[own], batch.ts[own], batch.partitions[own], batch.offsets[own])
        self.dirty_users.touch(self._drifted("user", model, stats.user_rows, stats.event_user_rows))
        own = stats.event_item_rows > 0
        self.dirty_items.touch(stats.event_item_rows[own], batch.ts[own])
        self.dirty_items.touch(self._drifted("item", model, stats.item_rows, stats.event_item_rows))

    def touch_items(self, rows: Array, now_ms: int) -> None:
        """Marks item rows that another trainer's delta moved for publishing."""
        if not len(rows):
            return
        if not self.unpublished:
            self.dirty_since_ms = now_ms
        self.dirty_items.touch(rows)

    def _drifted(self, kind: str, model: OnlineBiasedMF, moved: Array, own: Array) -> Array:
        """The rows of ``moved`` without an event of their own in the batch (``own``) whose published form moved
        by more than ``publish.negative_tolerance`` since their last publish (all of them at 0)."""
        rows = np.setdiff1d(moved[moved > 0], own)
        tolerance = self.cfg.negative_tolerance
        if tolerance <= 0:
            return rows
        return self._moved_past(kind, model, rows, tolerance)

    def _moved_past(self, kind: str, model: OnlineBiasedMF, rows: Array, tolerance: float) -> Array:
        """The rows of ``rows`` whose published form moved by more than ``tolerance`` since their last publish."""
        if not len(rows):
            return rows
        vectors, biases, _ = model.vectors(kind, rows)
        return rows[self.drift[kind].moved(rows, _published_form(vectors, biases), tolerance)]

    def tombstones(self, out: Output, model: OnlineBiasedMF) -> dict[str, int]:
        """Tombstones for the ids the model evicted or expired since the last call: how many of each."""
        gone: dict[str, int] = {}
        for counter, (users, items) in (("evicted", model.drain_evicted()), ("expired", model.drain_expired())):
            out.embeddings.extend((f"user:{u}", None) for u in users)
            items = [i for i, own in zip(items, self.trainer.owns_items(list(items))) if own]
            out.embeddings.extend((f"item:{i}", None) for i in items)
            gone[counter] = len(users) + len(items)
        return gone

    def publish_due(self, out: Output, now_ms: int, model: OnlineBiasedMF, users_now: bool = False) -> int | None:
        """Publishes the touched users and the touched items whose intervals have passed (the users at once if
        ``users_now``): how many, None if neither was due."""
        users, items = (due is not None and now_ms >= due for due in self.deadlines())
        users = users or (users_now and len(self.dirty_users) > 0)
        if not (users or items):
            return None
        n_users, n_items = self.publish(out, model, None if users else _NO_ROWS, None if items else _NO_ROWS)
        if self.dirty_since_ms:
            out.publish_lag_ms = now_ms - self.dirty_since_ms
        self.dirty_since_ms = now_ms if self.unpublished else 0
        if users:
            self.last_publish_ms = now_ms
        if n_items:  # items left out by publish.max_records stay due
            self.last_item_publish_ms = now_ms
        return n_users + n_items

    def publish_moved(self, out: Output, model: OnlineBiasedMF, stats: BatchStats) -> int:
        """Publishes at once the rows a batch moved by more than ``publish.tolerance`` since their last publish
        (off at tolerance 0): how many."""
        tolerance = self.cfg.tolerance
        if tolerance <= 0:
            return 0
        users = np.unique(stats.event_user_rows[stats.event_user_rows > 0])
        items = np.unique(stats.item_rows[stats.item_rows > 0])
        moved_users = self._moved_past("user", model, users, tolerance)
        moved_items = self._moved_past("item", model, items, tolerance)
        if len(moved_users) or len(moved_items):
            return sum(self.publish(out, model, moved_users, moved_items))
        return 0

    def publish(self, out: Output, model: OnlineBiasedMF, users: Array | None = None,
                items: Array | None = None) -> tuple[int, int]:
        """Encodes the rows touched since they were last published (of ``users``/``items`` if given), once each,
        at most ``publish.max_records`` of them: users first, the rest stay pending for the next publish.
        Returns how many users and items it published.

        A record's ``version`` is the model step it was published at (of user-sharded trainers plus the other
        trainers' deltas applied, which also move items), so it grows per id even across an expiry
        and a re-admission (which restart the row's update count)."""
        cap = self.cfg.max_records
        rows, ts, parts, offs = self.dirty_users.drain(cap, users)
        n = self._encode("user", out, model, rows, ts, parts, offs)
        if cap and n >= cap:
            return n, 0
        irows, its, _, _ = self.dirty_items.drain(cap - n if cap else 0, items)
        return n, self._encode("item", out, model, irows, its)

    def _encode(self, kind: str, out: Output, model: OnlineBiasedMF, rows: Array, ts: Array,
                parts: Array | None = None, offs: Array | None = None) -> int:
        ids = (model.users if kind == "user" else model.items).ids(rows)
        live = np.array([bool(k) for k in ids], bool)  # a row freed by expiry since it was touched has no id
        if kind == "item" and self.trainer.count > 1:
            # Another trainer publishes the items it owns; their rows here count as published (the proximal
            # anchor marks what the job published).
            owned = self.trainer.owns_items(list(ids))
            model.mark_published(kind, rows[live & ~owned])
            live &= owned
        if not live.all():
            rows, ts, ids = rows[live], ts[live], [k for k, keep in zip(ids, live) if keep]
            parts, offs = (None, None) if parts is None or offs is None else (parts[live], offs[live])
        if not len(rows):
            return 0
        vectors, biases, updates = model.vectors(kind, rows)
        seen = self.recent_items_of(ids) if kind == "user" else None
        out.embeddings.extend(
            encode_records(kind, ids, vectors, biases, updates, model.step + self.deltas_applied(), ts, parts, offs,
                           model.event_counts(kind, rows), seen, self.cfg.format)
        )
        model.mark_published(kind, rows)
        if self.cfg.tolerance > 0 or self.cfg.negative_tolerance > 0:
            self.drift[kind].published(rows, _published_form(vectors, biases))
        return len(rows)

    def maybe_snapshot(self, now_ms: int, model: OnlineBiasedMF) -> None:
        """The file sink: every table as NumPy arrays with an id index, replaced atomically."""
        cfg = self.cfg
        if cfg.snapshot_dir and now_ms - self.last_snapshot_ms >= cfg.snapshot_interval_ms:
            folder = Path(cfg.snapshot_dir)
            write_snapshot(folder / f"trainer-{self.trainer.index}" if self.trainer.count > 1 else folder, model)
            self.last_snapshot_ms = now_ms


def _published_form(vectors: Array, biases: Array) -> Array:
    """(N, 1 + D): what a score is made of, ``b + p . q = (1, p) . (b, q)``, so that a relative change of it bounds
    the change of every score (Cauchy-Schwarz)."""
    return np.column_stack([biases.astype(np.float32), vectors.astype(np.float32)])
