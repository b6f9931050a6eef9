"""Pure NumPy kernels of the reduction (no dask, no I/O): each is testable on hand-made arrays.

Conventions: a block of frames is ``(angle, y, x, det_row, det_col)`` restricted to the ROI;
``dq`` are voxel momentum transfers minus a reference vector (1/Å, sample frame); the moment
channels of :data:`MOMENTS` are additive over voxels, scan points and angles. Kernels other
stages use too (scan shifts, usable patterns) live in :mod:`spndi_dask.kernels`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import ndimage, sparse
from skimage.registration import phase_cross_correlation

from spndi_dask.geometry import Geometry, axis_vector, rotation_matrix
from spndi_dask.kernels import shift_bilinear

__all__ = [
    "FEATURES",
    "MOMENTS",
    "bad_pixels",
    "corrected",
    "fill_operator",
    "fill_patterns_operator",
    "filled_features",
    "find_roi",
    "grid_operator",
    "maps_from_moments",
    "module_gaps",
    "moment_features",
    "moment_sums",
    "parabolic_peak",
    "patterns_block",
    "register_chain",
    "register_to_reference",
    "solve_rocking_angle",
    "used_voxels",
]

#: Channels of the per-(angle, y, x) moment sums. ``w`` is the corrected intensity of a voxel,
#: ``dq`` its q minus the reference, ``row``/``col`` its detector pixel, ``w_filled`` the part of
#: ``w`` filled into masked detector pixels from their neighbours (:func:`fill_operator`),
#: ``var`` the Poisson variance of ``w`` (for the signal-to-noise test), ``n_saturated`` the
#: number of voxels masked as saturated. The first :data:`FEATURES` channels are ``w @ features``
#: (:func:`moment_features`).
MOMENTS = (
    "w",
    "w_dqx",
    "w_dqy",
    "w_dqz",
    "w_dqxx",
    "w_dqyy",
    "w_dqzz",
    "w_dqxy",
    "w_dqxz",
    "w_dqyz",
    "w_row",
    "w_col",
    "w_filled",
    "var",
    "n_saturated",
)
#: Channels made from per-voxel features (all before ``var``).
FEATURES = MOMENTS.index("var")
_VAR, _FILLED, _SATURATED = MOMENTS.index("var"), MOMENTS.index("w_filled"), FEATURES + 1
_PAIRS = ((0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2))


# -- detector ---------------------------------------------------------------------------------
def _fill_local(images: np.ndarray, masked: np.ndarray) -> np.ndarray:
    """``images (n, rows, cols)`` with masked pixels replaced by the local mean of unmasked ones.

    The window grows (5, 9, 17, ... pixels) until it holds unmasked pixels; the median of all
    unmasked pixels fills what none reaches.
    """
    out = np.array(images, dtype=np.float64)
    weight = (~masked).astype(np.float64)
    todo = masked.copy()
    size = 5
    while todo.any() and size < 2 * max(masked.shape) + 1:
        num = ndimage.uniform_filter(out * weight, size=(1, size, size), mode="constant")
        den = ndimage.uniform_filter(weight, size=size, mode="constant")
        reached = todo & (den > 1e-9)
        out[:, reached] = num[:, reached] / den[reached]
        todo &= ~reached
        size = 2 * size - 1
    if todo.any():
        out[:, todo] = np.median(out[:, ~masked], axis=1)[:, None] if (~masked).any() else 0.0
    return out


def bad_pixels(
    det_sum: np.ndarray,
    *,
    masked: np.ndarray | None = None,
    hot_sigma: float = 10.0,
    hot_ratio: float = 3.0,
    hot_fraction: float = 0.8,
    min_expected: float = 20.0,
    size: int = 5,
) -> tuple[np.ndarray, np.ndarray]:
    """Hot and dead pixels from the per-angle detector projections.

    A pixel is *hot* when, in at least ``hot_fraction`` of the angles, its projection exceeds the
    ``size × size`` median of its neighbourhood by ``hot_sigma`` Poisson standard deviations and
    by a factor ``hot_ratio`` (a Bragg peak spans many pixels and moves with the rocking angle;
    a hot pixel is a lone outlier at every angle). It is *dead* when it counted nothing over all
    angles where its neighbourhood median expected at least ``min_expected`` counts.

    Parameters
    ----------
    det_sum : array (n_angle, n_row, n_col)
        Sum of each angle's frames over the scan points.
    masked : bool array (n_row, n_col), optional
        Pixels already masked for another reason (module gaps, flagged, mask files): left out of
        the neighbourhoods (replaced by the local mean of the others) and never hot or dead, so
        the pixels beside a wide gap are not taken for hot ones.

    Returns
    -------
    hot, dead : bool arrays (n_row, n_col)

    Examples
    --------
    >>> s = np.full((3, 9, 9), 50.0); s[:, 4, 4] = 5000.0; s[:, 1, 1] = 0.0
    >>> hot, dead = bad_pixels(s)
    >>> np.argwhere(hot).tolist(), np.argwhere(dead).tolist()
    ([[4, 4]], [[1, 1]])
    """
    det_sum = np.asarray(det_sum, dtype=np.float64)
    na, nr, nc = det_sum.shape
    if masked is not None and masked.any():
        det_sum = _fill_local(det_sum, masked)

    def outliers(values: np.ndarray, med: np.ndarray) -> np.ndarray:
        excess = values - med
        return (excess > hot_sigma * np.sqrt(med + 1.0)) & (values > hot_ratio * (med + 1.0))

    # the median is at least the minimum: pixels that are no outlier even against the minimum
    # of their neighbourhood cannot be hot, and the (slow) median is needed only at the rest
    low = ndimage.minimum_filter(det_sum, size=(1, size, size), mode="nearest")
    maybe = np.flatnonzero(outliers(det_sum, low).mean(axis=0) >= hot_fraction)
    hot = np.zeros((nr, nc), bool)
    if len(maybe) > nr * nc // 8:
        med = ndimage.median_filter(det_sum, size=(1, size, size), mode="nearest")
        hot = outliers(det_sum, med).mean(axis=0) >= hot_fraction
    elif len(maybe):
        half = size // 2
        padded = np.pad(det_sum, ((0, 0), (half, half), (half, half)), mode="edge")
        windows = np.lib.stride_tricks.sliding_window_view(padded, (size, size), axis=(1, 2))
        r, c = np.unravel_index(maybe, (nr, nc))
        med = np.median(windows[:, r, c].reshape(na, len(maybe), -1), axis=-1)
        hot.flat[maybe] = outliers(det_sum[:, r, c], med).mean(axis=0) >= hot_fraction
    total = det_sum.sum(axis=0)
    med_total = ndimage.median_filter(total, size=size, mode="nearest")
    dead = (total <= 1e-3 * med_total) & (med_total >= min_expected) & ~hot
    if masked is not None:
        hot &= ~masked
        dead &= ~masked
    return hot, dead


def find_roi(
    projection: np.ndarray,
    bad: np.ndarray | None = None,
    *,
    padding: int = 8,
    n_sigma: float = 5.0,
    min_pixels: int = 3,
) -> tuple[tuple[int, int, int, int] | None, bool]:
    """Bragg-peak region of interest from the detector projection (summed over angles and scan).

    Bad pixels are replaced by their neighbourhood median; the background level and noise are
    the median and the MAD of the projection; pixels ``n_sigma`` above it form the peak (groups
    of fewer than ``min_pixels`` are dropped as noise). The bounding box, padded by ``padding``
    and clipped to the detector, is returned as ``(row_start, row_stop, col_start, col_stop)``.

    Returns
    -------
    roi : tuple or None
        None when no pixel stands out (no Bragg signal).
    at_edge : bool
        The padded ROI touches the detector edge (the peak may be cut off).

    Examples
    --------
    >>> p = np.random.default_rng(0).poisson(100.0, (64, 64)).astype(float)
    >>> p[20:26, 30:34] += 5000.0
    >>> find_roi(p, padding=2)
    ((18, 28, 28, 36), False)
    """
    proj = np.asarray(projection, dtype=np.float64).copy()
    if bad is not None and bad.any():
        proj[bad] = ndimage.median_filter(proj, size=5, mode="nearest")[bad]
    level = np.median(proj)
    noise = max(1.4826 * np.median(np.abs(proj - level)), math.sqrt(max(level, 1.0)))
    peak = proj > level + n_sigma * noise
    labels, n = ndimage.label(peak)
    if n == 0:
        return None, False
    sizes = ndimage.sum_labels(peak, labels, index=np.arange(1, n + 1))
    keep = np.isin(labels, 1 + np.flatnonzero(sizes >= min_pixels))
    if not keep.any():
        return None, False
    rows, cols = np.flatnonzero(keep.any(axis=1)), np.flatnonzero(keep.any(axis=0))
    nr, nc = proj.shape
    r0, r1 = max(rows[0] - padding, 0), min(rows[-1] + 1 + padding, nr)
    c0, c1 = max(cols[0] - padding, 0), min(cols[-1] + 1 + padding, nc)
    at_edge = r0 == 0 or c0 == 0 or r1 == nr or c1 == nc
    return (int(r0), int(r1), int(c0), int(c1)), bool(at_edge)


def _runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Runs of True along the last axis of a 2-D mask: ``(lane, start, stop)`` of each."""
    padded = np.zeros((mask.shape[0], mask.shape[1] + 2), np.int8)
    padded[:, 1:-1] = mask
    step = np.diff(padded, axis=1)
    lane, start = np.nonzero(step == 1)
    _, stop = np.nonzero(step == -1)
    return lane, start, stop


def _paint(shape: tuple[int, int], lane: np.ndarray, start: np.ndarray, stop: np.ndarray) -> Any:
    """A bool mask of ``shape`` True on the runs ``(lane, start:stop)`` along the last axis."""
    out = np.zeros(shape, bool)
    lengths = stop - start
    if len(lengths):
        first = np.repeat(np.cumsum(lengths) - lengths, lengths)
        out[
            np.repeat(lane, lengths), np.repeat(start, lengths) + np.arange(lengths.sum()) - first
        ] = True
    return out


def _gap_lines(
    zero: np.ndarray, total: np.ndarray, *, min_length: int, max_width: int, min_border: float
) -> np.ndarray:
    """Gap lines running along the last axis (rows of zeros across columns), with crossings."""
    n = zero.shape[0]
    # thin across: zero runs down a column at most max_width long whose neighbours (before and
    # after, where on the detector) counted at least min_border
    lane, a, b = _runs(zero.T)
    before = np.where(a > 0, total[np.maximum(a - 1, 0), lane], np.inf)
    after = np.where(b < n, total[np.minimum(b, n - 1), lane], np.inf)
    thin = (b - a <= max_width) & (np.minimum(before, after) >= min_border)
    thin &= (a > 0) | (b < n)
    across = _paint(zero.T.shape, lane[thin], a[thin], b[thin]).T
    # bridges: zeros between such pixels on both sides, where a gap across this one passes
    lane, s, e = _runs(zero & ~across)
    m = zero.shape[1]
    left = (s > 0) & across[lane, np.maximum(s - 1, 0)]
    right = (e < m) & across[lane, np.minimum(e, m - 1)]
    bridge = (e - s <= max_width) & left & right
    line = across | _paint(zero.shape, lane[bridge], s[bridge], e[bridge])
    # long along: at least min_length pixels in a row
    lane, s, e = _runs(line)
    keep = e - s >= min_length
    return _paint(zero.shape, lane[keep], s[keep], e[keep])


def module_gaps(
    total: np.ndarray,
    *,
    min_length: int = 8,
    max_width: int = 20,
    min_border: float = 5.0,
) -> np.ndarray:
    """Module and chip gaps: straight lines of pixels that counted nothing, between pixels that did.

    Gaps between the chips or modules of a pixel detector read 0 in every frame and form lines
    (a cross on a quad-chip detector). A pixel is in a gap when it counted exactly nothing over
    the whole beamtime and lies on a line of such pixels at most ``max_width`` wide whose
    neighbours on both sides (where on the detector) counted at least ``min_border`` each, and
    at least ``min_length`` long; the pixels where two gaps cross are included. All-zero over
    ``min_length`` pixels each expected to count ``min_border`` or more has a probability below
    ``exp(-min_length · min_border)`` (e^-40 by default): never a dim region by chance. Where a
    gap crosses a region without counts it is not found, and reads there as its surroundings.

    Parameters
    ----------
    total : array (n_row, n_col)
        Counts of each pixel summed over all frames (the detector projection over angles).

    Returns
    -------
    bool array (n_row, n_col)

    Examples
    --------
    >>> t = np.full((12, 12), 40.0); t[5:7, :] = 0; t[:, 3] = 0; t[0, 9] = 0
    >>> gaps = module_gaps(t)
    >>> int(gaps.sum()), bool(gaps[5, 3]), bool(gaps[0, 9])  # 2 rows + 1 column, not the dot
    (34, True, False)
    """
    total = np.asarray(total, dtype=np.float64)
    zero = total == 0
    if not zero.any():
        return np.zeros(total.shape, bool)
    opts = {"min_length": min_length, "max_width": max_width, "min_border": min_border}
    return _gap_lines(zero, total, **opts) | _gap_lines(zero.T, total.T, **opts).T


def fill_operator(
    mask: np.ndarray, *, max_depth: int = 4, min_weight: float = 1e-6
) -> sparse.csr_matrix | None:
    """Linear operator that fills masked pixels from their unmasked neighbours (harmonic).

    Each connected group of masked pixels (4-neighbours) whose pixels all lie within
    ``max_depth`` pixels of an unmasked one (gaps up to ``2 · max_depth`` wide, hot and dead
    pixels) is filled with the harmonic interpolation of the pixels around it: the solution of
    Laplace's equation with the unmasked pixels as boundary values (the image's edge reflects).
    Across a thin gap this is the linear interpolation between its two sides, and a peak crossed
    by a gap keeps its centre. Wider groups are not filled (0): interpolating across a wide
    hole would invent the peak. Weights below ``min_weight`` are dropped and each row is
    renormalised to sum 1 (keeps the operator local and sparse).

    Parameters
    ----------
    mask : bool array (n_row, n_col)
        True at masked pixels.

    Returns
    -------
    scipy.sparse.csr_matrix (n_row · n_col, n_row · n_col) or None
        ``P`` with ``filled = P @ image.ravel()`` (``image`` 0 at masked pixels): identity at
        unmasked pixels, interpolation weights over unmasked pixels at filled ones, 0 rows at
        masked pixels that are not filled. None when nothing is masked.

    Examples
    --------
    A 1-pixel gap between 2 and 4 (edges reflect): filled with their mean, 3.

    >>> mask = np.array([[False, True, False]])
    >>> (fill_operator(mask) @ np.array([2.0, 0.0, 4.0])).tolist()
    [2.0, 3.0, 4.0]
    """
    mask = np.asarray(mask, bool)
    if not mask.any():
        return None
    nr, nc = mask.shape
    v = nr * nc
    idx = np.arange(v).reshape(nr, nc)
    pairs = np.concatenate(
        [
            np.stack([idx[:, :-1].ravel(), idx[:, 1:].ravel()], 1),
            np.stack([idx[:-1, :].ravel(), idx[1:, :].ravel()], 1),
        ]
    )
    adjacency = sparse.coo_matrix(
        (
            np.ones(2 * len(pairs)),
            (np.r_[pairs[:, 0], pairs[:, 1]], np.r_[pairs[:, 1], pairs[:, 0]]),
        ),
        shape=(v, v),
    ).tocsr()
    degree = np.asarray(adjacency.sum(axis=1)).ravel()
    unmasked = ~mask.ravel()
    rows, cols, vals = (
        [np.flatnonzero(unmasked)],
        [np.flatnonzero(unmasked)],
        [np.ones(unmasked.sum())],
    )
    if unmasked.any():
        depth = ndimage.distance_transform_cdt(mask, metric="taxicab")
        labels, n = ndimage.label(mask)
        deepest = ndimage.maximum(depth, labels, index=np.arange(1, n + 1))
        for k in np.flatnonzero(np.asarray(deepest) <= max_depth) + 1:
            m = np.flatnonzero(labels.ravel() == k)
            to_boundary = adjacency[m]
            boundary = np.unique(to_boundary.indices[unmasked[to_boundary.indices]])
            lap = sparse.diags(degree[m]) - adjacency[m][:, m]
            rhs = adjacency[m][:, boundary].toarray()
            if len(m) == 1:
                weights = rhs / lap.toarray()
            else:
                weights = sparse.linalg.splu(lap.tocsc()).solve(rhs)
            weights[weights < min_weight] = 0.0
            weights /= weights.sum(axis=1, keepdims=True)
            r, c = np.nonzero(weights)
            rows.append(m[r])
            cols.append(boundary[c])
            vals.append(weights[r, c])
    return sparse.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(v, v)
    )


def filled_features(
    features: np.ndarray, fill: sparse.csr_matrix | None
) -> tuple[np.ndarray, np.ndarray]:
    """Moment features that fill masked pixels, and the variance weight of every voxel.

    Moment sums are linear in the voxels: ``(P @ w) @ f = w @ (Pᵀ f)``. Masked voxels (0 in
    ``w``) are thus filled from their neighbours by the features alone, at no cost per block;
    the ``w_filled`` column counts what the fill added (``Pᵀ 1 − 1`` at measured voxels), and
    the variance of a voxel that stands in for filled ones too is weighted by ``(Pᵀ 1)²``.

    Parameters
    ----------
    features : array (n_angle, n_voxel, FEATURES)
        From :func:`moment_features`.
    fill : sparse (n_voxel, n_voxel) or None
        From :func:`fill_operator`; None leaves masked voxels at 0.

    Returns
    -------
    features : float32 array like ``features``
    var_weight : float32 array (n_voxel,)
    """
    nv = features.shape[1]
    if fill is None:
        return features, np.ones(nv, np.float32)
    pt = fill.T.tocsr()
    reach = np.asarray(pt @ np.ones(nv)).ravel()  # Pᵀ 1
    measured = fill.diagonal() > 0
    out = np.empty(features.shape, np.float32)
    for a in range(features.shape[0]):
        out[a] = pt @ features[a].astype(np.float64)
    out[..., _FILLED] = np.where(measured, reach - 1.0, 0.0)
    return out, (reach**2).astype(np.float32)


def fill_patterns_operator(operator: Any, fill: sparse.csr_matrix | None, n_angle: int) -> Any:
    """The q-grid operator of :func:`grid_operator` applied to filled voxels (every angle)."""
    if fill is None:
        return operator
    out = (operator @ sparse.kron(sparse.identity(n_angle), fill, format="csr")).tocsr()
    out.eliminate_zeros()
    return out.astype(np.float32)


def corrected(
    frames: np.ndarray,
    *,
    scale: np.ndarray,
    background: np.ndarray,
    dark: np.ndarray | None = None,
    flat: np.ndarray | None = None,
    bad: np.ndarray | None = None,
    saturation: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Corrected intensities of a block of frames and their Poisson variance.

    ``w = (frames − dark) / flat · scale − background``, with masked voxels (bad pixels,
    saturated or non-finite values, invalid points where ``scale == 0``) set to 0.

    Parameters
    ----------
    frames : array (n_angle, ny, nx, n_row, n_col)
    scale : array (n_angle, ny, nx)
        Monitor normalisation per point (mean monitor / monitor); 0 for invalid points.
    background : array (n_angle,)
        Background per pixel and frame after normalisation.
    dark, flat, bad : arrays (n_row, n_col), optional
    saturation : float, optional

    Returns
    -------
    w, var : float32 arrays like ``frames``
    """
    w = frames.astype(np.float32)
    masked = ~np.isfinite(w)
    if saturation is not None:
        masked |= w >= saturation
    if dark is not None:
        w -= dark.astype(np.float32)
    var = np.maximum(w, 0.0)
    s = scale.astype(np.float32)[..., None, None]
    if flat is not None:
        gain = (1.0 / flat).astype(np.float32)
        w *= gain
        var *= gain * gain
    w *= s
    var *= s * s
    w -= background.astype(np.float32)[:, None, None, None, None]
    if bad is not None:
        masked |= bad
    masked |= s == 0
    w[masked] = 0.0
    var[masked] = 0.0
    return w, var


# -- moments ----------------------------------------------------------------------------------
def moment_features(dq: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Per-voxel factors of the first :data:`FEATURES` :data:`MOMENTS` (those before ``var``).

    Returns
    -------
    numpy.ndarray (n_angle, n_row · n_col, FEATURES), float32
        ``1, dq, dq_i·dq_j (pairs as MOMENTS), row, col, 0``: moment sums are
        ``w @ features``; the last (``w_filled``) is 0 until :func:`filled_features` fills.
    """
    na, nr, nc = dq.shape[:3]
    v = nr * nc
    d = dq.reshape(na, v, 3)
    rc = np.broadcast_to(
        np.stack(np.meshgrid(rows, cols, indexing="ij"), -1).reshape(1, v, 2), (na, v, 2)
    )
    return np.concatenate(
        [
            np.ones((na, v, 1)),
            d,
            np.stack([d[..., i] * d[..., j] for i, j in _PAIRS], -1),
            rc,
            np.zeros((na, v, 1)),
        ],
        axis=-1,
    ).astype(np.float32)


def moment_sums(
    w: np.ndarray,
    var: np.ndarray,
    dq: np.ndarray,
    rows: np.ndarray,
    cols: np.ndarray,
    *,
    fill: sparse.csr_matrix | None = None,
    saturated: np.ndarray | None = None,
) -> np.ndarray:
    """Moment sums of :data:`MOMENTS` per (angle, y, x) over the detector ROI.

    Parameters
    ----------
    w, var : arrays (n_angle, ny, nx, n_row, n_col)
        From :func:`corrected`.
    dq : array (n_angle, n_row, n_col, 3)
        Voxel q minus the reference vector.
    rows, cols : arrays (n_row,), (n_col,)
        Detector indices of the ROI.
    fill : sparse (n_row · n_col, n_row · n_col), optional
        :func:`fill_operator` of the ROI's masked pixels: they are filled before the sums.
    saturated : bool array like ``w``, optional
        Voxels masked as saturated (counted in ``n_saturated``).

    Returns
    -------
    numpy.ndarray (n_angle, ny, nx, len(MOMENTS)), float64

    Examples
    --------
    One voxel of weight 2 at dq = (1, 2, 3):

    >>> w = np.zeros((1, 1, 1, 2, 2), np.float32); w[0, 0, 0, 1, 0] = 2
    >>> dq = np.zeros((1, 2, 2, 3)); dq[0, 1, 0] = [1, 2, 3]
    >>> m = moment_sums(w, w, dq, np.arange(2), np.arange(2))
    >>> m[0, 0, 0].tolist()
    [2.0, 2.0, 4.0, 6.0, 2.0, 8.0, 18.0, 4.0, 6.0, 12.0, 2.0, 0.0, 0.0, 2.0, 0.0]
    """
    na, ny, nx, nr, nc = w.shape
    v = nr * nc
    feats, var_weight = filled_features(moment_features(dq, rows, cols), fill)
    out = np.zeros((na, ny * nx, len(MOMENTS)), dtype=np.float64)
    out[..., :FEATURES] = np.matmul(w.reshape(na, ny * nx, v), feats)
    out[..., _VAR] = (var.reshape(na, ny * nx, v) * var_weight).sum(axis=-1, dtype=np.float64)
    if saturated is not None:
        out[..., _SATURATED] = saturated.reshape(na, ny * nx, v).sum(axis=-1)
    return out.reshape(na, ny, nx, len(MOMENTS))


def maps_from_moments(
    m: np.ndarray, h_ref: np.ndarray, axes: np.ndarray, *, min_snr: float = 5.0
) -> dict[str, np.ndarray]:
    """Per-pixel maps from angle-summed moments.

    Parameters
    ----------
    m : array (..., len(MOMENTS))
        Moment sums (:data:`MOMENTS`), summed over angles.
    h_ref : array (3,)
        The vector the moments' ``dq`` are relative to.
    axes : array (3, 3)
        Rows ``x̂_c, ŷ_c, ẑ_c`` of the crystal frame for the widths.
    min_snr : float
        Valid when ``Σw > min_snr · sqrt(Σvar)``.

    Returns
    -------
    dict
        ``valid``, ``intensity``, ``q_com (..., 3)``, ``width_x/y/z`` (1/Å standard deviations
        along the crystal axes), ``det_row``/``det_col`` (detector centre of mass); NaN where not
        valid.
    """
    s = m[..., 0]
    valid = (s > 0) & (s > min_snr * np.sqrt(np.maximum(m[..., _VAR], 0.0)))
    safe = np.where(valid, s, np.nan)
    mean = m[..., 1:4] / safe[..., None]
    cov = np.empty((*s.shape, 3, 3))
    for k, (i, j) in enumerate(_PAIRS):
        c = m[..., 4 + k] / safe - mean[..., i] * mean[..., j]
        cov[..., i, j] = c
        cov[..., j, i] = c
    var_axes = np.einsum("ki,...ij,kj->...k", axes, cov, axes)
    widths = np.sqrt(np.maximum(var_axes, 0.0))
    return {
        "valid": valid,
        "intensity": np.where(valid, s, np.nan),
        "q_com": h_ref + mean,
        "width_x": widths[..., 0],
        "width_y": widths[..., 1],
        "width_z": widths[..., 2],
        "det_row": m[..., 10] / safe,
        "det_col": m[..., 11] / safe,
    }


def parabolic_peak(curves: np.ndarray, angles: np.ndarray) -> np.ndarray:
    """Angle of the maximum of each rocking curve, refined by a parabola through 3 points.

    Parameters
    ----------
    curves : array (n_angle, ...)
    angles : array (n_angle,), increasing

    Examples
    --------
    >>> a = np.linspace(-1, 1, 21)
    >>> round(float(parabolic_peak(np.exp(-((a - 0.13) ** 2) / 0.1), a)), 2)
    0.13
    """
    c = np.nan_to_num(np.asarray(curves, dtype=np.float64), nan=-np.inf)
    n = c.shape[0]
    i = np.argmax(c, axis=0)
    im, ip = np.clip(i - 1, 0, n - 1), np.clip(i + 1, 0, n - 1)
    y0 = np.take_along_axis(c, im[None], 0)[0]
    y1 = np.take_along_axis(c, i[None], 0)[0]
    y2 = np.take_along_axis(c, ip[None], 0)[0]
    denom = y0 - 2 * y1 + y2
    inner = (i > 0) & (i < n - 1) & np.isfinite(denom) & (denom < 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        off = np.where(inner, 0.5 * (y0 - y2) / np.where(inner, denom, 1.0), 0.0)
    return np.interp(i + np.clip(off, -0.5, 0.5), np.arange(n), angles)


# -- drift ------------------------------------------------------------------------------------
def _prepare(image: np.ndarray) -> np.ndarray:
    # median-subtracted and zero-padded (no wrap-around of content shifted across the scan
    # edge); no apodising window: a fixed window under moving content biases the shift
    im = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=np.nanmedian(image))
    pad = max(im.shape) // 4 + 1
    return np.pad(im - np.median(im), pad)


def register_to_reference(images: np.ndarray, *, reference: int, upsample: int = 20) -> np.ndarray:
    """Sub-pixel shift of each image relative to ``images[reference]`` (phase correlation).

    Returns the displacement ``d`` of each image's content (content at ``p`` in the reference
    appears at ``p + d``), shape ``(n, 2)`` in scan pixels (y, x); 0 for the reference.
    """
    ref = _prepare(images[reference])
    out = np.zeros((len(images), 2))
    for a, im in enumerate(images):
        if a == reference or not np.any(np.nan_to_num(im)):
            continue
        shift, _, _ = phase_cross_correlation(
            ref, _prepare(im), upsample_factor=upsample, normalization=None
        )
        out[a] = -shift
    return out


def register_chain(images: np.ndarray, *, reference: int, upsample: int = 20) -> np.ndarray:
    """Displacements by registering each image to its neighbour and chaining from ``reference``.

    For maps that change slowly with angle (ROI intensity: domains diffract at different angles)
    neighbouring angles are similar where distant ones are not; the chained shifts are summed
    outward from the reference. An image without signal takes its neighbour's displacement.
    """
    n = len(images)
    out = np.zeros((n, 2))
    for a in range(reference + 1, n):
        pair = np.stack([images[a - 1], images[a]])
        out[a] = out[a - 1] + register_to_reference(pair, reference=0, upsample=upsample)[1]
    for a in range(reference - 1, -1, -1):
        pair = np.stack([images[a + 1], images[a]])
        out[a] = out[a + 1] + register_to_reference(pair, reference=0, upsample=upsample)[1]
    return out


# -- common q grid ----------------------------------------------------------------------------
def solve_rocking_angle(
    q: np.ndarray, geometry: Geometry, near_deg: float
) -> tuple[np.ndarray, np.ndarray]:
    """Rocking angle at which sample-frame vectors ``q`` satisfy the Bragg condition.

    Solves ``|R(a, θ) q + k ẑ| = k``, i.e. ``ẑ·R(a, θ) q = −|q|²/2k`` (Rodrigues' formula gives
    ``A cos θ + B sin θ = D``); of the two solutions the one nearest ``near_deg`` is returned.

    Returns
    -------
    theta_deg : array (n,)
        NaN where no angle reaches ``q``.
    q_lab : array (n, 3)
    """
    a = axis_vector(geometry.rocking_axis)
    z = np.array([0.0, 0.0, 1.0])
    aq = q @ a
    coef_a = q @ z - (a @ z) * aq
    coef_b = np.cross(a, q) @ z
    coef_c = (a @ z) * aq
    rhs = -np.einsum("ni,ni->n", q, q) / (2 * geometry.k) - coef_c
    amp = np.hypot(coef_a, coef_b)
    with np.errstate(invalid="ignore", divide="ignore"):
        base = np.arctan2(coef_b, coef_a)
        spread = np.arccos(rhs / amp)
    near = np.deg2rad(near_deg)
    cands = np.stack([base + spread, base - spread])
    cands = near + (cands - near + np.pi) % (2 * np.pi) - np.pi  # wrap to near ± π
    pick = np.argmin(np.abs(cands - near), axis=0)
    theta = np.take_along_axis(cands, pick[None], 0)[0]
    rot = rotation_matrix(a, np.nan_to_num(theta))
    q_lab = np.einsum("nij,nj->ni", rot, q)
    return np.rad2deg(theta), q_lab


def _detector_pixel(q_lab: np.ndarray, geometry: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """Fractional detector (row, col) hit by ``k_f = q_lab + k ẑ`` (NaN when it misses)."""
    kf = q_lab + np.array([0.0, 0.0, geometry.k])
    local = kf @ geometry.detector_rotation()  # components in the unrotated detector frame
    e_row = axis_vector(geometry.row_direction)
    e_col = axis_vector(geometry.col_direction)
    with np.errstate(invalid="ignore", divide="ignore"):
        t = geometry.detector_distance_m / local[:, 2]
    t = np.where(t > 0, t, np.nan)
    pos = local * t[:, None]
    rows = geometry.beam_center[0] + (pos @ e_row) / geometry.pixel_size_m
    cols = geometry.beam_center[1] + (pos @ e_col) / geometry.pixel_size_m
    return rows, cols


def grid_operator(
    geometry: Geometry,
    angles_deg: np.ndarray,
    roi: tuple[int, int, int, int],
    grid_q: np.ndarray,
) -> tuple[sparse.csr_matrix, np.ndarray]:
    """Sparse trilinear interpolation from measured voxels onto arbitrary q points.

    Each q point (sample frame) is traced back to the fractional (angle, row, col) at which it
    was measured (:func:`solve_rocking_angle`, then the detector pixel its ``k_f`` hits) and
    interpolated from the 8 surrounding voxels of the ``(angle, ROI row, ROI col)`` lattice.

    Parameters
    ----------
    geometry : Geometry
    angles_deg : array (n_angle,)
        Rocking angles in storage order (any monotonic order).
    roi : (row_start, row_stop, col_start, col_stop)
    grid_q : array (n_points, 3)

    Returns
    -------
    operator : scipy.sparse.csr_matrix (n_points, n_angle · n_row · n_col), float32
        ``operator @ voxels`` with voxels flattened in (angle, row, col) order.
    covered : bool array (n_points,)
        q points inside the measured range (rows of the operator that are not empty).
    """
    angles = np.asarray(angles_deg, dtype=np.float64)
    na = len(angles)
    r0, r1, c0, c1 = roi
    nr, nc = r1 - r0, c1 - c0
    theta, q_lab = solve_rocking_angle(grid_q, geometry, float(np.mean(angles)))
    rows, cols = _detector_pixel(q_lab, geometry)
    order = np.argsort(angles)
    fa = np.interp(theta, angles[order], np.arange(na), left=np.nan, right=np.nan)
    frac = np.stack([fa, rows - r0, cols - c0], -1)
    size = np.array([na, nr, nc])
    covered = np.all(np.isfinite(frac), axis=1)
    tol = 1e-6
    covered &= np.all((frac >= -tol) & (frac <= size - 1 + tol), axis=1)
    pts = np.flatnonzero(covered)
    f = np.clip(frac[pts], 0, size - 1)
    base = np.minimum(np.floor(f).astype(np.int64), np.maximum(size - 2, 0))
    t = f - base
    data, cols_idx, rows_idx = [], [], []
    for corner in range(8):
        off = np.array([(corner >> 2) & 1, (corner >> 1) & 1, corner & 1])
        idx = np.minimum(base + off, size - 1)
        weight = np.prod(np.where(off, t, 1 - t), axis=1)
        keep = weight > 0
        a_idx = order[idx[keep, 0]]
        data.append(weight[keep])
        cols_idx.append((a_idx * nr + idx[keep, 1]) * nc + idx[keep, 2])
        rows_idx.append(pts[keep])
    op = sparse.csr_matrix(
        (np.concatenate(data), (np.concatenate(rows_idx), np.concatenate(cols_idx))),
        shape=(len(grid_q), na * nr * nc),
        dtype=np.float32,
    )
    op.sum_duplicates()
    return op, covered


def used_voxels(operator: Any, n_angle: int) -> tuple[Any, list[np.ndarray]]:
    """The operator restricted to the voxels it reads, and those voxels per angle.

    Voxels outside the q grid's extent (often half of an ROI) need not be corrected, shifted
    or multiplied.

    Returns
    -------
    operator : scipy.sparse.csr_matrix (n_points, n_used)
    voxels : list of int arrays
        Per angle, the used ROI voxels (``row · n_col + col``), sorted; columns of the
        restricted operator follow them angle by angle.
    """
    used = np.unique(operator.indices)
    per_angle = operator.shape[1] // max(n_angle, 1)
    angle = used // per_angle
    voxels = [used[angle == a] - a * per_angle for a in range(n_angle)]
    return operator[:, used].tocsr(), voxels


def patterns_block(
    w: np.ndarray, drift: np.ndarray, operator: Any, *, halo: int, out_shape: tuple[int, int]
) -> np.ndarray:
    """Drift-corrected 3D patterns on the q grid for the core points of a block.

    Parameters
    ----------
    w : array (n_angle, ty + 2 halo, tx + 2 halo, n_row, n_col)
        Corrected intensities with a halo of scan points.
    drift : array (n_angle, 2)
        Content displacement per angle (scan pixels).
    operator : sparse (n_grid, n_angle · n_row · n_col)
        From :func:`grid_operator`.

    Returns
    -------
    numpy.ndarray (ty, tx, n_grid), float32, clipped at 0
    """
    na = w.shape[0]
    ty, tx = out_shape
    v = w.shape[3] * w.shape[4]
    cols = np.empty((na, ty * tx, v), dtype=np.float32)
    for a in range(na):
        core = shift_bilinear(w[a], drift[a, 0], drift[a, 1], halo=halo, out_shape=out_shape)
        cols[a] = core.reshape(ty * tx, v)
    x = cols.transpose(0, 2, 1).reshape(na * v, ty * tx)
    out = np.asarray(operator @ x, dtype=np.float32).T
    np.maximum(out, 0.0, out=out)
    return out.reshape(ty, tx, -1)
