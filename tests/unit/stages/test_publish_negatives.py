"""Rows a batch moved without an event of their own (sampled negatives, replay) are published only once they drifted
past ``publish.negative_tolerance``; rows with events of their own are published as before."""
from __future__ import annotations

import orjson

from flink_job.config import JobConfig
from flink_job.stages.train import TrainStage

OVERRIDES = ["batch.size=20", "publish.interval_ms=0", "publish.item_interval_ms=0"]


def _lines(n: int, items: int, start: int = 0) -> list[str]:
    return [
        f'0,{k},{{"event_id":"e{k}","user_id":"u{k % 5}","item_id":"i{k % items}","action":"click","ts":{k}}}'
        for k in range(start, start + n)
    ]


def _items_published(stage: TrainStage, lines: list[str], now_ms: int) -> set[str]:
    return {k for k, v in stage.on_chunk(lines, now_ms=now_ms).embeddings if k.startswith("item:") and v}


def _stage(negative_tolerance: float) -> TrainStage:
    stage = TrainStage(JobConfig.load(overrides=[*OVERRIDES, f"publish.negative_tolerance={negative_tolerance}"]))
    assert len(_items_published(stage, _lines(40, items=30), 1_000)) == 30  # each item has events: all go out
    return stage


def test_rows_moved_only_as_negatives_wait_for_their_tolerance() -> None:
    # Then only i0..i3 have events; the other 26 items move as sampled negatives only.
    every = _items_published(_stage(0.0), _lines(20, items=4, start=40), 2_000)
    lazy = _items_published(_stage(1000.0), _lines(20, items=4, start=40), 2_000)
    assert lazy == {f"item:i{i}" for i in range(4)}
    assert every > lazy  # at 0 the negatives go out too, as before issue 18


def test_a_negative_goes_out_once_it_drifted_past_the_tolerance() -> None:
    stage = _stage(0.05)
    published: set[str] = set()
    for n in range(200):  # a few items' events move the others as negatives, a little each batch
        published |= _items_published(stage, _lines(20, items=4, start=40 + 20 * n), 2_000 + n)
    negatives = published - {f"item:i{i}" for i in range(4)}
    assert negatives  # they drifted far enough at last
    drift = stage.publisher.drift["item"]
    rows = [stage.model.items.get(k.split(":")[1]) for k in sorted(negatives)]
    vectors, biases, _ = stage.model.vectors("item", rows)
    last = drift.vectors[rows]
    change = ((last[:, 1:] - vectors) ** 2).sum(1) ** 0.5
    # what serving holds is never further than the tolerance (of the published norm) from the model
    assert (change <= 0.05 * (last ** 2).sum(1) ** 0.5 + 1e-6).all()


def test_negative_tolerance_must_be_a_finite_non_negative_number() -> None:
    for bad in ("-0.1", "inf", "nan"):
        try:
            JobConfig.load(overrides=[f"publish.negative_tolerance={bad}"])
        except ValueError as ex:
            assert "publish.negative_tolerance" in str(ex)
        else:
            raise AssertionError(f"publish.negative_tolerance={bad} was accepted")


def test_records_stay_json_by_default() -> None:
    stage = TrainStage(JobConfig.load(overrides=OVERRIDES))
    key, value = next(kv for kv in stage.on_chunk(_lines(20, items=4), now_ms=1_000).embeddings if kv[1])
    assert orjson.loads(value)["id"] == key.split(":", 1)[1]
