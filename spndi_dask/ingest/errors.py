"""The error of a particle's ingest."""

from __future__ import annotations

from spndi_dask.config import ScanSettings
from spndi_dask.stages import StageError


class IngestError(StageError, ValueError):
    """An input problem that stops a particle's ingest; the message names the file and the fix."""


def _prefix(p: ScanSettings) -> str:
    return f"scan '{p.name}'"
