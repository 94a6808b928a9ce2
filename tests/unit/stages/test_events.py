"""The batch container and the dead letter: columns travel together, and a dead letter always serialises."""
from __future__ import annotations

import json
import pickle

import numpy as np

from flink_job.stages.events import DeadLetter, EventBatch
from flink_job.stages.parse import parse_lines

NOW = 1_800_000_000_000


def line(**context: object) -> str:
    return json.dumps({"event_id": "e1", "user_id": "u1", "item_id": "i1", "action": "view", "ts": 1, **context})


def test_concat_slice_and_select_carry_the_context_columns() -> None:
    a, _ = parse_lines([f"0,0,{line(dwell_ms=1, category='x')}", f"0,1,{line(price=2.0)}"], now_ms=NOW)
    b, _ = parse_lines([f"0,2,{line(dwell_ms=3, price=4.0, category='y')}"], now_ms=NOW)
    both = EventBatch.concat([a, b])
    assert np.array_equal(both.dwell_ms, [1.0, np.nan, 3.0], equal_nan=True)
    assert both.categories == ["x", None, "y"]
    picked = both.select(np.array([2, 0]))
    assert picked.price.tolist()[0] == 4.0 and picked.categories == ["y", "x"] and picked.offsets.tolist() == [2, 0]
    part = both.slice(1, 3)
    assert part.categories == [None, "y"] and part.price.tolist()[1] == 4.0 and part.offsets.tolist() == [1, 2]


def test_dead_letters_with_lone_surrogates_still_serialise() -> None:
    text = DeadLetter("invalid_json", "parse", "{\ud800}", 0, 1).to_json()
    assert json.loads(text)["payload"] == "{\\ud800}"


def test_a_batch_pickled_when_it_lived_in_the_parse_module_still_loads() -> None:
    """Checkpoints taken before the container moved name it flink_job.stages.parse.EventBatch."""
    batch, _ = parse_lines([f"0,3,{line(price=2.5, category='c')}"], now_ms=NOW)
    old = pickle.dumps(batch, protocol=0).replace(b"flink_job.stages.events", b"flink_job.stages.parse")
    assert b"flink_job.stages.parse\nEventBatch" in old
    restored = pickle.loads(old)
    assert restored.offsets.tolist() == [3] and restored.price.tolist() == [2.5] and restored.categories == ["c"]


def test_a_batch_pickled_with_the_cleaners_features_loads_without_them() -> None:
    """A checkpoint's pending batch written while the cleaner still derived a feature matrix carries ``features``;
    it is dropped on load, and the batch concatenates with today's batches."""
    batch, _ = parse_lines([f"0,4,{line(dwell_ms=7)}"], now_ms=NOW)
    old = pickle.loads(pickle.dumps(batch))
    old.__dict__["features"] = np.zeros((1, 7), np.float32)
    restored = pickle.loads(pickle.dumps(old))
    assert "features" not in vars(restored) and restored.dwell_ms.tolist() == [7.0]
    assert EventBatch.concat([restored, batch]).offsets.tolist() == [4, 4]
