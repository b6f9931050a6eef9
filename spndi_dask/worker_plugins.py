"""Worker plugins of local clusters (apart, so that ``import spndi_dask`` needs no distributed)."""

from __future__ import annotations

import os
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

__all__ = ["PinToCore", "set_affinity"]


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
