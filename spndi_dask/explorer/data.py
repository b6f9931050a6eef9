"""What the explorer shows, read lazily: one map, one pixel's curve and pattern, a selection's mean.

:class:`ExplorerData` opens a beamtime's output (``results.zarr``, ``analysis.zarr``,
``particles.csv``) without reading any data; each method reads only what one view needs from the
Zarr arrays, through :func:`spndi_dask.io.integrity.read` (a damaged chunk names its array and the
command that recomputes it). A pixel's pattern is one stored chunk (one scan row), so a click
costs the same on a 10 MB and on a TB beamtime. What the output lacks (no particles, no
clusters, no analysis) is told by :meth:`ExplorerData.missing`, never an error.

The pure NumPy helpers (:func:`projections`, :func:`selection_stats`) do the arithmetic.

Examples
--------
>>> import numpy as np
>>> p = np.arange(24, dtype=np.float32).reshape(2, 3, 4)  # (dq_x, dq_y, dq_z)
>>> proj = projections(p)
>>> proj["qx_qy"].shape, float(proj["qx_qy"][0, 1])  # rows qy, columns qx; sum over qz
((3, 2), 54.0)
"""

from __future__ import annotations

import csv
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from spndi_dask._deprecate import renamed_keyword
from spndi_dask.io.integrity import read
from spndi_dask.io.layout import OutputLayout, read_attrs

__all__ = [
    "COMPONENT_MAPS",
    "MAPS",
    "PROJECTIONS",
    "STAT_VARIABLES",
    "ExplorerData",
    "ExplorerError",
    "projections",
    "resolve_output",
    "selection_stats",
]

logger = logging.getLogger(__name__)

#: The maps the explorer offers, in menu order, with the stage that writes each.
MAPS: dict[str, str] = {
    "strain": "reduce",
    "tilt_x": "reduce",
    "tilt_y": "reduce",
    "d_spacing": "reduce",
    "strain_sigma": "reduce",
    "tilt_x_sigma": "reduce",
    "tilt_y_sigma": "reduce",
    "d_spacing_sigma": "reduce",
    "width_x": "reduce",
    "width_y": "reduce",
    "width_z": "reduce",
    "intensity": "reduce",
    "peak_angle": "reduce",
    "quality": "reduce",
    "peak_amplitude": "reduce",  # peak = "gaussian" only
    "peak_background": "reduce",
    "peak_chi2": "reduce",
    "label": "stats",
    "cluster": "cluster",
    "region": "analyze",
    "pca_loading": "decompose",  # (y, x, component): one menu entry per component
    "nmf_loading": "decompose",
}
#: Maps with a component axis, offered as ``name[i]``.
COMPONENT_MAPS = ("pca_loading", "nmf_loading")
#: Integer maps (shown with a categorical palette).
CATEGORICAL = ("quality", "label", "cluster", "region")
#: The three projections of a 3D pattern: name -> (horizontal axis, vertical axis, summed axis).
PROJECTIONS: dict[str, tuple[int, int, int]] = {
    "qx_qy": (0, 1, 2),
    "qx_qz": (0, 2, 1),
    "qy_qz": (1, 2, 0),
}
#: Patterns read at once for a selection's mean (bytes).
SELECTION_BYTES = 64 * 2**20
#: The maps summarised for a pixel and a selection.
STAT_VARIABLES = ("strain", "tilt_x", "tilt_y", "d_spacing")

# stage -> (what it adds, the command that makes it)
_STAGES = {
    "stats": ("particle labels and particles.csv", "spndi stats"),
    "encode": ("latent features", "spndi train` then `spndi encode"),
    "cluster": ("clusters", "spndi cluster"),
    "analyze": ("cluster mean patterns and rocking curves", "spndi analyze"),
}


class ExplorerError(FileNotFoundError):
    """The output cannot be explored (no results); the message names the file and the fix."""


# -- pure NumPy ----------------------------------------------------------------------------------
def projections(pattern: np.ndarray) -> dict[str, np.ndarray]:
    """The three projections of a 3D pattern ``(dq_x, dq_y, dq_z)`` as images.

    ``out[name][j, i]`` is the sum (float64, NaN voxels skipped) over the third axis of
    ``pattern`` at index ``i`` of the horizontal axis and ``j`` of the vertical one
    (:data:`PROJECTIONS`): image rows run along the vertical axis, as Bokeh draws them.
    A mean pattern ``(n, dq_x, dq_y, dq_z)`` is not accepted: average first.
    """
    if pattern.ndim != 3:
        raise ValueError(f"a 3D pattern (dq_x, dq_y, dq_z) is needed, got shape {pattern.shape}")
    out = {}
    for name, (h, v, s) in PROJECTIONS.items():
        img = np.nansum(pattern, axis=s, dtype=np.float64)  # remaining axes in order (h < v)
        out[name] = img.T if h < v else img
    return out


def selection_stats(maps: dict[str, np.ndarray], mask: np.ndarray) -> dict[str, Any]:
    """Count, and NaN-skipping mean and std of each map over the pixels where ``mask`` is true.

    >>> maps = {"strain": np.array([[1.0, 3.0], [np.nan, 5.0]])}
    >>> s = selection_stats(maps, np.ones((2, 2), bool))
    >>> s["count"], s["strain"]
    (4, (3.0, 1.632993161855452, 3))
    """
    out: dict[str, Any] = {"count": int(mask.sum())}
    for name, m in maps.items():
        v = np.asarray(m, dtype=np.float64)[mask]
        v = v[np.isfinite(v)]
        out[name] = (
            (float(v.mean()), float(v.std()), int(v.size)) if v.size else (np.nan, np.nan, 0)
        )
    return out


# -- the output directory ------------------------------------------------------------------------
def resolve_output(source: str | Path) -> tuple[Path, Any]:
    """The output directory ``source`` names, and its manifest when one was given.

    ``source`` is an output directory (holding ``results.zarr``), a ``results.zarr`` path, a
    manifest TOML file or a folder holding one (its ``output`` is used).

    Raises
    ------
    spndi_dask.config.ManifestError
        If the manifest is invalid (the message names the file and key).
    ExplorerError
        If there is no ``results.zarr``: the message says to run ``spndi reduce``.
    """
    path = Path(source)
    manifest = None
    if path.suffix == ".zarr":
        out = path.parent
    elif path.is_dir() and (path / "results.zarr").exists():
        out = path
    elif not path.exists():
        raise ExplorerError(
            f"{path} does not exist: give a beamtime manifest (beamtime.toml), the folder holding "
            "it, or an output directory holding results.zarr"
        )
    elif path.is_dir() and not any(path.glob("*.toml")):
        raise ExplorerError(
            f"{path} holds neither results.zarr nor a beamtime manifest: give the manifest "
            "(beamtime.toml) or its output directory, and if there are no results yet run "
            "`spndi reduce beamtime.toml` first"
        )
    else:
        from spndi_dask.config import load_manifest

        manifest = load_manifest(path)
        out = manifest.output_dir
    results = OutputLayout(out).results
    if not (results / "zarr.json").exists():
        how = f"spndi reduce {manifest.source}" if manifest is not None else "spndi reduce ..."
        raise ExplorerError(
            f"no results to explore: {results} does not exist; run `{how}` first (or "
            "`spndi run` for every stage)"
        )
    return out, manifest


@dataclass(frozen=True)
class Scan:
    """The coordinates of one scan (µm) and its node's stage attrs."""

    name: str
    y: np.ndarray
    x: np.ndarray
    angle: np.ndarray
    variables: tuple[str, ...]
    stages: tuple[str, ...]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.y.size, self.x.size)

    @property
    def step(self) -> tuple[float, float]:
        """Pixel size (dy, dx) in µm (1 where the scan has a single row or column)."""
        dy = float(self.y[1] - self.y[0]) if self.y.size > 1 else 1.0
        dx = float(self.x[1] - self.x[0]) if self.x.size > 1 else 1.0
        return dy, dx

    def pixel(self, y_um: float, x_um: float) -> tuple[int, int] | None:
        """The scan pixel (iy, ix) whose cell holds the point (µm), or None outside the scan."""
        dy, dx = self.step
        iy = int(np.floor((y_um - self.y[0]) / dy + 0.5))
        ix = int(np.floor((x_um - self.x[0]) / dx + 0.5))
        if 0 <= iy < self.y.size and 0 <= ix < self.x.size:
            return iy, ix
        return None


class ExplorerData:
    """Lazy access to one beamtime's results for the explorer (nothing is read on opening
    beyond the nodes' metadata and coordinates).

    Parameters
    ----------
    source : path
        Output directory, ``results.zarr``, or the beamtime manifest (or its folder).
    scans : list of str, optional
        Scans to show; default all scans in ``results.zarr``.

    Attributes
    ----------
    reads : collections.Counter
        ``(scan, array)`` -> number of reads made (what the views cost; tests check laziness).
    """

    @renamed_keyword(particles="scans")
    def __init__(self, source: str | Path, *, scans: list[str] | None = None) -> None:
        self.output, self.manifest = resolve_output(source)
        self.layout = OutputLayout(self.output)
        self.reads: Counter[tuple[str, str]] = Counter()
        root = zarr.open_group(str(self.layout.results), mode="r")
        self._root_attrs = dict(root.attrs)
        names = sorted(k for k, _ in root.groups())
        if self.manifest is not None:  # manifest order, where the scans are there
            order = [p.name for p in self.manifest.scans]
            names = [n for n in order if n in names] + [n for n in names if n not in order]
        complete = [n for n in names if _node_meta(self.layout.node(n)).get("complete")]
        if scans:
            unknown = [p for p in scans if p not in complete]
            if unknown:
                raise ExplorerError(
                    f"no complete results for scan(s) {', '.join(unknown)} in "
                    f"{self.layout.results} (there are: {', '.join(complete) or 'none'}); run "
                    "`spndi reduce` on them first"
                )
            complete = list(scans)
        if not complete:
            raise ExplorerError(
                f"no complete scan results in {self.layout.results}; run `spndi reduce ...` first"
            )
        self.scans: dict[str, Scan] = {n: self._scan(root[n]) for n in complete}
        self._arrays: dict[tuple[str, str], zarr.Array] = {}
        self._analysis: zarr.Group | None = None
        self._particles_rows: list[dict[str, str]] | None = None

    def __repr__(self) -> str:
        return f"ExplorerData({str(self.output)!r}, scans={list(self.scans)})"

    @property
    def name(self) -> str:
        """The beamtime's name (recorded on ``results.zarr``), else the output folder's."""
        return str(self._root_attrs.get("name") or self.output.name)

    @staticmethod
    def _scan(group: zarr.Group) -> Scan:
        attrs = dict(group.attrs)
        coords = {c: np.asarray(group[c][...]) for c in ("y", "x", "angle")}
        stages = tuple(
            s for s in ("particles", "features", "decompose", "cluster", "analysis") if s in attrs
        )
        return Scan(
            name=group.basename,
            y=coords["y"],
            x=coords["x"],
            angle=coords["angle"],
            variables=tuple(k for k, _ in group.arrays()),
            stages=stages,
        )

    # -- arrays ---------------------------------------------------------------------------------
    def _array(self, scan: str, name: str) -> zarr.Array:
        key = (scan, name)
        if key not in self._arrays:
            self._arrays[key] = zarr.open_array(str(self.layout.node(scan) / name), mode="r")
        return self._arrays[key]

    def _read(self, scan: str, name: str, selection: Any = Ellipsis) -> np.ndarray:
        self.reads[(scan, name)] += 1
        return np.asarray(read(self._array(scan, name), selection))

    def has(self, scan: str, name: str) -> bool:
        """Whether scan ``scan`` has the array (or map entry) ``name``, written by a stage that
        completed."""
        name, _ = _split(name)
        s = self.scans[scan]
        stage = {
            "label": "particles",
            "latent": "features",
            "cluster": "cluster",
            "region": "analysis",
            "pca_loading": "decompose",
            "nmf_loading": "decompose",
        }.get(name)
        return name in s.variables and (stage is None or stage in s.stages)

    def maps(self) -> list[str]:
        """The maps present in at least one shown scan, in :data:`MAPS` order; a loading map
        gives one entry per component (``pca_loading[0]``, ...; shape metadata only)."""
        out = []
        for m in MAPS:
            scans = [s for s in self.scans if self.has(s, m)]
            if not scans:
                continue
            if m in COMPONENT_MAPS:
                n = max(self._array(s, m).shape[2] for s in scans)
                out += [f"{m}[{i}]" for i in range(n)]
            else:
                out.append(m)
        return out

    def map(self, scan: str, name: str) -> np.ndarray:
        """One ``(y, x)`` map of one scan (float64; NaN where the scan lacks it).

        ``name`` is a :meth:`maps` entry: ``pca_loading[2]`` reads that component's plane only.
        """
        base, component = _split(name)
        if not self.has(scan, base):
            return np.full(self.scans[scan].shape, np.nan)
        if component is None:
            return self._read(scan, base).astype(np.float64)
        if component >= self._array(scan, base).shape[2]:
            return np.full(self.scans[scan].shape, np.nan)
        return self._read(scan, base, (slice(None), slice(None), component)).astype(np.float64)

    def units(self, name: str) -> str:
        """The unit of a map (its ``units`` attr; empty for a dimensionless ``"1"``)."""
        unit = str(self._map_attrs(name).get("units", ""))
        return "" if unit == "1" else unit

    def long_name(self, name: str) -> str:
        """What a map is (its ``long_name`` attr, else its name)."""
        return str(self._map_attrs(name).get("long_name") or _split(name)[0])

    def _map_attrs(self, name: str) -> dict[str, Any]:
        base, _ = _split(name)
        scan = next((s for s in self.scans if self.has(s, base)), None)
        return {} if scan is None else dict(self._array(scan, base).attrs)

    # -- one pixel --------------------------------------------------------------------------------
    def rocking_curve(self, scan: str, iy: int, ix: int) -> np.ndarray:
        """The drift-corrected rocking curve ``rocking_curve[:, iy, ix]`` of one pixel."""
        return self._read(scan, "rocking_curve", (slice(None), iy, ix))

    def pattern(self, scan: str, iy: int, ix: int) -> np.ndarray | None:
        """The 3D pattern ``pattern[iy, ix]`` of one pixel (None where reduce wrote none)."""
        if "pattern" not in self.scans[scan].variables:
            return None
        return self._read(scan, "pattern", (iy, ix))

    def q_axes(self) -> dict[int, np.ndarray]:
        """The common q grid's axes (0: dq_x, 1: dq_y, 2: dq_z; 1/Å); empty without patterns."""
        scan = next((s for s in self.scans.values() if "pattern" in s.variables), None)
        if scan is None:
            return {}
        node = self.layout.node(scan.name)
        return {
            i: np.asarray(zarr.open_array(str(node / f"dq_{c}"), mode="r")[...])
            for i, c in enumerate("xyz")
        }

    def pixel_values(self, scan: str, iy: int, ix: int) -> dict[str, float]:
        """The maps' values at one pixel (one read of each ``(y, x)`` map present)."""
        names = [m for m in (*STAT_VARIABLES, "intensity", "label", "cluster") if self.has(scan, m)]
        return {m: float(self._read(scan, m, (iy, ix))) for m in names}

    # -- a selection ------------------------------------------------------------------------------
    def selection(self, scan: str, mask: np.ndarray) -> dict[str, Any]:
        """Mean rocking curve, mean pattern and map statistics over the pixels of ``mask``.

        The patterns are read in blocks of whole stored rows of at most
        :data:`SELECTION_BYTES`, only the columns and blocks holding a selected pixel.

        Returns
        -------
        dict
            ``rocking_curve`` (mean over the pixels), ``pattern`` (NaN-skipping mean pattern or
            None), ``stats`` (:func:`selection_stats`).
        """
        mask = np.asarray(mask, dtype=bool)
        maps = {m: self.map(scan, m) for m in STAT_VARIABLES}
        out: dict[str, Any] = {"stats": selection_stats(maps, mask)}
        if not mask.any():
            return {**out, "rocking_curve": None, "pattern": None}
        rc = self._read(scan, "rocking_curve")
        out["rocking_curve"] = rc[:, mask].mean(axis=1)
        total = count = None
        if "pattern" in self.scans[scan].variables:
            arr = self._array(scan, "pattern")
            cols = np.flatnonzero(mask.any(axis=0))
            x0, x1 = int(cols[0]), int(cols[-1]) + 1
            # blocks of whole stored rows, at most SELECTION_BYTES of patterns at once
            row_bytes = (x1 - x0) * int(np.prod(arr.shape[2:])) * arr.dtype.itemsize
            step = max(1, SELECTION_BYTES // max(row_bytes, 1))
            step = max(arr.chunks[0], step - step % arr.chunks[0])
            rows = np.flatnonzero(mask.any(axis=1))
            first, stop = int(rows[0]) - int(rows[0]) % arr.chunks[0], int(rows[-1]) + 1
            for start in range(first, stop, step):
                sub = mask[start : min(start + step, stop), x0:x1]
                if not sub.any():
                    continue
                block = self._read(
                    scan, "pattern", (slice(start, start + sub.shape[0]), slice(x0, x1))
                )
                picked = block[sub]  # a copy: NaN (uncovered voxels) set to 0 in place
                c = np.isfinite(picked).sum(axis=0)
                s = np.nan_to_num(picked, copy=False).sum(axis=0, dtype=np.float64)
                total = s if total is None else total + s
                count = c if count is None else count + c
        out["pattern"] = None if total is None else total / np.where(count > 0, count, np.nan)
        return out

    # -- later stages -----------------------------------------------------------------------------
    @property
    def analysis(self) -> zarr.Group | None:
        """``analysis.zarr`` (cluster mean patterns and rocking curves), or None."""
        if self._analysis is None and (self.layout.analysis / "zarr.json").exists():
            self._analysis = zarr.open_group(str(self.layout.analysis), mode="r")
        return self._analysis

    @property
    def k(self) -> int | None:
        """The number of clusters of the beamtime's clustering, or None before clustering."""
        meta = self._root_attrs.get("clusters") or {}
        return int(meta["k"]) if "k" in meta else None

    def cluster_pattern(self, cluster: int) -> np.ndarray | None:
        """The mean 3D pattern of one cluster (pooled over scans) from ``analysis.zarr``."""
        a = self.analysis
        if (
            a is None
            or "cluster_pattern" not in a
            or not 0 <= cluster < a["cluster_pattern"].shape[0]
        ):
            return None
        self.reads[("analysis", "cluster_pattern")] += 1
        return np.asarray(read(a["cluster_pattern"], (cluster,)))

    def cluster_rocking_curve(self, scan: str, cluster: int) -> np.ndarray | None:
        """The mean rocking curve of one cluster in one scan, from ``analysis.zarr``."""
        a = self.analysis
        if a is None or "cluster_rocking_curve" not in a:
            return None
        names = [str(p) for p in np.asarray(a["scan"][...])]
        if scan not in names or not 0 <= cluster < a["cluster_rocking_curve"].shape[1]:
            return None
        self.reads[("analysis", "cluster_rocking_curve")] += 1
        return np.asarray(read(a["cluster_rocking_curve"], (names.index(scan), cluster)))

    def particles_table(self) -> list[dict[str, str]]:
        """The rows of ``particles.csv`` for the shown scans (empty before ``spndi stats``)."""
        if self._particles_rows is None:
            path = self.layout.particles_csv
            rows: list[dict[str, str]] = []
            if path.is_file():
                with open(path, newline="") as f:
                    rows = [r for r in csv.DictReader(f) if r.get("scan") in self.scans]
            self._particles_rows = rows
        return self._particles_rows

    def missing(self) -> dict[str, str]:
        """What the output lacks: stage -> a sentence naming the command that makes it."""
        target = str(self.manifest.source) if self.manifest is not None else "beamtime.toml"
        have = {
            "stats": all("particles" in s.stages for s in self.scans.values()),
            "encode": all("features" in s.stages for s in self.scans.values()),
            "cluster": self.k is not None
            and all("cluster" in s.stages for s in self.scans.values()),
            "analyze": self.analysis is not None,
        }
        return {
            stage: f"{what}: not computed yet — run `{cmd} {target}`"
            for stage, (what, cmd) in _STAGES.items()
            if not have[stage]
        }


def _split(name: str) -> tuple[str, int | None]:
    """``"pca_loading[2]"`` -> ``("pca_loading", 2)``; a plain map name -> ``(name, None)``."""
    if name.endswith("]") and "[" in name:
        base, _, index = name[:-1].partition("[")
        return base, int(index)
    return name, None


def _node_meta(path: Path) -> dict[str, Any]:
    return (read_attrs(path) or {}).get("spndi_dask", {})
