"""Analysis of clusters (the original study's cluster notebooks): fast, without a model.

The clusters are made by hand (left and right half of every particle) on the reduced ``tiny``
beamtime, so the tests check what ``analyze`` computes from them, not the clustering.
"""

from __future__ import annotations

import csv

import numpy as np
import pytest
import xarray as xr
import zarr

from spndi_dask import analysis
from spndi_dask.analysis import analyze, region_stats
from spndi_dask.io.results_store import write_map
from spndi_dask.kernels import usable_patterns
from spndi_dask.particles import stats
from spndi_dask.reduce import open_results

from .conftest import reduced_beamtime


def test_region_stats_by_hand():
    region = np.array([[0, 0, 0, 1, 1, -1, 2]])  # 2: the rim, in neither
    d = np.array([[4.0, 4.2, np.nan, 4.5, 4.7, 9.0, 7.0]])  # NaN: not valid, left out
    s = np.array([[-1.0, 1.0, 3.0, 5.0, 5.0, 9.0, 7.0]])
    row = region_stats({"d_spacing": d, "strain": s}, region, ("d_spacing", "strain"))
    assert (row["domain_pixels"], row["boundary_pixels"], row["rim_pixels"]) == (3, 2, 1)
    assert row["domain_d_spacing_mean"] == pytest.approx(4.1)
    assert row["domain_d_spacing_std"] == pytest.approx(0.1)  # population std, as np.std
    assert row["boundary_d_spacing_mean"] == pytest.approx(4.6)
    diff = "diff_domain_minus_boundary"
    assert row[f"{diff}_d_spacing_mean"] == pytest.approx(-0.5)  # the study's sign
    assert row["domain_strain_mean"] == pytest.approx(1.0)
    assert row["domain_strain_std"] == pytest.approx(np.sqrt(8 / 3))
    assert row[f"{diff}_strain_std"] == pytest.approx(np.sqrt(8 / 3) - 0.0)
    # Welch: sample variances 0.02 and 0.02 over 2 pixels each
    assert row[f"{diff}_d_spacing_mean_se"] == pytest.approx(np.sqrt(0.02 / 2 + 0.02 / 2))
    # 2 + 2 pixels: 6 relabellings, 2 as extreme as the observed one -> p = 1/3 (exact test)
    assert row[f"{diff}_d_spacing_mean_p"] == pytest.approx(1 / 3)
    # by default the d-spacing (the original study's quantity), strain and both tilts
    keys = region_stats({k: s for k in ("d_spacing", "strain", "tilt_x", "tilt_y")}, region)
    assert {f"{diff}_d_spacing_mean_p", f"{diff}_tilt_y_std_se"} <= set(keys)


def test_difference_test_detects_a_shift_and_not_noise():
    rng = np.random.default_rng(1)
    a, b = rng.normal(0, 1, 400), rng.normal(0, 1, 300)
    same = analysis.difference_test(a, b, permutations=500, rng=3)
    shifted = analysis.difference_test(a + 0.5, b, permutations=500, rng=3)
    assert same["mean_p"] > 0.05 and shifted["mean_p"] < 0.01
    assert shifted["mean"] == pytest.approx(a.mean() + 0.5 - b.mean())
    assert shifted["mean_se"] == pytest.approx(np.sqrt(1 / 400 + 1 / 300), rel=0.15)
    # seeded: the same p-value twice
    again = analysis.difference_test(a, b, permutations=500, rng=3)
    assert again["mean_p"] == same["mean_p"] and again["std_p"] == same["std_p"]
    assert np.isnan(analysis.difference_test(a, b[:0])["mean"])


def test_region_map_leaves_the_rim_out_of_the_domains():
    c = np.full((7, 9), -1)
    c[1:6, 1:5], c[1:6, 5:8] = 0, 1
    r = analysis.region_map(c, boundary_width=1, rim_width=1)
    assert (r[c < 0] == -1).all()
    assert (r[:, 4:6][c[:, 4:6] >= 0] == 1).all()  # the cluster edge, rim rows included
    assert r[1, 2] == 2 and r[3, 1] == 2 and r[5, 6] == 2  # outline, not a boundary
    assert (r[2:5, 2:4] == 0).all() and r[3, 6] == 0  # interior domains
    assert (analysis.region_map(c, rim_width=0) != 2).all()


@pytest.fixture(scope="module")
def clustered(tmp_path_factory):
    """``tiny`` reduced and segmented; cluster 0 / 1 = left / right half of each particle."""
    out, m = reduced_beamtime(tmp_path_factory, "analysis", "tiny")
    stats(m, figures=False)
    root = m.layout.results
    for p in m.scans:
        ds = open_results(m.output_dir, p.name)
        label = np.asarray(ds["label"].values)
        cols = np.nonzero(label.any(axis=0))[0]
        half = (cols.min() + cols.max()) // 2
        lab = np.where(label > 0, (np.arange(label.shape[1]) > half)[None, :].astype(int), -1)
        write_map(
            root / p.name,
            "cluster",
            lab.astype(np.int32),
            stage="cluster",
            long_name="hand-made clusters",
            fill_value=-1,
            info={"fingerprint": "by-hand"},
        )
    zarr.open_group(str(root), mode="r+").attrs.update(
        {"clusters": {"k": 2, "fingerprint": "by-hand"}}
    )
    return out, m


def test_stats_rocking_curve_is_the_mean_per_pixel_at_each_angle(clustered):
    """The study's per-particle rocking curve, without its one-angle shift."""
    _, m = clustered
    for p in m.scans:
        ds = open_results(m.output_dir, p.name)
        info = ds.attrs["particles"]
        rc, label = ds["rocking_curve"].values, ds["label"].values
        for k, (mean, total) in enumerate(
            zip(info["rocking_curves_mean"], info["rocking_curves"], strict=True), start=1
        ):
            use = (label == k) & np.isfinite(rc).all(axis=0)
            assert np.allclose(mean, rc[:, use].mean(axis=1), rtol=1e-12)
            assert np.allclose(total, np.nansum(np.where(label == k, rc, 0), axis=(1, 2)))
            assert np.argmax(mean) == np.argmax(rc[:, use].sum(axis=1))


def _usable_mean(pat, sel):
    p = pat[sel]
    return p[usable_patterns(p)].mean(axis=0), int(usable_patterns(p).sum())


def test_every_scan_gets_its_curves_patterns_and_statistics(clustered):
    _, m = clustered
    s = analyze(m, boundary_width=1.0, force=True)
    res = xr.open_dataset(s["analysis"], engine="zarr", consolidated=False)
    with open(m.output_dir / "regions.csv", newline="") as f:
        rows = {r["scan"]: r for r in csv.DictReader(f)}
    pooled_pat, pooled_n = 0.0, 0
    for i, p in enumerate(m.scans):
        assert res["scan"].values[i] == p.name
        ds = open_results(m.output_dir, p.name)
        lab, region = ds["cluster"].values, ds["region"].values
        rc = ds["rocking_curve"].values
        # the scan's own angles, in order: the curves are indexed by the same angle (the
        # original notebook read angle i's curve at index i - 1)
        assert np.array_equal(res["scan_angle"][i].values, ds["angle"].values)
        ok = np.isfinite(rc).all(axis=0)
        want = rc[:, (lab >= 0) & ok].mean(axis=1)
        assert np.allclose(res["particle_rocking_curve"][i], want, rtol=1e-12)
        assert np.argmax(res["particle_rocking_curve"][i].values) == np.argmax(want)
        # domains and boundaries of every scan, not only the last one
        for r in (0, 1):
            sel = (region == r) & ok
            assert sel.sum() > 0
            got = res["region_rocking_curve"][i, r]
            assert np.allclose(got, rc[:, sel].mean(axis=1), rtol=1e-12)
            # mean pattern of this scan's region: divided by the patterns used, not by every
            # pixel of the map
            mean, n = _usable_mean(ds["pattern"].values, region == r)
            assert int(res["region_pattern_scan_pixels"][i, r]) == n
            assert np.allclose(res["region_pattern_scan"][i, r], mean, rtol=1e-6, atol=1e-9)
            if r == 0:
                pooled_pat = pooled_pat + mean * n
                pooled_n += n
        for c in (0, 1):
            mean, n = _usable_mean(ds["pattern"].values, lab == c)
            assert int(res["cluster_pattern_scan_pixels"][i, c]) == n
            assert np.allclose(res["cluster_pattern_scan"][i, c], mean, rtol=1e-6, atol=1e-9)
        # regions.csv: d-spacing (the study's quantity) and the difference of the stds
        row = rows[p.name]
        d = ds["d_spacing"].values
        for r, key in ((0, "domain"), (1, "boundary")):
            v = d[(region == r) & np.isfinite(d)]
            assert float(row[f"{key}_d_spacing_mean_A"]) == pytest.approx(v.mean(), rel=1e-5)
            assert float(row[f"{key}_d_spacing_std_A"]) == pytest.approx(v.std(), rel=1e-5)
        diff = float(row["domain_d_spacing_std_A"]) - float(row["boundary_d_spacing_std_A"])
        col = "diff_domain_minus_boundary_d_spacing_std"
        assert float(row[col + "_A"]) == pytest.approx(diff, rel=1e-4, abs=1e-9)
        assert 0 <= float(row[col + "_p"]) <= 1 and float(row[col + "_se_A"]) > 0
        # the particle rim (next to a pixel outside, not a cluster edge) is in neither region
        rim = analysis.rim_mask(lab, 1.0) & (region != 1)
        assert rim.any() and (region[rim] == 2).all() and int(row["rim_pixels"]) == rim.sum()
    assert np.allclose(res["region_pattern"][0], pooled_pat / pooled_n, rtol=1e-6, atol=1e-9)
    assert "cluster_rocking_curve_pooled" in res  # same angles in both scans
    assert (m.output_dir / "figures" / "rocking_curves_by_scan.png").stat().st_size > 5000


def test_scans_with_different_angles_keep_their_own_curves(clustered, monkeypatch):
    """The study's particles had 21 to 41 angles: per-scan curves must not be dropped."""
    _, m = clustered
    real = analysis.open_results
    second = m.scans[1].name

    def fewer_angles(root, name):
        ds = real(root, name)
        return ds.isel(angle=slice(0, 6)) if name == second else ds

    monkeypatch.setattr(analysis, "open_results", fewer_angles)
    s = analyze(m, boundary_width=1.0, force=True)
    res = xr.open_dataset(s["analysis"], engine="zarr", consolidated=False)
    assert "cluster_rocking_curve_pooled" not in res
    n = real(m.output_dir, m.scans[0].name).sizes["angle"]
    assert res.sizes["step"] == n
    assert np.isfinite(res["scan_angle"][0]).all()
    assert np.isfinite(res["scan_angle"][1][:6]).all() and np.isnan(res["scan_angle"][1][6:]).all()
    ds = fewer_angles(m.output_dir, second)
    lab, rc = ds["cluster"].values, ds["rocking_curve"].values
    for c in (0, 1):
        sel = (lab == c) & np.isfinite(rc).all(axis=0)
        got = res["cluster_rocking_curve"][1, c].values
        assert np.allclose(got[:6], rc[:, sel].mean(axis=1)) and np.isnan(got[6:]).all()
    assert (m.output_dir / "figures" / "rocking_curves_by_scan.png").exists()


def test_cluster_detector_images_are_the_mean_frame_over_angles_and_pixels():
    import dask
    import dask.array as da

    from spndi_dask.figures_study import cluster_detector_images

    from .conftest import RaiseOnCompute

    rng = np.random.default_rng(2)
    frames = rng.poisson(5.0, size=(3, 4, 5, 2, 3)).astype(np.uint16)
    lab = np.array([[0, 0, 1, 1, -1]] * 4)
    lab[3] = -1
    with dask.config.set(scheduler=RaiseOnCompute()):  # lazy: nothing computed
        lazy = cluster_detector_images(da.from_array(frames, chunks=(1, 2, 3, 2, 3)), lab, 3)
    assert isinstance(lazy, da.Array) and lazy.shape == (3, 2, 3)
    got = lazy.compute()
    for c in (0, 1):
        want = frames[:, lab == c].astype(float).mean(axis=(0, 1))  # (angle, pixel) -> frame
        assert np.allclose(got[c], want, rtol=1e-12)
    assert np.isnan(got[2]).all()  # no pixel in cluster 2


def test_study_figures_kde_and_detector_images(clustered):
    from spndi_dask.config import AnalysisSettings
    from spndi_dask.figures_study import centred_kde_figure
    from spndi_dask.io.raw_store import open_raw

    _, m = clustered
    with_images = m.model_copy(update={"analysis": AnalysisSettings(detector_images=True)})
    s = analyze(with_images, force=True)
    res = xr.open_dataset(s["analysis"], engine="zarr", consolidated=False)
    for i, p in enumerate(m.scans):
        lab = open_results(m.output_dir, p.name)["cluster"].values
        frames = open_raw(m.output_dir, p.name)["frames"].values
        want = frames[:, lab == 1].astype(float).mean(axis=(0, 1))
        assert np.allclose(res["cluster_detector_image"][i, 1], want, rtol=1e-9)
        path = m.output_dir / "figures" / f"{p.name}_cluster_detector_images.png"
        assert path.stat().st_size > 5000
    datasets = {p.name: open_results(m.output_dir, p.name) for p in m.scans}
    path = centred_kde_figure(datasets, m.output_dir / "figures" / "kde.png")
    assert path.stat().st_size > 5000
