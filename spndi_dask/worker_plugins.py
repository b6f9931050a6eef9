"""The package's dask worker plugins: what runs in every worker process when it starts.

:class:`PinToCore` pins local workers one per core (registered by
:func:`spndi_dask.dask_clusters.open_cluster`); :class:`WorkerLogLevel` lets the workers'
``spndi_dask`` records through so that a run can forward them to its log
(:func:`spndi_dask.pipeline.run_logging`); :class:`IgnoreInterrupts` leaves Ctrl-C to the run
that started the local workers (registered by the command line). The features stage's
``ModelPlugin``, which loads a checkpoint into every worker, stays with the model code in
:mod:`spndi_dask.features.inference`.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

__all__ = ["IgnoreInterrupts", "PinToCore", "WorkerLogLevel", "set_affinity", "worker_cores"]


def set_affinity(cores: set[int]) -> None:
    """Run every thread of this process (and the threads it starts later) on ``cores`` only."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cores)
        except OSError:  # a thread that has just ended
            pass


class PinToCore(WorkerPlugin):
    """Worker plugin: local worker ``i`` runs on core ``cores[i % len(cores)]``.

    With one single-threaded worker per core, unpinned workers are moved between the cores they
    share with the scheduler and the client; pinned, two workers encoded 2938 patterns/s
    against 2715 (``scripts/bench_features.py``, 2 cores).
    """

    name = "spndi-pin-to-core"

    def __init__(self, cores: list[int]) -> None:
        self.cores = list(cores)

    def setup(self, worker: Any) -> None:
        try:
            index = int(worker.name)
        except (TypeError, ValueError):
            return
        set_affinity({self.cores[index % len(self.cores)]})


@contextmanager
def worker_cores(worker: Any) -> Iterator[set[int] | None]:
    """Run this worker process on all the cores it was pinned from (if pinned), then re-pin.

    Yields the cores the process may now use (None where affinity is not available).
    """
    if not hasattr(os, "sched_getaffinity"):
        yield None
        return
    before = os.sched_getaffinity(0)
    plugin = getattr(worker, "plugins", {}).get(PinToCore.name)
    cores = set(plugin.cores) if plugin is not None else before
    widen = cores != before
    if widen:
        set_affinity(cores)
    try:
        yield cores
    finally:
        if widen:
            set_affinity(before)


class WorkerLogLevel(WorkerPlugin):
    """Worker plugin: ``spndi_dask`` records from ``level`` on, so they can be forwarded.

    It also quiets dask's benign sizeof warnings about the performance report's profiles.
    """

    name = "spndi-log-level"

    def __init__(self, level: int) -> None:
        self.level = level

    def setup(self, worker: Any) -> None:
        logging.getLogger("spndi_dask").setLevel(self.level)
        # the performance report's profile trees are dicts too deep for dask's sizeof, which
        # warns "Sizeof calculation for object of type 'dict' failed" (dask/distributed#8578)
        logging.getLogger("distributed.sizeof").setLevel(logging.ERROR)


class IgnoreInterrupts(WorkerPlugin):
    """Worker plugin: the worker processes a run started ignore SIGINT; the run stops them.

    Ctrl-C in a terminal sends SIGINT to the whole process group: the run's process and its
    LocalCluster's worker processes. Each worker then died of its own KeyboardInterrupt, with a
    traceback, while the run was cancelling their tasks and closing the cluster. Only processes
    whose parent is ``parent`` (the run's process, which hosts their nannies) are changed:
    workers started otherwise, and threads of the run's own process, keep their handlers.
    """

    name = "spndi-ignore-interrupts"

    def __init__(self, parent: int) -> None:
        self.parent = parent

    def setup(self, worker: Any) -> None:
        if os.getppid() != self.parent or os.getpid() == self.parent:
            return
        try:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        except ValueError:  # not run in the process's main thread: leave it
            pass
