"""What the training stage is called with, as its Flink shell logs it: ``(CHUNK, now_ms, lines)`` or
``(TIMER, now_ms, None)``. The clock comes in as an argument so that a replayed call does what the first one did."""
from __future__ import annotations

CHUNK = "chunk"
TIMER = "timer"
Call = tuple[str, int, list[str] | None]
