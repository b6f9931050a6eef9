"""Pure NumPy kernels of the feature stage: pattern normalisation and point clouds.

No torch, no dask, no I/O.

Normalisation of a pattern ``I`` on an ``n³`` grid (``unit_sum_log1p``)::

    p = I / ΣI                      # shape only: the scan's intensity map carries the amount
    x = log1p(n³ · p) / log1p(n³)   # log scale; a flat pattern gives log1p(1) / log1p(n³)

``x`` lies in [0, 1] (1 only if all intensity is in one voxel). Patterns with a non-finite
voxel (masked pixels) or no positive intensity are not usable and are never encoded.

Point clouds (FoldingNet): the voxels above ``threshold × max`` are drawn ``n_points`` times
with probability ∝ intensity, each point placed uniformly inside its voxel; coordinates are the
crystal-frame offsets (1/Å). For the model a cloud is centred on its mean and divided by a scale
(the grid half-extent per axis for patterns, or the cloud's largest radius for raw clouds).

Study clouds (``[features] recipe = "study"``, :func:`study_cloud`), after the original study's
``analysis.m``: a volume indexed (detector row, detector col, angle) is clipped at ``clip``;
every voxel above ``threshold`` becomes one point at ``(row, col, angle_scale × angle)``
(1-based indices, ``angle_scale = 10`` in the study); statistical outlier removal drops the
points whose mean distance to their ``n_neighbours`` nearest points exceeds the mean of that
distance by more than ``std_ratio`` standard deviations (MATLAB ``pcdenoise(...,
'NumNeighbors', 100, 'Threshold', 0.8)``); ``n_points`` of the rest are drawn (without
replacement when there are enough, else with). The study's LPA-ICI smoothing between two
``pcdenoise`` passes is not reproduced (one pass here). Intensities are relative to the
volume's maximum (the study's absolute frame units are unknown), so ``clip`` only bounds the
values and does not change which voxels become points.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np
from scipy.spatial import cKDTree

from spndi_dask.kernels import usable_patterns  # re-exported: part of this API

__all__ = [
    "cloud_from_pattern",
    "normalise_cloud",
    "normalise_patterns",
    "pixel_rng",
    "remove_outliers",
    "study_cloud",
    "usable_patterns",
]


@numba.njit(cache=True, nogil=True)
def _normalise_rows(src: np.ndarray, out: np.ndarray, ok: np.ndarray) -> None:  # pragma: no cover
    """Two passes per pattern (check + sum, then write): no temporaries."""
    n3 = src.shape[1]
    inv = 1.0 / np.log1p(n3)
    for i in range(src.shape[0]):
        total = 0.0
        good = True
        for j in range(n3):
            v = src[i, j]
            if not np.isfinite(v):
                good = False
                break
            if v > 0:
                total += v
        if not good or total <= 0:
            ok[i] = False
            out[i, :] = 0.0
            continue
        ok[i] = True
        s = n3 / total
        for j in range(n3):
            v = src[i, j]
            out[i, j] = np.log1p(v * s) * inv if v > 0 else 0.0


def normalise_patterns(patterns: np.ndarray, *, return_usable: bool = False) -> Any:
    """``unit_sum_log1p`` normalisation (module docstring) as float32; unusable patterns → 0.

    With ``return_usable`` also returns :func:`usable_patterns` (computed in the same pass).

    Examples
    --------
    >>> x = normalise_patterns(np.ones((1, 4, 4, 4)))
    >>> bool(np.allclose(x, np.log1p(1) / np.log1p(64)))
    True
    >>> one_voxel = np.zeros((1, 4, 4, 4)); one_voxel[0, 1, 2, 3] = 7.0
    >>> float(normalise_patterns(one_voxel).max())
    1.0
    """
    p = np.asarray(patterns)
    if p.dtype not in (np.float32, np.float64):
        p = p.astype(np.float32)
    shape = p.shape
    n3 = shape[-1] * shape[-2] * shape[-3]
    src = np.ascontiguousarray(p.reshape(-1, n3))
    out = np.empty(src.shape, dtype=np.float32)
    ok = np.empty(src.shape[0], dtype=np.bool_)
    _normalise_rows(src, out, ok)
    out = out.reshape(shape)
    return (out, ok.reshape(shape[:-3])) if return_usable else out


def pixel_rng(seed: int, y: int, x: int) -> np.random.Generator:
    """The random generator of scan pixel (y, x): the same however the scan is blocked."""
    return np.random.default_rng([int(seed), int(y), int(x)])


def cloud_from_pattern(
    pattern: np.ndarray,
    offsets: tuple[np.ndarray, np.ndarray, np.ndarray],
    *,
    n_points: int = 2048,
    threshold: float = 0.1,
    rng: np.random.Generator,
) -> np.ndarray:
    """Point cloud ``(n_points, 3)`` (1/Å offsets) drawn from the voxels of a 3D pattern.

    Parameters
    ----------
    pattern : ndarray (nx, ny, nz)
        Intensities on the grid (finite, positive sum).
    offsets : tuple of three 1D arrays
        Grid coordinates along each axis (1/Å), evenly spaced.
    n_points : int
        Points to draw.
    threshold : float
        Voxels below ``threshold × max`` are left out.
    rng : numpy.random.Generator

    Examples
    --------
    >>> p = np.zeros((4, 4, 4)); p[1, 2, 3] = 5.0
    >>> ax = np.arange(4.0)
    >>> c = cloud_from_pattern(p, (ax, ax, ax), n_points=10, rng=np.random.default_rng(0))
    >>> c.shape, bool(np.all(np.abs(c - [1, 2, 3]) <= 0.5))
    ((10, 3), True)
    """
    w = np.clip(np.asarray(pattern, dtype=np.float64), 0, None)
    peak = w.max()
    if not np.isfinite(peak) or peak <= 0:
        raise ValueError("the pattern has no positive finite intensity")
    w = np.where(w >= threshold * peak, w, 0.0).ravel()
    cells = rng.choice(w.size, size=n_points, p=w / w.sum())
    idx = np.unravel_index(cells, pattern.shape)
    pts = np.empty((n_points, 3), dtype=np.float64)
    for a in range(3):
        ax = np.asarray(offsets[a], dtype=np.float64)
        step = ax[1] - ax[0] if ax.size > 1 else 0.0
        pts[:, a] = ax[idx[a]] + (rng.random(n_points) - 0.5) * step
    return pts


def normalise_cloud(points: np.ndarray, scale: np.ndarray | float | None = None) -> np.ndarray:
    """Cloud(s) ``(..., n, 3)`` centred on their mean and divided by ``scale`` (float32).

    ``scale=None`` divides each cloud by its largest distance from the centre (unit sphere).

    Examples
    --------
    >>> c = normalise_cloud(np.array([[0.0, 0, 0], [2, 0, 0]]))
    >>> c.tolist()
    [[-1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]
    """
    p = np.asarray(points, dtype=np.float64)
    p = p - p.mean(axis=-2, keepdims=True)
    if scale is None:
        r = np.sqrt((p**2).sum(axis=-1)).max(axis=-1)[..., None, None]
        scale = np.where(r > 0, r, 1.0)
    return (p / np.asarray(scale, dtype=np.float64)).astype(np.float32)


def remove_outliers(
    points: np.ndarray, n_neighbours: int = 100, std_ratio: float = 0.8
) -> np.ndarray:
    """The points of ``points`` (n, d) that are not statistical outliers.

    A point is an outlier when its mean distance to its ``n_neighbours`` nearest other points
    exceeds the mean of that distance over all points by more than ``std_ratio`` standard
    deviations (MATLAB ``pcdenoise``). Clouds of ``n_neighbours`` points or fewer use all
    other points as neighbours.

    Examples
    --------
    >>> p = np.vstack([np.zeros((20, 3)) + np.arange(20)[:, None] * 0.01, [[50.0, 0, 0]]])
    >>> remove_outliers(p, n_neighbours=5).shape
    (20, 3)
    """
    p = np.asarray(points, dtype=np.float64)
    if len(p) < 3:
        return p
    k = min(int(n_neighbours), len(p) - 1)
    d, _ = cKDTree(p).query(p, k=k + 1)  # the first neighbour is the point itself
    mean = d[:, 1:].mean(axis=1)
    limit = mean.mean() + std_ratio * mean.std()
    return p[mean <= limit]


def study_cloud(
    volume: np.ndarray,
    *,
    rng: np.random.Generator,
    n_points: int = 2048,
    clip: float = 0.05,
    threshold: float = 1e-4,
    angle_scale: float = 10.0,
    n_neighbours: int = 100,
    std_ratio: float = 0.8,
) -> np.ndarray:
    """The original study's point cloud ``(n_points, 3)`` of one volume (module docstring).

    Parameters
    ----------
    volume : ndarray (rows, cols, angles)
        Intensities of one scan pixel; divided by their maximum first.
    rng : numpy.random.Generator
        Draws the ``n_points`` points.
    angle_scale : float
        Unit of the third axis: 10 in the study (angle index × 10 against detector pixels);
        1 on the isotropic q grid.

    Raises
    ------
    ValueError
        No positive finite intensity, or no voxel above ``threshold``.

    Examples
    --------
    >>> v = np.zeros((4, 4, 3)); v[1, 2, 0] = 1.0
    >>> study_cloud(v, rng=np.random.default_rng(0), n_points=2).tolist()
    [[2.0, 3.0, 10.0], [2.0, 3.0, 10.0]]
    """
    v = np.asarray(volume, dtype=np.float64)
    peak = v.max() if v.size else 0.0
    if not np.isfinite(peak) or peak <= 0:
        raise ValueError("the volume has no positive finite intensity")
    v = np.minimum(v / peak, clip)
    idx = np.argwhere(v > threshold)
    if not len(idx):
        raise ValueError(f"no voxel of the volume is above {threshold} of its maximum")
    pts = (idx + 1).astype(np.float64)
    pts[:, 2] *= angle_scale
    pts = remove_outliers(pts, n_neighbours, std_ratio)
    take = rng.choice(len(pts), size=n_points, replace=len(pts) < n_points)
    return pts[take]
