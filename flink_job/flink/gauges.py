"""Integer gauges the training stage sets, rather than callables Flink calls.

A PyFlink gauge is a callable that Flink's metric threads call; in thread mode that enters the embedded interpreter
from a thread pemja does not own, which can crash the TaskManager once a cancelled task has closed it. So in thread
mode the value lives in the JVM (an embedded ``distribution`` keeps the last value given); in process mode the
worker reports a plain Python callable.
"""
from __future__ import annotations

from typing import Any


class SetGauge:
    """A gauge named ``name`` in ``group`` whose value is whatever ``set`` was last given (0 before that)."""

    def __init__(self, group: Any, name: str, thread_mode: bool) -> None:
        self.value = 0
        self._held = group.distribution(name) if thread_mode else None
        if self._held is None:
            group.gauge(name, lambda: self.value)

    def set(self, value: int) -> None:
        if value != self.value:
            self.value = value
            if self._held is not None:
                self._held.update(value)
