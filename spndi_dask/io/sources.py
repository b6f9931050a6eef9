"""Readers for raw detector files (HDF5 beamline files, TIFF stacks): metadata and point ranges.

Pure I/O helpers with no dask: :func:`probe_source` inspects the frame file(s) of one angle
(shape, dtype, datasets present), :func:`read_points` reads a range of scan points and
:func:`read_per_point` a per-point dataset (monitor, XRF, recorded positions). Every failure is an
:class:`SourceError` that names the file and says what to do.

An angle's source is one file or several (a scan split across files): their frames are
concatenated in the order given. A frames dataset is ``(n_points, det_rows, det_cols)`` or has the
scan's axes first, e.g. ``(rows, cols, det_rows, det_cols)``; its points are taken in row-major
order. :func:`read_points` reads only the hyperslabs a range of points covers, across files.

Examples
--------
>>> import tempfile, h5py
>>> folder = Path(tempfile.mkdtemp())
>>> frames = np.arange(6 * 4, dtype=np.uint16).reshape(6, 2, 2)
>>> with h5py.File(folder / "a.h5", "w") as f:
...     _ = f.create_dataset("data", data=frames[:4].reshape(2, 2, 2, 2))  # (rows, cols, r, c)
>>> with h5py.File(folder / "b.h5", "w") as f:
...     _ = f.create_dataset("data", data=frames[4:])
>>> info = probe_source([folder / "a.h5", folder / "b.h5"], "data")
>>> info.n_points, [part.scan_axes for part in info.parts]
(6, [(2, 2), (2,)])
>>> np.array_equal(read_points(info, "data", 1, 5), frames[1:5])  # across both files
True
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import hdf5plugin  # noqa: F401  (registers bitshuffle/LZ4/Blosc/... filters)
import numpy as np
import tifffile

from spndi_dask.stages import StageError

__all__ = [
    "SourceError",
    "SourceInfo",
    "SourcePart",
    "XrfSource",
    "is_tiff",
    "list_hdf5_datasets",
    "probe_source",
    "probe_xrf",
    "read_detector_image",
    "read_per_point",
    "read_pixel_mask",
    "read_points",
    "read_vector",
    "read_xrf",
]


class SourceError(StageError, ValueError):
    """A raw input file is missing, unreadable or inconsistent; the message names it."""


@dataclass(frozen=True)
class SourcePart:
    """One frame file of an angle: its scan points and file stamp."""

    path: str
    n_points: int
    #: the leading (scan) axes of its frames: ``(n,)``, or e.g. ``(rows, cols)``
    scan_axes: tuple[int, ...]
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class SourceInfo:
    """What the frame file(s) of one angle hold: the parts' frames concatenated in order."""

    parts: tuple[SourcePart, ...]
    detector_shape: tuple[int, int]
    dtype: str

    @property
    def path(self) -> str:
        """The (first) file."""
        return self.parts[0].path

    @property
    def paths(self) -> list[str]:
        """Every file, in order."""
        return [part.path for part in self.parts]

    @property
    def n_points(self) -> int:
        """Scan points of all parts together."""
        return sum(part.n_points for part in self.parts)

    @property
    def size(self) -> int:
        """Bytes of all parts together."""
        return sum(part.size for part in self.parts)

    @property
    def mtime_ns(self) -> int:
        """Latest modification time of the parts."""
        return max(part.mtime_ns for part in self.parts)

    @property
    def stamp(self) -> tuple[Any, ...]:
        """Size and modification time: ``(size, mtime_ns)`` of a single file, else one such
        pair per part (what tells ingest that an angle's files are unchanged)."""
        if len(self.parts) == 1:
            return (self.size, self.mtime_ns)
        return tuple((part.size, part.mtime_ns) for part in self.parts)

    def describe(self) -> str:
        """The file, or the files joined by ' + ' (for messages)."""
        return " + ".join(self.paths)


def is_tiff(path: str | Path) -> bool:
    """True for ``.tif``/``.tiff`` files (a TIFF stack: one page per scan point)."""
    return str(path).lower().endswith((".tif", ".tiff"))


def list_hdf5_datasets(path: str | Path) -> list[str]:
    """Paths of every dataset in an HDF5 file, with shapes, e.g. ``'/entry/data (10, 4, 4)'``."""
    found: list[str] = []
    with h5py.File(path, "r") as f:
        f.visititems(
            lambda name, obj: (
                found.append(f"/{name} {obj.shape}") if isinstance(obj, h5py.Dataset) else None
            )
        )
    return found


def _open_error(path: str | Path, exc: Exception) -> SourceError:
    return SourceError(
        f"{path} cannot be read as HDF5 ({exc}); the file is truncated or corrupt: copy it "
        "again from the beamline, or remove the angle from the manifest"
    )


def _dataset(f: Any, path: str | Path, name: str, what: str) -> Any:
    if name not in f:
        existing = []
        f.visititems(
            lambda n, o: existing.append(f"/{n} {o.shape}") if hasattr(o, "shape") else None
        )
        listing = "\n    ".join(existing) or "(none)"
        raise SourceError(
            f"{path} has no dataset {name!r} ({what}); set the manifest key to one of the "
            f"datasets that exist:\n    {listing}"
        )
    return f[name]


def probe_source(paths: str | Path | Sequence[str | Path], dataset: str) -> SourceInfo:
    """Inspect the frame file(s) of one angle without reading their frames.

    Parameters
    ----------
    paths : path or list of paths
        One file, or the files of a scan split across several (frames concatenated in order).
    dataset : str
        HDF5 dataset of the frames: ``(n_points, det_rows, det_cols)``, or with any number of
        scan axes first (e.g. ``(rows, cols, det_rows, det_cols)``). Unused for TIFF stacks.

    Raises
    ------
    SourceError
        Missing file, unreadable file, missing dataset, a dataset with fewer than 3 axes, or
        parts whose detector shape or dtype differ.
    """
    if isinstance(paths, str | Path):
        paths = [paths]
    parts: list[SourcePart] = []
    first: tuple[str, tuple[int, int], str] | None = None
    for path in paths:
        part, shape, dtype = _probe_part(Path(path), dataset)
        if first is None:
            first = (part.path, shape, dtype)
        elif (shape, dtype) != first[1:]:
            raise SourceError(
                f"{part.path} (part {len(parts) + 1} of the angle's {len(paths)} files) has "
                f"frames {shape} {dtype}, but {first[0]} (part 1) has {first[1]} {first[2]}: the "
                "files of one angle must hold one scan with one detector setting; list only that "
                "scan's files in `frames`"
            )
        parts.append(part)
    if first is None:
        raise SourceError("no frame file given for the angle; list its file(s) in `frames`")
    return SourceInfo(tuple(parts), first[1], first[2])


def _probe_part(path: Path, dataset: str) -> tuple[SourcePart, tuple[int, int], str]:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise SourceError(f"{path} does not exist") from None
    if is_tiff(path):
        try:
            with tifffile.TiffFile(path) as tf:
                pages = len(tf.pages)
                page = tf.pages[0]
                shape, dtype = tuple(page.shape), str(page.dtype)
        except Exception as exc:  # tifffile raises many kinds
            raise SourceError(
                f"{path} cannot be read as TIFF ({exc}); copy it again or remove the angle"
            ) from None
        if len(shape) != 2:
            raise SourceError(f"{path}: TIFF pages have shape {shape}; expected 2-D frames")
        return SourcePart(str(path), pages, (pages,), st.st_size, st.st_mtime_ns), shape, dtype
    try:
        with h5py.File(path, "r") as f:
            d = _dataset(f, path, dataset, "frames")
            if d.ndim < 3:
                raise SourceError(
                    f"{path}:{dataset} has shape {d.shape}; expected (n_points, det_rows, "
                    "det_cols) or the scan's axes first, e.g. (rows, cols, det_rows, det_cols): "
                    "set `dataset` to the frame stack"
                )
            axes = tuple(int(n) for n in d.shape[:-2])
            part = SourcePart(str(path), math.prod(axes), axes, st.st_size, st.st_mtime_ns)
            return part, tuple(int(n) for n in d.shape[-2:]), str(d.dtype)
    except SourceError:
        raise
    except OSError as exc:
        raise _open_error(path, exc) from None


def _runs(axes: tuple[int, ...], start: int, stop: int) -> Iterator[tuple[Any, ...]]:
    """Hyperslabs (index tuples over ``axes``) whose row-major concatenation is the flat point
    range ``start:stop``: a partial first row, whole rows, a partial last row (recursively).

    >>> list(_runs((3, 4), 2, 11))
    [(0, slice(2, 4, None)), (slice(1, 2, None),), (2, slice(0, 3, None))]
    """
    if start >= stop:
        return
    if len(axes) == 1:
        yield (slice(start, stop),)
        return
    inner = math.prod(axes[1:])
    i0, r0 = divmod(start, inner)
    i1, r1 = divmod(stop, inner)
    if i0 == i1:
        yield from ((i0, *run) for run in _runs(axes[1:], r0, r1))
        return
    if r0:
        yield from ((i0, *run) for run in _runs(axes[1:], r0, inner))
        i0 += 1
    if i1 > i0:
        yield (slice(i0, i1),)
    if r1:
        yield from ((i1, *run) for run in _runs(axes[1:], 0, r1))


def read_points(source: SourceInfo | str | Path, dataset: str, start: int, stop: int) -> np.ndarray:
    """Frames of scan points ``start:stop`` (of all parts together) as ``(n, det_rows, det_cols)``.

    Only those points are read: per file the hyperslabs of its frames dataset that the range
    covers (rows of a dataset with scan axes first are read whole only where the range covers
    them whole). ``source`` is a :class:`SourceInfo` (from :func:`probe_source`) or one file.
    """
    if not isinstance(source, SourceInfo):
        source = probe_source(source, dataset)
    if len(source.parts) == 1 and len(source.parts[0].scan_axes) == 1:
        return _read_part(source.parts[0], dataset, start, stop, None)  # one hyperslab
    out = np.empty((max(stop - start, 0), *source.detector_shape), dtype=source.dtype)
    offset = 0
    for part in source.parts:
        lo, hi = max(start - offset, 0), min(stop - offset, part.n_points)
        if hi > lo:
            _read_part(part, dataset, lo, hi, out[offset + lo - start : offset + hi - start])
        offset += part.n_points
    return out


def _read_part(
    part: SourcePart, dataset: str, start: int, stop: int, out: np.ndarray | None
) -> np.ndarray:
    """Points ``start:stop`` of one file, into ``out`` (contiguous) when given."""
    path = part.path
    try:
        if is_tiff(path):
            frames = tifffile.imread(path, key=range(start, stop))
            frames = frames.reshape(stop - start, *frames.shape[-2:])
            if out is None:
                return frames
            out[...] = frames
            return out
        with h5py.File(path, "r") as f:
            d = f[dataset]
            if out is None:
                return d[start:stop]
            done = 0
            for run in _runs(part.scan_axes, start, stop):
                shape = _run_shape(run, part.scan_axes)
                n = math.prod(shape)
                d.read_direct(out[done : done + n].reshape(*shape, *d.shape[-2:]), run)
                done += n
            return out
    except OSError as exc:
        raise SourceError(
            f"{path}: reading scan points {start}-{stop - 1} of {dataset} failed ({exc}); the "
            "file is truncated or corrupt: copy it again from the beamline"
        ) from None


def _run_shape(run: tuple[Any, ...], axes: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of the scan axes a hyperslab of :func:`_runs` selects."""
    shape = [
        len(range(*i.indices(n))) for i, n in zip(run, axes, strict=False) if isinstance(i, slice)
    ]
    return (*shape, *axes[len(run) :])


def read_per_point(
    source: SourceInfo, dataset: str, what: str, *, key: str, exact: bool = False
) -> np.ndarray:
    """A per-point dataset (monitor, XRF, a recorded position) of every part, concatenated.

    Each part's values (flattened row-major, float64) are cut to its number of frames, so the
    result has one value per scan point of the angle. ``key`` is the manifest key that names the
    dataset (for the fix in messages).

    Raises
    ------
    SourceError
        A part lacks the dataset, or holds fewer values than frames (more, with ``exact``).
    """
    values = []
    for part in source.parts:
        vec = read_vector(part.path, dataset, what)
        if vec.size < part.n_points or (exact and vec.size != part.n_points):
            fix = (
                "each frame needs its recorded position: export the positions with the frames, "
                f"or remove `{key}` to place the frames in scan_order"
                if exact
                else f"fix the file or remove `{key}`"
            )
            raise SourceError(
                f"{part.path}:{dataset} ({what}) has {vec.size} values for {part.n_points} "
                f"frames; {fix}"
            )
        values.append(vec[: part.n_points])
    return np.concatenate(values)


def read_vector(path: str | Path, dataset: str, what: str) -> np.ndarray:
    """A 1-D per-point dataset (monitor, XRF) as float64."""
    try:
        with h5py.File(path, "r") as f:
            d = _dataset(f, path, dataset, what)
            out = np.asarray(d[()], dtype=np.float64).reshape(-1)
    except SourceError:
        raise
    except OSError as exc:
        raise _open_error(path, exc) from None
    return out


def read_detector_image(
    path: str | Path, *, what: str, shape: tuple[int, int], dataset: str | None = None
) -> np.ndarray:
    """A detector-sized image (mask, flat field) or the mean of a stack of frames (dark).

    ``.npy``, TIFF, or HDF5 (``dataset``, else the only 2-D/3-D dataset in the file). A stack
    ``(n, rows, cols)`` is averaged over its first axis. The shape must match the detector.
    """
    path = Path(path)
    if not path.exists():
        raise SourceError(f"{what} file {path} does not exist; fix the path in the manifest")
    try:
        if path.suffix == ".npy":
            image = np.load(path, allow_pickle=False)
        elif is_tiff(path):
            image = tifffile.imread(path)
        else:
            with h5py.File(path, "r") as f:
                if dataset is None or dataset not in f:
                    names = [n for n in list_hdf5_datasets(path) if f[n].ndim in (2, 3)]
                    if dataset is None and len(names) == 1:
                        dataset = names[0]
                    else:
                        raise SourceError(
                            f"{what} file {path} has no dataset {dataset!r} (it has "
                            f"{names or 'no image datasets'}); store the {what} there"
                        )
                image = f[dataset][()]
    except (OSError, ValueError) as exc:
        raise _open_error(path, exc) from None
    image = np.asarray(image, dtype=np.float64)
    if image.ndim == 3:
        image = image.mean(axis=0)
    if image.shape != tuple(shape):
        raise SourceError(
            f"{what} file {path} has shape {list(image.shape)} but the detector frames are "
            f"{list(shape)}; use a {what} made for this detector"
        )
    return image


# -- detector pixel mask inside the frame files -----------------------------------------------
def _pixel_mask(f: Any, path: str | Path, dataset: str, shape: tuple[int, int]) -> Any:
    """The mask dataset of an open frame file, its shape checked against the detector's."""
    d = _dataset(f, path, dataset, "mask_dataset")
    dims = tuple(d.shape)
    if len(dims) == 3 and dims[0] == 1:
        dims = dims[1:]
    if dims != tuple(shape):
        raise SourceError(
            f"{path}:{dataset} (mask_dataset) has shape {list(d.shape)} but the detector frames "
            f"are {list(shape)}; set mask_dataset to this detector's pixel mask (one value per "
            "pixel), or remove it"
        )
    return d


def read_pixel_mask(
    path: str | Path, dataset: str, shape: tuple[int, int], *, check_only: bool = False
) -> np.ndarray | None:
    """The detector pixel mask stored in a frame file (manifest ``mask_dataset``), as bool.

    Nonzero values are bad pixels (as the bit-coded ``pixel_mask`` of Eiger and Pilatus files:
    gap, dead, noisy, ... bits). A leading axis of length 1 is dropped. ``check_only``: check
    the dataset and its shape without reading it (returns None).

    Raises
    ------
    SourceError
        A TIFF frame file (no datasets), no such dataset (the existing ones are listed), or a
        mask whose shape is not the detector's.
    """
    if is_tiff(path):
        raise SourceError(
            f"{path} is a TIFF stack, which holds no mask_dataset {dataset!r}; give the pixel "
            "mask as a file in [reduce] detector_mask instead, and remove mask_dataset"
        )
    try:
        with h5py.File(path, "r") as f:
            d = _pixel_mask(f, path, dataset, shape)
            if check_only:
                return None
            mask = np.asarray(d[()]).reshape(shape)
    except SourceError:
        raise
    except OSError as exc:
        raise _open_error(path, exc) from None
    return mask != 0


# -- fluorescence: a per-point map, or spectra summed over channels and an energy window ------
@dataclass(frozen=True)
class XrfSource:
    """Where and how the per-point fluorescence is read from an angle file.

    ``window_kev = None``: ``dataset`` is a per-point map (any shape, read in row-major order).
    Otherwise it holds spectra ``(n_points, energy_bins)`` or ``(n_points, channels,
    energy_bins)`` (several detector elements), and a point's value is the sum over channels of
    the bins whose energy lies inside ``window_kev``: the energy of bin ``i`` is ``offset_kev +
    gain_kev · i`` (its centre), or ``energy_dataset[i]`` (keV).

    Bins are counted whole: a bin counts when its centre energy lies inside the window (both
    ends included), never in part. A spectrum's counts cannot be split within a bin, and an
    emission-line window is wide (about 10 bins of an SDD at least), so weighting the two edge
    bins by their overlap would change the sum by less than its counting noise while suggesting
    a precision the spectrum does not have; this is also how beamline ROIs count.

    Examples
    --------
    >>> XrfSource("/xrf/Co_K").is_map, XrfSource("/xrf/mca", (6.8, 7.1), gain_kev=0.01).is_map
    (True, False)
    """

    dataset: str
    window_kev: tuple[float, float] | None = None
    offset_kev: float = 0.0
    gain_kev: float | None = None
    energy_dataset: str | None = None

    @property
    def is_map(self) -> bool:
        """True when the dataset is a per-point map (no energy window)."""
        return self.window_kev is None

    def describe(self) -> dict[str, Any]:
        """JSON-ready description (provenance and ingest's settings key)."""
        return {
            "dataset": self.dataset,
            "window_kev": None if self.window_kev is None else list(self.window_kev),
            "offset_kev": self.offset_kev,
            "gain_kev": self.gain_kev,
            "energy_dataset": self.energy_dataset,
        }


#: Bytes of spectra read at a time (a few scan rows of a 4-element 4096-bin SDD).
XRF_CHUNK_BYTES = 32 * 2**20


def _bin_energies(
    f: Any, path: str | Path, xrf: XrfSource, n_bins: int
) -> tuple[np.ndarray, float]:
    """Energy (keV) of every bin and half a bin's width."""
    if xrf.energy_dataset is None:
        if xrf.gain_kev is None:
            raise SourceError(
                f"{path}:{xrf.dataset}: the spectra need their bins' energies; give "
                "xrf_calibration = { offset_kev, gain_kev } or xrf_energy"
            )
        return xrf.offset_kev + xrf.gain_kev * np.arange(n_bins), xrf.gain_kev / 2
    d = _dataset(f, path, xrf.energy_dataset, "xrf_energy")
    energies = np.asarray(d[()], dtype=np.float64).reshape(-1)
    if energies.size != n_bins:
        raise SourceError(
            f"{path}:{xrf.energy_dataset} (xrf_energy) has {energies.size} energies but the "
            f"spectra {xrf.dataset} have {n_bins} bins (their last axis); set xrf_energy to the "
            "dataset of the bins' energies, or use xrf_calibration = { offset_kev, gain_kev }"
        )
    if not np.isfinite(energies).all():
        raise SourceError(
            f"{path}:{xrf.energy_dataset} (xrf_energy) has NaN or infinite energies; fix the "
            "file or use xrf_calibration = { offset_kev, gain_kev }"
        )
    half = float(np.median(np.abs(np.diff(energies)))) / 2 if n_bins > 1 else 0.0
    return energies, half


def _window_bins(f: Any, path: str | Path, xrf: XrfSource, n_bins: int) -> np.ndarray:
    """Indices of the bins whose centre lies inside the window (at least one)."""
    energies, half = _bin_energies(f, path, xrf, n_bins)
    low, high = xrf.window_kev
    e_lo, e_hi = float(energies.min()) - half, float(energies.max()) + half
    source = (
        f"xrf_energy {xrf.energy_dataset}"
        if xrf.energy_dataset
        else f"xrf_calibration offset {xrf.offset_kev:g} + {xrf.gain_kev:g} keV × bin"
    )
    if low < e_lo or high > e_hi:
        raise SourceError(
            f"xrf_window_kev = [{low:g}, {high:g}] reaches beyond the energy range "
            f"{e_lo:.4g}–{e_hi:.4g} keV of the spectra {path}:{xrf.dataset} ({n_bins} bins, "
            f"{source}); set a window inside that range, or correct the calibration"
        )
    tol = 1e-6 * max(half, 1e-9)  # a centre on an end counts, whatever its rounding
    inside = np.flatnonzero((energies >= low - tol) & (energies <= high + tol))
    if not inside.size:
        raise SourceError(
            f"xrf_window_kev = [{low:g}, {high:g}] holds no bin centre of the spectra "
            f"{path}:{xrf.dataset} ({source}); widen the window to at least one bin "
            f"({2 * half:.4g} keV)"
        )
    return inside


def _xrf_layout(f: Any, path: str | Path, xrf: XrfSource) -> tuple[Any, np.ndarray | None]:
    """The fluorescence dataset and, for spectra, the bins of the window (checked)."""
    d = _dataset(f, path, xrf.dataset, "xrf")
    if xrf.is_map:
        return d, None
    if d.ndim not in (2, 3):
        raise SourceError(
            f"{path}:{xrf.dataset} (xrf) has shape {d.shape}; with xrf_window_kev it must hold "
            "spectra (n_points, energy_bins) or (n_points, channels, energy_bins); for a "
            "per-point map remove xrf_window_kev and xrf_calibration/xrf_energy"
        )
    return d, _window_bins(f, path, xrf, int(d.shape[-1]))


def probe_xrf(path: str | Path, xrf: XrfSource, *, n_frames: int | None = None) -> int:
    """Check the fluorescence dataset of an angle file; the number of points it holds.

    Reads no spectra (only their shape and, with ``energy_dataset``, the bins' energies).

    Parameters
    ----------
    path : path
        The angle file.
    xrf : XrfSource
    n_frames : int, optional
        Frames of the file: a map dataset shaped ``(n_frames, k)`` with ``k > 1`` is refused as
        spectra given without an energy window.

    Raises
    ------
    SourceError
        Missing datasets, spectra of the wrong rank, an energy dataset whose length is not the
        number of bins, a window outside the spectra's energy range or holding no bin.
    """
    try:
        with h5py.File(path, "r") as f:
            d, _ = _xrf_layout(f, path, xrf)
            if xrf.is_map:
                if d.ndim >= 2 and n_frames is not None and d.shape[0] == n_frames < d.size:
                    raise SourceError(
                        f"{path}:{xrf.dataset} (xrf) has shape {d.shape}: spectra of "
                        f"{n_frames} points, not one value per point; set xrf_window_kev = "
                        "[low, high] (keV, the emission line) and xrf_calibration = "
                        "{ offset_kev, gain_kev } or xrf_energy"
                    )
                return int(d.size)
            return int(d.shape[0])
    except SourceError:
        raise
    except OSError as exc:
        raise _open_error(path, exc) from None


def read_xrf(
    path: str | Path,
    xrf: XrfSource,
    *,
    stop: int | None = None,
    chunk_bytes: int = XRF_CHUNK_BYTES,
) -> np.ndarray:
    """Per-point fluorescence of an angle file as float64 ``(n_points,)``.

    A map is read as it is (flattened). Spectra are read ``chunk_bytes`` at a time (only the
    bins of the window), each point's bins inside the window summed over its channels (see
    :class:`XrfSource` for which bins count).

    Parameters
    ----------
    path : path
    xrf : XrfSource
    stop : int, optional
        Read the first ``stop`` points only.
    chunk_bytes : int
        Bytes of spectra read at a time (never the whole dataset at once).

    Examples
    --------
    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "a.h5"
    >>> with h5py.File(path, "w") as f:  # 2 points, 2 channels, 4 bins at 1, 2, 3, 4 keV
    ...     _ = f.create_dataset("mca", data=np.arange(16).reshape(2, 2, 4))
    >>> read_xrf(path, XrfSource("mca", (1.9, 3.0), offset_kev=1.0, gain_kev=1.0)).tolist()
    [14.0, 46.0]
    """
    try:
        with h5py.File(path, "r") as f:
            d, bins = _xrf_layout(f, path, xrf)
            if bins is None:
                out = np.asarray(d[()], dtype=np.float64).reshape(-1)
                return out if stop is None else out[:stop]
            n = int(d.shape[0]) if stop is None else min(int(stop), int(d.shape[0]))
            lo, hi = int(bins[0]), int(bins[-1]) + 1
            keep = bins - lo  # bins of the window within the slice read
            width = hi - lo
            per_point = max(1, int(np.prod(d.shape[1:-1], dtype=np.int64)) * width)
            step = max(1, chunk_bytes // (per_point * d.dtype.itemsize))
            if d.chunks and d.chunks[0] <= step:  # whole HDF5 chunks along the points
                step = step // d.chunks[0] * d.chunks[0]
            out = np.empty(n, dtype=np.float64)
            inner = (slice(None),) * (d.ndim - 2)
            for start in range(0, n, step):
                block = np.asarray(d[(slice(start, min(start + step, n)), *inner, slice(lo, hi))])
                if keep.size != width:
                    block = block[..., keep]
                axes = tuple(range(1, block.ndim))
                out[start : start + len(block)] = block.sum(axis=axes, dtype=np.float64)
            return out
    except SourceError:
        raise
    except OSError as exc:
        raise _open_error(path, exc) from None
