"""The beamtime manifest (input contract): typed, validated, versioned.

A beamtime is one TOML file (see ``DESIGN.md`` and the README). Paths in it are relative to the
file. :func:`load_manifest` reads and validates it; every problem is reported at once, naming the
key, the value and the fix, as a :class:`ManifestError`.

Examples
--------
>>> cfg = Manifest.from_dict({
...     "name": "bt", "geometry": {"energy_kev": 9.0, "detector_distance_m": 0.5,
...                                "pixel_size_m": 55e-6, "beam_center": [32, 32]},
...     "scans": [{"name": "p1", "frames": "raw/p1/angle_{index:03d}.h5",
...                "angles_deg": {"start": -0.5, "stop": 0.5, "num": 3},
...                "scan_shape": [4, 5], "scan_step_um": [0.05, 0.05]}]})
>>> cfg.scans[0].angles.tolist()
[-0.5, 0.0, 0.5]
>>> cfg.scans[0].frame_paths(cfg.base_dir)[-1].name
'angle_002.h5'
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Any, Literal

import numpy as np
import tomllib
from pydantic import (
    BaseModel,
    Field,
    PositiveFloat,
    PositiveInt,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from spndi_dask._deprecate import renamed_attribute
from spndi_dask.config import settings
from spndi_dask.config._base import FiniteFloat, SettingsModel
from spndi_dask.config._errors import format_errors, hint, plain
from spndi_dask.config._toml import dump_toml
from spndi_dask.config.geometry import GeometryOverrides, GeometrySettings
from spndi_dask.geometry import Geometry
from spndi_dask.io.layout import OutputLayout

__all__ = [
    "MANIFEST_VERSION",
    "AngleRange",
    "Manifest",
    "ManifestError",
    "ParticleSettings",
    "ScanSettings",
    "find_manifest",
    "load_manifest",
]

#: Version of the manifest format this package writes and reads.
MANIFEST_VERSION = 1

logger = logging.getLogger(__name__)

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class ManifestError(ValueError):
    """The manifest is invalid; the message lists every problem with its fix."""


class AngleRange(SettingsModel):
    """``angles_deg = { start, stop, num }``: ``num`` evenly spaced angles, both ends included."""

    start: FiniteFloat
    stop: FiniteFloat
    num: int = Field(ge=2, description="number of rocking angles (>= 2)")

    def values(self) -> np.ndarray:
        """The angles as an array (degrees)."""
        return np.linspace(self.start, self.stop, self.num)


class Positions(SettingsModel):
    """``positions = { y = "...", x = "..." }``: recorded per-point scan positions (fly scans)."""

    y: str = Field(description="HDF5 dataset of the slow-axis (row) position of every point")
    x: str = Field(description="HDF5 dataset of the fast-axis (column) position of every point")
    units: Literal["um", "nm", "mm"] = Field("um", description="units of both datasets")


class XrfCalibration(SettingsModel):
    """``xrf_calibration = { offset_kev, gain_kev }``: energy of bin ``i`` = offset + gain × i."""

    offset_kev: FiniteFloat = Field(0.0, description="energy of bin 0 (keV)")
    gain_kev: PositiveFloat = Field(description="energy width of one bin (keV)")


class ScanSettings(SettingsModel):
    """One ``[[scans]]`` entry: a scan at every rocking angle (it may hold several particles)."""

    name: str = Field(description="letters, digits, '_', '.', '-' (used as a Zarr node name)")
    frames: str | list[str | list[str]] = Field(
        description="path template with {index} (0-based angle index), e.g. "
        "'raw/p1/angle_{index:03d}.h5', or a list with one entry per angle: a path, or a list "
        "of paths whose frames are concatenated in order (a scan split across files)"
    )
    dataset: str = Field(
        "/entry/instrument/detector/data",
        description="HDF5 dataset of frames, shape (n_points, det_rows, det_cols), or with the "
        "scan's axes first, e.g. (rows, cols, det_rows, det_cols) (read in row-major order)",
    )
    positions: Positions | None = Field(
        None,
        description="recorded per-point positions {y, x} (fly scans: jittered, overshooting, "
        "snaked): each frame goes to the nearest node of the scan grid within half a step",
    )
    mask_dataset: str | None = Field(
        None,
        description="HDF5 dataset of a detector pixel mask in the frame files (nonzero = bad "
        "pixel), e.g. '/entry/instrument/detector/pixel_mask'",
    )
    monitor: str | None = Field(
        None,
        description="HDF5 dataset of per-point incident flux (n_points,); frames are divided by "
        "it, points where it is 0 are masked, an angle without any flux is refused",
    )
    xrf: str | None = Field(
        None,
        description="HDF5 dataset of per-point fluorescence: a map (n_points,), or spectra "
        "(n_points, [channels,] energy_bins) summed over channels and xrf_window_kev",
    )
    xrf_window_kev: tuple[FiniteFloat, FiniteFloat] | None = Field(
        None, description="energy window [low, high] (keV) summed from XRF spectra"
    )
    xrf_calibration: XrfCalibration | None = Field(
        None, description="energy calibration of the XRF spectra's bins (with xrf_window_kev)"
    )
    xrf_energy: str | None = Field(
        None,
        description="HDF5 dataset of the energy (keV) of every XRF bin (instead of a calibration)",
    )
    angles_deg: list[FiniteFloat] | AngleRange = Field(
        description="strictly monotonic list of angles, or {start, stop, num}"
    )
    scan_shape: tuple[PositiveInt, PositiveInt] = Field(description="raster [rows, cols]")
    scan_step_um: tuple[PositiveFloat, PositiveFloat] = Field(
        description="raster step [row, col] in µm, e.g. [0.05, 0.05]"
    )
    scan_order: Literal["raster", "snake"] = Field(
        "raster", description="'raster' (row-major) or 'snake' (every other row reversed)"
    )
    dark: str | None = Field(None, description="HDF5 file with dark frames at the same dataset")
    mask: str | None = Field(None, description="user mask (TIFF or .npy), nonzero = particle")
    allow_incomplete: bool | None = Field(
        None, description="fill missing points of aborted scans (default: [ingest] setting)"
    )
    geometry: GeometryOverrides = Field(
        default_factory=dict, description="overrides of [geometry] keys for this scan"
    )

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError(
                "must start with a letter or digit and contain only letters, digits, '_', '.', '-'"
            )
        return v

    @field_validator("angles_deg")
    @classmethod
    def _angles_ok(cls, v: list[float] | AngleRange) -> list[float] | AngleRange:
        values = v.values() if isinstance(v, AngleRange) else np.asarray(v, dtype=float)
        if values.size < 2:
            raise ValueError("needs at least 2 rocking angles")
        steps = np.diff(values)
        if np.any(steps == 0):
            i = int(np.flatnonzero(steps == 0)[0]) + 1
            raise ValueError(f"angle {values[i]} at index {i} is duplicated; remove it")
        if not (np.all(steps > 0) or np.all(steps < 0)):
            i = int(np.flatnonzero(np.sign(steps) != np.sign(steps[0]))[0]) + 1
            raise ValueError(
                f"angles must be strictly monotonic; angle {values[i]} at index {i} breaks the "
                "order: list them in acquisition order without going back"
            )
        return v

    @model_validator(mode="after")
    def _frames_match_angles(self) -> ScanSettings:
        n = self.angles.size
        if isinstance(self.frames, list):
            if len(self.frames) != n:
                raise ValueError(
                    f"frames lists {len(self.frames)} files but angles_deg has {n} angles; "
                    "give one file (or one list of files) per angle"
                )
            empty = [i for i, f in enumerate(self.frames) if isinstance(f, list) and not f]
            if empty:
                raise ValueError(f"frames[{empty[0]}] is an empty list; give the angle's file(s)")
        elif "{index" not in self.frames:
            raise ValueError(
                f"frames = {self.frames!r} has no {{index}} placeholder; use e.g. "
                "'raw/p1/angle_{index:03d}.h5' or a list of one path per angle"
            )
        else:
            try:
                self.frames.format(index=0)
            except (KeyError, IndexError, ValueError) as exc:
                raise ValueError(
                    f"frames = {self.frames!r} is not a valid template ({exc}); only the "
                    "{index} placeholder is available"
                ) from None
        return self

    @property
    def angles(self) -> np.ndarray:
        """Rocking angles in degrees, in acquisition order."""
        if isinstance(self.angles_deg, AngleRange):
            return self.angles_deg.values()
        return np.asarray(self.angles_deg, dtype=float)

    @model_validator(mode="after")
    def _xrf_window_ok(self) -> ScanSettings:
        if self.xrf_window_kev is None:
            if self.xrf_calibration is not None or self.xrf_energy is not None:
                raise ValueError(
                    "xrf_calibration / xrf_energy are given without xrf_window_kev: add "
                    "xrf_window_kev = [low, high] (keV), the emission line's window"
                )
            return self
        low, high = self.xrf_window_kev
        if not low < high:
            raise ValueError(
                f"xrf_window_kev = [{low}, {high}] must be [low, high] with low < high"
            )
        if self.xrf is None:
            raise ValueError("xrf_window_kev is given without xrf: set xrf to the spectra dataset")
        if (self.xrf_calibration is None) == (self.xrf_energy is None):
            raise ValueError(
                "xrf_window_kev needs the bins' energies: give xrf_calibration = { offset_kev, "
                "gain_kev } or xrf_energy = '<dataset of bin energies>' (one of them)"
            )
        return self

    @property
    def n_points(self) -> int:
        """Scan points per angle (rows × cols)."""
        return self.scan_shape[0] * self.scan_shape[1]

    def frame_files(self, base_dir: Path) -> list[list[Path]]:
        """Absolute paths of the frame files of every angle (one, or several for a split scan)."""
        if isinstance(self.frames, list):
            names = [f if isinstance(f, list) else [f] for f in self.frames]
        else:
            names = [[self.frames.format(index=i)] for i in range(self.angles.size)]
        return [[_resolve(base_dir, p) for p in files] for files in names]

    def frame_paths(self, base_dir: Path) -> list[Path]:
        """Absolute path of the (first) frame file of every angle."""
        return [files[0] for files in self.frame_files(base_dir)]


class Manifest(SettingsModel):
    """A validated beamtime manifest.

    Build with :func:`load_manifest` / :meth:`from_toml` (paths relative to the file) or
    :meth:`from_dict` (paths relative to ``base_dir``).
    """

    manifest_version: int = Field(
        MANIFEST_VERSION, description=f"manifest format version ({MANIFEST_VERSION})"
    )
    name: str = Field(description="beamtime name")
    output: str = Field(
        "results",
        description="results directory, relative to the manifest: a folder of its own (not /, "
        "the home directory or the folder of the frame files)",
    )
    geometry: GeometryOverrides = Field(
        default_factory=dict, description="default geometry of every scan"
    )
    scans: list[ScanSettings] = Field(min_length=1, description="at least one scan")
    ingest: settings.IngestSettings = Field(default_factory=settings.IngestSettings)
    reduce: settings.ReduceSettings = Field(default_factory=settings.ReduceSettings)
    segment: settings.SegmentSettings = Field(default_factory=settings.SegmentSettings)
    features: settings.FeatureSettings = Field(default_factory=settings.FeatureSettings)
    decompose: settings.DecomposeSettings = Field(default_factory=settings.DecomposeSettings)
    cluster: settings.ClusterSettings = Field(default_factory=settings.ClusterSettings)
    analysis: settings.AnalysisSettings = Field(default_factory=settings.AnalysisSettings)

    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)
    _source: str = PrivateAttr(default="<manifest>")

    @field_validator("manifest_version")
    @classmethod
    def _version_ok(cls, v: int) -> int:
        if v != MANIFEST_VERSION:
            raise ValueError(
                f"this spndi_dask reads manifest_version {MANIFEST_VERSION}; "
                "update the file or the package"
            )
        return v

    @field_validator("geometry")
    @classmethod
    def _geometry_values(cls, v: dict[str, Any]) -> dict[str, Any]:
        # check the values given here on their own (scans may add the missing keys)
        stand_in = {
            "energy_kev": 1.0,
            "detector_distance_m": 1.0,
            "pixel_size_m": 1.0,
            "beam_center": (0.0, 0.0),
        }
        try:
            GeometrySettings(**{**stand_in, **v})
        except ValidationError as exc:
            lines = []
            for err in exc.errors():
                if err["loc"]:
                    key = err["loc"][0]
                    lines.append(
                        f"geometry.{key} = {err['input']!r}: {plain(err)}{_geometry_hint(key)}"
                    )
                else:
                    lines.append(f"geometry: {plain(err)}")
            raise ValueError("\n".join(lines)) from None
        return v

    @field_validator("scans")
    @classmethod
    def _scans_ok(cls, scans: list[ScanSettings], info: ValidationInfo) -> list[ScanSettings]:
        # every line names the entry at fault (the list itself is never shown)
        lines: list[str] = []
        first: dict[str, int] = {}
        for i, p in enumerate(scans):
            if p.name in first:
                j = first[p.name]
                lines.append(
                    f"scans[{i}] ('{p.name}').name = '{p.name}' is already the name of "
                    f"scans[{j}]: scan names must be unique (they name the scan's "
                    f"results); rename one, e.g. name = '{p.name}_{i + 1}'"
                )
            first.setdefault(p.name, i)
        if "geometry" not in info.data:  # [geometry] itself is invalid: reported there
            if lines:
                raise ValueError("\n".join(lines))
            return scans
        default_geometry = info.data["geometry"]
        missing: dict[str, list[int]] = {}  # geometry key -> scans lacking it
        for i, p in enumerate(scans):
            try:
                GeometrySettings(**{**default_geometry, **p.geometry})
            except ValidationError as exc:
                for err in exc.errors():
                    key = err["loc"][0] if err["loc"] else None
                    if key is None:  # a check across keys (detector plane)
                        where = "geometry" if not p.geometry else f"scans[{i}] ('{p.name}')"
                        lines.append(f"{where}: {err['msg'].removeprefix('Value error, ')}")
                    elif err["type"] == "missing":
                        missing.setdefault(key, []).append(i)
                    else:
                        where = (
                            f"scans[{i}] ('{p.name}').geometry"
                            if key in p.geometry
                            else ("geometry")
                        )
                        lines.append(
                            f"{where}.{key} = {err['input']!r}: {plain(err)}{_geometry_hint(key)}"
                        )
        for key, lacking in missing.items():
            if len(lacking) == len(scans):
                lines.append(
                    f"geometry.{key} is required{_geometry_hint(key)}: set it in [geometry] "
                    "(all scans), or in [scans.geometry] of each scan"
                )
                continue
            for i in lacking:
                name = scans[i].name
                lines.append(
                    f"scans[{i}] ('{name}'): geometry.{key} is required"
                    f"{_geometry_hint(key)}: set it in [geometry] (all scans), or in "
                    f"[scans.geometry] of '{name}' as the other scans do"
                )
        if lines:
            raise ValueError("\n".join(dict.fromkeys(lines)))
        return scans

    @model_validator(mode="after")
    def _features_computed(self) -> Manifest:
        if self.cluster.features in ("pca", "nmf") and self.decompose.run == "never":
            raise ValueError(
                f"[cluster] features = {self.cluster.features!r} clusters the loadings of "
                "`spndi decompose`, but [decompose] run = 'never'; set run = 'auto' or choose "
                "features = 'latent' or 'moments'"
            )
        return self

    @model_validator(mode="after")
    def _output_is_safe(self, info: ValidationInfo) -> Manifest:
        # stages replace whole trees under output (raw.zarr, results.zarr nodes, analysis.zarr,
        # .tmp, figures, report): never let that be /, the home directory or the raw data
        base = (info.context or {}).get("base_dir") or Path.cwd()
        out = _resolve(Path(base), self.output).resolve()
        where = f"output = {self.output!r}" + (f" ({out})" if str(out) != self.output else "")
        fix = (
            ": spndi writes and replaces raw.zarr, results.zarr, analysis.zarr, figures/, report/, "
            'logs/ and .tmp/ in it; set output to a folder of its own, e.g. output = "results"'
        )
        if out == Path(out.anchor):
            raise ValueError(f"{where} is the file system root{fix}")
        try:
            home = Path.home().resolve()
        except (RuntimeError, KeyError):  # no home directory known
            home = None
        if out == home:
            raise ValueError(f"{where} is your home directory{fix}")
        for p in self.scans:
            inputs = [(f, "frame files") for fs in p.frame_files(Path(base)) for f in fs]
            if p.dark:
                inputs.append((_resolve(Path(base), p.dark), "dark file"))
            for folder, what in dict.fromkeys((f.parent, what) for f, what in inputs):
                if out == folder.resolve():
                    raise ValueError(f"{where} is the folder of the {what} of scan '{p.name}'{fix}")
        return self

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def from_dict(
        cls, data: dict[str, Any], *, base_dir: str | Path | None = None, source: str = "<dict>"
    ) -> Manifest:
        """Validate a manifest given as a dict; raises :class:`ManifestError`."""
        base = Path(base_dir if base_dir is not None else Path.cwd()).resolve()
        data = _migrate(data, source)
        try:
            cfg = cls.model_validate(data, context={"base_dir": base})
        except ValidationError as exc:
            msg = "\n".join(f"  - {line}" for line in format_errors(exc, _MODELS, data=data))
            raise ManifestError(f"{source}: invalid manifest\n{msg}") from None
        cfg._base_dir = base
        cfg._source = source
        return cfg

    @classmethod
    def from_toml(cls, path: str | Path) -> Manifest:
        """Read and validate a manifest TOML file (or the one manifest of a folder).

        A folder stands for its ``beamtime.toml``, else for the one ``*.toml`` file in it that
        has ``[[scans]]`` (see :func:`find_manifest`).
        """
        path = find_manifest(path)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise ManifestError(f"manifest {path} does not exist") from None
        except OSError as exc:
            raise ManifestError(f"cannot read manifest {path}: {exc.strerror or exc}") from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ManifestError(f"{path}: not valid TOML: {exc}") from None
        return cls.from_dict(data, base_dir=path.resolve().parent, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-ready dict of every setting (defaults filled in)."""
        return self.model_dump(mode="json")

    def to_toml(self) -> str:
        """The manifest as TOML text (defaults filled in)."""
        return dump_toml(self.to_dict())

    # -- derived ------------------------------------------------------------------------------
    @property
    def base_dir(self) -> Path:
        """Directory paths in the manifest are relative to."""
        return self._base_dir

    @property
    def source(self) -> str:
        """Where the manifest came from (file path or ``<dict>``)."""
        return self._source

    @property
    def output_dir(self) -> Path:
        """Absolute results directory."""
        return _resolve(self.base_dir, self.output)

    @property
    def layout(self) -> OutputLayout:
        """The paths under :attr:`output_dir` (``results.zarr``, ``particles.csv``, ...).

        Examples
        --------
        >>> m = Manifest.from_dict(
        ...     {"name": "bt", "output": "out", "scans": [{
        ...         "name": "p1", "frames": ["a.h5", "b.h5"], "angles_deg": [0.0, 0.1],
        ...         "scan_shape": [2, 2], "scan_step_um": [0.1, 0.1],
        ...         "geometry": {"energy_kev": 9.0, "detector_distance_m": 0.5,
        ...                      "pixel_size_m": 55e-6, "beam_center": [8, 8]}}]},
        ...     base_dir="/data/lco")
        >>> m.layout
        OutputLayout('/data/lco/out')
        >>> m.layout.report.as_posix()
        '/data/lco/out/report/index.html'
        """
        return OutputLayout(self.output_dir)

    @property
    def checkpoint(self) -> Path:
        """The model ``encode`` uses: ``[features] checkpoint``, else the one ``train`` writes."""
        if self.features.checkpoint:
            return self.resolve(self.features.checkpoint)
        return self.layout.checkpoint

    @property
    def manifest_hash(self) -> str:
        """SHA-256 of the canonical JSON of all settings (provenance)."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    # the names from before a manifest entry was a scan
    particles = renamed_attribute("Manifest", "particles", "scans")
    particle = renamed_attribute("Manifest", "particle", "scan")
    select_particles = renamed_attribute("Manifest", "select_particles", "select_scans")

    def scan(self, name: str) -> ScanSettings:
        """The scan called ``name``."""
        for p in self.scans:
            if p.name == name:
                return p
        raise KeyError(f"no scan {name!r} in {self.source}; scans: {[p.name for p in self.scans]}")

    def select_scans(
        self, names: list[str] | None, *, error: type[Exception] = ValueError
    ) -> list[str]:
        """The named scans in the given order (default: all, manifest order).

        Names not in the manifest raise ``error`` naming them and the manifest's scans.
        """
        order = [p.name for p in self.scans]
        unknown = sorted(set(names or []) - set(order))
        if unknown:
            raise error(f"scans {unknown} are not in the manifest (it has {order})")
        return list(names) if names else order

    def geometry_for(self, scan: str | ScanSettings) -> Geometry:
        """Geometry of a scan: ``[geometry]`` with its own overrides applied."""
        p = self.scan(scan) if isinstance(scan, str) else scan
        return GeometrySettings(**{**self.geometry, **p.geometry}).to_geometry()

    def resolve(self, path: str) -> Path:
        """A manifest path made absolute."""
        return _resolve(self.base_dir, path)


def load_manifest(path: str | Path) -> Manifest:
    """Read and validate a beamtime manifest (see :class:`Manifest`).

    ``path`` is the TOML file, or a folder holding it (:func:`find_manifest`).
    """
    return Manifest.from_toml(path)


#: The file name ``spndi demo`` and ``spndi simulate`` give a manifest.
MANIFEST_NAME = "beamtime.toml"


def find_manifest(path: str | Path) -> Path:
    """The manifest file ``path`` names: the file itself, or the manifest in a folder.

    A folder (as a newcomer types ``spndi run spndi-demo``) stands for its ``beamtime.toml``,
    else for its one ``*.toml`` file with ``[[scans]]`` (or the old ``[[particles]]``); any
    other folder is a
    :class:`ManifestError` listing the manifests to choose from.

    Examples
    --------
    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> _ = (folder / "beamtime.toml").write_text('name = "bt"')
    >>> find_manifest(folder) == folder / "beamtime.toml"
    True
    """
    path = Path(path)
    if not path.is_dir():
        return path
    if (path / MANIFEST_NAME).is_file():
        return path / MANIFEST_NAME
    tomls = sorted(p for p in path.glob("*.toml") if p.is_file())
    manifests = [p for p in tomls if _has_scans(p)]
    if len(manifests) == 1:
        return manifests[0]
    if not manifests:
        found = f" (its TOML files have no [[scans]]: {', '.join(map(str, tomls))})"
        raise ManifestError(
            f"{path} is a folder without a beamtime manifest{found if tomls else ''}; pass the "
            f"manifest file, e.g. {path / MANIFEST_NAME}, or write one there (see `spndi demo`)"
        )
    shown = "\n    ".join(map(str, manifests))
    raise ManifestError(
        f"{path} is a folder with {len(manifests)} manifests:\n    {shown}\npass one of them, "
        f"e.g. {manifests[0]}"
    )


def _has_scans(path: Path) -> bool:
    """Whether a TOML file reads as a manifest (has a ``scans``, or old ``particles``, array)."""
    try:
        return not {"scans", "particles"}.isdisjoint(tomllib.loads(path.read_text()))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return False


# -- helpers ----------------------------------------------------------------------------------
def _migrate(data: dict[str, Any], source: str) -> dict[str, Any]:
    """``data`` with the old key ``particles`` (manifest entries, now ``scans``) renamed.

    Manifests written before the rename keep working: the old key is read as ``scans`` with one
    warning naming the file; a manifest with both keys is a :class:`ManifestError`.

    Examples
    --------
    >>> sorted(_migrate({"name": "bt", "particles": []}, "<dict>"))
    ['name', 'scans']
    """
    if not isinstance(data, dict) or "particles" not in data:
        return data
    if "scans" in data:
        raise ManifestError(
            f"{source}: invalid manifest\n  - both [[scans]] and [[particles]] are given: "
            "[[particles]] is the old name of [[scans]]; move its entries into [[scans]] "
            "(one list of scans)"
        )
    logger.warning(
        "%s: rename [[particles]] to [[scans]] (and [particles.geometry] to [scans.geometry]); "
        "the old key is still read",
        source,
    )
    return {("scans" if k == "particles" else k): v for k, v in data.items()}


def _resolve(base_dir: Path, path: str | Path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else (base_dir / p)


def _geometry_hint(key: str) -> str:
    return hint(("geometry", key), _MODELS)


_MODELS: dict[str, type[BaseModel]] = {
    "": Manifest,
    "scans": ScanSettings,
    "ingest": settings.IngestSettings,
    "reduce": settings.ReduceSettings,
    "segment": settings.SegmentSettings,
    "features": settings.FeatureSettings,
    "decompose": settings.DecomposeSettings,
    "cluster": settings.ClusterSettings,
    "analysis": settings.AnalysisSettings,
    "geometry": GeometrySettings,
    "AngleRange": AngleRange,
}


#: Deprecated name of :class:`ScanSettings`.
ParticleSettings = ScanSettings
