"""Direct shard reads (spndi_dask.io.shards) against zarr, bit for bit, and their errors."""

from __future__ import annotations

import re

import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec, BytesCodec, GzipCodec, ShardingCodec

from spndi_dask.io.raw_store import RawLayout, create_particle_store
from spndi_dask.io.shards import ShardError, ShardReader, region_reader


def _frames(path, *, shape=(3, 20, 21, 40, 36), dtype="uint16", sparse=False, **layout_kw):
    """A frames array as ingest writes it (RawLayout), filled with random counts."""
    layout = RawLayout(
        shape,
        dtype,
        scan_chunk=layout_kw.pop("scan_chunk", (4, 4)),
        scan_shard=layout_kw.pop("scan_shard", (8, 8)),
        detector_chunk=layout_kw.pop("detector_chunk", (16, 16)),
        **layout_kw,
    )
    z = create_particle_store(path, "p", layout, {})["frames"]
    rng = np.random.default_rng(0)
    data = rng.poisson(3.0, size=shape).astype(dtype)
    if sparse:  # whole inner chunks and whole shards of zeros: never written
        data[:, :8] = 0
        data[1, :, :, 16:] = 0
    z[:] = data
    return z, data


REGIONS = [
    (slice(None),) * 5,
    (slice(1, 2), slice(3, 17), slice(5, 21), slice(7, 33), slice(0, 36)),
    (slice(0, 3), slice(19, 20), slice(0, 1), slice(39, 40), slice(35, 36)),  # last corner
    (slice(2, 3), slice(0, 20), slice(16, 21), slice(0, 5), slice(30, 36)),  # edge shards
    (slice(0, 3), slice(4, 4), slice(0, 21), slice(0, 40), slice(0, 36)),  # empty
]


@pytest.mark.parametrize("compressor", ["lz4", "zstd", "none"])
@pytest.mark.parametrize("sparse", [False, True])
def test_regions_match_zarr_bit_for_bit(tmp_path, compressor, sparse):
    z, data = _frames(tmp_path / "f.zarr", compressor=compressor, sparse=sparse)
    reader = region_reader(zarr.open_array(str(tmp_path / "f.zarr" / "p" / "frames"), mode="r"))
    assert isinstance(reader, ShardReader)
    rng = np.random.default_rng(1)
    regions = list(REGIONS)
    for _ in range(20):
        lo = [int(rng.integers(0, n)) for n in data.shape]
        regions.append(
            tuple(
                slice(a, int(rng.integers(a, n)) + 1) for a, n in zip(lo, data.shape, strict=True)
            )
        )
    for region in regions:
        got = reader[region]
        assert got.dtype == data.dtype
        np.testing.assert_array_equal(got, data[region])
        np.testing.assert_array_equal(got, z[region])


def test_missing_shards_and_chunks_read_as_fill_value(tmp_path):
    z, data = _frames(tmp_path / "f.zarr", sparse=True)
    # the zeroed scan rows 0..7 were never written: their shard files do not exist
    assert not (tmp_path / "f.zarr" / "p" / "frames" / "c" / "0" / "0").exists()
    np.testing.assert_array_equal(ShardReader(z)[:, 0:12, 3:9, 10:20, :], data[:, 0:12, 3:9, 10:20])
    z2 = zarr.create_array(
        str(tmp_path / "g.zarr"),
        **dict(shape=(4, 6), chunks=(2, 2), shards=(4, 4), dtype="float32"),
        compressors=[BloscCodec(cname="lz4")],
        fill_value=-1.5,
    )
    z2[0:2, 0:2] = 7.0  # one inner chunk of the first shard; the rest never written
    got = ShardReader(z2)[0:4, 0:6]
    want = np.full((4, 6), -1.5, np.float32)
    want[0:2, 0:2] = 7.0
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got, z2[:])


def test_index_at_start_and_without_checksum(tmp_path):
    rng = np.random.default_rng(2)
    data = rng.integers(0, 1000, size=(6, 10, 12)).astype("<u4")
    for name, index_codecs in [("start", None), ("plain", [BytesCodec()])]:
        sharding = ShardingCodec(
            chunk_shape=(2, 5, 4),
            codecs=[BytesCodec(), BloscCodec(cname="lz4", shuffle="shuffle")],
            index_location="start" if name == "start" else "end",
            **({"index_codecs": index_codecs} if index_codecs else {}),
        )
        z = zarr.create_array(
            str(tmp_path / f"{name}.zarr"),
            shape=data.shape,
            dtype=data.dtype,
            chunks=(4, 10, 8),
            serializer=sharding,
            compressors=None,
            fill_value=0,
        )
        z[:] = data
        reader = region_reader(z)
        assert isinstance(reader, ShardReader), name
        np.testing.assert_array_equal(reader[1:5, 2:9, 3:12], data[1:5, 2:9, 3:12])


def test_other_layouts_fall_back_to_zarr(tmp_path):
    plain = zarr.create_array(str(tmp_path / "p.zarr"), shape=(8, 8), chunks=(4, 4), dtype="u2")
    gz = zarr.create_array(
        str(tmp_path / "g.zarr"),
        shape=(8, 8),
        chunks=(8, 8),
        shards=(8, 8),
        dtype="u2",
        compressors=[GzipCodec()],
    )
    memory = zarr.create_array({}, shape=(8, 8), chunks=(4, 4), shards=(8, 8), dtype="u2")
    for array in (plain, gz, memory):
        assert region_reader(array) is array
        with pytest.raises(ValueError, match="cannot be read directly"):
            ShardReader(array)


def _one_shard(tmp_path):
    z, _ = _frames(tmp_path / "f.zarr", shape=(1, 8, 8, 16, 16), scan_chunk=(4, 4))
    (path,) = [p for p in (tmp_path / "f.zarr" / "p" / "frames" / "c").rglob("*") if p.is_file()]
    return ShardReader(z), path


def test_damaged_index_names_the_shard(tmp_path):
    reader, path = _one_shard(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[-10] ^= 0xFF  # inside the index: its CRC32C no longer matches
    path.write_bytes(bytes(raw))
    with pytest.raises(ShardError, match=rf"{re.escape(str(path))}.*checksum mismatch.*re-ingest"):
        reader[:, :, :, :, :]


def test_truncated_shard_names_the_shard(tmp_path):
    reader, path = _one_shard(tmp_path)
    raw = path.read_bytes()
    index = 16 * 4 + 4
    path.write_bytes(raw[: len(raw) - index - 40] + raw[-index:])  # chunk bytes cut, index kept
    with pytest.raises(ShardError, match=rf"{re.escape(str(path))}.*truncated"):
        reader[:, :, :, :, :]
    path.write_bytes(raw[:10])
    with pytest.raises(ShardError, match=rf"{re.escape(str(path))}.*too short"):
        reader[:, :, :, :, :]


def test_undecodable_chunk_names_the_shard(tmp_path):
    reader, path = _one_shard(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[:16] = b"\0" * 16  # blosc header of the first inner chunk
    path.write_bytes(bytes(raw))
    with pytest.raises(
        ShardError, match=rf"{re.escape(str(path))}.*(cannot be decoded|fails its checksum)"
    ):
        reader[:, 0:4, 0:4, 0:8, 0:8]


def test_only_step_one_slices(tmp_path):
    reader, _ = _one_shard(tmp_path)
    with pytest.raises(IndexError, match="step 1"):
        reader[:, ::2, :, :, :]
    with pytest.raises(IndexError, match="5 slices"):
        reader[0]
