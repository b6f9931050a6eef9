"""Reduce: raw frames -> maps, rocking curves and per-pixel 3D patterns (one lazy pass).

``_kernels`` holds the pure NumPy kernels, ``core`` the dask/xarray wrappers and orchestration.
"""

from spndi_dask.reduce.core import (
    BeamtimeGrid,
    ParticlePlan,
    ReduceError,
    beamtime_grid,
    open_results,
    plan_particle,
    reduce,
    reduce_particle,
    results_path,
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
