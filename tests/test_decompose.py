"""PCA and NMF of the patterns: fits, lazy projection, clustering on them, report, settings."""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr
import zarr
from threadpoolctl import threadpool_limits

from spndi_dask.cluster import ClusterError, cluster
from spndi_dask.config import ManifestError, load_manifest
from spndi_dask.decompose import (
    DecomposeError,
    decompose,
    fit_decomposition,
    loading_array,
    pattern_rows,
    project_patterns,
)
from spndi_dask.pipeline import RunOptions, run
from spndi_dask.reduce import open_results
from spndi_dask.simulate.truth import cluster_ari_vs_truth

from .conftest import RaiseOnCompute, load


@pytest.fixture(scope="module")
def decomposed(tmp_path_factory):
    """The tiny beamtime (2 scans, 3 domain types) on a 16³ grid, segmented and decomposed."""
    from spndi_dask.ingest import ingest
    from spndi_dask.particles import stats
    from spndi_dask.reduce import reduce
    from spndi_dask.simulate import preset, simulate_beamtime

    root = tmp_path_factory.mktemp("decompose")
    simulate_beamtime(root, preset("tiny"), scheduler="sync")
    path = root / "beamtime.toml"
    path.write_text(path.read_text().replace("pattern_grid = 32", "pattern_grid = 16"))
    m = load_manifest(path)
    ingest(m)
    reduce(m)
    stats(m, figures=False)
    # OpenBLAS threads on such small matrices only wait for each other on a busy machine
    with threadpool_limits(1):
        summary = decompose(m)
    return root, m, summary


def _with(m, **cluster_settings):
    return m.model_copy(update={"cluster": m.cluster.model_copy(update=cluster_settings)})


def test_pca_is_orthonormal_with_variance_below_one_and_nmf_non_negative_and_close(decomposed):
    _, m, summary = decomposed
    assert summary["status"] == "decomposed" and summary["sample"] == 136  # every particle pixel
    ds = xr.open_zarr(m.layout.decomposition, consolidated=False)
    comps = ds["pca_components"].values.reshape(ds.sizes["pca_component"], -1)
    assert comps.shape == (8, 16**3)
    assert np.allclose(comps @ comps.T, np.eye(8), atol=1e-5)
    ratio = ds["pca_explained_variance_ratio"].values
    assert 0 < ratio.sum() <= 1 and np.all(np.diff(ratio) <= 1e-12)
    nmf = ds["nmf_components"].values
    assert nmf.shape == (6, 16, 16, 16) and nmf.min() >= 0 and nmf.max() > 0
    # 6 NMF components beat the best one-pattern fit (every row ~ the mean row times a scale)
    from spndi_dask.features.train import sample_patterns

    rows, _ = pattern_rows(sample_patterns(m, size=10_000, seed=0).patterns)
    mean = rows.mean(axis=0)
    scale = rows @ mean / (mean @ mean)
    one = np.linalg.norm(rows - scale[:, None] * mean) / np.linalg.norm(rows)
    assert summary["nmf_error"] < 0.9 * one, (summary["nmf_error"], one)
    assert ds.attrs["nmf_error"] == summary["nmf_error"]


def test_stored_loadings_are_the_projection_of_every_particle_pixel(decomposed):
    _, m, _ = decomposed
    comp = xr.open_zarr(m.layout.decomposition, consolidated=False)
    c = comp["pca_components"].values.reshape(8, -1)
    mu = comp["pca_mean"].values.reshape(-1)
    for p in m.scans:
        ds = open_results(m.output_dir, p.name)
        inside = ds["label"].values > 0
        pca, nmf = ds["pca_loading"].values, ds["nmf_loading"].values
        assert ds["pca_loading"].dims == ("y", "x", "pca_component")
        assert np.isnan(pca[~inside]).all() and np.isfinite(pca[inside]).all()
        assert np.isnan(nmf[~inside]).all() and (nmf[inside] >= 0).all()
        rows, _ = pattern_rows(ds["pattern"].values[inside])
        assert np.allclose(pca[inside], (rows - mu) @ c.T, atol=1e-4)
        assert ds.attrs["decompose"]["pixels"] == int(inside.sum())


def test_dask_projection_equals_scikit_learn_in_memory_and_stays_lazy(decomposed):
    _, m, _ = decomposed
    ds = open_results(m.output_dir, m.scans[0].name)
    pat, inside = ds["pattern"].values, ds["label"].values > 0
    rows, _ = pattern_rows(pat[inside])
    with threadpool_limits(1):
        models = [
            fit_decomposition(rows, "pca", 4, seed=1),
            fit_decomposition(rows, "nmf", 3, seed=1),
        ]
    with dask.config.set(scheduler=RaiseOnCompute()):  # nothing computes until asked
        lazy = loading_array(ds["pattern"].data, ds["label"].data > 0, models)
        small = loading_array(
            da.from_array(pat, chunks=(5, 6, -1, -1, -1)), da.from_array(inside, chunks=4), models
        )
    assert isinstance(lazy, da.Array) and lazy.shape == (*inside.shape, 7)
    assert small.chunks[:2] == ((5, 5, 2), (6, 6, 2))
    with threadpool_limits(1):
        ref = np.concatenate([mod.transform(rows) for mod in models], axis=1)
        for got in (lazy.compute(), small.compute(), project_patterns(pat, models, inside)):
            assert np.isnan(got[~inside]).all()
            # PCA: the same product; NMF: coordinate descent stops by a tolerance per block
            assert np.allclose(got[inside][:, :4], ref[:, :4], atol=1e-5)
            assert np.abs(got[inside][:, 4:] - ref[:, 4:]).max() <= 1e-2 * ref[:, 4:].max()


@pytest.mark.parametrize(("features", "ari_min"), [("pca", 0.5), ("nmf", 0.4), ("moments", 0.5)])
def test_clustering_on_decomposition_or_moments_finds_the_true_domains(
    decomposed, features, ari_min
):
    root, m, _ = decomposed
    mm = _with(m, features=features)
    s = cluster(mm, k=3, figures=False)
    assert s["status"] == "clustered" and s["features"] == features
    # domain interiors only (a boundary pixel's probe sees two domains); chance is ARI ≈ 0
    assert cluster_ari_vs_truth(m, root / "ground_truth") >= ari_min
    meta = dict(zarr.open_group(str(m.layout.results)).attrs)["clusters"]
    assert meta["features"] == features
    assert cluster(mm, k=3, figures=False)["status"] == "up to date"


def test_changing_the_features_reclusters_and_missing_features_name_the_command(decomposed):
    _, m, _ = decomposed
    cluster(_with(m, features="pca"), k=2, figures=False)
    assert cluster(_with(m, features="nmf"), k=2, figures=False)["status"] == "clustered"
    with pytest.raises(ClusterError, match=r"'p1' has no latent vectors; run `spndi encode`"):
        cluster(_with(m, features="latent"), k=2, figures=False)


def test_up_to_date_and_clear_errors(decomposed, tmp_path):
    _, m, _ = decomposed
    assert decompose(m, figures=False)["status"] == "up to date"
    with pytest.raises(DecomposeError, match=r"\['nope'\] are not in the manifest"):
        decompose(m, scans=["nope"])
    with pytest.raises(ValueError, match="unknown decomposition 'ica'"):
        fit_decomposition(np.ones((3, 4)), "ica", 2)


def test_settings_are_validated_naming_the_field(tmp_path):
    from .conftest import manifest_dict

    data = manifest_dict(n_angles=3, scan_shape=(2, 2))
    with pytest.raises(ManifestError, match=r"cluster\.features = 'pcaa': must be 'latent'"):
        load(tmp_path, {**data, "cluster": {"features": "pcaa"}})
    with pytest.raises(ManifestError, match=r"decompose\.pca_components = 0: must be ≥ 1"):
        load(tmp_path, {**data, "decompose": {"pca_components": 0}})
    with pytest.raises(ManifestError, match=r"features = 'nmf'.*\[decompose\] run = 'never'"):
        load(tmp_path, {**data, "cluster": {"features": "nmf"}, "decompose": {"run": "never"}})
    m = load(tmp_path, data)
    assert (m.cluster.features, m.decompose.run, m.decompose.pca_components) == (
        "latent",
        "auto",
        8,
    )


def test_run_decomposes_only_when_the_features_need_it_and_the_report_shows_it(decomposed):
    _, m, _ = decomposed
    quiet = RunOptions(figures=False, progress=False)
    results = run(_with(m, features="moments", k=2), stages="decompose-report", options=quiet)
    status = {r.stage: r.status for r in results}
    assert status == {
        "decompose": "not needed",
        "cluster": "clustered",
        "analyze": "done",
        "report": "written",
    }
    results = run(_with(m, features="pca", k=2), stages="decompose-cluster", options=quiet)
    assert [r.status for r in results] == ["up to date", "clustered"]
    html = m.layout.report.read_text()
    assert "Decomposition: PCA and NMF" in html and "Decomposition not run" not in html
    for fig in ("decomposition_variance.png", "decomposition_loadings.png"):
        assert (m.layout.figures / fig).exists()
    assert html.count("data:image/png;base64") >= 3
