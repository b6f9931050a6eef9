"""Detector traits in reduce: module gaps, flagged pixels, pixel masks, saturation, the fill."""

from __future__ import annotations

import dataclasses
import shutil

import h5py
import hdf5plugin  # noqa: F401  (the simulated files are bitshuffle-compressed)
import numpy as np
import pytest
import zarr

from spndi_dask.config import Manifest
from spndi_dask.ingest import ingest
from spndi_dask.kernels import shift_maps
from spndi_dask.reduce import _kernels as K
from spndi_dask.reduce import open_results, plan_particle, reduce, reduce_particle
from spndi_dask.simulate import preset, simulate_beamtime

from .test_reduce import _errors

#: A cross of 2-pixel gap lines through the simulated Bragg peak, off its centre (rows, cols).
GAP_ROWS, GAP_COLS = slice(13, 15), slice(17, 19)


def _manifest(root, **reduce_settings) -> Manifest:
    d = Manifest.from_toml(root / "beamtime.toml").to_dict()
    d["reduce"] = {**d.get("reduce", {}), **reduce_settings}
    return Manifest.from_dict(d, base_dir=root, source=str(root / "beamtime.toml"))


def _edit_frames(m: Manifest, edit) -> None:
    """Apply ``edit(frames, angle)`` to the frames of every angle file of the first particle."""
    p = m.scans[0]
    for a, path in enumerate(p.frame_paths(m.base_dir)):
        with h5py.File(path, "r+") as f:
            data = f[p.dataset]
            frames = data[...]
            edit(frames, a)
            data[...] = frames


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """The tiny simulated particle, written once (not ingested)."""
    root = tmp_path_factory.mktemp("clean")
    simulate_beamtime(root, preset("tiny", n_particles=1), scheduler="sync")
    return root


def _copy(clean, tmp_path, name):
    shutil.copytree(clean, tmp_path / name)
    return tmp_path / name


@pytest.fixture(scope="module")
def gap_runs(clean, tmp_path_factory):
    """The particle reduced as measured, and with a gap cross zeroed in every frame."""
    base = tmp_path_factory.mktemp("gaps")
    shutil.copytree(clean, base / "a")
    shutil.copytree(clean, base / "b")
    m_a, m_b = _manifest(base / "a"), _manifest(base / "b")

    def cross(frames, _a):
        frames[:, GAP_ROWS, :] = 0
        frames[:, :, GAP_COLS] = 0

    _edit_frames(m_b, cross)
    for m in (m_a, m_b):
        ingest(m)
        reduce(m)
    return m_a, m_b


# -- kernels ----------------------------------------------------------------------------------
def test_module_gaps_find_lines_and_crossings_not_dim_regions_or_dead_pixels():
    rng = np.random.default_rng(0)
    total = rng.poisson(30.0, (64, 80)).astype(float)
    truth = np.zeros(total.shape, bool)
    truth[20:22, :] = True  # a 2-px chip gap across the detector
    truth[:, 40:46] = True  # a 6-px module gap crossing it
    truth[50:53, 0:12] = True  # a 3-px gap ending inside the detector
    total[truth] = 0
    total[5, 5] = total[30, 60:63] = 0  # dead pixels: not lines (too short)
    dim = rng.poisson(0.3, (10, 30)).astype(float)  # a dim region, zeros in every row
    total[54:64, 50:80] = dim
    total[56, 50:80] = 0
    gaps = K.module_gaps(total)
    np.testing.assert_array_equal(gaps, truth)
    # wider than max_width: not a gap line (a dark area)
    wide = np.full((40, 40), 30.0)
    wide[10:32, :] = 0
    assert not K.module_gaps(wide).any()
    assert K.module_gaps(wide, max_width=25).sum() == 22 * 40


def test_pixels_beside_a_wide_gap_are_not_hot():
    rng = np.random.default_rng(2)
    det_sum = rng.poisson(40.0, (9, 48, 48)).astype(float)
    det_sum[:, :, 20:26] = det_sum[:, 20:26, :] = 0  # a cross of 6-px gaps
    det_sum[:, 10, 10] = 5000.0  # a real hot pixel
    naive_hot, _ = K.bad_pixels(det_sum)
    # without the gaps known: in their corners most of a 5 × 5 window is 0, so its median is,
    # and the pixels there read as hot
    assert naive_hot.sum() >= 4 + 1 and naive_hot[10, 10]
    gaps = K.module_gaps(det_sum.sum(axis=0))
    assert gaps.sum() == 2 * 48 * 6 - 36
    hot, dead = K.bad_pixels(det_sum, masked=gaps)
    assert np.argwhere(hot).tolist() == [[10, 10]] and not dead.any()


def test_fill_operator_interpolates_across_gaps_and_leaves_wide_holes():
    rows = np.arange(20, dtype=float)[:, None] * np.ones((1, 30))
    image = 3.0 * rows + 7.0  # a ramp across the gap lines: harmonic = linear, exact
    mask = np.zeros(image.shape, bool)
    mask[5:7, :] = True  # 2-px gap across the whole image
    mask[12, 4] = True  # a dead pixel
    mask[14:20, 20:30] = True  # a 6 × 10 hole at the corner: deepest pixel 6 > max_depth
    fill = K.fill_operator(mask)
    got = (fill @ np.where(mask, 0.0, image).ravel()).reshape(image.shape)
    np.testing.assert_allclose(got[5:7], image[5:7], atol=1e-4)  # (weights < 1e-6 dropped)
    assert got[12, 4] == pytest.approx(image[12, 4])
    assert (got[14:20, 20:30] == 0).all()  # not filled: stays masked
    np.testing.assert_array_equal(got[~mask], image[~mask])
    sums = np.asarray(fill.sum(axis=1)).ravel().reshape(mask.shape)
    hole = np.zeros(mask.shape, bool)
    hole[14:20, 20:30] = True
    np.testing.assert_allclose(sums[~hole], 1.0, atol=1e-12)  # weights of a mean
    assert (sums[hole] == 0).all()
    assert fill.nnz < 40 * mask.sum() + image.size  # local weights only
    assert K.fill_operator(np.zeros((3, 3), bool)) is None
    assert K.fill_operator(np.ones((3, 3), bool)).nnz == 0  # nothing to fill from


# -- gaps through the Bragg peak --------------------------------------------------------------
def test_gap_cross_through_the_peak_is_found_and_filled_not_biasing(gap_runs):
    m_a, m_b = gap_runs
    raw = zarr.open_group(str(m_a.layout.raw_node("p1")), mode="r")
    total = np.asarray(raw["det_sum"][...]).sum(axis=0)
    plan_a = plan_particle(m_a, m_a.scans[0])
    r0, r1, c0, c1 = plan_a.roi
    roi = np.where(plan_a.bad, 0, total)[r0:r1, c0:c1]
    gap = np.zeros(total.shape, bool)
    gap[GAP_ROWS, :] = gap[:, GAP_COLS] = True
    # the cross carries a quarter of the peak: a real test of the fill
    assert 0.2 < roi[gap[r0:r1, c0:c1]].sum() / roi.sum() < 0.4

    truth = m_a.base_dir / "ground_truth" / "p1.npz"
    ref = open_results(m_a.output_dir, "p1").compute()
    got = open_results(m_b.output_dir, "p1").compute()
    plan_b = plan_particle(m_b, m_b.scans[0])
    assert got.attrs["masked_pixels"]["module_gaps"] == 2 * 32 + 2 * 32 - 4
    assert (plan_b.bad == (gap | plan_a.bad)).all()
    assert got.attrs["masked_pixels"]["filled_in_roi"] == got.attrs["masked_pixels"]["in_roi"]
    assert any("module gaps 12" in w and "filled" in w for w in got.attrs["warnings"])
    # the naive result: the same masks, the gap left at 0 (no fill)
    naive = reduce_particle(dataclasses.replace(plan_b, fill=None), None).compute()
    e_ref, e_gap, e_naive = (_errors(ds, truth) for ds in (ref, got, naive))
    print("\nno gap", e_ref, "\ngap, filled", e_gap, "\ngap, not filled", e_naive)
    assert e_ref["coverage"] == e_gap["coverage"] == 1.0
    for key in ("d", "tilt_x", "tilt_y"):
        # measured: d 1.86e-4 → 2.08e-4, tilt_x 1.13e-4 → 1.24e-4, tilt_y 1.35e-4 → 1.71e-4
        assert e_gap[key] < 1.35 * e_ref[key], (key, e_ref, e_gap)
        assert e_naive[key] > e_gap[key], (key, e_gap, e_naive)
    # not filled: d 4.65e-4 and tilt_y 3.62e-4, 2.5 × and 2.7 × the error without the gap
    assert e_naive["d"] > 2 * e_ref["d"] and e_naive["tilt_y"] > 2 * e_ref["tilt_y"]
    # the filled pixels are flagged where they carry over 10 % of a pixel's intensity
    filled = (got["quality"].values & 32) > 0
    assert filled[got["valid"].values].mean() > 0.9 and not filled[~got["valid"].values].any()
    assert not ((ref["quality"].values & 32) > 0).any()


# -- flagged pixels and pixel masks -----------------------------------------------------------
def test_flagged_pixels_are_masked_everywhere_with_provenance(clean, tmp_path, gap_runs):
    root = _copy(clean, tmp_path, "flagged")
    m = _manifest(root)

    def flag(frames, a):
        frames[:, 15:17, 12:14] = 65535  # dead in every frame (the uint16 flag value)
        if a == 3:
            frames[40, 18, 15] = 65535  # once: e.g. a count overflow

    _edit_frames(m, flag)
    ingest(m)
    s = reduce(m)
    raw = zarr.open_group(str(m.layout.raw_node("p1")), mode="r")
    assert int(np.asarray(raw["frames"][:, :, :, 15:17, 12:14]).max()) == 0  # stored as 0
    plan = plan_particle(m, m.scans[0])
    assert plan.bad[15:17, 12:14].all() and plan.bad[18, 15]  # masked in every frame
    ds = open_results(m.output_dir, "p1").compute()
    assert ds.attrs["masked_pixels"]["flagged"] == 5
    text = " ".join(s["p1"]["warnings"])
    assert "1 detector pixels held the invalid value in some frames only" in text
    assert "flagged 5" in text  # inside the ROI, filled
    # read as counts of 0 they would pull the centre of mass; masked and filled they do not
    truth = m.base_dir / "ground_truth" / "p1.npz"
    e_ref = _errors(open_results(gap_runs[0].output_dir, "p1").compute(), truth)
    e = _errors(ds, truth)
    for key in ("d", "tilt_x", "tilt_y"):
        assert e[key] < 1.2 * e_ref[key], (key, e_ref, e)


def test_mask_dataset_and_detector_mask_are_combined(clean, tmp_path):
    root = _copy(clean, tmp_path, "masks")
    m = _manifest(root)
    p = m.scans[0]
    for a, path in enumerate(p.frame_paths(m.base_dir)):
        mask = np.zeros((32, 32), np.uint32)
        mask[3, 3] = 2  # dead (in every file)
        mask[:, 30] = 1  # a gap column
        if a == 4:
            mask[5, 5] = 8  # noisy in one file only
        with h5py.File(path, "r+") as f:
            f.create_dataset("/entry/instrument/detector/pixel_mask", data=mask)
    user = np.zeros((32, 32), np.uint8)
    user[7, 7] = user[3, 3] = 1
    np.save(root / "user_mask.npy", user)
    d = m.to_dict()
    d["scans"][0]["mask_dataset"] = "/entry/instrument/detector/pixel_mask"
    d["reduce"] = {"detector_mask": "user_mask.npy"}
    m = Manifest.from_dict(d, base_dir=root, source=str(root / "beamtime.toml"))
    ingest(m)
    s = reduce(m)
    plan = plan_particle(m, m.scans[0])
    masked = plan.masked
    assert masked["mask_dataset"] == 32 + 2 and masked["detector_mask"] == 2
    assert plan.bad[:, 30].all() and plan.bad[[3, 5, 7], [3, 5, 7]].all()
    assert masked["total"] == plan.bad.sum() == 32 + 3 + masked["hot"] + masked["dead"]
    assert "1 pixels are masked in some angle files only" in " ".join(s["p1"]["warnings"])
    ds = open_results(m.output_dir, "p1")
    assert ds.attrs["masked_pixels"] == masked


# -- saturation -------------------------------------------------------------------------------
def test_saturated_voxels_are_masked_per_frame_counted_and_flagged(clean, tmp_path):
    root = _copy(clean, tmp_path, "saturated")
    m = _manifest(root, saturation=5.0)
    ingest(m)
    s = reduce(m)
    plan = plan_particle(m, m.scans[0])
    r0, r1, c0, c1 = plan.roi
    frames = zarr.open_array(str(m.layout.raw_node("p1") / "frames"), mode="r")[...]
    roi = frames[..., r0:r1, c0:c1]
    want = ((roi >= 5) & ~plan.bad[r0:r1, c0:c1]).sum(axis=(1, 2, 3, 4))
    ds = open_results(m.output_dir, "p1").compute()
    assert want.sum() > 300  # the brightest voxels of the peak (up to 12 counts)
    np.testing.assert_array_equal(ds["saturated_voxels"].values, want)  # counted exactly
    # flagged where a saturated voxel enters a pixel of the drift-corrected maps
    counts = ((roi >= 5) & ~plan.bad[r0:r1, c0:c1]).sum(axis=(3, 4)).astype(float)
    shifted = shift_maps(counts[..., None], ds["drift"].values)[..., 0].sum(axis=0)
    flagged = (ds["quality"].values & 16) > 0
    np.testing.assert_array_equal(flagged, shifted > 1e-6)
    assert 0 < flagged.sum() < flagged.size
    note = [w for w in s["p1"]["warnings"] if "saturation level 5 " in w]
    assert note and f"{want.sum()} detector values" in note[0] and "'saturated'" in note[0]
    assert note[0] in ds.attrs["warnings"]


def test_a_raw_store_without_trait_maps_still_reduces(clean, tmp_path, caplog):
    import logging

    root = _copy(clean, tmp_path, "old")
    m = _manifest(root)
    ingest(m)
    group = zarr.open_group(str(m.layout.raw_node("p1")), mode="r+")
    del group["flagged"], group["pixel_mask"]  # as ingested before they were recorded
    with caplog.at_level(logging.WARNING):
        s = reduce(m)
    assert s["p1"]["status"] == "reduced"
    assert "has no `flagged`" in caplog.text and "spndi ingest --force" in caplog.text
    masked = open_results(m.output_dir, "p1").attrs["masked_pixels"]
    assert masked["flagged"] == masked["mask_dataset"] == 0
