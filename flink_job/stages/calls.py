"""What the training stage is called with, as its Flink shell logs it: ``(CHUNK, now_ms, (shard, lines))`` or
``(TIMER, now_ms, None)``. The clock comes in as an argument so that a replayed call does what the first one did.
A chunk logged before chunks carried their shard is a plain list of lines, read as shard 0's."""
from __future__ import annotations

CHUNK = "chunk"
TIMER = "timer"
Chunk = tuple[int, list[str]]
Call = tuple[str, int, Chunk | list[str] | None]
