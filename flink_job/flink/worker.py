"""Tuning of the Python worker that PyFlink runs the training stage in (Apache Beam's SDK harness).

In PyFlink's process mode the JVM operator waits for the end of every bundle before it goes on, so any fixed wait
of the worker at a bundle's end sits on the job's critical path. Beam times each bundle with a sampling thread that
sleeps in periods growing from 2 ms to 200 ms, and the end of every bundle joins that thread: it waits for the
sampler's current sleep to end, about a tenth of the bundle.

``tune()`` caps the sampler's sleep at ``SAMPLING_PERIOD_MS``. It must run in the worker before its first bundle. A
local run calls it before submitting, since the worker is then a thread pool of the submitting process (PyFlink's
loopback mode). On a cluster, a ``python.executable`` script that runs ``python -m flink_job.flink.worker "$@"`` for the
worker does the same (``deploy.cluster.SessionCluster.worker_launcher``): PyFlink starts the worker as
``<python.executable> -m pyflink.fn_execution.beam.beam_boot <args>``.
"""
from __future__ import annotations

import logging
import runpy
import sys
import threading

log = logging.getLogger(__name__)
SAMPLING_PERIOD_MS = 1  # the sampler's longest sleep, so the longest wait at a bundle's end


def shorten_bundle_sampling(period_ms: int = SAMPLING_PERIOD_MS) -> bool:
    """Makes Beam's bundle processors created from now on sample every ``period_ms`` at most; False if this Beam
    has no such sampler (then nothing changes).

    >>> shorten_bundle_sampling()
    True
    >>> from apache_beam.runners.worker import statesampler
    >>> statesampler.StateSampler("s", None).sampling_period_ms
    1
    """
    try:
        from apache_beam.runners.worker import statesampler
    except ImportError:  # pragma: no cover - Beam comes with apache-flink
        return False
    base = getattr(statesampler, "_BeamStateSampler", statesampler.StateSampler)

    class ShortPeriodStateSampler(base):  # type: ignore[misc, valid-type]
        def __init__(self, prefix: str, counter_factory: object, sampling_period_ms: int = period_ms) -> None:
            super().__init__(prefix, counter_factory, min(sampling_period_ms, period_ms))

    statesampler._BeamStateSampler = base
    statesampler.StateSampler = ShortPeriodStateSampler
    return True


_tuned = threading.Lock()


def tune() -> None:
    """The change above, once per process."""
    if _tuned.acquire(blocking=False):
        shorten_bundle_sampling()
        log.info("worker: bundle sampling every %d ms at most", SAMPLING_PERIOD_MS)


def embedded_python_path() -> str:
    """``python.pythonpath`` for a local run in thread mode: this venv's packages and the project.

    pemja starts the interpreter of the shared library it finds through ``python.executable`` (this process's,
    set by ``flink_job.flink.topology``) with that interpreter's default ``sys.path``, which lacks both; Flink adds
    ``python.pythonpath`` to it, whenever the JVM was started (a PYTHONPATH set now would miss a JVM already up).
    """
    import os
    import site

    from flink_job.config import PROJECT_ROOT

    return os.pathsep.join([str(PROJECT_ROOT), *site.getsitepackages()])


def main() -> None:
    """``python -m flink_job.flink.worker -m pyflink.fn_execution.beam.beam_boot ...``: the worker, tuned.

    PyFlink starts its worker as ``<python.executable> -m pyflink.fn_execution.beam.beam_boot <args>``; a
    ``python.executable`` that runs this module instead keeps those arguments and tunes the worker first.
    """
    args = sys.argv[1:]
    if len(args) < 2 or args[0] != "-m":
        raise SystemExit(f"flink_job.flink.worker: expected '-m <module> [args]', got {args!r}")
    tune()
    sys.argv = [args[1], *args[2:]]
    runpy.run_module(args[1], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
