"""Pure NumPy kernels of the moment sums: corrections, per-voxel features, sums and maps.

Conventions: a block of frames is ``(angle, y, x, det_row, det_col)`` restricted to the ROI;
``dq`` are voxel momentum transfers minus a reference vector (1/Å, sample frame); the moment
channels of :data:`MOMENTS` are additive over voxels, scan points and angles. Re-exported by
:mod:`spndi_dask.reduce._kernels`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import sparse

__all__ = [
    "FEATURES",
    "MOMENTS",
    "VARIANCES",
    "com_covariance",
    "corrected",
    "filled_features",
    "maps_from_moments",
    "moment_features",
    "moment_sums",
    "parabolic_peak",
    "strain_tilt_sigma",
    "variance_features",
]

#: Channels of the per-(angle, y, x) moment sums. ``w`` is the corrected intensity of a voxel,
#: ``dq`` its q minus the reference, ``row``/``col`` its detector pixel, ``w_filled`` the part of
#: ``w`` filled into masked detector pixels from their neighbours (:func:`fill_operator`),
#: ``var`` the Poisson variance of ``w`` (for the signal-to-noise test), ``n_saturated`` the
#: number of voxels masked as saturated. The first :data:`FEATURES` channels are ``w @ features``
#: (:func:`moment_features`). The last, ``var_*``, are ``var @ variance_features``
#: (:func:`variance_features`): the variance-weighted sums the standard errors of the centre of
#: mass need (:func:`com_covariance`).
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
    "var_dqx",
    "var_dqy",
    "var_dqz",
    "var_dqxx",
    "var_dqyy",
    "var_dqzz",
    "var_dqxy",
    "var_dqxz",
    "var_dqyz",
)
#: Channels made from per-voxel features (all before ``var``).
FEATURES = MOMENTS.index("var")
_VAR, _FILLED, _SATURATED = MOMENTS.index("var"), MOMENTS.index("w_filled"), FEATURES + 1
_PAIRS = ((0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2))
#: The ``var_*`` channels made from :func:`variance_features` (``var @ variance_features``).
VARIANCES = slice(MOMENTS.index("var_dqx"), len(MOMENTS))


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


def variance_features(features: np.ndarray) -> np.ndarray:
    """Per-voxel factors of the ``var_*`` :data:`MOMENTS` (:data:`VARIANCES`).

    A moment sum is linear in the voxels, ``M_k = Σ_i w_i f_ik`` with the (filled) features
    ``f`` of :func:`filled_features`: ``r_i = f_i0`` (1, or ``Pᵀ 1`` where a voxel also stands
    in for masked ones) and ``g_i = f_i,1:4`` (``dq``, or ``Pᵀ dq``). With independent voxels
    ``Cov(M_k, M_l) = Σ_i var_i f_ik f_il``; the centre of mass needs those of ``r`` and ``g``
    (:func:`com_covariance`): ``var`` (``Σ var r²``, already a channel) and these nine.

    Parameters
    ----------
    features : array (n_angle, n_voxel, FEATURES)
        From :func:`moment_features` (through :func:`filled_features`).

    Returns
    -------
    numpy.ndarray (n_angle, n_voxel, 9), float32
        ``r·g_x, r·g_y, r·g_z, g_x², g_y², g_z², g_x·g_y, g_x·g_z, g_y·g_z``.

    Examples
    --------
    >>> f = np.zeros((1, 1, FEATURES)); f[0, 0, :4] = [1.0, 1.0, 2.0, 3.0]
    >>> variance_features(f)[0, 0].tolist()
    [1.0, 2.0, 3.0, 1.0, 4.0, 9.0, 2.0, 3.0, 6.0]
    """
    f = np.asarray(features, np.float64)
    r, g = f[..., 0], f[..., 1:4]
    cols = [r * g[..., i] for i in range(3)] + [g[..., i] * g[..., j] for i, j in _PAIRS]
    return np.stack(cols, -1).astype(np.float32)


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
    >>> m[0, 0, 0, :VARIANCES.start].tolist()
    [2.0, 2.0, 4.0, 6.0, 2.0, 8.0, 18.0, 4.0, 6.0, 12.0, 2.0, 0.0, 0.0, 2.0, 0.0]
    >>> m[0, 0, 0, VARIANCES].tolist()  # var = w: var·dq, var·dq_i·dq_j
    [2.0, 4.0, 6.0, 2.0, 8.0, 18.0, 4.0, 6.0, 12.0]
    """
    na, ny, nx, nr, nc = w.shape
    v = nr * nc
    feats, var_weight = filled_features(moment_features(dq, rows, cols), fill)
    out = np.zeros((na, ny * nx, len(MOMENTS)), dtype=np.float64)
    out[..., :FEATURES] = np.matmul(w.reshape(na, ny * nx, v), feats)
    var = var.reshape(na, ny * nx, v)
    out[..., _VAR] = (var * var_weight).sum(axis=-1, dtype=np.float64)
    out[..., VARIANCES] = np.matmul(var, variance_features(feats))
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


def com_covariance(m: np.ndarray) -> np.ndarray:
    """Covariance of the centre of mass ``q̄`` from Poisson counting statistics (1/Å²).

    The centre of mass of a pixel is ``q̄ = h_ref + μ`` with ``μ = Σ_i w_i g_i / Σ_i w_i r_i``
    over its voxels ``i`` (all ROI voxels at all angles; :func:`variance_features` defines
    ``r`` and ``g``, which are 1 and ``dq`` without masked pixels). ``w_i`` is the corrected
    intensity ``(c_i − dark) · gain · scale − b`` of the raw count ``c_i``: under Poisson noise
    ``Var(c_i) = c_i`` (the count itself estimates its mean), so ``Var(w_i) = var_i =
    max(c_i − dark, 0) · (gain · scale)²`` — the flat-field gain and the monitor scale enter
    squared (:func:`corrected`). Voxels are independent, so to first order (delta method)

    ``∂μ_c/∂w_i = (g_ic − μ_c r_i) / W``, ``W = Σ_i w_i r_i``, and

    ``Cov(μ_c, μ_d) = Σ_i var_i (g_ic − μ_c r_i)(g_id − μ_d r_i) / W²
    = (V_cd − μ_c V_0d − μ_d V_0c + μ_c μ_d V_00) / W²``

    with ``V_00 = Σ var r²`` (channel ``var``), ``V_0c = Σ var r g_c`` (``var_dq{c}``) and
    ``V_cd = Σ var g_c g_d`` (``var_dq{cd}``) — additive over voxels, scan points and angles
    like the moments themselves. Without masked pixels this is the textbook
    ``Σ_i var_i (q_i − q̄)(q_i − q̄)ᵀ / W²``. Negative corrected intensities keep their sign
    (no clipping), so ``q̄`` is linear-fractional in the counts and the first order is the
    whole story up to ``O(1/W²)``.

    Where the moments were brought to the reference scan grid by a bilinear drift shift
    (weights ``α_j`` over neighbouring scan points, independent frames), the variance channels
    must be shifted with ``α_j²`` (:func:`~spndi_dask.kernels.shift_maps` with ``power=2``).
    The background ``b`` (per frame, the mean over every detector pixel outside the ROI and
    every scan point) is treated as exact: its own variance is that of one voxel divided by
    the number of values it averages (10⁴–10⁷), far below the counts' — it is left out.

    Parameters
    ----------
    m : array (..., len(MOMENTS))
        Moment sums summed over angles, with the variance channels (``var`` and
        :data:`VARIANCES`) as described.

    Returns
    -------
    numpy.ndarray (..., 3, 3)
        ``Cov(q̄)``; NaN where ``Σ w r ≤ 0``.

    Examples
    --------
    Two voxels along x with counts 1 and 3 at dq = 0 and 4: ``q̄_x = 3`` and
    ``Var(q̄_x) = (1·3² + 3·1²)/4² = 0.75``.

    >>> w = np.zeros((1, 1, 1, 1, 2), np.float32); w[..., 0], w[..., 1] = 1, 3
    >>> dq = np.zeros((1, 1, 2, 3)); dq[0, 0, 1, 0] = 4.0
    >>> m = moment_sums(w, w, dq, np.arange(1), np.arange(2))[0]
    >>> float(com_covariance(m)[0, 0, 0, 0])
    0.75
    """
    m = np.asarray(m, np.float64)
    s = m[..., 0]
    w = np.where(s > 0, s, np.nan)
    mu = m[..., 1:4] / w[..., None]
    v00 = m[..., _VAR]
    v0 = m[..., VARIANCES.start : VARIANCES.start + 3]
    cov = np.empty((*s.shape, 3, 3))
    for k, (i, j) in enumerate(_PAIRS):
        vij = m[..., VARIANCES.start + 3 + k]
        c = vij - mu[..., i] * v0[..., j] - mu[..., j] * v0[..., i] + mu[..., i] * mu[..., j] * v00
        cov[..., i, j] = cov[..., j, i] = c / (w * w)
    return cov


def strain_tilt_sigma(q: np.ndarray, cov: np.ndarray, frame: Any) -> dict[str, np.ndarray]:
    """Standard errors of d-spacing, strain and tilts from the covariance of ``q̄`` (delta method).

    With ``n = |q|``, ``u = q/n`` and the crystal frame ``(x̂, ŷ, ẑ)`` of reference ``h``
    (:func:`~spndi_dask.geometry.strain_tilt`): ``σ_n² = uᵀ C u``;
    ``d = 2π/n`` gives ``σ_d = 2π σ_n / n²``; ``strain = |h|/n − 1`` gives
    ``σ_strain = |h| σ_n / n²``; ``tilt_x = atan2(a, b)`` with ``a = q·x̂``, ``b = q·ẑ`` has the
    gradient ``(b x̂ − a ẑ)/(a² + b²)`` and ``σ² = ∇ᵀ C ∇`` (``tilt_y`` likewise with ``ŷ``).
    The reference ``h`` is held fixed (it averages a whole particle).

    Parameters
    ----------
    q : array (..., 3)
        Centre-of-mass vectors (1/Å, sample frame).
    cov : array (..., 3, 3)
        Their covariance (:func:`com_covariance`).
    frame : CrystalFrame

    Returns
    -------
    dict
        ``d_spacing`` (Å), ``strain`` (1), ``tilt_x``, ``tilt_y`` (rad) standard errors.

    Examples
    --------
    >>> from spndi_dask.geometry import crystal_frame
    >>> f = crystal_frame([0.0, 0.0, 2.0])
    >>> s = strain_tilt_sigma(np.array([0.0, 0.0, 2.0]), np.diag([1e-6, 4e-6, 9e-6]), f)
    >>> {k: round(float(v), 7) for k, v in s.items()}
    {'d_spacing': 0.0047124, 'strain': 0.0015, 'tilt_x': 0.0005, 'tilt_y': 0.001}
    """
    q = np.asarray(q, np.float64)
    n = np.linalg.norm(q, axis=-1)

    def quad(g: np.ndarray) -> np.ndarray:
        return np.sqrt(np.maximum(np.einsum("...i,...ij,...j->...", g, cov, g), 0.0))

    sigma_n = quad(q / n[..., None])
    b = q @ frame.z
    out = {
        "d_spacing": 2 * np.pi * sigma_n / n**2,
        "strain": np.linalg.norm(frame.h) * sigma_n / n**2,
    }
    for name, axis in (("tilt_x", frame.x), ("tilt_y", frame.y)):
        a = q @ axis
        grad = (b[..., None] * axis - a[..., None] * frame.z) / (a * a + b * b)[..., None]
        out[name] = quad(grad)
    return out


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
