"""spndi_dask: distributed processing of scanning probe nano-diffraction (SPNDI) beamtimes.

Stages live in modules named after them (``spndi_dask.ingest.ingest``, ...); the names here are
the entry points most sessions need.
"""

from spndi_dask._version import __version__
from spndi_dask.config import Manifest, ManifestError, load_manifest
from spndi_dask.geometry import Geometry, crystal_frame, q_sample, strain_tilt
from spndi_dask.ingest import IngestError
from spndi_dask.io.raw_store import open_raw
from spndi_dask.reduce import ReduceError, open_results
from spndi_dask.simulate import SimulationConfig, preset, simulate_beamtime

__all__ = [
    "Geometry",
    "IngestError",
    "Manifest",
    "ManifestError",
    "ReduceError",
    "SimulationConfig",
    "__version__",
    "crystal_frame",
    "load_manifest",
    "open_raw",
    "open_results",
    "preset",
    "q_sample",
    "simulate_beamtime",
    "strain_tilt",
]
