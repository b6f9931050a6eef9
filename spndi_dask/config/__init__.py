"""The beamtime manifest (input contract) and its processing settings: typed, validated, versioned.

A beamtime is one TOML file (see ``DESIGN.md`` and the README); :func:`load_manifest` reads and
validates it, reporting every problem at once as a :class:`ManifestError`.

Modules
-------
manifest
    :class:`Manifest`, its ``[[scans]]`` (:class:`ScanSettings`, :class:`AngleRange`),
    loading, writing and :class:`ManifestError`.
geometry
    ``[geometry]``: :class:`GeometrySettings`, the default of every scan.
settings
    The optional processing tables with their documented defaults: :class:`IngestSettings`,
    :class:`ReduceSettings`, :class:`SegmentSettings`, :class:`FeatureSettings`,
    :class:`ClusterSettings`.

Importing this package is cheap: pydantic, NumPy and the standard library only.
"""

from spndi_dask.config.geometry import GeometrySettings
from spndi_dask.config.manifest import (
    MANIFEST_VERSION,
    AngleRange,
    Manifest,
    ManifestError,
    ParticleSettings,
    ScanSettings,
    load_manifest,
)
from spndi_dask.config.settings import (
    AnalysisSettings,
    ClusterSettings,
    DecomposeSettings,
    FeatureSettings,
    IngestSettings,
    ReduceSettings,
    SegmentSettings,
)

__all__ = [
    "MANIFEST_VERSION",
    "AnalysisSettings",
    "AngleRange",
    "ClusterSettings",
    "DecomposeSettings",
    "FeatureSettings",
    "GeometrySettings",
    "IngestSettings",
    "Manifest",
    "ManifestError",
    "ParticleSettings",
    "ReduceSettings",
    "ScanSettings",
    "SegmentSettings",
    "load_manifest",
]
