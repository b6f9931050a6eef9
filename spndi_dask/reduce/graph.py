"""The lazy graph of a particle's reduction: one read per scan tile, one fused task per block.

The ROI of a particle's frames is read in tiles of ``(all angles, whole raw shards of the scan,
ROI)`` (:func:`roi_frames`). One task per output block makes the per-(angle, y, x) moment sums
and the drift-corrected q-grid patterns from its tile and packed strips of the neighbouring
tiles (the halo of scan points the drift shift reaches), never from another read
(:func:`_block_graph`). Reads, strips and blocks carry raster-order priorities
(:func:`_raster_priority`) so a worker holds a couple of tiles and a row of strips, whatever the
scan's size; the per-particle constants of the block tasks (corrections, moment features, the
sparse q-grid operator) are made once per worker (:func:`_lazy_context`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import dask
import dask.array as da
import numpy as np
import zarr
from dask.highlevelgraph import HighLevelGraph, MaterializedLayer
from numcodecs import Blosc

from spndi_dask.geometry import q_sample
from spndi_dask.io.shards import region_reader
from spndi_dask.reduce import _fused as F
from spndi_dask.reduce import _kernels as K
from spndi_dask.reduce.plan import BeamtimeGrid, ParticlePlan

__all__ = ["roi_frames"]


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
    url = plan.frames_url
    shards = (plan.raw_layout or {}).get("shards") or [1, 16, 16]
    reader = _ROIReader(url, plan.roi, plan.frames_shape, plan.frames_dtype, direct=direct)
    na, ny, nx = plan.frames_shape[:3]
    chunks = (
        (na,),
        # a last row of tiles gives no strips; a last column gives `halo` columns to its left
        _tiles(ny, int(shards[1]), halo, last=1),
        _tiles(nx, int(shards[2]), halo, last=halo),
        (reader.shape[3],),
        (reader.shape[4],),
    )
    token = dask.base.tokenize(url, plan.roi, chunks, plan.raw_sources, direct)
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
    # masked ROI pixels are filled through the features and the q-grid operator (linear maps)
    features, var_weight = K.filled_features(
        K.moment_features(q - plan.h_projection, rows, cols), plan.fill
    )
    ctx: dict[str, Any] = {
        "features": features,
        "var_weight": var_weight,
        "var_features": K.variance_features(features),
        "offset": offset,
        "gain": gain,
        "background": plan.background,
        "saturation": plan.saturation,
        "scale": plan.scale.astype(np.float32),
    }
    if grid is not None:
        op, covered = K.grid_operator(plan.geometry, plan.angles, plan.roi, grid.points())
        op = K.fill_patterns_operator(op, plan.fill, len(plan.angles))
        ctx["operator"], ctx["voxels"] = K.used_voxels(op, len(plan.angles))
        ctx["covered"], ctx["n"] = covered, grid.n
    return ctx


def _lazy_context(plan: ParticlePlan, grid: BeamtimeGrid | None) -> Any:
    """:func:`_context` as a task (made on a worker, not in the client nor in the graph).

    The plan travels without what the context does not use (provenance, coordinates, warnings).
    """
    light = dataclasses.replace(plan, raw_sources=[], coords={}, warnings=())
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
        plan.fill is None,  # the fill follows from plan.bad and the ROI
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
        var_weight=ctx["var_weight"],
        var_features=ctx["var_features"],
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
