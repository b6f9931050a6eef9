"""The ingest tasks (module level: they run on dask workers): a tile of an angle's frames
written to its shards, then the angle's per-point and per-pixel arrays and its done mark.
"""

from __future__ import annotations

from typing import Any

import dask
import numpy as np
import zarr

from spndi_dask.ingest.errors import IngestError
from spndi_dask.ingest.plan import IngestPlan
from spndi_dask.ingest.records import _source_record
from spndi_dask.io.integrity import writable
from spndi_dask.io.raw_store import ANGLE_SOURCES
from spndi_dask.io.sources import (
    SourceInfo,
    XrfSource,
    read_per_point,
    read_pixel_mask,
    read_points,
    read_xrf,
)


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
                    f"scan '{particle}': {src} has {n_bad} NaN/infinite or negative values "
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
