"""Fused numba kernels: one pass over a raw block of frames, corrections applied on the fly.

The NumPy kernels of :mod:`._kernels` (:func:`~._kernels.corrected`,
:func:`~._kernels.moment_sums`, :func:`~._kernels.patterns_block`) define the results; these
compute the same numbers one angle at a time, in scratch buffers reused across blocks, instead
of materialising the corrected float32 block, its variance, masks and transposed copies (five to
six block-sized temporaries), which made the reduction several times slower than reading the
frames and its memory grow with the block size. The tests compare both paths on the same blocks.

Per angle: :func:`_correct_angle` corrects the core points (all voxels, for the moments) and the
halo points this angle's drift shift reads (only the voxels the q-grid operator uses), one row
per point; :func:`_shift_t` shifts them back by the drift into voxel-major columns; after the
last angle :func:`_apply_operator_t` grids all columns at once.

Corrections (as :func:`~._kernels.corrected`): ``w = (raw − offset) · gain · scale − bg``,
``var = max(raw − offset, 0) · (gain · scale)²``, with 0 where the point is invalid
(``scale == 0``), the pixel is masked (``gain == 0``) or the value is saturated or not finite.
Masked pixels are filled by the moment features (:func:`~._kernels.filled_features`) and the
q-grid operator (:func:`~._kernels.fill_patterns_operator`), not here; the variance of a voxel
is weighted by ``var_weight`` (the voxels it stands in for), and the saturated voxels of a
measured pixel at a valid point are counted per point.
"""

from __future__ import annotations

import math
import threading
from typing import Any, NamedTuple

import numba
import numpy as np

from spndi_dask.reduce._kernels import FEATURES, MOMENTS, VARIANCES, variance_features

__all__ = ["Mosaic", "block_reduce", "correction_tables"]

# no 'nnan'/'ninf': the saturation test must see NaN voxels
_FAST = {"nsz", "arcp", "contract", "afn", "reassoc"}


def correction_tables(
    shape: tuple[int, int],
    *,
    dark: np.ndarray | None,
    flat: np.ndarray | None,
    bad: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(offset, gain)`` per ROI pixel (float32): dark, and 1/flat with 0 at masked pixels."""
    offset = np.zeros(shape, np.float32) if dark is None else np.asarray(dark, np.float32)
    gain = np.ones(shape, np.float32) if flat is None else (1.0 / flat).astype(np.float32)
    if bad is not None:
        gain = np.where(bad, np.float32(0), gain)
    gain = np.where(np.isfinite(gain), gain, np.float32(0))
    return np.ascontiguousarray(offset), np.ascontiguousarray(gain)


#: Pieces of a :class:`Mosaic` (unused slots hold an empty array: one numba signature).
MAX_PIECES = 9


class Mosaic(NamedTuple):
    """A block of frames ``(n_angle, ny, nx, n_row, n_col)`` made of pieces, never copied whole.

    Point ``(y, x)`` of the block is ``pieces[source[y, x]][:, row[y, x], col[y, x]]``, zero
    where ``source`` is −1. A scan tile and the strips of its neighbours form the extended block
    of the drift shift without assembling (copying) it.
    """

    pieces: tuple[np.ndarray, ...]
    source: np.ndarray  # (ny, nx) int64
    row: np.ndarray  # (ny, nx) int64
    col: np.ndarray  # (ny, nx) int64

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        """``(n_angle, ny, nx, n_row, n_col)``."""
        na, _, _, nr, nc = self.pieces[0].shape
        return (na, *self.source.shape, nr, nc)

    @classmethod
    def of(cls, raw: np.ndarray) -> Mosaic:
        """The mosaic of one whole array."""
        return cls.from_grid([[raw]], [raw.shape[1]], [raw.shape[2]])

    @classmethod
    def from_grid(
        cls, parts: list[list[np.ndarray | None]], heights: list[int], widths: list[int]
    ) -> Mosaic:
        """Bands of ``heights`` × ``widths`` scan points; ``parts[i][j]`` fills band (i, j)
        (shape ``(n_angle, heights[i], widths[j], n_row, n_col)``) or is None (zeros)."""
        given = [p for row in parts for p in row if p is not None]
        if not given:
            raise ValueError("a mosaic needs at least one piece")
        if len(given) > MAX_PIECES:
            raise ValueError(f"a mosaic holds at most {MAX_PIECES} pieces")
        ref = given[0]
        pieces, ys, xs = [], np.cumsum([0, *heights]), np.cumsum([0, *widths])
        source = np.full((ys[-1], xs[-1]), -1, np.int64)
        row, col = np.zeros_like(source), np.zeros_like(source)
        for i, band in enumerate(parts):
            for j, part in enumerate(band):
                if part is None:
                    continue
                want = (ref.shape[0], heights[i], widths[j], *ref.shape[3:])
                if part.shape != want or part.dtype != ref.dtype:
                    raise ValueError(f"piece ({i}, {j}) is {part.shape} {part.dtype}, not {want}")
                sy, sx = slice(ys[i], ys[i + 1]), slice(xs[j], xs[j + 1])
                source[sy, sx] = len(pieces)
                row[sy, sx] = np.arange(heights[i])[:, None]
                col[sy, sx] = np.arange(widths[j])[None, :]
                pieces.append(np.ascontiguousarray(part))
        empty = np.empty((ref.shape[0], 0, 0, *ref.shape[3:]), ref.dtype)
        pieces += [empty] * (MAX_PIECES - len(pieces))
        return cls(tuple(pieces), source, row, col)


@numba.njit(cache=True, nogil=True, fastmath=_FAST, inline="always")
def _corrected(f, offset, gain, b, sat):  # pragma: no cover
    """``(w, var)`` of one voxel value ``f`` (``gain`` includes the monitor scale)."""
    zero = np.float32(0)
    if f < sat and gain != zero:  # False for NaN
        d = f - offset
        return d * gain - b, max(d, zero) * gain * gain
    return zero, zero


@numba.njit(cache=True, nogil=True, fastmath=_FAST)
def _correct_angle(
    pieces,
    source,
    prow,
    pcol,
    rank,
    a,
    scale,
    offset,
    gain,
    var_weight,
    b,
    sat,
    halo,
    window,
    voxels,
    w,
    var_rows,
    var_out,
    sat_out,
):  # pragma: no cover
    """Corrected intensities of angle ``a`` of a :class:`Mosaic` block, one row per point.

    Point ``(y, x)`` of the block is ``pieces[source[y, x]][a, prow[y, x], pcol[y, x]]``, or
    zero where ``source`` is −1 (outside the scan); it goes into row ``rank[y, x]`` of
    ``w (points, row · col)``. Core points (``halo`` inside the block's edge) are corrected
    whole, with each voxel's variance into ``var_rows[rank]`` (core points come first), Σ var ·
    var_weight per point into ``var_out[rank]`` and the number of saturated
    voxels (of unmasked pixels at a valid point) into ``sat_out[rank]``; halo points only
    inside ``window``
    ``(y0, y1, x0, x1)`` (where the drift shift of this angle reads; empty without ``voxels``)
    and only at ``voxels``. ``offset`` and ``gain`` are flat (row · col).
    """
    ny, nx = source.shape
    nv = offset.shape[0]
    y0, y1, x0, x1 = window
    zero = np.float32(0)
    for y in range(ny):
        for x in range(nx):
            core = halo <= y < ny - halo and halo <= x < nx - halo
            if not core and not (y0 <= y < y1 and x0 <= x < x1):
                continue
            out = w[rank[y, x]]
            k = source[y, x]
            vs = zero
            ns = zero
            if k < 0:
                if core:
                    out[:] = zero
                    var_rows[rank[y, x]] = zero
                else:
                    for v in voxels:
                        out[v] = zero
            else:
                raw = pieces[k][a, prow[y, x], pcol[y, x]].reshape(nv)
                s = scale[a, y, x]
                if core:
                    vrow = var_rows[rank[y, x]]
                    for v in range(nv):
                        f = np.float32(raw[v])
                        g = gain[v] * s
                        out[v], var = _corrected(f, offset[v], g, b, sat)
                        vrow[v] = var
                        vs += var * var_weight[v]
                        if f >= sat and g != zero:
                            ns += np.float32(1)
                else:
                    for v in voxels:
                        out[v] = _corrected(np.float32(raw[v]), offset[v], gain[v] * s, b, sat)[0]
            if core:
                var_out[rank[y, x]] = vs
                sat_out[rank[y, x]] = ns


@numba.njit(cache=True, nogil=True, fastmath=_FAST)
def _shift_t(w, rank, iy, ix, fy, fx, halo, ty, tx, voxels, out):  # pragma: no cover
    """``out[j, y·tx + x] = Σ bilinear w[rank[halo + y + iy + oy, halo + x + ix + ox], voxels[j]]``.

    The drift shift of one angle and the transposition to voxel-major columns (for
    :func:`_apply_operator_t`) in one pass, one output point at a time (its four source rows
    read along the voxels; the column of ``out`` it writes stays in cache across a tile row).
    Unused taps have weight 0 and offset 0 (a point :func:`_correct_angle` wrote: never
    0 × garbage).
    """
    wts = np.zeros(4, np.float32)
    oys = np.zeros(4, np.int64)
    oxs = np.zeros(4, np.int64)
    k = 0
    for oy in range(2):
        for ox in range(2):
            wt = (fy if oy else 1 - fy) * (fx if ox else 1 - fx)
            if wt != 0:
                wts[k], oys[k], oxs[k] = wt, oy, ox
                k += 1
    w0, w1, w2, w3 = wts[0], wts[1], wts[2], wts[3]
    for y in range(ty):
        for x in range(tx):
            r0 = w[rank[halo + y + iy + oys[0], halo + x + ix + oxs[0]]]
            r1 = w[rank[halo + y + iy + oys[1], halo + x + ix + oxs[1]]]
            r2 = w[rank[halo + y + iy + oys[2], halo + x + ix + oxs[2]]]
            r3 = w[rank[halo + y + iy + oys[3], halo + x + ix + oxs[3]]]
            p = y * tx + x
            for j in range(voxels.shape[0]):
                v = voxels[j]
                out[j, p] = w0 * r0[v] + w1 * r1[v] + w2 * r2[v] + w3 * r3[v]


@numba.njit(cache=True, nogil=True, fastmath=_FAST)
def _apply_operator_t(indptr, indices, data, columns, out):  # pragma: no cover
    """``out = max(operator @ columns, 0).T`` for a CSR operator, without temporaries."""
    n_rows, n_points = indptr.shape[0] - 1, columns.shape[1]
    step = 16
    tmp = np.empty((step, n_points), np.float32)
    for g0 in range(0, n_rows, step):
        g1 = min(g0 + step, n_rows)
        tmp[:] = 0
        for g in range(g0, g1):
            for k in range(indptr[g], indptr[g + 1]):
                d = data[k]
                col = indices[k]
                for p in range(n_points):
                    tmp[g - g0, p] += d * columns[col, p]
        for p in range(n_points):
            for g in range(g0, g1):
                v = tmp[g - g0, p]
                out[p, g] = v if v > 0 else np.float32(0)


_LOCAL = threading.local()


def _workspace(name: str, shape: tuple[int, ...], dtype: Any = np.float32) -> np.ndarray:
    """A scratch array kept per thread and reused across blocks.

    dask workers release freed memory to the system eagerly (``MALLOC_TRIM_THRESHOLD_``), so
    allocating block-sized temporaries anew for every block costs page faults that doubled the
    time of a block; the scratch arrays are allocated once per worker thread instead.
    """
    cache = _LOCAL.__dict__.setdefault("buffers", {})
    size = math.prod(shape)
    buf = cache.get(name)
    if buf is None or buf.size < size or buf.dtype != np.dtype(dtype):
        buf = cache[name] = np.empty(size, dtype)
    return buf[:size].reshape(shape)


def block_reduce(
    raw: np.ndarray | Mosaic,
    scale: np.ndarray,
    drift: np.ndarray | None,
    *,
    offset: np.ndarray,
    gain: np.ndarray,
    background: np.ndarray,
    saturation: float | None,
    features: np.ndarray,
    var_weight: np.ndarray | None = None,
    var_features: np.ndarray | None = None,
    operator: Any = None,
    voxels: list[np.ndarray] | None = None,
    halo: int = 0,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Moment sums and drift-corrected q-grid patterns of the core points of a raw block.

    Parameters
    ----------
    raw : array (n_angle, ty + 2 halo, tx + 2 halo, n_row, n_col), any real dtype, or Mosaic
    scale : array (n_angle, ty + 2 halo, tx + 2 halo)
        Monitor normalisation per point, 0 for invalid points (and outside the scan).
    drift : array (n_angle, 2) or None
        Content displacement per angle (needed with ``operator``).
    offset, gain : arrays (n_row, n_col)
        From :func:`correction_tables`.
    background : array (n_angle,)
    saturation : float or None
    features : array (n_angle, n_row · n_col, FEATURES)
        From :func:`~._kernels.moment_features` (through :func:`~._kernels.filled_features`
        where masked pixels are filled).
    var_weight : array (n_row · n_col,), optional
        Weight of each voxel's variance (from :func:`~._kernels.filled_features`; default 1).
    var_features : array (n_angle, n_row · n_col, 9), optional
        :func:`~._kernels.variance_features` of ``features`` (computed when not given).
    operator : scipy.sparse.csr_matrix (n_grid, n_voxel), optional
        q-grid operator over ``voxels`` (:func:`~._kernels.used_voxels`); None skips patterns.
    voxels : list of int arrays, optional
        Per angle, the ROI voxels (``row · n_col + col``) the operator's columns refer to;
        default all voxels.
    halo : int
        Scan points around the core (read for the drift shift only).

    Returns
    -------
    moments : numpy.ndarray (n_angle, ty, tx, len(MOMENTS)), float64
        As :func:`~._kernels.moment_sums` of the (unshifted) core.
    patterns : numpy.ndarray (ty · tx, n_grid), float32, or None
        As :func:`~._kernels.patterns_block`: corrected voxels shifted back by the drift
        (bilinear), interpolated onto the grid, clipped at 0.
    """
    mosaic = raw if isinstance(raw, Mosaic) else Mosaic.of(raw)
    na, ny, nx, nr, nc = mosaic.shape
    ty, tx, nv = ny - 2 * halo, nx - 2 * halo, nr * nc
    scale = np.ascontiguousarray(scale, np.float32)
    background = np.asarray(background, np.float32)
    sat = np.float32(np.inf if saturation is None else saturation)
    offset, gain = offset.reshape(nv), gain.reshape(nv)
    if var_weight is None:
        var_weight = np.ones(nv, np.float32)
    var_weight = np.ascontiguousarray(var_weight, np.float32).reshape(nv)
    if var_features is None:
        var_features = variance_features(features)
    var_features = np.asarray(var_features, np.float32)
    features = np.asarray(features, np.float32)
    # rows of the point-major buffer: the core points first (in raster order), then the halo
    core = np.zeros((ny, nx), bool)
    core[halo : ny - halo, halo : nx - halo] = True
    rank = np.empty((ny, nx), np.int64)
    rank[core] = np.arange(ty * tx)
    rank[~core] = np.arange(ty * tx, ny * nx)
    no_voxels = np.empty(0, np.int64)
    moments = np.empty((na, ty, tx, len(MOMENTS)), np.float64)
    columns = None
    if operator is not None:
        if drift is None:
            raise ValueError("patterns need the drift")
        drift = np.asarray(drift, np.float64)
        if not np.isfinite(drift).all():
            raise ValueError("the drift is not finite (NaN or inf)")
        shift_i = np.floor(drift).astype(np.int64)
        shift_f = drift - shift_i
        reach = np.maximum(np.abs(shift_i), np.abs(shift_i + (shift_f > 0)))
        if len(reach) and reach.max() > halo:
            a = int(np.argmax(reach.max(axis=1)))
            raise ValueError(
                f"shift {tuple(np.round(drift[a], 2))} at angle {a} exceeds the halo of {halo}"
            )
        if voxels is None:
            voxels = [np.arange(nv)] * na
        voxels = [np.asarray(v, np.int64) for v in voxels]
        starts = np.cumsum([0, *map(len, voxels)])
        if operator.shape[1] != starts[-1]:
            raise ValueError(f"operator has {operator.shape[1]} columns for {starts[-1]} voxels")
        columns = _workspace("columns", (int(starts[-1]), ty * tx))
    w = _workspace("w", (ny * nx, nv))
    var_rows = _workspace("var_rows", (ty * tx, nv))
    m_var = _workspace("m_var", (ty * tx, var_features.shape[-1]))
    var = _workspace("var", (ty * tx,))
    n_sat = _workspace("n_saturated", (ty * tx,))
    m_features = _workspace("m_features", (ty * tx, FEATURES))
    for a in range(na):
        used = voxels[a] if columns is not None else no_voxels
        if len(used):
            # the points the shift of this angle reads (taps of weight 0 read offset 0)
            y0, x0 = halo + shift_i[a]
            window = (y0, y0 + ty + (shift_f[a, 0] > 0), x0, x0 + tx + (shift_f[a, 1] > 0))
        else:
            window = (0, 0, 0, 0)
        _correct_angle(
            *mosaic,
            rank,
            a,
            scale,
            offset,
            gain,
            var_weight,
            background[a],
            sat,
            halo,
            window,
            used,
            w,
            var_rows,
            var,
            n_sat,
        )
        np.matmul(w[: ty * tx], features[a], out=m_features)
        moments[a, ..., :FEATURES] = m_features.reshape(ty, tx, FEATURES)
        moments[a, ..., FEATURES] = var.reshape(ty, tx)
        moments[a, ..., FEATURES + 1] = n_sat.reshape(ty, tx)
        np.matmul(var_rows, var_features[a], out=m_var)
        moments[a, ..., VARIANCES] = m_var.reshape(ty, tx, -1)
        if len(used):
            _shift_t(
                w,
                rank,
                shift_i[a, 0],
                shift_i[a, 1],
                np.float32(shift_f[a, 0]),
                np.float32(shift_f[a, 1]),
                halo,
                ty,
                tx,
                used,
                columns[starts[a] : starts[a + 1]],
            )
    if columns is None:
        return moments, None
    data = np.asarray(operator.data, np.float32)
    patterns = np.empty((ty * tx, operator.shape[0]), np.float32)
    _apply_operator_t(operator.indptr, operator.indices, data, columns, patterns)
    return moments, patterns
