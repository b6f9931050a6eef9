"""Per-pixel maps of a particle from its moment sums, and its lazy reduce results.

:func:`reduce_particle` assembles the results contract of the reduce stage (DESIGN.md) from the
block graph (:mod:`spndi_dask.reduce.graph`): the per-angle moment sums are brought back to the
reference scan grid (drift), summed over angles and turned into maps in one small NumPy task
(:func:`_finish_maps`); the patterns come from the blocks as they are.

Masked detector pixels and saturation leave a trace per scan pixel in ``quality``: 'filled'
where more than :data:`~spndi_dask.reduce.plan.FILLED_FRACTION` of the ROI intensity of a pixel
with Bragg signal was filled
into masked pixels from their neighbours, 'saturated' where at least one of its ROI voxels was
at or above the saturation level at some angle. Saturation is masked per voxel: count-rate
saturation belongs to one pixel in one frame (the flux there, then), and the same pixel counts
correctly in the frames where the peak is elsewhere, so masking the pixel in every frame would
throw away good counts of the peak's core at every angle for the sake of a few frames. A
saturated voxel is left out (0), not filled: its true count is unknown and above the level,
so the pixel's intensity is biased low there, which the flag says. ``saturated_voxels(angle)``
counts them.
"""

from __future__ import annotations

from typing import Any, Literal

import dask
import dask.array as da
import numpy as np
import xarray as xr

from spndi_dask.geometry import crystal_frame, strain_tilt
from spndi_dask.io.results_store import MAP_LONG_NAMES, MAP_VARIABLES
from spndi_dask.kernels import shift_maps
from spndi_dask.reduce import _kernels as K
from spndi_dask.reduce.graph import _block_graph, _lazy_context, _pick
from spndi_dask.reduce.peakfit import PEAK_CHANNELS, gaussian_peaks
from spndi_dask.reduce.plan import FILLED_FRACTION, BeamtimeGrid, ParticlePlan, ReduceError

__all__ = ["QUALITY", "reduce_particle"]

#: Bits of the ``quality`` map.
QUALITY = {
    "no_signal": 1,
    "peak_at_range_edge": 2,
    "missing_angles": 4,
    "roi_at_detector_edge": 8,
    "saturated": 16,
    "filled": 32,
    "fit_failed": 64,
}
_VAR, _FILLED, _SATURATED = (K.MOMENTS.index(c) for c in ("var", "w_filled", "n_saturated"))


def _finish_maps(
    moments: np.ndarray,
    *,
    drift: np.ndarray,
    h_ref: np.ndarray,
    angles: np.ndarray,
    rocking_axis: str,
    reference: np.ndarray | None,
    d0: float | None,
    min_snr: float,
    flags: int,
    missing: np.ndarray,
    fit: np.ndarray | None = None,
) -> np.ndarray:
    """All per-pixel outputs from the per-angle moments (NumPy; one small block per particle).

    Returns ``(ny, nx, n_angle + len(_FINISHED))``: rocking curve, then :data:`_FINISHED`
    channels; with ``fit`` (``(ny, nx, len(PEAK_CHANNELS))`` of
    :func:`~spndi_dask.reduce.peakfit.gaussian_peaks`) the maps of the centre and widths are the
    fit's and :data:`_FITTED` channels follow. The ``*_sigma`` maps are the standard errors of
    the centre of mass from Poisson counting statistics
    (:func:`~spndi_dask.reduce._kernels.com_covariance`, variances brought to the reference grid
    with squared shift weights) through the delta method
    (:func:`~spndi_dask.reduce._kernels.strain_tilt_sigma`). The fit's own standard errors are
    not estimated: with ``fit`` the ``*_sigma`` maps are NaN rather than the moments' errors.
    """
    per_angle = shift_maps(moments, drift)
    curves = per_angle[..., 0]
    summed = per_angle.sum(axis=0)
    # variances through the bilinear drift shift: squared weights (independent frames)
    with_var = summed.copy()
    var_channels = [_VAR, *range(len(K.MOMENTS))[K.VARIANCES]]
    with_var[..., var_channels] = shift_maps(moments[..., var_channels], drift, power=2).sum(0)
    # the frame for the widths: the particle's mean q
    s = summed[..., 0]
    lit = (s > 0) & (s > min_snr * np.sqrt(np.maximum(summed[..., _VAR], 0)))
    h_mean = h_ref + (summed[lit, 1:4].sum(axis=0) / s[lit].sum() if lit.any() else np.zeros(3))
    if reference is not None:
        h = np.asarray(reference, float)
    else:
        h = h_mean
    if d0 is not None:
        h = h / np.linalg.norm(h) * 2 * np.pi / d0
    frame = crystal_frame(h, rocking_axis)
    maps = K.maps_from_moments(summed, h_ref, frame.matrix, min_snr=min_snr)
    valid = maps["valid"]
    st = strain_tilt(maps["q_com"], frame)
    sigma = K.strain_tilt_sigma(maps["q_com"], K.com_covariance(with_var), frame)
    fit_failed = np.zeros_like(valid)
    if fit is not None:  # the fitted centre makes the maps; a failed fit leaves the pixel out
        fit_failed = valid & ~np.isfinite(fit[..., 1:4]).all(axis=-1)
        valid = valid & ~fit_failed
        st = strain_tilt(fit[..., 1:4], frame)
        sigma = {name: np.full(valid.shape, np.nan) for name in _SIGMAS}
        for axis in "xyz":
            maps[f"width_{axis}"] = fit[..., PEAK_CHANNELS.index(f"width_{axis}")]
    order = np.argsort(angles)
    peak = K.parabolic_peak(curves[order], angles[order])
    quality = np.where(valid, 0, QUALITY["no_signal"]) | flags
    edge = valid & ((peak <= angles.min()) | (peak >= angles.max()))
    quality = quality | np.where(edge, QUALITY["peak_at_range_edge"], 0)
    quality = quality | np.where(missing, QUALITY["missing_angles"], 0)
    # (counts brought to the reference grid by the drift shift: > 0 where a saturated voxel
    # entered the pixel's interpolated value)
    quality = quality | np.where(summed[..., _SATURATED] > 1e-6, QUALITY["saturated"], 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        filled = valid & (summed[..., _FILLED] > FILLED_FRACTION * np.where(s > 0, s, np.inf))
    quality = quality | np.where(filled, QUALITY["filled"], 0)
    quality = quality | np.where(fit_failed, QUALITY["fit_failed"], 0)
    nan = ~valid
    chans = [
        maps["intensity"],
        st["d_spacing"],
        st["strain"],
        st["tilt_x"],
        st["tilt_y"],
        maps["width_x"],
        maps["width_y"],
        maps["width_z"],
        np.where(nan, np.nan, peak),
        maps["det_row"],
        maps["det_col"],
        *(sigma[name] for name in _SIGMAS),
        maps["q_com"][..., 0],
        maps["q_com"][..., 1],
        maps["q_com"][..., 2],
        valid.astype(float),
        quality.astype(float),
    ]
    if fit is not None:
        chans += [fit[..., PEAK_CHANNELS.index(c)] for c in _FITTED]
    out = np.concatenate([np.moveaxis(curves, 0, -1), np.stack(chans, -1)], axis=-1)
    out[nan, len(angles) : len(angles) + len(MAP_VARIABLES) + 3] = np.nan
    out[nan, len(angles) + len(_FINISHED) :] = np.nan
    return out, h


_SIGMAS = ("d_spacing", "strain", "tilt_x", "tilt_y")
_FINISHED = (*MAP_VARIABLES, "q_x", "q_y", "q_z", "valid", "quality")
#: Channels after :data:`_FINISHED` with ``[reduce] peak = "gaussian"`` (of PEAK_CHANNELS).
_FITTED = ("q_x", "q_y", "q_z", "amplitude", "background", "chi2")


def reduce_particle(
    plan: ParticlePlan,
    grid: BeamtimeGrid | None,
    *,
    min_snr: float = 5.0,
    reference: np.ndarray | None = None,
    d0: float | None = None,
    peak: Literal["moments", "gaussian"] = "moments",
) -> xr.Dataset:
    """The lazy reduce results of one particle (nothing is computed).

    Parameters
    ----------
    plan : ParticlePlan
        From :func:`~spndi_dask.reduce.plan.plan_particle`, with ``drift`` set.
    grid : BeamtimeGrid or None
        Common q grid for the patterns; None skips them.
    min_snr : float
        Validity threshold (see :func:`~spndi_dask.reduce._kernels.maps_from_moments`).
    reference : array (3,), optional
        Reference vector for strain and tilt; default the particle's mean q.
    d0 : float, optional
        Reference d-spacing (Å): ``|h| = 2π/d0`` along the reference direction.
    peak : {'moments', 'gaussian'}
        Where the centre and widths of the maps come from: the moments of the ROI, or a 3D
        Gaussian fitted to each pixel's pattern on ``grid``
        (:func:`~spndi_dask.reduce.peakfit.gaussian_peaks`). ``q_com`` is the moments' centre
        either way; ``gaussian`` adds ``q_fit``, ``peak_amplitude``, ``peak_background`` and
        ``peak_chi2``, and a pixel whose fit failed is not valid (quality flag 'fit_failed').

    Returns
    -------
    xarray.Dataset
        Variables of the reduce stage (DESIGN.md results contract), dask-backed.
    """
    if plan.drift is None:
        raise ReduceError(f"scan '{plan.name}': the drift is not known yet")
    if peak not in ("moments", "gaussian"):
        raise ReduceError(f"peak = {peak!r}: use 'moments' or 'gaussian' ([reduce] peak)")
    if peak == "gaussian" and grid is None:
        raise ReduceError("peak = 'gaussian' fits the q-grid patterns: a grid is needed")
    ctx = _lazy_context(plan, grid)
    moments, patterns = _block_graph(plan, ctx, grid)
    na, ny, nx = moments.shape[:3]
    small = moments.rechunk((na, ny, nx, len(K.MOMENTS)))
    missing = (plan.scale == 0).any(axis=0)
    flags = QUALITY["roi_at_detector_edge"] if plan.roi_at_edge else 0
    drift, h_ref, angles = plan.drift, plan.h_projection, plan.angles
    rocking_axis = plan.geometry.rocking_axis

    def finish(block: np.ndarray, fit: np.ndarray | None = None, part: int = 0) -> np.ndarray:
        result = _finish_maps(
            block,
            drift=drift,
            h_ref=h_ref,
            angles=angles,
            rocking_axis=rocking_axis,
            reference=reference,
            d0=d0,
            min_snr=min_snr,
            flags=flags,
            missing=missing,
            fit=fit,
        )
        return result[part]

    if peak == "moments":
        finished = small.map_blocks(
            finish,
            drop_axis=[0, 3],
            new_axis=[2],
            chunks=((ny,), (nx,), (na + len(_FINISHED),)),
            dtype=np.float64,
            meta=np.empty((0, 0, 0), np.float64),
        )
    else:  # the fits of the pattern blocks, gathered (small) into the one maps task
        covered = _covered(ctx, grid)
        fit = gaussian_peaks(patterns, covered, grid).rechunk((ny, nx, -1))
        finished = da.blockwise(
            finish,
            "yxc",
            small,
            "ayxm",
            fit,
            "yxp",
            new_axes={"c": na + len(_FINISHED) + len(_FITTED)},
            concatenate=True,
            dtype=np.float64,
            meta=np.empty((0, 0, 0), np.float64),
        )
    coords: dict[str, Any] = dict(plan.coords)
    data: dict[str, Any] = {
        "rocking_curve": (
            ("angle", "y", "x"),
            da.moveaxis(finished[..., :na], -1, 0),
            {"units": MAP_VARIABLES["intensity"], "long_name": "drift-corrected rocking curve"},
        )
    }
    for i, var in enumerate(_FINISHED):
        values = finished[..., na + i]
        if var in ("q_x", "q_y", "q_z"):
            continue
        if var == "valid":
            data[var] = (("y", "x"), values > 0.5, {"long_name": "pixel has Bragg signal"})
        elif var == "quality":
            data[var] = (
                ("y", "x"),
                values.astype(np.uint8),
                {"flags": QUALITY, "long_name": "quality bit flags (0 = good)"},
            )
        else:
            attrs = {"units": MAP_VARIABLES[var], "long_name": MAP_LONG_NAMES[var]}
            data[var] = (("y", "x"), values, attrs)
    q_com = da.stack([finished[..., na + _FINISHED.index(c)] for c in ("q_x", "q_y", "q_z")], -1)
    data["q_com"] = (
        ("y", "x", "component"),
        q_com,
        {"units": "1/Å", "frame": "sample", "long_name": "centre of mass of the peak (moments)"},
    )
    if peak == "gaussian":
        _fitted_variables(data, finished[..., na + len(_FINISHED) :])
    data["saturated_voxels"] = (
        ("angle",),
        moments[..., _SATURATED].sum(axis=(1, 2)).round().astype(np.int64),
        {
            "long_name": "ROI voxels at or above the saturation level, masked in their frame",
            "saturation": "none" if plan.saturation is None else plan.saturation,
        },
    )
    data["drift"] = (
        ("angle", "axis"),
        plan.drift,
        {
            "units": "pixel",
            "method": plan.drift_method,
            "long_name": "displacement of the sample content at each angle vs the reference angle",
        },
    )
    reference_q = small.map_blocks(
        finish,
        part=1,
        drop_axis=[0, 1, 2, 3],
        new_axis=[0],
        chunks=((3,),),
        dtype=np.float64,
        meta=np.empty((0,), np.float64),
    )
    data["reference_q"] = (
        ("component",),
        reference_q,
        {"units": "1/Å", "long_name": "reference vector h of strain and tilt (zero strain/tilt)"},
    )
    coords["component"] = np.array(["qx", "qy", "qz"], dtype=object)
    coords["axis"] = np.array(["y", "x"], dtype=object)
    if patterns is not None:
        covered = _covered(ctx, grid)
        dims = ("y", "x", "dq_x", "dq_y", "dq_z")
        data["pattern"] = (
            dims,
            patterns,
            {
                "units": "counts",
                "long_name": "drift-corrected 3D diffraction pattern on the common crystal-frame "
                "q grid (offsets from the beamtime reference vector), clipped at 0",
            },
        )
        data["pattern_covered"] = (
            dims[2:],
            covered,
            {"long_name": "grid point inside the measured angle and ROI range"},
        )
        for name, off in zip(dims[2:], grid.offsets, strict=True):
            axis = name[-1]
            long_name = f"q offset along the crystal {axis} axis from the beamtime reference"
            coords[name] = (name, off, {"units": "1/Å", "long_name": long_name})
    attrs = {
        "roi": list(plan.roi),
        "roi_at_detector_edge": plan.roi_at_edge,
        "has_signal": plan.has_signal,
        "hot_pixels": plan.n_hot,
        "dead_pixels": plan.n_dead,
        "masked_pixels": dict(plan.masked),
        "background_per_frame": plan.background.tolist(),
        "drift_method": plan.drift_method,
        "reference_angle_index": plan.reference_angle,
        "warnings": list(plan.warnings),
        "geometry": plan.geometry.to_dict(),
    }
    if grid is not None:
        attrs["q_grid"] = grid.to_dict()
    attrs["peak"] = peak
    return xr.Dataset(data, coords=coords, attrs=attrs)


def _covered(ctx: Any, grid: BeamtimeGrid) -> da.Array:
    """The grid points inside the measured range (lazy, one chunk)."""
    n = grid.n
    return da.from_delayed(dask.delayed(_pick)(ctx, "covered"), shape=(n**3,), dtype=bool).reshape(
        n, n, n
    )


def _fitted_variables(data: dict[str, Any], fitted: da.Array) -> None:
    """The variables of ``peak = "gaussian"`` from the :data:`_FITTED` channels."""
    q_fit = fitted[..., :3]
    data["q_fit"] = (
        ("y", "x", "component"),
        q_fit,
        {"units": "1/Å", "frame": "sample", "long_name": "centre of the fitted 3D Gaussian"},
    )
    units = "counts"  # per voxel of the q grid
    for name, long_name, unit in (
        ("amplitude", "height of the fitted 3D Gaussian", units),
        ("background", "constant under the fitted 3D Gaussian", units),
        ("chi2", "Pearson χ² per degree of freedom of the fit", "1"),
    ):
        values = fitted[..., _FITTED.index(name)]
        data[f"peak_{name}"] = (("y", "x"), values, {"units": unit, "long_name": long_name})
