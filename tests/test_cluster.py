"""Clustering: k-means vs ground truth and scikit-learn, K selection, outputs, bad input."""

from __future__ import annotations

import csv
import itertools
from contextlib import contextmanager

import dask.array as da
import numpy as np
import pytest
import xarray as xr
import zarr
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

from spndi_dask.analysis import analyze
from spndi_dask.cli import main
from spndi_dask.cluster import (
    ClusterError,
    assign,
    cluster,
    elbow_k,
    fit_kmeans,
    inertia,
)
from spndi_dask.features import encode, train
from spndi_dask.particles import stats
from spndi_dask.reduce import open_results

from .conftest import reduced_beamtime

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    """Two demo scans (3 domain types) reduced, segmented, encoded with the default model."""
    out, m = reduced_beamtime(tmp_path_factory, "cluster", "demo", n_particles=2)
    stats(m, figures=False)
    train(m)
    encode(m)
    return out, m


def _pooled(out, m, key="cluster"):
    got, truth, boundary, latent = [], [], [], []
    for p in m.scans:
        ds = open_results(m.output_dir, p.name)
        gt = np.load(out / "ground_truth" / f"{p.name}.npz")
        sel = np.asarray(ds[key].values) >= 0
        got.append(ds[key].values[sel])
        truth.append(gt["domain"][sel])
        boundary.append(gt["boundary"][sel])
        latent.append(ds["latent"].values[sel])
    return (np.concatenate(v) for v in (got, truth, boundary, latent))


def test_clusters_find_the_true_domains_and_agree_with_scikit_learn(encoded):
    out, m = encoded
    s = cluster(m, k=3)
    assert s["status"] == "clustered" and s["k"] == 3 and s["k_source"] == "argument"
    got, truth, boundary, latent = _pooled(out, m)
    # domain interiors: a boundary pixel's probe sees two domains, its true label is ambiguous
    ari = adjusted_rand_score(truth[~boundary], got[~boundary])
    assert ari >= 0.9, ari
    lo, hi = latent.min(axis=0), latent.max(axis=0)
    scaled = (latent - lo) / np.where(hi > lo, hi - lo, 1)
    ref = KMeans(3, n_init=4, random_state=0).fit(scaled)
    assert adjusted_rand_score(ref.labels_, got) >= 0.95
    # inertia is the sum of squared distances to the kept centres, and not above scikit-learn's
    meta = dict(zarr.open_group(str(m.output_dir / "results.zarr")).attrs)["clusters"]
    centers = np.asarray(meta["centers_scaled"])
    d2 = ((scaled[:, None, :] - centers[None]) ** 2).sum(-1).min(axis=1).sum()
    assert np.isclose(meta["inertia"], d2, rtol=1e-6)
    assert meta["inertia"] <= ref.inertia_ * 1.001
    assert cluster(m, k=3)["status"] == "up to date"


def test_cluster_maps_table_and_figures(encoded):
    _, m = encoded
    cluster(m, k=3)
    with open(m.output_dir / "clusters.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["scan"], int(r["cluster"])) for r in rows] == [
        (p, c) for p in ("p1", "p2", "all") for c in range(3)
    ]
    for p in m.scans:
        ds = open_results(m.output_dir, p.name)
        lab, inside = ds["cluster"].values, ds["label"].values > 0
        assert ds["cluster"].dims == ("y", "x")
        assert (lab[~inside] == -1).all() and (lab[inside] >= 0).all()
        mine = [r for r in rows if r["scan"] == p.name]
        assert [int(r["pixels"]) for r in mine] == np.bincount(lab[inside], minlength=3).tolist()
        assert np.isclose(sum(float(r["fraction"]) for r in mine), 1.0, atol=1e-5)
        strain = ds["strain"].values[(lab == 1) & np.isfinite(ds["strain"].values)]
        assert np.isclose(float(mine[1]["strain_mean"]), strain.mean(), rtol=1e-4, atol=1e-9)
        tilt = ds["tilt_x"].values[(lab == 1) & np.isfinite(ds["tilt_x"].values)]  # rad
        assert np.isclose(float(mine[1]["tilt_x_mean_mrad"]), 1e3 * tilt.mean(), rtol=1e-6)
        d = ds["d_spacing"].values[(lab == 1) & np.isfinite(ds["d_spacing"].values)]
        assert np.isclose(float(mine[1]["d_spacing_std_A"]), d.std(), rtol=1e-6)
        assert (m.output_dir / "figures" / f"{p.name}_clusters.png").stat().st_size > 5000
    pooled = [int(r["pixels"]) for r in rows if r["scan"] == "all"]
    assert pooled == [sum(int(r["pixels"]) for r in rows[c:6:3]) for c in range(3)]


def test_k_from_the_elbow_rule_with_silhouettes(encoded):
    _, m = encoded
    s = cluster(m, force=True)
    # k_max = "auto": the study's 1..80 for two scans, capped at one K per 100 pixels
    top = min(80, sum(s["pixels"].values()) // 100)
    assert s["k_source"] == "elbow" and set(s["inertia_by_k"]) == set(range(1, top + 1))
    assert s["k"] == elbow_k(s["inertia_by_k"], 0.95) and 3 <= s["k"] <= top
    assert set(s["silhouette"]) == set(range(2, top + 1)) and max(s["silhouette"].values()) > 0.3
    inertias = [s["inertia_by_k"][k] for k in range(1, top + 1)]
    assert all(a > b for a, b in itertools.pairwise(inertias))  # more clusters, less inertia
    assert (m.output_dir / "figures" / "clusters_k.png").exists()


def test_kmeans_plus_plus_init_is_seeded_and_inertia_is_squared():
    rng = np.random.default_rng(4)
    pts = np.concatenate([rng.normal(c, 0.2, (200, 3)) for c in (0.0, 2.0, 5.0)])
    x = da.from_array(pts, chunks=150)
    a = fit_kmeans(x, 3, init="k-means++", n_init=2, seed=7)
    b = fit_kmeans(x, 3, init="k-means++", n_init=2, seed=7)
    assert np.array_equal(a.centers, b.centers) and len(a.restarts) == 2
    d2 = ((pts[:, None] - a.centers[None]) ** 2).sum(-1).min(axis=1).sum()
    assert np.isclose(a.inertia, d2) and a.inertia == min(a.restarts)
    assert sorted(np.round(a.centers[:, 0]).tolist()) == [0.0, 2.0, 5.0]
    # the centres are part of the task keys: two inertias never share a key on a scheduler
    other = a.centers + 1.0
    assert inertia(x, a.centers).name != inertia(x, other).name
    assert assign(x, a.centers).name != assign(x, other).name
    d2_other = ((pts[:, None] - other[None]) ** 2).sum(-1).min(axis=1).sum()
    assert np.isclose(inertia(x, other).compute(), d2_other)
    with pytest.raises(ClusterError, match="K = 700 clusters need at least 700"):
        fit_kmeans(x, 700)


def test_bad_input(encoded):
    _, m = encoded
    with pytest.raises(ClusterError, match=r"K = 100000 clusters but only \d+ pixels"):
        cluster(m, k=100000)
    single = cluster(m, scans=["p1"], k=2, figures=False)
    assert set(single["pixels"]) == {"p1"} and single["pixels"]["p1"] > 0
    # a particle whose latent is all NaN: a warning, a map of -1, the other one clustered
    g = zarr.open_group(str(m.output_dir / "results.zarr" / "p2"), mode="r+")
    keep = g["latent"][:]
    g["latent"][:] = np.nan
    try:
        s = cluster(m, k=2, force=True, figures=False)
    finally:
        g["latent"][:] = keep
    assert s["pixels"]["p2"] == 0 and s["pixels"]["p1"] > 0
    assert any("p2" in w for w in s["warnings"])
    assert (open_results(m.output_dir, "p2")["cluster"].values == -1).all()
    # no latent at all
    del g["latent"]
    try:
        with pytest.raises(ClusterError, match="'p2' has no latent vectors; run `spndi encode`"):
            cluster(m, k=2, force=True)
    finally:
        encode(m, scans=["p2"], force=True)


@contextmanager
def _incomplete(node):
    """The reduce result ``node`` reads as incomplete (an interrupted reduce) inside the block."""
    g = zarr.open_group(str(node), mode="r+")
    meta = dict(g.attrs["spndi_dask"])
    g.attrs["spndi_dask"] = {**meta, "complete": False}
    try:
        yield
    finally:
        g.attrs["spndi_dask"] = meta


def test_an_incomplete_result_is_a_stage_error_not_a_traceback(encoded, capsys):
    _, m = encoded
    with _incomplete(m.output_dir / "results.zarr" / "p2"):
        with pytest.raises(ClusterError, match=r"scan 'p2': .*p2.* is incomplete"):
            cluster(m, k=2, force=True, figures=False)
        assert main(["cluster", str(m.source), "-k", "2", "--workers", "1"]) == 2
        assert "is incomplete" in capsys.readouterr().err
        # encode: that scan fails alone, the other one is encoded
        s = encode(m, force=True)
        assert s["p2"]["status"] == "failed" and "incomplete" in s["p2"]["error"]
        assert s["p1"]["status"] == "encoded"


def test_analysis_curves_patterns_and_regions(encoded):
    out, m = encoded
    cluster(m, k=3)
    s = analyze(m, boundary_width=1.0)
    res = xr.open_dataset(s["analysis"], engine="zarr", consolidated=False)
    pats, labs, regions, truth_b = [], [], [], []
    for p in m.scans:
        ds = open_results(m.output_dir, p.name)
        lab, region = ds["cluster"].values, ds["region"].values
        assert ((region >= 0) == (lab >= 0)).all()
        # per-scan rocking curve of a cluster = mean of its pixels' drift-corrected curves
        i = list(res["scan"].values).index(p.name)
        rc = ds["rocking_curve"].values[:, lab == 1]
        assert np.allclose(res["cluster_rocking_curve"][i, 1], rc.mean(axis=1), rtol=1e-9)
        pats.append(ds["pattern"].values[lab >= 0])
        labs.append(lab[lab >= 0])
        regions.append(region[lab >= 0])
        truth_b.append(np.load(out / "ground_truth" / f"{p.name}.npz")["boundary"][lab >= 0])
    pats, labs, regions, truth_b = map(np.concatenate, (pats, labs, regions, truth_b))
    usable = np.isfinite(pats).all(axis=(1, 2, 3))
    for c in range(3):
        sel = usable & (labs == c)
        assert np.allclose(res["cluster_pattern"][c], pats[sel].mean(axis=0), rtol=1e-5, atol=1e-7)
        assert int(res["cluster_pattern_pixels"][c]) == sel.sum()
    # pixels flagged as boundaries between clusters are mostly the true grain boundaries
    assert truth_b[regions == 1].mean() > 3 * truth_b[regions == 0].mean()
    with open(m.output_dir / "regions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        assert np.isclose(
            float(r["diff_domain_minus_boundary_strain_mean"]),
            float(r["domain_strain_mean"]) - float(r["boundary_strain_mean"]),
            rtol=1e-4,
            atol=1e-9,
        )
        ds = open_results(m.output_dir, r["scan"])
        tilt = ds["tilt_y"].values[(ds["region"].values == 1) & np.isfinite(ds["tilt_y"].values)]
        assert np.isclose(float(r["boundary_tilt_y_mean_mrad"]), 1e3 * tilt.mean(), rtol=1e-6)
        assert 0 <= float(r["diff_domain_minus_boundary_tilt_y_mean_p"]) <= 1  # not scaled
        assert float(r["diff_domain_minus_boundary_tilt_y_mean_se_mrad"]) > 0
    for name in ("cluster_rocking_curves.png", "cluster_patterns.png", "region_patterns.png"):
        assert (m.output_dir / "figures" / name).stat().st_size > 5000
