"""What to simulate: :class:`SimulationConfig` and the named sizes of :data:`PRESETS`.

Examples
--------
>>> cfg = preset("tiny", seed=3)
>>> cfg.scan_shape, cfg.angles().size, cfg.geometry().detector_distance_m
((12, 14), 9, 0.5)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from spndi_dask.geometry import Geometry, wavelength_angstrom

__all__ = ["IDEAL_LAYOUT", "PRESETS", "SimulationConfig", "preset"]


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
    # a weak second domain under every scan point, this fraction of the main peak's height:
    # its lattice larger by second_domain_strain and turned by second_domain_tilt (rad) about
    # the rocking axis (along tilt_x); the ground truth stays the main domain's (it biases the
    # moments, see scripts/accuracy_peakfit.py)
    second_domain_fraction: float = 0.0
    second_domain_strain: float = 0.0
    second_domain_tilt: float = 5e-3
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
    # -- how a nanoprobe beamline exports the scans (each trait on its own; all off: the ideal
    #    layout of one ``angle_NNN.h5`` per angle). See the ``beamline`` preset.
    scan_files: bool = False  # raw/<particle>/scan_<id>.h5, NeXus names and metadata
    first_scan_id: int = 99998  # scan id of the first angle of the first particle
    frames_per_file: int = 0  # split every scan into files of this many frames (0: one file)
    frames_4d: bool = False  # frames as (rows, cols, det_rows, det_cols)
    fly_scan: bool = False  # recorded positions: snake order, jitter, overshoot
    scan_center_um: tuple[float, float] = (0.0, 0.0)  # motor position of the scan's centre
    position_jitter: float = 0.15  # σ of the position error in scan steps (truncated at 3σ)
    overshoot_points: int = 2  # frames recorded past the end of every row
    module_gap_px: int = 0  # width of the cross of module gaps through the detector centre
    flagged_pixels: int = 0  # bad pixels flagged with the dtype's maximum in every frame
    saturated_frames: int = 0  # frames per particle whose Bragg peak saturates the detector
    saturation_counts: int = 50_000  # the level saturated pixels read
    xrf_spectra: bool = False  # multi-channel fluorescence spectra instead of a Co Kα map
    xrf_channels: int = 4
    xrf_bins: int = 256
    xrf_gain_kev: float = 0.04  # bin width; bin i is at i × gain

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
        if self.frames_per_file < 0 or self.overshoot_points < 0 or self.module_gap_px < 0:
            raise ValueError("frames_per_file, overshoot_points and module_gap_px must be >= 0")
        if self.position_jitter < 0 or self.flagged_pixels < 0 or self.saturated_frames < 0:
            raise ValueError("position_jitter, flagged_pixels and saturated_frames must be >= 0")
        dtype = np.dtype(self.dtype)
        if (
            self.saturated_frames
            and dtype.kind in "ui"
            and self.saturation_counts >= np.iinfo(dtype).max
        ):
            raise ValueError(
                f"saturation_counts = {self.saturation_counts} must be below the {self.dtype} "
                f"maximum {np.iinfo(dtype).max} (that value flags bad pixels)"
            )

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
    def frames_per_row(self) -> int:
        """Frames recorded per scan row: the columns, plus the overshoot of a fly scan."""
        return self.scan_shape[1] + (self.overshoot_points if self.fly_scan else 0)

    @property
    def frames_per_scan(self) -> int:
        """Frames recorded per scan (one rocking angle of one particle)."""
        return self.scan_shape[0] * self.frames_per_row

    @property
    def raw_bytes(self) -> int:
        """Uncompressed size of all frames."""
        n = self.n_particles * self.n_angles * self.frames_per_scan
        return n * int(np.prod(self.detector_shape)) * np.dtype(self.dtype).itemsize


# every preset but ``demo``: two scans, the second with a satellite particle beside the main one
_TWO_SCANS: dict[str, Any] = dict(n_particles=2, objects_per_scan=(1, 2))
# the benchmark sizes differ only in their scans: ``large`` has 4× the points of ``medium``
_BENCHMARK: dict[str, Any] = dict(
    _TWO_SCANS, n_angles=31, angle_step_deg=0.035, detector_shape=(128, 128), block_points=96
)

#: Named sizes. ``demo`` runs end to end in about 2 minutes on 2 quiet cores (mostly training);
#: ``medium`` (2.6 GB raw) and ``large`` (10.5 GB) are for benchmarks; ``small`` and ``tiny``
#: for tests; ``beamline`` (3 particles, 15 angles, 24×32 points, 64² pixels) has every trait of
#: a nanoprobe beamline's export on (see :mod:`spndi_dask.simulate`): per-scan files split in
#: parts, uint32 frames, fly-scan positions, module gaps, flagged and saturated pixels, XRF
#: spectra.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        _TWO_SCANS,
        scan_shape=(12, 14),
        n_angles=9,
        angle_step_deg=0.1,
        detector_shape=(32, 32),
        pixel_size_m=110e-6,
        pupil_rings=2,
        block_points=64,
        train_epochs=3,  # a test's training: the model quality is asserted on `demo`
    ),
    "small": dict(
        _TWO_SCANS,
        scan_shape=(20, 24),
        n_angles=15,
        angle_step_deg=0.07,
        detector_shape=(40, 40),
        pixel_size_m=82.5e-6,
    ),
    "demo": {},
    "beamline": dict(
        scan_shape=(24, 32),
        n_angles=15,
        angle_step_deg=0.07,
        beam_center_offset=(0.3, -12.0),  # the peak on the row gap, the column gap on its flank
        dtype="uint32",
        scan_files=True,
        frames_per_file=256,
        fly_scan=True,
        scan_center_um=(1.2345, -3.071),
        module_gap_px=2,
        flagged_pixels=6,
        saturated_frames=3,
        xrf_spectra=True,
    ),
    "medium": {**_BENCHMARK, "scan_shape": (36, 36)},
    "large": {**_BENCHMARK, "scan_shape": (72, 72)},
}


#: Overrides that turn every beamline-export trait off: the ideal layout of the same beamtime
#: (``preset("beamline", **IDEAL_LAYOUT)`` simulates the same particles and ground truth).
IDEAL_LAYOUT: dict[str, Any] = dict(
    scan_files=False,
    frames_per_file=0,
    frames_4d=False,
    fly_scan=False,
    module_gap_px=0,
    flagged_pixels=0,
    saturated_frames=0,
    xrf_spectra=False,
)


def preset(name: str, **overrides: Any) -> SimulationConfig:
    """A :class:`SimulationConfig` from a named preset, with keyword overrides.

    >>> preset("tiny", seed=3).scan_shape
    (12, 14)
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return SimulationConfig(**{**PRESETS[name], **overrides})
