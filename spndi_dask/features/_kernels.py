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
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np

from spndi_dask.kernels import usable_patterns  # re-exported: part of this API

__all__ = [
    "cloud_from_pattern",
    "normalise_cloud",
    "normalise_patterns",
    "pixel_rng",
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
