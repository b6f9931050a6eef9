"""Pure NumPy kernels shared by several stages (no dask, no I/O).

``reduce`` brings its per-angle maps back to the reference scan grid with :func:`shift_maps`
(and its patterns with :func:`shift_bilinear`), ``particles`` does the same for its per-angle
masks, and ``features`` and ``analysis`` use only the patterns :func:`usable_patterns` accepts.
Kernels used by one stage alone stay in that stage's ``_kernels`` module.

Examples
--------
>>> import numpy as np
>>> maps = np.arange(2 * 3 * 3, dtype=float).reshape(2, 3, 3)
>>> shift_maps(maps, np.array([[0.0, 0.0], [0.0, 1.0]]))[1].tolist()
[[10.0, 11.0, 0.0], [13.0, 14.0, 0.0], [16.0, 17.0, 0.0]]
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["shift_bilinear", "shift_maps", "usable_patterns"]


def shift_bilinear(
    block: np.ndarray,
    dy: float,
    dx: float,
    *,
    halo: int,
    out_shape: tuple[int, int],
    power: int = 1,
) -> np.ndarray:
    """Sample ``block`` (y, x, ...) at ``(y + halo + dy, x + halo + dx)`` for the core points.

    ``block`` holds ``halo`` extra points on every side of the ``out_shape`` core; the result is
    the content displaced by ``(dy, dx)`` brought back to its reference position (bilinear).

    Parameters
    ----------
    block : ndarray
        ``(ty + 2·halo, tx + 2·halo, ...)``: the core and its halo; trailing axes are carried.
    dy, dx : float
        Displacement of the content (scan points); ``|dy|``, ``|dx|`` at most ``halo``.
    halo : int
        Extra points on every side of the core.
    out_shape : tuple of int
        ``(ty, tx)``, the core.
    power : int
        Raise the interpolation weights to this power: 2 carries variances of independent
        values (``Var(Σ α_j v_j) = Σ α_j² Var(v_j)``).

    Returns
    -------
    ndarray
        ``(ty, tx, ...)``, the dtype of ``block``.

    Raises
    ------
    ValueError
        If the shift reaches beyond the halo.

    Examples
    --------
    >>> b = np.arange(25.0).reshape(5, 5)
    >>> shift_bilinear(b, 0.5, -1.0, halo=1, out_shape=(3, 3)).tolist()
    [[7.5, 8.5, 9.5], [12.5, 13.5, 14.5], [17.5, 18.5, 19.5]]
    """
    ty, tx = out_shape
    iy, ix = math.floor(dy), math.floor(dx)
    fy, fx = dy - iy, dx - ix
    if max(abs(iy), abs(iy + 1 if fy else iy)) > halo or max(abs(ix), abs(ix + 1 if fx else ix)) > (
        halo
    ):
        raise ValueError(f"shift ({dy:.2f}, {dx:.2f}) exceeds the halo of {halo} points")
    y0, x0 = halo + iy, halo + ix
    out = None
    for oy, wy in ((0, 1 - fy), (1, fy)):
        for ox, wx in ((0, 1 - fx), (1, fx)):
            if wy * wx == 0:
                continue
            part = block[y0 + oy : y0 + oy + ty, x0 + ox : x0 + ox + tx]
            term = part * np.asarray((wy * wx) ** power, dtype=block.dtype)
            out = term if out is None else out + term
    return out


def shift_maps(
    maps: np.ndarray, drift: np.ndarray, *, fill: float = 0.0, power: int = 1
) -> np.ndarray:
    """Bring per-angle maps ``(angle, y, x, ...)`` back to the reference scan grid (bilinear).

    ``out[a, y, x] = maps[a, y + drift[a, 0], x + drift[a, 1]]``; points that fall outside the
    scan take ``fill``.

    Parameters
    ----------
    maps : array_like
        ``(angle, y, x, ...)``; trailing axes (channels) are carried.
    drift : ndarray
        ``(angle, 2)``: displacement (y, x) of the content at each angle, in scan points.
    fill : float
        Value of the points brought in from outside the scan.
    power : int
        Power of the interpolation weights (2: the maps are variances; :func:`shift_bilinear`).

    Returns
    -------
    ndarray
        The shape of ``maps``.

    Examples
    --------
    >>> m = np.arange(9.0).reshape(1, 3, 3)
    >>> shift_maps(m, np.array([[0.5, 0.0]]), fill=np.nan)[0].tolist()
    [[1.5, 2.5, 3.5], [4.5, 5.5, 6.5], [nan, nan, nan]]
    >>> shift_maps(m, np.array([[0.5, 0.0]]), power=2)[0].tolist()  # variances: weights 1/4
    [[0.75, 1.25, 1.75], [2.25, 2.75, 3.25], [1.5, 1.75, 2.0]]
    """
    maps = np.asarray(maps)
    halo = int(np.ceil(np.abs(drift).max())) + 1 if len(drift) else 1
    pad = [(0, 0), (halo, halo), (halo, halo)] + [(0, 0)] * (maps.ndim - 3)
    padded = np.pad(maps, pad, constant_values=fill)
    return np.stack(
        [
            shift_bilinear(padded[a], dy, dx, halo=halo, out_shape=maps.shape[1:3], power=power)
            for a, (dy, dx) in enumerate(drift)
        ]
    )


def usable_patterns(patterns: np.ndarray) -> np.ndarray:
    """Bool ``(...)`` of patterns ``(..., n, n, n)`` that are finite and have positive sum.

    Parameters
    ----------
    patterns : ndarray
        ``(..., n, n, n)``: 3D patterns on a q grid.

    Returns
    -------
    ndarray of bool
        ``(...)``: True where a pattern can be normalised (and encoded, or averaged).

    Examples
    --------
    >>> p = np.ones((3, 2, 2, 2)); p[1, 0, 0, 0] = np.nan; p[2] = 0
    >>> usable_patterns(p).tolist()
    [True, False, False]
    """
    axes = (-3, -2, -1)
    finite = np.isfinite(patterns).all(axis=axes)
    total = np.where(np.isfinite(patterns), patterns, 0).sum(axis=axes)
    return finite & (total > 0)
