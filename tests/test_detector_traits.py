"""Ingest of detector traits (invalid values, pixel masks in the frame files) and XRF spectra."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import zarr

from spndi_dask.ingest import IngestError, ingest, plan_ingest
from spndi_dask.ingest.write import _flag_invalid
from spndi_dask.io.raw_store import open_raw
from spndi_dask.io.sources import SourceError, XrfSource, probe_xrf, read_xrf

from .conftest import load, manifest_dict, write_angle_files

FLAG32 = 2**32 - 1
MASK = "/entry/instrument/detector/pixel_mask"
SPECTRA = "/entry/instrument/xrf/spectra"
ENERGY = "/entry/instrument/xrf/energy"


def _files(tmp_path, n_angles):
    return [tmp_path / f"raw/p1/angle_{a:03d}.h5" for a in range(n_angles)]


# -- invalid values ---------------------------------------------------------------------------
@pytest.fixture
def flagged_frames(tmp_path):
    """uint32 frames (3 angles, 2 × 3 scan, 6 × 7 detector) with Eiger-style flags."""
    rng = np.random.default_rng(3)
    frames = rng.integers(1, 50, size=(3, 2, 3, 6, 7), dtype=np.uint32)
    frames[:, :, :, 2, :] = FLAG32  # a gap row, flagged in every frame
    frames[1, 0, 2, 4, 5] = FLAG32  # one pixel flagged in one frame only
    frames[2, 1, :, 0, 0] = FLAG32  # a pixel flagged in the 3 frames of one scan row
    write_angle_files(tmp_path, frames)
    return tmp_path, frames


def test_invalid_values_are_stored_as_zero_and_counted_per_angle(flagged_frames):
    tmp, frames = flagged_frames
    m = load(tmp, manifest_dict(n_angles=3, scan_shape=(2, 3)))  # invalid_value = 'auto'
    ingest(m)
    ds = open_raw(m.output_dir, "p1")
    stored = ds.frames.values
    hit = frames == FLAG32
    assert np.array_equal(stored, np.where(hit, 0, frames))
    flagged = ds.flagged.values
    assert flagged.dtype == np.uint32 and flagged.shape == (3, 6, 7)
    # hand count: the gap row in all 6 frames of each angle, (4, 5) once at angle 1,
    # (0, 0) in 3 frames at angle 2
    want = np.zeros((3, 6, 7), np.uint32)
    want[:, 2, :] = 6
    want[1, 4, 5] = 1
    want[2, 0, 0] = 3
    np.testing.assert_array_equal(flagged, want)
    # the detector projection sums the stored frames (never the flag value)
    np.testing.assert_array_equal(ds.det_sum.values, stored.sum(axis=(1, 2), dtype=np.float64))
    assert ds.attrs["invalid_value"] == FLAG32
    assert ds.attrs["flagged_values"] == 3 * 6 * 7 + 1 + 3
    assert ds.attrs["flagged_pixels"] == 7 + 2
    assert [s["flagged_values"] for s in ds.attrs["sources"]] == [42, 43, 45]
    assert not ds.pixel_mask.values.any()  # no mask_dataset: all False, every chunk written


def test_invalid_value_none_or_a_number_and_changing_it_reingests(flagged_frames):
    tmp, frames = flagged_frames
    data = manifest_dict(n_angles=3, scan_shape=(2, 3))
    data["ingest"] = {"invalid_value": "none"}
    m = load(tmp, data)
    ingest(m)
    ds = open_raw(m.output_dir, "p1")
    assert np.array_equal(ds.frames.values, frames) and not ds.flagged.values.any()
    data["ingest"] = {"invalid_value": 49}  # an explicit value: only it is flagged
    m = load(tmp, data)
    assert ingest(m)["p1"]["angles_written"] == 3  # a changed setting writes every angle again
    ds = open_raw(m.output_dir, "p1")
    np.testing.assert_array_equal(ds.flagged.values, (frames == 49).sum(axis=(1, 2)))
    assert np.array_equal(ds.frames.values, np.where(frames == 49, 0, frames))


def test_invalid_value_auto_flags_nothing_in_float_frames(tmp_path):
    frames = np.full((2, 2, 2, 4, 4), 5.0, np.float32)
    frames[0, 0, 0, 1, 1] = float(np.iinfo(np.uint16).max)
    write_angle_files(tmp_path, frames)
    m = load(tmp_path, manifest_dict(n_angles=2, scan_shape=(2, 2)))
    ingest(m)
    ds = open_raw(m.output_dir, "p1")
    assert ds.attrs["invalid_value"] is None and not ds.flagged.values.any()
    assert np.array_equal(ds.frames.values, frames)


def test_flag_helper_counts_per_pixel_and_leaves_other_values():
    block = np.arange(2 * 3 * 4 * 5, dtype=np.uint16).reshape(2, 3, 4, 5)
    block[:, :, 1, 2] = 65535
    block[0, 0, 3, 3] = 65535
    out, counts = _flag_invalid(block.copy(), 65535)
    assert counts[1, 2] == 6 and counts[3, 3] == 1 and counts.sum() == 7
    np.testing.assert_array_equal(out, np.where(block == 65535, 0, block))
    same, none = _flag_invalid(block.copy(), None)
    assert np.array_equal(same, block) and not none.any()


# -- pixel mask in the frame files ------------------------------------------------------------
def _add_mask(tmp_path, masks):
    for path, mask in zip(_files(tmp_path, len(masks)), masks, strict=True):
        with h5py.File(path, "r+") as f:
            f.create_dataset(MASK, data=mask)


def test_mask_dataset_is_recorded_per_angle(tmp_path):
    frames = np.random.default_rng(0).integers(0, 9, size=(3, 2, 2, 5, 6), dtype=np.uint16)
    write_angle_files(tmp_path, frames)
    masks = np.zeros((3, 5, 6), np.uint32)
    masks[:, 0, 1] = 1  # a dead pixel (bit 0) in every file
    masks[:, :, 3] = 8  # a gap column (bit 3)
    masks[2, 4, 4] = 16  # noisy in the last file only
    _add_mask(tmp_path, masks)
    m = load(tmp_path, manifest_dict(n_angles=3, scan_shape=(2, 2), mask_dataset=MASK))
    ingest(m)
    ds = open_raw(m.output_dir, "p1")
    np.testing.assert_array_equal(ds.pixel_mask.values, masks != 0)
    assert ds.attrs["mask_dataset"] == MASK
    assert np.array_equal(ds.frames.values, frames)  # the mask does not change the frames


@pytest.mark.parametrize(
    "mask,match",
    [
        (
            np.zeros((5, 5), np.uint8),
            r"angle_001\.h5:.*pixel_mask \(mask_dataset\) has shape "
            r"\[5, 5\] but the detector frames are \[5, 6\].*remove it",
        ),
        (
            None,
            r"angle_001\.h5 has no dataset '/entry/instrument/detector/pixel_mask' "
            r"\(mask_dataset\).*\n.*/entry/instrument/detector/data",
        ),
    ],
)
def test_a_bad_mask_dataset_names_file_dataset_and_fix(tmp_path, mask, match):
    frames = np.ones((3, 2, 2, 5, 6), np.uint16)
    write_angle_files(tmp_path, frames)
    for a, path in enumerate(_files(tmp_path, 3)):
        with h5py.File(path, "r+") as f:
            if a != 1:
                f.create_dataset(MASK, data=np.zeros((5, 6), np.uint8))
            elif mask is not None:
                f.create_dataset(MASK, data=mask)
    m = load(tmp_path, manifest_dict(n_angles=3, scan_shape=(2, 2), mask_dataset=MASK))
    with pytest.raises(IngestError, match=match):
        plan_ingest(m, m.scans[0])
    with pytest.raises(IngestError, match="scan 'p1'"):
        ingest(m)
    assert not m.layout.raw_node("p1").exists()  # refused before anything was written


def test_mask_dataset_with_tiff_frames_is_refused(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    (tmp_path / "tif").mkdir()
    for a in range(2):
        tifffile.imwrite(
            tmp_path / f"tif/a{a}.tif", np.ones((4, 5, 6), np.uint16), photometric="minisblack"
        )
    data = manifest_dict(n_angles=2, scan_shape=(2, 2), mask_dataset=MASK)
    data["scans"][0]["frames"] = "tif/a{index}.tif"
    with pytest.raises(IngestError, match=r"a0\.tif is a TIFF stack.*\[reduce\] detector_mask"):
        plan_ingest(load(tmp_path, data), load(tmp_path, data).scans[0])


# -- XRF spectra ------------------------------------------------------------------------------
def _spectra(n_points, channels=None, bins=8):
    """``spectra[p, (c,) i] = 100 c + 10 p + i``."""
    p = np.arange(n_points)[:, None]
    i = np.arange(bins)[None, :]
    base = 10 * p + i
    if channels is None:
        return base.astype(np.uint32)
    c = np.arange(channels)[None, :, None]
    return (100 * c + base[:, None, :]).astype(np.uint32)


def _write_spectra(tmp_path, spectra, n_angles=2, energy=None):
    for a, path in enumerate(_files(tmp_path, n_angles)):
        with h5py.File(path, "r+") as f:
            f.create_dataset(SPECTRA, data=spectra + 1000 * a, chunks=(2, *spectra.shape[1:]))
            if energy is not None:
                f.create_dataset(ENERGY, data=energy)


def test_xrf_spectra_are_summed_over_the_window_and_channels(tmp_path):
    frames = np.ones((2, 2, 3, 4, 4), np.uint16)
    write_angle_files(tmp_path, frames)
    # 2 channels, 8 bins at 1.0, 1.5, ..., 4.5 keV; window [2.0, 3.0]: bins 2, 3, 4 (centres on
    # both ends count). Point p of angle a: Σ_c Σ_{i=2..4} (100 c + 10 p + i + 1000 a)
    #   = 3·(0 + 100) + 2·3·10 p + 2·(2 + 3 + 4) + 2·3·1000 a = 318 + 60 p + 6000 a
    _write_spectra(tmp_path, _spectra(6, channels=2))
    data = manifest_dict(
        n_angles=2,
        scan_shape=(2, 3),
        xrf=SPECTRA,
        xrf_window_kev=[2.0, 3.0],
        xrf_calibration={"offset_kev": 1.0, "gain_kev": 0.5},
    )
    m = load(tmp_path, data)
    ingest(m)
    ds = open_raw(m.output_dir, "p1")
    p = np.arange(6).reshape(2, 3)
    want = np.stack([318 + 60 * p + 6000 * a for a in range(2)]).astype(float)
    np.testing.assert_array_equal(ds.xrf.values, want)
    assert ds.attrs["xrf"]["window_kev"] == [2.0, 3.0]


def test_xrf_energy_dataset_and_single_channel_spectra(tmp_path):
    frames = np.ones((2, 2, 2, 4, 4), np.uint16)
    write_angle_files(tmp_path, frames, order="snake")
    # uneven bins; window [2.0, 3.0] holds the centres 2.05, 2.5, 2.95 (bins 3, 4, 5):
    # point p: Σ (10 p + i) = 30 p + 12 (+ 3000 at angle 1)
    energy = np.array([1.0, 1.2, 1.9, 2.05, 2.5, 2.95, 3.1, 4.0])
    _write_spectra(tmp_path, _spectra(4), energy=energy)
    data = manifest_dict(
        n_angles=2,
        scan_shape=(2, 2),
        scan_order="snake",
        xrf=SPECTRA,
        xrf_window_kev=[2.0, 3.0],
        xrf_energy=ENERGY,
    )
    ingest(load(tmp_path, data))
    got = open_raw(tmp_path / "results", "p1").xrf.values
    acquired = 30 * np.arange(4) + 12  # in acquisition order: the second row is reversed
    want = np.array([[acquired[0], acquired[1]], [acquired[3], acquired[2]]])
    np.testing.assert_array_equal(got, np.stack([want, want + 3000]).astype(float))


def test_spectra_are_read_in_chunks(tmp_path, monkeypatch):
    path = tmp_path / "s.h5"
    spectra = _spectra(50, channels=3, bins=40)
    with h5py.File(path, "w") as f:
        f.create_dataset("s", data=spectra, chunks=(4, 3, 40))
    xrf = XrfSource("s", (1.2, 2.0), offset_kev=0.0, gain_kev=0.1)  # bins 12..20
    reads = []
    real = h5py.Dataset.__getitem__

    def spy(self, key):
        out = real(self, key)
        if self.name == "/s":
            reads.append(np.shape(out))
        return out

    monkeypatch.setattr(h5py.Dataset, "__getitem__", spy)
    got = read_xrf(path, xrf, chunk_bytes=8 * 3 * 9 * 4)  # 8 points of 9 bins × 3 channels
    want = spectra[:, :, 12:21].sum(axis=(1, 2))
    np.testing.assert_array_equal(got, want)
    assert len(reads) == 7 and max(r[0] for r in reads) == 8  # whole HDF5 chunks of 4 points
    assert all(r[1:] == (3, 9) for r in reads)  # only the window's bins
    np.testing.assert_array_equal(read_xrf(path, xrf, stop=10), want[:10])


def _xrf_manifest(tmp_path, **xrf_keys):
    frames = np.ones((2, 2, 3, 4, 4), np.uint16)
    write_angle_files(tmp_path, frames)
    return manifest_dict(n_angles=2, scan_shape=(2, 3), xrf=SPECTRA, **xrf_keys)


@pytest.mark.parametrize(
    "keys,energy,match",
    [
        (
            {"xrf_window_kev": [4.0, 5.0], "xrf_calibration": {"offset_kev": 1.0, "gain_kev": 0.5}},
            None,
            r"xrf_window_kev = \[4, 5\] reaches beyond the energy range 0\.75–4\.75 keV of the "
            r"spectra .*angle_000\.h5:/entry/instrument/xrf/spectra \(8 bins, xrf_calibration "
            r"offset 1 \+ 0\.5 keV × bin\); set a window inside",
        ),
        (
            {"xrf_window_kev": [2.1, 2.4], "xrf_calibration": {"offset_kev": 1.0, "gain_kev": 0.5}},
            None,
            r"\[2\.1, 2\.4\] holds no bin centre.*widen the window",
        ),
        (
            {"xrf_window_kev": [2.0, 3.0], "xrf_energy": ENERGY},
            np.linspace(1, 4, 7),
            r"angle_000\.h5:/entry/instrument/xrf/energy \(xrf_energy\) has 7 energies but the "
            r"spectra /entry/instrument/xrf/spectra have 8 bins",
        ),
        (
            {},
            None,
            r"spectra/? \(xrf\) has shape \(6, 8\): spectra of 6 points.*set xrf_window_kev",
        ),
    ],
)
def test_xrf_errors_name_file_dataset_and_fix(tmp_path, keys, energy, match):
    data = _xrf_manifest(tmp_path, **keys)
    _write_spectra(tmp_path, _spectra(6), energy=energy)
    m = load(tmp_path, data)
    with pytest.raises(IngestError, match=r"scan 'p1': .*" + match):
        plan_ingest(m, m.scans[0])


def test_a_map_with_a_window_and_too_few_spectra_are_refused(tmp_path):
    data = _xrf_manifest(
        tmp_path,
        xrf_window_kev=[2.0, 3.0],
        xrf_calibration={"offset_kev": 1.0, "gain_kev": 0.5},
    )
    for path in _files(tmp_path, 2):
        with h5py.File(path, "r+") as f:
            f.create_dataset(SPECTRA, data=np.ones(6))
    m = load(tmp_path, data)
    with pytest.raises(IngestError, match=r"has shape \(6,\); with xrf_window_kev it must hold"):
        plan_ingest(m, m.scans[0])
    for path in _files(tmp_path, 2):
        with h5py.File(path, "r+") as f:
            del f[SPECTRA]
            f.create_dataset(SPECTRA, data=_spectra(5))
    with pytest.raises(IngestError, match=r"has 5 spectra for 6 frames; fix the file"):
        plan_ingest(m, m.scans[0])


def test_probe_xrf_reads_no_spectra(tmp_path, monkeypatch):
    path = tmp_path / "s.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("s", data=_spectra(6, channels=2))
    monkeypatch.setattr(h5py.Dataset, "__getitem__", lambda *a: pytest.fail("spectra were read"))
    xrf = XrfSource("s", (2.0, 3.0), offset_kev=1.0, gain_kev=0.5)
    assert probe_xrf(path, xrf, n_frames=6) == 6
    with pytest.raises(SourceError, match="reaches beyond"):
        probe_xrf(path, XrfSource("s", (0.1, 3.0), offset_kev=1.0, gain_kev=0.5))


def test_xrf_map_still_reads_as_before(handmade):
    tmp, data, _frames, _monitor, xrf = handmade
    ingest(load(tmp, data))
    got = zarr.open_array(str(tmp / "results/raw.zarr/p1/xrf"), mode="r")[...]
    np.testing.assert_array_equal(got, xrf)
