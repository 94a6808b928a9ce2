"""The serving index fed by hand (no broker): hostile records, the id caps, the bounded memory of removed ids and the
cached cold-start answer. tests/test_serving.py reads the same from a real topic."""
from __future__ import annotations

import json
import time

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flink_job.serving.config import ServingConfig
from flink_job.serving.index import EmbeddingIndex
from flink_job.serving.records import example_record
from tests.embeddings import DIM, Changelog, hostile_embeddings


def _index(**config: int) -> EmbeddingIndex:
    return EmbeddingIndex("unused:9092", "unused", config=ServingConfig(**config))  # type: ignore[arg-type]


def _item(ident: str, version: int, events: int = 0, value: float = 1.0) -> tuple[bytes, bytes]:
    return f"item:{ident}".encode(), example_record("item", ident, version, [value] * DIM, events=events)


def _user(ident: str, version: int) -> tuple[bytes, bytes]:
    return f"user:{ident}".encode(), example_record("user", ident, version, [1.0] * DIM)


def test_every_hostile_record_is_skipped_counted_and_changes_nothing() -> None:
    ix = _index()
    ix.apply([(k.encode(), v) for k, v in Changelog().records])
    before = (ix.item_ids(), ix.user_ids(), ix.item("i1")[0], ix.user_version("u1"), ix.stats()["item_step"])  # type: ignore[index]
    hostile = hostile_embeddings(keyless=True)
    ix.apply(hostile)
    assert ix.counts["malformed"] == len(hostile) + 1 and "internal" not in ix.malformed_reasons
    assert (ix.item_ids(), ix.user_ids(), ix.item("i1")[0], ix.user_version("u1"), ix.stats()["item_step"]) == before  # type: ignore[index]
    assert ix.last_malformed is not None and ix.last_malformed["reason"] == "kind"  # the last: keyless, kind null
    orjson.dumps(ix.recommend("u1").to_dict())  # answers stay serialisable (a version beyond int64 was not)


def test_the_first_valid_record_sets_the_dimension_unless_configured() -> None:
    ix = _index()
    ix.apply([(b"item:a", example_record("item", "a", 1, [1.0] * 5000)),  # beyond max_dim: does not set it
              _item("b", 1), (b"item:c", example_record("item", "c", 1, [1.0] * (DIM + 1)))])
    assert ix.item_ids() == ["b"] and ix.malformed_reasons == {"vector": 2}
    fixed = _index(dim=DIM + 1)
    fixed.apply([_item("b", 1), (b"item:c", example_record("item", "c", 1, [1.0] * (DIM + 1)))])
    assert fixed.item_ids() == ["c"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(
    st.one_of(st.none(), st.binary(max_size=40), st.sampled_from([b"item:i1", b"user:u1", b"item:", b"user:\xff"])),
    st.one_of(st.none(), st.binary(max_size=300), st.sampled_from([
        b'{"kind":"item","id":"i1","version":18446744073709551616,"step":1,"bias":0,"vector":[1,2,3,4]}',
        b'{"kind":"user","id":"u1","version":3,"step":1,"bias":1e39,"vector":[1,2,3,4]}',
        b'{"kind":"item","id":"i1","version":3,"step":1,"bias":0,"vector":[1,2,3,4],"events":-1}',
        b"[" * 10_000, b'{"a":' * 3000,
    ]), st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                     lambda c: st.lists(c, max_size=4) | st.dictionaries(
                         st.sampled_from(["kind", "id", "version", "step", "bias", "vector", "seen", "events"]),
                         c, max_size=8), max_leaves=20).map(lambda v: json.dumps(v).encode()))),
    max_size=20))
def test_no_input_raises_and_every_record_is_accounted_for(records: list[tuple[bytes | None, bytes | None]]) -> None:
    ix = _index()
    ix.apply([_item("i1", 1), _user("u1", 1)])
    ix.apply(records)
    c = ix.counts
    assert c["records"] == c["applied"] + c["stale"] + c["malformed"] + c["tombstones"]
    assert "internal" not in ix.malformed_reasons
    orjson.dumps(ix.stats())
    for user in ("u1", "nobody"):
        orjson.dumps(ix.recommend(user, 5).to_dict())


def test_ids_are_capped_least_recently_updated_first_and_removed_ids_are_remembered_boundedly() -> None:
    ix = _index(max_items=3, max_users=2, max_removed=4)
    ix.apply([_item(f"i{n}", 1) for n in range(3)])
    ix.apply([_item("i0", 2), _item("i3", 1)])  # i0 updated: i1 is now the least recently updated
    assert ix.item_ids() == ["i0", "i2", "i3"] and ix.counts["evicted"] == 1
    ix.apply([_item("i1", 1)])  # the evicted version again: stale, not back
    assert "i1" not in ix.item_ids() and ix.counts["stale"] == 1
    ix.apply([_item("i1", 5)])  # newer: back, evicting i2
    assert ix.item_ids() == ["i0", "i1", "i3"]
    ix.apply([_item(f"x{n}", 1) for n in range(100)])
    assert len(ix.item_ids()) == 3 and ix._items is not None and ix._items.capacity <= 3  # rows never grow past
    # evicted: i1, i2 and 100 more; i1 came back: 101 remembered at most 4 at a time
    assert ix.stats()["removed_remembered"] == 4 and ix.counts["forgotten"] == 97
    ix.apply([_user(f"u{n}", 1) for n in range(10)])
    assert ix.user_ids() == ["u8", "u9"]
    assert [s.id for s in ix.recommend("nobody", 3).items] == ["x97", "x98", "x99"]  # ties by id


def test_the_cold_start_answer_is_cached_until_the_items_change() -> None:
    """The old index sorted every tied item under the lock for each unknown user: with 200,000 items of equal
    popularity, a thousand cold-start requests took minutes. Now it is ranked once per change of the items."""
    ix = _index()
    ix.apply([_item(f"i{n:06d}", 1) for n in range(200_000)])
    started = time.monotonic()
    answers = [ix.recommend(f"new{n}", 10) for n in range(1000)]
    assert time.monotonic() - started < 10.0
    assert ix.counts["popular_rebuilds"] == 1
    assert [s.id for s in answers[-1].items] == [f"i{n:06d}" for n in range(10)] and answers[-1].fallback
    ix.apply([_item("i199999", 2, events=5)])  # one item becomes the most popular
    assert ix.recommend("new", 2).items[0].id == "i199999" and ix.counts["popular_rebuilds"] == 2
    assert len(ix.recommend("new", 500).items) == 500 and ix.counts["popular_rebuilds"] == 3  # a larger n
    assert ix.recommend("new", 200).items[1].id == "i000000" and ix.counts["popular_rebuilds"] == 3
    ix.apply([(b"item:i199999", None)])
    assert ix.recommend("new", 1).items[0].id == "i000000" and ix.counts["popular_rebuilds"] == 4


def test_popular_ranking_matches_a_full_sort() -> None:
    rng = np.random.default_rng(4)
    ix = _index()
    events = {f"i{n}": int(rng.integers(0, 20)) for n in range(3000)}
    ix.apply([_item(i, 1, events=e) for i, e in events.items()])
    want = sorted(events, key=lambda i: (-events[i], i))
    for n in (1, 7, 100, 2999, 5000):
        assert [s.id for s in ix.recommend("nobody", n).items] == want[:n]


def test_serving_config_is_validated() -> None:
    for bad in ({"max_users": 0}, {"max_items": -1}, {"max_removed": True}, {"dim": 5000}, {"max_lag_s": 0},
                {"lag_check_s": float("nan")}, {"max_abs_value": float("inf")}):
        with pytest.raises(ValueError, match="config: serving"):
            ServingConfig(**bad)  # type: ignore[arg-type]
