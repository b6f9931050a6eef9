"""Direct reads of regions of the sharded raw frames (Zarr v3 ``sharding_indexed`` on disk).

``zarr`` decodes each inner chunk of a shard through its async codec pipeline, which costs
several times the decompression itself for the many small inner chunks an ROI read touches
(one 16 × 16 scan tile of ``large`` through 96 × 96 detector pixels: 1116 inner chunks of
128 kB; ``scripts/bench_reduce.py`` prints both). :class:`ShardReader` reads the same bytes
itself: it parses each shard's index (checking its CRC32C), reads the byte range of the inner
chunks the region needs with one ``pread``, decompresses each with Blosc straight into a
reused buffer and copies the overlap into the output.

It handles exactly the layout :class:`~spndi_dask.io.raw_store.RawLayout` writes (a local
store; sharding with the index at the start or the end, index codecs ``bytes`` [+ ``crc32c``];
inner codecs ``bytes`` [+ one ``blosc``] [+ ``crc32c``], each chunk's checksum checked before it
is decompressed); anything else is read by ``zarr``
(:func:`region_reader` decides). Tests compare it bit for bit with ``zarr``.
"""

from __future__ import annotations

import itertools
import logging
import os
import sys
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
import zarr
from numcodecs import blosc
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec
from zarr.storage import LocalStore

__all__ = ["ShardError", "ShardReader", "region_reader"]

logger = logging.getLogger(__name__)

#: Offset and length of an inner chunk that was never written (read as the fill value).
_MISSING = np.uint64(2**64 - 1)


class ShardError(OSError):
    """A shard of the raw frames is damaged (index checksum, truncated, undecodable chunk).

    ``path`` is the shard's path.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.path = message.split(": ", 1)[0]


def _endian(codec: BytesCodec) -> str | None:
    return None if codec.endian is None else str(getattr(codec.endian, "value", codec.endian))


def _fast_layout(array: zarr.Array) -> str | None:
    """Why :class:`ShardReader` cannot read ``array`` (``None`` when it can)."""
    meta = array.metadata
    if getattr(meta, "zarr_format", None) != 3:
        return "not Zarr v3"
    if not isinstance(array.store, LocalStore):
        return f"store {type(array.store).__name__} is not local"
    if len(meta.codecs) != 1 or not isinstance(meta.codecs[0], ShardingCodec):
        return "not sharded"
    shard = meta.codecs[0]
    index = tuple(shard.index_codecs)
    if not (
        isinstance(index[0], BytesCodec)
        and _endian(index[0]) in (None, "little")
        and (len(index) == 1 or (len(index) == 2 and isinstance(index[1], Crc32cCodec)))
    ):
        return f"index codecs {index}"
    inner = tuple(shard.codecs)
    dtype = np.dtype(meta.dtype.to_native_dtype())
    rest = inner[1:-1] if isinstance(inner[-1], Crc32cCodec) else inner[1:]
    if not (
        isinstance(inner[0], BytesCodec)
        and _endian(inner[0]) in (None, sys.byteorder)
        and (len(rest) == 0 or (len(rest) == 1 and isinstance(rest[0], BloscCodec)))
    ):
        return f"inner codecs {inner}"
    if dtype.hasobject or meta.chunk_grid.chunk_shape is None:
        return f"dtype {dtype}"
    return None


class ShardReader:
    """Reads rectangular regions of a local sharded Zarr v3 array without ``zarr``'s pipeline.

    Parameters
    ----------
    array : zarr.Array
        A sharded array as :func:`region_reader` accepts (see the module docstring).

    Examples
    --------
    >>> import tempfile, zarr, numpy as np
    >>> d = tempfile.mkdtemp()
    >>> z = zarr.create_array(f"{d}/a.zarr", shape=(4, 6), chunks=(2, 2), shards=(4, 4),
    ...                       dtype="uint16", compressors=[BloscCodec()], fill_value=0)
    >>> z[:] = np.arange(24, dtype="uint16").reshape(4, 6)
    >>> ShardReader(z)[1:3, 2:5]
    array([[ 8,  9, 10],
           [14, 15, 16]], dtype=uint16)
    """

    def __init__(self, array: zarr.Array) -> None:
        why = _fast_layout(array)
        if why is not None:
            raise ValueError(f"{array.store_path}: cannot be read directly ({why}); use zarr")
        meta = array.metadata
        codec: ShardingCodec = meta.codecs[0]
        self.shape = tuple(int(s) for s in meta.shape)
        self.dtype = np.dtype(meta.dtype.to_native_dtype())
        self.shard = tuple(int(s) for s in meta.chunk_grid.chunk_shape)
        self.chunk = tuple(int(s) for s in codec.chunk_shape)
        self.per_shard = tuple(s // c for s, c in zip(self.shard, self.chunk, strict=True))
        self.fill = (
            np.asarray(meta.fill_value, dtype=self.dtype) if meta.fill_value is not None else 0
        )
        self.chunk_crc = len(codec.codecs) > 1 and isinstance(codec.codecs[-1], Crc32cCodec)
        self.compressed = len(codec.codecs) - self.chunk_crc == 2
        self.checksum = len(codec.index_codecs) == 2
        self.index_at_end = (
            str(getattr(codec.index_location, "value", codec.index_location)) == "end"
        )
        self.index_bytes = 16 * int(np.prod(self.per_shard)) + 4 * self.checksum
        self._root = Path(array.store.root) / array.path
        self._key = meta.encode_chunk_key
        self.chunk_bytes = int(np.prod(self.chunk)) * self.dtype.itemsize

    # -- one shard ------------------------------------------------------------------------
    def _index(self, path: Path, fd: int, size: int) -> np.ndarray:
        start = size - self.index_bytes if self.index_at_end else 0
        raw = os.pread(fd, self.index_bytes, start) if size >= self.index_bytes else b""
        if len(raw) != self.index_bytes:
            raise ShardError(f"{path}: shard of {size} bytes is too short for its index; re-ingest")
        if self.checksum:
            stored = raw[-4:]
            raw = raw[:-4]
            if np.uint32(google_crc32c.value(raw)).tobytes() != stored:
                raise ShardError(f"{path}: shard index checksum mismatch (damaged file); re-ingest")
        return np.frombuffer(raw, dtype="<u8").reshape(*self.per_shard, 2)

    def check_file(self, path: str | Path) -> None:
        """Check a whole shard file by its checksums, without decompressing it.

        The index must pass its checksum and point inside the file, and every inner chunk its
        own ``crc32c`` (where the array has one; else it is decompressed).

        Raises
        ------
        ShardError
            Naming the file and what is wrong.
        """
        path = Path(path)
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            index = self._index(path, f.fileno(), size).reshape(-1, 2)
            data = np.frombuffer(f.read(), np.uint8)
        lo = 0 if self.index_at_end else self.index_bytes
        hi = size - self.index_bytes if self.index_at_end else size
        buf = np.empty(self.chunk_bytes, dtype=np.uint8)
        for n, (off, nbytes) in enumerate(index):
            if off == _MISSING:
                continue
            if off < lo or off + nbytes > hi:
                raise ShardError(f"{path}: shard is truncated (chunk {n} lies past its end)")
            piece = data[int(off) : int(off + nbytes)]
            if self.chunk_crc:
                if np.uint32(google_crc32c.value(piece[:-4])).tobytes() != piece[-4:].tobytes():
                    raise ShardError(f"{path}: inner chunk {n} fails its checksum (damaged file)")
            elif self.compressed:
                try:
                    blosc.decompress(piece, buf)
                except (RuntimeError, ValueError) as exc:
                    raise ShardError(f"{path}: inner chunk {n} cannot be decoded ({exc})") from exc

    def _read_shard(
        self, out: np.ndarray, sel: tuple[slice, ...], shard_idx: tuple[int, ...], buf: np.ndarray
    ) -> None:
        """Fill the part of ``out`` (the region ``sel``) that shard ``shard_idx`` holds."""
        origin = [i * s for i, s in zip(shard_idx, self.shard, strict=True)]
        # inner chunks of this shard the region touches, per dimension
        spans = []
        for d, (s, o) in enumerate(zip(sel, origin, strict=True)):
            lo = max(s.start, o) - o
            hi = min(s.stop, o + self.shard[d], self.shape[d]) - o
            spans.append(range(lo // self.chunk[d], -(-hi // self.chunk[d])))
        path = self._root / self._key(shard_idx)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:  # never written: the whole overlap is the fill value
            out[self._overlap(sel, origin, self.shard, (0,) * len(sel))[0]] = self.fill
            return
        try:
            size = os.fstat(fd).st_size
            index = self._index(path, fd, size)
            wanted = index[tuple(np.ix_(*[np.asarray(r) for r in spans]))].reshape(-1, 2)
            present = wanted[wanted[:, 0] != _MISSING]
            if len(present):
                first = int(present[:, 0].min())
                last = int((present[:, 0] + present[:, 1]).max())
                end = size - self.index_bytes if self.index_at_end else size
                if last > end or first < (0 if self.index_at_end else self.index_bytes):
                    raise ShardError(
                        f"{path}: shard is truncated (its index points past its {end} bytes of "
                        "chunks); re-ingest"
                    )
                data = np.frombuffer(os.pread(fd, last - first, first), np.uint8)
                if len(data) != last - first:
                    raise ShardError(f"{path}: short read of shard; re-ingest")
        finally:
            os.close(fd)
        chunk = buf.view(self.dtype).reshape(self.chunk)
        for n, inner in enumerate(itertools.product(*spans)):
            dst, src = self._overlap(sel, origin, self.chunk, inner)
            off, nbytes = wanted[n]
            if off == _MISSING:
                out[dst] = self.fill
                continue
            piece = data[int(off) - first : int(off + nbytes) - first]
            if self.chunk_crc:
                stored = bytes(piece[-4:])
                piece = piece[:-4]
                if len(stored) != 4 or np.uint32(google_crc32c.value(piece)).tobytes() != stored:
                    raise ShardError(
                        f"{path}: inner chunk {inner} fails its checksum (damaged file); re-ingest"
                    )
            try:
                if self.compressed:
                    blosc.decompress(piece, buf)
                elif len(piece) == self.chunk_bytes:
                    buf[:] = np.frombuffer(piece, dtype=np.uint8)
                else:
                    raise ValueError(f"{len(piece)} bytes for a chunk of {self.chunk_bytes}")
            except (RuntimeError, ValueError) as exc:
                raise ShardError(
                    f"{path}: inner chunk {inner} cannot be decoded ({exc}); re-ingest"
                ) from exc
            out[dst] = chunk[src]

    @staticmethod
    def _overlap(sel, origin, block, index) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
        """Where the block ``index`` of shape ``block`` counted from ``origin`` (an inner chunk
        of a shard, or the shard itself) lands in the region, and which part of it lands there."""
        dst, src = [], []
        for s, o, i, c in zip(sel, origin, index, block, strict=True):
            c0 = o + i * c
            lo, hi = max(s.start, c0), min(s.stop, c0 + c)
            dst.append(slice(lo - s.start, hi - s.start))
            src.append(slice(lo - c0, hi - c0))
        return tuple(dst), tuple(src)

    # -- regions --------------------------------------------------------------------------
    def __getitem__(self, key: tuple[slice, ...]) -> np.ndarray:
        """The region ``key`` (one ``slice`` with step 1 per dimension) as a new array."""
        if not isinstance(key, tuple):
            key = (key,)
        if len(key) != len(self.shape) or not all(isinstance(k, slice) for k in key):
            raise IndexError(f"ShardReader takes {len(self.shape)} slices, got {key!r}")
        sel = []
        for k, n in zip(key, self.shape, strict=True):
            start, stop, step = k.indices(n)
            if step != 1:
                raise IndexError(f"ShardReader takes slices with step 1, got {k!r}")
            sel.append(slice(start, max(start, stop)))
        sel = tuple(sel)
        out = np.empty([s.stop - s.start for s in sel], dtype=self.dtype)
        if out.size == 0:
            return out
        buf = np.empty(self.chunk_bytes, dtype=np.uint8)
        ranges = [
            range(s.start // sh, -(-s.stop // sh)) for s, sh in zip(sel, self.shard, strict=True)
        ]
        for shard_idx in itertools.product(*ranges):
            self._read_shard(out, sel, shard_idx, buf)
        return out


def region_reader(array: zarr.Array) -> Any:
    """The fastest reader of rectangular regions of ``array``: a :class:`ShardReader` when its
    layout allows one, else ``array`` itself (both take a tuple of slices)."""
    try:
        return ShardReader(array)
    except ValueError as exc:
        logger.debug("read through zarr: %s", exc)
        return array
