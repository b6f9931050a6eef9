"""Gaussian peak fits of the per-pixel q-grid patterns: the lazy layer of ``[reduce] peak``.

With ``peak = "gaussian"`` every scan pixel's drift-corrected pattern on the beamtime's common
q grid gets a 3D Gaussian plus a constant (:mod:`spndi_dask.reduce._peakfit`), in the same dask
pass that writes the patterns (one fit task per pattern block, from the block in memory). The
fitted centre, mapped back to the sample frame, then makes ``d_spacing``, ``strain``, ``tilt_x``
and ``tilt_y`` through the same geometry as the moments' centre (see
:func:`~spndi_dask.reduce.maps.reduce_particle`).

Examples
--------
>>> import dask.array as da
>>> from spndi_dask.reduce.plan import BeamtimeGrid
>>> grid = BeamtimeGrid(h=np.array([0.0, 0.0, 1.3]), axes=np.eye(3), extent=np.full(3, 0.01), n=8)
>>> patterns = da.zeros((4, 6, 8, 8, 8), chunks=(2, 3, 8, 8, 8), dtype=np.float32)
>>> fit = gaussian_peaks(patterns, np.ones((8, 8, 8), bool), grid)
>>> fit.shape, fit.chunks[:2]
((4, 6, 11), ((2, 2), (3, 3)))
>>> int(fit[0, 0, PEAK_CHANNELS.index("status")].compute())  # nothing to fit in zeros
2
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import zarr

from spndi_dask.reduce._peakfit import FIT_PARAMS, fit_gaussian_3d
from spndi_dask.reduce.plan import BeamtimeGrid

__all__ = ["PEAK_CHANNELS", "failed_fits_note", "gaussian_peaks"]

logger = logging.getLogger(__name__)

#: Channels of :func:`gaussian_peaks`: :data:`~spndi_dask.reduce._peakfit.FIT_PARAMS` with the
#: centre as a sample-frame q vector (1/Å) and the widths along the grid's crystal axes (1/Å).
PEAK_CHANNELS = tuple(c.replace("centre_", "q_") for c in FIT_PARAMS)


def _fit_block(
    block: np.ndarray,
    covered: np.ndarray,
    *,
    h: np.ndarray,
    axes: np.ndarray,
    offsets: tuple[np.ndarray, ...],
    max_iter: int,
) -> np.ndarray:
    out = fit_gaussian_3d(block, covered, offsets, max_iter=max_iter)
    out[..., 1:4] = h + out[..., 1:4] @ axes  # grid offsets along x̂_c, ŷ_c, ẑ_c -> sample q
    return out


def gaussian_peaks(
    patterns: Any, covered: Any, grid: BeamtimeGrid, *, max_iter: int = 50
) -> np.ndarray | da.Array:
    """Fit a 3D Gaussian on a constant to each pattern of ``grid`` (lazy for dask input).

    Parameters
    ----------
    patterns : array (..., n, n, n)
        Patterns on ``grid`` (NumPy or dask; a dask array keeps its leading chunks).
    covered : bool array (n, n, n)
        Grid points inside the measured range (NumPy or a one-chunk dask array).
    grid : BeamtimeGrid
        The common q grid the patterns are on.
    max_iter : int
        Bound on the Levenberg–Marquardt steps per pixel.

    Returns
    -------
    array (..., len(PEAK_CHANNELS)) float64, of the input's type
        :data:`PEAK_CHANNELS`; NaN parameters where a pattern has no signal or the fit failed
        (``status``, :data:`~spndi_dask.reduce._peakfit.FIT_STATUS`).
    """
    kw = dict(h=grid.h, axes=grid.axes, offsets=tuple(grid.offsets), max_iter=max_iter)
    if not isinstance(patterns, da.Array):
        return _fit_block(np.asarray(patterns), np.asarray(covered, bool), **kw)
    lead = patterns.ndim - 3
    patterns = patterns.rechunk({lead + i: -1 for i in range(3)})  # whole patterns per block
    if isinstance(covered, da.Array):
        covered = covered.rechunk(-1)
    return da.map_blocks(
        _fit_block,
        patterns,
        covered,
        **kw,
        drop_axis=[lead + 1, lead + 2],
        chunks=(*patterns.chunks[:lead], (len(PEAK_CHANNELS),)),
        dtype=np.float64,
        meta=np.empty((0,) * (lead + 1), np.float64),
    )


def failed_fits_note(path: str | Path, name: str) -> str | None:
    """A warning on the pixels of a written (unpublished) result whose fit failed, in its attrs.

    None (and nothing written) when no fit failed or the result has no fits.
    """
    group = zarr.open_group(str(path), mode="r+")
    if group.attrs.get("peak") != "gaussian":
        return None
    from spndi_dask.reduce.maps import QUALITY

    quality = np.asarray(group["quality"][...])
    n = int(((quality & QUALITY["fit_failed"]) > 0).sum())
    if not n:
        return None
    note = (
        f"the Gaussian fit failed at {n} scan pixels with Bragg signal (the peak left the q grid "
        "or the fit did not converge to a peak): they are not valid (flag 'fit_failed' in "
        "`quality`); widen the grid ([reduce] pattern_extent_sigma) or use peak = 'moments'"
    )
    group.attrs.update({"warnings": [*group.attrs.get("warnings", []), note]})
    logger.warning("scan '%s': %s", name, note)
    return note
