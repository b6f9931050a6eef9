"""Pure NumPy kernels of the common q grid: rocking angle and detector pixel of a q point, the
sparse interpolation operator and the drift-corrected patterns of a block. Re-exported by
:mod:`spndi_dask.reduce._kernels`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import sparse

from spndi_dask.geometry import Geometry, axis_vector, rotation_matrix
from spndi_dask.kernels import shift_bilinear

__all__ = [
    "fill_patterns_operator",
    "grid_operator",
    "patterns_block",
    "solve_rocking_angle",
    "used_voxels",
]


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


def fill_patterns_operator(operator: Any, fill: sparse.csr_matrix | None, n_angle: int) -> Any:
    """The q-grid operator of :func:`grid_operator` applied to filled voxels (every angle)."""
    if fill is None:
        return operator
    out = (operator @ sparse.kron(sparse.identity(n_angle), fill, format="csr")).tocsr()
    out.eliminate_zeros()
    return out.astype(np.float32)
