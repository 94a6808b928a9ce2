"""Reading the job's output topics with confluent-kafka: for the run command, tests and benchmarks."""
from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from flink_job.stages.publish import decode


def consumer(bootstrap: str, read_committed: bool = False, security: dict[str, str] | None = None,
             **extra: Any) -> Consumer:
    """A reader in a group of its own. ``security``: librdkafka settings, ``KafkaConfig.librdkafka_properties()``."""
    return Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"streamrec-reader-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed" if read_committed else "read_uncommitted",
            **(security or {}),
            **extra,
        }
    )


def end_offsets(bootstrap: str, topic: str, security: dict[str, str] | None = None) -> dict[int, int]:
    c = consumer(bootstrap, security=security)
    try:
        meta = partitions_of(c, topic)
        return {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in meta.partitions}
    finally:
        c.close()


def partitions_of(client: Consumer, topic: str, timeout_s: float = 10.0) -> Any:
    """``topic``'s metadata once it lists partitions. Just after its creation it may list none (no leader yet),
    and a consumer assigned to none reads nothing, ever, without an error: a missing topic is one here."""
    deadline = time.monotonic() + timeout_s
    while True:
        meta = client.list_topics(topic, timeout=10).topics[topic]
        if meta.error is None and meta.partitions:
            return meta
        if time.monotonic() > deadline:
            raise RuntimeError(f"topics: {topic} has no partitions to read after {timeout_s:.0f}s ({meta.error})")
        time.sleep(0.1)


class Follower:
    """Follows a topic from the beginning (``from_end``: from the records written after now); ``poll()`` returns
    the records that arrived since the last call."""

    def __init__(self, bootstrap: str, topic: str, read_committed: bool = False,
                 security: dict[str, str] | None = None, from_end: bool = False) -> None:
        self.topic = topic
        self.consumer = consumer(bootstrap, read_committed, security)
        meta = partitions_of(self.consumer, topic)
        # The end as of now, not as of the first fetch, which is what OFFSET_END would resolve to.
        starts = {p: self.consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] if from_end
                  else OFFSET_BEGINNING for p in meta.partitions}
        self.consumer.assign([TopicPartition(topic, p, start) for p, start in starts.items()])

    def poll(self, max_wait_s: float = 0.5) -> list[tuple[bytes | None, bytes, int, int]]:
        """``(key, value, partition, offset)`` of the records available now."""
        out = []
        deadline = time.monotonic() + max_wait_s
        while True:
            msgs = self.consumer.consume(10_000, timeout=max(0.0, min(0.2, deadline - time.monotonic())))
            for m in msgs:
                if m.error():
                    if m.error().code() == KafkaError._PARTITION_EOF:
                        continue
                    raise RuntimeError(f"topics: reading {self.topic}: {m.error()}")
                out.append((m.key(), m.value(), m.partition(), m.offset()))
            if not msgs and time.monotonic() >= deadline:
                return out

    def close(self) -> None:
        self.consumer.close()


def read_all(bootstrap: str, topic: str, read_committed: bool = False, settle_s: float = 1.0,
             security: dict[str, str] | None = None) -> list[tuple[bytes | None, bytes, int, int]]:
    """Every record currently in ``topic`` (reads until nothing new arrives for ``settle_s``)."""
    f = Follower(bootstrap, topic, read_committed, security)
    try:
        out = []
        while True:
            got = f.poll(settle_s)
            if not got:
                return out
            out.extend(got)
    finally:
        f.close()


def json_values(records: list[tuple[bytes | None, bytes, int, int]]) -> Iterator[dict[str, Any]]:
    """The records' values decoded (JSON, or an embedding record in the binary format of ``publish.format``),
    tombstones (null values: ids the job expired) left out."""
    for _k, v, _p, _o in records:
        if v is not None:
            yield decode(v)
