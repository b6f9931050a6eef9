"""Physics-based synthetic SPNDI beamtimes with ground truth (demo, tests, benchmarks).

The forward model, per particle scan:

1. **Sample**: one or more particles of irregular (star-shaped, random-harmonic) outline on the
   scan grid, with a thickness dome blurred by the probe. Inside, Voronoi grains each of one
   *domain type* (shared across the beamtime: the future clusters) with its own strain, tilt and
   Bragg-peak width; a smooth strain gradient across the particle; boundaries where neighbouring
   grains of different type meet, with fields blended across ``boundary_width_px`` and extra peak
   broadening (defects). This gives a local reciprocal lattice vector ``G(y, x)`` per scan pixel
   (sample frame, from :func:`~spndi_dask.geometry.q_from_strain_tilt` around the reference ``G0``
   that satisfies Bragg's law at the centre angle on the arm-axis pixel).
2. **Beam**: a zone-plate focused beam is a cone of incident directions through an annular pupil;
   every voxel (rocking angle × detector pixel) collects ``Σ_pupil exp(−|q − G|²/2σ²)`` with
   ``q = R(a, θ)ᵀ (k_f − k_i)`` from :mod:`spndi_dask.geometry` for each pupil direction ``k_i``.
3. **Measurement**: incident flux (monitor) fluctuating per point and decaying slowly, per-angle
   drift of the scan grid (random walk, sub-pixel; content moves by ``+drift``), detector
   background, Poisson noise, hot and dead pixels, optional dark offset, saturation at the dtype
   maximum; an angle-independent XRF map per point (also drifted).

It writes the beamline layout of ``DESIGN.md``: ``raw/<particle>/angle_NNN.h5`` with frames
(``/entry/instrument/detector/data``, bitshuffle-LZ4 per frame as Eiger/Merlin files),
``/entry/instrument/monitor/Io`` and ``/entry/instrument/xrf/Co_K``; ``beamtime.toml``; and
``ground_truth/<particle>.npz`` plus ``ground_truth/truth.json``. Seeded and deterministic: each
(particle, angle) file has its own random stream, so files are identical whatever the parallelism.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import dask
import numpy as np
from scipy import ndimage

from spndi_dask.compute import active_client
from spndi_dask.config import Manifest
from spndi_dask.geometry import (
    Geometry,
    crystal_frame,
    q_from_strain_tilt,
    q_sample,
    rotation_matrix,
    wavelength_angstrom,
)

__all__ = [
    "PRESETS",
    "SimulatedParticle",
    "SimulationConfig",
    "expected_counts",
    "make_particle",
    "preset",
    "simulate_beamtime",
]

logger = logging.getLogger(__name__)

FRAMES_DATASET = "/entry/instrument/detector/data"
MONITOR_DATASET = "/entry/instrument/monitor/Io"
XRF_DATASET = "/entry/instrument/xrf/Co_K"
THETA_DATASET = "/entry/sample/theta"


@dataclass(frozen=True)
class SimulationConfig:
    """Parameters of a simulated beamtime. Sizes are per particle scan.

    The defaults are the ``demo`` preset; see :data:`PRESETS` for the others.
    """

    name: str = "sim-beamtime"
    n_particles: int = 3
    objects_per_scan: tuple[int, ...] = (1, 2, 1)
    scan_shape: tuple[int, int] = (32, 40)
    scan_step_um: tuple[float, float] = (0.05, 0.05)
    n_angles: int = 21
    angle_step_deg: float = 0.05
    detector_shape: tuple[int, int] = (64, 64)
    pixel_size_m: float = 55e-6
    detector_distance_m: float = 0.5
    energy_kev: float = 9.0
    d0_angstrom: float = 4.683  # LiCoO2 (003)
    delta_deg: float = 4.0
    beam_center_offset: tuple[float, float] = (1.3, -0.7)
    # domain types shared by all particles: (strain, tilt_x rad, tilt_y rad, sigma_q 1/Å)
    domain_types: tuple[tuple[float, float, float, float], ...] = (
        (0.0, 0.0, 0.0, 1.2e-3),
        (1.2e-3, 1.0e-3, -0.6e-3, 1.6e-3),
        (-1.0e-3, -0.8e-3, 0.9e-3, 2.0e-3),
    )
    grains_per_particle: tuple[int, int] = (4, 7)
    boundary_width_px: float = 1.5
    boundary_broadening: float = 0.5
    gradient_strain: float = 2e-4
    particle_tilt_spread: float = 2e-4
    probe_sigma_px: float = 0.5
    # beam
    pupil: bool = True
    pupil_outer_mrad: float = 1.5
    pupil_inner_mrad: float = 0.75
    pupil_rings: int = 3
    # measurement
    peak_counts: float = 40.0
    background: float = 0.02
    dark_counts: float = 0.0
    hot_fraction: float = 2e-4
    # written to the manifest's [features] table: a short training for demos and tests
    train_epochs: int = 15
    hot_counts: float = 3000.0
    dead_fraction: float = 5e-4
    monitor_counts: float = 1e5
    monitor_noise: float = 0.03
    monitor_decay: float = 0.05
    xrf_counts: float = 400.0
    xrf_background: float = 5.0
    drift_step_px: float = 0.35
    dtype: str = "uint16"
    compression: str = "bitshuffle-lz4"
    block_points: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        if len(self.objects_per_scan) < self.n_particles:
            reps = -(-self.n_particles // len(self.objects_per_scan))
            object.__setattr__(self, "objects_per_scan", tuple(self.objects_per_scan) * reps)
        if self.compression not in ("bitshuffle-lz4", "gzip", "none"):
            raise ValueError(
                f"compression = {self.compression!r}: use 'bitshuffle-lz4', 'gzip' or 'none'"
            )
        if self.n_particles < 1 or self.n_angles < 2:
            raise ValueError("n_particles must be >= 1 and n_angles >= 2")

    @property
    def bragg_angle_deg(self) -> float:
        """θ_B of the reflection at the chosen energy."""
        s = wavelength_angstrom(self.energy_kev) / (2 * self.d0_angstrom)
        if s >= 1:
            raise ValueError(f"d0 = {self.d0_angstrom} Å is not reachable at {self.energy_kev} keV")
        return float(np.degrees(np.arcsin(s)))

    def geometry(self) -> Geometry:
        """Detector geometry: arm at 2θ_B, split between elevation δ and yaw γ."""
        two_theta = np.radians(2 * self.bragg_angle_deg)
        delta = np.radians(self.delta_deg)
        gamma = np.degrees(np.arccos(np.cos(two_theta) / np.cos(delta)))
        nr, nc = self.detector_shape
        return Geometry(
            energy_kev=self.energy_kev,
            detector_distance_m=self.detector_distance_m,
            pixel_size_m=self.pixel_size_m,
            gamma_deg=float(gamma),
            delta_deg=self.delta_deg,
            beam_center=(
                (nr - 1) / 2 + self.beam_center_offset[0],
                (nc - 1) / 2 + self.beam_center_offset[1],
            ),
        )

    def angles(self) -> np.ndarray:
        """Rocking motor positions (degrees), centred on θ_B."""
        offsets = (np.arange(self.n_angles) - (self.n_angles - 1) / 2) * self.angle_step_deg
        return np.round(self.bragg_angle_deg + offsets, 6)

    @property
    def raw_bytes(self) -> int:
        """Uncompressed size of all frames."""
        n = self.n_particles * self.n_angles * int(np.prod(self.scan_shape))
        return n * int(np.prod(self.detector_shape)) * np.dtype(self.dtype).itemsize


#: Named sizes. ``demo`` runs end to end in about a minute on 2 cores; ``medium`` and ``large``
#: (≥ 10 GB raw, 4× apart) are for benchmarks; ``small`` and ``tiny`` for tests.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        n_particles=2,
        objects_per_scan=(1, 2),
        scan_shape=(12, 14),
        n_angles=9,
        angle_step_deg=0.1,
        detector_shape=(32, 32),
        pixel_size_m=110e-6,
        pupil_rings=2,
        block_points=64,
    ),
    "small": dict(
        n_particles=2,
        objects_per_scan=(1, 2),
        scan_shape=(20, 24),
        n_angles=15,
        angle_step_deg=0.07,
        detector_shape=(40, 40),
        pixel_size_m=82.5e-6,
    ),
    "demo": {},
    "medium": dict(
        n_particles=2,
        objects_per_scan=(1, 2),
        scan_shape=(36, 36),
        n_angles=31,
        angle_step_deg=0.035,
        detector_shape=(128, 128),
        block_points=96,
    ),
    "large": dict(
        n_particles=2,
        objects_per_scan=(1, 2),
        scan_shape=(72, 72),
        n_angles=31,
        angle_step_deg=0.035,
        detector_shape=(128, 128),
        block_points=96,
    ),
}


def preset(name: str, **overrides: Any) -> SimulationConfig:
    """A :class:`SimulationConfig` from a named preset, with keyword overrides.

    >>> preset("tiny", seed=3).scan_shape
    (12, 14)
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return SimulationConfig(**{**PRESETS[name], **overrides})


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
    from scipy.special import i0e

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


def _detector_defects(config: SimulationConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng([config.seed, 7919])
    npix = int(np.prod(config.detector_shape))
    hot = rng.random(npix) < config.hot_fraction
    dead = (rng.random(npix) < config.dead_fraction) & ~hot
    dark = (
        config.dark_counts * (1 + 0.2 * rng.standard_normal(npix)).clip(0.2)
        if config.dark_counts > 0
        else np.zeros(npix)
    )
    return hot, dead, dark


def _shifted(field2d: np.ndarray, shift: np.ndarray, cval: float) -> np.ndarray:
    return ndimage.shift(field2d, shift, order=1, mode="constant", cval=cval)


def _h5_compression(config: SimulationConfig) -> dict[str, Any]:
    if config.compression == "bitshuffle-lz4":
        import hdf5plugin

        return dict(hdf5plugin.Bitshuffle(cname="lz4"))
    if config.compression == "gzip":
        return {"compression": "gzip", "compression_opts": 4, "shuffle": True}
    return {}


def _write_angle_file(
    path: str,
    config: SimulationConfig,
    particle_index: int,
    angle_index: int,
    fields: dict[str, np.ndarray],
) -> dict[str, Any]:
    """Simulate and write one angle's frames; atomic (temporary name, then rename)."""
    import h5py

    geometry = config.geometry()
    angle = float(config.angles()[angle_index])
    rng = np.random.default_rng([config.seed, particle_index, angle_index, 1])
    ny, nx = config.scan_shape
    shape = config.detector_shape
    npix = shape[0] * shape[1]
    shift = fields["drift"][angle_index]

    thick = _shifted(fields["thickness"], shift, 0.0).ravel()
    G = np.stack([_shifted(fields["G"][..., k], shift, np.nan) for k in range(3)], -1)
    G = G.reshape(-1, 3)
    sigma = _shifted(np.nan_to_num(fields["sigma_q"], nan=1e-3), shift, 1e-3).ravel()
    xrf = _shifted(fields["xrf_yield"], shift, 0.0).ravel()

    decay = 1 - config.monitor_decay * angle_index / max(config.n_angles - 1, 1)
    io = config.monitor_counts * decay * (1 + config.monitor_noise * rng.standard_normal(ny * nx))
    io = np.maximum(io, 1.0)
    amplitude = config.peak_counts * thick * (io / config.monitor_counts)
    amplitude *= (fields["sigma_ref"] / sigma) ** 3  # conserve integrated intensity
    lit = (thick > 1e-3) & np.all(np.isfinite(G), axis=1)

    q = q_sample(geometry, [angle], rows=np.arange(shape[0]), cols=np.arange(shape[1]))
    q = q.reshape(-1, 3)
    beam = rotation_matrix(geometry.rocking_axis, np.deg2rad(angle))[2]  # Rᵀ ẑ
    rings = pupil_rings(config)
    # cull detector pixels that no peak of this particle can reach at this angle
    g_lit = G[lit]
    if g_lit.size:
        centre = g_lit.mean(axis=0)
        reach = np.linalg.norm(g_lit - centre, axis=1).max() + 6 * sigma[lit].max()
        reach += rings[:, 0].max() + rings[:, 1].max()
        near = np.linalg.norm(q - centre, axis=-1) < reach
    else:
        near = np.zeros(npix, bool)
    near_idx = np.flatnonzero(near)

    hot, dead, dark = fields["hot"], fields["dead"], fields["dark"]
    dtype = np.dtype(config.dtype)
    vmax = np.iinfo(dtype).max if dtype.kind in "ui" else np.inf
    tmp = f"{path}.part"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    total_counts = 0
    with h5py.File(tmp, "w") as f:
        dset = f.create_dataset(
            FRAMES_DATASET,
            shape=(ny * nx, *shape),
            dtype=dtype,
            chunks=(1, *shape),
            **_h5_compression(config),
        )
        for start in range(0, ny * nx, config.block_points):
            stop = min(start + config.block_points, ny * nx)
            m = stop - start
            # background (+ dark): independent Poisson per voxel; without dark it is uniform,
            # so draw the total and scatter it (same distribution, far fewer random numbers)
            if dark.any():
                counts = rng.poisson(config.background + np.broadcast_to(dark, (m, npix)))
            else:
                n_bg = rng.poisson(config.background * m * npix)
                flat = np.bincount(rng.integers(0, m * npix, n_bg), minlength=m * npix)
                counts = flat.reshape(m, npix)
            sel = np.flatnonzero(lit[start:stop])
            if sel.size and near_idx.size:
                pts = start + sel
                lam = expected_counts(
                    q[near_idx], G[pts], sigma[pts], amplitude[pts], beam=beam, rings=rings
                )
                counts[np.ix_(sel, near_idx)] += rng.poisson(lam.astype(np.float64))
            counts[:, hot] = rng.poisson(config.hot_counts, size=(m, int(hot.sum())))
            counts[:, dead] = 0
            np.minimum(counts, vmax, out=counts)
            total_counts += int(counts.sum())
            dset[start:stop] = counts.astype(dtype).reshape(stop - start, *shape)
        f.create_dataset(MONITOR_DATASET, data=io.astype(np.float64))
        xrf_counts = rng.poisson(
            config.xrf_counts * xrf * io / config.monitor_counts + config.xrf_background
        )
        f.create_dataset(XRF_DATASET, data=xrf_counts.astype(np.float64))
        f.create_dataset(THETA_DATASET, data=angle)
        f.attrs["energy_kev"] = config.energy_kev
        f.attrs["scan_shape"] = list(config.scan_shape)
        f.attrs["simulated"] = True
    os.replace(tmp, path)
    return {"path": path, "angle": angle, "counts": total_counts}


def _write_dark(path: Path, config: SimulationConfig, dark: np.ndarray) -> None:
    import h5py

    rng = np.random.default_rng([config.seed, 104729])
    frames = rng.poisson(np.broadcast_to(dark, (10, dark.size))).reshape(10, *config.detector_shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset(FRAMES_DATASET, data=frames.astype(config.dtype))


def simulate_beamtime(
    out_dir: str | Path,
    config: SimulationConfig | None = None,
    *,
    scheduler: str | None = None,
) -> Manifest:
    """Simulate a whole beamtime into ``out_dir`` and return its validated manifest.

    Parameters
    ----------
    out_dir : path
        Created if needed. Receives ``beamtime.toml``, ``raw/`` and ``ground_truth/``.
    config : SimulationConfig, optional
        Defaults to the ``demo`` preset.
    scheduler : str, optional
        dask scheduler for the per-(particle, angle) tasks; default: the active distributed
        client if any, else ``'processes'`` (spawned) for large and ``'threads'`` for small jobs.

    Returns
    -------
    Manifest
        The manifest written to ``out_dir / 'beamtime.toml'``.

    Examples
    --------
    >>> import tempfile
    >>> m = simulate_beamtime(tempfile.mkdtemp(), preset("tiny", n_particles=1, n_angles=3))
    >>> [p.name for p in m.particles]
    ['p1']
    """
    config = config or SimulationConfig()
    out = Path(out_dir).resolve()
    (out / "ground_truth").mkdir(parents=True, exist_ok=True)
    geometry = config.geometry()
    angles = config.angles()
    # reference G0: Bragg condition on the arm-axis pixel at the centre angle
    g0 = q_sample(
        geometry,
        [angles[config.n_angles // 2]],
        rows=[geometry.beam_center[0]],
        cols=[geometry.beam_center[1]],
    )[0, 0, 0]
    hot, dead, dark = _detector_defects(config)
    sigma_ref = float(np.median(np.asarray(config.domain_types)[:, 3]))

    particles_toml = []
    tasks = []
    for i in range(config.n_particles):
        rng = np.random.default_rng([config.seed, i, 0])
        sp = make_particle(config, i, g0, rng=rng)
        sp.save(
            out / "ground_truth" / f"{sp.name}.npz",
            angles=angles,
            G0=g0,
            d0=2 * np.pi / np.linalg.norm(g0),
        )
        fields = {
            "thickness": sp.thickness,
            "G": sp.G,
            "sigma_q": sp.sigma_q,
            "drift": sp.drift,
            "xrf_yield": sp.xrf_yield,
            "hot": hot,
            "dead": dead,
            "dark": dark,
            "sigma_ref": sigma_ref,
        }
        for a in range(config.n_angles):
            path = str(out / "raw" / sp.name / f"angle_{a:03d}.h5")
            tasks.append(dask.delayed(_write_angle_file, pure=False)(path, config, i, a, fields))
        entry = {
            "name": sp.name,
            "frames": f"raw/{sp.name}/angle_{{index:03d}}.h5",
            "dataset": FRAMES_DATASET,
            "monitor": MONITOR_DATASET,
            "xrf": XRF_DATASET,
            "angles_deg": [float(x) for x in angles],
            "scan_shape": list(config.scan_shape),
            "scan_step_um": list(config.scan_step_um),
        }
        if config.dark_counts > 0:
            entry["dark"] = "raw/dark.h5"
        particles_toml.append(entry)
    if config.dark_counts > 0:
        _write_dark(out / "raw" / "dark.h5", config, dark)

    if scheduler is None and active_client() is None:  # else: use the active client
        scheduler = "processes" if config.raw_bytes > 2**28 else "threads"
    logger.info(
        "simulating %d files (%.2f GB raw) into %s", len(tasks), config.raw_bytes / 1e9, out
    )
    results = dask.compute(*tasks, scheduler=scheduler) if scheduler else dask.compute(*tasks)

    data = {
        "name": config.name,
        "output": "results",
        "geometry": geometry.to_dict(),
        "particles": particles_toml,
        "features": {"max_epochs": config.train_epochs},
    }
    manifest = Manifest.from_dict(data, base_dir=out, source=str(out / "beamtime.toml"))
    (out / "beamtime.toml").write_text(
        "# Simulated beamtime written by `spndi simulate`; ground truth in ground_truth/\n"
        + manifest.to_toml()
    )
    truth = {
        "config": asdict(config),
        "G0": g0.tolist(),
        "d0_angstrom": float(2 * np.pi / np.linalg.norm(g0)),
        "domain_types": [
            dict(zip(("strain", "tilt_x", "tilt_y", "sigma_q"), row, strict=True))
            for row in config.domain_types
        ],
        "total_counts": int(sum(r["counts"] for r in results)),
        "raw_bytes": config.raw_bytes,
    }
    (out / "ground_truth" / "truth.json").write_text(json.dumps(truth, indent=2))
    return Manifest.from_toml(out / "beamtime.toml")
