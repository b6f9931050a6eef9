"""Raw files (HDF5 or TIFF stacks, one or several per rocking angle) -> ``<output>/raw.zarr``.

Parallel (one dask task per shard: an angle's scan tile; plus one task per angle that records
monitor, XRF, validity, the detector projection, the flagged pixels and the frame file's pixel
mask and then marks the angle done), shard-aligned, bit-exact and resumable:
an angle counts as done only once all of its shards and per-point arrays are written, and only
while its source files hold what was ingested (the same size, modification time and path, or
path relative to the manifest, else the same SHA-256: a beamtime folder moved or copied whole is
not ingested again) with the same dataset names and layout.
A re-run writes only angles that are not done. Every input is checked before anything is
written; one bad particle does not stop the others.

Where the frames come from. An angle's frames are one file, or several whose frames are
concatenated in the order listed (a scan split across files); a frames dataset is ``(n_points,
det_rows, det_cols)`` or has the scan's axes first (e.g. ``(rows, cols, det_rows, det_cols)``,
read row-major). A task reads only the points of its tile (HDF5 hyperslabs, across file
boundaries), never a whole file. Monitor, XRF and positions are concatenated across the files
the same way.

Where each frame goes. Without recorded positions, point ``i`` of an angle is node
``divmod(i, cols)`` of the scan grid (``scan_order = "snake"``: every other row reversed); an
aborted scan's missing points are 0 and marked invalid in ``valid``. With ``positions = {y, x,
units}`` (fly scans: jittered, overshooting, snaked) every frame is placed by its recorded
position (:mod:`spndi_dask.positions`), the same way at every angle:

- the grid is ``scan_shape`` nodes ``scan_step_um`` apart; its origin (node (0, 0)) is the one
  offset per particle, common to all angles, that puts the most points within half a step of a
  node (found from the points of all angles; a jittered first point or points overshooting the
  fast axis do not move it);
- each point goes to its nearest node if it lies within half a step of it in both axes; points
  beyond the grid are dropped and counted; of several points on one node the nearest is kept;
- a node without a point is invalid: frames 0, ``valid`` false, as for an aborted scan (a
  warning names the angles); ``scan_order`` and ``allow_incomplete`` play no part.

The positions of the point placed on each node are kept as ``position_y``/``position_x``
(angle, y, x) in µm from node (0, 0) (NaN where none; the origin is in ``attrs["positions"]``,
with the largest and RMS distance of a placed point from its node, the points dropped and the
nodes left empty).

Detector traits: values equal to the detector's invalid value (``[ingest] invalid_value``, e.g.
2^32 − 1 in the gaps and defective pixels of an Eiger or Pilatus) are stored as 0 and counted
per pixel and angle in ``flagged`` (:func:`_flag_invalid`); a particle's ``mask_dataset`` is
copied from every angle file into ``pixel_mask``. ``reduce`` masks both. XRF spectra are summed
over channels and the energy window while they are read
(:func:`~spndi_dask.io.sources.read_xrf`).

Examples
--------
>>> import tempfile
>>> from spndi_dask.simulate import preset, simulate_beamtime
>>> m = simulate_beamtime(tempfile.mkdtemp(), preset("tiny", n_particles=1, n_angles=3))
>>> summary = ingest(m)
>>> summary["p1"]["status"], summary["p1"]["angles_written"]
('ingested', 3)
>>> ingest(m)["p1"]["status"]
'up to date'
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import dask
import numpy as np
import zarr

from spndi_dask._version import __version__
from spndi_dask.compute import compute
from spndi_dask.config import Manifest, ParticleSettings
from spndi_dask.interrupt import check_interrupted
from spndi_dask.io.hashing import (
    relative_to,
    same_source,
    sha256_file,
    source_parts,
    stable_key,
)
from spndi_dask.io.integrity import is_damage, writable
from spndi_dask.io.layout import check_output, read_attrs
from spndi_dask.io.raw_store import ANGLE_SOURCES, RawLayout, create_particle_store
from spndi_dask.io.sources import (
    SourceError,
    SourceInfo,
    XrfSource,
    is_tiff,
    probe_source,
    probe_xrf,
    read_per_point,
    read_pixel_mask,
    read_points,
    read_xrf,
)
from spndi_dask.positions import assign_to_grid, grid_origin
from spndi_dask.stages import Outcome, StageError

__all__ = ["IngestError", "IngestPlan", "ingest", "plan_ingest"]

logger = logging.getLogger(__name__)


class IngestError(StageError, ValueError):
    """An input problem that stops a particle's ingest; the message names the file and the fix."""


@dataclass
class IngestPlan:
    """What ingesting one particle will do (built and checked before anything is written)."""

    particle: ParticleSettings
    root: Path
    sources: list[SourceInfo]
    layout: RawLayout
    fingerprints: list[int]
    todo: list[int]
    allow_incomplete: bool
    bad_values: str
    checksum: str
    attrs: dict[str, Any] = field(default_factory=dict)
    fresh: bool = True
    #: angles whose file moved or was touched but holds what was ingested: record kept, updated
    moved: dict[int, dict[str, Any]] = field(default_factory=dict)
    base_dir: Path = Path(".")
    #: per angle (rows, cols) source point of every node, -1 none: from recorded positions;
    #: None: points in scan_order
    index_maps: list[np.ndarray] | None = None
    #: per angle the grid nodes without a point
    empty_nodes: list[int] = field(default_factory=list)
    #: recorded positions: (y dataset, x dataset, factor to µm, grid origin in µm)
    positions: tuple[str, str, float, tuple[float, float]] | None = None
    #: the detector value that flags a bad pixel (None: none), resolved from [ingest]
    invalid: int | float | None = None
    #: how the per-point fluorescence is read (None: not recorded)
    xrf: XrfSource | None = None

    @property
    def name(self) -> str:
        """Particle name."""
        return self.particle.name

    @property
    def group_url(self) -> str:
        """Path of the particle's group in ``raw.zarr``."""
        return str(self.root / self.particle.name)


def _prefix(p: ParticleSettings) -> str:
    return f"particle '{p.name}'"


def plan_ingest(
    manifest: Manifest, particle: ParticleSettings, *, force: bool = False
) -> IngestPlan:
    """Check every angle file of a particle and decide which angles still need writing.

    Raises
    ------
    IngestError
        Missing files (all listed), unreadable files, missing datasets (existing ones listed),
        detector shape or dtype changing between angles or between the files of an angle, scans
        with too many points, or too few without ``allow_incomplete``, a monitor without flux
        (0, negative or NaN) at every point of an angle, recorded positions whose length is not
        the number of frames, a ``mask_dataset`` missing or not of the detector's shape, XRF with
        too few points, spectra without an energy window (or a map with one), a window outside
        the spectra's energies, an ``xrf_energy`` whose length is not the number of bins.
    ForeignOutputError
        The output's ``raw.zarr`` (or ``results.zarr``) was not written by spndi: it stops the
        whole ingest before anything is written.
    """
    check_output(manifest.output_dir)
    p = particle
    files = p.frame_files(manifest.base_dir)
    paths = [f for parts in files for f in parts]
    missing = [str(x) for x in paths if not x.exists()]
    if missing:
        shown = "\n    ".join(missing[:10]) + (
            f"\n    ... {len(missing) - 10} more" if len(missing) > 10 else ""
        )
        raise IngestError(
            f"{_prefix(p)}: {len(missing)} of {len(paths)} angle files are missing:\n    {shown}\n"
            "copy them, or list only the measured angles in angles_deg/frames"
        )
    infos = []
    for parts in files:
        try:
            infos.append(probe_source(parts, p.dataset))
        except SourceError as exc:
            raise IngestError(f"{_prefix(p)}: {exc}") from None
    first = infos[0]
    for a, info in enumerate(infos[1:], start=1):
        if info.detector_shape != first.detector_shape or info.dtype != first.dtype:
            raise IngestError(
                f"{_prefix(p)}: angle file {info.path} (index {a}) has frames "
                f"{info.detector_shape} {info.dtype}, but {first.path} (index 0) has "
                f"{first.detector_shape} {first.dtype}; all angles of a particle must use one "
                "detector setting: split the particle into two manifest entries"
            )
    settings = manifest.ingest
    allow = p.allow_incomplete if p.allow_incomplete is not None else settings.allow_incomplete
    ny, nx = p.scan_shape
    if p.positions is None:  # point i is node divmod(i, nx): the counts must fit the grid
        for info in infos:
            if info.n_points > p.n_points:
                raise IngestError(
                    f"{_prefix(p)}: {_files(info)} {info.n_points} frames, scan_shape "
                    f"{ny}×{nx} needs {p.n_points}; correct scan_shape (or give the recorded "
                    "`positions` of a fly scan)"
                )
            if info.n_points < p.n_points and not allow:
                raise IngestError(
                    f"{_prefix(p)}: {_files(info)} {info.n_points} frames, scan_shape "
                    f"{ny}×{nx} needs {p.n_points}; set `allow_incomplete = true` to fill "
                    "missing points"
                )
    invalid = _invalid_value(settings.invalid_value, np.dtype(first.dtype), p)
    xrf = _xrf_source(p)
    _check_traits(p, infos, first.detector_shape, xrf)
    for what, ds in (("monitor", p.monitor),):
        if ds is not None:
            for a, info in enumerate(infos):
                try:
                    flux = read_per_point(info, ds, what, key=what)
                except SourceError as exc:
                    raise IngestError(f"{_prefix(p)}: {exc} (manifest key `{what}`)") from None
                if what == "monitor" and not np.any(np.isfinite(flux) & (flux > 0)):
                    # reduce divides by the monitor: points without flux are masked, but an
                    # angle without any is a broken file, not a beam loss
                    raise IngestError(
                        f"{_prefix(p)}: angle file {info.describe()} (angle index {a}, "
                        f"{p.angles[a]:g}°) has monitor {ds} = 0, negative or not finite at "
                        "every scan point: the frames cannot be normalised by it; fix the file, "
                        "remove `monitor` from the particle to skip the normalisation, or drop "
                        "this angle from angles_deg and frames"
                    )
    index_maps = None
    positions = None
    position_attrs = None
    if p.positions is not None:
        index_maps, positions, position_attrs = _place_points(p, infos)
        empty = position_attrs["nodes_empty_per_angle"]
    else:
        empty = [max(p.n_points - info.n_points, 0) for info in infos]

    layout = RawLayout(
        (len(infos), ny, nx, *first.detector_shape),
        first.dtype,
        scan_chunk=settings.scan_chunk,
        scan_shard=settings.scan_shard,
        detector_chunk=settings.detector_chunk,
        compressor=settings.compressor,
        clevel=settings.clevel,
    )
    layout_key = json.dumps(layout.describe(), sort_keys=True)
    # what an angle was ingested from and with: the file's size and modification time (not its
    # place: a beamtime folder moved whole keeps them) and the settings; a file that was copied
    # or touched is compared by its content with the recorded SHA-256 (same_file)
    settings_key: tuple[Any, ...] = (
        p.dataset,
        p.monitor,
        p.xrf,
        p.scan_shape,
        p.scan_order,
        layout_key,
        _traits_key(p, invalid, xrf),
    )
    if positions is not None:  # where each frame goes: the datasets and the grid's origin
        settings_key += ("positions", *positions)
    fingerprints = [stable_key(*info.stamp, *settings_key) for info in infos]
    root = manifest.layout.raw
    todo = list(range(len(infos)))
    fresh = True
    moved: dict[int, dict[str, Any]] = {}
    existing = root / p.name / "zarr.json"
    if existing.exists() and not force:
        try:
            group = zarr.open_group(str(root / p.name), mode="r")
            attrs = dict(group.attrs)
            if attrs.get("layout") == layout.describe() and (
                ("position_y" in group) == (positions is not None)
            ):
                done = np.asarray(group["done"][:])
                recorded = list(attrs.get("sources") or [])
                recorded += [None] * (len(infos) - len(recorded))
                same_settings = attrs.get("settings_key") == stable_key(*settings_key)
                todo = []
                for a, info in enumerate(infos):
                    if int(done[a]) == fingerprints[a]:
                        if _recorded_paths(recorded[a]) != info.paths:  # moved, unrecorded
                            moved[a] = recorded[a] or {}
                    elif (
                        done[a] != 0
                        and same_settings
                        and same_source(info.paths, recorded[a], manifest.base_dir)
                    ):
                        moved[a] = recorded[a]
                    else:
                        todo.append(a)
                fresh = False
        except Exception as exc:  # damaged metadata or done marks: write the particle again
            if not is_damage(exc) and not isinstance(exc, ValueError | OSError | KeyError):
                raise
            logger.warning(
                "particle '%s': %s is damaged (%s); ingesting it again", p.name, root / p.name, exc
            )
    attrs = {
        "spndi_dask": {"kind": "raw", "version": __version__},
        "particle": p.name,
        "angles_deg": [float(a) for a in p.angles],
        "scan_shape": list(p.scan_shape),
        "scan_step_um": list(p.scan_step_um),
        "scan_order": p.scan_order if positions is None else "recorded positions",
        "geometry": manifest.geometry_for(p).to_dict(),
        "detector_shape": list(first.detector_shape),
        "dtype": first.dtype,
        "layout": layout.describe(),
        "dataset": p.dataset,
        "monitor_dataset": p.monitor,
        "xrf_dataset": p.xrf,
        "xrf": None if xrf is None else xrf.describe(),
        "mask_dataset": p.mask_dataset,
        "invalid_value": invalid,
        "manifest_hash": manifest.manifest_hash,
        "manifest": manifest.source,
        "settings_key": stable_key(*settings_key),
    }
    if position_attrs is not None:
        attrs["positions"] = position_attrs
    return IngestPlan(
        particle=p,
        root=root,
        sources=infos,
        layout=layout,
        fingerprints=fingerprints,
        todo=todo,
        allow_incomplete=allow,
        bad_values=settings.bad_values,
        checksum=settings.checksum,
        attrs=attrs,
        fresh=fresh,
        moved=moved,
        base_dir=manifest.base_dir,
        index_maps=index_maps,
        empty_nodes=empty,
        positions=positions,
        invalid=invalid,
        xrf=xrf,
    )


def _invalid_value(setting: str | int, dtype: np.dtype, p: ParticleSettings) -> int | float | None:
    """The value that flags a bad pixel in frames of ``dtype`` (``[ingest] invalid_value``).

    ``'auto'``: the largest value of an unsigned integer dtype (Eiger and Pilatus write
    2^32 − 1, or 2^16 − 1 in 16-bit mode, into gaps and defective pixels); none for signed and
    float frames. A number that frames of ``dtype`` cannot hold flags nothing (logged).
    """
    if setting == "none":
        return None
    if setting == "auto":
        return int(np.iinfo(dtype).max) if dtype.kind == "u" else None
    value = int(setting)
    if dtype.kind in "ui" and not np.iinfo(dtype).min <= value <= np.iinfo(dtype).max:
        logger.warning(
            "%s: [ingest] invalid_value = %d cannot occur in %s frames (at most %d): no value is "
            "flagged; set the detector's invalid value, or 'auto'",
            _prefix(p),
            value,
            dtype,
            np.iinfo(dtype).max,
        )
        return None
    return float(value) if dtype.kind == "f" else value


def _xrf_source(p: ParticleSettings) -> XrfSource | None:
    """How the particle's fluorescence is read (manifest ``xrf`` and its window keys)."""
    if p.xrf is None:
        return None
    cal = p.xrf_calibration
    return XrfSource(
        p.xrf,
        None if p.xrf_window_kev is None else tuple(p.xrf_window_kev),
        offset_kev=cal.offset_kev if cal else 0.0,
        gain_kev=cal.gain_kev if cal else None,
        energy_dataset=p.xrf_energy,
    )


def _check_traits(
    p: ParticleSettings,
    infos: list[SourceInfo],
    detector_shape: tuple[int, int],
    xrf: XrfSource | None,
) -> None:
    """Check every angle file's mask dataset and fluorescence before anything is written."""
    for info in infos:
        for part in info.parts:  # every file of a split scan holds its share of the points
            try:
                if p.mask_dataset is not None and part is info.parts[0]:
                    read_pixel_mask(part.path, p.mask_dataset, detector_shape, check_only=True)
                n_xrf = None if xrf is None else probe_xrf(part.path, xrf, n_frames=part.n_points)
            except SourceError as exc:
                raise IngestError(f"{_prefix(p)}: {exc}") from None
            if n_xrf is not None and n_xrf < part.n_points:
                raise IngestError(
                    f"{_prefix(p)}: {part.path}:{xrf.dataset} (xrf) has {n_xrf} "
                    f"{'values' if xrf.is_map else 'spectra'} for {part.n_points} frames; fix "
                    "the file or remove `xrf`"
                )


def _traits_key(p: ParticleSettings, invalid: int | float | None, xrf: XrfSource | None) -> str:
    """The settings of the detector traits and XRF that change what ingest writes."""
    return json.dumps(
        {
            "mask_dataset": p.mask_dataset,
            "invalid_value": invalid,
            "xrf": None if xrf is None else xrf.describe(),
        },
        sort_keys=True,
    )


def _files(info: SourceInfo) -> str:
    """'angle file X has' or 'angle files X + Y have' (for messages)."""
    if len(info.parts) == 1:
        return f"angle file {info.path} has"
    return f"angle files {info.describe()} have"


def _recorded_paths(record: dict[str, Any] | None) -> list[str]:
    return [part.get("path") for part in source_parts(record)]


#: µm per unit of recorded positions
_UNITS = {"um": 1.0, "nm": 1e-3, "mm": 1e3}


def _read_positions(p: ParticleSettings, info: SourceInfo) -> tuple[np.ndarray, np.ndarray]:
    """An angle's recorded positions (µm), one per frame (every file's, concatenated)."""
    pos = p.positions
    assert pos is not None
    tiff = [part.path for part in info.parts if is_tiff(part.path)]
    if tiff:
        raise IngestError(
            f"{_prefix(p)}: positions are read from HDF5 datasets of the frame files, but "
            f"{tiff[0]} is a TIFF stack; remove `positions`, or convert the scan to HDF5 with "
            "its positions"
        )
    out = []
    for axis, ds in (("y", pos.y), ("x", pos.x)):
        try:
            vec = read_per_point(info, ds, f"position {axis}", key="positions", exact=True)
        except SourceError as exc:
            raise IngestError(f"{_prefix(p)}: {exc} (manifest key `positions.{axis}`)") from None
        out.append(vec * _UNITS[pos.units])
    return out[0], out[1]


def _place_points(
    p: ParticleSettings, infos: list[SourceInfo]
) -> tuple[list[np.ndarray], tuple[str, str, float, tuple[float, float]], dict[str, Any]]:
    """Recorded positions -> per angle the source point of every grid node (module docstring).

    Returns the index maps, what ``_finish_angle`` needs to record the positions and the
    particle's placement statistics (raw attrs ``positions``).
    """
    pos = p.positions
    assert pos is not None
    read = [_read_positions(p, info) for info in infos]
    step = p.scan_step_um
    try:
        origin = grid_origin(
            [y for y, _ in read], [x for _, x in read], scan_shape=p.scan_shape, step_um=step
        )
    except ValueError:
        raise IngestError(
            f"{_prefix(p)}: the recorded positions {pos.y}, {pos.x} are not finite anywhere "
            f"(e.g. in {infos[0].describe()}); fix the files or remove `positions`"
        ) from None
    grids = [
        assign_to_grid(y, x, origin=origin, scan_shape=p.scan_shape, step_um=step) for y, x in read
    ]
    total = sum(y.size for y, _ in read)
    placed = total - sum(g.n_outside for g in grids)
    if placed < total / 2:  # not a fly scan's overshoot: the positions do not fit the grid
        ys = np.concatenate([y for y, _ in read])
        xs = np.concatenate([x for _, x in read])
        span = [float(np.nanmax(v) - np.nanmin(v)) for v in (ys, xs)]
        ny, nx = p.scan_shape
        raise IngestError(
            f"{_prefix(p)}: only {placed} of {total} recorded positions ({pos.y}, {pos.x}, e.g. "
            f"in {infos[0].describe()}) lie within half a step of the scan grid: they span "
            f"{span[0]:.4g} × {span[1]:.4g} µm (read as {pos.units!r}), the grid "
            f"{(ny - 1) * step[0]:.4g} × {(nx - 1) * step[1]:.4g} µm ({ny}×{nx} nodes "
            f"{step[0]:g} × {step[1]:g} µm apart); check `positions.units`, scan_step_um and "
            "scan_shape"
        )
    errors = np.concatenate([g.errors_um() for g in grids])
    empty = [g.n_empty for g in grids]
    stats = {
        "y_dataset": pos.y,
        "x_dataset": pos.x,
        "units": pos.units,
        "origin_um": [origin[0], origin[1]],
        "max_error_um": float(errors.max()) if errors.size else None,
        "rms_error_um": float(np.sqrt(np.mean(errors**2))) if errors.size else None,
        "points_dropped": sum(g.n_dropped for g in grids),
        "points_outside_grid": sum(g.n_outside for g in grids),
        "points_on_taken_node": sum(g.n_duplicate for g in grids),
        "nodes_empty": sum(empty),
        "nodes_empty_per_angle": empty,
    }
    return [g.index for g in grids], (pos.y, pos.x, _UNITS[pos.units], origin), stats


# -- tasks (module level: they run on dask workers) -------------------------------------------
def _point_index(ys: slice, xs: slice, nx: int, order: str) -> np.ndarray:
    """Acquisition index of every scan point of a tile, shape (len(ys), len(xs))."""
    y = np.arange(ys.start, ys.stop)[:, None]
    x = np.arange(xs.start, xs.stop)[None, :]
    if order == "snake":
        x = np.where(y % 2 == 1, nx - 1 - x, x)
    return y * nx + x


def _tile_index(
    index_map: np.ndarray | None,
    ys: slice,
    xs: slice,
    scan_shape: tuple[int, int],
    order: str,
    n_avail: int,
) -> np.ndarray:
    """Source point of every node of a tile, -1 where none: from the index map of recorded
    positions, else in acquisition ``order`` (points an aborted scan lacks: -1)."""
    if index_map is not None:
        return np.asarray(index_map)[ys, xs]
    idx = _point_index(ys, xs, scan_shape[1], order)
    return np.where(idx < n_avail, idx, -1)


def _gather(values: np.ndarray, index: np.ndarray, fill: float) -> np.ndarray:
    """Per-point ``values`` on the grid of ``index`` (``fill`` where no point)."""
    out = np.full(index.shape, fill, dtype=np.float64)
    ok = index >= 0
    out[ok] = values[index[ok]]
    return out


#: points not needed between two needed ones that are still read in one go
_GAP = 64


def _read_tile(
    source: SourceInfo,
    dataset: str,
    idx: np.ndarray,
    detector_shape: tuple[int, ...],
    dtype: np.dtype,
) -> tuple[np.ndarray, int, int]:
    """The frames of the points ``idx`` (-1: zeros) as ``(*idx.shape, *detector_shape)``, and
    the range ``lo:hi`` of the points read.

    Points in order (whole raster rows) are one read, returned without a copy; else the needed
    points are read in runs (a gap of more than ``_GAP`` unneeded points splits a run), so a
    permuted or snaked tile reads about what it needs, never the whole file.
    """
    flat = idx.reshape(-1)
    ok = flat >= 0
    if not ok.any():
        return np.zeros((*idx.shape, *detector_shape), dtype=dtype), 0, 0
    lo, hi = int(flat[ok].min()), int(flat[ok].max()) + 1
    if hi - lo == flat.size and ok.all() and np.array_equal(flat, np.arange(lo, hi)):
        frames = read_points(source, dataset, lo, hi)
        return frames.reshape(*idx.shape, *frames.shape[1:]), lo, hi  # no copy
    need = np.unique(flat[ok])
    runs = np.split(need, np.flatnonzero(np.diff(need) > _GAP) + 1)
    if len(runs) == 1:  # one read, reordered in one gather (twice the tile's memory at most)
        block = read_points(source, dataset, lo, hi)[np.where(ok, flat - lo, 0)]
        block[~ok] = 0
        return block.reshape(*idx.shape, *detector_shape), lo, hi
    block = np.zeros((flat.size, *detector_shape), dtype=dtype)
    for run in runs:
        a, b = int(run[0]), int(run[-1]) + 1
        frames = read_points(source, dataset, a, b)
        sel = ok & (flat >= a) & (flat < b)
        block[sel] = frames[flat[sel] - a]
    return block.reshape(*idx.shape, *detector_shape), lo, hi


def _write_tile(
    frames_url: str,
    source: SourceInfo,
    dataset: str,
    angle: int,
    ys: slice,
    xs: slice,
    scan_shape: tuple[int, int],
    order: str,
    index_map: np.ndarray | None,
    bad_values: str,
    particle: str,
    invalid: int | float | None = None,
) -> tuple[int, np.ndarray, np.ndarray]:
    """Read the frames of one band of scan points of one angle and write them.

    ``index_map`` is the source point of every node of the angle (from recorded positions), or
    None for points in acquisition ``order``. Returns the number of values zeroed, the band's
    detector projection (sum over its scan points, float64), from which ``reduce`` finds
    hot/dead pixels, module gaps and the Bragg ROI without reading the frames again, and per
    detector pixel the number of its frames that held the invalid value (uint32; stored as 0,
    see :func:`_flag_invalid`).
    """
    idx = _tile_index(index_map, ys, xs, scan_shape, order, source.n_points)
    # every shard written, so a missing one is damage (io.integrity)
    arr = writable(zarr.open_array(frames_url, mode="r+"))
    block, lo, hi = _read_tile(source, dataset, idx, arr.shape[3:], arr.dtype)
    src = source.describe()
    block, flagged = _flag_invalid(block, invalid)
    n_bad = 0
    if block.dtype.kind in "fi":
        bad = block < 0
        if block.dtype.kind == "f":
            bad |= ~np.isfinite(block)
        n_bad = int(bad.sum())
        if n_bad:
            if bad_values == "error":
                first = int(
                    idx.reshape(-1)[
                        np.flatnonzero(bad.reshape(len(idx.reshape(-1)), -1).any(axis=1))[0]
                    ]
                )
                raise IngestError(
                    f"particle '{particle}': {src} has {n_bad} NaN/infinite or negative values "
                    f"in scan points {lo}-{hi - 1} (first at point {first}); fix the file, or "
                    "set [ingest] bad_values = 'zero' to replace them with 0"
                )
            block = np.where(bad, 0, block).astype(block.dtype)
    arr[angle : angle + 1, ys, xs] = block[None]
    projection = block.reshape(-1, *block.shape[2:]).sum(axis=0, dtype=np.float64)
    return n_bad, projection, flagged


def _flag_invalid(block: np.ndarray, invalid: int | float | None) -> tuple[np.ndarray, np.ndarray]:
    """Values equal to the detector's invalid value set to 0, and where they were.

    Pixel detectors write a flag value (e.g. 2^32 − 1) into module gaps and defective pixels;
    stored as it is, it would read as a huge count. It is stored as 0 and counted per detector
    pixel, so ``reduce`` masks every pixel flagged in any frame (a stored 0 is never read as a
    measured 0).

    Parameters
    ----------
    block : array (..., det_rows, det_cols)
        Frames (changed in place where writable).
    invalid : number or None
        The flag value; None flags nothing.

    Returns
    -------
    block : array
        The frames with flagged values 0.
    flagged : uint32 array (det_rows, det_cols)
        Per pixel, the number of frames in which it held the flag value.

    Examples
    --------
    >>> b = np.array([[[1, 65535], [3, 4]], [[65535, 65535], [3, 4]]], np.uint16)
    >>> b, n = _flag_invalid(b, 65535)
    >>> b[1].tolist(), n.tolist()
    ([[0, 0], [3, 4]], [[1, 2], [0, 0]])
    """
    flagged = np.zeros(block.shape[-2:], np.uint32)
    if invalid is None:
        return block, flagged
    hit = block == invalid
    if hit.any():
        flagged = hit.sum(axis=tuple(range(block.ndim - 2)), dtype=np.uint32)
        if not block.flags.writeable:
            block = block.copy()
        block[hit] = 0
    return block, flagged


def _source_record(
    source: SourceInfo,
    base_dir: str | Path,
    checksum: str,
    previous: dict[str, Any] | None = None,
    *,
    stat: bool = True,
) -> dict[str, Any]:
    """An angle's ``sources`` record: path, relative path, size, modification time, SHA-256 and
    points of its file, or of each of its files under ``parts`` (a split scan).

    ``stat``: the files' size and time now (else as probed); ``previous``: a record of the same
    content whose SHA-256 is kept instead of hashing the files again.
    """
    old = source_parts(previous)
    parts = []
    for i, part in enumerate(source.parts):
        size, mtime = part.size, part.mtime_ns
        if stat:
            st = os.stat(part.path)
            size, mtime = st.st_size, st.st_mtime_ns
        if i < len(old) and len(old) == len(source.parts):
            sha = old[i].get("sha256")
        else:
            sha = sha256_file(part.path) if checksum == "sha256" else None
        parts.append(
            {
                "path": part.path,
                "relpath": relative_to(part.path, base_dir),
                "size": size,
                "mtime_ns": mtime,
                "sha256": sha,
                "n_points": part.n_points,
            }
        )
    zeroed = (previous or {}).get("zeroed_values", 0)
    if len(parts) == 1:
        return {**parts[0], "zeroed_values": zeroed}
    return {
        "path": parts[0]["path"],
        "relpath": parts[0]["relpath"],
        "parts": parts,
        "n_points": source.n_points,
        "zeroed_values": zeroed,
    }


def _finish_angle(
    group_url: str,
    source: SourceInfo,
    angle: int,
    monitor: str | None,
    xrf: XrfSource | None,
    positions: tuple[str, str, float, tuple[float, float]] | None,
    mask_dataset: str | None,
    scan_shape: tuple[int, int],
    order: str,
    index_map: np.ndarray | None,
    fingerprint: int,
    checksum: str,
    base_dir: str,
    *tile_results: tuple[int, np.ndarray, np.ndarray],
) -> dict[str, Any]:
    """After all shards of an angle: per-point and per-pixel arrays, then the done mark (last)."""
    ny, nx = scan_shape
    index = _tile_index(index_map, slice(0, ny), slice(0, nx), scan_shape, order, source.n_points)
    group = zarr.open_group(group_url, mode="r+")

    def array(name: str) -> zarr.Array:  # every chunk written (io.integrity)
        return writable(group[name])

    array("det_sum")[angle] = sum(t[1] for t in tile_results)
    flagged = sum(t[2] for t in tile_results).astype(np.uint32)
    array("flagged")[angle] = flagged
    shape = tuple(group["pixel_mask"].shape[1:])
    array("pixel_mask")[angle] = (  # the mask of the angle's first file
        read_pixel_mask(source.parts[0].path, mask_dataset, shape)
        if mask_dataset
        else np.zeros(shape, bool)
    )
    array("valid")[angle] = index >= 0
    if monitor:
        io = _gather(read_per_point(source, monitor, "monitor", key="monitor"), index, 1.0)
        array("monitor")[angle] = io
    if xrf:
        spectra = [read_xrf(part.path, xrf, stop=part.n_points) for part in source.parts]
        array("xrf")[angle] = _gather(np.concatenate(spectra), index, np.nan)
    if positions:
        y_ds, x_ds, to_um, origin = positions
        for name, ds, zero in (("position_y", y_ds, origin[0]), ("position_x", x_ds, origin[1])):
            values = read_per_point(source, ds, name, key="positions", exact=True)
            array(name)[angle] = _gather(values * to_um - zero, index, np.nan)
    record = _source_record(source, base_dir, checksum)
    record["zeroed_values"] = int(sum(t[0] for t in tile_results))
    record["flagged_values"] = int(flagged.sum(dtype=np.uint64))
    # the angle's own record, before its done mark: an ingest interrupted before it records
    # every angle (_finalize) leaves it for the next run (_refresh), which need not hash again
    group[ANGLE_SOURCES].create_group(str(angle), attributes=record, overwrite=True)
    group["done"][angle] = np.uint64(fingerprint)
    return record


# -- orchestration ----------------------------------------------------------------------------
def _tasks(plan: IngestPlan) -> list[Any]:
    p = plan.particle
    frames_url = f"{plan.group_url}/frames"
    out = []
    for a in plan.todo:
        src = plan.sources[a]
        index_map = None
        if plan.index_maps is not None:  # one graph node per angle, shared by its tasks
            index_map = dask.delayed(plan.index_maps[a], name=f"ingest-{p.name}-{a}-index")
        tiles = [
            dask.delayed(_write_tile, pure=False)(
                frames_url,
                src,
                p.dataset,
                a,
                ys,
                xs,
                p.scan_shape,
                p.scan_order,
                index_map,
                plan.bad_values,
                p.name,
                plan.invalid,
                dask_key_name=f"ingest-{p.name}-{a}-{ys.start}-{xs.start}",
            )
            for ys, xs in plan.layout.tiles()
        ]
        out.append(
            dask.delayed(_finish_angle, pure=False)(
                plan.group_url,
                src,
                a,
                p.monitor,
                plan.xrf,
                plan.positions,
                p.mask_dataset,
                p.scan_shape,
                p.scan_order,
                index_map,
                plan.fingerprints[a],
                plan.checksum,
                str(plan.base_dir),
                *tiles,
                dask_key_name=f"ingest-{p.name}-{a}-done",
            )
        )
    return out


def _finalize(plan: IngestPlan, records: list[dict[str, Any]]) -> dict[str, Any]:
    group = zarr.open_group(plan.group_url, mode="r+")
    old = dict(group.attrs).get("sources") or [None] * len(plan.sources)
    sources = list(old) if len(old) == len(plan.sources) else [None] * len(plan.sources)
    for a, rec in zip(plan.todo, records, strict=True):
        sources[a] = rec
    _refresh(plan, sources)
    done = np.asarray(group["done"][:])
    complete = all(int(d) == f for d, f in zip(done, plan.fingerprints, strict=True))
    incomplete = [a for a, n in enumerate(plan.empty_nodes) if n]
    zeroed = sum((r or {}).get("zeroed_values", 0) for r in sources)
    flagged = np.asarray(group["flagged"][...])
    n_flagged = int(flagged.sum(dtype=np.uint64))
    attrs = {
        **plan.attrs,
        "sources": sources,
        "incomplete_angles": incomplete,
        "zeroed_values": zeroed,
        "flagged_values": n_flagged,
        "flagged_pixels": int((flagged > 0).any(axis=0).sum()),
        "ingested_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    attrs["spndi_dask"] = {**plan.attrs["spndi_dask"], "complete": bool(complete)}
    group.attrs.put(attrs)
    if incomplete and plan.positions is not None:
        logger.warning(
            "particle '%s': %d scan grid node(s) at %d angle(s) (indices %s) have no recorded "
            "position within half a step; their frames are 0 and marked invalid in `valid` "
            "(raw attrs `positions`)",
            plan.name,
            sum(plan.empty_nodes),
            len(incomplete),
            incomplete,
        )
    elif incomplete:
        logger.warning(
            "particle '%s': %d angle(s) had aborted scans (indices %s); missing points are 0 "
            "and marked invalid in `valid`",
            plan.name,
            len(incomplete),
            incomplete,
        )
    if zeroed:
        logger.warning("particle '%s': %d NaN/negative values replaced by 0", plan.name, zeroed)
    if n_flagged:
        logger.info(
            "particle '%s': %d values equal to the invalid value %s at %d detector pixels stored "
            "as 0 and counted in `flagged` (reduce masks those pixels)",
            plan.name,
            n_flagged,
            plan.invalid,
            attrs["flagged_pixels"],
        )
    return attrs


def ingest(
    manifest: Manifest,
    *,
    particles: list[str] | None = None,
    force: bool = False,
    progress: bool = False,
) -> dict[str, dict[str, Any]]:
    """Ingest the raw frames of a beamtime into ``<output>/raw.zarr``.

    Runs on the active ``distributed`` client if there is one, else on dask's default
    scheduler.

    Parameters
    ----------
    manifest : Manifest
    particles : list of str, optional
        Only these particles (default: all).
    force : bool
        Rewrite every angle even where the store is up to date.
    progress : bool
        Show a progress bar (for the CLI).

    Returns
    -------
    dict
        Per particle: ``status`` ('ingested', 'up to date' or 'failed'), ``angles_written``,
        ``seconds``, ``raw_bytes`` and ``error`` for failures.

    Raises
    ------
    IngestError
        After all good particles are ingested, if any particle failed (the message lists each).
    """
    selected = [manifest.particle(n) for n in particles] if particles else manifest.particles
    summary: dict[str, dict[str, Any]] = {}
    plans: list[IngestPlan] = []
    for p in selected:
        check_interrupted()
        try:
            plans.append(plan_ingest(manifest, p, force=force))
        except IngestError as exc:
            logger.error("%s", exc)
            summary[p.name] = {"status": Outcome.FAILED, "angles_written": 0, "error": str(exc)}
    manifest.layout.raw.mkdir(parents=True, exist_ok=True)
    work: list[tuple[IngestPlan, int, int]] = []
    tasks: list[Any] = []
    for plan in plans:
        check_interrupted()
        if not plan.todo:
            if plan.moved:
                _keep_moved(plan)
            summary[plan.name] = {"status": Outcome.UP_TO_DATE, "angles_written": 0, "seconds": 0.0}
            continue
        if plan.fresh:
            create_particle_store(
                plan.root, plan.name, plan.layout, plan.attrs, positions=plan.positions is not None
            )
        else:  # resuming: the store is not complete while angles are rewritten
            try:
                _clear_angles(plan)
            except Exception as exc:  # the store's metadata is damaged: start it again
                logger.warning("particle '%s': recreating %s (%s)", plan.name, plan.group_url, exc)
                plan.todo = list(range(len(plan.sources)))
                create_particle_store(
                    plan.root,
                    plan.name,
                    plan.layout,
                    plan.attrs,
                    positions=plan.positions is not None,
                )
        t = _tasks(plan)
        work.append((plan, len(tasks), len(tasks) + len(t)))
        tasks.extend(t)
        logger.info(
            "particle '%s': writing %d of %d angles", plan.name, len(plan.todo), len(plan.sources)
        )
    if tasks:
        start = time.perf_counter()
        try:
            results = compute(tasks, progress)
        except Exception:
            # a problem found while reading or writing (a bad file, a damaged store): report it
            # per particle, keep the others
            results = None
        seconds = time.perf_counter() - start
        if results is None:
            # re-run per particle so that good particles still complete
            for plan, _, _ in work:
                check_interrupted()
                try:
                    recs = compute(_tasks(plan), False)
                    _finalize(plan, recs)
                    summary[plan.name] = _ok(plan, seconds)
                except Exception as exc:
                    msg = _explain(plan, exc)
                    logger.error("%s", msg)
                    summary[plan.name] = {
                        "status": Outcome.FAILED,
                        "angles_written": 0,
                        "error": msg,
                    }
        else:
            for plan, lo, hi in work:
                check_interrupted()
                _finalize(plan, results[lo:hi])
                summary[plan.name] = _ok(plan, seconds)
    failed = {k: v for k, v in summary.items() if v["status"] == Outcome.FAILED}
    if failed:
        err = IngestError(
            f"ingest failed for {len(failed)} of {len(selected)} particle(s):\n"
            + "\n".join(f"  - {v['error']}" for v in failed.values())
        )
        err.summary = summary
        raise err
    return summary


def _refresh(plan: IngestPlan, sources: list[dict[str, Any] | None]) -> None:
    """Record the angles that are done but whose record is out of date: files moved or touched
    that hold the same data, and angles written before an interrupted ingest could record them
    (their records, and their done marks for the new modification time)."""
    if not plan.moved:
        return
    done = zarr.open_group(plan.group_url, mode="r+")["done"]
    sources += [None] * (len(plan.sources) - len(sources))
    for a, rec in plan.moved.items():
        kept = rec or _angle_record(plan.group_url, a)
        if not rec and kept and _recorded_paths(kept) == plan.sources[a].paths:
            sources[a] = kept  # finished, then interrupted before _finalize recorded it
        else:  # stores written before angles kept their records hash the files again
            sources[a] = _source_record(
                plan.sources[a], plan.base_dir, plan.checksum, kept or None, stat=False
            )
        done[a] = np.uint64(plan.fingerprints[a])


def _angle_record(group_url: str, angle: int) -> dict[str, Any] | None:
    """The source record :func:`_finish_angle` kept for one angle (None: none, an old store)."""
    return read_attrs(Path(group_url) / ANGLE_SOURCES / str(angle)) or None


def _keep_moved(plan: IngestPlan) -> None:
    """An up-to-date particle with out-of-date source records: only the records are updated."""
    group = zarr.open_group(plan.group_url, mode="r+")
    attrs = dict(group.attrs)
    sources = list(attrs.get("sources") or [])
    _refresh(plan, sources)
    group.attrs.put({**attrs, "sources": sources})
    logger.info(
        "particle '%s': %d angle file(s) moved, touched or unrecorded since ingest hold the "
        "ingested data: kept",
        plan.name,
        len(plan.moved),
    )


def _clear_angles(plan: IngestPlan) -> None:
    """Before angles of an existing store are written again: mark them not done, the store not
    complete, and delete their shards (a damaged shard is never read to be rewritten)."""
    group = zarr.open_group(plan.group_url, mode="r+")
    group.attrs.put(
        {**dict(group.attrs), "spndi_dask": {**plan.attrs["spndi_dask"], "complete": False}}
    )
    group.require_group(ANGLE_SOURCES)  # a store written before angles kept their records
    frames = Path(plan.group_url) / "frames" / "c"
    for a in plan.todo:
        group["done"][a] = 0
        shutil.rmtree(frames / str(a), ignore_errors=True)


def _explain(plan: IngestPlan, exc: BaseException) -> str:
    """A particle's ingest failure in words (a damaged store names the store and the fix)."""
    if isinstance(exc, IngestError):
        return str(exc)
    if isinstance(exc, SourceError):  # the angle file, not the store
        return f"particle '{plan.name}': {exc}"
    if is_damage(exc):
        return (
            f"particle '{plan.name}': {plan.group_url} is damaged ({type(exc).__name__}: {exc}); "
            f"`spndi ingest <manifest> --particles {plan.name} --force` writes it again"
        )
    return f"particle '{plan.name}': {type(exc).__name__}: {exc}"


def _ok(plan: IngestPlan, seconds: float) -> dict[str, Any]:
    return {
        "status": Outcome.INGESTED,
        "angles_written": len(plan.todo),
        "seconds": seconds,
        "raw_bytes": int(np.prod(plan.layout.shape)) * plan.layout.dtype.itemsize,
    }
