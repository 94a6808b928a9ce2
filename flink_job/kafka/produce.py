"""The Kafka producer the tools and benchmarks share: keyed records out, paced, with a progress bar."""
from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from tqdm import tqdm


@dataclass(frozen=True)
class Record:
    """One Kafka record of the stream: the key (user id), the payload and what it is."""

    key: bytes
    payload: bytes
    kind: str  # "event", "duplicate", "late" or one of flink_job.tools.generate.MALFORMED_KINDS
    event_id: str


@dataclass(frozen=True)
class Pacing:
    """Limits on how fast records leave: a rate cap and/or an event-time speed factor."""

    rate: float | None = None  # events per second
    speed: float | None = None  # event-time seconds per wall-clock second


def send(
    records: Iterable[tuple[Record, int]],
    bootstrap: str,
    topic: str,
    pacing: Pacing = Pacing(),
    total: int | None = None,
    extra_config: dict[str, str] | None = None,
) -> int:
    """Sends ``(record, ts_ms)`` pairs keyed by user; returns how many were delivered (raises if any failed).

    ``extra_config``: librdkafka settings on top of the defaults, e.g. the security settings of
    ``KafkaConfig.librdkafka_properties()``.
    """
    from confluent_kafka import Producer

    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "linger.ms": 20,
            "batch.num.messages": 10_000,
            "queue.buffering.max.messages": 1_000_000,
            "compression.type": "lz4",
            "enable.idempotence": True,
            **(extra_config or {}),
        }
    )
    failures: list[str] = []

    def on_delivery(err: object, _msg: object) -> None:
        if err is not None:
            failures.append(str(err))

    start = time.monotonic()
    first_ts: int | None = None
    sent = 0
    with tqdm(total=total, unit="ev", desc=f"-> {topic}", mininterval=1.0) as bar:
        for rec, ts_ms in records:
            first_ts = ts_ms if first_ts is None else first_ts
            _pace(pacing, sent, ts_ms - first_ts, start)
            while True:
                try:
                    producer.produce(topic, rec.payload, rec.key, on_delivery=on_delivery)
                    break
                except BufferError:
                    producer.poll(0.05)
            sent += 1
            if sent % 10_000 == 0:
                producer.poll(0)
                bar.update(10_000)
        bar.update(sent % 10_000)
        remaining = producer.flush(60)
    if remaining or failures:
        raise RuntimeError(f"produce: {remaining} records undelivered, {len(failures)} failed: {failures[:3]}")
    return sent


def _pace(pacing: Pacing, sent: int, event_elapsed_ms: int, start: float) -> None:
    due = 0.0
    if pacing.rate:
        due = max(due, sent / pacing.rate)
    if pacing.speed:
        due = max(due, event_elapsed_ms / 1000.0 / pacing.speed)
    wait = start + due - time.monotonic()
    if wait > 0.001:
        time.sleep(wait)


