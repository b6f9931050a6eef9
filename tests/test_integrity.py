"""Damaged stores are found, named and recomputed; moved beamtimes are not recomputed.

Each test copies one ingested and reduced ``tiny`` beamtime of two particles and damages the copy
as a disk or a careless copy would: a flipped byte, a truncated shard, a deleted chunk file.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import zarr

from spndi_dask.cli import main
from spndi_dask.config import load_manifest
from spndi_dask.ingest import ingest
from spndi_dask.io.integrity import Damage, DamagedStoreError, is_damage, verify
from spndi_dask.io.layout import read_attrs
from spndi_dask.io.results_store import open_results
from spndi_dask.io.shards import ShardError, ShardReader
from spndi_dask.reduce import reduce
from spndi_dask.status import scan_status

from .conftest import reduced_beamtime


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    return reduced_beamtime(tmp_path_factory, "integrity", "tiny", n_particles=2)


@pytest.fixture
def copy(original, tmp_path):
    """A copy of the beamtime folder (modification times not kept, as `cp -r` does)."""
    src, _ = original
    dst = tmp_path / "bt"
    shutil.copytree(src, dst, copy_function=shutil.copy)
    return load_manifest(dst / "beamtime.toml")


def _flip(path: Path, at: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0x10
    path.write_bytes(bytes(data))


def _shard(m, particle: str, angle: int) -> Path:
    base = m.layout.raw_node(particle) / "frames" / "c" / str(angle)
    return next(p for p in sorted(base.rglob("*")) if p.is_file())


def _statuses(summary):
    return {k: str(v["status"]) for k, v in summary.items()}


def test_every_array_written_ends_with_a_crc32c_checksum(copy):
    for store in (copy.layout.raw, copy.layout.results):
        for meta in store.rglob("zarr.json"):
            doc = json.loads(meta.read_text())
            if doc.get("node_type") != "array":
                continue
            names = [c["name"] for c in doc["codecs"]]
            if names == ["sharding_indexed"]:
                names = [c["name"] for c in doc["codecs"][0]["configuration"]["codecs"]]
            assert names[-1] == "crc32c", (meta.parent, names)


def test_a_flipped_byte_in_a_result_is_an_error_naming_array_particle_and_fix(copy):
    clean = open_results(copy.output_dir, "p1")["strain"].values
    _flip(copy.layout.node("p1") / "strain" / "c" / "0" / "0")
    ds = open_results(copy.output_dir, "p1")
    with pytest.raises(DamagedStoreError) as err:
        ds["strain"].values  # noqa: B018
    msg = str(err.value)
    assert "results.zarr/p1/strain" in msg
    assert f"spndi reduce {copy.source} --scans p1 --force" in msg
    assert [(d.particle, d.array, d.stage) for d in err.value.damage] == [
        ("p1", "p1/strain", "reduce")
    ]
    # other arrays and the other particle read as before
    assert np.isfinite(open_results(copy.output_dir, "p2")["strain"].values).any()

    # spndi verify finds it, marks it; the next reduce recomputes p1 alone, bit-identically
    assert main(["verify", str(copy.source)]) == 1
    assert not read_attrs(copy.layout.node("p1"))["spndi_dask"]["complete"]
    assert _statuses(reduce(copy)) == {"p1": "reduced", "p2": "up to date"}
    again = open_results(copy.output_dir, "p1")["strain"].values
    np.testing.assert_array_equal(again, clean)
    assert verify(copy, deep=True).ok
    assert main(["verify", str(copy.source), "--deep"]) == 0


def test_reading_one_pixel_of_a_damaged_chunk_names_the_array(copy):
    from spndi_dask.io.integrity import read

    node = copy.layout.node("p1")
    _flip(node / "pattern" / "c" / "3" / "0" / "0" / "0" / "0")  # pattern rows are chunks
    pattern = zarr.open_array(str(node / "pattern"), mode="r")
    assert np.isfinite(read(pattern, (2, 4))).any()  # another row reads
    for selection in ((3, 4), (3,), (slice(None), 4), ...):  # integers, as one pixel's read
        with pytest.raises(DamagedStoreError) as err:
            read(pattern, selection)
        assert "results.zarr/p1/pattern" in str(err.value), selection
        assert [d.array for d in err.value.damage] == ["p1/pattern"], selection


def test_verify_reports_per_particle_and_stage_without_marking(copy, capsys):
    _flip(copy.layout.node("p2") / "valid" / "c" / "0" / "0")
    (copy.layout.node("p1") / "d_spacing" / "c" / "0" / "0").unlink()
    report = verify(copy, mark=False)
    found = {(d.particle, d.array, d.reason.split(":")[0]) for d in report.damage}
    assert found == {("p2", "p2/valid", "ValueError"), ("p1", "p1/d_spacing", "chunk file missing")}
    assert set(report.by_particle()) == {"p1", "p2"}
    assert not report.marked
    assert read_attrs(copy.layout.node("p1"))["spndi_dask"]["complete"]  # not marked
    assert main(["verify", str(copy.source), "--report-only", "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert not doc["ok"] and len(doc["damage"]) == 2 and doc["marked"] == []


def test_status_verify_shows_damaged_stages(copy, capsys):
    _flip(copy.layout.node("p2") / "tilt_x" / "c" / "0" / "0")
    assert main(["status", str(copy.source), "--verify"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("p2 "))
    assert "damaged" in row
    assert "results.zarr/p2/" in out and "`spndi verify` marks it" in out
    assert "damaged" not in next(line for line in out.splitlines() if line.startswith("p1 "))
    assert verify(copy, mark=False).damage  # status marked nothing


def test_deep_verify_checksums_every_byte_of_the_patterns(copy):
    chunk = next(
        p for p in sorted((copy.layout.node("p2") / "pattern" / "c").rglob("*")) if p.is_file()
    )
    _flip(chunk)
    assert verify(copy, mark=False).ok  # the cheap form checks only that the file is there
    report = verify(copy, deep=True)
    assert [(d.particle, d.stage) for d in report.damage] == [("p2", "reduce")]
    assert report.marked == ["p2: reduce to be recomputed"]
    assert _statuses(reduce(copy)) == {"p1": "up to date", "p2": "reduced"}


def test_a_damaged_raw_shard_fails_only_its_particle_and_is_reingested_alone(original, copy):
    """The copied output with one truncated shard of p2: p1 completes, p2 fails naming the store,
    the angle and the fix; verify marks that angle and ingest rewrites it alone, bit-exact."""
    src_m = original[1]
    shard = _shard(copy, "p2", 3)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    assert _statuses(ingest(copy)) == {"p1": "up to date", "p2": "up to date"}
    summary = reduce(copy, force=True)
    assert summary["p1"]["status"] == "reduced"
    assert summary["p2"]["status"] == "failed"
    msg = summary["p2"]["error"]
    assert "raw.zarr/p2/frames, angle index 3" in msg and "spndi verify" in msg

    report = verify(copy)
    assert [(d.particle, d.stage, d.angle) for d in report.damage] == [("p2", "ingest", 3)]
    summary = ingest(copy)
    assert summary["p2"]["angles_written"] == 1 and summary["p1"]["status"] == "up to date"
    ref = zarr.open_array(str(src_m.layout.raw_node("p2") / "frames"), mode="r")
    new = zarr.open_array(str(copy.layout.raw_node("p2") / "frames"), mode="r")
    np.testing.assert_array_equal(new[3], ref[3])
    assert _statuses(reduce(copy, force=True)) == {"p1": "reduced", "p2": "reduced"}


def test_rewriting_an_angle_never_reads_its_damaged_shard(copy):
    """An angle to be written again (its file changed, an ingest interrupted) over a truncated
    shard: the shard is deleted first, not read."""
    shard = _shard(copy, "p1", 1)
    shard.write_bytes(b"\0" * 10)
    group = zarr.open_group(str(copy.layout.raw_node("p1")), mode="r+")
    group["done"][1] = 0  # as an interrupted ingest leaves it
    summary = ingest(copy)
    assert summary["p1"]["status"] == "ingested" and summary["p1"]["angles_written"] == 1
    assert verify(copy, deep=True).ok


def test_a_moved_or_copied_beamtime_is_not_recomputed(original, tmp_path):
    src, _ = original
    copied = tmp_path / "copied"
    shutil.copytree(src, copied, copy_function=shutil.copy)  # new paths and modification times
    m = load_manifest(copied / "beamtime.toml")
    assert scan_status(m)["p1"]["ingest"][0] == "stale"  # status reads nothing: it cannot tell
    assert _statuses(ingest(m)) == {"p1": "up to date", "p2": "up to date"}  # same SHA-256
    assert _statuses(reduce(m)) == {"p1": "up to date", "p2": "up to date"}
    assert {s["ingest"][0] for s in scan_status(m).values()} == {"done"}
    moved = tmp_path / "moved"
    shutil.move(copied, moved)
    m = load_manifest(moved / "beamtime.toml")
    assert {s["reduce"][0] for s in scan_status(m).values()} == {"done"}  # nothing read
    assert _statuses(reduce(m)) == {"p1": "up to date", "p2": "up to date"}
    # a file whose content changed is ingested again
    path = m.scan("p1").frame_paths(m.base_dir)[0]
    with h5py.File(path, "r+") as f:
        f[m.scan("p1").dataset][0, 0, 0] += 1
    assert ingest(m)["p1"]["angles_written"] == 1


def test_the_shard_reader_checks_each_inner_chunk(copy):
    frames = zarr.open_array(str(copy.layout.raw_node("p1") / "frames"), mode="r")
    reader = ShardReader(frames)
    assert reader.chunk_crc
    np.testing.assert_array_equal(reader[0:1, 0:4, 0:4, :, :], frames[0:1, 0:4, 0:4])
    _flip(_shard(copy, "p1", 0), at=0.1)
    with pytest.raises(ShardError, match="checksum"):
        reader[0:1, :, :, :, :]
    assert is_damage(ShardError("x: y"))


def test_damage_words_and_records():
    assert is_damage(RuntimeError("Error during decompression"))
    assert not is_damage(ValueError("scan_shape must be positive"))
    d = Damage("raw", "p2", "p2/frames", "c/3/0/0/0/0", "truncated", "ingest", 3)
    assert d.where() == "raw.zarr/p2/frames, angle index 3 (c/3/0/0/0/0)"
