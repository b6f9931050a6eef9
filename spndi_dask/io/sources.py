"""Readers for raw detector files (HDF5 beamline files, TIFF stacks): metadata and point ranges.

Pure I/O helpers with no dask: :func:`probe_source` inspects one angle file (shape, dtype,
datasets present) and :func:`read_points` reads a range of scan points. Every failure is an
:class:`SourceError` that names the file and says what to do.
"""

from __future__ import annotations

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
    "is_tiff",
    "list_hdf5_datasets",
    "probe_source",
    "read_detector_image",
    "read_points",
    "read_vector",
]


class SourceError(StageError, ValueError):
    """A raw input file is missing, unreadable or inconsistent; the message names it."""


@dataclass(frozen=True)
class SourceInfo:
    """What one angle file holds."""

    path: str
    n_points: int
    detector_shape: tuple[int, int]
    dtype: str
    size: int
    mtime_ns: int


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


def probe_source(path: str | Path, dataset: str) -> SourceInfo:
    """Inspect one angle file without reading its frames.

    Raises
    ------
    SourceError
        Missing file, unreadable file, missing dataset, or a dataset that is not 3-D.
    """
    path = Path(path)
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
        return SourceInfo(str(path), pages, shape, dtype, st.st_size, st.st_mtime_ns)
    try:
        with h5py.File(path, "r") as f:
            d = _dataset(f, path, dataset, "frames")
            if d.ndim != 3:
                raise SourceError(
                    f"{path}:{dataset} has shape {d.shape}; expected (n_points, det_rows, "
                    "det_cols): set `dataset` to the frame stack"
                )
            return SourceInfo(
                str(path),
                int(d.shape[0]),
                tuple(d.shape[1:]),
                str(d.dtype),
                st.st_size,
                st.st_mtime_ns,
            )
    except SourceError:
        raise
    except OSError as exc:
        raise _open_error(path, exc) from None


def read_points(path: str | Path, dataset: str, start: int, stop: int) -> np.ndarray:
    """Frames of scan points ``start:stop`` as ``(n, det_rows, det_cols)``."""
    try:
        if is_tiff(path):
            out = tifffile.imread(path, key=range(start, stop))
            return out.reshape(stop - start, *out.shape[-2:])
        with h5py.File(path, "r") as f:
            return f[dataset][start:stop]
    except OSError as exc:
        raise SourceError(
            f"{path}: reading scan points {start}-{stop - 1} of {dataset} failed ({exc}); the "
            "file is truncated or corrupt: copy it again from the beamline"
        ) from None


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
