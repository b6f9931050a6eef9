"""Diffraction geometry: detector pixels and rocking angles to momentum transfer, crystal frame.

The convention is the one of ``DESIGN.md`` (and of xrayutilities'
``QConversion(['y+'], ['y+', 'x-'], [0, 0, 1])`` with ``init_area('y-', 'x+', ...)``):

* lab frame: ``z`` along the incident beam, ``y`` up, ``x = y × z``;
* ``λ[Å] = 12.398419843320026 / E[keV]``, ``k = 2π/λ``, ``k_i = k ẑ``;
* at ``γ = δ = 0`` pixel ``(r, c)`` sits at ``D ẑ + (r − r0) p e_row + (c − c0) p e_col``;
* the detector arm is rotated by ``R(ŷ, γ) · R(−x̂, δ)`` (δ first);
* ``k_f = k P / |P|``, ``q_lab = k_f − k_i`` and, for a sample rotated by ``θ`` about the rocking
  axis ``a``, ``q = R(a, θ)ᵀ q_lab`` in the sample frame (1/Å, ``|q| = 2π/d``).

Everything here is a pure NumPy kernel; the elementwise functions (:func:`strain_tilt`,
:func:`q_from_strain_tilt`) also accept dask arrays and stay lazy.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

__all__ = [
    "HC_KEV_ANGSTROM",
    "CrystalFrame",
    "Geometry",
    "axis_vector",
    "crystal_frame",
    "q_from_strain_tilt",
    "q_lab",
    "q_sample",
    "rotation_matrix",
    "strain_tilt",
    "wavelength_angstrom",
    "wavenumber",
]

#: h·c in keV·Å (CODATA), so that ``λ[Å] = HC_KEV_ANGSTROM / E[keV]``.
HC_KEV_ANGSTROM = 12.398419843320026

AxisName = Literal["x+", "x-", "y+", "y-", "z+", "z-"]
AXIS_NAMES: tuple[str, ...] = ("x+", "x-", "y+", "y-", "z+", "z-")


def axis_vector(name: str) -> np.ndarray:
    """Unit vector of a lab axis given as ``'x+'``, ``'y-'``, ...

    Examples
    --------
    >>> axis_vector("y-")
    array([ 0., -1.,  0.])
    """
    if name not in AXIS_NAMES:
        raise ValueError(f"axis {name!r} is not one of {', '.join(AXIS_NAMES)}")
    v = np.zeros(3)
    v["xyz".index(name[0])] = 1.0 if name[1] == "+" else -1.0
    return v


def rotation_matrix(axis: str | np.ndarray, angle_rad: float | np.ndarray) -> np.ndarray:
    """Right-handed rotation matrices ``R(u, φ)`` (Rodrigues' formula).

    Parameters
    ----------
    axis : str or array of shape (3,)
        Rotation axis, a lab axis name (``'y+'``) or a vector (normalised here).
    angle_rad : float or array
        Rotation angle(s) in radians.

    Returns
    -------
    numpy.ndarray
        Shape ``angle_rad.shape + (3, 3)``.

    Examples
    --------
    >>> np.round(rotation_matrix("z+", np.pi / 2) @ [1.0, 0.0, 0.0], 12)
    array([0., 1., 0.])
    """
    u = axis_vector(axis) if isinstance(axis, str) else np.asarray(axis, dtype=float)
    u = u / np.linalg.norm(u)
    phi = np.asarray(angle_rad, dtype=float)
    c, s = np.cos(phi)[..., None, None], np.sin(phi)[..., None, None]
    ux = np.array([[0.0, -u[2], u[1]], [u[2], 0.0, -u[0]], [-u[1], u[0], 0.0]])
    return c * np.eye(3) + s * ux + (1.0 - c) * np.outer(u, u)


def wavelength_angstrom(energy_kev: float) -> float:
    """X-ray wavelength in Å for a photon energy in keV.

    >>> round(wavelength_angstrom(12.398419843320026), 12)
    1.0
    """
    if not energy_kev > 0:
        raise ValueError(
            f"energy_kev = {energy_kev!r} must be > 0 (photon energy in keV, e.g. 9.0)"
        )
    return HC_KEV_ANGSTROM / energy_kev


def wavenumber(energy_kev: float) -> float:
    """``k = 2π/λ`` in 1/Å."""
    return 2.0 * np.pi / wavelength_angstrom(energy_kev)


@dataclass(frozen=True)
class Geometry:
    """Detector and rocking geometry of one particle measurement.

    Parameters
    ----------
    energy_kev : float
        Photon energy (keV), > 0.
    detector_distance_m : float
        Sample-to-detector distance along the arm axis (m), > 0.
    pixel_size_m : float
        Detector pixel pitch (m), > 0.
    gamma_deg, delta_deg : float
        Detector arm yaw about ``+y`` and elevation about ``-x`` (degrees).
    beam_center : tuple of float
        ``(row, col)`` of the pixel on the detector-arm axis.
    row_direction, col_direction : str
        Lab direction of increasing row / column index at ``γ = δ = 0`` (e.g. ``'y-'``, ``'x+'``).
    rocking_axis : str
        Sample rotation axis; the rocking angle is the motor position.

    Examples
    --------
    >>> g = Geometry(energy_kev=9.0, detector_distance_m=0.5, pixel_size_m=55e-6,
    ...              gamma_deg=0.0, delta_deg=0.0, beam_center=(10.0, 10.0))
    >>> q_lab(g, rows=[10], cols=[10]).round(12).tolist()
    [[[0.0, 0.0, 0.0]]]
    """

    energy_kev: float
    detector_distance_m: float
    pixel_size_m: float
    gamma_deg: float = 0.0
    delta_deg: float = 0.0
    beam_center: tuple[float, float] = (0.0, 0.0)
    row_direction: str = "y-"
    col_direction: str = "x+"
    rocking_axis: str = "y+"

    def __post_init__(self) -> None:
        for name in ("energy_kev", "detector_distance_m", "pixel_size_m"):
            value = getattr(self, name)
            if not (np.isfinite(value) and value > 0):
                raise ValueError(f"geometry.{name} = {value!r} must be a finite number > 0")
        for name in ("row_direction", "col_direction", "rocking_axis"):
            axis_vector(getattr(self, name))
        e_row, e_col = axis_vector(self.row_direction), axis_vector(self.col_direction)
        if abs(e_row @ e_col) > 0 or abs(e_row[2]) > 0 or abs(e_col[2]) > 0:
            raise ValueError(
                f"geometry.row_direction = {self.row_direction!r} and col_direction = "
                f"{self.col_direction!r} must be two different axes among x and y (the detector "
                "plane is normal to the beam at gamma = delta = 0)"
            )
        object.__setattr__(self, "beam_center", tuple(float(v) for v in self.beam_center))

    @property
    def wavelength(self) -> float:
        """Wavelength in Å."""
        return wavelength_angstrom(self.energy_kev)

    @property
    def k(self) -> float:
        """Wavenumber ``2π/λ`` in 1/Å."""
        return wavenumber(self.energy_kev)

    def detector_rotation(self) -> np.ndarray:
        """``R(ŷ, γ) · R(−x̂, δ)``: the detector arm orientation."""
        return rotation_matrix("y+", np.deg2rad(self.gamma_deg)) @ rotation_matrix(
            "x-", np.deg2rad(self.delta_deg)
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (for Zarr attributes and provenance)."""
        d = asdict(self)
        d["beam_center"] = list(self.beam_center)
        return d


def _pixel_grid(rows: Any, cols: Any) -> tuple[np.ndarray, np.ndarray]:
    rows = np.atleast_1d(np.asarray(rows, dtype=float))
    cols = np.atleast_1d(np.asarray(cols, dtype=float))
    if rows.ndim != 1 or cols.ndim != 1:
        raise ValueError("rows and cols must be 1-D sequences of pixel indices")
    return rows, cols


def pixel_positions(geometry: Geometry, *, rows: Any, cols: Any) -> np.ndarray:
    """Lab positions (m) of detector pixels, shape ``(len(rows), len(cols), 3)``."""
    rows, cols = _pixel_grid(rows, cols)
    r0, c0 = geometry.beam_center
    p = geometry.pixel_size_m
    e_row = axis_vector(geometry.row_direction)
    e_col = axis_vector(geometry.col_direction)
    pos = (
        geometry.detector_distance_m * np.array([0.0, 0.0, 1.0])
        + ((rows - r0) * p)[:, None, None] * e_row
        + ((cols - c0) * p)[None, :, None] * e_col
    )
    return pos @ geometry.detector_rotation().T


def q_lab(geometry: Geometry, *, rows: Any, cols: Any) -> np.ndarray:
    """Momentum transfer ``k_f − k_i`` in the lab frame (1/Å) for detector pixels.

    Parameters
    ----------
    geometry : Geometry
    rows, cols : array_like of shape (n,), (m,)
        Pixel indices (fractional allowed), e.g. ``np.arange(r0, r1)`` for an ROI.

    Returns
    -------
    numpy.ndarray
        Shape ``(n, m, 3)``.
    """
    pos = pixel_positions(geometry, rows=rows, cols=cols)
    k = geometry.k
    kf = k * pos / np.linalg.norm(pos, axis=-1, keepdims=True)
    kf[..., 2] -= k
    return kf


def q_sample(geometry: Geometry, angles_deg: Any, *, rows: Any, cols: Any) -> np.ndarray:
    """Momentum transfer in the sample frame, ``R(a, θ)ᵀ q_lab``, for angles × pixels.

    Parameters
    ----------
    geometry : Geometry
    angles_deg : array_like of shape (n_angle,)
        Rocking motor positions in degrees.
    rows, cols : array_like
        Detector pixel indices (an ROI or the whole detector).

    Returns
    -------
    numpy.ndarray
        Shape ``(n_angle, len(rows), len(cols), 3)``, 1/Å.

    Examples
    --------
    Bragg's law at the arm-axis pixel: ``|q| = 2 k sin(γ/2)``.

    >>> g = Geometry(energy_kev=9.0, detector_distance_m=0.5, pixel_size_m=55e-6,
    ...              gamma_deg=20.0, beam_center=(0.0, 0.0))
    >>> q = q_sample(g, [0.0, 3.0], rows=[0], cols=[0])
    >>> bool(np.allclose(np.linalg.norm(q, axis=-1), 2 * g.k * np.sin(np.deg2rad(10.0))))
    True
    """
    ql = q_lab(geometry, rows=rows, cols=cols)
    angles = np.atleast_1d(np.asarray(angles_deg, dtype=float))
    rot = rotation_matrix(geometry.rocking_axis, np.deg2rad(angles))
    # q = Rᵀ q_lab  ->  q_i = Σ_j R_ji q_lab_j
    return np.einsum("aji,rcj->arci", rot, ql)


@dataclass(frozen=True)
class CrystalFrame:
    """Orthonormal crystal frame ``(x̂_c, ŷ_c, ẑ_c)`` around a reference vector ``h``.

    ``ẑ_c = h/|h|``, ``x̂_c = normalize(a × ẑ_c)`` (the direction rocking moves q) and
    ``ŷ_c = ẑ_c × x̂_c``.
    """

    h: np.ndarray
    x: np.ndarray
    y: np.ndarray
    z: np.ndarray

    @property
    def d_spacing(self) -> float:
        """Reference d-spacing ``2π/|h|`` in Å."""
        return float(2.0 * np.pi / np.linalg.norm(self.h))

    @property
    def matrix(self) -> np.ndarray:
        """Rows ``x̂_c, ŷ_c, ẑ_c``: ``matrix @ q`` gives crystal-frame components."""
        return np.stack([self.x, self.y, self.z])


def crystal_frame(h: Any, rocking_axis: str | np.ndarray = "y+") -> CrystalFrame:
    """Crystal frame of a reference vector ``h`` (1/Å, sample frame).

    Examples
    --------
    >>> f = crystal_frame([0.0, 0.0, 2.0], "y+")
    >>> f.x.tolist(), f.y.tolist(), f.z.tolist()
    ([1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0])
    """
    h = np.asarray(h, dtype=float)
    if h.shape != (3,) or not np.all(np.isfinite(h)) or np.linalg.norm(h) == 0:
        raise ValueError(f"reference vector h = {h!r} must be a finite non-zero 3-vector")
    a = axis_vector(rocking_axis) if isinstance(rocking_axis, str) else np.asarray(rocking_axis)
    z = h / np.linalg.norm(h)
    x = np.cross(a, z)
    if np.linalg.norm(x) < 1e-12:
        raise ValueError(
            f"reference vector h = {h.tolist()} is parallel to the rocking axis: "
            "rocking does not move it, so no crystal frame can be defined"
        )
    x = x / np.linalg.norm(x)
    y = np.cross(z, x)
    return CrystalFrame(h=h, x=x, y=y, z=z)


def _components(q: Any) -> tuple[Any, Any, Any]:
    return q[..., 0], q[..., 1], q[..., 2]


def strain_tilt(q: Any, frame: CrystalFrame) -> dict[str, Any]:
    """d-spacing, strain and tilts from centre-of-mass vectors.

    Parameters
    ----------
    q : array of shape (..., 3)
        Sample-frame q vectors (1/Å); NumPy or dask (stays lazy).
    frame : CrystalFrame
        Reference frame (``h`` defines zero strain and zero tilt).

    Returns
    -------
    dict
        ``d_spacing`` (Å) ``= 2π/|q|``, ``strain = |h|/|q| − 1``,
        ``tilt_x = atan2(q·x̂_c, q·ẑ_c)``, ``tilt_y = atan2(q·ŷ_c, q·ẑ_c)`` (radians).

    Examples
    --------
    >>> f = crystal_frame([0.0, 0.0, 2.0])
    >>> out = strain_tilt(np.array([0.0, 0.0, 1.998]), f)
    >>> round(float(out["strain"]), 9)
    0.001001001
    """
    qx, qy, qz = _components(q)
    norm = (qx * qx + qy * qy + qz * qz) ** 0.5
    along_z = qx * frame.z[0] + qy * frame.z[1] + qz * frame.z[2]
    along_x = qx * frame.x[0] + qy * frame.x[1] + qz * frame.x[2]
    along_y = qx * frame.y[0] + qy * frame.y[1] + qz * frame.y[2]
    return {
        "d_spacing": 2.0 * np.pi / norm,
        "strain": np.linalg.norm(frame.h) / norm - 1.0,
        "tilt_x": np.arctan2(along_x, along_z),
        "tilt_y": np.arctan2(along_y, along_z),
    }


def q_from_strain_tilt(strain: Any, tilt_x: Any, tilt_y: Any, frame: CrystalFrame) -> np.ndarray:
    """Inverse of :func:`strain_tilt`: the q vector (..., 3) with given strain and tilts.

    Examples
    --------
    >>> f = crystal_frame([0.3, 0.1, 2.0])
    >>> q = q_from_strain_tilt(2e-3, 1e-3, -5e-4, f)
    >>> out = strain_tilt(q, f)
    >>> [round(float(out[k]), 12) for k in ("strain", "tilt_x", "tilt_y")]
    [0.002, 0.001, -0.0005]
    """
    strain, tx, ty = np.broadcast_arrays(
        np.asarray(strain, float), np.asarray(tilt_x, float), np.asarray(tilt_y, float)
    )
    direction = np.tan(tx)[..., None] * frame.x + np.tan(ty)[..., None] * frame.y + frame.z
    direction /= np.linalg.norm(direction, axis=-1, keepdims=True)
    return (np.linalg.norm(frame.h) / (1.0 + strain))[..., None] * direction
