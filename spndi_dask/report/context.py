"""What the report reads: the attrs, tables, figures and checkpoint metadata the stages wrote.

Cheap reads only (``zarr.json`` attrs, CSV tables, PNG bytes, the ``spndi status`` table): no
array is opened. Every path comes from :class:`~spndi_dask.io.layout.OutputLayout`.
"""

from __future__ import annotations

import base64
import csv
import json
from pathlib import Path
from typing import Any

from spndi_dask.config import Manifest
from spndi_dask.io.layout import read_attrs
from spndi_dask.stages import stage
from spndi_dask.status import scan_status

__all__ = [
    "ANALYSIS_FIGURES",
    "BEAMTIME_FIGURES",
    "DECOMPOSITION_FIGURES",
    "PARTICLE_FIGURES",
    "ReportContext",
    "read_csv",
    "read_figure",
]

#: Per-scan figures of plot.py: (file suffix, caption).
PARTICLE_FIGURES = (
    ("maps", "Maps: strain, tilts (mrad), d-spacing (Å) and intensity (grey = background)"),
    ("rocking_curve", "Rocking curve of every particle label"),
    ("strain_tilt_kde", "Joint density of strain and tilt"),
)
#: Figures of the analysis stage: (file name, caption).
ANALYSIS_FIGURES = (
    ("cluster_rocking_curves.png", "Rocking curves per cluster; domains vs boundaries"),
    (
        "rocking_curves_by_scan.png",
        "Per scan: mean rocking curve of its particles, their domains and boundaries, each cluster",
    ),
    ("cluster_patterns.png", "Mean 3D pattern of every cluster (three projections)"),
    ("region_patterns.png", "Mean 3D pattern of domains, of boundaries, and domain − boundary"),
)
#: Figures of the decompose stage (``plot.decomposition_figures``): (file name, caption).
DECOMPOSITION_FIGURES = (
    ("decomposition_variance.png", "PCA: explained variance ratio per component and cumulative"),
    ("decomposition_components.png", "First PCA and NMF components (three projections each)"),
    ("decomposition_loadings.png", "Loading maps of the first PCA and NMF components per scan"),
)
#: Beamtime figures shown in their own sections (not under "Other figures").
BEAMTIME_FIGURES = frozenset(
    {
        "beamtime_overview.png",
        "tilt_d_spacing_kde.png",
        "clusters_k.png",
        *(f for f, _ in ANALYSIS_FIGURES),
        *(f for f, _ in DECOMPOSITION_FIGURES),
    }
)

_PNG = b"\x89PNG\r\n\x1a\n"


def read_csv(path: Path) -> list[dict[str, str]] | None:
    """Rows of a CSV table, or None when it does not exist."""
    if not path.exists():
        return None
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def read_figure(path: Path, caption: str) -> dict[str, Any]:
    """A figure for ``macros.figure``: ``name``, ``caption`` and ``uri`` (a base64 data URI).

    ``uri`` is None when the file is missing (``missing`` True) or is not a PNG.

    Examples
    --------
    >>> read_figure(Path("/nonexistent/a.png"), "A")
    {'name': 'a.png', 'caption': 'A', 'uri': None, 'missing': True}
    """
    fig: dict[str, Any] = {"name": path.name, "caption": caption, "uri": None, "missing": False}
    try:
        data = path.read_bytes()
    except OSError:
        return {**fig, "missing": True}
    if data.startswith(_PNG):
        fig["uri"] = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    return fig


class ReportContext:
    """What the sections read, gathered once (attrs, tables, figure paths).

    Parameters
    ----------
    manifest : Manifest
        The beamtime.
    """

    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest
        self.layout = layout = manifest.layout
        self._status: dict[str, dict[str, tuple[str, str]]] | None = None
        self.names = [p.name for p in manifest.scans]
        self.root = read_attrs(layout.results) or {}
        self.node = {n: read_attrs(layout.node(n)) for n in self.names}
        self.raw = {n: read_attrs(layout.raw_node(n)) for n in self.names}
        self.clusters = self.root.get("clusters") or None
        self.particles_csv = read_csv(layout.particles_csv)
        self.clusters_csv = read_csv(layout.clusters_csv)
        self.regions_csv = read_csv(layout.regions_csv)
        self.analysis = read_attrs(layout.analysis)
        self.decomposition = read_attrs(layout.decomposition)
        figures = layout.figures
        pngs = sorted(figures.glob("*.png")) if figures.is_dir() else []
        self.particle_pngs: dict[str, list[Path]] = {n: [] for n in self.names}
        self.other_pngs: list[Path] = []
        for png in pngs:
            owner = max(
                (n for n in self.names if png.name.startswith(f"{n}_")), key=len, default=None
            )
            if owner is not None:
                self.particle_pngs[owner].append(png)
            elif png.name not in BEAMTIME_FIGURES:
                self.other_pngs.append(png)

    def figure(self, name: str, caption: str) -> dict[str, Any]:
        """:func:`read_figure` of ``<output>/figures/<name>``."""
        return read_figure(self.layout.figures / name, caption)

    def stage_status(self, name: str) -> dict[str, str]:
        """``done`` / ``not run`` / ``incomplete`` / ``stale`` / ``failed`` of every stage."""
        if self._status is None:
            self._status = scan_status(self.manifest)
        return {stage(s).label: state for s, (state, _) in self._status[name].items()}

    def checkpoint(self) -> Path:
        """The checkpoint encode used (from the attrs), else the one train writes."""
        for attrs in self.node.values():
            ckpt = ((attrs or {}).get("features") or {}).get("checkpoint")
            if ckpt:
                return Path(ckpt)
        return self.manifest.checkpoint

    def checkpoint_metadata(self) -> tuple[dict[str, Any] | None, str | None]:
        """The metadata beside :meth:`checkpoint` (its ``.json``) and a read error, if any.

        The metadata is None when the file does not exist, ``{}`` when it cannot be read.
        """
        path = self.checkpoint().with_suffix(".json")
        if not path.exists():
            return None, None
        try:
            return json.loads(path.read_text()), None
        except (OSError, ValueError) as exc:
            return {}, f"cannot read {path}: {exc}"

    def dates(self) -> dict[str, str]:
        """``ingested`` (first – last day) and ``reduced`` (last time), where recorded."""
        ingested = sorted(a["ingested_at"] for a in self.raw.values() if a and a.get("ingested_at"))
        reduced = sorted(a["reduced_at"] for a in self.node.values() if a and a.get("reduced_at"))
        out = {}
        if ingested:
            out["ingested"] = ingested[0][:10] + (
                f" – {ingested[-1][:10]}" if ingested[-1][:10] != ingested[0][:10] else ""
            )
        if reduced:
            out["reduced"] = reduced[-1]
        return out

    def run_logs(self) -> list[Path]:
        """``<output>/logs/run-*``, newest first."""
        logs = self.layout.logs
        return sorted(logs.glob("run-*"), reverse=True) if logs.is_dir() else []
