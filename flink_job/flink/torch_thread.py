"""Runs the training stage's torch work on a Python thread of its own, for PyFlink's thread mode.

In thread mode Python runs on the JVM's task thread under a thread state pemja made, while CPython's "GIL state" for
that thread names another one; torch takes the GIL state (pybind11's ``gil_scoped_acquire``) on import and whenever
a tensor is released, and there it deadlocks. A ``threading`` thread has a consistent thread state, so
``TorchThread`` runs every torch call there and hands back only strings, numbers and NumPy arrays.
``import_off_thread`` imports torch (and what imports it) there too. While it runs, the cyclic collector is off and
the thread collects after its calls, so that no tensor is collected on the task thread.
"""
from __future__ import annotations

import gc
import importlib
import queue
import sys
import threading
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def import_off_thread(*modules: str) -> None:
    """Imports ``modules`` on a short-lived thread of their own (torch's import takes the GIL state too)."""
    missing = [m for m in modules if m not in sys.modules]
    if not missing:
        return
    errors: list[BaseException] = []

    def run() -> None:
        try:
            for m in missing:
                importlib.import_module(m)
        except BaseException as e:  # re-raised on the caller's thread
            errors.append(e)

    t = threading.Thread(target=run, name="import-off-thread", daemon=True)
    t.start()
    t.join()
    if errors:
        raise errors[0]


class Direct:
    """Calls in the caller's thread (process mode: torch is safe on the worker's threads)."""

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        return fn(*args)

    def close(self) -> None:
        pass


class TorchThread:
    """One daemon thread that runs the calls handed to it, one at a time, in order.

    >>> t = TorchThread()
    >>> t.call(lambda: threading.current_thread().name)
    'torch'
    >>> t.call(divmod, 7, 2)
    (3, 1)
    >>> try:
    ...     t.call(int, "x")
    ... except ValueError as e:
    ...     print(e)
    invalid literal for int() with base 10: 'x'
    >>> t.close()
    """

    def __init__(self) -> None:
        self._calls: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...]] | None] = queue.SimpleQueue()
        self._results: queue.SimpleQueue[tuple[bool, Any]] = queue.SimpleQueue()
        # The collector's thresholds as set when the thread starts: generation 0 at t0 new objects, generation 1 every
        # t1 collections of it, generation 2 every t2 of those.
        self._thresholds = gc.get_threshold()
        self._collections = 0
        self._gc_was_enabled = gc.isenabled()
        gc.disable()
        self._thread = threading.Thread(target=self._run, name="torch", daemon=True)
        self._thread.start()

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        if not self._thread.is_alive():
            raise RuntimeError("torch thread: closed")
        self._calls.put((fn, args))
        ok, value = self._results.get()
        if not ok:
            raise value
        return value  # type: ignore[no-any-return]

    def close(self) -> None:
        if self._thread.is_alive():
            self._calls.put(None)
            self._thread.join()
        if self._gc_was_enabled:
            gc.enable()

    def _run(self) -> None:
        while (item := self._calls.get()) is not None:
            fn, args = item
            try:
                result = (True, fn(*args))
            except BaseException as e:  # handed to the caller, who raises it in the task
                # Without its traceback: the frames hold tensors, which must not be released on the caller's thread.
                e.add_note("on the torch thread:\n" + "".join(traceback.format_tb(e.__traceback__)))
                e.__traceback__ = e.__context__ = e.__cause__ = None
                result = (False, e)
            del fn, args, item
            self._collect()
            self._results.put(result)
            del result

    def _collect(self) -> None:
        """The collector's own schedule, run here rather than wherever the next allocation happens to be."""
        t0, t1, t2 = self._thresholds
        if gc.get_count()[0] < t0:
            return
        self._collections += 1
        gc.collect(2 if self._collections % (t1 * t2) == 0 else 1 if self._collections % t1 == 0 else 0)
