"""Pure NumPy kernels of the moment sums: corrections, per-voxel features, sums and maps.

Conventions: a block of frames is ``(angle, y, x, det_row, det_col)`` restricted to the ROI;
``dq`` are voxel momentum transfers minus a reference vector (1/Å, sample frame); the moment
channels of :data:`MOMENTS` are additive over voxels, scan points and angles. Re-exported by
:mod:`spndi_dask.reduce._kernels`.
"""

from __future__ import annotations

import numpy as np
from scipy import sparse

__all__ = [
    "FEATURES",
    "MOMENTS",
    "corrected",
    "filled_features",
    "maps_from_moments",
    "moment_features",
    "moment_sums",
    "parabolic_peak",
]

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
