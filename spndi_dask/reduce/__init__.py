"""Reduce: raw frames -> maps, rocking curves and per-pixel 3D patterns (one lazy pass).

By phase: ``plan`` (corrections, ROI, drift and the common q grid, from small arrays), ``graph``
(tiles, neighbour strips and the fused block tasks), ``maps`` (per-pixel maps and the lazy
results of a particle), ``core`` (:func:`reduce`: fingerprints, writing, publishing). Pure
kernels live in ``_kernels`` (NumPy) and ``_fused`` (numba); results are stored and opened by
:mod:`spndi_dask.io.results_store`.
"""

from spndi_dask.io.results_store import open_results, results_path
from spndi_dask.reduce.core import reduce
from spndi_dask.reduce.maps import reduce_particle
from spndi_dask.reduce.plan import (
    BeamtimeGrid,
    ParticlePlan,
    ReduceError,
    beamtime_grid,
    plan_particle,
)

__all__ = [
    "BeamtimeGrid",
    "ParticlePlan",
    "ReduceError",
    "beamtime_grid",
    "open_results",
    "plan_particle",
    "reduce",
    "reduce_particle",
    "results_path",
]
