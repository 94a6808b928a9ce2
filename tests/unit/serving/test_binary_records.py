"""The binary record format beside JSON: round trips, the job writes it, serving reads both from one topic, and a
malformed binary value is skipped and counted, never raised."""
from __future__ import annotations

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flink_job.config import JobConfig
from flink_job.serving.config import ServingConfig
from flink_job.serving.index import EmbeddingIndex
from flink_job.stages.binary_records import HEADER, decode_binary, encode_binary
from flink_job.stages.publish import decode, encode_records
from flink_job.stages.train import TrainStage

VECTORS = np.array([[0.1, -2.5, 3e-8], [1.0, 0.0, -1.0]], np.float32)


def _both(**extra: object) -> dict[str, list[tuple[str, bytes]]]:
    args = ("user", ["u1", "ü2"], VECTORS, np.array([0.5, -0.25], np.float32), np.array([3, 4]), 9,
            np.array([100, -1]))
    return {fmt: encode_records(*args, **extra, fmt=fmt) for fmt in ("json", "binary")}  # type: ignore[arg-type]


def _without_time(rec: dict[str, object]) -> dict[str, object]:
    """The fields but the publish time, the vector as float32 (JSON writes a float32 in its shortest form)."""
    return {k: np.float32(v).tolist() if k == "vector" else v for k, v in rec.items() if k != "produced_ms"}


@pytest.mark.parametrize("extra", [
    {},
    {"partitions": np.array([0, 3]), "offsets": np.array([41, 7]), "events": np.array([5, 0]),
     "seen": [["i1", "ï2"], []]},
])
def test_binary_records_decode_to_what_json_says(extra: dict[str, object]) -> None:
    both = _both(**extra)
    assert [k for k, _ in both["json"]] == [k for k, _ in both["binary"]] == ["user:u1", "user:ü2"]
    for (_, j), (_, b) in zip(both["json"], both["binary"], strict=True):
        assert b[:2] == b"\xeb\x01" and len(b) < len(j)
        assert _without_time(decode(b)) == _without_time(orjson.loads(j))
    assert decode_binary(both["binary"][0][1])["vector"].dtype == np.float32


def test_the_job_publishes_binary_records_when_configured() -> None:
    lines = [f'0,{k},{{"event_id":"e{k}","user_id":"u{k % 3}","item_id":"i{k % 4}","action":"click","ts":{k}}}'
             for k in range(12)]
    records = {}
    for fmt in ("json", "binary"):
        stage = TrainStage(JobConfig.load(overrides=["batch.size=12", "publish.interval_ms=0",
                                                     "publish.item_interval_ms=0", f"publish.format={fmt}"]))
        records[fmt] = {k: _without_time(decode(v)) for k, v in stage.on_chunk(lines, now_ms=1_000).embeddings if v}
    assert records["binary"] == records["json"] and len(records["json"]) == 7
    assert set(records["json"]["user:u0"]) >= {"vector", "bias", "version", "seen", "partition", "offset", "events"}


def test_serving_reads_both_formats_from_one_topic() -> None:
    both = _both()
    ix = EmbeddingIndex("unused:9092", "unused")
    ix.apply([(k.encode(), v) for k, v in both["json"][:1] + both["binary"][1:]])
    assert ix.counts["applied"] == 2 and ix.counts["malformed"] == 0
    for n, user in enumerate(["u1", "ü2"]):
        got = ix.user(user)
        assert got is not None and got.vector.tolist() == VECTORS[n].tolist() and got.version == 9


def _malformed() -> dict[str, bytes]:
    good = encode_binary("item", "i1", np.ones(3, np.float32), 0.0, 1, 2, 2, 0, 0, events=1)
    return {
        "short": good[:10],
        "cut vector": good[:-1],
        "left over": good + b"\0",
        "version 2": good[:1] + b"\x02" + good[2:],
        "kind 7": good[:2] + b"\x07" + good[3:],
        "dim beyond the value": good[:4] + (60000).to_bytes(2, "little") + good[6:],
        "id not UTF-8": good[:HEADER.size] + b"\xff\xfe" + good[HEADER.size + 2:],
        "NaN vector": good[:-4] + np.float32("nan").tobytes(),
    }


def test_a_malformed_binary_value_is_skipped_and_counted_with_its_reason() -> None:
    ix = EmbeddingIndex("unused:9092", "unused", config=ServingConfig(dim=3))
    bad = _malformed()
    ix.apply([(b"item:i1", v) for v in bad.values()])
    assert ix.counts["malformed"] == len(bad) and ix.item_ids() == []
    assert ix.malformed_reasons == {"binary": len(bad) - 1, "vector": 1}  # a NaN is read, then refused
    assert ix.last_malformed is not None and "not finite" in ix.last_malformed["detail"]
    for what, value in bad.items():
        if what != "NaN vector":
            with pytest.raises(ValueError):
                decode_binary(value)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200), st.integers(0, 100))
def test_no_binary_value_raises_out_of_the_index(tail: bytes, cut: int) -> None:
    good = encode_binary("user", "u1", np.ones(4, np.float32), 0.5, 1, 2, 2, 0, 0, 0, 5, 3, ["a", "b"])
    ix = EmbeddingIndex("unused:9092", "unused")
    ix.apply([(b"user:u1", b"\xeb" + tail), (b"user:u1", good[:cut] + tail), (None, b"\xeb\x01" + tail)])
    assert ix.counts["records"] == ix.counts["applied"] + ix.counts["malformed"] + ix.counts["stale"] == 3
    assert "internal" not in ix.malformed_reasons


def test_the_format_is_validated() -> None:
    with pytest.raises(ValueError, match="publish.format"):
        JobConfig.load(overrides=["publish.format=protobuf"])
