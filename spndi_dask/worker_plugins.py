"""The package's dask worker plugins: what runs in every worker process when it starts.

:class:`PinToCore` pins local workers one per core (registered by
:func:`spndi_dask.dask_clusters.open_cluster`); :class:`WorkerLogLevel` lets the workers'
``spndi_dask`` records through so that a run can forward them to its log
(:func:`spndi_dask.pipeline.run_logging`). The features stage's ``ModelPlugin``, which loads a
checkpoint into every worker, stays with the model code in :mod:`spndi_dask.features.inference`.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

__all__ = ["PinToCore", "WorkerLogLevel", "set_affinity"]


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
