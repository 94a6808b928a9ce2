"""Embedding changelogs for the serving tests: a hand-made one with the table it should read as, and records that
are each malformed in their own way."""
from __future__ import annotations

import json
from typing import Any

import numpy as np
import orjson

from flink_job.serving.records import example_record

DIM = 4


N_ITEMS = 100  # more than the index's first 64 rows: the item matrix has to grow


class Changelog:
    """A hand-made changelog and, beside it, the table it should read as (computed without the index)."""

    def __init__(self, seed: int = 3) -> None:
        rng = np.random.default_rng(seed)
        self.records: list[tuple[str, bytes | None]] = []
        self.items: dict[str, tuple[int, float, np.ndarray, int]] = {}  # id -> (version, bias, vector, events)
        self.users: dict[str, tuple[int, np.ndarray, list[str] | None]] = {}  # id -> (version, vector, seen)
        for n in range(N_ITEMS):
            self.item(f"i{n}", 1, rng, events=int(rng.integers(0, 1000)))
        self.item("i3", 3, rng)
        self.stale("item:i3", example_record("item", "i3", 2, [9.0] * DIM))  # older than the version 3 just sent
        self.stale("item:i5", example_record("item", "i5", 1, [9.0] * DIM))  # the same version again
        self.tombstone("item", "i7")
        self.user("u1", 1, rng)
        self.user("u1", 2, rng, seen=["i0", "i1", "i2", "nonexistent"])
        self.stale("user:u1", example_record("user", "u1", 1, [9.0] * DIM))
        self.user("u2", 4, rng)
        self.stale("user:u3", b"{not json")

    def item(self, ident: str, version: int, rng: np.random.Generator, events: int = 5) -> None:
        vec, bias = rng.normal(size=DIM).astype(np.float32), float(rng.normal())
        self.items[ident] = (version, bias, vec, events)
        self.records.append((f"item:{ident}", example_record("item", ident, version, vec.tolist(), bias, step=version,
                                                   events=events)))

    def user(self, ident: str, version: int, rng: np.random.Generator, seen: list[str] | None = None) -> None:
        vec = rng.normal(size=DIM).astype(np.float32)
        self.users[ident] = (version, vec, seen)
        extra: dict[str, Any] = {"seen": seen} if seen is not None else {}
        self.records.append((f"user:{ident}", example_record("user", ident, version, vec.tolist(), 0.3, **extra)))

    def stale(self, key: str, value: bytes) -> None:
        self.records.append((key, value))

    def tombstone(self, kind: str, ident: str) -> None:
        (self.items if kind == "item" else self.users).pop(ident)
        self.records.append((f"{kind}:{ident}", None))

    def expected_top(self, user: str, n: int) -> list[tuple[str, float]]:
        _version, p, seen = self.users[user]
        ids = [i for i in self.items if i not in set(seen or [])]
        scores = np.array([self.items[i][1] + float(self.items[i][2] @ p) for i in ids])
        order = np.argsort(-scores)[:n]
        return [(ids[k], float(scores[k])) for k in order]

    def expected_similar(self, item: str, n: int) -> list[tuple[str, float]]:
        q = self.items[item][2]
        ids = [i for i in self.items if i != item]
        m = np.array([self.items[i][2] for i in ids])  # (I, D)
        sims = m @ q / (np.linalg.norm(m, axis=1) * np.linalg.norm(q))
        order = np.argsort(-sims)[:n]
        return [(ids[k], float(sims[k])) for k in order]


def hostile_embeddings(keyless: bool = False) -> list[tuple[bytes | None, bytes | None]]:
    """Embedding records that are each malformed in their own way (after valid records fixed the dimension); with
    ``keyless``, also records without a key (which a compacted topic refuses)."""
    good = orjson.loads(example_record("item", "i1", 50, [0.5] * DIM, events=7))

    def item(**change: Any) -> tuple[bytes, bytes]:
        return b"item:i1", json.dumps({**good, **change}).encode()  # json: integers beyond 64 bits, NaN

    def user(**change: Any) -> tuple[bytes, bytes]:
        return b"user:u1", json.dumps({**good, "kind": "user", "id": "u1", **change}).encode()

    deep = b'{"a":' * 100_000 + b"1" + b"}" * 100_000
    return [
        item(version=2**63), item(version=2**64 - 1), user(version=2**63), item(version=2**64), item(version=1e30),
        item(version=-1), item(version="7"), item(version=1.5), item(version=True), item(version=None),
        item(events=2**63), item(events=-3), user(events=2**63), item(step=2**63), user(step=-2),
        item(bias=1e39), item(bias=1e300), user(bias=-1e300), item(bias="x"), item(bias=None), item(bias=[1]),
        item(vector=[1.0] * (DIM + 1)), user(vector=[1.0] * (DIM - 1)), item(vector=[]), item(vector=[1e39] * DIM),
        user(vector=[0.0, "a", 0.0, 0.0]), item(vector=[[1.0] * DIM]), item(vector={"a": 1}), item(vector=None),
        item(vector=[True] * DIM), item(vector=[1.0] * 100_000),
        (b"item:i1", b"{not json"), (b"item:i1", b""), (b"item:i1", b"\xff\xfe{}"), (b"item:i1", deep),
        (b"item:i1", b"[1, 2]"), (b"item:i1", b'"item"'), (b"item:i1", b"42"), (b"item:i1", b"null"),
        (b"item:\xff\xfe", orjson.dumps(good)), (b"item:other", orjson.dumps(good)),
        item(kind="thing"), item(kind=["item"]), item(id=["i1"]), item(id=""), item(id="x" * 5_000),
        item(id=17), user(seen="i1"), user(seen=[1, 2]), user(seen=["i"] * 100_000), user(seen={"i1": 1}),
        user(event_ts=2**70), user(partition="a"), user(offset=1e30), user(offset=2**64),
        (b"\xff:\xfe", None), (b"gadget:g1", None), (b"no-colon", None), (b"item:", None),
        item(**{"vector": [float("nan")] * DIM}), item(bias=float("inf")),
    ] + ([(None, None), (None, orjson.dumps({**good, "kind": None}))] if keyless else [])
