"""Frames placed on the scan grid by their recorded positions (fly scans)."""

from __future__ import annotations

from typing import Any

import numpy as np

from spndi_dask.config import ScanSettings
from spndi_dask.ingest.errors import IngestError, _prefix
from spndi_dask.io.sources import SourceError, SourceInfo, is_tiff, read_per_point
from spndi_dask.positions import assign_to_grid, grid_origin

_UNITS = {"um": 1.0, "nm": 1e-3, "mm": 1e3}


def _read_positions(p: ScanSettings, info: SourceInfo) -> tuple[np.ndarray, np.ndarray]:
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
    p: ScanSettings, infos: list[SourceInfo]
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
