"""Pure NumPy kernels of the detector corrections: bad pixels, the Bragg ROI, module gaps and the
fill of masked pixels (no dask, no I/O). Re-exported by :mod:`spndi_dask.reduce._kernels`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import ndimage, sparse

__all__ = ["bad_pixels", "fill_operator", "find_roi", "module_gaps"]


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
