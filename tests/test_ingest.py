import itertools
import logging
import os
import shutil

import h5py
import numpy as np
import pytest
import zarr

import spndi_dask.ingest as ingest_mod
import spndi_dask.ingest.records as ingest_records
import spndi_dask.ingest.write as ingest_write
from spndi_dask.ingest import IngestError, ingest
from spndi_dask.io.hashing import sha256_file
from spndi_dask.io.layout import read_attrs
from spndi_dask.io.raw_store import IncompleteError, open_raw

from .conftest import load, manifest_dict, write_angle_files


def test_round_trip_is_bit_exact_with_metadata(handmade):
    tmp, data, frames, monitor, xrf = handmade
    m = load(tmp, data)
    summary = ingest(m)
    assert summary["p1"]["status"] == "ingested" and summary["p1"]["angles_written"] == 5
    ds = open_raw(m.output_dir, "p1")
    assert ds.frames.dims == ("angle", "y", "x", "det_row", "det_col")
    assert ds.frames.dtype == np.uint16
    assert ds.frames.data.chunksize == (1, 4, 4, 9, 10)  # one shard, never the inner chunks
    assert np.array_equal(ds.frames.values, frames)
    assert np.array_equal(ds.monitor.values, monitor)
    assert np.array_equal(ds.xrf.values, xrf)
    assert ds.valid.values.all()
    assert ds.angle.values == pytest.approx(np.linspace(8.0, 8.2, 5))
    assert ds.x.values == pytest.approx(np.arange(7) * 0.05)
    attrs = ds.attrs
    assert attrs["spndi_dask"]["complete"] is True
    assert attrs["geometry"]["gamma_deg"] == 16.0
    assert attrs["manifest_hash"] == m.manifest_hash
    src = attrs["sources"][2]
    assert src["path"].endswith("angle_002.h5") and src["sha256"] == sha256_file(src["path"])


def test_open_raw_is_lazy(handmade, raise_if_computes):
    tmp, data, *_ = handmade
    m = load(tmp, data)
    import dask

    with dask.config.set(scheduler="sync"):
        ingest(m)
    ds = open_raw(m.output_dir, "p1", chunks=(5, 4, 4, 9, 10))
    total = ds.frames.astype("float64").sum(("det_row", "det_col"))  # builds a graph only
    assert total.chunks is not None
    assert ds.frames.data.chunksize == (5, 4, 4, 9, 10)


def test_shards_never_span_angles_and_are_aligned(handmade):
    tmp, data, *_ = handmade
    m = load(tmp, data)
    ingest(m)
    arr = zarr.open_array(str(m.output_dir / "raw.zarr" / "p1" / "frames"), mode="r")
    assert arr.shards == (1, 4, 4, 12, 12) and arr.chunks == (1, 2, 2, 4, 4)
    assert arr.metadata.dimension_names == ("angle", "y", "x", "det_row", "det_col")


def test_snake_scans_are_unfolded(tmp_path):
    rng = np.random.default_rng(5)
    frames = rng.integers(0, 60000, size=(3, 5, 4, 6, 6), dtype=np.uint16)
    write_angle_files(tmp_path, frames, order="snake")
    m = load(tmp_path, manifest_dict(n_angles=3, scan_shape=(5, 4), scan_order="snake"))
    ingest(m)
    assert np.array_equal(open_raw(m.output_dir, "p1").frames.values, frames)


def test_float_frames_and_bad_values(tmp_path):
    frames = np.random.default_rng(2).random((3, 2, 3, 4, 4)).astype(np.float32)
    frames[1, 1, 2, 0, 0] = np.nan
    frames[2, 0, 0, 1, 1] = -1.0
    write_angle_files(tmp_path, frames)
    data = manifest_dict(n_angles=3, scan_shape=(2, 3))
    with pytest.raises(
        IngestError, match=r"angle_00[12].h5 has 1 NaN.*first at point [05].*bad_values"
    ):
        ingest(load(tmp_path, data))
    data["ingest"] = {"bad_values": "zero"}
    ingest(load(tmp_path, data), force=True)
    out = open_raw(load(tmp_path, data).output_dir, "p1")
    expected = np.nan_to_num(frames).clip(0)
    assert np.array_equal(out.frames.values, expected)
    assert out.attrs["zeroed_values"] == 2


def test_resume_redoes_only_unfinished_angles(handmade, monkeypatch):
    tmp, data, frames, *_ = handmade
    m = load(tmp, data)
    real = ingest_write._write_tile

    def dies_on_angle_3(*args, **kwargs):
        if args[3] == 3:
            raise OSError("worker killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(ingest_write, "_write_tile", dies_on_angle_3)
    import dask

    # the particle fails alone (named, with the error), the store stays resumable
    with dask.config.set(scheduler="sync"), pytest.raises(IngestError, match="worker killed"):
        ingest(m)
    with pytest.raises(IncompleteError, match=r"angle indices \[.*3.*\] not ingested"):
        open_raw(m.output_dir, "p1")
    done = zarr.open_array(str(m.output_dir / "raw.zarr/p1/done"), mode="r")[:]
    assert done[3] == 0 and (done != 0).sum() >= 1  # the angles written before the crash count
    # each finished angle kept its own source record (the run stopped before recording them all)
    group = m.output_dir / "raw.zarr/p1"
    assert not (read_attrs(group) or {}).get("sources")
    finished = [a for a in range(len(done)) if done[a]]
    for a in finished:
        kept = read_attrs(group / "angle_sources" / str(a))
        assert kept["path"].endswith(f"angle_{a:03d}.h5")
        assert kept["sha256"] == sha256_file(kept["path"])
    monkeypatch.setattr(ingest_write, "_write_tile", real)
    hashed = []

    def counted(path):
        hashed.append(os.path.basename(path))
        return sha256_file(path)

    monkeypatch.setattr(ingest_records, "sha256_file", counted)
    summary = ingest(m)
    assert summary["p1"]["angles_written"] == (done == 0).sum()
    # only the angles written now were hashed: the finished ones' records were kept
    assert sorted(hashed) == [f"angle_{a:03d}.h5" for a in range(len(done)) if not done[a]]
    sources = read_attrs(group)["sources"]
    for a in finished:
        assert sources[a] == read_attrs(group / "angle_sources" / str(a))
    assert all(rec["sha256"] == sha256_file(rec["path"]) for rec in sources)
    assert np.array_equal(open_raw(m.output_dir, "p1").frames.values, frames)
    assert ingest(m)["p1"]["status"] == "up to date"


def test_an_old_store_without_angle_records_is_recorded_by_hashing(handmade, monkeypatch):
    """Angles finished before an interrupt in a store from before angles kept their records."""
    tmp, data, *_ = handmade
    m = load(tmp, data)
    ingest(m)
    group = zarr.open_group(str(m.output_dir / "raw.zarr/p1"), mode="r+")
    expected = dict(group.attrs)["sources"]
    del group["angle_sources"]
    group.attrs.put({**dict(group.attrs), "sources": [None] * len(expected)})
    hashed = []

    def counted(path):
        hashed.append(path)
        return sha256_file(path)

    monkeypatch.setattr(ingest_records, "sha256_file", counted)
    assert ingest(m)["p1"]["status"] == "up to date"
    assert len(hashed) == len(expected)
    got = read_attrs(m.output_dir / "raw.zarr/p1")["sources"]
    assert [r["sha256"] for r in got] == [r["sha256"] for r in expected]


def test_half_written_angle_never_counts_as_done(handmade):
    tmp, data, frames, *_ = handmade
    m = load(tmp, data)
    ingest(m)
    group = zarr.open_group(str(m.output_dir / "raw.zarr" / "p1"), mode="r+")
    # simulate a crash after some shards of angle 2 were overwritten but before its done mark
    group["frames"][2, :4, :4] = 999
    group["done"][2] = 0
    assert ingest(m)["p1"]["angles_written"] == 1
    assert np.array_equal(open_raw(m.output_dir, "p1").frames.values, frames)


def test_changed_source_file_is_reingested(handmade):
    tmp, data, frames, monitor, xrf = handmade
    m = load(tmp, data)
    ingest(m)
    new = frames.copy()
    new[4] += 1
    write_angle_files(tmp, new[4:5], name="tmp", monitor=monitor[4:5], xrf=xrf[4:5])
    shutil.copy(tmp / "raw/tmp/angle_000.h5", tmp / "raw/p1/angle_004.h5")
    st = os.stat(tmp / "raw/p1/angle_004.h5")
    os.utime(tmp / "raw/p1/angle_004.h5", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert ingest(m)["p1"]["angles_written"] == 1
    assert np.array_equal(open_raw(m.output_dir, "p1").frames.values[4], new[4])


def test_aborted_scan(tmp_path, caplog):
    frames = np.random.default_rng(0).integers(1, 9, size=(3, 3, 4, 5, 5), dtype=np.uint16)
    write_angle_files(tmp_path, frames)
    with h5py.File(tmp_path / "raw/p1/angle_001.h5", "r+") as f:  # aborted after 10 of 12 points
        d = f["/entry/instrument/detector/data"][:10]
        del f["/entry/instrument/detector/data"]
        f.create_dataset("/entry/instrument/detector/data", data=d)
    data = manifest_dict(n_angles=3, scan_shape=(3, 4))
    with pytest.raises(
        IngestError,
        match=r"angle_001.h5 has 10 frames, scan_shape 3×4 needs 12; "
        r"set `allow_incomplete = true`",
    ):
        ingest(load(tmp_path, data))
    data["scans"][0]["allow_incomplete"] = True
    with caplog.at_level(logging.WARNING, logger="spndi_dask"):
        ingest(load(tmp_path, data))
    assert "aborted scans" in caplog.text
    ds = open_raw(load(tmp_path, data).output_dir, "p1")
    valid = ds.valid.values
    assert valid[1].sum() == 10 and not valid[1, 2, 2:].any() and valid[[0, 2]].all()
    assert (ds.frames.values[1, 2, 2:] == 0).all()
    assert np.array_equal(
        ds.frames.values[1].reshape(12, 5, 5)[:10], frames[1].reshape(12, 5, 5)[:10]
    )
    assert ds.attrs["incomplete_angles"] == [1]


def test_missing_angle_files_are_all_listed(handmade):
    tmp, data, *_ = handmade
    (tmp / "raw/p1/angle_001.h5").unlink()
    (tmp / "raw/p1/angle_003.h5").unlink()
    with pytest.raises(
        IngestError, match=r"2 of 5 angle files are missing:\n.*angle_001.h5\n.*angle_003"
    ):
        ingest(load(tmp, data))


def test_wrong_dataset_lists_existing(handmade):
    tmp, data, *_ = handmade
    data["scans"][0]["dataset"] = "/entry/data/data"
    with pytest.raises(
        IngestError,
        match=r"no dataset '/entry/data/data'.*\n.*"
        r"/entry/instrument/detector/data \(42, 9, 10\)",
    ):
        ingest(load(tmp, data))
    data["scans"][0]["dataset"] = "/entry/instrument/detector/data"
    data["scans"][0]["monitor"] = "/entry/Io"
    with pytest.raises(IngestError, match=r"no dataset '/entry/Io' \(monitor\)"):
        ingest(load(tmp, data))


def test_detector_shape_or_dtype_change(tmp_path):
    frames = np.ones((3, 2, 2, 4, 4), np.uint16)
    write_angle_files(tmp_path, frames)
    write_angle_files(tmp_path, np.ones((1, 2, 2, 4, 5), np.uint16), name="odd")
    shutil.copy(tmp_path / "raw/odd/angle_000.h5", tmp_path / "raw/p1/angle_002.h5")
    data = manifest_dict(n_angles=3, scan_shape=(2, 2))
    with pytest.raises(IngestError, match=r"angle_002.h5 \(index 2\) has frames \(4, 5\) uint16"):
        ingest(load(tmp_path, data))
    write_angle_files(tmp_path, np.ones((1, 2, 2, 4, 4), np.uint32), name="odd")
    shutil.copy(tmp_path / "raw/odd/angle_000.h5", tmp_path / "raw/p1/angle_002.h5")
    with pytest.raises(IngestError, match=r"\(4, 4\) uint32, but .*angle_000.h5 \(index 0\)"):
        ingest(load(tmp_path, data))


def test_truncated_file(handmade):
    tmp, data, *_ = handmade
    path = tmp / "raw/p1/angle_002.h5"
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(
        IngestError, match=r"angle_002.h5 cannot be read as HDF5.*truncated or corrupt"
    ):
        ingest(load(tmp, data))


def test_corrupt_frame_data_fails_that_particle_only(tmp_path):
    frames = np.random.default_rng(0).integers(0, 50, size=(2, 4, 4, 16, 16), dtype=np.uint16)
    write_angle_files(tmp_path, frames, name="good")
    write_angle_files(tmp_path, frames, name="bad")
    path = tmp_path / "raw/bad/angle_001.h5"
    with h5py.File(path, "r") as f:
        offset = f["/entry/instrument/detector/data"].id.get_chunk_info(3).byte_offset
    with open(path, "r+b") as fh:  # scribble over one compressed frame
        fh.seek(offset)
        fh.write(b"\xff" * 64)
    good = manifest_dict("good", n_angles=2, scan_shape=(4, 4))
    bad = manifest_dict("bad", n_angles=2, scan_shape=(4, 4))
    data = {**good, "scans": good["scans"] + bad["scans"]}
    with pytest.raises(IngestError, match=r"1 of 2 scan\(s\).*\n.*bad.*angle_001.h5") as info:
        ingest(load(tmp_path, data))
    assert info.value.summary["good"]["status"] == "ingested"
    assert np.array_equal(open_raw(tmp_path / "results", "good").frames.values, frames)


def test_tiff_stacks(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    frames = np.random.default_rng(4).integers(0, 1000, size=(3, 3, 5, 8, 6), dtype=np.uint16)
    for a in range(3):
        (tmp_path / "tif").mkdir(exist_ok=True)
        tifffile.imwrite(tmp_path / f"tif/a{a}.tif", frames[a].reshape(15, 8, 6))
    data = manifest_dict(n_angles=3, scan_shape=(3, 5))
    data["scans"][0]["frames"] = "tif/a{index}.tif"
    ingest(load(tmp_path, data))
    assert np.array_equal(open_raw(tmp_path / "results", "p1").frames.values, frames)


def test_open_raw_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="spndi ingest"):
        open_raw(tmp_path, "p9")


def test_simulated_beamtime_round_trip(tiny_beamtime, tmp_path):
    out, manifest = tiny_beamtime
    data = manifest.to_dict()
    data["output"] = str(tmp_path / "results")
    m = load(out, data)
    ingest(m)
    import hdf5plugin  # noqa: F401

    p = m.scans[1]
    ds = open_raw(m.output_dir, p.name)
    with h5py.File(p.frame_paths(m.base_dir)[4]) as f:
        src = f["/entry/instrument/detector/data"][:]
        io = f["/entry/instrument/monitor/Io"][:]
    assert np.array_equal(ds.frames.values[4].reshape(src.shape), src)
    assert np.array_equal(ds.monitor.values[4].reshape(-1), io)


@pytest.mark.parametrize("what", ["file", "folder"])
def test_an_unrelated_raw_zarr_is_refused_before_anything_is_written(handmade, what):
    from spndi_dask.io.layout import ForeignOutputError

    tmp, data, *_ = handmade
    m = load(tmp, data)
    foreign = m.layout.raw
    m.output_dir.mkdir()
    if what == "file":
        foreign.write_text("not spndi's")
    else:
        (foreign / "p1").mkdir(parents=True)
        (foreign / "p1" / "notes.txt").write_text("not spndi's")
    with pytest.raises(ForeignOutputError) as info:
        ingest(m)
    assert str(foreign) in str(info.value) and "`output`" in str(info.value)
    assert [p.name for p in m.output_dir.iterdir()] == ["raw.zarr"]
    if what == "file":
        assert foreign.read_text() == "not spndi's"
    else:
        assert [p.name for p in foreign.rglob("*")] == ["p1", "notes.txt"]


@pytest.mark.parametrize("bad", [0.0, np.nan])
def test_a_monitor_without_flux_at_one_angle_is_refused_before_writing(handmade, bad):
    tmp, data, frames, monitor, xrf = handmade
    monitor = monitor.copy()
    monitor[2] = bad  # every point of angle 2: normalising would divide by it
    write_angle_files(tmp, frames, monitor=monitor, xrf=xrf)
    m = load(tmp, data)
    with pytest.raises(IngestError) as info:
        ingest_mod.plan_ingest(m, m.scans[0])
    msg = str(info.value)
    assert "scan 'p1'" in msg and "angle_002.h5" in msg and "angle index 2" in msg
    assert "/entry/instrument/monitor/Io" in msg and "every scan point" in msg
    assert "fix the file" in msg and "remove `monitor`" in msg and "angles_deg" in msg
    with pytest.raises(IngestError, match=r"angle_002\.h5"):
        ingest(m)
    assert not m.layout.raw_node("p1").exists()  # nothing of the particle was written


def test_a_monitor_with_some_zero_points_is_ingested(handmade):
    tmp, data, frames, monitor, xrf = handmade
    monitor = monitor.copy()
    monitor[1, 2, 3] = monitor[4, 0, 0] = 0.0  # beam lost for a moment: reduce masks them
    write_angle_files(tmp, frames, monitor=monitor, xrf=xrf)
    m = load(tmp, data)
    assert ingest(m)["p1"]["status"] == "ingested"
    assert np.array_equal(open_raw(m.output_dir, "p1").monitor.values, monitor)


# -- scans split across files, scan axes first in the dataset -------------------------------
MONITOR, XRF = "/entry/instrument/monitor/Io", "/entry/instrument/xrf/Co_K"


def write_split_files(root, frames, monitor, xrf, cuts, *, four_d=False, tiff=False):
    """Write each angle of ``frames (angle, y, x, r, c)`` as several files, cut at the flat
    point indices ``cuts``: ``(rows, cols, r, c)`` datasets (``four_d``; cuts at whole rows),
    or TIFF stacks. Returns the manifest's ``frames`` list."""
    import tifffile

    n_angle, ny, nx = frames.shape[:3]
    listing = []
    for a in range(n_angle):
        flat = frames[a].reshape(ny * nx, *frames.shape[3:])
        bounds = [0, *cuts, ny * nx]
        names = []
        for k, (lo, hi) in enumerate(itertools.pairwise(bounds)):
            name = f"split/p1/angle_{a:03d}_{k}.{'tif' if tiff else 'h5'}"
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            if tiff:
                tifffile.imwrite(root / name, flat[lo:hi], photometric="minisblack")
            else:
                part = flat[lo:hi]
                if four_d:
                    part = part.reshape((hi - lo) // nx, nx, *part.shape[1:])
                with h5py.File(root / name, "w") as f:
                    f.create_dataset(
                        "/entry/instrument/detector/data",
                        data=part,
                        chunks=(1,) * (part.ndim - 2) + part.shape[-2:],
                    )
                    f.create_dataset(MONITOR, data=monitor[a].reshape(-1)[lo:hi])
                    f.create_dataset(XRF, data=xrf[a].reshape(-1)[lo:hi])
            names.append(name)
        listing.append(names)
    return listing


def _store(m):
    g = zarr.open_group(str(m.output_dir / "raw.zarr" / "p1"), mode="r")
    return {k: g[k][...] for k in ("frames", "monitor", "xrf", "valid", "det_sum")}


def test_a_scan_split_across_files_ingests_bit_for_bit_as_one_file(handmade):
    tmp, data, frames, monitor, xrf = handmade
    whole = load(tmp, data)
    ingest(whole)
    expected = _store(whole)
    # 42 points per angle in files of 5, 20 and 17 points: tiles cross the file boundaries
    data["scans"][0]["frames"] = write_split_files(tmp, frames, monitor, xrf, [5, 25])
    data["output"] = "results_split"
    m = load(tmp, data)
    assert ingest(m)["p1"]["status"] == "ingested"
    got = _store(m)
    for name, value in expected.items():
        assert np.array_equal(got[name], value), name
    src = open_raw(m.output_dir, "p1").attrs["sources"][3]
    assert [part["path"].rsplit("/", 1)[1] for part in src["parts"]] == [
        "angle_003_0.h5",
        "angle_003_1.h5",
        "angle_003_2.h5",
    ]
    assert [part["n_points"] for part in src["parts"]] == [5, 20, 17] and src["n_points"] == 42
    assert all(part["sha256"] == sha256_file(part["path"]) for part in src["parts"])
    assert ingest(m)["p1"]["status"] == "up to date"


def test_scan_axes_first_ingest_bit_for_bit_as_a_stack(handmade):
    tmp, data, frames, monitor, xrf = handmade
    whole = load(tmp, data)
    ingest(whole)
    expected = _store(whole)
    # (rows, cols, r, c) datasets, one file of 2 rows and one of 4 per angle
    data["scans"][0]["frames"] = write_split_files(tmp, frames, monitor, xrf, [14], four_d=True)
    data["output"] = "results_4d"
    m = load(tmp, data)
    ingest(m)
    got = _store(m)
    for name, value in expected.items():
        assert np.array_equal(got[name], value), name
    # one 4-D file per angle
    data["scans"][0]["frames"] = write_split_files(tmp, frames, monitor, xrf, [], four_d=True)
    data["output"] = "results_4d1"
    m = load(tmp, data)
    ingest(m)
    assert np.array_equal(_store(m)["frames"], expected["frames"])


def test_a_list_of_tiff_stacks_per_angle(tmp_path):
    frames = np.random.default_rng(4).integers(0, 1000, size=(3, 3, 5, 8, 6), dtype=np.uint16)
    data = manifest_dict(n_angles=3, scan_shape=(3, 5))
    data["scans"][0]["frames"] = write_split_files(tmp_path, frames, None, None, [4, 11], tiff=True)
    ingest(load(tmp_path, data))
    assert np.array_equal(open_raw(tmp_path / "results", "p1").frames.values, frames)


def test_the_files_of_one_angle_must_share_the_detector(handmade):
    tmp, data, frames, monitor, xrf = handmade
    listing = write_split_files(tmp, frames, monitor, xrf, [20])
    with h5py.File(tmp / listing[2][1], "w") as f:
        f.create_dataset("/entry/instrument/detector/data", data=np.zeros((22, 9, 11), np.uint16))
    data["scans"][0]["frames"] = listing
    with pytest.raises(IngestError) as info:
        ingest(load(tmp, data))
    msg = str(info.value)
    assert "angle_002_1.h5 (part 2 of the angle's 2 files) has frames (9, 11) uint16" in msg
    assert "angle_002_0.h5 (part 1) has (9, 10) uint16" in msg and "`frames`" in msg
    # a part with too few monitor values names that file
    listing = write_split_files(tmp, frames, monitor, xrf, [20])
    with h5py.File(tmp / listing[1][0], "r+") as f:
        del f[MONITOR]
        f[MONITOR] = np.ones(19)
    with pytest.raises(IngestError, match=r"angle_001_0.h5:.*Io \(monitor\) has 19 values for 20"):
        ingest(load(tmp, data))


def test_a_split_angle_is_unchanged_while_all_its_files_are(handmade):
    from spndi_dask.provenance import input_fingerprints
    from spndi_dask.status import scan_status

    tmp, data, frames, monitor, xrf = handmade
    data["scans"][0]["frames"] = write_split_files(tmp, frames, monitor, xrf, [5, 25])
    m = load(tmp, data)
    ingest(m)
    assert scan_status(m)["p1"]["ingest"] == ("done", "")
    rows = [r for r in input_fingerprints(m) if r["role"].startswith("frames 1")]
    assert [r["role"] for r in rows] == [f"frames 1 (file {k} of 3)" for k in (1, 2, 3)]
    assert {r["vs_ingest"] for r in rows} == {"same"}
    # touched (same content): nothing written again, the record follows the new time
    part = tmp / "split/p1/angle_001_1.h5"
    st = os.stat(part)
    os.utime(part, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert "angle_001_1.h5 changed since ingest" in scan_status(m)["p1"]["ingest"][1]
    assert ingest(m)["p1"]["status"] == "up to date"
    rec = open_raw(m.output_dir, "p1").attrs["sources"][1]["parts"][1]
    assert rec["mtime_ns"] == st.st_mtime_ns + 10**9
    assert scan_status(m)["p1"]["ingest"] == ("done", "")
    # one file's content changed: that angle only is written again
    new = frames.copy()
    new[1] += 1
    write_split_files(tmp, new, monitor, xrf, [5, 25])
    for a in (0, 2, 3, 4):  # rewritten with the same content, a later time: unchanged
        for k in range(3):
            p = tmp / f"split/p1/angle_{a:03d}_{k}.h5"
            st = os.stat(p)
            os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 2 * 10**9))
    summary = ingest(m)
    assert summary["p1"]["angles_written"] == 1
    assert np.array_equal(open_raw(m.output_dir, "p1").frames.values, new)
    # a folder moved whole: nothing read again
    shutil.move(tmp / "split", tmp / "moved")
    data["scans"][0]["frames"] = [
        [n.replace("split/", "moved/") for n in names] for names in data["scans"][0]["frames"]
    ]
    m2 = load(tmp, data)
    assert ingest(m2)["p1"]["status"] == "up to date"
    # a part missing, or one more file for an angle
    (tmp / "moved/p1/angle_004_2.h5").unlink()
    with pytest.raises(IngestError, match=r"1 of 15 angle files are missing:\n.*angle_004_2.h5"):
        ingest(m2)


def test_reading_a_tile_reads_only_its_points(tmp_path):
    """A tile's frames come from HDF5 hyperslabs of the points it needs (across files), never
    from a whole file: the Python heap's peak stays at the tile, far below the files."""
    import tracemalloc

    from spndi_dask.io.sources import probe_source

    rng = np.random.default_rng(0)
    ny, nx, shape = 80, 50, (64, 64)
    frames = rng.integers(0, 60000, size=(ny * nx, *shape), dtype=np.uint16)  # 32 MiB
    files = []
    for k, (lo, hi) in enumerate([(0, 40 * nx), (40 * nx, ny * nx)]):  # two (rows, cols, r, c)
        files.append(tmp_path / f"part{k}.h5")
        with h5py.File(files[-1], "w") as f:
            f.create_dataset(
                "data", data=frames[lo:hi].reshape(-1, nx, *shape), chunks=(1, 1, *shape)
            )
    info = probe_source(files, "data")
    file_bytes = sum(p.stat().st_size for p in files)
    # a 2-row band across the file boundary in snake order (every other row reversed)
    idx = ingest_write._point_index(slice(39, 41), slice(0, nx), nx, "snake")
    tile_bytes = idx.size * shape[0] * shape[1] * 2
    tracemalloc.start()
    try:
        block, lo, hi = ingest_write._read_tile(info, "data", idx, shape, np.dtype(np.uint16))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert np.array_equal(block, frames[idx])
    assert (lo, hi) == (39 * nx, 41 * nx)
    print(
        f"tile {tile_bytes / 2**20:.2f} MiB, peak {peak / 2**20:.2f} MiB, files "
        f"{file_bytes / 2**20:.1f} MiB"
    )
    assert peak < 2.2 * tile_bytes and peak < file_bytes / 15
    # a raster band of as many points inside one file is one read without a copy
    idx = ingest_write._point_index(slice(4, 6), slice(0, nx), nx, "raster")
    tracemalloc.start()
    try:
        block, *_ = ingest_write._read_tile(info, "data", idx, shape, np.dtype(np.uint16))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert np.array_equal(block, frames[idx])
    assert peak < 1.1 * tile_bytes
