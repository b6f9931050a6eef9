"""Content hashes and cheap stamps of files: the package's one way to hash a file.

:func:`sha256_file` is the only place that reads a file to hash it: whole (ingest's source
checksums, a checkpoint's digest) or, with ``edge``, only its first and last bytes (the input
fingerprints of the report's provenance, which must not read terabytes).
:func:`file_stamp` reads nothing: a key of a file's path, size and modification time that tells
ingest whether an angle file is still the one it copied.

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

__all__ = ["file_stamp", "sha256_file"]

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


def file_stamp(path: str | os.PathLike[str], *extra: Any) -> int:
    """Stable non-zero 63-bit key of a file's path, size and mtime (plus ``extra``).

    Cheap (nothing is read); ingest stores it per angle to tell whether an ingested angle still
    matches its source file.
    """
    st = os.stat(path)
    key = repr((str(Path(path).resolve()), st.st_size, st.st_mtime_ns, *extra)).encode()
    value = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1
    return value or 1
