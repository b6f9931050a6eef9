"""Finding the angle files of a folder (split files, scans) and reading their layouts."""

from __future__ import annotations

import fnmatch
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from spndi_dask.init.names import _matches
from spndi_dask.init.options import InitOptions
from spndi_dask.init.report import InitReport, ScanFound

HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf", ".nxs", ".nx5", ".cxi")
TIFF_SUFFIXES = (".tif", ".tiff")
#: a folder named like this holding several files is one angle file split across them
SPLIT_DIR = re.compile(r"(?i)^(?:scan)?[_-]?\d+$")
#: files named like this are the parts of one angle file (their folder is the angle file)
PART_FILE = re.compile(r"(?i)^(?:data|part|chunk|frames?)[_-]?\d+$")
#: files named like this are not angle files
NOT_A_SCAN = re.compile(
    r"(?i)(?:^|[_.-])(?:darks?|flats?|flatfield|mask|background|bkg)(?:$|[_.-]|\d)"
)
#: the named group of ``--group`` that names the scan (``particle``: its old name)
GROUP_NAMES = ("scan", "particle")
_GENERIC_DIRS = {"raw", "data", "rawdata", "raw_data", "frames", "scans", "h5", "hdf5", "tiff"}


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
    """One angle file: a file, or a folder of files holding one rocking angle split in parts."""

    name: str
    rel: str  # relative to RAW_DIR
    files: list[Path]
    label: str = ""  # as shown in messages: raw/p1/scan_1.h5, raw/p2/scan_7/
    scan_name: str = ""  # the name of its [[scans]] entry
    where: str = ""
    infos: list[_File] = field(default_factory=list)
    id: int | None = None
    angle: float | None = None
    n_points: int = 0
    scan_dims: tuple[int, int] | None = None  # from a 4-D dataset


@dataclass
class _Particle:
    """One ``[[scans]]`` entry: its angle files and what was inferred."""

    name: str
    where: str
    scans: list[_Scan]
    entry: dict[str, Any] = field(default_factory=dict)  # manifest keys
    comments: dict[str, str] = field(default_factory=dict)  # manifest key -> source
    geometry: dict[str, tuple[Any, str]] = field(default_factory=dict)
    found: ScanFound | None = None
    broken: bool = False


class _Problems:
    """Every problem found, in order; one bad file or scan never hides the others."""

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
    """Every angle file under ``raw`` (a file, or a folder of one angle's parts), unsorted."""
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
                    f"{rel} (named like a dark/flat/mask file, not an angle file: set dark or "
                    "mask in the manifest yourself if it is one)"
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


def _assign_scans(
    raw: Path, scans: list[_Scan], options: InitOptions, problems: _Problems, report: InitReport
) -> dict[str, list[_Scan]]:
    """Angle files by scan name: their folder, or the ``scan`` group of ``--group``.

    The group may also be named ``particle`` (its old name).
    """
    by_scan: dict[str, list[_Scan]] = {}
    wheres: dict[str, set[str]] = {}
    pattern = None
    if options.group:
        try:
            pattern = re.compile(options.group)
        except re.error as exc:
            problems.add(f"--group {options.group!r} is not a regular expression ({exc})")
            return {}
        key = next((k for k in GROUP_NAMES if k in pattern.groupindex), None)
        if key is None:
            problems.add(
                f"--group {options.group!r} has no named group 'scan': write it as e.g. "
                r"'(?P<scan>p\d+)_scan'"
            )
            return {}
    unmatched = []
    for scan in scans:
        if pattern is not None:
            m = pattern.search(scan.rel)
            if not m or not m.group(key):
                unmatched.append(scan.rel)
                continue
            label, where = m.group(key), f"--group match {m.group(key)!r}"
        else:
            folder = Path(scan.rel).parent  # of the file, or of the folder of a split scan
            if folder == Path("."):
                label, where = raw.name, f"{raw.name}/"
            else:
                label, where = "_".join(folder.parts), f"{raw.name}/{folder.as_posix()}/"
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", label).lstrip("_.-") or "p"
        scan.scan_name, scan.where = name, where
        by_scan.setdefault(name, []).append(scan)
        wheres.setdefault(name, set()).add(where)
    if unmatched:
        shown = ", ".join(unmatched[:5]) + (
            f" and {len(unmatched) - 5} more" if len(unmatched) > 5 else ""
        )
        report.skipped.append(f"{len(unmatched)} angle files not matched by --group: {shown}")
    for name, places in wheres.items():
        if len(places) > 1 and pattern is None:
            problems.add(
                f"scan name {name!r} stands for several folders ({', '.join(sorted(places))}); "
                "rename a folder, or pass --group REGEX with a named group 'scan'"
            )
    return by_scan
