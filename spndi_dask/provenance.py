"""Provenance of a beamtime's results: the software, the manifest and the input files.

What the report's provenance section shows, gathered without computing or importing anything
heavy: :func:`library_versions` (from the installed distributions' metadata),
:func:`manifest_source` (the manifest's text and SHA-256) and :func:`input_fingerprints` (a
:func:`file_fingerprint` of every input file the manifest names, compared with what ingest
recorded). File contents are hashed by :func:`spndi_dask.io.hashing.sha256_file`.
"""

from __future__ import annotations

import os
import platform
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from spndi_dask._version import __version__
from spndi_dask.config import Manifest
from spndi_dask.io.hashing import sha256_file, source_parts
from spndi_dask.io.layout import read_attrs

__all__ = [
    "EDGE",
    "LIBRARIES",
    "file_fingerprint",
    "input_fingerprints",
    "iso_time",
    "library_versions",
    "manifest_source",
]

#: Distributions whose versions the provenance lists (besides Python and spndi_dask).
LIBRARIES = (
    "numpy",
    "dask",
    "distributed",
    "zarr",
    "xarray",
    "torch",
    "dask-ml",
    "scikit-learn",
    "scipy",
    "matplotlib",
    "h5py",
    "hdf5plugin",
)

#: Bytes hashed at each end of an input file by :func:`file_fingerprint`.
EDGE = 1 << 20


def iso_time(timestamp: float) -> str:
    """A POSIX timestamp as ISO 8601 in UTC, to the second.

    Examples
    --------
    >>> iso_time(0)
    '1970-01-01T00:00:00+00:00'
    """
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="seconds")


def file_fingerprint(path: str | os.PathLike[str], *, edge: int = EDGE) -> dict[str, Any]:
    """Size, modification time and SHA-256 of the first and last ``edge`` bytes of a file.

    Files of at most ``2 * edge`` bytes are hashed whole. A missing file gives
    ``{"path": ..., "status": "missing"}``.

    Parameters
    ----------
    path : path-like
        The file.
    edge : int
        Bytes hashed at each end (1 MiB): enough to tell files apart without reading terabytes.

    Returns
    -------
    dict
        ``path``, ``status`` ('present' or 'missing'), ``size``, ``mtime`` (ISO 8601, UTC),
        ``mtime_ns`` and ``edge_sha256``.

    Examples
    --------
    >>> import tempfile, hashlib
    >>> p = Path(tempfile.mkdtemp()) / "a.bin"
    >>> _ = p.write_bytes(b"spndi")
    >>> fp = file_fingerprint(p)
    >>> fp["size"], fp["edge_sha256"] == hashlib.sha256(b"spndi").hexdigest()
    (5, True)
    >>> file_fingerprint(p.with_name("b.bin"))["status"]
    'missing'
    """
    path = Path(path)
    try:
        st = path.stat()
    except OSError:
        return {"path": str(path), "status": "missing"}
    return {
        "path": str(path),
        "status": "present",
        "size": st.st_size,
        "mtime": iso_time(st.st_mtime),
        "mtime_ns": st.st_mtime_ns,
        "edge_sha256": sha256_file(path, edge=edge),
    }


def input_fingerprints(manifest: Manifest) -> list[dict[str, Any]]:
    """Fingerprints (:func:`file_fingerprint`) of every input file the manifest names.

    Per particle its frame files (one or several per angle), dark and mask; then the ``[reduce]``
    detector mask and flat field. Each row also has ``particle`` and ``role`` ('frames 3',
    'frames 3 (file 2 of 4)', 'dark', ...)
    and, for frame files, ``vs_ingest``: whether size and mtime are those recorded by ingest
    ('same', 'changed', or '' when not ingested).
    """
    layout = manifest.layout
    rows: list[dict[str, Any]] = []
    for p in manifest.scans:
        sources = (read_attrs(layout.raw_node(p.name)) or {}).get("sources") or []
        recorded = {part.get("path"): part for s in sources for part in source_parts(s)}
        for i, paths in enumerate(p.frame_files(manifest.base_dir)):
            for j, path in enumerate(paths):
                fp = file_fingerprint(path)
                rec = recorded.get(str(path))
                vs = ""
                if rec is not None:
                    same = rec.get("size") == fp.get("size") and rec.get("mtime_ns") == fp.get(
                        "mtime_ns"
                    )
                    vs = "same" if same else "changed"
                role = f"frames {i}" + (
                    f" (file {j + 1} of {len(paths)})" if len(paths) > 1 else ""
                )
                rows.append({"scan": p.name, "role": role, **fp, "vs_ingest": vs})
        for role in ("dark", "mask"):
            value = getattr(p, role)
            if value:
                rows.append(
                    {"scan": p.name, "role": role, **file_fingerprint(manifest.resolve(value))}
                )
    for role in ("detector_mask", "flat"):
        value = getattr(manifest.reduce, role)
        if value:
            rows.append({"scan": "all", "role": role, **file_fingerprint(manifest.resolve(value))})
    return rows


def library_versions() -> dict[str, str]:
    """Versions of Python, spndi_dask and :data:`LIBRARIES` (without importing them).

    Examples
    --------
    >>> v = library_versions()
    >>> v["spndi_dask"] == __version__ and "numpy" in v
    True
    """
    out = {"python": platform.python_version(), "spndi_dask": __version__}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    out["platform"] = f"{platform.system()} {platform.release()} {platform.machine()}"
    return out


def manifest_source(manifest: Manifest) -> tuple[str, str | None, str]:
    """The manifest's text, the SHA-256 of its file (None without one) and where it came from.

    A manifest built in memory has no file: its settings are shown as TOML.
    """
    src = Path(manifest.source)
    if src.is_file():
        text = src.read_bytes().decode("utf-8", errors="replace")
        return text, sha256_file(src), str(src)
    return manifest.to_toml(), None, f"{manifest.source} (no file: settings written as TOML)"
