"""Pure NumPy kernels of the reduction (no dask, no I/O): each is testable on hand-made arrays.

By concern: :mod:`._detector` (bad pixels, ROI, module gaps, fill of masked pixels),
:mod:`._moments` (corrections, moment sums, maps), :mod:`._registration` (scan drift) and
:mod:`._qgrid` (the common q grid and patterns). This module re-exports them all, so
``from spndi_dask.reduce._kernels import X`` (and ``_kernels as K``) works for every kernel.
Kernels other stages use too (scan shifts, usable patterns) live in :mod:`spndi_dask.kernels`.
"""

from spndi_dask.reduce._detector import bad_pixels, fill_operator, find_roi, module_gaps
from spndi_dask.reduce._moments import (
    FEATURES,
    MOMENTS,
    VARIANCES,
    com_covariance,
    corrected,
    filled_features,
    maps_from_moments,
    moment_features,
    moment_sums,
    parabolic_peak,
    strain_tilt_sigma,
    variance_features,
)
from spndi_dask.reduce._qgrid import (
    _detector_pixel,  # noqa: F401 (scripts/bench_reduce.py)
    fill_patterns_operator,
    grid_operator,
    patterns_block,
    solve_rocking_angle,
    used_voxels,
)
from spndi_dask.reduce._registration import register_chain, register_to_reference

__all__ = [
    "FEATURES",
    "MOMENTS",
    "VARIANCES",
    "bad_pixels",
    "com_covariance",
    "corrected",
    "fill_operator",
    "fill_patterns_operator",
    "filled_features",
    "find_roi",
    "grid_operator",
    "maps_from_moments",
    "module_gaps",
    "moment_features",
    "moment_sums",
    "parabolic_peak",
    "patterns_block",
    "register_chain",
    "register_to_reference",
    "solve_rocking_angle",
    "strain_tilt_sigma",
    "used_voxels",
    "variance_features",
]
