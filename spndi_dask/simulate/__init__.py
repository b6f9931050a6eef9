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

Modules
-------
presets
    What to simulate: :class:`SimulationConfig`, :data:`PRESETS`, :func:`preset`.
physics
    Steps 1 and 2: :func:`make_particle` (the sample and its ground truth) and
    :func:`expected_counts` through :func:`pupil_rings` (the diffraction, pure NumPy).
beamline
    Step 3 and the files: :func:`simulate_beamtime` writes the angle files (one dask task each),
    the manifest and the ground truth.

Importing the package loads the presets only (NumPy); the physics (SciPy) and the writer (dask,
h5py) are imported when one of their names is first used.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from spndi_dask.simulate.presets import PRESETS, SimulationConfig, preset

# public name -> module that defines it, imported on first use (PEP 562): the presets are cheap,
# the physics (SciPy) and the writer (dask, h5py) are not, and ``spndi --help`` lists the presets
_LAZY = {
    "FRAMES_DATASET": "spndi_dask.simulate.beamline",
    "MONITOR_DATASET": "spndi_dask.simulate.beamline",
    "THETA_DATASET": "spndi_dask.simulate.beamline",
    "XRF_DATASET": "spndi_dask.simulate.beamline",
    "SimulatedParticle": "spndi_dask.simulate.physics",
    "expected_counts": "spndi_dask.simulate.physics",
    "make_particle": "spndi_dask.simulate.physics",
    "pupil_rings": "spndi_dask.simulate.physics",
    "simulate_beamtime": "spndi_dask.simulate.beamline",
}

__all__ = [
    "FRAMES_DATASET",
    "MONITOR_DATASET",
    "PRESETS",
    "THETA_DATASET",
    "XRF_DATASET",
    "SimulatedParticle",
    "SimulationConfig",
    "expected_counts",
    "make_particle",
    "preset",
    "pupil_rings",
    "simulate_beamtime",
]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names come from __getattr__
    from spndi_dask.simulate.beamline import (
        FRAMES_DATASET,
        MONITOR_DATASET,
        THETA_DATASET,
        XRF_DATASET,
        simulate_beamtime,
    )
    from spndi_dask.simulate.physics import (
        SimulatedParticle,
        expected_counts,
        make_particle,
        pupil_rings,
    )


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'spndi_dask.simulate' has no attribute {name!r}")
    return getattr(import_module(_LAZY[name]), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
