"""``spndi init``: write a beamtime manifest from a folder of raw scan files.

:func:`init_manifest` inspects a folder of per-angle (per-scan) HDF5 files or TIFF stacks and
returns the text of a commented ``beamtime.toml`` (every value says where it came from) and an
:class:`InitReport` of what it found and every guess it made. Nothing is guessed silently:
anything ambiguous (two candidate detector datasets of the same size, two monitors, scans of a
particle with different shapes, angles that go back and forth, a file that cannot be read) is an
:class:`InitError` that lists every problem at once, each naming the file or dataset and the flag
of ``spndi init`` (the keyword of :class:`InitOptions`) that settles it.

How the folder is read
----------------------
* **Files**: ``.h5 .hdf5 .hdf .nxs .nx5 .cxi`` (HDF5) and ``.tif .tiff`` (one page per scan
  point), in any folder under ``RAW_DIR``; other files are listed as skipped. Files whose names
  say dark, flat, mask or background are skipped too (set ``dark``/``mask`` yourself).
* **Scans**: one file per rocking angle, or one folder per angle holding a scan split across
  several files (``scan_<id>/data_000.h5, data_001.h5``: a folder named like a scan, ``scan_12``
  or ``12``, or a folder of files named like parts, ``data_000``, ``part1``), listed in order of
  their numbers.
* **Particles**: every folder holding scans is a particle (nested folders joined by ``_``), or
  ``group`` (``--group``) is a regular expression with a named group ``particle`` searched in each
  scan's path relative to ``RAW_DIR``.
* **Order**: by scan id (the last number of the file or scan-folder name, compared as a number:
  ``scan_99999 < scan_100000``), else by the recorded angle; the recorded angles must then be
  strictly monotonic (``sort = "angle"`` orders by the angle instead).
* **Datasets** (HDF5), by name, case-insensitive, optionally followed by digits (``ic1``): see
  :data:`NAMES`; ``names`` (``--names KEY=a,b`` or ``KEY+=a,b``) replaces or extends a list.

  - detector: the largest 3-D ``(n_points, rows, cols)`` or 4-D ``(scan_rows, scan_cols, rows,
    cols)`` integer dataset (float if there is no integer one) outside the XRF groups;
  - monitor: a per-point dataset named like :data:`NAMES` ``monitor`` (or ``data`` in a group so
    named);
  - XRF: a per-point dataset in a group or with a name like :data:`NAMES` ``xrf``: a map
    ``(n_points,)`` or spectra ``(n_points, [channels,] bins)``; spectra need ``xrf_window_kev``
    and the bins' energies: a 1-D dataset named like ``xrf_energy`` beside them, or
    ``xrf_calibration``;
  - detector mask: a 2-D dataset of the detector's shape named like ``mask``;
  - positions: a pair of per-point datasets named like :data:`POSITION_PAIRS`
    (``samy``/``samx``, ``piezo_y``/``piezo_x``, ``y``/``x``, ...); their ``units`` attribute
    (µm if absent, noted as a guess);
  - rocking angle: a scalar (or constant per-point) dataset or an attribute named like ``angle``
    (``theta``, ``eta``, ``omega``, ...) whose value differs between the scans of a particle;
  - geometry: NeXus-style ``<detector group>/x_pixel_size, y_pixel_size, distance,
    beam_center_x, beam_center_y`` and ``.../monochromator/energy`` (or attributes such as
    ``energy_kev``), detector arm ``gamma``, ``delta``, with their ``units`` (values without
    units are converted by their size and reported as guesses); what is recorded nowhere must
    be given (``energy_kev``, ``distance_m``, ``pixel_size_m``, ``beam_center``, ``gamma_deg``,
    ``delta_deg``); ``rocking_axis`` is ``y+`` unless given;
  - ``<detector group>/saturation_value``: ``[reduce] saturation`` (or ``saturation``).
* **Scan grid**: from the recorded positions (:func:`infer_grid`: lines of the fast axis, rows
  of the slow axis, steps; robust to jitter and overshoot; snake or raster), else from a 4-D
  detector dataset's scan axes or a ``scan_shape`` attribute, else ``scan_shape`` and
  ``step_um`` must be given.

Examples
--------
>>> import tempfile, h5py, numpy as np
>>> raw = Path(tempfile.mkdtemp()) / "raw"
>>> for i, theta in enumerate([10.0, 10.1, 10.2]):
...     (raw / "p1").mkdir(parents=True, exist_ok=True)
...     with h5py.File(raw / "p1" / f"scan_{i + 1}.h5", "w") as f:
...         _ = f.create_dataset("/entry/detector/data", data=np.zeros((6, 4, 4), "u2"))
...         f["/entry"].attrs["theta"] = theta
>>> result = init_manifest(raw, manifest=raw.parent / "beamtime.toml", options=InitOptions(
...     scan_shape=(2, 3), step_um=(0.1, 0.1), energy_kev=9.0, distance_m=0.5,
...     pixel_size_m=55e-6, beam_center=(2.0, 2.0), gamma_deg=20.0, delta_deg=0.0))
>>> m = result.manifest
>>> m.particles[0].frames, m.particles[0].angles.tolist()
(['raw/p1/scan_1.h5', 'raw/p1/scan_2.h5', 'raw/p1/scan_3.h5'], [10.0, 10.1, 10.2])
>>> "/entry@theta" in result.text
True
"""

from __future__ import annotations

import argparse
import datetime
import fnmatch
import itertools
import logging
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import tomllib

if TYPE_CHECKING:
    from spndi_dask.config import Manifest

__all__ = [
    "NAMES",
    "POSITION_PAIRS",
    "GridFit",
    "InitError",
    "InitOptions",
    "InitReport",
    "InitResult",
    "infer_grid",
    "init_manifest",
]

logger = logging.getLogger(__name__)

#: Dataset and attribute names looked for, per kind (lower case; digits may follow, e.g.
#: ``ic1``). ``--names KEY=a,b`` replaces a list, ``--names KEY+=a,b`` extends it.
NAMES: dict[str, tuple[str, ...]] = {
    "monitor": ("i0", "io", "izero", "i_zero", "monitor", "ic", "ion_chamber", "sclr_i0"),
    "xrf": ("xrf", "fluo", "fluorescence", "xspress", "xspress3", "mca", "falcon", "falconx",
            "vortex", "ketek", "sdd"),
    "xrf_energy": ("energy", "energies", "bin_energy", "energy_bins", "e_bins"),
    "mask": ("pixel_mask", "mask", "bad_pixel_mask", "detector_mask"),
    "angle": ("theta", "eta", "omega", "angle", "rocking_angle", "th"),
    "energy": ("energy", "energy_kev", "incident_energy", "photon_energy", "mono_energy"),
    "distance": ("distance", "detector_distance", "detector_distance_m", "det_distance",
                 "sample_distance"),
    "pixel_size": ("pixel_size", "pixel_size_m"),
    "x_pixel_size": ("x_pixel_size",),
    "y_pixel_size": ("y_pixel_size",),
    "beam_center_x": ("beam_center_x",),
    "beam_center_y": ("beam_center_y",),
    "gamma": ("gamma", "gamma_deg"),
    "delta": ("delta", "delta_deg"),
    "scan_shape": ("scan_shape", "scan_dims", "scan_size"),
    "scan_step": ("scan_step_um", "scan_step", "step_um"),
    "saturation": ("saturation_value", "countrate_correction_count_cutoff"),
}  # fmt: skip

#: (slow-axis y, fast-axis x) name pairs of recorded positions; ``--names positions=Y:X,...``.
POSITION_PAIRS: tuple[tuple[str, str], ...] = (
    ("samy", "samx"),
    ("sam_y", "sam_x"),
    ("piezo_y", "piezo_x"),
    ("pos_y", "pos_x"),
    ("y_pos", "x_pos"),
    ("zpssy", "zpssx"),
    ("dssy", "dssx"),
    ("ssy", "ssx"),
    ("sample_y", "sample_x"),
    ("fine_y", "fine_x"),
    ("sy", "sx"),
    ("y", "x"),
)

HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf", ".nxs", ".nx5", ".cxi")
TIFF_SUFFIXES = (".tif", ".tiff")
#: a folder named like this holding several files is one scan split across them
SPLIT_DIR = re.compile(r"(?i)^(?:scan)?[_-]?\d+$")
#: files named like this are the parts of one scan (their folder is the scan)
PART_FILE = re.compile(r"(?i)^(?:data|part|chunk|frames?)[_-]?\d+$")
#: files named like this are not scans
NOT_A_SCAN = re.compile(
    r"(?i)(?:^|[_.-])(?:darks?|flats?|flatfield|mask|background|bkg)(?:$|[_.-]|\d)"
)
_GENERIC_DIRS = {"raw", "data", "rawdata", "raw_data", "frames", "scans", "h5", "hdf5", "tiff"}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_ROCKING_AXES = ("x+", "x-", "y+", "y-", "z+", "z-")


class InitError(ValueError):
    """``spndi init`` cannot write a manifest; the message lists every problem with its fix."""


@dataclass(frozen=True)
class InitOptions:
    """What ``spndi init`` is told instead of guessing (each field is the flag of that name).

    ``None`` means: find it in the files. ``"none"`` for ``monitor``, ``xrf``, ``mask_dataset``
    and ``positions`` means: do not use one.
    """

    name: str | None = None
    results: str = "results"
    group: str | None = None
    exclude: tuple[str, ...] = ()
    split: bool = True
    sort: Literal["auto", "id", "angle"] = "auto"
    dataset: str | None = None
    monitor: str | None = None
    xrf: str | None = None
    mask_dataset: str | None = None
    positions: tuple[str, str] | Literal["none"] | None = None
    positions_units: Literal["um", "nm", "mm"] | None = None
    names: tuple[tuple[str, tuple[str, ...], bool], ...] = ()
    angle_path: str | None = None
    angles: tuple[float, float, int] | None = None
    scan_shape: tuple[int, int] | None = None
    step_um: tuple[float, float] | None = None
    scan_order: Literal["raster", "snake"] | None = None
    allow_incomplete: bool = False
    xrf_window_kev: tuple[float, float] | None = None
    xrf_calibration: tuple[float, float] | None = None
    xrf_energy: str | None = None
    energy_kev: float | None = None
    distance_m: float | None = None
    pixel_size_m: float | None = None
    beam_center: tuple[float, float] | None = None
    gamma_deg: float | None = None
    delta_deg: float | None = None
    rocking_axis: str | None = None
    saturation: float | None = None


# -- command-line value parsers (argparse ``type=``; they raise ArgumentTypeError) ----------------
def parse_angles(text: str) -> tuple[float, float, int]:
    """``"START:STOP:NUM"`` -> ``(start, stop, num)``, e.g. ``"-0.5:0.5:21"``."""
    parts = text.split(":")
    try:
        start, stop, num = float(parts[0]), float(parts[1]), int(parts[2])
        if len(parts) != 3 or num < 2 or not np.isfinite([start, stop]).all():
            raise ValueError
    except (ValueError, IndexError):
        raise argparse.ArgumentTypeError(
            f"{text!r}: give START:STOP:NUM with NUM >= 2, e.g. -0.5:0.5:21"
        ) from None
    return start, stop, num


def parse_window(text: str) -> tuple[float, float]:
    """``"LOW:HIGH"`` -> ``(low, high)`` (two numbers), e.g. ``"6.8:7.1"``."""
    try:
        low, high = (float(v) for v in text.split(":"))
        if not np.isfinite([low, high]).all():
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give two numbers A:B, e.g. 6.8:7.1") from None
    return low, high


def parse_pair(text: str, kind: type = float, *, positive: bool = False) -> tuple[Any, Any]:
    """``"A,B"`` -> ``(A, B)`` of ``kind``, e.g. ``"140,200"``; ``positive``: both > 0."""
    try:
        a, b = (kind(v) for v in text.split(","))
        if not np.isfinite([a, b]).all() or (positive and min(a, b) <= 0):
            raise ValueError
    except ValueError:
        example = "140,200" if kind is int else "0.05,0.05"
        sign = " > 0" if positive else ""
        raise argparse.ArgumentTypeError(
            f"{text!r}: give two {kind.__name__} values{sign} A,B, e.g. {example}"
        ) from None
    return a, b


def parse_shape(text: str) -> tuple[int, int]:
    """``"R,C"``: a scan shape, two positive integers."""
    return parse_pair(text, int, positive=True)


def parse_step(text: str) -> tuple[float, float]:
    """``"Y,X"``: a scan step in µm, two positive numbers."""
    return parse_pair(text, float, positive=True)


def parse_positive(text: str) -> float:
    """A positive finite number."""
    try:
        v = float(text)
        if not (np.isfinite(v) and v > 0):
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give a positive number") from None
    return v


def parse_positions(text: str) -> tuple[str, str] | Literal["none"]:
    """``"Y_PATH,X_PATH"`` (slow then fast axis) or ``"none"``."""
    if text.lower() == "none":
        return "none"
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 2 or not all(parts):
        raise argparse.ArgumentTypeError(
            f"{text!r}: give Y_PATH,X_PATH, e.g. /entry/measurement/samy,/entry/measurement/samx,"
            " or none"
        )
    return parts[0], parts[1]


def parse_names(text: str) -> tuple[str, tuple[str, ...], bool]:
    """``"KEY=a,b"`` (replace the list) or ``"KEY+=a,b"`` (extend it): ``(key, names, extend)``."""
    m = re.fullmatch(r"\s*([a-z_]+)\s*(\+?=)\s*(.*)", text)
    keys = [*NAMES, "positions"]
    if not m or m.group(1) not in keys:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give KEY=a,b or KEY+=a,b with KEY one of {', '.join(keys)}"
        )
    values = tuple(v.strip().lower() for v in m.group(3).split(",") if v.strip())
    if m.group(1) == "positions" and not all(v.count(":") == 1 for v in values):
        raise argparse.ArgumentTypeError(
            f"{text!r}: positions names are Y:X pairs, e.g. positions=samy:samx"
        )
    return m.group(1), values, m.group(2) == "+="


# -- report --------------------------------------------------------------------------------------
@dataclass
class ParticleFound:
    """What was found for one particle (one row of the table :meth:`InitReport.format` prints)."""

    name: str
    where: str
    scans: int
    files: int
    angles: tuple[float, float] | None = None
    angle_source: str = ""
    scan_shape: tuple[int, int] | None = None
    step_um: tuple[float, float] | None = None
    scan_order: str = ""
    grid_source: str = ""
    detector: str = ""
    datasets: dict[str, str] = field(default_factory=dict)


@dataclass
class InitReport:
    """What ``spndi init`` found: per particle, the geometry, its guesses and skipped files."""

    raw_dir: Path
    particles: list[ParticleFound] = field(default_factory=list)
    geometry: dict[str, str] = field(default_factory=dict)
    guesses: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def format(self) -> str:
        """The table and the lists, as printed by ``spndi init``."""
        rows = [("particle", "scans", "files", "angles (deg)", "scan", "step (µm)", "order")]
        for p in self.particles:
            lo, hi = p.angles or (float("nan"), float("nan"))
            rows.append(
                (
                    p.name,
                    str(p.scans),
                    str(p.files),
                    f"{lo:.4g} … {hi:.4g}",
                    "×".join(map(str, p.scan_shape or ())),
                    "×".join(f"{s:.4g}" for s in p.step_um or ()),
                    p.scan_order,
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [f"found in {self.raw_dir}:"]
        lines += [
            "  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows
        ]
        for p in self.particles:
            lines.append(f"\n  {p.name} ({p.where}):")
            lines.append(f"    angles      {p.angle_source}")
            lines.append(f"    scan grid   {p.grid_source}")
            lines.append(f"    detector    {p.detector}")
            for key, text in p.datasets.items():
                lines.append(f"    {key:<11} {text}")
        if self.geometry:
            lines.append("\n  geometry:")
            lines += [f"    {k:<20} {v}" for k, v in self.geometry.items()]
        if self.guesses:
            lines.append("\nguesses (check them; the flag named settles each):")
            lines += [f"  - {g}" for g in self.guesses]
        if self.skipped:
            lines.append("\nskipped:")
            lines += [f"  - {s}" for s in self.skipped]
        return "\n".join(lines)


@dataclass
class InitResult:
    """The manifest text, where it goes and what was found."""

    text: str
    path: Path
    report: InitReport
    manifest: Manifest

    def write(self, *, force: bool = False) -> Path:
        """Write the manifest to :attr:`path`; an existing file only with ``force``."""
        if self.path.exists() and not force:
            raise InitError(
                f"{self.path} exists; pass --force to replace it, or -o another file name"
            )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(self.text)
        os.replace(tmp, self.path)
        logger.debug("wrote %s", self.path)
        return self.path


# -- what the files hold -------------------------------------------------------------------------
@dataclass
class _Dataset:
    path: str
    shape: tuple[int, ...]
    kind: str  # numpy dtype kind
    dtype: str
    units: str | None
    value: np.ndarray | None  # small datasets (<= 4 values) and angle-named 1-D datasets

    @property
    def size(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1

    @property
    def base(self) -> str:
        return self.path.rsplit("/", 1)[-1].lower()

    @property
    def parent(self) -> str:
        return self.path.rsplit("/", 1)[0]

    def describe(self) -> str:
        return f"{self.path} {_shape(self.shape)} {self.dtype}"


@dataclass
class _File:
    path: Path
    rel: str
    kind: Literal["hdf5", "tiff"]
    datasets: dict[str, _Dataset] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)  # "/entry@theta" -> value
    tiff: tuple[int, tuple[int, int], str] | None = None  # pages, page shape, dtype


@dataclass
class _Scan:
    """One rocking angle: a file, or a folder of files holding one scan split in parts."""

    name: str
    rel: str  # relative to RAW_DIR
    files: list[Path]
    label: str = ""  # as shown in messages: raw/p1/scan_1.h5, raw/p2/scan_7/
    particle: str = ""
    where: str = ""
    infos: list[_File] = field(default_factory=list)
    id: int | None = None
    angle: float | None = None
    n_points: int = 0
    scan_dims: tuple[int, int] | None = None  # from a 4-D dataset


@dataclass
class _Particle:
    name: str
    where: str
    scans: list[_Scan]
    entry: dict[str, Any] = field(default_factory=dict)  # manifest keys
    comments: dict[str, str] = field(default_factory=dict)  # manifest key -> source
    geometry: dict[str, tuple[Any, str]] = field(default_factory=dict)
    found: ParticleFound | None = None
    broken: bool = False


class _Problems:
    """Every problem found, in order; one bad file or particle never hides the others."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, line: str) -> None:
        if line not in self.lines:
            self.lines.append(line)

    def __bool__(self) -> bool:
        return bool(self.lines)


def _none(value: Any) -> bool:
    """The flag value ``none``: leave the dataset out."""
    return isinstance(value, str) and value.lower() == "none"


def _shape(shape: Sequence[int]) -> str:
    return "(" + ", ".join(map(str, shape)) + ")"


def _text(v: Any) -> str | None:
    if isinstance(v, bytes):
        return v.decode(errors="replace")
    if isinstance(v, np.ndarray) and v.size == 1:
        return _text(v.reshape(-1)[0])
    return v if isinstance(v, str) else None


def _small(v: Any) -> Any:
    """An attribute value kept for matching: numbers (up to 4) or text; else None."""
    text = _text(v)
    if text is not None:
        return text
    a = np.asarray(v)
    if a.dtype.kind in "iufb" and 0 < a.size <= 4:
        return a.astype(float).reshape(-1)
    return None


def _read_hdf5(path: Path, rel: str, angle_names: Sequence[str]) -> _File:
    import h5py
    import hdf5plugin  # noqa: F401  (registers the compression filters)

    info = _File(path, rel, "hdf5")

    def take_attrs(where: str, obj: Any) -> None:
        for key in obj.attrs:
            try:
                value = _small(obj.attrs[key])
            except (OSError, TypeError, ValueError):  # an attribute h5py cannot decode
                continue
            if value is not None:
                info.attrs[f"{where}@{key}"] = value

    with h5py.File(path, "r") as f:
        take_attrs("/", f)

        def visit(name: str, obj: Any) -> None:
            where = "/" + name
            take_attrs(where, obj)
            if not isinstance(obj, h5py.Dataset):
                return
            units = _text(obj.attrs.get("units"))
            value = None
            base = where.rsplit("/", 1)[-1].lower()
            small = obj.size <= 4 or (
                obj.ndim == 1 and obj.size <= 10**6 and _matches(base, angle_names)
            )
            if obj.dtype.kind in "iufb" and small:
                try:
                    value = np.asarray(obj[()], dtype=float).reshape(-1)
                except (OSError, TypeError, ValueError):
                    value = None
            info.datasets[where] = _Dataset(
                where, tuple(obj.shape), obj.dtype.kind, str(obj.dtype), units, value
            )

        f.visititems(visit)
    return info


def _read_tiff(path: Path, rel: str) -> _File:
    import tifffile

    with tifffile.TiffFile(path) as tf:
        pages = len(tf.pages)
        page = tf.pages[0]
        shape, dtype = tuple(page.shape), str(page.dtype)
    if len(shape) != 2:
        raise ValueError(f"its pages have shape {_shape(shape)}; expected 2-D detector frames")
    return _File(path, rel, "tiff", tiff=(pages, (int(shape[0]), int(shape[1])), dtype))


def _matches(name: str, patterns: Sequence[str]) -> bool:
    """``name`` is one of ``patterns``, optionally followed by digits (``ic1``, ``i0_2``)."""
    name = name.lower()
    return any(re.fullmatch(re.escape(p) + r"(?:[_-]?\d+)?", name) for p in patterns)


# -- discovery -----------------------------------------------------------------------------------
def _last_int(name: str) -> int | None:
    found = re.findall(r"\d+", name)
    return int(found[-1]) if found else None


def _natural(name: str) -> list[Any]:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def _is_data(path: Path) -> bool:
    return path.suffix.lower() in HDF5_SUFFIXES + TIFF_SUFFIXES


def _discover(
    raw: Path, options: InitOptions, skip_dirs: set[Path], report: InitReport
) -> list[_Scan]:
    """Every scan under ``raw`` (a file, or a folder of one scan's parts), unsorted."""
    scans: list[_Scan] = []
    other: Counter[str] = Counter()

    def excluded(rel: str) -> bool:
        name = rel.rsplit("/", 1)[-1]
        return any(fnmatch.fnmatch(rel, g) or fnmatch.fnmatch(name, g) for g in options.exclude)

    for folder, dirs, files in os.walk(raw):
        here = Path(folder)
        dirs[:] = sorted(
            d
            for d in dirs
            if not d.startswith(".")
            and not d.endswith(".zarr")
            and (here / d).resolve() not in skip_dirs
            and not excluded((here / d).relative_to(raw).as_posix())
        )
        data = []
        for name in sorted(files, key=_natural):
            path = here / name
            rel = path.relative_to(raw).as_posix()
            if name.startswith("."):
                continue
            if not _is_data(path):
                other[path.suffix.lower() or "(no suffix)"] += 1
                continue
            if excluded(rel):
                report.skipped.append(f"{rel} (--exclude)")
                continue
            if NOT_A_SCAN.search(path.stem):
                report.skipped.append(
                    f"{rel} (named like a dark/flat/mask file, not a scan: set dark or mask in "
                    "the manifest yourself if it is one)"
                )
                continue
            data.append(path)
        if not data:
            continue
        rel_here = here.relative_to(raw).as_posix()
        split = options.split and here != raw and len(data) > 1 and not dirs and (
            SPLIT_DIR.match(here.name) or all(PART_FILE.match(p.stem) for p in data)
        )  # fmt: skip
        if split:
            label = f"{raw.name}/{rel_here}/"
            scans.append(_Scan(here.name, rel_here, data, label, id=_last_int(here.name)))
        else:
            for p in data:
                rel = p.relative_to(raw).as_posix()
                scans.append(_Scan(p.stem, rel, [p], f"{raw.name}/{rel}", id=_last_int(p.stem)))
    if other:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(other.items()))
        report.skipped.append(f"{sum(other.values())} files that are not HDF5 or TIFF ({kinds})")
    return scans


def _assign_particles(
    raw: Path, scans: list[_Scan], options: InitOptions, problems: _Problems, report: InitReport
) -> dict[str, list[_Scan]]:
    """Scans by particle name: their folder, or the ``particle`` group of ``--group``."""
    by_particle: dict[str, list[_Scan]] = {}
    wheres: dict[str, set[str]] = {}
    pattern = None
    if options.group:
        try:
            pattern = re.compile(options.group)
        except re.error as exc:
            problems.add(f"--group {options.group!r} is not a regular expression ({exc})")
            return {}
        if "particle" not in pattern.groupindex:
            problems.add(
                f"--group {options.group!r} has no named group 'particle': write it as e.g. "
                r"'(?P<particle>p\d+)_scan'"
            )
            return {}
    unmatched = []
    for scan in scans:
        if pattern is not None:
            m = pattern.search(scan.rel)
            if not m or not m.group("particle"):
                unmatched.append(scan.rel)
                continue
            label, where = m.group("particle"), f"--group match {m.group('particle')!r}"
        else:
            folder = Path(scan.rel).parent  # of the file, or of the folder of a split scan
            if folder == Path("."):
                label, where = raw.name, f"{raw.name}/"
            else:
                label, where = "_".join(folder.parts), f"{raw.name}/{folder.as_posix()}/"
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", label).lstrip("_.-") or "p"
        scan.particle, scan.where = name, where
        by_particle.setdefault(name, []).append(scan)
        wheres.setdefault(name, set()).add(where)
    if unmatched:
        shown = ", ".join(unmatched[:5]) + (
            f" and {len(unmatched) - 5} more" if len(unmatched) > 5 else ""
        )
        report.skipped.append(f"{len(unmatched)} scans not matched by --group: {shown}")
    for name, places in wheres.items():
        if len(places) > 1 and pattern is None:
            problems.add(
                f"particle name {name!r} stands for several folders ({', '.join(sorted(places))}); "
                "rename a folder, or pass --group REGEX with a named group 'particle'"
            )
    return by_particle


# -- per-particle inference ------------------------------------------------------------------------
class _Inference:
    def __init__(self, raw: Path, manifest_dir: Path, options: InitOptions) -> None:
        self.raw = raw
        self.manifest_dir = manifest_dir
        self.options = options
        self.problems = _Problems()
        self.report = InitReport(raw)
        self.frames_path: str | None = None  # the particle's detector dataset, once chosen
        self.names = {k: tuple(v) for k, v in NAMES.items()}
        self.pairs = POSITION_PAIRS
        for key, values, extend in options.names:
            if key == "positions":
                new = tuple(tuple(v.split(":")) for v in values)
                self.pairs = (*self.pairs, *new) if extend else new  # type: ignore[assignment]
            else:
                self.names[key] = (*self.names[key], *values) if extend else values

    # helpers ------------------------------------------------------------------------------------
    def rel(self, path: Path) -> str:
        return Path(os.path.relpath(path, self.manifest_dir)).as_posix()

    def shown(self, path: Path) -> str:
        """A path as shown in messages: relative to RAW_DIR's parent (``raw/p1/scan_1.h5``)."""
        try:
            return path.relative_to(self.raw.parent).as_posix()
        except ValueError:
            return str(path)

    def guess(self, text: str) -> None:
        if text not in self.report.guesses:
            self.report.guesses.append(text)

    def is_xrf_path(self, path: str) -> bool:
        return any(_matches(part, self.names["xrf"]) for part in path.strip("/").split("/"))

    # reading ----------------------------------------------------------------------------------
    def read_files(self, particles: dict[str, list[_Scan]]) -> None:
        """Read every file's layout; every unreadable file is a problem (all are listed)."""
        for scans in particles.values():
            for scan in scans:
                for path in scan.files:
                    rel = self.shown(path)
                    try:
                        if path.suffix.lower() in TIFF_SUFFIXES:
                            scan.infos.append(_read_tiff(path, rel))
                        else:
                            scan.infos.append(_read_hdf5(path, rel, self.names["angle"]))
                    except Exception as exc:  # h5py/tifffile raise many kinds
                        reason = str(exc) or type(exc).__name__
                        glob = path.relative_to(self.raw).as_posix()
                        self.problems.add(
                            f"{rel}: cannot be read ({reason}); copy it again from the beamline, "
                            f"or leave it out with --exclude '{glob}'"
                        )

    # the detector dataset ------------------------------------------------------------------------
    def detector(self, p: _Particle) -> None:
        chosen: dict[str, list[str]] = {}
        for scan in p.scans:
            n_points = 0
            dims: tuple[int, int] | None = None
            for info in scan.infos:
                if info.kind == "tiff":
                    assert info.tiff is not None
                    pages, shape, dtype = info.tiff
                    n_points += pages
                    chosen.setdefault("(TIFF pages)", []).append(info.rel)
                    p.entry.setdefault("_detector", (shape, dtype))
                    continue
                d = self.pick_detector(info)
                if d is None:
                    p.broken = True
                    continue
                chosen.setdefault(d.path, []).append(info.rel)
                p.entry.setdefault("_detector", (d.shape[-2:], d.dtype))
                if d.shape[-2:] != p.entry["_detector"][0]:
                    self.problems.add(
                        f"{info.rel}: detector frames {_shape(d.shape[-2:])} differ from "
                        f"{_shape(p.entry['_detector'][0])} of the other files of particle "
                        f"'{p.name}'; leave it out with --exclude, or put it in a particle folder "
                        "of its own"
                    )
                if len(d.shape) == 4:
                    dims = (d.shape[0] + (dims[0] if dims else 0), d.shape[1])
                    n_points += d.shape[0] * d.shape[1]
                else:
                    n_points += d.shape[0]
            scan.n_points, scan.scan_dims = n_points, dims
        if p.broken:
            return
        if len(chosen) > 1:
            listing = "; ".join(f"{k} in {len(v)} files (e.g. {v[0]})" for k, v in chosen.items())
            self.problems.add(
                f"particle '{p.name}': its files hold their frames in different datasets "
                f"({listing}); pass --dataset PATH"
            )
            p.broken = True
        else:
            path = next(iter(chosen))
            shape, dtype = p.entry["_detector"]
            if path != "(TIFF pages)":
                p.entry["dataset"] = path
            p.comments.setdefault("dataset", f"frames {_shape(shape)} {dtype}")

    def pick_detector(self, info: _File) -> _Dataset | None:
        opt = self.options.dataset
        if opt:
            d = info.datasets.get(opt)
            if d is None or len(d.shape) not in (3, 4):
                found = "missing" if d is None else f"{_shape(d.shape)}, not 3-D or 4-D"
                self.problems.add(
                    f"{info.rel}: --dataset {opt} is {found}; frame datasets in the file: "
                    f"{self.list_frames(info) or 'none'}"
                )
                return None
            return d
        frames = [
            d
            for d in info.datasets.values()
            if len(d.shape) in (3, 4) and d.kind in "iuf" and not self.is_xrf_path(d.path)
            and min(d.shape[-2:]) >= 2
        ]  # fmt: skip
        ints = [d for d in frames if d.kind in "iu"]
        pool = ints or frames
        if not pool:
            self.problems.add(
                f"{info.rel}: no 3-D (n_points, rows, cols) or 4-D (scan rows, scan cols, rows, "
                f"cols) dataset of frames; datasets: {self.list_all(info)}; pass --dataset PATH, "
                "or leave the file out with --exclude"
            )
            return None
        pool.sort(key=lambda d: d.size, reverse=True)
        best = pool[0]
        ties = [d for d in pool if d.size == best.size]
        if len(ties) > 1:
            self.problems.add(
                f"{info.rel}: {len(ties)} candidate detector datasets of the same size: "
                f"{', '.join(d.describe() for d in ties)}; pass --dataset PATH"
            )
            return None
        if not ints:
            self.guess(f"{best.path}: frames are {best.dtype}, not integer counts (--dataset)")
        if len(pool) > 1:
            others = ", ".join(d.describe() for d in pool[1:3])
            self.guess(
                f"{best.path} is the detector: the largest of {len(pool)} frame-shaped datasets "
                f"(also {others}); --dataset PATH picks another"
            )
        return best

    @staticmethod
    def list_frames(info: _File) -> str:
        return ", ".join(d.describe() for d in info.datasets.values() if len(d.shape) in (3, 4))

    @staticmethod
    def list_all(info: _File) -> str:
        shown = [d.describe() for d in info.datasets.values()][:12]
        return ", ".join(shown) or "none"

    # per-point datasets ------------------------------------------------------------------------
    def per_point(self, d: _Dataset, scan: _Scan, info: _File) -> bool:
        """``d``'s leading axes are the scan points of this file."""
        det = self.frames_of(info)
        if det is None:
            return False
        lead = det.shape[:2] if len(det.shape) == 4 else det.shape[:1]
        return d.shape[: len(lead)] == lead or (
            len(lead) == 2 and len(d.shape) >= 1 and d.shape[0] == lead[0] * lead[1]
        )

    def frames_of(self, info: _File) -> _Dataset | None:
        """The frames dataset of the particle being inferred (``frames_path``) in ``info``."""
        return info.datasets.get(self.frames_path) if self.frames_path else None

    def find_per_point(
        self,
        p: _Particle,
        key: str,
        flag: str,
        accept: Any,
        what: str,
    ) -> str | None:
        """The one per-point dataset of ``p`` named like ``NAMES[key]`` (or the flag's)."""
        given = getattr(self.options, key if key != "mask" else "mask_dataset")
        infos = [(s, i) for s in p.scans for i in s.infos if i.kind == "hdf5"]
        if not infos or _none(given):
            return None
        if given:
            for scan, info in infos:
                d = info.datasets.get(given)
                if d is None or not accept(d, scan, info):
                    state = "missing" if d is None else f"{_shape(d.shape)}, not {what}"
                    self.problems.add(f"{info.rel}: {flag} {given} is {state}")
                    p.broken = True
            return given
        # candidates of each file; the choice must be the same in every file
        found: dict[str, int] = {}
        for scan, info in infos:
            for d in info.datasets.values():
                if accept(d, scan, info) and self.named(d, key):
                    found[d.path] = found.get(d.path, 0) + 1
        everywhere = [k for k, n in found.items() if n == len(infos)]
        if len(everywhere) > 1:
            self.problems.add(
                f"particle '{p.name}': {len(everywhere)} candidate {what} datasets: "
                f"{', '.join(everywhere)}; pass {flag} PATH (or {flag} none)"
            )
            p.broken = True
            return None
        partial = [k for k in found if k not in everywhere]
        if partial:
            self.guess(
                f"particle '{p.name}': {', '.join(partial)} ({what}) is not in every file; not "
                f"used ({flag} PATH uses it)"
            )
        return everywhere[0] if everywhere else None

    def named(self, d: _Dataset, key: str) -> bool:
        names = self.names[key]
        if _matches(d.base, names):
            return True
        group = d.parent.rsplit("/", 1)[-1]
        if key == "xrf":
            return self.is_xrf_path(d.parent) and not _matches(d.base, self.names["xrf_energy"])
        return d.base in ("data", "counts", "value") and _matches(group, names)

    def monitor(self, p: _Particle) -> None:
        def accept(d: _Dataset, scan: _Scan, info: _File) -> bool:
            return d.kind in "iuf" and self.per_point(d, scan, info) and d.size == self.points(info)

        path = self.find_per_point(p, "monitor", "--monitor", accept, "per-point monitor")
        if path:
            p.entry["monitor"] = path
            p.comments["monitor"] = "per-point incident flux" + (
                " (--monitor)" if self.options.monitor else " (found by name)"
            )

    def points(self, info: _File) -> int:
        det = self.frames_of(info)
        if det is None:
            return -1
        return int(np.prod(det.shape[:2] if len(det.shape) == 4 else det.shape[:1]))

    def xrf(self, p: _Particle) -> None:
        def accept(d: _Dataset, scan: _Scan, info: _File) -> bool:
            det = self.frames_of(info)
            lead = 2 if det is not None and len(det.shape) == 4 else 1
            return (
                d.kind in "iuf"
                and self.per_point(d, scan, info)
                and len(d.shape) <= lead + 2
                and (det is None or d.path != det.path)
            )

        path = self.find_per_point(p, "xrf", "--xrf", accept, "XRF")
        if not path:
            if self.options.xrf_window_kev:
                self.problems.add(
                    f"particle '{p.name}': --xrf-window is given but no XRF dataset was found; "
                    "pass --xrf PATH"
                )
            return
        p.entry["xrf"] = path
        info = next(i for s in p.scans for i in s.infos if i.kind == "hdf5")
        d = info.datasets[path]
        det = self.frames_of(info)
        lead = 2 if det is not None and len(det.shape) == 4 else 1
        if len(d.shape) == lead:
            p.comments["xrf"] = "per-point fluorescence map" + (
                " (--xrf)" if self.options.xrf else " (found by name)"
            )
            if self.options.xrf_window_kev:
                self.guess(
                    f"particle '{p.name}': {path} is a per-point map, not spectra: "
                    "--xrf-window does not apply to it"
                )
            return
        bins = d.shape[-1]
        spectra = _shape(("n_points", *d.shape[lead:]))
        p.comments["xrf"] = f"XRF spectra {spectra}: summed over channels and the window"
        window = self.options.xrf_window_kev
        if window is None:
            self.problems.add(
                f"particle '{p.name}': {path} {_shape(d.shape)} holds XRF spectra; pass "
                "--xrf-window LOW:HIGH (keV, the emission line's window, e.g. 6.8:7.1 for Co "
                "Kα), or --xrf none to leave XRF out"
            )
            p.broken = True
            return
        p.entry["xrf_window_kev"] = list(window)
        p.comments["xrf_window_kev"] = "--xrf-window"
        if self.options.xrf_calibration:
            offset, gain = self.options.xrf_calibration
            p.entry["xrf_calibration"] = {"offset_kev": offset, "gain_kev": gain}
            p.comments["xrf_calibration"] = "--xrf-calibration"
            return
        energy = self.options.xrf_energy
        if energy is None:
            near = [
                e.path
                for e in info.datasets.values()
                if e.parent == d.parent and len(e.shape) == 1 and e.shape[0] == bins
                and _matches(e.base, self.names["xrf_energy"])
            ]  # fmt: skip
            if len(near) > 1:
                self.problems.add(
                    f"particle '{p.name}': {len(near)} candidate XRF bin-energy datasets beside "
                    f"{path}: {', '.join(near)}; pass --xrf-energy PATH"
                )
                p.broken = True
                return
            if not near:
                self.problems.add(
                    f"particle '{p.name}': no dataset of the energy of the {bins} bins of {path} "
                    "(looked for " + ", ".join(self.names["xrf_energy"]) + " beside it); pass "
                    "--xrf-calibration OFFSET:GAIN (keV of bin 0 : keV per bin) or "
                    "--xrf-energy PATH"
                )
                p.broken = True
                return
            energy = near[0]
            p.comments["xrf_energy"] = f"the bins' energies ({bins} values, found by name)"
        else:
            p.comments["xrf_energy"] = "--xrf-energy"
            e = info.datasets.get(energy)
            if e is None or e.shape != (bins,):
                state = "missing" if e is None else f"{_shape(e.shape)}, not ({bins},)"
                self.problems.add(
                    f"{info.rel}: --xrf-energy {energy} is {state} (one energy per bin of {path})"
                )
                p.broken = True
                return
        p.entry["xrf_energy"] = energy
        units = (info.datasets[energy].units or "").lower() if energy in info.datasets else ""
        if units == "ev":
            self.problems.add(
                f"particle '{p.name}': {energy} is in eV; the manifest's xrf_energy is in keV: "
                "pass --xrf-calibration OFFSET:GAIN in keV instead"
            )
            p.broken = True

    def mask(self, p: _Particle) -> None:
        shape = p.entry.get("_detector", (None,))[0]

        def accept(d: _Dataset, scan: _Scan, info: _File) -> bool:
            return tuple(d.shape) == tuple(shape or ()) and d.kind in "iub"

        infos = [(s, i) for s in p.scans for i in s.infos if i.kind == "hdf5"]
        given = self.options.mask_dataset
        if given and not _none(given):
            missing = [i.rel for _, i in infos if given not in i.datasets]
            if missing:
                self.problems.add(
                    f"particle '{p.name}': --mask-dataset {given} is missing from "
                    f"{', '.join(missing[:3])}"
                )
            p.entry["mask_dataset"] = given
            p.comments["mask_dataset"] = "--mask-dataset"
            return
        path = self.find_per_point(p, "mask", "--mask-dataset", accept, "detector mask")
        if path:
            p.entry["mask_dataset"] = path
            p.comments["mask_dataset"] = f"detector pixel mask {_shape(shape or ())}, nonzero = bad"

    def positions(self, p: _Particle) -> tuple[str, str] | None:
        given = self.options.positions
        infos = [(s, i) for s in p.scans for i in s.infos if i.kind == "hdf5"]
        if _none(given) or not infos:
            return None
        if given:
            for _, info in infos:
                for path in given:
                    if path not in info.datasets:
                        self.problems.add(f"{info.rel}: --positions dataset {path} is missing")
                        p.broken = True
            return given  # type: ignore[return-value]
        counts: Counter[tuple[str, str]] = Counter()
        for scan, info in infos:
            for d in info.datasets.values():
                if not (d.kind in "iuf" and self.per_point(d, scan, info)):
                    continue
                if d.size != self.points(info):
                    continue
                for ny, nx in self.pairs:
                    if _matches(d.base, (ny,)):
                        partner = self.partner(info, d, nx + d.base[len(ny) :])
                        if partner:
                            counts[(d.path, partner)] += 1
                        break
        everywhere = [k for k, n in counts.items() if n == len(infos)]
        if len(everywhere) > 1:
            listing = "; ".join(f"{y},{x}" for y, x in everywhere)
            self.problems.add(
                f"particle '{p.name}': {len(everywhere)} candidate pairs of recorded positions "
                f"({listing}); pass --positions Y_PATH,X_PATH (or --positions none)"
            )
            p.broken = True
            return None
        return everywhere[0] if everywhere else None

    @staticmethod
    def partner(info: _File, d: _Dataset, base: str) -> str | None:
        """The dataset called ``base`` beside ``d``, of its shape."""
        for cand in info.datasets.values():
            if cand.parent == d.parent and cand.base == base and cand.shape == d.shape:
                return cand.path
        return None

    # the rocking angle -------------------------------------------------------------------------
    def angle_candidates(self, info: _File) -> dict[str, tuple[float, str]]:
        """``{path: (degrees, note)}`` of every angle-named scalar, constant series or attribute."""
        out: dict[str, tuple[float, str]] = {}
        names = self.names["angle"]
        for d in info.datasets.values():
            if d.value is None or not _matches(d.base, names) or d.kind not in "iuf":
                continue
            v = d.value
            if v.size == 1:
                out[d.path] = self.degrees(float(v[0]), d.units)
            elif v.size > 1 and np.ptp(v) <= 1e-4 * max(1.0, abs(float(np.mean(v)))):
                out[d.path] = self.degrees(float(np.mean(v)), d.units)
        for key, v in info.attrs.items():
            base = key.rsplit("@", 1)[-1].lower()
            if isinstance(v, np.ndarray) and v.size == 1 and _matches(base, names):
                out[key] = (float(v[0]), "")
        return out

    @staticmethod
    def degrees(value: float, units: str | None) -> tuple[float, str]:
        u = (units or "").lower()
        if u in ("rad", "radian", "radians"):
            return float(np.degrees(value)), " (rad, converted)"
        if u in ("mdeg", "millidegree", "millidegrees"):
            return value / 1000.0, " (mdeg, converted)"
        return value, ""

    def read_angle_path(self, info: _File, path: str) -> float | None:
        if "@" in path:
            where, _, key = path.rpartition("@")
            key_path = f"{where or '/'}@{key}"
            v = info.attrs.get(key_path)
            return float(v[0]) if isinstance(v, np.ndarray) and v.size >= 1 else None
        d = info.datasets.get(path)
        if d is None or d.value is None:
            if d is not None and d.size > 4:  # a per-point series not read at scan time
                return self.read_series_mean(info, path)
            return None
        return self.degrees(float(np.mean(d.value)), d.units)[0]

    @staticmethod
    def read_series_mean(info: _File, path: str) -> float | None:
        import h5py

        with h5py.File(info.path, "r") as f:
            v = np.asarray(f[path][()], dtype=float)
        return float(np.mean(v)) if v.size else None

    def angles(self, p: _Particle) -> None:
        opt = self.options
        self.check_split(p)
        if p.broken:
            return
        recorded: list[float] | None = None
        source = ""
        hdf5 = all(s.infos and s.infos[0].kind == "hdf5" for s in p.scans)
        if opt.angle_path:
            values = []
            for scan in p.scans:
                v = self.read_angle_path(scan.infos[0], opt.angle_path) if hdf5 else None
                if v is None:
                    self.problems.add(
                        f"{scan.infos[0].rel}: --angle-path {opt.angle_path} is missing (write "
                        "a dataset path, or GROUP@ATTRIBUTE for an attribute, e.g. /entry@theta)"
                    )
                    p.broken = True
                values.append(v)
            if not p.broken:
                recorded, source = values, f"{opt.angle_path} (--angle-path)"  # type: ignore[assignment]
        elif hdf5:
            cands = [self.angle_candidates(s.infos[0]) for s in p.scans]
            common = set(cands[0]).intersection(*cands[1:]) if cands else set()
            vectors: dict[tuple[float, ...], list[str]] = {}
            for path in sorted(common, key=lambda k: ("@" in k, k)):  # datasets first
                vec = tuple(round(c[path][0], 9) for c in cands)
                vectors.setdefault(vec, []).append(path)
            varying = {v: ps for v, ps in vectors.items() if len(set(v)) > 1}
            counts = Counter(k for c in cands for k in c)
            strict = opt.angles is None  # with --angles, recorded angles are only compared
            for path, n in sorted(counts.items()):
                values = {c[path][0] for c in cands if path in c}
                if strict and n < len(cands) and len(values) > 1:  # an angle some files lack
                    lacking = [
                        s.label for s, c in zip(p.scans, cands, strict=True) if path not in c
                    ]
                    self.problems.add(
                        f"particle '{p.name}': {path} changes from scan to scan but is missing "
                        f"from {', '.join(lacking[:4])}{' ...' if len(lacking) > 4 else ''}; "
                        "leave those out with --exclude, or pass --angles START:STOP:NUM or "
                        "--angle-path PATH"
                    )
                    p.broken = True
            if p.broken:
                return
            if len(varying) > 1 and not strict:
                varying = {}
            if len(varying) > 1:
                listing = "; ".join(
                    f"{' = '.join(ps)} ({min(v):.4g} … {max(v):.4g})" for v, ps in varying.items()
                )
                self.problems.add(
                    f"particle '{p.name}': several recorded angles change from scan to scan "
                    f"({listing}); pass --angle-path PATH (GROUP@ATTRIBUTE for an attribute)"
                )
                p.broken = True
                return
            if varying:
                vec, paths = next(iter(varying.items()))
                recorded = [c[paths[0]][0] for c in cands]
                note = cands[0][paths[0]][1]
                source = paths[0] + note + (f" (= {', '.join(paths[1:])})" if paths[1:] else "")
            elif vectors and opt.angles is None:
                const = ", ".join(ps[0] for ps in vectors.values())
                self.guess(
                    f"particle '{p.name}': {const} has the same value in every scan: not the "
                    "rocking angle"
                )
        for scan, v in zip(p.scans, recorded or [None] * len(p.scans), strict=True):
            scan.angle = v
        if len(p.scans) < 2:
            self.problems.add(
                f"particle '{p.name}' ({p.where}) has only {len(p.scans)} scan; a rocking curve "
                "needs at least 2 angles: leave it out with --exclude, or group its files with "
                "others (--group)"
            )
            p.broken = True
            return
        self.order(p, recorded is not None)
        if opt.angles is not None:
            start, stop, num = opt.angles
            if num != len(p.scans):
                self.problems.add(
                    f"particle '{p.name}' has {len(p.scans)} scans but --angles {start}:{stop}:"
                    f"{num} gives {num} angles; give NUM = {len(p.scans)}"
                )
                p.broken = True
                return
            p.entry["angles_deg"] = {"start": start, "stop": stop, "num": num}
            p.comments["angles_deg"] = "--angles"
            if recorded is not None:
                given = np.linspace(start, stop, num)
                got = np.array([s.angle for s in p.scans], dtype=float)
                if np.max(np.abs(given - got)) > 1e-3:
                    self.guess(
                        f"particle '{p.name}': --angles differ from the recorded {source} "
                        f"({got.min():.4g} … {got.max():.4g}) by up to "
                        f"{np.max(np.abs(given - got)):.3g}°; the flag wins"
                    )
            p.found.angles, p.found.angle_source = (start, stop), "--angles"  # type: ignore[union-attr]
            return
        if recorded is None:
            looked = ", ".join(self.names["angle"])
            what = "TIFF files record no angle" if not hdf5 else (
                f"no rocking angle recorded in its files (looked for datasets and attributes "
                f"named {looked} whose value changes from scan to scan)"
            )  # fmt: skip
            self.problems.add(
                f"particle '{p.name}': {what}; pass --angles START:STOP:NUM, or --angle-path "
                "PATH if it is recorded under another name"
            )
            p.broken = True
            return
        values = [float(s.angle) for s in p.scans]  # type: ignore[arg-type]
        if not self.monotonic(p, values):
            return
        p.entry["angles_deg"] = [_round_angle(v) for v in values]
        p.comments["angles_deg"] = f"recorded {source}"
        p.found.angles = (values[0], values[-1])  # type: ignore[union-attr]
        p.found.angle_source = f"recorded {source}"  # type: ignore[union-attr]

    def check_split(self, p: _Particle) -> None:
        """The parts of a split scan must record one angle (else they are separate scans)."""
        for scan in p.scans:
            if len(scan.infos) < 2 or any(i.kind != "hdf5" for i in scan.infos):
                continue
            if self.options.angle_path:
                path = self.options.angle_path
                per_part = [{path: self.read_angle_path(i, path)} for i in scan.infos]
            else:
                per_part = [
                    {k: v[0] for k, v in self.angle_candidates(i).items()} for i in scan.infos
                ]
            for path in sorted(set(per_part[0]).intersection(*per_part[1:])):
                values = [part[path] for part in per_part]
                known = [v for v in values if v is not None]
                if not known or np.ptp(known) <= 1e-6 * max(1.0, abs(known[0])):
                    continue
                listing = ", ".join(
                    f"{i.path.name}: {v:g}"
                    for i, v in zip(scan.infos, values, strict=True)
                    if v is not None
                )
                self.problems.add(
                    f"{scan.label} was taken for one scan split across {len(scan.files)} files "
                    f"(named like a scan or like parts), but their {path} differ ({listing}); if "
                    "each file is an angle of its own, pass --no-split"
                )
                p.broken = True
                break

    def order(self, p: _Particle, recorded: bool) -> None:
        """Acquisition order: by scan id, else by the recorded angle, else by name."""
        ids = [s.id for s in p.scans]
        unique_ids = None not in ids and len(set(ids)) == len(ids)
        how = self.options.sort
        if how == "id" and not unique_ids:
            self.problems.add(
                f"particle '{p.name}': --sort id, but not every scan name has its own number "
                f"({', '.join(s.label for s in p.scans[:4])} ...); use --sort angle"
            )
            p.broken = True
            how = "auto"
        if how == "angle" or (how == "auto" and not unique_ids and recorded):
            if not recorded:
                self.problems.add(
                    f"particle '{p.name}': --sort angle needs recorded angles; pass --angle-path"
                )
                p.broken = True
                return
            p.scans.sort(key=lambda s: (s.angle, _natural(s.name)))
            p.entry["_order"] = "recorded angle"
        elif unique_ids:
            p.scans.sort(key=lambda s: s.id)  # type: ignore[arg-type, return-value]
            p.entry["_order"] = "scan number"
        else:
            p.scans.sort(key=lambda s: _natural(s.rel))
            p.entry["_order"] = "name"
            self.guess(
                f"particle '{p.name}': scans ordered by name (no scan numbers, no recorded "
                "angles); check the frames list"
            )

    def monotonic(self, p: _Particle, values: list[float]) -> bool:
        steps = np.diff(values)
        if np.any(steps == 0):
            i = int(np.flatnonzero(steps == 0)[0])
            a, b = p.scans[i], p.scans[i + 1]
            self.problems.add(
                f"particle '{p.name}': {a.label} and {b.label} record the same angle {values[i]:g} "
                "(a repeated scan?); leave one out with --exclude"
            )
            p.broken = True
            return False
        if not (np.all(steps > 0) or np.all(steps < 0)):
            bad = np.flatnonzero(np.sign(steps) != np.sign(np.median(steps)))
            listing = ", ".join(
                f"{p.scans[i].label} ({values[i]:g}) -> {p.scans[i + 1].label} ({values[i + 1]:g})"
                for i in bad[:4]
            )
            self.problems.add(
                f"particle '{p.name}': the recorded angles are not monotonic in "
                f"{p.entry.get('_order', 'scan')} order: {listing}; leave the stray scans out "
                "with --exclude, or pass --sort angle to order the scans by angle"
            )
            p.broken = True
            return False
        return True

    # the scan grid --------------------------------------------------------------------------------
    def grid(self, p: _Particle) -> None:
        """``scan_shape``, ``scan_step_um``, ``scan_order`` (and ``positions``) of ``p``.

        Checked whatever else went wrong with the particle, except the positions themselves.
        """
        opt = self.options
        before = len(self.problems.lines)
        positions = self.positions(p)
        if positions:
            y, x = positions
            units = self.position_units(p, positions)
            if units is not None:
                p.entry["positions"] = {"y": y, "x": x, "units": units}
                p.comments["positions"] = (
                    "recorded per-point positions (--positions)"
                    if opt.positions
                    else "recorded per-point positions (found by name)"
                )
        if len(self.problems.lines) > before:  # the positions are wrong: nothing to check
            return
        if opt.scan_shape and opt.step_um:
            self.set_grid(p, opt.scan_shape, opt.step_um, "--scan-shape, --step")
            p.entry["scan_order"] = opt.scan_order or "raster"
            self.check_points(p)
            return
        if "positions" in p.entry:
            self.grid_from_positions(p)
            return
        shape, shape_src = self.metadata_shape(p)
        step, step_src = self.metadata_step(p)
        if opt.scan_shape:
            shape, shape_src = opt.scan_shape, "--scan-shape"
        if opt.step_um:
            step, step_src = opt.step_um, "--step"
        missing = [f for f, v in (("--scan-shape R,C", shape), ("--step Y,X", step)) if v is None]
        if missing:
            self.problems.add(
                f"particle '{p.name}': no recorded positions (looked for pairs "
                f"{', '.join(f'{a}/{b}' for a, b in self.pairs[:5])}, ...) and no scan "
                f"{'shape' if shape is None else 'step'} in the files; pass {' and '.join(missing)}"
                " (or --positions Y_PATH,X_PATH)"
            )
            p.broken = True
            return
        self.set_grid(p, shape, step, f"{shape_src}; step {step_src}")  # type: ignore[arg-type]
        if opt.scan_order:
            p.entry["scan_order"] = opt.scan_order
        else:
            p.entry["scan_order"] = "raster"
            self.guess(
                f"particle '{p.name}': raster order (row by row, same direction) assumed: no "
                "positions recorded; pass --scan-order snake if every other row runs backwards"
            )
        self.check_points(p)

    def set_grid(self, p: _Particle, shape: Sequence[int], step: Sequence[float], src: str) -> None:
        p.entry["scan_shape"] = [int(shape[0]), int(shape[1])]
        p.entry["scan_step_um"] = [_round(float(step[0])), _round(float(step[1]))]
        p.comments["scan_shape"] = src
        p.found.scan_shape = (int(shape[0]), int(shape[1]))  # type: ignore[union-attr]
        p.found.step_um = tuple(p.entry["scan_step_um"])  # type: ignore[union-attr]
        p.found.grid_source = src  # type: ignore[union-attr]

    def check_points(self, p: _Particle) -> None:
        if "positions" in p.entry:
            return
        rows, cols = p.entry["scan_shape"]
        need = rows * cols
        short = [s for s in p.scans if s.n_points < need]
        long = [s for s in p.scans if s.n_points > need]
        for s in long:
            self.problems.add(
                f"{s.label}: {s.n_points} frames, more than scan_shape {rows}×{cols} = {need}; "
                "pass the right --scan-shape R,C"
            )
            p.broken = True
        if short and not self.options.allow_incomplete:
            listing = ", ".join(f"{s.label} ({s.n_points})" for s in short[:4])
            self.problems.add(
                f"particle '{p.name}': scans with fewer frames than scan_shape {rows}×{cols} = "
                f"{need}: {listing}; pass the right --scan-shape R,C, or --allow-incomplete if "
                "these scans were aborted (missing points are filled and marked invalid)"
            )
            p.broken = True
        elif short:
            p.entry["allow_incomplete"] = True
            p.comments["allow_incomplete"] = (
                f"--allow-incomplete: {len(short)} scan(s) have fewer than {need} frames"
            )

    def metadata_shape(self, p: _Particle) -> tuple[tuple[int, int] | None, str]:
        dims = {s.scan_dims for s in p.scans}
        if None not in dims:
            if len(dims) > 1:
                self.problems.add(
                    f"particle '{p.name}': its scans have different scan shapes "
                    f"({', '.join(map(str, sorted(dims)))}) in their 4-D frames; pass "
                    "--scan-shape R,C or leave the odd scans out with --exclude"
                )
                p.broken = True
                return None, ""
            return next(iter(dims)), "the scan axes of the 4-D frames"  # type: ignore[return-value]
        found = self.metadata_value(p, "scan_shape", size=2)
        if found is None:
            return None, ""
        value, where = found
        return (int(value[0]), int(value[1])), f"recorded {where}"

    def metadata_step(self, p: _Particle) -> tuple[tuple[float, float] | None, str]:
        found = self.metadata_value(p, "scan_step", size=2)
        if found is None:
            return None, ""
        value, where = found
        return (float(value[0]), float(value[1])), f"recorded {where}"

    def metadata_value(self, p: _Particle, key: str, size: int) -> tuple[np.ndarray, str] | None:
        """A small value named like ``NAMES[key]`` in every file, identical everywhere."""
        per_scan = []
        for scan in p.scans:
            info = scan.infos[0]
            if info.kind != "hdf5":
                return None
            hits = {}
            for k, v in info.attrs.items():
                if (
                    isinstance(v, np.ndarray)
                    and v.size == size
                    and _matches(k.rsplit("@", 1)[-1], self.names[key])
                ):
                    hits[k] = v
            for d in info.datasets.values():
                if (
                    d.value is not None
                    and d.value.size == size
                    and _matches(d.base, self.names[key])
                ):
                    hits[d.path] = d.value
            per_scan.append(hits)
        common = set(per_scan[0]).intersection(*per_scan[1:]) if per_scan else set()
        for path in sorted(common):
            values = [h[path] for h in per_scan]
            if all(np.allclose(v, values[0]) for v in values):
                return values[0], path
            listing = ", ".join(
                f"{s.label}: {v.tolist()}" for s, v in list(zip(p.scans, values, strict=True))[:4]
            )
            self.problems.add(
                f"particle '{p.name}': inconsistent {path} between its files ({listing}); pass "
                f"--scan-shape R,C --step Y,X, or leave the odd scans out with --exclude"
            )
            p.broken = True
            return None
        return None

    def position_units(self, p: _Particle, paths: tuple[str, str]) -> str | None:
        if self.options.positions_units:
            return self.options.positions_units
        units = set()
        for scan in p.scans:
            for info in scan.infos:
                for path in paths:
                    d = info.datasets.get(path)
                    if d is not None:
                        units.add(_length_unit(d.units))
        units.discard(None)
        known = {u for u in units if u in ("um", "nm", "mm")}
        if len(units) > 1 or units - known:
            self.problems.add(
                f"particle '{p.name}': positions {paths[0]}, {paths[1]} have units "
                f"{sorted(map(str, units))}; the manifest reads um, nm or mm: pass "
                "--positions-units um|nm|mm"
            )
            p.broken = True
            return None
        if not units:
            self.guess(
                f"particle '{p.name}': positions {paths[0]}, {paths[1]} have no units attribute; "
                "µm assumed (--positions-units um|nm|mm)"
            )
            return "um"
        return units.pop()

    def grid_from_positions(self, p: _Particle) -> None:
        paths = (p.entry["positions"]["y"], p.entry["positions"]["x"])
        scale = {"um": 1.0, "nm": 1e-3, "mm": 1e3}[p.entry["positions"]["units"]]
        fits: list[tuple[_Scan, GridFit]] = []
        failed = False
        for scan in p.scans:
            try:
                y, x = self.read_positions(scan, paths)
                fits.append((scan, infer_grid(y * scale, x * scale)))
            except (OSError, ValueError, KeyError) as exc:
                self.problems.add(
                    f"{scan.label}: the scan grid cannot be inferred from {paths[0]}, {paths[1]} "
                    f"({exc}); pass --scan-shape R,C --step Y,X"
                )
                p.broken = failed = True
        if failed or not fits:
            return
        shapes = Counter(f.shape for _, f in fits)
        if len(shapes) > 1 and not self.options.scan_shape:
            common = shapes.most_common(1)[0][0]
            odd = ", ".join(
                f"{s.label} {f.shape[0]}×{f.shape[1]}" for s, f in fits if f.shape != common
            )
            self.problems.add(
                f"particle '{p.name}': inconsistent scan shapes between its files: most are "
                f"{common[0]}×{common[1]}, but {odd}; pass --scan-shape R,C --step Y,X, or leave "
                "the odd scans out with --exclude"
            )
            p.broken = True
            return
        steps = np.array([f.step for _, f in fits])
        step = np.median(steps, axis=0)
        off = np.abs(steps / step - 1).max(axis=1)
        if np.any(off > 0.15) and not self.options.step_um:
            odd = ", ".join(
                f"{s.label} {f.step[0]:.4g}×{f.step[1]:.4g}"
                for (s, f), o in zip(fits, off, strict=True)
                if o > 0.15
            )
            self.problems.add(
                f"particle '{p.name}': inconsistent scan steps between its files (median "
                f"{step[0]:.4g}×{step[1]:.4g} µm; {odd}); pass --scan-shape R,C --step Y,X"
            )
            p.broken = True
            return
        orders = Counter(f.order for _, f in fits)
        order = orders.most_common(1)[0][0]
        fit = fits[0][1]
        src = f"inferred from {paths[0]}, {paths[1]} of every scan"
        shape = fit.shape
        step_um = tuple(_nice_step(float(v), max(shape)) for v in step)
        if self.options.scan_shape:
            shape, src = self.options.scan_shape, f"--scan-shape; step {src}"
        if self.options.step_um:
            step_um, src = self.options.step_um, f"{src}; --step"
        self.set_grid(p, shape, step_um, src)
        p.entry["scan_order"] = self.options.scan_order or order
        lost = max(1 - f.on_grid / max(f.n_points, 1) for _, f in fits)
        p.found.grid_source += (  # type: ignore[union-attr]
            f" (fast axis {fit.fast_axis}, {order}; up to {lost:.0%} of the points off the grid)"
        )
        if lost > 0.25:
            self.guess(
                f"particle '{p.name}': up to {lost:.0%} of a scan's points lie off the inferred "
                f"{fit.shape[0]}×{fit.shape[1]} grid (overshoot?); check --scan-shape/--step"
            )

    @staticmethod
    def read_positions(scan: _Scan, paths: tuple[str, str]) -> tuple[np.ndarray, np.ndarray]:
        import h5py

        ys, xs = [], []
        for info in scan.infos:
            with h5py.File(info.path, "r") as f:
                ys.append(np.asarray(f[paths[0]][()], dtype=float).reshape(-1))
                xs.append(np.asarray(f[paths[1]][()], dtype=float).reshape(-1))
        return np.concatenate(ys), np.concatenate(xs)

    # geometry -------------------------------------------------------------------------------------
    def geometry(self, p: _Particle) -> None:
        """Metadata geometry of one particle: ``p.geometry[key] = (value, source)``."""
        infos = [s.infos[0] for s in p.scans if s.infos and s.infos[0].kind == "hdf5"]
        if not infos:
            return
        det_group = p.entry.get("dataset", "").rsplit("/", 1)[0]

        def scalar(key: str, convert: Any) -> tuple[float, str] | None:
            per_file = []
            for info in infos:
                hits: dict[str, tuple[float, str]] = {}
                for d in info.datasets.values():
                    if d.value is not None and d.size == 1 and _matches(d.base, self.names[key]):
                        if key == "energy" and self.is_xrf_path(d.path):
                            continue
                        conv = convert(float(d.value[0]), d.units, d.base)
                        if conv is not None:
                            hits[d.path] = conv
                for k, v in info.attrs.items():
                    base = k.rsplit("@", 1)[-1].lower()
                    if (
                        isinstance(v, np.ndarray)
                        and v.size == 1
                        and _matches(base, self.names[key])
                    ):
                        conv = convert(float(v[0]), None, base)
                        if conv is not None:
                            hits[k] = conv
                per_file.append(hits)
            paths = set(per_file[0]).intersection(*per_file[1:])
            if not paths:
                return None

            def rank(path: str) -> tuple[bool, int, bool]:
                # the detector's own group first (for its keys), then the order of NAMES[key]
                base = re.split(r"[/@]", path)[-1].lower()
                order = next(i for i, n in enumerate(self.names[key]) if _matches(base, (n,)))
                near = bool(det_group) and path.startswith((det_group + "/", det_group + "@"))
                return (key != "energy" and not near, order, "@" in path)

            best = min(rank(pp) for pp in paths)
            pick = sorted(pp for pp in paths if rank(pp) == best)
            values = {pp: [h[pp][0] for h in per_file] for pp in paths}
            first = pick[0]
            flag = _GEOMETRY_FLAGS[key]
            if not all(np.allclose(values[pp], values[first], rtol=1e-4) for pp in pick):
                listing = ", ".join(f"{pp} = {values[pp][0]:.6g}" for pp in pick)
                self.problems.add(
                    f"particle '{p.name}': {len(pick)} different recorded {key.replace('_', ' ')}"
                    f" values ({listing}); pass {flag}"
                )
                return None
            for pp in sorted(paths - set(pick)):
                if not np.allclose(values[pp], values[first], rtol=1e-3):
                    self.guess(
                        f"particle '{p.name}': {key.replace('_', ' ')} from {first} "
                        f"({values[first][0]:.6g}), not {pp} ({values[pp][0]:.6g}); {flag} "
                        "overrides"
                    )
            vals = np.array(values[first])
            if not np.allclose(vals, vals[0], rtol=1e-4):
                listing = ", ".join(
                    f"{i.rel}: {v:.6g}" for i, v in list(zip(infos, vals, strict=True))[:4]
                )
                self.problems.add(
                    f"particle '{p.name}': {first} differs between its files ({listing}); pass "
                    f"{_GEOMETRY_FLAGS[key]}"
                )
                return None
            note = per_file[0][first][1]
            if "assumed" in note:
                self.guess(
                    f"particle '{p.name}': {first}{note}; {flag} overrides (or a units "
                    "attribute in the files)"
                )
            value = float(np.median(vals))
            if note:  # converted: 350 mm -> 0.35 m, not 0.35000000000000003
                value = float(f"{value:.12g}")
            return value, f"recorded {first}{note}"

        got: dict[str, tuple[float, str] | None] = {
            "energy": scalar("energy", _energy_kev),
            "distance": scalar("distance", _length_m),
            "pixel_size": scalar("pixel_size", _length_m),
            "x_pixel_size": scalar("x_pixel_size", _length_m),
            "y_pixel_size": scalar("y_pixel_size", _length_m),
            "gamma": scalar("gamma", _angle_deg),
            "delta": scalar("delta", _angle_deg),
        }
        if got["energy"]:
            p.geometry["energy_kev"] = got["energy"]
        if got["distance"]:
            p.geometry["detector_distance_m"] = got["distance"]
        px, py = got["x_pixel_size"], got["y_pixel_size"]
        if px and py and not np.isclose(px[0], py[0], rtol=1e-3):
            self.problems.add(
                f"particle '{p.name}': pixels are not square (x {px[0]:.4g} m, y {py[0]:.4g} m); "
                "spndi needs square pixels: pass --pixel-size-m if one of them is wrong"
            )
        elif px or py or got["pixel_size"]:
            p.geometry["pixel_size_m"] = px or py or got["pixel_size"]  # type: ignore[assignment]
        for key, axis in (("gamma", "gamma_deg"), ("delta", "delta_deg")):
            if got[key]:
                value, src = got[key]  # type: ignore[misc]
                p.geometry[axis] = (value, src + " (check spndi's convention, README: Geometry)")
        saturation = scalar("saturation", lambda v, u, b: (v, ""))
        if saturation:
            p.entry["_saturation"] = saturation
        pixel = p.geometry.get("pixel_size_m", (self.options.pixel_size_m, ""))[0]
        bx = scalar("beam_center_x", lambda v, u, b: _pixels(v, u, pixel))
        by = scalar("beam_center_y", lambda v, u, b: _pixels(v, u, pixel))
        if bx and by:
            where = f"{by[1]}, {bx[1].removeprefix('recorded ')}"
            p.geometry["beam_center"] = ([by[0], bx[0]], f"{where} (row = y, col = x)")


_GEOMETRY_FLAGS = {
    "energy": "--energy-kev",
    "distance": "--distance-m",
    "pixel_size": "--pixel-size-m",
    "x_pixel_size": "--pixel-size-m",
    "y_pixel_size": "--pixel-size-m",
    "gamma": "--gamma-deg",
    "delta": "--delta-deg",
    "beam_center_x": "--beam-center R,C",
    "beam_center_y": "--beam-center R,C",
    "scan_shape": "--scan-shape R,C",
    "scan_step": "--step Y,X",
    "saturation": "--saturation COUNTS",
}


def _unit(u: str | None) -> str:
    return (u or "").strip().lower().replace("µ", "u").replace("μ", "u")


def _length_unit(u: str | None) -> str | None:
    u = _unit(u)
    table = {"um": "um", "micron": "um", "microns": "um", "micrometer": "um",
             "micrometre": "um", "nm": "nm", "nanometer": "nm", "mm": "mm", "millimeter": "mm",
             "m": "m", "meter": "m", "metre": "m"}  # fmt: skip
    return table.get(u, u) if u else None


def _energy_kev(v: float, units: str | None, name: str) -> tuple[float, str] | None:
    u = _unit(units)
    if u == "kev" or name.endswith("_kev"):
        return v, ""
    if u == "ev":
        return v / 1000.0, f" ({v:g} eV)"
    if u:
        return None  # not an energy we know
    if v > 100:
        return v / 1000.0, f" ({v:g}, no units: eV assumed)"
    return v, " (no units: keV assumed)"


def _length_m(v: float, units: str | None, name: str) -> tuple[float, str] | None:
    u = _length_unit(units)
    scale = {"m": 1.0, "mm": 1e-3, "um": 1e-6, "nm": 1e-9}
    if u in scale:
        return v * scale[u], "" if u == "m" else f" ({v:g} {u})"
    if name.endswith("_m"):
        return v, ""
    if u:
        return None
    if "pixel" in name:  # 55e-6 m, 0.055 mm or 55 µm
        if v < 1e-3:
            return v, " (no units: m assumed)"
        if v < 1:
            return v * 1e-3, f" ({v:g}, no units: mm assumed)"
        return v * 1e-6, f" ({v:g}, no units: µm assumed)"
    if v > 20:
        return v * 1e-3, f" ({v:g}, no units: mm assumed)"
    return v, " (no units: m assumed)"


def _angle_deg(v: float, units: str | None, name: str) -> tuple[float, str] | None:
    u = _unit(units)
    if u in ("rad", "radian", "radians"):
        return float(np.degrees(v)), f" ({v:g} rad)"
    if u in ("", "deg", "degree", "degrees"):
        return v, ""
    return None


def _pixels(v: float, units: str | None, pixel_m: float | None) -> tuple[float, str] | None:
    u = _length_unit(units)
    if u in (None, "pixel", "pixels", "px"):
        return v, ""
    scale = {"m": 1.0, "mm": 1e-3, "um": 1e-6}
    if u in scale and pixel_m:
        return v * scale[u] / pixel_m, f" ({v:g} {u} / pixel size)"
    return None


def _round(v: float) -> float:
    """``v`` to 10 significant digits (position medians carry float noise)."""
    return float(f"{v:.10g}")


def _nice_step(v: float, n: int) -> float:
    """An inferred step with the fewest significant digits that stay within 1/10 step over
    ``n`` steps, less than the jitter of fly scans (``0.0500131`` over 200 points is ``0.05``)."""
    for digits in (2, 3, 4, 5, 6):
        r = float(f"{v:.{digits}g}")
        if abs(r - v) * n <= 0.1 * v:
            return r
    return _round(v)


def _round_angle(v: float) -> float:
    """A recorded angle as written: the shortest text that reads back as its float32 or float64."""
    f32 = float(np.float32(v))
    return float(str(np.float32(v))) if f32 == v else float(v)


# -- the scan grid from recorded positions -------------------------------------------------------
@dataclass(frozen=True)
class GridFit:
    """A scan grid inferred from recorded positions (see :func:`infer_grid`).

    Attributes
    ----------
    shape : (int, int)
        Grid nodes along y (rows) and x (columns).
    step : (float, float)
        Node spacing along y and x, in the positions' units.
    order : {'raster', 'snake'}
        Whether consecutive lines run the same way or alternate.
    fast_axis : {'x', 'y'}
        The axis that moves point to point.
    n_points, on_grid : int
        Recorded points, and those within half a step of a node of the grid.
    """

    shape: tuple[int, int]
    step: tuple[float, float]
    order: Literal["raster", "snake"]
    fast_axis: Literal["x", "y"]
    n_points: int
    on_grid: int


def _lattice(v: np.ndarray, s0: float) -> tuple[float, float]:
    """Spacing near ``s0`` and offset of the lattice ``offset + k·spacing`` that best fit ``v``.

    The phase coherence ``|mean exp(2πi v/s)|`` peaks at the true spacing; searched within ±3 %
    of ``s0`` finely enough that the phase error across the whole span stays below 1/50 period.
    """
    v = np.asarray(v, dtype=float)
    if v.size > 2000:  # enough to find the lattice: the least-squares fit refines it
        v = v[np.linspace(0, v.size - 1, 2000).astype(int)]
    centre = float(np.median(v))
    w = v - centre
    periods = max(float(np.ptp(w)) / s0, 1.0)
    n = int(min(6001, max(61, 2 * 0.03 * periods / 0.02)))
    best_s, best_c = s0, -1.0
    for chunk in np.array_split(s0 * (1 + np.linspace(-0.03, 0.03, n)), max(1, n // 100)):
        c = np.abs(np.exp(2j * np.pi * w[None, :] / chunk[:, None]).mean(axis=1))
        i = int(np.argmax(c))
        if c[i] > best_c:
            best_s, best_c = float(chunk[i]), float(c[i])
    phase = float(np.angle(np.exp(2j * np.pi * w / best_s).mean())) / (2 * np.pi)
    return best_s, centre + phase * best_s


def infer_grid(y: Any, x: Any) -> GridFit:
    """The scan grid that recorded positions were taken on.

    The fast axis is the one that keeps moving the same way from point to point. Lines are
    the runs between reversals (snake) or fly-backs (raster) of the fast axis; the slow step is
    the spacing of the lines' median slow positions, the fast step that of consecutive points,
    both refined to the lattice that fits all positions best. A fast-axis node belongs to the
    grid when at least 90 % of the lines pass it (overshoot at the turning points of a snake
    reaches only every other line). Robust to position jitter up to about 0.15 step and to
    missing points.

    Parameters
    ----------
    y, x : array_like
        Slow- and fast-axis (or fast and slow) positions of every point, in acquisition order.

    Returns
    -------
    GridFit

    Raises
    ------
    ValueError
        Too few points, no line structure, or irregular line spacing (the message says which).

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> rows, cols = np.mgrid[0:6, 0:8].astype(float)
    >>> cols[1::2] = cols[1::2, ::-1]  # snake
    >>> y = 0.2 * rows.ravel() + rng.normal(0, 0.02, 48)
    >>> x = 0.1 * cols.ravel() + rng.normal(0, 0.015, 48)
    >>> fit = infer_grid(y, x)
    >>> fit.shape, [round(s, 2) for s in fit.step], fit.order, fit.fast_axis
    ((6, 8), [0.2, 0.1], 'snake', 'x')
    """
    y = np.asarray(y, dtype=float).reshape(-1)
    x = np.asarray(x, dtype=float).reshape(-1)
    if y.shape != x.shape:
        raise ValueError(f"y has {y.size} positions, x {x.size}")
    keep = np.isfinite(y) & np.isfinite(x)
    y, x = y[keep], x[keep]
    n = y.size
    if n < 4:
        raise ValueError(f"only {n} finite positions")

    def persistence(v: np.ndarray) -> float:
        s = np.sign(np.diff(v))
        return float(np.mean((s[1:] == s[:-1]) & (s[1:] != 0)))

    py, px = persistence(y), persistence(x)
    if max(px, py) < 0.5:
        raise ValueError("neither axis keeps moving the same way from point to point (no lines)")
    fast_axis: Literal["x", "y"] = "x" if px >= py else "y"
    f, s = (x, y) if fast_axis == "x" else (y, x)
    d = np.diff(f)
    sign = np.sign(d)
    steady = np.r_[False, (sign[1:] == sign[:-1]) & (sign[1:] != 0)]
    step_f = float(np.median(np.abs(d[steady])))
    if not step_f > 0:
        raise ValueError("the fast axis does not move")
    # line breaks: between two confident moves of opposite direction, at the pair least like a
    # step along a line: no fast move (snake turn) or a fly-back (raster), and a slow jump
    confident = np.flatnonzero(np.abs(d) > 0.5 * step_f)
    reversals = [(a, b) for a, b in itertools.pairwise(confident) if sign[a] != sign[b]]
    odd_move = np.abs(np.abs(d) / step_f - 1)
    ds = np.abs(np.diff(s))

    def split(score: np.ndarray) -> list[np.ndarray]:
        breaks = sorted({int(a + np.argmax(score[a : b + 1])) for a, b in reversals})
        edges = [0, *(b + 1 for b in breaks), n]
        return [np.arange(lo, hi) for lo, hi in itertools.pairwise(edges) if hi - lo >= 2]

    lines = split(odd_move)
    if len(lines) >= 2:  # again, with the slow jump between lines as further evidence
        step_s0 = float(np.median(np.abs(np.diff([np.median(s[ln]) for ln in lines]))))
        if step_s0 > 0:
            lines = split(odd_move + ds / step_s0)
    if len(lines) < 2:
        raise ValueError("the positions form a single line; the slow step is unknown")
    centres = np.array([np.median(s[ln]) for ln in lines])
    gaps = np.abs(np.diff(centres))
    step_s0 = float(np.median(gaps))
    if not step_s0 > 0 or np.any(gaps < 0.5 * step_s0) or np.any(gaps > 1.5 * step_s0):
        odd = np.flatnonzero((gaps < 0.5 * step_s0) | (gaps > 1.5 * step_s0))[:3]
        raise ValueError(
            f"irregular line spacing: lines {', '.join(str(i) for i in odd)} are "
            f"{', '.join(f'{gaps[i]:.4g}' for i in odd)} from the next, the median is {step_s0:.4g}"
        )
    if not (np.all(np.diff(centres) > 0) or np.all(np.diff(centres) < 0)):
        raise ValueError("the lines do not advance steadily along the slow axis")
    # consecutive lines are consecutive rows (spacing checked): a straight-line fit
    n_lines = len(lines)
    slope, off_s = np.polyfit(np.arange(n_lines), centres, 1)
    step_s = abs(float(slope))
    step_f, off_f = _lattice(f, step_f)
    j = np.round((f - off_f) / step_f).astype(int)
    near = np.abs(f - off_f - j * step_f) <= 0.5 * step_f
    if np.unique(j[near]).size >= 2:  # refine: least squares over every point on a node
        step_f, off_f = (float(v) for v in np.polyfit(j[near], f[near], 1))
        j = np.round((f - off_f) / step_f).astype(int)
    hits: Counter[int] = Counter()
    for ln in lines:
        hits.update(set(j[ln].tolist()))
    nodes = sorted(c for c, h in hits.items() if h >= 0.9 * len(lines))
    if not nodes:
        raise ValueError("no fast-axis position is passed by most lines")
    j0, j1 = nodes[0], nodes[-1]
    n_nodes = j1 - j0 + 1
    direction = np.array([np.sign(np.median(np.diff(f[ln]))) for ln in lines])
    alternate = float(np.mean(direction[1:] != direction[:-1]))
    order: Literal["raster", "snake"] = "snake" if alternate > 0.5 else "raster"
    on_fast = (j >= j0) & (j <= j1) & (np.abs(f - off_f - j * step_f) <= 0.5 * step_f)
    slow_node = np.round((s - off_s) / slope)
    on_slow = (slow_node >= 0) & (slow_node < n_lines)
    on_slow &= np.abs(s - off_s - slow_node * slope) <= 0.5 * step_s
    on_grid = int(np.sum(on_fast & on_slow))
    if fast_axis == "x":
        shape, step = (n_lines, n_nodes), (step_s, step_f)
    else:
        shape, step = (n_nodes, n_lines), (step_f, step_s)
    return GridFit(shape, (float(step[0]), float(step[1])), order, fast_axis, n, on_grid)


# -- the manifest text -----------------------------------------------------------------------------
def _line(key: str, value: Any, comment: str = "") -> str:
    from spndi_dask.config._toml import toml_value

    text = f"{key} = {toml_value(value)}"
    return f"{text.ljust(43)} # {comment}" if comment else text


def _array_lines(key: str, items: list[Any], comments: list[str], head: str) -> list[str]:
    from spndi_dask.config._toml import toml_value

    lines = [f"{(key + ' = [').ljust(43)} # {head}"]
    for item, comment in zip(items, comments, strict=True):
        text = f"    {toml_value(item)},"
        lines.append(f"{text.ljust(43)} # {comment}" if comment else text)
    return [*lines, "]"]


def _template(files: list[str]) -> str | None:
    """A ``{index:0Nd}`` template that spells ``files`` in order (0, 1, ...), if there is one."""
    first = files[0]
    for m in reversed(list(re.finditer(r"\d+", first))):
        if int(m.group()) != 0:
            continue
        width = len(m.group())
        spec = f"{{index:0{width}d}}" if width > 1 else "{index}"
        template = first[: m.start()] + spec + first[m.end() :]
        if "{" in first or "}" in first:
            return None
        if all(template.format(index=i) == f for i, f in enumerate(files)):
            return template
    return None


def _toml(
    inf: _Inference,
    particles: list[_Particle],
    geometry: dict[str, tuple[Any, str]],
    reduce: dict[str, tuple[Any, str]],
    name: str,
    name_src: str,
) -> str:
    from spndi_dask._version import __version__
    from spndi_dask.config._toml import toml_value
    from spndi_dask.config.manifest import MANIFEST_VERSION

    when = datetime.date.today().isoformat()
    lines = [
        f"# Beamtime manifest written by `spndi init {inf.raw}` (spndi_dask {__version__}, "
        f"{when}).",
        "# Each value says where it came from. Check the guesses spndi init printed, then:",
        "#     spndi run <this file>",
        _line("manifest_version", MANIFEST_VERSION),
        _line("name", name, name_src),
        _line("output", inf.options.results, "results folder, relative to this file"),
        "",
        f"{'[geometry]'.ljust(43)} # every particle (a particle may override keys)",
    ]
    for key, (value, src) in geometry.items():
        lines.append(_line(key, value, src))
    if reduce:
        lines += ["", f"{'[reduce]'.ljust(43)} # other settings: defaults (README: The manifest)"]
        lines += [_line(key, value, src) for key, (value, src) in reduce.items()]
    for p in particles:
        e, c = p.entry, p.comments
        lines += ["", "[[particles]]", _line("name", p.name, p.where)]
        files = [[inf.rel(f) for f in s.files] for s in p.scans]
        singles = [f[0] for f in files if len(f) == 1]
        template = _template(singles) if len(singles) == len(files) else None
        labels = []
        for s in p.scans:
            angle = f"angle {s.angle:g}, " if s.angle is not None else ""
            labels.append(
                f"{angle}{s.n_points} points"
                + (f", {len(s.files)} files" if len(s.files) > 1 else "")
            )
        order = e.get("_order", "")
        if template:
            lines.append(_line("frames", template, f"{len(files)} scans in {order} order"))
        else:
            items = [f[0] if len(f) == 1 else f for f in files]
            lines += _array_lines("frames", items, labels, f"one entry per angle, {order} order")
        for key in ("dataset", "monitor", "xrf", "xrf_window_kev", "xrf_calibration",
                    "xrf_energy", "mask_dataset", "positions"):  # fmt: skip
            if key in e:
                lines.append(_line(key, e[key], c.get(key, "")))
        angles = e["angles_deg"]
        if isinstance(angles, list):
            rows = [angles[i : i + 6] for i in range(0, len(angles), 6)]
            lines.append(f"{'angles_deg = ['.ljust(43)} # {c['angles_deg']}")
            lines += ["    " + ", ".join(map(toml_value, row)) + "," for row in rows]
            lines.append("]")
        else:
            lines.append(_line("angles_deg", angles, c["angles_deg"]))
        lines.append(_line("scan_shape", e["scan_shape"], c["scan_shape"]))
        lines.append(_line("scan_step_um", e["scan_step_um"], "µm, [row (y), column (x)]"))
        order_note = (
            "irrelevant with positions (each frame goes to its nearest grid node)"
            if "positions" in e
            else ("--scan-order" if inf.options.scan_order else "check: raster assumed")
        )
        lines.append(_line("scan_order", e["scan_order"], order_note))
        if e.get("allow_incomplete"):
            lines.append(_line("allow_incomplete", True, c["allow_incomplete"]))
        own = {k: v for k, v in p.geometry.items() if k not in geometry}
        if own:
            lines.append("[particles.geometry]")
            lines += [_line(k, v, src) for k, (v, src) in own.items()]
    return "\n".join(lines) + "\n"


# -- the entry point -----------------------------------------------------------------------------
def init_manifest(
    raw_dir: str | os.PathLike[str],
    *,
    manifest: str | os.PathLike[str] = "beamtime.toml",
    options: InitOptions | None = None,
    force: bool = False,
) -> InitResult:
    """Inspect a folder of raw scan files and compose its beamtime manifest.

    Parameters
    ----------
    raw_dir : path
        The folder of per-angle HDF5 files or TIFF stacks (in sub-folders per particle, or
        grouped with ``options.group``).
    manifest : path
        Where the manifest will be written (paths in it are relative to its folder); nothing is
        written here: call :meth:`InitResult.write`.
    options : InitOptions, optional
        What to use instead of finding it (the flags of ``spndi init``).
    force : bool
        Allow ``manifest`` to exist already (it is replaced by :meth:`InitResult.write`).

    Returns
    -------
    InitResult
        The manifest text (validated: :func:`~spndi_dask.config.load_manifest` reads it
        unchanged), its validated :class:`~spndi_dask.config.Manifest` and the
        :class:`InitReport`.

    Raises
    ------
    InitError
        Every problem found at once: unreadable files, ambiguous or missing datasets, angles,
        scan grids and geometry, each with the flag that settles it.
    """
    from spndi_dask.config import Manifest, ManifestError

    options = options or InitOptions()
    raw = Path(raw_dir).expanduser().resolve()
    path = Path(manifest).expanduser().absolute()
    if not raw.is_dir():
        raise InitError(f"{raw_dir} is not a folder; give the folder of the raw scan files")
    if path.exists() and not force:
        raise InitError(f"{path} exists; pass --force to replace it, or -o another file name")
    inf = _Inference(raw, path.parent.resolve(), options)
    results = (path.parent / options.results).resolve()
    if options.rocking_axis is not None and options.rocking_axis not in _ROCKING_AXES:
        inf.problems.add(
            f"--rocking-axis {options.rocking_axis!r}: use one of {', '.join(_ROCKING_AXES)}"
        )
    outputs = {"raw.zarr", "results.zarr", "analysis.zarr", "logs", "report", ".tmp"}
    is_output = results.is_dir() and any((results / name).exists() for name in outputs)
    scans = _discover(raw, options, {results} if is_output else set(), inf.report)
    if not scans:
        raise InitError(
            f"{raw} holds no HDF5 ({', '.join(HDF5_SUFFIXES)}) or TIFF files of scans"
            + (" (" + "; ".join(inf.report.skipped) + ")" if inf.report.skipped else "")
        )
    frame_dirs = {f.parent.resolve() for scan in scans for f in scan.files}
    if results == raw or results in frame_dirs:
        inf.problems.add(
            f"the results folder {results} would be "
            + ("RAW_DIR itself" if results == raw else "a folder of frame files")
            + ": spndi writes and replaces raw.zarr, results.zarr, figures/ ... there; pass "
            "--results DIR (relative to the manifest), or -o a manifest elsewhere"
        )
    grouped = _assign_particles(raw, scans, options, inf.problems, inf.report)
    inf.read_files(grouped)
    particles: list[_Particle] = []
    for pname in sorted(grouped, key=_natural):
        group = grouped[pname]
        p = _Particle(pname, group[0].where, group)
        p.found = ParticleFound(pname, p.where, len(group), sum(len(s.files) for s in group))
        particles.append(p)
        inf.detector(p)  # the readable files at least: one bad file never hides another's problem
        if any(len(s.infos) != len(s.files) for s in group):  # unreadable files: listed already
            p.broken = True
        if p.broken:
            continue
        inf.frames_path = p.entry.get("dataset")
        inf.angles(p)
        inf.monitor(p)
        inf.xrf(p)
        inf.mask(p)
        inf.grid(p)
        inf.geometry(p)
        found = p.found
        found.scan_order = p.entry.get("scan_order", "")
        shape, dtype = p.entry["_detector"]
        found.detector = f"{p.entry.get('dataset', 'TIFF pages')} {_shape(shape)} {dtype}"
        for key in ("monitor", "xrf", "xrf_energy", "mask_dataset"):
            label = "mask" if key == "mask_dataset" else key
            found.datasets[label] = p.entry.get(key, "none found" if key != "xrf_energy" else "")
        if "positions" in p.entry:
            pos = p.entry["positions"]
            found.datasets["positions"] = f"{pos['y']}, {pos['x']} ({pos['units']})"
        else:
            found.datasets["positions"] = "none found"
        found.datasets = {k: v for k, v in found.datasets.items() if v}
        inf.report.particles.append(found)
    geometry = _merge_geometry(inf, particles)
    reduce = _reduce_settings(inf, particles)
    if inf.problems:
        n = len(inf.problems.lines)
        raise InitError(
            f"spndi init {raw}: {n} problem{'s' if n > 1 else ''}; nothing written:\n"
            + "\n".join(f"  - {line}" for line in inf.problems.lines)
        )
    name, name_src = _beamtime_name(raw, options)
    text = _toml(inf, particles, geometry, reduce, name, name_src)
    try:
        data = tomllib.loads(text)
        validated = Manifest.from_dict(data, base_dir=path.parent, source=str(path))
    except (tomllib.TOMLDecodeError, ManifestError) as exc:
        raise InitError(f"the manifest spndi init composed is not valid:\n{exc}") from None
    inf.report.geometry = {k: f"{v}  ({src})" for k, (v, src) in geometry.items()}
    logger.debug(
        "%s: %d particles, %d scans", raw, len(particles), sum(len(p.scans) for p in particles)
    )
    return InitResult(text, path, inf.report, validated)


def _reduce_settings(inf: _Inference, particles: list[_Particle]) -> dict[str, tuple[Any, str]]:
    """``[reduce]``: the detector's saturation level, from ``--saturation`` or the files."""
    if inf.options.saturation is not None:
        return {"saturation": (float(inf.options.saturation), "--saturation")}
    recorded = {p.name: p.entry["_saturation"] for p in particles if "_saturation" in p.entry}
    values = {v for v, _ in recorded.values()}
    if len(values) == 1 and len(recorded) == len(particles):
        value, src = next(iter(recorded.values()))
        return {"saturation": (float(value), f"counts at which pixels saturate: {src}")}
    if recorded:
        listing = ", ".join(f"{name} {v:g}" for name, (v, _) in recorded.items())
        inf.guess(
            f"the recorded saturation level is not the same for every particle ({listing}); "
            "[reduce] saturation left at its default (the dtype maximum): --saturation COUNTS"
        )
    return {}


def _beamtime_name(raw: Path, options: InitOptions) -> tuple[str, str]:
    if options.name:
        return options.name, "--name"
    folder = raw.parent if raw.name.lower() in _GENERIC_DIRS and raw.parent != raw else raw
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", folder.name).strip("_") or "beamtime"
    return name, f"the folder name {folder.name!r} (--name)"


def _merge_geometry(inf: _Inference, particles: list[_Particle]) -> dict[str, tuple[Any, str]]:
    """``[geometry]``: the flags, else values every particle's metadata agrees on.

    A value that differs between particles stays in their ``[particles.geometry]``; a key found
    nowhere is a problem naming its flag.
    """
    opt = inf.options
    flags: dict[str, tuple[Any, str]] = {}
    for key, value, flag in (
        ("energy_kev", opt.energy_kev, "--energy-kev"),
        ("detector_distance_m", opt.distance_m, "--distance-m"),
        ("pixel_size_m", opt.pixel_size_m, "--pixel-size-m"),
        ("beam_center", list(opt.beam_center) if opt.beam_center else None, "--beam-center"),
        ("gamma_deg", opt.gamma_deg, "--gamma-deg"),
        ("delta_deg", opt.delta_deg, "--delta-deg"),
    ):
        if value is not None:
            flags[key] = (value, flag)
    live = [p for p in particles if not p.broken]
    geometry: dict[str, tuple[Any, str]] = {}
    missing = []
    for key, flag in (
        ("energy_kev", "--energy-kev KEV"),
        ("detector_distance_m", "--distance-m M"),
        ("pixel_size_m", "--pixel-size-m M"),
        ("beam_center", "--beam-center ROW,COL"),
        ("gamma_deg", "--gamma-deg DEG"),
        ("delta_deg", "--delta-deg DEG"),
    ):
        if key in flags:
            geometry[key] = flags[key]
            recorded = {p.name: p.geometry[key] for p in live if key in p.geometry}
            for pname, (value, src) in recorded.items():
                if not np.allclose(value, flags[key][0], rtol=1e-3):
                    inf.guess(
                        f"{flags[key][1]} {flags[key][0]} differs from {value} {src[9:]} of "
                        f"particle '{pname}'; the flag wins"
                    )
            for p in live:
                p.geometry.pop(key, None)
            continue
        values = [p.geometry.get(key) for p in live]
        if live and all(v is not None for v in values):
            first = values[0]
            if all(np.allclose(v[0], first[0], rtol=1e-4) for v in values):  # type: ignore[index]
                geometry[key] = first  # type: ignore[assignment]
                for p in live:
                    p.geometry.pop(key, None)
            continue  # else: per particle
        if any(v is not None for v in values):
            lacking = [p.name for p, v in zip(live, values, strict=True) if v is None]
            missing.append(f"{flag} (not recorded for {', '.join(lacking)})")
        elif live:
            missing.append(flag)
    if missing:
        inf.problems.add(
            "geometry not recorded in the files (looked for NeXus-style <detector>/x_pixel_size, "
            "distance, beam_center_x/y, monochromator/energy and attributes like energy_kev): "
            f"pass {', '.join(missing)} (gamma = detector arm yaw about +y, delta = elevation "
            "about -x, 0 0 for a detector on the beam axis; README: Geometry)"
        )
    axis = opt.rocking_axis or "y+"
    geometry["rocking_axis"] = (
        axis,
        "--rocking-axis" if opt.rocking_axis else "default: sample rotation axis (--rocking-axis)",
    )
    if not opt.rocking_axis and live:
        inf.guess(
            "rocking axis y+ (vertical, the default): pass --rocking-axis if the sample rocks "
            "about another lab axis"
        )
    return geometry
