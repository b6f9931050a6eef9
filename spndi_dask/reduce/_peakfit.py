"""Per-pixel 3D Gaussian peak fits on the common q grid (pure NumPy/numba kernels).

The model of one scan pixel's pattern ``I(x, y, z)`` on a regular grid is an axis-aligned 3D
Gaussian on a constant background,

``m = A · exp(−(x−μx)²/2σx² − (y−μy)²/2σy² − (z−μz)²/2σz²) + B``  (8 parameters),

fitted by Levenberg–Marquardt (Marquardt's diagonal scaling, analytic Jacobian) to the grid
points inside the measured range (``covered``), by ordinary (unweighted) least squares: the
resampled grid values are not independent Poisson counts, and unit weights let the bright core
of the main peak, not the weak flanks, decide the centre (with ``1/I`` weights a weak second
peak pulls harder). The start is the intensity-weighted centre and spread of the grid points
above half the maximum (robust to a weaker second peak, which the full moments average in).

Goodness of fit: ``chi2`` is Pearson's χ² per degree of freedom at the solution,
``Σ (I − m)² / max(m, 1) / (N − 8)`` over the N covered points: about 1 when the residuals are
counting noise of count-scaled data and the model describes the peak, larger where the pattern
has structure the model lacks (a second peak, a split or asymmetric peak). The trilinear
resampling onto the grid correlates neighbouring points, so compare it between pixels rather
than with 1.

One pixel is fitted in one numba call, the pixels of a block in a compiled loop (no Python
loop per pixel); dask runs the blocks in parallel (:mod:`spndi_dask.reduce.peakfit`).

Examples
--------
>>> x = np.arange(12.0)
>>> X, Y, Z = np.meshgrid(x, x, x, indexing="ij")
>>> g = 50 * np.exp(-((X - 5.3) ** 2 / 4.5 + (Y - 6.1) ** 2 / 8 + (Z - 4.7) ** 2 / 2)) + 0.5
>>> p = fit_gaussian_3d(g[None].astype(np.float32), np.ones(g.shape, bool), (x, x, x))
>>> np.round(p[0, :8], 4).tolist()
[50.0, 5.3, 6.1, 4.7, 1.5, 2.0, 1.0, 0.5]
>>> int(p[0, FIT_PARAMS.index("status")])
0
"""

from __future__ import annotations

import math

import numba
import numpy as np

__all__ = ["FIT_PARAMS", "FIT_STATUS", "fit_gaussian_3d"]

#: Columns of :func:`fit_gaussian_3d`'s result (centres and widths in the grid's units).
FIT_PARAMS = (
    "amplitude",
    "centre_x",
    "centre_y",
    "centre_z",
    "width_x",
    "width_y",
    "width_z",
    "background",
    "chi2",
    "iterations",
    "status",
)
#: The ``status`` column: fitted; stopped at the iteration limit (the parameters are kept);
#: no signal (NaN, not fitted); failed (NaN: not finite, or the peak left the grid).
FIT_STATUS = {"converged": 0, "iteration_limit": 1, "no_signal": 2, "failed": 3}
_NP = 8  # model parameters
# the intensity-weighted spread of a 3D Gaussian above half its maximum, in σ (per axis):
# sqrt(∫₀ᴿ r⁴e^{−r²/2}dr / 3∫₀ᴿ r²e^{−r²/2}dr), R² = 2 ln 2
_HALF_MAX_SPREAD = 0.5047194


@numba.njit(cache=True, nogil=True)
def _factors(n, mu, s, e, p, q):
    """Per axis: ``e = exp(−u²/2)``, ``p = u/σ``, ``q = u²/σ`` with ``u = (i − μ)/σ``."""
    for i in range(n):
        u = (i - mu) / s
        e[i] = math.exp(-0.5 * u * u)
        p[i] = u / s
        q[i] = u * u / s


@numba.njit(cache=True, nogil=True)
def _normal_equations(d, cov, par, jtj, jtr, scratch):
    """``JᵀJ``, ``Jᵀr`` and ``Σr²`` of the model at ``par`` (fills jtj/jtr; returns Σr²)."""
    nx, ny, nz = d.shape
    ex, px, qx = scratch[0, :nx], scratch[1, :nx], scratch[2, :nx]
    ey, py, qy = scratch[3, :ny], scratch[4, :ny], scratch[5, :ny]
    ez, pz, qz = scratch[6, :nz], scratch[7, :nz], scratch[8, :nz]
    amp, bg = par[0], par[7]
    _factors(nx, par[1], par[4], ex, px, qx)
    _factors(ny, par[2], par[5], ey, py, qy)
    _factors(nz, par[3], par[6], ez, pz, qz)
    jtj[:, :] = 0.0
    jtr[:] = 0.0
    j = np.empty(_NP)
    ssr = 0.0
    for i in range(nx):
        for k in range(ny):
            gxy = ex[i] * ey[k]
            for m in range(nz):
                if not cov[i, k, m]:
                    continue
                g = gxy * ez[m]
                a = amp * g
                r = d[i, k, m] - (a + bg)
                ssr += r * r
                j[0] = g
                j[1] = a * px[i]
                j[2] = a * py[k]
                j[3] = a * pz[m]
                j[4] = a * qx[i]
                j[5] = a * qy[k]
                j[6] = a * qz[m]
                j[7] = 1.0
                for u in range(_NP):
                    ju = j[u]
                    jtr[u] += ju * r
                    for v in range(u + 1):
                        jtj[u, v] += ju * j[v]
    for u in range(_NP):
        for v in range(u):
            jtj[v, u] = jtj[u, v]
    return ssr


@numba.njit(cache=True, nogil=True)
def _residuals(d, cov, par, scratch, pearson):
    """``Σr²`` of the model at ``par`` (or Pearson's ``Σr²/max(m, 1)`` when ``pearson``)."""
    nx, ny, nz = d.shape
    ex, px, qx = scratch[0, :nx], scratch[1, :nx], scratch[2, :nx]
    ey, py, qy = scratch[3, :ny], scratch[4, :ny], scratch[5, :ny]
    ez, pz, qz = scratch[6, :nz], scratch[7, :nz], scratch[8, :nz]
    _factors(nx, par[1], par[4], ex, px, qx)
    _factors(ny, par[2], par[5], ey, py, qy)
    _factors(nz, par[3], par[6], ez, pz, qz)
    out = 0.0
    for i in range(nx):
        for k in range(ny):
            gxy = par[0] * ex[i] * ey[k]
            for m in range(nz):
                if cov[i, k, m]:
                    model = gxy * ez[m] + par[7]
                    r = d[i, k, m] - model
                    out += r * r / max(model, 1.0) if pearson else r * r
    return out


@numba.njit(cache=True, nogil=True)
def _solve(a, b, out):
    """Solve the symmetric positive definite ``a x = b`` (Cholesky); False if not SPD."""
    n = b.size
    low = np.zeros((n, n))
    for i in range(n):
        for k in range(i + 1):
            s = a[i, k]
            for m in range(k):
                s -= low[i, m] * low[k, m]
            if i == k:
                if not s > 0.0:
                    return False
                low[i, i] = math.sqrt(s)
            else:
                low[i, k] = s / low[k, k]
    y = np.empty(n)
    for i in range(n):
        s = b[i]
        for m in range(i):
            s -= low[i, m] * y[m]
        y[i] = s / low[i, i]
    for i in range(n - 1, -1, -1):
        s = y[i]
        for m in range(i + 1, n):
            s -= low[m, i] * out[m]
        out[i] = s / low[i, i]
    return True


@numba.njit(cache=True, nogil=True)
def _start(d, cov, par):
    """Start values: centre and spread of the points above half the maximum; False if no peak."""
    nx, ny, nz = d.shape
    top = 0.0
    for i in range(nx):
        for k in range(ny):
            for m in range(nz):
                if cov[i, k, m] and d[i, k, m] > top:
                    top = d[i, k, m]
    if not top > 0.0:
        return False
    w = 0.0
    s1 = np.zeros(3)
    s2 = np.zeros(3)
    for i in range(nx):
        for k in range(ny):
            for m in range(nz):
                v = d[i, k, m]
                if cov[i, k, m] and v >= 0.5 * top:
                    w += v
                    s1[0] += v * i
                    s1[1] += v * k
                    s1[2] += v * m
                    s2[0] += v * i * i
                    s2[1] += v * k * k
                    s2[2] += v * m * m
    size = (nx, ny, nz)
    par[0] = top
    par[7] = 0.0
    for a in range(3):
        mu = s1[a] / w
        spread = math.sqrt(max(s2[a] / w - mu * mu, 0.0)) / _HALF_MAX_SPREAD
        par[1 + a] = mu
        par[4 + a] = min(max(spread, 0.5), size[a] / 2.0)
    return True


@numba.njit(cache=True, nogil=True)
def _fit_one(d, cov, n_cov, max_iter, out):
    """Fit one pattern ``d (nx, ny, nz)`` in grid-index units; writes ``out`` (FIT_PARAMS)."""
    nx, ny, nz = d.shape
    par = np.empty(_NP)
    trial = np.empty(_NP)
    step = np.empty(_NP)
    jtj = np.empty((_NP, _NP))
    damped = np.empty((_NP, _NP))
    jtr = np.empty(_NP)
    scratch = np.empty((9, max(nx, ny, nz)))
    out[:] = np.nan
    out[9] = 0.0
    if n_cov <= _NP or not _start(d, cov, par):
        out[10] = 2.0
        return
    lam = 1e-3
    ssr = _normal_equations(d, cov, par, jtj, jtr, scratch)
    status = 1.0
    it = 0
    while it < max_iter:
        it += 1
        for u in range(_NP):
            for v in range(_NP):
                damped[u, v] = jtj[u, v]
            damped[u, u] = jtj[u, u] * (1.0 + lam) + 1e-300
        ok = _solve(damped, jtr, step)
        if ok:
            for u in range(_NP):
                trial[u] = par[u] + step[u]
            # a positive peak of at least a tenth of a grid step, centred near the grid
            ok = trial[0] > 0.0
            for a in range(3):
                size = (nx, ny, nz)[a]
                ok = ok and 0.1 < trial[4 + a] < 4.0 * size and -size < trial[1 + a] < 2.0 * size
        new = _residuals(d, cov, trial, scratch, False) if ok else np.inf
        if new < ssr:
            # converged: residuals flat, or centres and widths settled (to 1e-9 grid steps)
            small = ssr - new <= 1e-10 * ssr
            settled = True
            for u in range(1, 7):
                settled = settled and abs(step[u]) <= 1e-9
            small = small or settled
            par[:] = trial
            ssr = _normal_equations(d, cov, par, jtj, jtr, scratch)
            lam = max(lam * 0.1, 1e-12)
            if small:
                status = 0.0
                break
        else:
            lam *= 10.0
            if lam > 1e12:  # no step lowers the residuals: at the minimum (to rounding)
                status = 0.0
                break
    inside = True
    for a in range(3):
        inside = inside and -0.5 <= par[1 + a] <= (nx, ny, nz)[a] - 0.5
    if not (inside and np.all(np.isfinite(par))):
        out[9] = it
        out[10] = 3.0
        return
    out[:_NP] = par
    out[8] = _residuals(d, cov, par, scratch, True) / max(n_cov - _NP, 1)
    out[9] = it
    out[10] = status


@numba.njit(cache=True, nogil=True)
def _fit_all(patterns, cov, max_iter, out):
    n_cov = 0
    for v in cov.ravel():
        n_cov += v
    for p in range(patterns.shape[0]):
        _fit_one(patterns[p], cov, n_cov, max_iter, out[p])


def fit_gaussian_3d(
    patterns: np.ndarray,
    covered: np.ndarray,
    offsets: tuple[np.ndarray, np.ndarray, np.ndarray],
    *,
    max_iter: int = 50,
) -> np.ndarray:
    """Fit an axis-aligned 3D Gaussian plus a constant to each pattern (Levenberg–Marquardt).

    Parameters
    ----------
    patterns : array (..., nx, ny, nz)
        Intensities on a regular grid (float32 or float64).
    covered : bool array (nx, ny, nz)
        Grid points with data; the others are left out of the fit.
    offsets : three 1D arrays (nx,), (ny,), (nz,)
        Equally spaced coordinates of the grid along each axis: centres and widths come back
        in their units.
    max_iter : int
        Bound on the Levenberg–Marquardt steps (tried and rejected ones count).

    Returns
    -------
    numpy.ndarray (..., len(FIT_PARAMS)) float64
        :data:`FIT_PARAMS` per pattern: amplitude, centre, widths (standard deviations),
        background, Pearson χ² per degree of freedom, steps taken and :data:`FIT_STATUS`
        (NaN parameters where there is no signal or the fit failed).
    """
    patterns = np.asarray(patterns)
    grid = patterns.shape[-3:]
    if patterns.dtype not in (np.float32, np.float64):
        patterns = patterns.astype(np.float64)
    covered = np.ascontiguousarray(np.broadcast_to(np.asarray(covered, bool), grid))
    flat = np.ascontiguousarray(patterns.reshape(-1, *grid))
    out = np.empty((flat.shape[0], len(FIT_PARAMS)))
    if flat.shape[0]:
        _fit_all(flat, covered, int(max_iter), out)
    origin = np.array([float(o[0]) for o in offsets])
    step = np.array([float(o[1] - o[0]) if len(o) > 1 else 1.0 for o in offsets])
    out[:, 1:4] = origin + out[:, 1:4] * step
    out[:, 4:7] *= np.abs(step)
    return out.reshape(*patterns.shape[:-3], len(FIT_PARAMS))
