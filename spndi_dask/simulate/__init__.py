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

It writes the ideal layout of ``DESIGN.md``: ``raw/<particle>/angle_NNN.h5`` with frames
(``/entry/instrument/detector/data``, bitshuffle-LZ4 per frame as Eiger/Merlin files),
``/entry/instrument/monitor/Io`` and ``/entry/instrument/xrf/Co_K``; ``beamtime.toml``; and
``ground_truth/<particle>.npz`` plus ``ground_truth/truth.json``. Seeded and deterministic: each
(particle, angle) scan has its own random streams, so files are identical whatever the parallelism.

Beamline export
---------------
Flags of :class:`SimulationConfig` write the scans as a nanoprobe beamline exports them, each on
its own (the ``beamline`` preset turns all on but ``frames_4d``); the physics and the ground truth
(on the regular scan grid) stay the same, and ``beamtime.toml`` describes the files:

``scan_files``
    ``raw/<particle>/scan_<id>.h5``: scan ids in acquisition order from ``first_scan_id``
    (99998: names sorted as text are not in angle order), two ids skipped between particles;
    angles increase with the id. NeXus names: frames ``/entry/instrument/eiger/data``, monitor
    ``/entry/instrument/monitor/i0``, rocking angle ``/entry/instrument/positioners/theta``
    (deg, also attribute ``theta`` of ``/entry``, with ``scan_id``, ``plan_name``,
    ``scan_shape``), ``positioners/gamma`` and ``delta`` (deg), in ``/entry/instrument/eiger``
    ``x_pixel_size``, ``y_pixel_size``, ``distance`` (m), ``beam_center_x`` (column),
    ``beam_center_y`` (row) (pixels), ``saturation_value``; ``monochromator/energy`` (keV).
``frames_per_file``
    A scan split into ``<scan>/data_000.h5``, ``data_001.h5``, … of that many frames (the last
    fewer), each with its share of the per-point datasets and all the metadata.
``frames_4d``, ``dtype``
    Frames ``(rows, frames_per_row, det_rows, det_cols)`` (split files hold whole rows);
    ``dtype = "uint32"`` as Eiger.
``fly_scan``
    Recorded positions ``/entry/measurement/samy`` and ``samx`` (µm, per frame): a snake (odd
    rows reversed) over the grid centred on ``scan_center_um``, ``overshoot_points`` frames past
    the end of every row, Gaussian jitter of ``position_jitter`` steps (truncated at 3σ). Every
    frame diffracts from the sample *at its recorded position* (the fields interpolated
    bilinearly there, as the drift is applied); the overshoot sees no sample. The grid's motor
    positions are ``scan_y_um`` / ``scan_x_um`` in the ground truth.
``module_gap_px``, ``flagged_pixels``, ``saturated_frames``
    A cross of gap lines (0 counts) through the detector centre; pixels flagged with the
    dtype's maximum (2³²−1 for uint32) in every frame; ``pixel_mask`` beside the frames (uint32:
    1 gap, 2 flagged) as ``mask_dataset``; frames whose Bragg peak reads ``saturation_counts``
    (written as ``[reduce] saturation``, the flag as ``[ingest] invalid_value``).
``xrf_spectra``
    ``/entry/instrument/xspress3/data`` ``(frames, 4, 256)`` counts: the Co Kα line (6.93 keV,
    following the XRF map) with Kβ, elastic scatter and a continuum, Poisson noise; bin energies
    in ``/entry/instrument/xspress3/energy`` (keV, ``i × xrf_gain_kev``); the manifest sums
    ``xrf_window_kev = [6.73, 7.13]``.

Modules
-------
presets
    What to simulate: :class:`SimulationConfig`, :data:`PRESETS`, :func:`preset`.
physics
    Steps 1 and 2: :func:`make_particle` (the sample and its ground truth) and
    :func:`expected_counts` through :func:`pupil_rings` (the diffraction, pure NumPy).
beamline
    Step 3 and the files: :func:`simulate_beamtime` writes the scans (one dask task each), the
    manifest and the ground truth; :func:`datasets` and :func:`scan_path` tell what and where.
truth
    :func:`errors_vs_truth`: how close a reduce result is to the ground truth.

Importing the package loads the presets only (NumPy); the physics (SciPy) and the writer (dask,
h5py) are imported when one of their names is first used.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from spndi_dask.simulate.presets import IDEAL_LAYOUT, PRESETS, SimulationConfig, preset

# public name -> module that defines it, imported on first use (PEP 562): the presets are cheap,
# the physics (SciPy) and the writer (dask, h5py) are not, and ``spndi --help`` lists the presets
_LAZY = {
    "CO_KALPHA_KEV": "spndi_dask.simulate.beamline",
    "FRAMES_DATASET": "spndi_dask.simulate.beamline",
    "MONITOR_DATASET": "spndi_dask.simulate.beamline",
    "THETA_DATASET": "spndi_dask.simulate.beamline",
    "XRF_DATASET": "spndi_dask.simulate.beamline",
    "SimulatedParticle": "spndi_dask.simulate.physics",
    "SIGMA_QUANTITIES": "spndi_dask.simulate.truth",
    "TRUTH_ERRORS": "spndi_dask.simulate.truth",
    "errors_vs_truth": "spndi_dask.simulate.truth",
    "sigma_z_vs_truth": "spndi_dask.simulate.truth",
    "datasets": "spndi_dask.simulate.beamline",
    "expected_counts": "spndi_dask.simulate.physics",
    "make_particle": "spndi_dask.simulate.physics",
    "pupil_rings": "spndi_dask.simulate.physics",
    "scan_path": "spndi_dask.simulate.beamline",
    "simulate_beamtime": "spndi_dask.simulate.beamline",
}

__all__ = [
    "CO_KALPHA_KEV",
    "FRAMES_DATASET",
    "IDEAL_LAYOUT",
    "MONITOR_DATASET",
    "PRESETS",
    "SIGMA_QUANTITIES",
    "THETA_DATASET",
    "TRUTH_ERRORS",
    "XRF_DATASET",
    "SimulatedParticle",
    "SimulationConfig",
    "datasets",
    "errors_vs_truth",
    "expected_counts",
    "make_particle",
    "preset",
    "pupil_rings",
    "scan_path",
    "sigma_z_vs_truth",
    "simulate_beamtime",
]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names come from __getattr__
    from spndi_dask.simulate.beamline import (
        CO_KALPHA_KEV,
        FRAMES_DATASET,
        MONITOR_DATASET,
        THETA_DATASET,
        XRF_DATASET,
        datasets,
        scan_path,
        simulate_beamtime,
    )
    from spndi_dask.simulate.physics import (
        SimulatedParticle,
        expected_counts,
        make_particle,
        pupil_rings,
    )
    from spndi_dask.simulate.truth import (
        SIGMA_QUANTITIES,
        TRUTH_ERRORS,
        errors_vs_truth,
        sigma_z_vs_truth,
    )


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'spndi_dask.simulate' has no attribute {name!r}")
    return getattr(import_module(_LAZY[name]), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
