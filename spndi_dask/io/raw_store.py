"""``raw.zarr``: the ingested frames of every scan (Zarr v3, sharded) and its lazy view.

Layout, one group per scan::

    raw.zarr/<scan>/frames   (angle, y, x, det_row, det_col)  detector dtype, Blosc, sharded
                       /monitor  (angle, y, x) float64   incident flux (1 where none recorded)
                       /xrf      (angle, y, x) float64   fluorescence (NaN where none recorded)
                       /valid    (angle, y, x) bool      False for points an aborted scan lacks
                                                         (and grid nodes without a recorded
                                                         position)
                       /position_y, /position_x  (angle, y, x) float64  only for recorded
                                                         positions: those of the point placed on
                                                         each node, µm from node (0, 0) (NaN
                                                         where none)
                       /det_sum  (angle, det_row, det_col) float64  detector projection: the sum of
                                                         an angle's frames over all scan points
                       /flagged  (angle, det_row, det_col) uint32   frames of the angle in which the
                                                         pixel held the detector's invalid value
                                                         ([ingest] invalid_value; stored as 0)
                       /pixel_mask (angle, det_row, det_col) bool   the frame file's mask_dataset
                                                         (True = bad pixel; all False without one)
                       /done     (angle,)      uint64    source fingerprint once an angle is
                                                         completely written, else 0

Every chunk ends with a ``crc32c`` checksum and is written even where it holds only zeros
(:mod:`spndi_dask.io.integrity`), so a damaged or missing chunk is an error, never data.

Shards never span angles, so angles are written independently and resumably; ``done`` has one
chunk per angle, so marking an angle complete never races with another. The group attribute
``spndi_dask.complete`` is true only once every angle is done and provenance is recorded.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr
import zarr
from zarr.codecs import BloscCodec

from spndi_dask._deprecate import renamed_keyword
from spndi_dask.io.integrity import checksummed
from spndi_dask.io.layout import OutputLayout
from spndi_dask.stages import StageError

__all__ = [
    "ANGLE_SOURCES",
    "FRAME_DIMS",
    "IncompleteError",
    "RawLayout",
    "create_particle_store",
    "open_raw",
    "raw_path",
]

FRAME_DIMS = ("angle", "y", "x", "det_row", "det_col")
#: The group of a particle that keeps each finished angle's source record (a child group per
#: angle index, the record as its attributes) until ingest records them all in the particle's
#: ``sources`` attribute.
ANGLE_SOURCES = "angle_sources"


class IncompleteError(StageError, RuntimeError):
    """A raw store exists but its ingest has not finished."""


def raw_path(output_dir: str | Path) -> Path:
    """``<output>/raw.zarr``."""
    return OutputLayout(output_dir).raw


class RawLayout:
    """Chunk and shard shapes of a particle's frames array (the one chunking policy).

    One inner chunk is ``(1, *scan_chunk, *detector_chunk)`` (a detector tile of a small scan
    tile at one angle: what ``reduce`` reads for an ROI); one shard is ``(1, *scan_shard, whole
    detector rounded up to detector tiles)`` (one file per scan tile and angle: what one ingest
    task writes).
    """

    def __init__(
        self,
        shape: tuple[int, ...],
        dtype: Any,
        *,
        scan_chunk: tuple[int, int],
        scan_shard: tuple[int, int],
        detector_chunk: tuple[int, int],
        compressor: str = "lz4",
        clevel: int = 5,
    ) -> None:
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        ny, nx, nr, nc = self.shape[1:]
        dr, dc = min(detector_chunk[0], nr), min(detector_chunk[1], nc)
        cy, cx = min(scan_chunk[0], ny), min(scan_chunk[1], nx)
        sy = min(math.ceil(scan_shard[0] / cy), math.ceil(ny / cy)) * cy
        sx = min(math.ceil(scan_shard[1] / cx), math.ceil(nx / cx)) * cx
        self.chunks = (1, cy, cx, dr, dc)
        self.shards = (1, sy, sx, math.ceil(nr / dr) * dr, math.ceil(nc / dc) * dc)
        self.compressor = compressor
        self.clevel = clevel

    def codecs(self) -> list[Any]:
        """Compressors of the frames' inner chunks, ending with a ``crc32c`` checksum."""
        if self.compressor == "none":
            return checksummed([])
        return checksummed(
            [BloscCodec(cname=self.compressor, clevel=self.clevel, shuffle="bitshuffle")]
        )

    def tiles(self, max_bytes: int = 256 * 2**20) -> list[tuple[slice, slice]]:
        """``(y, x)`` regions of one angle, each a whole number of shards (one ingest task).

        A region is a band of shard rows spanning as many shard columns as fit in ``max_bytes``
        (the whole scan width when possible, so the source file is read once, in order).
        """
        ny, nx = self.shape[1:3]
        sy, sx = self.shards[1:3]
        shard_bytes = sy * sx * self.shape[3] * self.shape[4] * self.dtype.itemsize
        step = max(1, max_bytes // shard_bytes) * sx
        return [
            (slice(y, min(y + sy, ny)), slice(x, min(x + step, nx)))
            for y in range(0, ny, sy)
            for x in range(0, nx, step)
        ]

    def describe(self) -> dict[str, Any]:
        """JSON-ready description (compared on resume)."""
        return {
            # 2: with det_sum; 3: with flagged and pixel_mask (invalid values stored as 0)
            "format": 3,
            "shape": list(self.shape),
            "dtype": self.dtype.str,
            "chunks": list(self.chunks),
            "shards": list(self.shards),
            "compressor": self.compressor,
            "clevel": self.clevel,
        }


def create_particle_store(
    root: str | Path,
    name: str,
    layout: RawLayout,
    attrs: dict[str, Any],
    *,
    positions: bool = False,
) -> zarr.Group:
    """(Re)create the arrays of one particle in ``raw.zarr``; everything starts not done.

    ``positions``: also ``position_y``/``position_x`` (recorded positions of a fly scan).
    """
    group = zarr.open_group(str(root), mode="a").require_group(name)
    n_angle, ny, nx = layout.shape[:3]
    for child in list(group.keys()):
        del group[child]
    group.create_array(
        "frames",
        shape=layout.shape,
        dtype=layout.dtype,
        chunks=layout.chunks,
        shards=layout.shards,
        compressors=layout.codecs(),
        fill_value=0,
        dimension_names=FRAME_DIMS,
    )
    per_angle = {
        "shape": (n_angle, ny, nx),
        "chunks": (1, ny, nx),
        "dimension_names": ("angle", "y", "x"),
        "compressors": checksummed(None),
    }
    group.create_array("monitor", dtype="float64", fill_value=1.0, **per_angle)
    group.create_array("xrf", dtype="float64", fill_value=float("nan"), **per_angle)
    group.create_array("valid", dtype="bool", fill_value=False, **per_angle)
    if positions:
        for axis in ("y", "x"):
            group.create_array(
                f"position_{axis}", dtype="float64", fill_value=float("nan"), **per_angle
            )
    group.create_array(
        "det_sum",
        shape=(n_angle, *layout.shape[3:]),
        chunks=(1, *layout.shape[3:]),
        dtype="float64",
        fill_value=0.0,
        dimension_names=("angle", "det_row", "det_col"),
        compressors=checksummed(None),
    )
    per_pixel = {
        "shape": (n_angle, *layout.shape[3:]),
        "chunks": (1, *layout.shape[3:]),
        "dimension_names": ("angle", "det_row", "det_col"),
        "compressors": checksummed(None),
    }
    group.create_array("flagged", dtype="uint32", fill_value=0, **per_pixel)
    group.create_array("pixel_mask", dtype="bool", fill_value=False, **per_pixel)
    group.create_array(
        "done",
        shape=(n_angle,),
        chunks=(1,),
        dtype="uint64",
        fill_value=0,
        dimension_names=("angle",),
        compressors=checksummed(None),
    )
    group.require_group(ANGLE_SOURCES)
    group.attrs.put({**attrs, "spndi_dask": {**attrs.get("spndi_dask", {}), "complete": False}})
    return group


@renamed_keyword(particle="scan")
def open_raw(
    output_dir: str | Path,
    scan: str,
    *,
    chunks: tuple[int, ...] | None = None,
    allow_incomplete: bool = False,
) -> xr.Dataset:
    """Lazy xarray view of one scan's ingested frames.

    Parameters
    ----------
    output_dir : path
        The results directory (holding ``raw.zarr``), or the ``raw.zarr`` path itself.
    scan : str
        Scan name (``particle`` is its deprecated name).
    chunks : tuple, optional
        dask chunks of ``frames``; default one shard (never the tiny inner chunks).
    allow_incomplete : bool
        Open a store whose ingest has not finished (angles not done read as 0 / invalid).

    Returns
    -------
    xarray.Dataset
        ``frames(angle, y, x, det_row, det_col)`` (dask), ``monitor``, ``xrf``, ``valid``; coords
        ``angle`` (deg), ``y``/``x`` (µm); ``det_sum``, ``flagged`` and ``pixel_mask``
        ``(angle, det_row, det_col)`` (the detector projection, the counts of invalid values and
        the frame files' pixel mask recorded at ingest, where the store has them);
        ``position_y``/``position_x`` (angle, y, x) when ingested from recorded positions (µm, in
        the frame of the ``y``/``x`` coordinates: node (0, 0) at
        ``attrs["positions"]["origin_um"]``); provenance in
        ``attrs``.
    """
    root = Path(output_dir)
    if root.suffix != ".zarr":
        root = raw_path(root)
    if not (root / scan / "zarr.json").exists():
        have = (
            sorted(p.name for p in root.iterdir() if (p / "zarr.json").exists())
            if (root.exists())
            else []
        )
        raise FileNotFoundError(
            f"no ingested scan {scan!r} in {root} (have: {have or 'none'}); run "
            "`spndi ingest beamtime.toml` first"
        )
    group = zarr.open_group(str(root / scan), mode="r")
    attrs = dict(group.attrs)
    if not attrs.get("spndi_dask", {}).get("complete") and not allow_incomplete:
        done = np.asarray(group["done"][:])
        missing = np.flatnonzero(done == 0).tolist()
        raise IncompleteError(
            f"{root / scan} is incomplete (angle indices {missing} not ingested); re-run "
            "`spndi ingest` to finish it, or pass allow_incomplete=True"
        )
    frames = group["frames"]
    shards = frames.shards or frames.chunks
    arr = da.from_zarr(frames, chunks=chunks or shards)
    n_angle, ny, nx = frames.shape[:3]
    step = attrs.get("scan_step_um", [1.0, 1.0])
    coords = {
        "angle": (
            "angle",
            np.asarray(attrs.get("angles_deg", np.arange(n_angle)), float),
            {"units": "deg", "long_name": "rocking angle"},
        ),
        "y": ("y", np.arange(ny) * step[0], {"units": "µm", "long_name": "scan position y"}),
        "x": ("x", np.arange(nx) * step[1], {"units": "µm", "long_name": "scan position x"}),
        "det_row": np.arange(frames.shape[3]),
        "det_col": np.arange(frames.shape[4]),
    }
    per_angle = (1, ny, nx)
    data = {
        "frames": (FRAME_DIMS, arr),
        "monitor": (("angle", "y", "x"), da.from_zarr(group["monitor"], chunks=per_angle)),
        "xrf": (("angle", "y", "x"), da.from_zarr(group["xrf"], chunks=per_angle)),
        "valid": (("angle", "y", "x"), da.from_zarr(group["valid"], chunks=per_angle)),
    }
    for name in ("position_y", "position_x"):
        if name in group:
            data[name] = (("angle", "y", "x"), da.from_zarr(group[name], chunks=per_angle))
    for name in ("det_sum", "flagged", "pixel_mask"):
        if name in group:
            det = group[name]
            data[name] = (("angle", "det_row", "det_col"), da.from_zarr(det, chunks=det.shape))
    return xr.Dataset(data, coords=coords, attrs=attrs)
