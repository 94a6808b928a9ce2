"""Events round-trip through the real broker: what the producer sends is what a consumer reads, byte for byte."""
from __future__ import annotations

import pytest

from flink_job.stages.parse import parse_event
from flink_job.tools.generate import SyntheticConfig, generate
from flink_job.kafka.produce import send
from flink_job.tools.produce import synthetic_timed
from flink_job.kafka.topics import read_all

pytestmark = pytest.mark.integration


def test_synthetic_events_round_trip_through_the_broker(topics) -> None:
    cfg = topics("roundtrip")
    syn = SyntheticConfig(n_users=50, n_items=40, n_events=2_000, seed=3)
    sent = send(synthetic_timed(syn), cfg.kafka.bootstrap, cfg.kafka.input_topic)
    got = read_all(cfg.kafka.bootstrap, cfg.kafka.input_topic)
    assert sent == len(got) == 2_000
    expected = sorted((r.key, r.payload) for r in generate(syn))
    assert sorted((k, v) for k, v, _p, _o in got) == expected
    # Keyed by user: every event of a user lands in one partition, in the order it was produced.
    partitions_of_user: dict[bytes, set[int]] = {}
    for k, _v, p, _o in got:
        partitions_of_user.setdefault(k, set()).add(p)
    assert all(len(ps) == 1 for ps in partitions_of_user.values())
    assert {p for _k, _v, p, _o in got} == {0, 1}
    first = parse_event(got[0][1])
    assert first.user_id.encode() == got[0][0]


def test_a_broker_formats_its_storage_when_the_random_cluster_id_starts_with_a_dash(tmp_path, monkeypatch) -> None:
    """Once in 64 starts the base64 cluster id begins with "-", which Kafka's storage tool took for an option."""
    import uuid

    from deploy import kafka

    monkeypatch.setattr(kafka.uuid, "uuid4", lambda: uuid.UUID(bytes=b"\xf8" + bytes(15)))
    broker = kafka.Broker(19792, 19793, tmp_path / "broker")
    try:
        broker.start()
        assert "cluster.id=-" in (tmp_path / "broker" / "data" / "meta.properties").read_text()
    finally:
        broker.stop()


def test_a_follower_made_just_after_its_topic_reads_what_comes_later_and_a_missing_topic_is_an_error(kafka) -> None:
    """A topic has no partitions in its metadata until they have a leader. A follower assigned to none then read
    nothing, ever, without an error: the benchmark that started a job right after creating its topics waited for
    stats that had been written."""
    import uuid

    from confluent_kafka import Producer

    from deploy.kafka import create_topics
    from flink_job.kafka.topics import Follower

    followers = []
    for n in range(5):  # the race was one in a few
        topic = f"follow.{uuid.uuid4().hex[:8]}.{n}"
        create_topics(kafka.bootstrap, {topic: {}}, 1)
        followers.append(Follower(kafka.bootstrap, topic))
    producer = Producer({"bootstrap.servers": kafka.bootstrap})
    for f in followers:
        producer.produce(f.topic, b"x")
    producer.flush()
    try:
        assert [len(f.poll(5.0)) for f in followers] == [1] * 5
    finally:
        for f in followers:
            f.close()
    with pytest.raises(RuntimeError, match="no partitions"):
        Follower(kafka.bootstrap, f"missing.{uuid.uuid4().hex[:8]}")
