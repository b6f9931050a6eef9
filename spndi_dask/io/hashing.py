"""Content hashes and cheap stamps of files: the package's one way to hash a file.

:func:`sha256_file` is the only place that reads a file to hash it: whole (ingest's source
checksums, a checkpoint's digest) or, with ``edge``, only its first and last bytes (the input
fingerprints of the report's provenance, which must not read terabytes).
:func:`same_file` tells ingest and ``spndi status`` whether an angle file is still the one that
was ingested: by its size and modification time at its path or at its path relative to the
manifest (nothing read), else by its content (a beamtime folder copied elsewhere is recognised,
not ingested again). An angle whose scan is split across files has one record per file
(:func:`source_parts`); :func:`same_source` asks :func:`same_file` of each.

Examples
--------
>>> import hashlib, tempfile
>>> p = Path(tempfile.mkdtemp()) / "a.bin"
>>> _ = p.write_bytes(b"0123456789")
>>> sha256_file(p) == hashlib.sha256(b"0123456789").hexdigest()
True
>>> sha256_file(p, edge=3) == hashlib.sha256(b"012789").hexdigest()
True
>>> sha256_file(p, edge=5) == sha256_file(p)  # at most 2 * edge bytes: the whole file
True
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

__all__ = [
    "relative_to",
    "same_file",
    "same_source",
    "sha256_file",
    "source_identity",
    "source_parts",
    "stable_key",
]

_BLOCK = 1 << 22  # bytes read at a time


def sha256_file(path: str | os.PathLike[str], *, edge: int | None = None) -> str:
    """SHA-256 (hex) of a file's bytes, or of its first and last ``edge`` bytes.

    Parameters
    ----------
    path : path-like
        The file.
    edge : int, optional
        Hash only the first and last ``edge`` bytes (concatenated); a file of at most
        ``2 * edge`` bytes is hashed whole. None (default): the whole file.

    Returns
    -------
    str
        64 hex digits.
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if edge is not None and size > 2 * edge:
            h.update(f.read(edge))
            f.seek(size - edge)
            h.update(f.read(edge))
        else:
            while chunk := f.read(_BLOCK):
                h.update(chunk)
    return h.hexdigest()


def stable_key(*parts: Any) -> int:
    """Stable non-zero 63-bit key of ``parts`` (their ``repr``)."""
    key = repr(parts).encode()
    value = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1
    return value or 1


def relative_to(path: str | os.PathLike[str], base: str | os.PathLike[str]) -> str:
    """``path`` relative to ``base`` (POSIX form, ``..`` where needed): what stays the same when
    a beamtime folder is moved or copied whole.

    Examples
    --------
    >>> relative_to("/data/bt/raw/a.h5", "/data/bt")
    'raw/a.h5'
    >>> relative_to("/data/raw/a.h5", "/data/bt")
    '../raw/a.h5'
    """
    return Path(os.path.relpath(os.path.abspath(path), os.path.abspath(base))).as_posix()


def same_file(
    path: str | os.PathLike[str], record: dict[str, Any] | None, base: str | os.PathLike[str]
) -> bool | None:
    """Whether ``path`` holds what ``record`` (path, relpath, size, mtime_ns, sha256) describes.

    Cheap when the file keeps its size and modification time at its recorded path, or at its
    recorded path relative to ``base`` (a beamtime folder moved whole); otherwise its content is
    hashed and compared with the recorded SHA-256 (a copy, a touch). None when that is needed
    but no SHA-256 was recorded.
    """
    if not record:
        return False
    try:
        st = os.stat(path)
    except OSError:
        return False
    if record.get("size") != st.st_size:
        return False
    here = (str(path), relative_to(path, base))
    if record.get("mtime_ns") == st.st_mtime_ns and (
        record.get("path") == here[0] or record.get("relpath") == here[1]
    ):
        return True
    if not record.get("sha256"):
        return None
    return sha256_file(path) == record["sha256"]


def source_parts(record: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The per-file records of one of ingest's ``sources`` records: its ``parts`` (an angle
    split across files), else the record itself (one file); none for no record.

    Examples
    --------
    >>> [p["path"] for p in source_parts({"path": "a.h5", "parts": [{"path": "a.h5"},
    ...                                                             {"path": "b.h5"}]})]
    ['a.h5', 'b.h5']
    >>> source_parts({"path": "a.h5", "size": 3})
    [{'path': 'a.h5', 'size': 3}]
    """
    if not record:
        return []
    return list(record["parts"]) if record.get("parts") else [record]


def same_source(
    paths: list[str | os.PathLike[str]],
    record: dict[str, Any] | None,
    base: str | os.PathLike[str],
) -> bool | None:
    """:func:`same_file` for the file(s) of one angle: every file against its part of
    ``record``, in order. False if any differs (or the number of files does), None if any needs
    a SHA-256 that was not recorded, else True."""
    parts = source_parts(record)
    if not parts or len(parts) != len(paths):
        return False
    if len(paths) == 1:
        return same_file(paths[0], parts[0], base)
    unknown = False
    for path, part in zip(paths, parts, strict=True):
        same = same_file(path, part, base)
        if same is False:
            return False
        unknown |= same is None
    return None if unknown else True


def source_identity(record: dict[str, Any] | None) -> dict[str, Any] | None:
    """What identifies an ingested angle file (one of ingest's ``sources`` records): its size and
    SHA-256 where ingest recorded one, else its path relative to the manifest and modification
    time; never where it lies, so results stay current when a beamtime folder moves. An angle of
    several files: the identity of each, in order.

    Examples
    --------
    >>> source_identity({"path": "/a/x.h5", "size": 3, "mtime_ns": 5, "sha256": "ab"})
    {'size': 3, 'sha256': 'ab'}
    """
    if not record:
        return None
    if record.get("parts"):
        return {"parts": [source_identity(part) for part in record["parts"]]}
    if record.get("sha256"):
        return {"size": record.get("size"), "sha256": record["sha256"]}
    return {k: record.get(k) for k in ("relpath", "size", "mtime_ns")}
