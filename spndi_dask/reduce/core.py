"""Lazy reduction of ``raw.zarr`` into maps, rocking curves and q-grid patterns.

Per particle, :func:`plan_particle` decides everything that needs only small arrays (detector
projection recorded at ingest, monitor, XRF): hot/dead pixels, the Bragg ROI, background,
monitor normalisation and the scan drift. :func:`reduce_particle` then builds one lazy graph
that reads every ROI voxel once, in blocks of ``(all angles, scan tile, ROI)``, and produces

* per (angle, y, x) the additive moment sums of :data:`~spndi_dask.reduce._kernels.MOMENTS`
  (intensity, Σw·q, Σw·q·qᵀ, detector centre of mass), from which the per-angle maps are
  brought back to the reference scan grid (drift) and summed over angles;
* per (y, x) the drift-corrected 3D pattern resampled onto the beamtime's common crystal-frame
  q grid by a precomputed sparse trilinear operator. The sub-pixel drift shifts need a halo of
  scan points around each block: it comes from packed strips of the neighbouring tiles, never
  from another read, and the tiles are scheduled in raster order so a worker's memory does not
  grow with the scan (see :func:`_block_graph`).

Nothing is computed until :func:`reduce` writes ``<output>/results.zarr/<particle>``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import xarray as xr
import zarr
from dask.highlevelgraph import HighLevelGraph, MaterializedLayer
from numcodecs import Blosc
from zarr.codecs import BloscCodec

from spndi_dask._version import __version__
from spndi_dask.compute import compute_as_completed, compute_each
from spndi_dask.config import Manifest, ParticleSettings
from spndi_dask.geometry import Geometry, crystal_frame, q_sample, strain_tilt
from spndi_dask.io.raw_store import open_raw, raw_path
from spndi_dask.io.shards import region_reader
from spndi_dask.io.sources import SourceError, read_detector_image
from spndi_dask.reduce import _fused as F
from spndi_dask.reduce import _kernels as K

__all__ = [
    "MAP_VARIABLES",
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

logger = logging.getLogger(__name__)

#: Per-pixel map variables written by reduce, with units.
MAP_VARIABLES = {
    "intensity": "counts (monitor-normalised, background-subtracted, ROI-integrated)",
    "d_spacing": "Å",
    "strain": "1",
    "tilt_x": "rad",
    "tilt_y": "rad",
    "width_x": "1/Å",
    "width_y": "1/Å",
    "width_z": "1/Å",
    "peak_angle": "deg",
    "det_row_com": "detector pixel",
    "det_col_com": "detector pixel",
}
#: Scan rows of the patterns per dask task when results are opened (stored one row per chunk).
PATTERN_ROWS = 16
#: Bits of the ``quality`` map.
QUALITY = {"no_signal": 1, "peak_at_range_edge": 2, "missing_angles": 4, "roi_at_detector_edge": 8}


class ReduceError(ValueError):
    """A problem that stops one particle's reduction; the message names the input and the fix."""


def results_path(output_dir: str | Path) -> Path:
    """``<output>/results.zarr``."""
    return Path(output_dir) / "results.zarr"


# -- planning (small arrays only) -------------------------------------------------------------
@dataclass
class ParticlePlan:
    """Everything the lazy reduction of one particle needs, decided from small arrays."""

    name: str
    raw: xr.Dataset
    frames_url: str
    geometry: Geometry
    angles: np.ndarray
    roi: tuple[int, int, int, int]
    roi_at_edge: bool
    has_signal: bool
    bad: np.ndarray  # (det_row, det_col) bool: hot | dead | user mask
    n_hot: int
    n_dead: int
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
    warnings: list[str] = field(default_factory=list)
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


def plan_particle(manifest: Manifest, particle: ParticleSettings) -> ParticlePlan:
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

    store = raw_path(manifest.output_dir) / name
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
    hot, dead = K.bad_pixels(
        det_sum - (dark * n_valid[:, None, None] if dark is not None else 0.0),
        hot_sigma=settings.hot_sigma,
    )
    bad = hot | dead | user

    if settings.roi == "auto":
        roi, at_edge = K.find_roi(
            per_frame.sum(axis=0) * n_valid.mean(), bad, padding=settings.roi_padding
        )
    else:
        r0, r1, c0, c1 = settings.roi
        if r1 > nr or c1 > nc:
            raise ReduceError(
                f"particle '{name}': [reduce] roi = {list(settings.roi)} reaches beyond the "
                f"detector ({nr} × {nc}); use row_stop <= {nr} and col_stop <= {nc}"
            )
        roi, at_edge = (r0, r1, c0, c1), r0 == 0 or c0 == 0 or r1 == nr or c1 == nc
    has_signal = roi is not None
    if not has_signal:
        warnings.append(
            "no Bragg signal found on the detector (all maps NaN, `valid` false): check that the "
            "rocking range covers the peak and that the frames are not empty"
        )
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
    dtype = raw["frames"].dtype
    if settings.saturation == "auto":
        saturation = float(np.iinfo(dtype).max) if dtype.kind in "ui" else None
    else:
        saturation = float(settings.saturation)

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

    good = valid & np.isfinite(monitor) & (monitor > 0)
    mean_monitor = float(monitor[good].mean()) if good.any() else 1.0
    scale = np.where(good, mean_monitor / np.where(good, monitor, 1.0), 0.0)
    missing = np.flatnonzero(n_valid < ny * nx).tolist()
    if missing:
        warnings.append(f"angles {missing} have missing scan points (flag 'missing_angles')")

    # the particle's mean peak from the projection (origin of dq; pattern grid extent)
    rows, cols = np.arange(r0, r1), np.arange(c0, c1)
    q = q_sample(geometry, angles, rows=rows, cols=cols)
    wproj = per_frame[:, r0:r1, c0:c1] / flat_[r0:r1, c0:c1] - background[:, None, None]
    wproj = np.where(bad[r0:r1, c0:c1], 0.0, wproj) * n_valid[:, None, None]
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
    plan = ParticlePlan(
        name=name,
        raw=raw,
        frames_url=str(store / "frames"),
        geometry=geometry,
        angles=angles,
        roi=roi,
        roi_at_edge=bool(at_edge and has_signal),
        has_signal=has_signal,
        bad=bad,
        n_hot=int(hot.sum()),
        n_dead=int(dead.sum()),
        dark=dark,
        flat=flat,
        saturation=saturation,
        background=background,
        scale=scale,
        drift=None,
        drift_method="none",
        reference_angle=na // 2,
        h_projection=h,
        cov_projection=cov,
        weight_projection=total,
        warnings=warnings,
    )
    method = settings.registration
    xrf = _small(group, "xrf")
    has_xrf = bool(np.isfinite(xrf).any())
    if method == "auto":
        method = "xrf" if has_xrf else "intensity"
    if method == "xrf" and not has_xrf:
        raise ReduceError(
            f"particle '{name}': [reduce] registration = 'xrf' but no XRF was recorded; set "
            f"`xrf` for the particle in the manifest or use registration = 'intensity'"
        )
    plan.drift_method = method
    if method == "xrf":
        images = np.where(good, xrf * scale, np.nan)
        plan.drift = _checked_drift(
            plan,
            K.register_to_reference(
                images, reference=plan.reference_angle, upsample=settings.registration_upsample
            ),
        )
    elif method == "none":
        plan.drift = np.zeros((na, 2))
    for w in warnings:
        logger.warning("particle '%s': %s", name, w)
    return plan


def _checked_drift(plan: ParticlePlan, drift: np.ndarray) -> np.ndarray:
    """Drift limited to a quarter of the scan (larger means registration failed), warned."""
    ny, nx = plan.scale.shape[1:]
    limit = np.array([max(ny // 4, 1), max(nx // 4, 1)], dtype=float)
    if np.any(np.abs(drift) > limit):
        msg = (
            f"registration ({plan.drift_method}) gave drifts up to "
            f"{np.abs(drift).max(axis=0).round(2).tolist()} scan pixels, more than a quarter of "
            "the scan: clipped; check the maps or set [reduce] registration"
        )
        plan.warnings.append(msg)
        logger.warning("particle '%s': %s", plan.name, msg)
    return np.clip(drift, -limit, limit)


@dataclass(frozen=True)
class BeamtimeGrid:
    """The common crystal-frame q grid of a beamtime (all particles' patterns share it)."""

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


# -- the lazy graph ---------------------------------------------------------------------------
class _ROIReader:
    """Array-like view of the ROI of a raw frames array (reads only the tiles it touches).

    ``direct``: read the shards with :class:`~spndi_dask.io.shards.ShardReader` where the layout
    allows (the same bytes, 2-4x less CPU than zarr's codec pipeline); else through zarr.
    """

    def __init__(
        self,
        url: str,
        roi: tuple[int, int, int, int],
        shape: tuple[int, ...],
        dtype: Any,
        *,
        direct: bool = True,
    ):
        self.url, self.roi, self.direct = url, roi, direct
        self.shape = (*shape[:3], roi[1] - roi[0], roi[3] - roi[2])
        self.dtype = np.dtype(dtype)
        self.ndim = 5
        self._array = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_array": None}

    def __getitem__(self, key: tuple[slice, ...]) -> np.ndarray:
        if self._array is None:
            array = zarr.open_array(self.url, mode="r")
            self._array = region_reader(array) if self.direct else array
        a, y, x, r, c = key
        r0, c0 = self.roi[0], self.roi[2]
        r = slice((r.start or 0) + r0, (r.stop if r.stop is not None else self.shape[3]) + r0)
        c = slice((c.start or 0) + c0, (c.stop if c.stop is not None else self.shape[4]) + c0)
        return self._array[a, y, x, r, c]


def _tiles(n: int, shard: int, halo: int, *, last: int) -> tuple[int, ...]:
    """Scan tiles along one axis: whole raw shards, at least ``2·halo`` points each (the strips
    a neighbouring block takes from a tile lie inside it); a last tile shorter than ``last``
    (or 1) joins the one before."""
    tile = shard * max(1, -(-2 * halo // shard))
    chunks = [tile] * (n // tile)
    rest = n - tile * len(chunks)
    if rest:
        if chunks and rest < max(last, 1):
            chunks[-1] += rest
        else:
            chunks.append(rest)
    return tuple(chunks) or (n,)


def _core_rows(tiles: tuple[int, ...], halo: int) -> tuple[int, ...]:
    """Rows of the output blocks: tile rows moved up by ``halo`` (see :func:`_block_graph`)."""
    if not halo or len(tiles) == 1:
        return tiles
    return (tiles[0] - halo, *tiles[1:-1], tiles[-1] + halo)


def roi_frames(plan: ParticlePlan, *, halo: int = 0, direct: bool = True) -> da.Array:
    """The ROI of a particle's frames as a dask array chunked ``(angle, tile, tile, roi)``.

    ``direct=False`` reads through zarr's codec pipeline instead of
    :class:`~spndi_dask.io.shards.ShardReader` (same values; for comparison).
    """
    frames = plan.raw["frames"].data
    url = plan.frames_url
    shards = plan.raw.attrs.get("layout", {}).get("shards") or [1, 16, 16]
    reader = _ROIReader(url, plan.roi, frames.shape, frames.dtype, direct=direct)
    na, ny, nx = frames.shape[:3]
    chunks = (
        (na,),
        # a last row of tiles gives no strips; a last column gives `halo` columns to its left
        _tiles(ny, int(shards[1]), halo, last=1),
        _tiles(nx, int(shards[2]), halo, last=halo),
        (reader.shape[3],),
        (reader.shape[4],),
    )
    token = dask.base.tokenize(url, plan.roi, chunks, plan.raw.attrs.get("sources"), direct)
    with dask.annotate(priority=_raster_priority(len(chunks[2]), plan.rank)):
        return da.from_array(
            reader, chunks=chunks, lock=False, fancy=False, name=f"raw-roi-{plan.name}-{token}"
        )


#: Low-level task fusion renames tasks and drops their priority annotations (_raster_priority).
_KEEP_PRIORITIES = {"optimization.fuse.active": False}


#: Priority step between particles of one run (more than twice the tiles of any scan).
_RANK_STEP = 2**24


def _raster_priority(n_cols: int, rank: int = 0) -> Any:
    """Scheduling priority of the tasks of a particle's tiles: in raster order of the tiles.

    Tile ``k = i·n_cols + j`` is read at priority −2k, its strips copied right after it (−2k + 1),
    and its block runs once the tile to its right is read (−2k − 3), before the next read: a
    worker holds about two tiles and a row of strips. Without it, the graph's own order read
    tiles from anywhere in the scan and held up to 8 per worker waiting for their neighbours.
    A particle of ``rank`` r is shifted below every tile of ranks < r: user priorities outrank
    the order of submission, so the first tiles of each particle of a run would otherwise all be
    read first, each held until its neighbour is read (memory growing with the particles).
    Needs low-level fusion off (``_KEEP_PRIORITIES``: fusion drops annotations) where the graph
    is optimised and computed.
    """
    base = -rank * _RANK_STEP

    def priority(key: Any) -> int:
        if not isinstance(key, tuple) or len(key) < 3:
            return 0
        name = str(key[0])
        if name.startswith("raw-roi-"):
            return base - 2 * (key[2] * n_cols + key[3])
        k = key[1] * n_cols + key[2]
        if name.startswith("reduce-strip"):
            return base - 2 * k + 1
        if name.startswith("reduce-block-"):
            return base - 2 * k - 3
        return 0

    return priority


def _context(plan: ParticlePlan, grid: BeamtimeGrid | None) -> dict[str, Any]:
    """Per-particle constants of the block tasks (shipped to each worker once)."""
    r, c = plan.roi_slices
    rows, cols = np.arange(r.start, r.stop), np.arange(c.start, c.stop)
    q = q_sample(plan.geometry, plan.angles, rows=rows, cols=cols)
    offset, gain = F.correction_tables(
        (len(rows), len(cols)),
        dark=None if plan.dark is None else plan.dark[r, c],
        flat=None if plan.flat is None else plan.flat[r, c],
        bad=plan.bad[r, c],
    )
    ctx: dict[str, Any] = {
        "features": K.moment_features(q - plan.h_projection, rows, cols),
        "offset": offset,
        "gain": gain,
        "background": plan.background,
        "saturation": plan.saturation,
        "scale": plan.scale.astype(np.float32),
    }
    if grid is not None:
        op, covered = K.grid_operator(plan.geometry, plan.angles, plan.roi, grid.points())
        ctx["operator"], ctx["voxels"] = K.used_voxels(op, len(plan.angles))
        ctx["covered"], ctx["n"] = covered, grid.n
    return ctx


def _lazy_context(plan: ParticlePlan, grid: BeamtimeGrid | None) -> Any:
    """:func:`_context` as a task (made on a worker, not in the client nor in the graph)."""
    light = dataclasses.replace(plan, raw=None, warnings=[])
    token = dask.base.tokenize(
        plan.name,
        plan.roi,
        plan.geometry.to_dict(),
        plan.angles,
        plan.bad,
        plan.dark,
        plan.flat,
        plan.background,
        plan.scale,
        plan.saturation,
        plan.h_projection,
        grid.to_dict() if grid else None,
    )
    return dask.delayed(_context, pure=True)(
        light, grid, dask_key_name=f"reduce-ctx-{plan.name}-{token}"
    )


def _padded(a: np.ndarray, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """``a[:, y0:y1, x0:x1]`` with zeros where the range leaves the array."""
    out = np.zeros((a.shape[0], y1 - y0, x1 - x0), a.dtype)
    sy0, sy1, sx0, sx1 = max(y0, 0), min(y1, a.shape[1]), max(x0, 0), min(x1, a.shape[2])
    out[:, sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = a[:, sy0:sy1, sx0:sx1]
    return out


#: Codec of the strips passed between blocks: plain lz4 packs a strip of raw counts (mostly
#: zeros) about 14× in 4 ms per 24 MB and unpacks it in 2.5 ms (bit-shuffled: 25×, 9 and 9.5 ms),
#: so a row of strips waiting for the next row of tiles, and their transfers, cost little.
_STRIP_CODEC = Blosc(cname="lz4", clevel=1, shuffle=Blosc.NOSHUFFLE)


class _Packed:
    """A compressed array (part of a raw tile) that unpacks itself."""

    def __init__(self, array: np.ndarray):
        self.shape, self.dtype = array.shape, array.dtype
        self.data = _STRIP_CODEC.encode(np.ascontiguousarray(array))

    def __sizeof__(self) -> int:
        return len(self.data) + 200

    def unpack(self) -> np.ndarray:
        out = np.empty(self.shape, self.dtype)
        _STRIP_CODEC.decode(self.data, out=out)
        return out


def _strip(tile: np.ndarray, rows: slice, cols: slice) -> _Packed:
    """Part of a raw tile, packed (the tile itself can then be freed)."""
    return _Packed(tile[:, rows, cols])


def _block_task(
    tile: np.ndarray,
    strips: list[_Packed | None],
    ctx: dict[str, Any],
    drift: Any,
    halo: int,
    bounds: tuple[int, int, int, int, bool, bool],
) -> tuple[np.ndarray, np.ndarray | None]:
    """Moments and (with a q grid) patterns of one output block (see :func:`_block_graph`).

    ``tile`` holds scan rows ``y0:y1`` and columns ``x0:x1``; ``strips`` (top-left, top,
    top-right, left, right; None outside the scan) are the parts of the neighbouring tiles
    the drift shift reaches. The block's output rows are ``y0 − halo : y1 − halo`` (from 0 in
    the first row of tiles, to the end in the last).
    """
    y0, y1, x0, x1, first, last = bounds
    top = (halo if first else 2 * halo) if halo else 0
    bottom = halo if last else 0
    tl, t, tr, left, right = (None if p is None else p.unpack() for p in strips)
    mosaic = F.Mosaic.from_grid(
        [[tl, t, tr], [left, tile, right], [None, None, None]],
        [top, y1 - y0, bottom],
        [halo, x1 - x0, halo],
    )
    scale = _padded(ctx["scale"], y0 - top, y1 + bottom, x0 - halo, x1 + halo)
    moments, patterns = F.block_reduce(
        mosaic,
        scale,
        drift,
        offset=ctx["offset"],
        gain=ctx["gain"],
        background=ctx["background"],
        saturation=ctx["saturation"],
        features=ctx["features"],
        operator=ctx.get("operator"),
        voxels=ctx.get("voxels"),
        halo=halo,
    )
    if patterns is None:
        return moments, None
    n, (ty, tx) = ctx["n"], moments.shape[1:3]
    return moments, patterns.reshape(ty, tx, n, n, n)


def _pick(blocks: tuple[np.ndarray, ...], index: int) -> np.ndarray:
    return blocks[index]


def _block_graph(
    plan: ParticlePlan, ctx: Any, grid: BeamtimeGrid | None
) -> tuple[da.Array, da.Array | None]:
    """Lazy per-angle moment sums and (with a grid) drift-corrected patterns of a particle.

    One task per scan tile reads the tile's ROI voxels (once); one task per output block makes
    both outputs from the tile and, for the drift shift, copied strips of the neighbouring
    tiles (``halo`` scan points: the largest drift). The output blocks are the tiles moved up
    by ``halo`` rows, so a block needs only strips of the row of tiles above it (2·halo rows)
    and the ``halo`` columns beside it: no tile is kept waiting for another row of tiles to be
    read, which keeps the memory of a worker independent of the scan's size.
    """
    halo = 0
    if grid is not None and plan.drift is not None and len(plan.drift):
        halo = int(np.ceil(np.abs(plan.drift).max()))
    frames = roi_frames(plan, halo=halo)
    na = frames.shape[0]
    ytiles, xtiles = frames.chunks[1], frames.chunks[2]
    ys, xs = np.cumsum([0, *ytiles]).tolist(), np.cumsum([0, *xtiles]).tolist()
    my, mx = len(ytiles), len(xtiles)
    token = dask.base.tokenize(frames.name, ctx.key, plan.drift, halo)
    bname = f"reduce-block-{plan.name}-{token}"
    dsk: dict[Any, Any] = {}
    everything, bottom = slice(None), slice(-2 * halo, None)
    parts = {
        "b": (bottom, everything),
        "br": (bottom, slice(-halo, None)),
        "bl": (bottom, slice(0, halo)),
        "r": (everything, slice(-halo, None)),
        "l": (everything, slice(0, halo)),
    }

    def strip(kind: str, i: int, j: int) -> Any:
        if not halo or not (0 <= i < my and 0 <= j < mx):
            return None
        key = (f"reduce-strip{kind}-{plan.name}-{token}", i, j)
        if key not in dsk:
            dsk[key] = (_strip, (frames.name, 0, i, j, 0, 0), *parts[kind])
        return key

    for i in range(my):
        for j in range(mx):
            strips = (
                strip("br", i - 1, j - 1),
                strip("b", i - 1, j),
                strip("bl", i - 1, j + 1),
                strip("r", i, j - 1),
                strip("l", i, j + 1),
            )
            bounds = (ys[i], ys[i + 1], xs[j], xs[j + 1], i == 0, i == my - 1)
            dsk[(bname, i, j)] = (
                _block_task,
                (frames.name, 0, i, j, 0, 0),
                list(strips),
                ctx.key,
                plan.drift,
                halo,
                bounds,
            )
    with dask.annotate(priority=_raster_priority(mx, plan.rank)):
        blocks = HighLevelGraph.from_collections(bname, dsk, dependencies=[frames, ctx])

    def picked(index: int, kind: str, chunks: tuple, dtype: Any, lead: int) -> da.Array:
        """Output ``index`` of every block: an array whose scan axes follow ``lead`` others."""
        name = f"reduce-{kind}-{plan.name}-{token}"
        trail = len(chunks) - lead - 2
        layer = {
            (name, *[0] * lead, i, j, *[0] * trail): (_pick, (bname, i, j), index)
            for i in range(my)
            for j in range(mx)
        }
        graph = HighLevelGraph(
            {**blocks.layers, name: MaterializedLayer(layer)},
            {**blocks.dependencies, name: {bname}},
        )
        return da.Array(graph, name, chunks=chunks, dtype=dtype)

    rows = _core_rows(ytiles, halo)
    moments = picked(0, "moments", ((na,), rows, xtiles, (len(K.MOMENTS),)), np.float64, 1)
    if grid is None:
        return moments, None
    n = grid.n
    patterns = picked(1, "patterns", (rows, xtiles, (n,), (n,), (n,)), np.float32, 0)
    return moments, patterns


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
) -> np.ndarray:
    """All per-pixel outputs from the per-angle moments (NumPy; one small block per particle).

    Returns ``(ny, nx, n_angle + 16)``: rocking curve, then :data:`_FINISHED` channels.
    """
    per_angle = K.shift_maps(moments, drift)
    curves = per_angle[..., 0]
    summed = per_angle.sum(axis=0)
    # the frame for the widths: the particle's mean q
    s = summed[..., 0]
    lit = (s > 0) & (s > min_snr * np.sqrt(np.maximum(summed[..., 12], 0)))
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
    order = np.argsort(angles)
    peak = K.parabolic_peak(curves[order], angles[order])
    quality = np.where(valid, 0, QUALITY["no_signal"]) | flags
    edge = valid & ((peak <= angles.min()) | (peak >= angles.max()))
    quality = quality | np.where(edge, QUALITY["peak_at_range_edge"], 0)
    quality = quality | np.where(missing, QUALITY["missing_angles"], 0)
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
        maps["q_com"][..., 0],
        maps["q_com"][..., 1],
        maps["q_com"][..., 2],
        valid.astype(float),
        quality.astype(float),
    ]
    out = np.concatenate([np.moveaxis(curves, 0, -1), np.stack(chans, -1)], axis=-1)
    out[nan, len(angles) : len(angles) + 14] = np.nan
    return out, h


_FINISHED = (*MAP_VARIABLES, "q_x", "q_y", "q_z", "valid", "quality")


def reduce_particle(
    plan: ParticlePlan,
    grid: BeamtimeGrid | None,
    *,
    min_snr: float = 5.0,
    reference: np.ndarray | None = None,
    d0: float | None = None,
) -> xr.Dataset:
    """The lazy reduce results of one particle (nothing is computed).

    Parameters
    ----------
    plan : ParticlePlan
        From :func:`plan_particle`, with ``drift`` set.
    grid : BeamtimeGrid or None
        Common q grid for the patterns; None skips them.
    min_snr : float
        Validity threshold (see :func:`~spndi_dask.reduce._kernels.maps_from_moments`).
    reference : array (3,), optional
        Reference vector for strain and tilt; default the particle's mean q.
    d0 : float, optional
        Reference d-spacing (Å): ``|h| = 2π/d0`` along the reference direction.

    Returns
    -------
    xarray.Dataset
        Variables of the reduce stage (DESIGN.md results contract), dask-backed.
    """
    if plan.drift is None:
        raise ReduceError(f"particle '{plan.name}': the drift is not known yet")
    ctx = _lazy_context(plan, grid)
    moments, patterns = _block_graph(plan, ctx, grid)
    na, ny, nx = moments.shape[:3]
    small = moments.rechunk((na, ny, nx, len(K.MOMENTS)))
    missing = (plan.scale == 0).any(axis=0)
    flags = QUALITY["roi_at_detector_edge"] if plan.roi_at_edge else 0
    drift, h_ref, angles = plan.drift, plan.h_projection, plan.angles
    rocking_axis = plan.geometry.rocking_axis

    def finish(block: np.ndarray, part: int = 0) -> np.ndarray:
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
        )
        return result[part]

    finished = small.map_blocks(
        finish,
        drop_axis=[0, 3],
        new_axis=[2],
        chunks=((ny,), (nx,), (na + len(_FINISHED),)),
        dtype=np.float64,
        meta=np.empty((0, 0, 0), np.float64),
    )
    raw = plan.raw
    coords = {"angle": raw["angle"], "y": raw["y"], "x": raw["x"]}
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
            data[var] = (("y", "x"), values, {"units": MAP_VARIABLES[var]})
    q_com = da.stack([finished[..., na + _FINISHED.index(c)] for c in ("q_x", "q_y", "q_z")], -1)
    data["q_com"] = (("y", "x", "component"), q_com, {"units": "1/Å", "frame": "sample"})
    data["drift"] = (
        ("angle", "axis"),
        plan.drift,
        {
            "units": "scan pixels",
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
        n = grid.n
        covered = da.from_delayed(
            dask.delayed(_pick)(ctx, "covered"), shape=(n**3,), dtype=bool
        ).reshape(n, n, n)
        dims = ("y", "x", "dq_x", "dq_y", "dq_z")
        data["pattern"] = (
            dims,
            patterns,
            {
                "units": MAP_VARIABLES["intensity"] + " per voxel",
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
            coords[name] = (name, off, {"units": "1/Å"})
    attrs = {
        "roi": list(plan.roi),
        "roi_at_detector_edge": plan.roi_at_edge,
        "has_signal": plan.has_signal,
        "hot_pixels": plan.n_hot,
        "dead_pixels": plan.n_dead,
        "background_per_frame": plan.background.tolist(),
        "drift_method": plan.drift_method,
        "reference_angle_index": plan.reference_angle,
        "warnings": list(plan.warnings),
        "geometry": plan.geometry.to_dict(),
    }
    if grid is not None:
        attrs["q_grid"] = grid.to_dict()
    return xr.Dataset(data, coords=coords, attrs=attrs)


# -- orchestration ----------------------------------------------------------------------------
def _fingerprint(manifest: Manifest, plan: ParticlePlan, grid: BeamtimeGrid) -> str:
    """What the reduce result of a particle depends on (raw sources, settings, grid, version)."""
    key = {
        "sources": [
            {k: s.get(k) for k in ("path", "size", "mtime_ns", "sha256")} if s else None
            for s in plan.raw.attrs.get("sources", [])
        ],
        "raw_layout": plan.raw.attrs.get("layout"),
        "geometry": plan.geometry.to_dict(),
        "settings": manifest.reduce.model_dump(mode="json"),
        "dark": manifest.particle(plan.name).dark,
        "grid": grid.to_dict(),
        "version": __version__,
    }
    return dask.base.tokenize(json.dumps(key, sort_keys=True, default=str))


def _root_group(root: Path, manifest: Manifest) -> zarr.Group:
    group = zarr.open_group(str(root), mode="a")
    attrs = dict(group.attrs)
    meta = attrs.get("spndi_dask", {})
    if meta.get("kind") != "results":
        group.attrs.update(
            {
                "spndi_dask": {"kind": "results", "version": __version__},
                "name": manifest.name,
            }
        )
    return group


def _stored_grid(root: Path) -> BeamtimeGrid | None:
    if not (root / "zarr.json").exists():
        return None
    g = dict(zarr.open_group(str(root), mode="r").attrs).get("q_grid")
    if not g:
        return None
    return BeamtimeGrid(
        h=np.asarray(g["h"]), axes=np.asarray(g["axes"]), extent=np.asarray(g["extent"]), n=g["n"]
    )


def _is_current(root: Path, name: str, fingerprint: str) -> bool:
    node = root / name
    if not (node / "zarr.json").exists():
        return False
    meta = dict(zarr.open_group(str(node), mode="r").attrs).get("spndi_dask", {})
    return bool(meta.get("complete")) and meta.get("fingerprint") == fingerprint


def _write_graph(ds: xr.Dataset, root: Path, name: str, attrs: dict[str, Any]) -> tuple[Any, Path]:
    """The lazy write of a particle's dataset next to ``results.zarr`` (marked incomplete).

    :func:`_publish` marks it complete and moves it in, so a reader sees the previous complete
    result or the new complete one; a crash leaves only a temporary directory behind (removed
    by the next run).
    """
    tmp = root.parent / ".tmp" / f"reduce-{name}.zarr"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    encoding: dict[str, Any] = {}
    if "pattern" in ds:
        # one scan row of a tile per chunk: the output blocks' rows are moved by the drift halo
        # (see _block_graph), so only 1 divides them; their columns are whole tiles
        xtiles = ds["pattern"].chunks[1]
        encoding["pattern"] = {
            "chunks": (1, xtiles[0], *ds["pattern"].shape[2:]),
            # mostly zeros (clipped): byte shuffling only spreads them; lz4 of the plain floats
            # writes a 16 × 16 tile in 0.064 s and 1.6 MB per 4 MB (0.081 s and 2.0 MB shuffled)
            "compressors": [BloscCodec(cname="lz4", clevel=1, shuffle="noshuffle")],
        }
    ds = ds.assign_attrs(
        {**ds.attrs, **attrs, "spndi_dask": {**attrs["spndi_dask"], "complete": False}}
    )
    with dask.config.set(_KEEP_PRIORITIES):  # da.store optimises its sources
        # write_empty_chunks: zarr otherwise compares every chunk with the fill value before
        # writing it, a quarter of the time to write a tile's patterns (0.047 -> 0.035 s)
        delayed = ds.to_zarr(
            str(tmp),
            mode="w",
            compute=False,
            encoding=encoding,
            consolidated=False,
            zarr_format=3,
            write_empty_chunks=True,
        )
    return delayed, tmp


def _publish(tmp: Path, root: Path, name: str, attrs: dict[str, Any]) -> None:
    """Mark a written temporary result complete and move it to ``results.zarr/<name>``.

    The previous result is moved aside (one rename) before it is deleted, so a reader never
    sees it half deleted: it finds the old result whole, briefly none, then the new one.
    """
    group = zarr.open_group(str(tmp), mode="r+")
    group.attrs.update({"spndi_dask": {**attrs["spndi_dask"], "complete": True}})
    dest = root / name
    old = tmp.with_name(tmp.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if dest.exists():
        dest.replace(old)
    try:
        tmp.replace(dest)
    except OSError:
        if old.exists() and not dest.exists():
            old.replace(dest)  # the previous result stays
        raise
    shutil.rmtree(old, ignore_errors=True)


def open_results(output_dir: str | Path, particle: str | None = None) -> Any:
    """Open ``results.zarr`` lazily: a ``DataTree`` of all particles, or one particle's Dataset.

    Raises if the particle's result is missing or incomplete.
    """
    root = results_path(output_dir) if Path(output_dir).suffix != ".zarr" else Path(output_dir)
    if not (root / "zarr.json").exists():
        raise FileNotFoundError(f"no results in {root}; run `spndi reduce beamtime.toml` first")
    if particle is None:
        return xr.open_datatree(str(root), engine="zarr", consolidated=False)
    node = root / particle
    if not (node / "zarr.json").exists():
        raise FileNotFoundError(f"no reduce result for particle {particle!r} in {root}")
    ds = xr.open_dataset(str(node), engine="zarr", consolidated=False, chunks={})
    if not ds.attrs.get("spndi_dask", {}).get("complete"):
        raise ReduceError(f"the result of particle {particle!r} in {root} is incomplete")
    if "pattern" in ds and ds["pattern"].chunks[0][0] < PATTERN_ROWS:
        # stored one scan row per chunk: a task reads PATTERN_ROWS rows at once
        others = [v for v in ds.data_vars if v != "pattern"]
        rows = xr.open_dataset(
            str(node),
            engine="zarr",
            consolidated=False,
            chunks={"y": PATTERN_ROWS},
            drop_variables=others,
        )
        ds["pattern"] = rows["pattern"]
    return ds


def _apply_beamtime_median(root: Path, names: list[str], rocking_axes: dict[str, str]) -> None:
    """Strain and tilt of every particle relative to the beamtime's median q (second step)."""
    pooled = []
    for name in names:
        g = zarr.open_group(str(root / name), mode="r")
        q = np.asarray(g["q_com"][:])
        pooled.append(q[np.asarray(g["valid"][:])])
    pooled = np.concatenate(pooled) if pooled else np.zeros((0, 3))
    if not len(pooled):
        return
    h = np.median(pooled, axis=0)
    for name in names:
        g = zarr.open_group(str(root / name), mode="r+")
        frame = crystal_frame(h, rocking_axes[name])
        st = strain_tilt(np.asarray(g["q_com"][:]), frame)
        for key in ("strain", "tilt_x", "tilt_y"):
            g[key][:] = st[key]
        g["reference_q"][:] = h
        g.attrs.update({"strain_reference": "beamtime_median"})


_CORRUPT = ("decompress", "codec", "checksum", "crc", "corrupt", "truncat", "invalid header")


def _explain_failure(manifest: Manifest, name: str, exc: Exception) -> str:
    """The failure of one particle in words: a damaged raw.zarr names the store and the fix."""
    text = f"{type(exc).__name__}: {exc}"
    if any(word in str(exc).lower() for word in _CORRUPT):
        store = raw_path(manifest.output_dir) / name
        return (
            f"the ingested frames of particle '{name}' cannot be decoded ({text}): a chunk of "
            f"{store} is damaged; re-ingest it with `spndi ingest {manifest.source} --particles "
            f"{name} --force`"
        )
    return text


def _other_plans(manifest: Manifest, plans: dict[str, ParticlePlan]) -> list[ParticlePlan]:
    """Plans of the manifest's particles not in ``plans`` that can be planned (for the grid)."""
    out = []
    for p in manifest.particles:
        if p.name in plans:
            continue
        try:
            out.append(plan_particle(manifest, p))
        except (ReduceError, SourceError, OSError, RuntimeError, KeyError) as exc:
            logger.debug("particle '%s' left out of the q grid: %s", p.name, exc)
    return out


def reduce(
    manifest: Manifest,
    *,
    particles: list[str] | None = None,
    force: bool = False,
    progress: bool = False,
) -> dict[str, dict[str, Any]]:
    """Reduce every (or the named) ingested particle into ``<output>/results.zarr``.

    Parameters
    ----------
    manifest : Manifest
    particles : list of str, optional
        Names to reduce; default all.
    force : bool
        Recompute results that are up to date. The common q grid is remade only when every
        particle is reduced (a subset keeps the stored one, so patterns stay comparable).
    progress : bool
        Show a progress bar per particle.

    Returns
    -------
    dict
        Per particle: ``status`` ('reduced', 'up to date' or 'failed'), ``seconds`` (particles
        are reduced together: the wall time until its result was complete), ``roi``,
        ``drift_method``, ``valid_pixels``, ``warnings`` or ``error``.

    Examples
    --------
    >>> import tempfile
    >>> from spndi_dask.ingest import ingest
    >>> from spndi_dask.simulate import preset, simulate_beamtime
    >>> m = simulate_beamtime(tempfile.mkdtemp(), preset("tiny", n_particles=1))
    >>> _ = ingest(m)
    >>> reduce(m)["p1"]["status"]
    'reduced'
    >>> reduce(m)["p1"]["status"]
    'up to date'
    """
    settings = manifest.reduce
    wanted = manifest.select_particles(particles, error=ReduceError)
    root = results_path(manifest.output_dir)
    summary: dict[str, dict[str, Any]] = {}
    plans: dict[str, ParticlePlan] = {}
    for p in manifest.particles:
        if p.name not in wanted:
            continue
        try:
            plans[p.name] = plan_particle(manifest, p)
        except (ReduceError, SourceError, FileNotFoundError, RuntimeError) as exc:
            logger.error("particle '%s': %s", p.name, exc)
            summary[p.name] = {"status": "failed", "error": str(exc)}
    if not plans:
        return summary
    # the q grid is the beamtime's: kept when only some particles are redone (forced or not),
    # and made from every particle's projection when it is (re)made
    whole = len(wanted) == len(manifest.particles)
    grid = None if force and whole else _stored_grid(root)
    if grid is None or grid.n != settings.pattern_grid:
        grid = beamtime_grid(manifest, [*plans.values(), *_other_plans(manifest, plans)])
    group = _root_group(root, manifest)
    group.attrs.update({"q_grid": grid.to_dict()})
    base = {
        "version": __version__,
        "manifest_hash": manifest.manifest_hash,
        "strain_reference": settings.strain_reference,
    }
    reduced = []
    todo: dict[str, str] = {}  # name -> fingerprint
    for name, plan in plans.items():
        fp = _fingerprint(manifest, plan, grid)
        if not force and _is_current(root, name, fp):
            summary[name] = {"status": "up to date", "seconds": 0.0}
            reduced.append(name)
        else:
            todo[name] = fp
    for rank, name in enumerate(todo):  # one particle's tiles after another's (_raster_priority)
        plans[name].rank = rank
    t0 = time.perf_counter()

    def fail(name: str, exc: BaseException) -> None:  # one bad particle never stops the others
        msg = _explain_failure(manifest, name, exc)
        logger.error(
            "particle %r: reduce failed: %s", name, msg, exc_info=logger.isEnabledFor(logging.DEBUG)
        )
        summary[name] = {"status": "failed", "error": msg}
        todo.pop(name, None)

    # intensity registration needs the per-angle moments first (one pass of its own)
    unregistered = [n for n in todo if plans[n].drift is None]
    graphs = [_block_graph(plans[n], _lazy_context(plans[n], None), None)[0] for n in unregistered]
    with dask.config.set(_KEEP_PRIORITIES):
        passes = compute_each(graphs, progress)
    for name, (values, exc) in zip(unregistered, passes, strict=True):
        if exc is not None:
            fail(name, exc)
            continue
        plan = plans[name]
        plan.drift = _checked_drift(
            plan,
            K.register_chain(
                values[..., 0],
                reference=plan.reference_angle,
                upsample=settings.registration_upsample,
            ),
        )
    # each particle's graph is submitted as soon as it is built (the workers start on the first
    # while the next is planned) and published as soon as it is written
    pending: dict[str, tuple[Path, dict[str, Any]]] = {}

    def built() -> Iterator[tuple[str, Any]]:
        for name in list(todo):
            plan = plans[name]
            try:
                ds = reduce_particle(
                    plan,
                    grid,
                    min_snr=settings.min_snr,
                    d0=settings.d0_angstrom if settings.strain_reference == "d0" else None,
                )
                attrs = {
                    **base,
                    "spndi_dask": {
                        "kind": "reduce",
                        "version": __version__,
                        "fingerprint": todo[name],
                    },
                    "raw_sources": plan.raw.attrs.get("sources", []),
                    "reduced_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                }
                delayed, tmp = _write_graph(ds, root, name, attrs)
            except Exception as exc:
                fail(name, exc)
                continue
            pending[name] = (tmp, attrs)
            yield name, delayed

    with dask.config.set(_KEEP_PRIORITIES):
        for name, _, exc in compute_as_completed(built(), progress):
            tmp, attrs = pending[name]
            if exc is None:
                try:
                    _publish(tmp, root, name, attrs)
                    n_valid = int(np.asarray(zarr.open_array(str(root / name / "valid"))[:]).sum())
                except Exception as publish_error:
                    exc = publish_error
            if exc is not None:
                fail(name, exc)
                continue
            plan = plans[name]
            summary[name] = {
                "status": "reduced",
                "seconds": round(time.perf_counter() - t0, 2),
                "roi": list(plan.roi),
                "drift_method": plan.drift_method,
                "valid_pixels": n_valid,
                "warnings": plan.warnings,
            }
            reduced.append(name)
    if settings.strain_reference == "beamtime_median" and reduced:
        _apply_beamtime_median(root, reduced, {n: plans[n].geometry.rocking_axis for n in reduced})
    return {p.name: summary[p.name] for p in manifest.particles if p.name in summary}
