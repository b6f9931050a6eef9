"""Planning a particle's reduction from small arrays only, and the beamtime's common q grid.

:func:`plan_particle` decides everything the lazy reduction needs that small arrays of
``raw.zarr`` tell (detector projection, flagged pixels and the frame files' pixel mask recorded
at ingest, monitor, XRF, validity): the masked detector pixels and how they are filled, the
Bragg ROI, background, monitor normalisation and (from XRF) the scan drift. The
result, a :class:`ParticlePlan`, is immutable and holds no open store: it records where the
frames are and what of the raw store's provenance the reduction needs. :func:`beamtime_grid`
pools the plans' detector projections into the :class:`BeamtimeGrid` every particle's patterns
are resampled onto.

Detector pixels are masked, with their reason recorded (:attr:`ParticlePlan.masked`), when

* ``detector_mask``: the ``[reduce] detector_mask`` file marks them;
* ``mask_dataset``: the frame files' ``mask_dataset`` marks them in any angle's file (the
  masks of all angles are OR'd; a warning says when they differ);
* ``flagged``: they held the detector's invalid value (``[ingest] invalid_value``) in any frame
  of any angle. Ingest stores those values as 0 and records only how often a pixel held it per
  angle, so such a pixel is masked in every frame: a flag marks a defective pixel (the
  detector's own pixel mask), and a 0 that stood for a flag is never read as a measured 0;
* ``module_gaps``: they counted nothing over the whole beamtime and form the lines of module or
  chip gaps (:func:`~spndi_dask.reduce._kernels.module_gaps`);
* ``hot`` / ``dead``: found in the detector projection besides the above
  (:func:`~spndi_dask.reduce._kernels.bad_pixels`).

Inside the Bragg ROI masked pixels are filled from their unmasked neighbours (harmonic
interpolation, :func:`~spndi_dask.reduce._kernels.fill_operator`) before the moments and the
q-grid patterns, so a gap through the peak does not pull its centre of mass away from the gap.
Count-rate saturation is masked per voxel (one pixel in one frame: the same pixel counts
correctly in the frames where the flux is lower) and counted (see
:mod:`spndi_dask.reduce.maps`).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import xarray as xr
import zarr

from spndi_dask.config import Manifest, ScanSettings
from spndi_dask.geometry import Geometry, crystal_frame, q_sample
from spndi_dask.io.raw_store import open_raw
from spndi_dask.io.sources import SourceError, read_detector_image
from spndi_dask.reduce import _kernels as K
from spndi_dask.stages import StageError

#: A scan pixel is flagged 'filled' in `quality` when more than this fraction of its ROI
#: intensity was filled into masked detector pixels from their neighbours.
FILLED_FRACTION = 0.1

__all__ = ["BeamtimeGrid", "ParticlePlan", "ReduceError", "beamtime_grid", "plan_particle"]

logger = logging.getLogger(__name__)


class ReduceError(StageError, ValueError):
    """A problem that stops one particle's reduction; the message names the input and the fix."""


@dataclass(frozen=True, eq=False)
class ParticlePlan:
    """Everything the lazy reduction of one particle needs, decided from small arrays.

    Immutable (derive a changed plan with :func:`dataclasses.replace`) and free of open stores:
    the block tasks read the frames from ``frames_url`` themselves.
    """

    name: str
    frames_url: str  # the particle's frames array in raw.zarr
    frames_shape: tuple[int, ...]  # (angle, y, x, det_row, det_col)
    frames_dtype: np.dtype
    raw_layout: dict[str, Any] | None  # chunks and shards of the frames (raw store attrs)
    raw_sources: list[Any]  # provenance of the ingested files (raw store attrs)
    coords: dict[str, xr.DataArray]  # angle (deg), y and x (µm) of the raw store
    geometry: Geometry
    angles: np.ndarray
    roi: tuple[int, int, int, int]
    roi_at_edge: bool
    has_signal: bool
    bad: np.ndarray  # (det_row, det_col) bool: every masked pixel (see the module docstring)
    n_hot: int
    n_dead: int
    #: masked pixels per reason (see the module docstring), their total and those in the ROI
    masked: dict[str, int]
    #: fills the ROI's masked pixels from their neighbours (None: nothing masked in the ROI, or
    #: left at 0); see :func:`~spndi_dask.reduce._kernels.fill_operator`
    fill: Any
    dark: np.ndarray | None
    flat: np.ndarray | None
    saturation: float | None
    background: np.ndarray  # (angle,)
    scale: np.ndarray  # (angle, y, x): monitor normalisation, 0 where invalid
    drift: np.ndarray | None  # (angle, 2) or None before intensity registration
    drift_method: str
    reference_angle: int
    h_projection: np.ndarray  # mean q of the particle's detector projection
    cov_projection: np.ndarray  # its covariance (3, 3)
    weight_projection: float
    warnings: tuple[str, ...] = ()
    #: position in a run's order: every task of a lower rank runs first (see _raster_priority)
    rank: int = 0

    @property
    def roi_slices(self) -> tuple[slice, slice]:
        """Detector row and column slices of the ROI."""
        r0, r1, c0, c1 = self.roi
        return slice(r0, r1), slice(c0, c1)


def _detector_sum(raw: xr.Dataset, group: zarr.Group) -> np.ndarray:
    if "det_sum" in group:
        return np.asarray(group["det_sum"][...])
    logger.warning(
        "raw store of '%s' has no detector projection (ingested by an older version): reading "
        "all frames once to make it; re-ingest with `spndi ingest --force` to avoid this",
        raw.attrs.get("name", "?"),
    )
    return np.asarray(raw["frames"].data.sum(axis=(1, 2), dtype=np.float64).compute())


def _small(group: zarr.Group, name: str) -> np.ndarray:
    """A small array of a raw store, read straight from Zarr (no task graph)."""
    return np.asarray(group[name][...])


def _per_pixel(group: zarr.Group, name: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """A per-angle detector map of the raw store (zeros for a store written before it)."""
    if name in group:
        return _small(group, name)
    logger.warning(
        "the raw store of '%s' has no `%s` (ingested by an older version): its pixels are not "
        "masked for it; `spndi ingest --force` records it",
        group.attrs.get("particle", "?"),
        name,
    )
    return np.zeros(shape, dtype)


def _masked_pixels(
    group: zarr.Group,
    det_sum: np.ndarray,
    n_valid: np.ndarray,
    user: np.ndarray,
    dark: np.ndarray | None,
    hot_sigma: float,
) -> tuple[dict[str, np.ndarray], np.ndarray, list[str]]:
    """Every reason to mask a detector pixel (module docstring), as bool maps; the flagged counts
    ``(angle, row, col)``; warnings."""
    na, nr, nc = det_sum.shape
    flagged = _per_pixel(group, "flagged", (na, nr, nc), np.uint32)
    in_files = _per_pixel(group, "pixel_mask", (na, nr, nc), bool)
    measured = n_valid > 0
    warnings = []
    reasons = {
        "detector_mask": user,
        "mask_dataset": in_files.any(axis=0),
        "flagged": (flagged > 0).any(axis=0),
        "module_gaps": K.module_gaps(det_sum.sum(axis=0)),
    }
    differ = reasons["mask_dataset"] & ~in_files[measured].all(axis=0)
    if differ.any():
        warnings.append(
            f"the frame files' mask_dataset differs between angles: {int(differ.sum())} pixels "
            "are masked in some angle files only; they are masked at every angle (the masks "
            "are OR'd)"
        )
    every = (flagged[measured] >= n_valid[measured][:, None, None]).all(axis=0)
    transient = reasons["flagged"] & ~every
    if transient.any():
        warnings.append(
            f"{int(transient.sum())} detector pixels held the invalid value in some frames "
            "only; they are masked in every frame (a flagged pixel is never trusted); if the "
            "value stands for a count overflow there, not a bad pixel, set [ingest] "
            "invalid_value = 'none' to mask only those frames, as saturated"
        )
    known = np.logical_or.reduce(list(reasons.values()))
    reasons["hot"], reasons["dead"] = K.bad_pixels(
        det_sum - (dark * n_valid[:, None, None] if dark is not None else 0.0),
        masked=known,
        hot_sigma=hot_sigma,
    )
    return reasons, flagged, warnings


def plan_particle(manifest: Manifest, particle: ScanSettings) -> ParticlePlan:
    """Decide corrections, ROI, background, normalisation and (from XRF) drift of a particle.

    Reads only small arrays of ``raw.zarr`` (detector projection, monitor, XRF, validity) and
    the optional dark, flat and mask files.
    """
    settings = manifest.reduce
    raw = open_raw(manifest.output_dir, particle.name)
    name = particle.name
    geometry = manifest.geometry_for(particle)
    angles = np.asarray(raw["angle"].values, dtype=np.float64)
    na, ny, nx, nr, nc = raw["frames"].shape
    warnings: list[str] = []

    store = manifest.layout.raw_node(name)
    group = zarr.open_group(str(store), mode="r")
    det_sum = _detector_sum(raw, group)
    valid = _small(group, "valid")
    monitor = _small(group, "monitor")
    n_valid = valid.sum(axis=(1, 2)).astype(float)

    dark = None
    if particle.dark:
        dark = read_detector_image(
            manifest.resolve(particle.dark), what="dark", shape=(nr, nc), dataset=particle.dataset
        )
    flat = None
    if settings.flat:
        flat = read_detector_image(manifest.resolve(settings.flat), what="flat", shape=(nr, nc))
        if np.any(~np.isfinite(flat) | (flat <= 0)):
            raise ReduceError(
                f"flat field {settings.flat} has zero, negative or non-finite pixels; set them to "
                "1 and list them in [reduce] detector_mask"
            )
    user = np.zeros((nr, nc), bool)
    if settings.detector_mask:
        user = (
            read_detector_image(
                manifest.resolve(settings.detector_mask), what="detector mask", shape=(nr, nc)
            )
            != 0
        )

    per_frame = det_sum / np.maximum(n_valid, 1)[:, None, None]
    if dark is not None:
        per_frame = per_frame - dark
    reasons, flagged, found = _masked_pixels(
        group, det_sum, n_valid, user, dark, settings.hot_sigma
    )
    warnings.extend(found)
    hot, dead = reasons["hot"], reasons["dead"]
    bad = np.logical_or.reduce(list(reasons.values()))

    if settings.roi == "auto":
        roi, at_edge = K.find_roi(
            per_frame.sum(axis=0) * n_valid.mean(), bad, padding=settings.roi_padding
        )
    else:
        r0, r1, c0, c1 = settings.roi
        if r1 > nr or c1 > nc:
            raise ReduceError(
                f"scan '{name}': [reduce] roi = {list(settings.roi)} reaches beyond the "
                f"detector ({nr} × {nc}); use row_stop <= {nr} and col_stop <= {nc}"
            )
        roi, at_edge = (r0, r1, c0, c1), r0 == 0 or c0 == 0 or r1 == nr or c1 == nc
    has_signal = roi is not None
    dtype = raw["frames"].dtype
    if settings.saturation == "auto":
        saturation = float(np.iinfo(dtype).max) if dtype.kind in "ui" else None
    else:
        saturation = float(settings.saturation)
    if not has_signal:
        flag_value = raw.attrs.get("invalid_value")
        saturated_flags = (
            flagged if flag_value is not None and saturation and flag_value >= saturation else None
        )
        warnings.append(_no_signal(det_sum, n_valid, saturation, saturated_flags))
        cr, cc = (
            round(min(max(v, 0), s - 1))
            for v, s in zip(geometry.beam_center, (nr, nc), strict=True)
        )
        half = max(settings.roi_padding, 1)
        roi = (max(cr - half, 0), min(cr + half + 1, nr), max(cc - half, 0), min(cc + half + 1, nc))
    if at_edge and has_signal:
        warnings.append(
            f"the Bragg ROI {list(roi)} touches the detector edge: the peak may be cut off "
            "(flag 'roi_at_detector_edge' in `quality`)"
        )

    # background per pixel and frame: pixels outside the ROI (else the ROI's outer ring)
    r0, r1, c0, c1 = roi
    outside = ~bad.copy()
    outside[r0:r1, c0:c1] = False
    if outside.sum() < 16:
        outside = np.zeros_like(bad)
        outside[r0:r1, c0:c1] = True
        outside[r0 + 2 : r1 - 2, c0 + 2 : c1 - 2] = False
        outside &= ~bad
    flat_ = flat if flat is not None else np.ones((nr, nc))
    levels = (per_frame / flat_)[:, outside]
    if levels.shape[1]:
        cut = np.quantile(levels, 0.95, axis=1, keepdims=True)
        background = np.where(levels <= cut, levels, np.nan)
        background = np.nan_to_num(np.nanmean(background, axis=1))
    else:
        background = np.zeros(na)

    # points without flux (beam lost: monitor 0, negative or NaN) are masked, never divided by
    good = valid & np.isfinite(monitor) & (monitor > 0)
    lost = valid & ~good
    if lost.any():
        warnings.append(
            f"monitor is 0, negative or not finite at {int(lost.sum())} scan points (angles "
            f"{np.flatnonzero(lost.any(axis=(1, 2))).tolist()}): they are masked at those angles "
            "instead of divided by it (flag 'missing_angles' in `quality`)"
        )
    mean_monitor = float(monitor[good].mean()) if good.any() else 1.0
    scale = np.where(good, mean_monitor / np.where(good, monitor, 1.0), 0.0)
    missing = np.flatnonzero(n_valid < ny * nx).tolist()
    if missing:
        warnings.append(f"angles {missing} have missing scan points (flag 'missing_angles')")

    # masked pixels of the ROI: filled from their neighbours (moments, patterns, projection)
    fill = K.fill_operator(bad[r0:r1, c0:c1])
    masked = {k: int(v.sum()) for k, v in reasons.items()}
    masked["total"] = int(bad.sum())
    masked["in_roi"] = int(bad[r0:r1, c0:c1].sum())
    masked["filled_in_roi"] = (
        0 if fill is None else int((fill.getnnz(axis=1) > 0).sum() - (~bad[r0:r1, c0:c1]).sum())
    )
    traits = {
        k: int(reasons[k][r0:r1, c0:c1].sum()) for k in ("module_gaps", "flagged", "mask_dataset")
    }
    if has_signal and any(traits.values()):
        listed = ", ".join(f"{k.replace('_', ' ')} {n}" for k, n in traits.items() if n)
        left = masked["in_roi"] - masked["filled_in_roi"]
        warnings.append(
            f"{masked['in_roi']} masked detector pixels lie inside the Bragg ROI ({listed}): "
            f"{masked['filled_in_roi']} are filled from their neighbours before the moments"
            + (f", {left} inside wider masked areas are left out" if left else "")
            + " (flag 'filled' in `quality` where that is over "
            f"{int(100 * FILLED_FRACTION)}% of a pixel's intensity)"
        )

    # the particle's mean peak from the projection (origin of dq; pattern grid extent)
    rows, cols = np.arange(r0, r1), np.arange(c0, c1)
    q = q_sample(geometry, angles, rows=rows, cols=cols)
    wproj = per_frame[:, r0:r1, c0:c1] / flat_[r0:r1, c0:c1] - background[:, None, None]
    wproj = np.where(bad[r0:r1, c0:c1], 0.0, wproj) * n_valid[:, None, None]
    if fill is not None:
        wproj = (fill @ wproj.reshape(na, -1).T).T.reshape(wproj.shape)
    total = float(wproj.sum())
    if total > 0 and has_signal:
        h = np.einsum("arc,arci->i", wproj, q) / total
        d = q - h
        cov = np.einsum("arc,arci,arcj->ij", wproj, d, d) / total
    else:
        h = q[na // 2, (r1 - r0) // 2, (c1 - c0) // 2]
        cov = np.zeros((3, 3))
        total = 0.0

    if has_signal and total > 0:
        curve = wproj.sum(axis=(1, 2))[np.argsort(angles)]
        top = int(np.argmax(curve))
        if top in (0, na - 1):
            warnings.append(
                f"the particle's rocking curve peaks at the {'first' if top == 0 else 'last'} "
                f"angle ({np.sort(angles)[top]:.4f}°): the Bragg peak is at or outside the "
                "rocking range, so q and strain are biased (flag 'peak_at_range_edge')"
            )
    method = settings.registration
    xrf = _small(group, "xrf")
    has_xrf = bool(np.isfinite(xrf).any())
    if method == "auto":
        method = "xrf" if has_xrf else "intensity"
    if method == "xrf" and not has_xrf:
        raise ReduceError(
            f"scan '{name}': [reduce] registration = 'xrf' but no XRF was recorded; set "
            f"`xrf` for the particle in the manifest or use registration = 'intensity'"
        )
    frames = raw["frames"]
    plan = ParticlePlan(
        name=name,
        frames_url=str(store / "frames"),
        frames_shape=tuple(frames.shape),
        frames_dtype=frames.dtype,
        raw_layout=raw.attrs.get("layout"),
        raw_sources=raw.attrs.get("sources", []),
        coords={k: raw[k] for k in ("angle", "y", "x")},
        geometry=geometry,
        angles=angles,
        roi=roi,
        roi_at_edge=bool(at_edge and has_signal),
        has_signal=has_signal,
        bad=bad,
        n_hot=int(hot.sum()),
        n_dead=int(dead.sum()),
        masked=masked,
        fill=fill,
        dark=dark,
        flat=flat,
        saturation=saturation,
        background=background,
        scale=scale,
        drift=np.zeros((na, 2)) if method == "none" else None,
        drift_method=method,
        reference_angle=na // 2,
        h_projection=h,
        cov_projection=cov,
        weight_projection=total,
        warnings=tuple(warnings),
    )
    if method == "xrf":
        images = np.where(good, xrf * scale, np.nan)
        plan = _checked_drift(
            plan,
            K.register_to_reference(
                images, reference=plan.reference_angle, upsample=settings.registration_upsample
            ),
        )
    for w in plan.warnings:
        logger.warning("scan '%s': %s", name, w)
    return plan


def _no_signal(
    det_sum: np.ndarray,
    n_valid: np.ndarray,
    saturation: float | None,
    flagged: np.ndarray | None = None,
) -> str:
    """Why no Bragg ROI was found: saturated frames (say so, with the fix), else no signal.

    A pixel is saturated when its mean over the frames of every angle with scan points is at or
    above ``saturation``, i.e. it is saturated in every frame (``det_sum`` sums the frames), or
    when it held the invalid value in every frame and that value is at or above ``saturation``
    (``flagged`` given: ingest stored it as 0; the detector's maximum reads as both).
    """
    no_signal = (
        "no Bragg signal found on the detector (all maps NaN, `valid` false): check that the "
        "rocking range covers the peak and that the frames are not empty"
    )
    measured = n_valid > 0
    if saturation is None or not measured.any():
        return no_signal
    mean = det_sum[measured] / n_valid[measured][:, None, None]
    at_top = mean >= saturation
    if flagged is not None:
        at_top |= flagged[measured] >= n_valid[measured][:, None, None]
    n_saturated = int(at_top.all(axis=0).sum())
    total = int(mean[0].size)
    if n_saturated * 2 >= total:
        return (
            f"the frames are saturated, not empty: {n_saturated} of {total} detector pixels are "
            f"at or above the saturation level {saturation:g} counts in every frame, so no "
            "Bragg peak stands out (all maps NaN, `valid` false); measure with less flux "
            "(attenuators, shorter count time), or set [reduce] saturation if "
            f"{saturation:g} is not the detector's saturation level"
        )
    if n_saturated:
        return f"{no_signal} ({n_saturated} detector pixels are saturated in every frame)"
    return no_signal


def _checked_drift(plan: ParticlePlan, drift: np.ndarray) -> ParticlePlan:
    """The plan with ``drift`` limited to a quarter of the scan (larger means registration
    failed; warned)."""
    ny, nx = plan.scale.shape[1:]
    limit = np.array([max(ny // 4, 1), max(nx // 4, 1)], dtype=float)
    warnings = plan.warnings
    if np.any(np.abs(drift) > limit):
        msg = (
            f"registration ({plan.drift_method}) gave drifts up to "
            f"{np.abs(drift).max(axis=0).round(2).tolist()} scan pixels, more than a quarter of "
            "the scan: clipped; check the maps or set [reduce] registration"
        )
        warnings = (*warnings, msg)
        logger.warning("scan '%s': %s", plan.name, msg)
    return dataclasses.replace(plan, drift=np.clip(drift, -limit, limit), warnings=warnings)


@dataclass(frozen=True)
class BeamtimeGrid:
    """The common crystal-frame q grid of a beamtime (all particles' patterns share it).

    Examples
    --------
    >>> g = BeamtimeGrid(h=np.array([0.0, 0.0, 2.0]), axes=np.eye(3), extent=np.full(3, 0.5), n=2)
    >>> g.offsets[0].tolist(), g.points().shape
    ([-0.25, 0.25], (8, 3))
    >>> BeamtimeGrid.from_dict(g.to_dict()).to_dict() == g.to_dict()
    True
    """

    h: np.ndarray  # reference vector (sample frame), the grid centre
    axes: np.ndarray  # rows x̂_c, ŷ_c, ẑ_c
    extent: np.ndarray  # half-widths along the axes (1/Å)
    n: int

    @property
    def offsets(self) -> list[np.ndarray]:
        """Cell-centred grid coordinates along x̂_c, ŷ_c, ẑ_c (offsets from ``h``, 1/Å)."""
        return [(np.arange(self.n) + 0.5) / self.n * 2 * e - e for e in self.extent]

    def points(self) -> np.ndarray:
        """Sample-frame q of every grid point, ``(n³, 3)`` in (x, y, z) C order."""
        ox, oy, oz = np.meshgrid(*self.offsets, indexing="ij")
        off = np.stack([ox, oy, oz], -1).reshape(-1, 3)
        return self.h + off @ self.axes

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BeamtimeGrid:
        """The grid :meth:`to_dict` describes."""
        return cls(
            h=np.asarray(d["h"]),
            axes=np.asarray(d["axes"]),
            extent=np.asarray(d["extent"]),
            n=d["n"],
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description (stored in attrs)."""
        return {
            "h": self.h.tolist(),
            "axes": self.axes.tolist(),
            "extent": self.extent.tolist(),
            "n": self.n,
        }


def beamtime_grid(manifest: Manifest, plans: list[ParticlePlan]) -> BeamtimeGrid:
    """Common q grid: centred on the beamtime's mean peak, ``pattern_extent_sigma`` wide.

    The mean peak is the intensity-weighted pool of every particle's detector projection; its
    covariance about the pooled centre (widths and the spread of peak positions together) sets
    the half-widths along the crystal axes unless ``[reduce] pattern_extent`` fixes them.
    """
    settings = manifest.reduce
    lit = [p for p in plans if p.weight_projection > 0] or plans
    weights = np.array([max(p.weight_projection, 1e-30) for p in lit])
    h = np.average([p.h_projection for p in lit], axis=0, weights=weights)
    cov = (
        sum(
            w * (p.cov_projection + np.outer(p.h_projection - h, p.h_projection - h))
            for w, p in zip(weights, lit, strict=True)
        )
        / weights.sum()
    )
    frame = crystal_frame(h, lit[0].geometry.rocking_axis)
    axes = frame.matrix
    if settings.pattern_extent == "auto":
        sigma = np.sqrt(np.maximum(np.einsum("ki,ij,kj->k", axes, cov, axes), 0.0))
        if not np.all(sigma > 0):
            sigma = np.full(3, 1e-3 * np.linalg.norm(h))
        extent = settings.pattern_extent_sigma * sigma
    else:
        extent = np.asarray(settings.pattern_extent, dtype=float)
    return BeamtimeGrid(h=h, axes=axes, extent=extent, n=settings.pattern_grid)


def _other_plans(manifest: Manifest, plans: dict[str, ParticlePlan]) -> list[ParticlePlan]:
    """Plans of the manifest's particles not in ``plans`` that can be planned (for the grid)."""
    out = []
    for p in manifest.scans:
        if p.name in plans:
            continue
        try:
            out.append(plan_particle(manifest, p))
        except (ReduceError, SourceError, OSError, RuntimeError, KeyError) as exc:
            logger.debug("scan '%s' left out of the q grid: %s", p.name, exc)
    return out
