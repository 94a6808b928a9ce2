"""What the training stage is called with, as its Flink shell logs it: ``(CHUNK, now_ms, (shard, lines))``,
``(TIMER, now_ms, None)`` or ``(DELTA, now_ms, (key, payload))`` (another trainer's item delta record). The clock
comes in as an argument so that a replayed call does what the first one did. A chunk logged before chunks carried
their shard is a plain list of lines, read as shard 0's."""
from __future__ import annotations

CHUNK = "chunk"
TIMER = "timer"
DELTA = "delta"
Call = tuple[str, int, tuple[int, list[str]] | tuple[str, bytes] | list[str] | None]
