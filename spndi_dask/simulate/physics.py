"""The physics of a simulated scan: the sample's fields and the diffraction they give.

* :func:`make_particle`: the outline, thickness, grains, domain types, boundaries, strain and tilt
  fields, the local reciprocal lattice vector ``G(y, x)`` and the per-angle drift of one particle
  scan, as a :class:`SimulatedParticle` (the ground truth).
* :func:`expected_counts`: the expected counts of every detector voxel for a set of scan points,
  Gaussian Bragg peaks seen through the annular pupil of :func:`pupil_rings` (pure NumPy).

The measurement itself (flux, drift, noise, detector defects) and the files are in
:mod:`spndi_dask.simulate.beamline`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.special import i0e

from spndi_dask.geometry import crystal_frame, q_from_strain_tilt
from spndi_dask.simulate.presets import SimulationConfig

__all__ = ["SimulatedParticle", "expected_counts", "make_particle", "pupil_rings"]


@dataclass
class SimulatedParticle:
    """Ground truth of one particle scan (all maps on the undrifted scan grid)."""

    name: str
    thickness: np.ndarray  # (ny, nx) in [0, 1], probe-blurred
    particle_mask: np.ndarray  # (ny, nx) bool
    objects: np.ndarray  # (ny, nx) int, 0 = background, 1..n = particle objects
    domain: np.ndarray  # (ny, nx) int, -1 outside, else domain type
    grain: np.ndarray  # (ny, nx) int, -1 outside, else grain id
    boundary: np.ndarray  # (ny, nx) bool
    strain: np.ndarray
    tilt_x: np.ndarray
    tilt_y: np.ndarray
    sigma_q: np.ndarray
    G: np.ndarray  # (ny, nx, 3) sample frame, 1/Å
    drift: np.ndarray  # (n_angle, 2) (dy, dx) scan pixels; content moves by +drift
    xrf_yield: np.ndarray  # (ny, nx)

    def save(self, path: Path, **extra: Any) -> None:
        """Write all fields to a ``.npz`` file."""
        np.savez_compressed(path, **{k: v for k, v in asdict(self).items() if k != "name"}, **extra)


# -- sample ------------------------------------------------------------------------------------
def _blob(ny: int, nx: int, center: tuple[float, float], radius: float, rng) -> np.ndarray:
    """Star-shaped irregular outline: normalised radius field (< 1 inside)."""
    yy, xx = np.mgrid[0:ny, 0:nx].astype(float)
    dy, dx = yy - center[0], xx - center[1]
    phi = np.arctan2(dy, dx)
    r = np.ones_like(phi)
    for k in range(2, 6):
        r += rng.uniform(0.03, 0.12) / (k - 1) * np.cos(k * phi + rng.uniform(0, 2 * np.pi))
    return np.hypot(dy, dx) / (radius * r)


def make_particle(
    config: SimulationConfig, index: int, frame_h: np.ndarray, *, rng: np.random.Generator
) -> SimulatedParticle:
    """Draw the sample fields of particle ``index`` (see module docstring)."""
    ny, nx = config.scan_shape
    n_obj = config.objects_per_scan[index]
    objects = np.zeros((ny, nx), int)
    rho = np.full((ny, nx), np.inf)
    main_r = 0.36 * min(ny, nx)
    centers = [(ny / 2 + rng.uniform(-1, 1), nx / 2 + rng.uniform(-1, 1))]
    radii = [main_r]
    for _ in range(1, n_obj):  # satellites near a corner, possibly touching the main one
        corner = (rng.choice([0.2, 0.8]) * ny, rng.choice([0.15, 0.85]) * nx)
        centers.append(corner)
        radii.append(0.45 * main_r)
    for i, (c, r) in enumerate(zip(centers, radii, strict=True), start=1):
        d = _blob(ny, nx, c, r, rng)
        objects[(d < 1) & (objects == 0)] = i
        rho = np.minimum(rho, d)
    mask = objects > 0
    dome = np.sqrt(np.clip(1 - np.minimum(rho, 1) ** 2, 0, 1)) * 0.7 + 0.3 * mask
    thickness = ndimage.gaussian_filter(dome * mask, config.probe_sigma_px)

    # grains (Voronoi) and their domain types
    n_types = len(config.domain_types)
    lo, hi = config.grains_per_particle
    yy, xx = np.mgrid[0:ny, 0:nx]
    grain = np.full((ny, nx), -1)
    grain_type: list[int] = []
    dist_sorted = np.full((ny, nx, 2), np.inf)
    for obj in range(1, n_obj + 1):
        pts = np.argwhere(objects == obj)
        n_g = int(rng.integers(lo, hi + 1)) if obj == 1 else int(rng.integers(1, 3))
        n_g = min(n_g, len(pts))
        seeds = pts[rng.choice(len(pts), n_g, replace=False)]
        types = rng.permutation(np.resize(rng.permutation(n_types), n_g))
        d = np.hypot(yy[..., None] - seeds[:, 0], xx[..., None] - seeds[:, 1])  # (ny,nx,n_g)
        order = np.argsort(d, axis=-1)
        inside = objects == obj
        grain[inside] = len(grain_type) + order[inside, 0]
        ds = (
            np.take_along_axis(d, order[..., :2], axis=-1)
            if n_g > 1
            else np.concatenate([d, np.full_like(d, np.inf)], axis=-1)
        )
        # second-nearest seed of a *different type* decides whether this is a boundary
        other = np.full((ny, nx), np.inf)
        nearest_type = types[order[..., 0]]
        for j in range(n_g):
            diff_type = types[j] != nearest_type
            other = np.where(diff_type, np.minimum(other, d[..., j]), other)
        ds[..., 1] = other
        dist_sorted[inside] = ds[inside]
        grain_type.extend(int(t) for t in types)
    domain = np.where(grain >= 0, np.asarray([*grain_type, 0])[grain], -1)
    # perpendicular distance to the bisector between nearest and other-type seed ≈ (d2-d1)/2
    with np.errstate(invalid="ignore"):  # inf - inf outside the particles
        gap = np.nan_to_num((dist_sorted[..., 1] - dist_sorted[..., 0]) / 2, nan=np.inf)
    boundary = mask & (gap < config.boundary_width_px)

    table = np.asarray(config.domain_types, float)
    values = table[np.clip(domain, 0, None)]  # (ny, nx, 4)
    # blend across boundaries with a normalised Gaussian restricted to the particle
    w = mask.astype(float)
    sig = config.boundary_width_px / 1.5
    num = np.stack([ndimage.gaussian_filter(values[..., k] * w, sig) for k in range(4)], -1)
    den = ndimage.gaussian_filter(w, sig)[..., None]
    blended = np.where(mask[..., None], num / np.maximum(den, 1e-12), values)
    strain, tilt_x, tilt_y, sigma_q = (blended[..., k] for k in range(4))
    # smooth strain gradient + per-particle orientation offset
    gy, gx = rng.normal(size=2)
    ramp = (gy * (yy - ny / 2) / ny + gx * (xx - nx / 2) / nx) * config.gradient_strain
    strain = strain + ramp
    tilt_x = tilt_x + rng.normal(0, config.particle_tilt_spread)
    tilt_y = tilt_y + rng.normal(0, config.particle_tilt_spread)
    sigma_q = sigma_q * (
        1 + config.boundary_broadening * np.exp(-(np.minimum(gap / sig, 30.0) ** 2)) * mask
    )
    frame = crystal_frame(frame_h, config.geometry().rocking_axis)
    G = q_from_strain_tilt(strain, tilt_x, tilt_y, frame)

    drift = np.cumsum(rng.normal(0, config.drift_step_px, size=(config.n_angles, 2)), axis=0)
    drift -= drift[config.n_angles // 2]
    xrf_yield = thickness * (1 + 0.05 * rng.standard_normal((ny, nx)))
    nan_out = ~mask
    for a in (strain, tilt_x, tilt_y):
        a[nan_out] = np.nan
    return SimulatedParticle(
        name=f"p{index + 1}",
        thickness=thickness,
        particle_mask=mask,
        objects=objects,
        domain=domain,
        grain=grain,
        boundary=boundary,
        strain=strain,
        tilt_x=tilt_x,
        tilt_y=tilt_y,
        sigma_q=sigma_q,
        G=G,
        drift=drift,
        xrf_yield=xrf_yield,
    )


# -- beam and detector -------------------------------------------------------------------------
def pupil_rings(config: SimulationConfig) -> np.ndarray:
    """Annular pupil as rings ``(ρ, c, weight)`` in q units (1/Å).

    A ray of the focused beam tilted by ``α`` from the axis has ``k_i = k n``; relative to the
    nominal ``k ẑ`` it moves a voxel's true momentum transfer by ``k(ẑ − n)``: a ring of radius
    ``ρ = k sin α`` normal to the beam plus ``c = k(1 − cos α)`` along it. Radii are Gauss–Legendre
    nodes in ``α²`` (uniform illumination per area); without a pupil a single ``(0, 0, 1)``.
    """
    if not config.pupil:
        return np.array([[0.0, 0.0, 1.0]])
    k = config.geometry().k
    lo, hi = (config.pupil_inner_mrad * 1e-3) ** 2, (config.pupil_outer_mrad * 1e-3) ** 2
    nodes, weights = np.polynomial.legendre.leggauss(config.pupil_rings)
    alpha = np.sqrt(lo + (nodes + 1) / 2 * (hi - lo))
    return np.stack([k * np.sin(alpha), k * (1 - np.cos(alpha)), weights / weights.sum()], -1)


def _i0e(x: np.ndarray) -> np.ndarray:
    """Exponentially scaled Bessel ``I0``: asymptotic series for x ≥ 8 (rel. error < 3e-5)."""
    inv = 1.0 / np.maximum(x, 8.0)
    out = (1 + inv * (0.125 + inv * (9 / 128 + inv * 225 / 3072))) * np.sqrt(inv / (2 * np.pi))
    small = x < 8.0
    out[small] = i0e(x[small])
    return out


def expected_counts(
    q: np.ndarray,
    G: np.ndarray,
    sigma_q: np.ndarray,
    amplitude: np.ndarray,
    *,
    beam: np.ndarray | None = None,
    rings: np.ndarray | None = None,
) -> np.ndarray:
    """Expected counts of Gaussian Bragg peaks seen through an annular pupil (NumPy kernel).

    For each ring ``(ρ, c, w)`` the azimuthal average of ``exp(−|v − ρ u(φ)|²/2σ²)`` over the
    ring (``v = q − G + c n̂``, ``u ⊥ n̂``) is exact:
    ``exp(−(v∥² + (|v⊥| − ρ)²)/2σ²) · i0e(ρ|v⊥|/σ²)``.

    Parameters
    ----------
    q : array (n_pix, 3)
        Nominal voxel momentum transfers (sample frame, ``k_i = k ẑ``).
    G, sigma_q, amplitude : arrays (m, 3), (m,), (m,)
        Peak centre, width and height of each of ``m`` scan points.
    beam : array (3,), optional
        Beam direction ``n̂`` in the sample frame (needed with rings).
    rings : array (n_ring, 3), optional
        ``(ρ, c, weight)`` from :func:`pupil_rings`; default: a parallel beam.

    Returns
    -------
    numpy.ndarray of shape (m, n_pix)

    Examples
    --------
    >>> q = np.array([[0.0, 0.0, 1.0], [0.0, 0.0, 1.001]])
    >>> expected_counts(q, np.array([[0.0, 0.0, 1.0]]), np.array([1e-3]), np.array([10.0])).round(3)
    array([[10.   ,  6.065]], dtype=float32)
    """
    if rings is None:
        rings, beam = np.array([[0.0, 0.0, 1.0]]), np.array([0.0, 0.0, 1.0])
    n = np.asarray(beam, float) / np.linalg.norm(beam)
    # centre both sides in float64, then work in float32: the squares stay small and precise
    centre = G.mean(axis=0)
    qc, gc = q - centre, G - centre
    a_q, a_g = qc @ n, gc @ n
    q_perp = (qc - a_q[:, None] * n).astype(np.float32)
    g_perp = (gc - a_g[:, None] * n).astype(np.float32)
    v_perp = (
        np.einsum("pi,pi->p", q_perp, q_perp)[None, :]
        - 2.0 * (g_perp @ q_perp.T)
        + np.einsum("mi,mi->m", g_perp, g_perp)[:, None]
    )
    np.sqrt(np.maximum(v_perp, 0.0, out=v_perp), out=v_perp)
    v_par = (a_q[None, :] - a_g[:, None]).astype(np.float32)
    inv = (1.0 / sigma_q**2).astype(np.float32)[:, None]
    out = np.zeros_like(v_perp)
    for rho, c, w in rings.astype(np.float32):
        e = v_par + c
        e *= e
        e += (v_perp - rho) ** 2
        e *= -0.5 * inv
        np.exp(e, out=e)
        if rho > 0:
            e *= _i0e(rho * v_perp * inv)
        out += w * e
    out *= amplitude[:, None]
    return out
