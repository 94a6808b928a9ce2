"""Integer gauges that the training stage sets, rather than callables that Flink calls.

A PyFlink gauge is a Python callable that Flink's metric threads call whenever metrics are fetched (the REST API
fetches them for every job-details request). In thread mode that call enters the embedded interpreter from a
thread pemja does not own, and after a cancelled task closed the interpreter it crashed the TaskManager JVM
(SIGSEGV in ``take_gil``; ``BENCHMARKS.md``). So in thread mode the value lives in the JVM: PyFlink's embedded
``distribution`` is a Java gauge holding the last value it was given. In process mode the worker reports the
value of a plain Python callable, as before.
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
