"""spndi_dask: distributed processing of scanning probe nano-diffraction (SPNDI) beamtimes.

Stages live in modules named after them (``spndi_dask.ingest.ingest``, ...; the table of stages
is :mod:`spndi_dask.stages`); the names here are the entry points most sessions need. They are
imported on first use (PEP 562), so ``import spndi_dask`` and the command line's ``--help`` do
not load dask, xarray, numba or torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from spndi_dask._version import __version__

# public name -> module that defines it
_EXPORTS = {
    "Geometry": "spndi_dask.geometry",
    "IngestError": "spndi_dask.ingest",
    "Manifest": "spndi_dask.config",
    "ManifestError": "spndi_dask.config",
    "Outcome": "spndi_dask.stages",
    "ReduceError": "spndi_dask.reduce",
    "SimulationConfig": "spndi_dask.simulate",
    "StageError": "spndi_dask.stages",
    "crystal_frame": "spndi_dask.geometry",
    "explore": "spndi_dask.explorer",
    "load_manifest": "spndi_dask.config",
    "open_raw": "spndi_dask.io.raw_store",
    "open_results": "spndi_dask.io.results_store",
    "preset": "spndi_dask.simulate",
    "q_sample": "spndi_dask.geometry",
    "simulate_beamtime": "spndi_dask.simulate",
    "strain_tilt": "spndi_dask.geometry",
}

__all__ = [
    "Geometry",
    "IngestError",
    "Manifest",
    "ManifestError",
    "Outcome",
    "ReduceError",
    "SimulationConfig",
    "StageError",
    "__version__",
    "crystal_frame",
    "explore",
    "load_manifest",
    "open_raw",
    "open_results",
    "preset",
    "q_sample",
    "simulate_beamtime",
    "strain_tilt",
]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names come from __getattr__
    from spndi_dask.config import Manifest, ManifestError, load_manifest
    from spndi_dask.explorer import explore
    from spndi_dask.geometry import Geometry, crystal_frame, q_sample, strain_tilt
    from spndi_dask.ingest import IngestError
    from spndi_dask.io.raw_store import open_raw
    from spndi_dask.io.results_store import open_results
    from spndi_dask.reduce import ReduceError
    from spndi_dask.simulate import SimulationConfig, preset, simulate_beamtime
    from spndi_dask.stages import Outcome, StageError


def __getattr__(name: str) -> Any:
    try:
        module = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'spndi_dask' has no attribute {name!r}") from None
    value = getattr(import_module(module), name)
    globals()[name] = value  # the next access skips this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
