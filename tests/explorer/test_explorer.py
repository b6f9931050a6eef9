"""The explorer without a browser: the document's data after clicks and selections, laziness,
partial results, errors, the command line and the served page."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import zarr
from bokeh.document import Document
from bokeh.events import Tap

from spndi_dask.config import load_manifest
from spndi_dask.explorer import ExplorerData, ExplorerError, build_document, explore
from spndi_dask.explorer.data import projections
from spndi_dask.explorer.server import address_warning
from spndi_dask.io.results_store import open_results, write_map

from ..conftest import reduced_beamtime

ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def reduced(tmp_path_factory):
    """The tiny beamtime after reduce only (2 scans): maps, curves, patterns; nothing later."""
    _, m = reduced_beamtime(tmp_path_factory, "explore-reduced", "tiny")
    return m


@pytest.fixture(scope="module")
def clustered(reduced, tmp_path_factory):
    """A copy of ``reduced`` with particles, clusters (made up: by strain sign inside the
    particles, without training a model) and the cluster analysis."""
    from spndi_dask.analysis import analyze
    from spndi_dask.particles import stats

    root = tmp_path_factory.mktemp("explore-clustered") / "bt"
    shutil.copytree(Path(reduced.source).parent, root)
    m = load_manifest(root / "beamtime.toml")
    stats(m, figures=False)
    fp = "made-up-clustering"
    for name in ("p1", "p2"):
        ds = open_results(m.output_dir, name)
        label, strain = ds["label"].values, ds["strain"].values
        clusters = np.where(label > 0, (np.nan_to_num(strain) > 0).astype(np.int32), -1)
        write_map(
            m.layout.node(name),
            "cluster",
            clusters.astype(np.int32),
            stage="cluster",
            long_name="cluster",
            fill_value=-1,
            info={"fingerprint": fp, "k": 2},
        )
    zarr.open_group(str(m.layout.results), mode="r+").attrs.update(
        {"clusters": {"k": 2, "fingerprint": fp}}
    )
    analyze(m, figures=False)
    return m


def _doc(source, **kwargs):
    doc = Document()
    app = build_document(doc, ExplorerData(source, **kwargs))
    return doc, app


def _tap(doc, scan, y_um, x_um):
    fig = doc.get_model_by_name(f"map_figure:{scan}")
    fig._trigger_event(Tap(fig, x=x_um, y=y_um))


# -- pure helpers ------------------------------------------------------------------------------
def test_projections_put_each_voxel_where_its_axes_say():
    p = np.zeros((3, 4, 5), dtype=np.float32)
    p[2, 1, 3] = 7.0
    p[0, 0, 0] = np.nan  # skipped
    proj = projections(p)
    assert proj["qx_qy"].shape == (4, 3) and proj["qx_qy"][1, 2] == 7.0
    assert proj["qx_qz"].shape == (5, 3) and proj["qx_qz"][3, 2] == 7.0
    assert proj["qy_qz"].shape == (5, 4) and proj["qy_qz"][3, 1] == 7.0
    assert all(np.nansum(v) == 7.0 and np.isfinite(v).all() for v in proj.values())


def test_scan_pixel_from_micrometres(reduced):
    s = ExplorerData(reduced.output_dir).scans["p1"]
    dy, dx = s.step
    assert s.pixel(s.y[3] + 0.4 * dy, s.x[5] - 0.4 * dx) == (3, 5)
    assert s.pixel(s.y[0] - 0.6 * dy, s.x[0]) is None
    assert s.pixel(s.y[-1], s.x[-1] + 0.6 * dx) is None


# -- opening -----------------------------------------------------------------------------------
def test_opening_reads_one_map_per_scan_and_no_pattern(reduced, raise_if_computes):
    doc, app = _doc(reduced.source)  # the manifest
    data = app.data
    assert set(data.reads) == {("p1", "strain"), ("p2", "strain")}
    assert all(n == 1 for n in data.reads.values())
    for scan in ("p1", "p2"):
        img = doc.get_model_by_name(f"map_source:{scan}").data["image"][0]
        expect = zarr.open_array(str(reduced.layout.node(scan) / "strain"), mode="r")[...]
        np.testing.assert_array_equal(img, expect)
        src = doc.get_model_by_name(f"map_source:{scan}").data
        s = data.scans[scan]
        assert src["x"][0] == pytest.approx(s.x[0] - s.step[1] / 2)
        assert src["dw"][0] == pytest.approx(s.step[1] * s.x.size)
    # one colour scale for the scans side by side
    mappers = {
        doc.get_model_by_name(f"map_figure:{s}").renderers[0].glyph.color_mapper.id
        for s in ("p1", "p2")
    }
    assert len(mappers) == 1


def test_source_may_be_the_output_or_results_zarr(reduced):
    assert list(ExplorerData(reduced.output_dir).scans) == ["p1", "p2"]
    assert list(ExplorerData(reduced.layout.results, scans=["p2"]).scans) == ["p2"]
    with pytest.raises(ExplorerError, match=r"scan\(s\) nope .*there are: p1, p2"):
        ExplorerData(reduced.output_dir, scans=["nope"])


# -- a click -----------------------------------------------------------------------------------
def test_click_shows_that_pixels_curve_and_pattern_bit_exact(reduced):
    doc, app = _doc(reduced.output_dir)
    ds = open_results(reduced.output_dir, "p2")
    iy, ix = 7, 9
    y, x = float(ds.y[iy]), float(ds.x[ix])
    _tap(doc, "p2", y + 0.01, x - 0.01)  # inside the pixel's cell (step 0.05 µm)
    pix = doc.get_model_by_name("pixel_source").data
    assert (pix["scan"], pix["iy"], pix["ix"]) == (["p2"], [iy], [ix])
    assert (pix["y_um"], pix["x_um"]) == ([y], [x])
    rc = doc.get_model_by_name("rocking_source").data
    np.testing.assert_array_equal(rc["intensity"], ds["rocking_curve"].values[:, iy, ix])
    np.testing.assert_array_equal(rc["angle"], ds["angle"].values)
    pattern = ds["pattern"].values[iy, ix].astype(np.float64)
    expect = {
        "qx_qy": np.nansum(pattern, axis=2).T,
        "qx_qz": np.nansum(pattern, axis=1).T,
        "qy_qz": np.nansum(pattern, axis=0).T,
    }
    for name, img in expect.items():
        got = doc.get_model_by_name(f"pattern_source:{name}").data["image"][0]
        np.testing.assert_array_equal(got, img)
    info = doc.get_model_by_name("pixel_info").text
    assert f"iy={iy}, ix={ix}" in info
    assert f"<td>strain</td><td>{float(ds['strain'].values[iy, ix]):.3g}</td>" in info  # plain
    assert f"{1e3 * float(ds['tilt_x'].values[iy, ix]):.3g} mrad" in info
    # one pixel's pattern read, not the scan's
    assert app.data.reads[("p2", "pattern")] == 1


def test_click_outside_the_scan_changes_nothing(reduced):
    doc, _ = _doc(reduced.output_dir)
    _tap(doc, "p1", -5.0, -5.0)
    assert doc.get_model_by_name("pixel_source").data["iy"] == []
    assert doc.get_model_by_name("rocking_source").data["intensity"] == []


# -- a selection -------------------------------------------------------------------------------
def test_selection_shows_mean_curve_pattern_and_statistics(reduced):
    doc, app = _doc(reduced.output_dir)
    ds = open_results(reduced.output_dir, "p1")
    ny, nx = ds.sizes["y"], ds.sizes["x"]
    mask = np.zeros((ny, nx), dtype=bool)
    mask[4:8, 3:9] = True
    mask[10, 1] = True
    doc.get_model_by_name("pixels_source:p1").selected.indices = list(np.flatnonzero(mask))
    rc = doc.get_model_by_name("rocking_source").data["intensity"]
    np.testing.assert_allclose(rc, ds["rocking_curve"].values[:, mask].mean(axis=1), rtol=1e-12)
    pats = ds["pattern"].values[mask].astype(np.float64)
    mean = np.nanmean(pats, axis=0)
    got = doc.get_model_by_name("pattern_source:qx_qy").data["image"][0]
    np.testing.assert_allclose(got, np.nansum(mean, axis=2).T, rtol=1e-9)
    stats = app.selection_stats
    assert stats["count"] == mask.sum()
    for var in ("strain", "tilt_x", "tilt_y", "d_spacing"):
        v = ds[var].values[mask]
        m, sd, n = stats[var]
        assert m == pytest.approx(np.nanmean(v), rel=1e-12)
        assert sd == pytest.approx(np.nanstd(v), rel=1e-12)
        assert n == np.isfinite(v).sum()
    text = doc.get_model_by_name("selection_info").text
    assert f"{int(mask.sum())} pixels" in text
    m, sd, _ = stats["tilt_y"]  # one format per quantity, with its unit
    assert f"{1e3 * m:.3g} ± {1e3 * sd:.3g} mrad" in text
    m, sd, _ = stats["d_spacing"]
    assert f"{m:.5f} ± {sd:.5f} Å" in text
    # the patterns are read in one block here (the tiny scan is 12 rows)
    assert app.data.reads[("p1", "pattern")] == 1


# -- the shown map -----------------------------------------------------------------------------
def test_map_select_shows_that_map_on_every_scan(reduced):
    doc, _ = _doc(reduced.output_dir)
    select = doc.get_model_by_name("map_select")
    assert "cluster" not in select.options and "label" not in select.options
    select.value = "tilt_x"
    for scan in ("p1", "p2"):
        img = doc.get_model_by_name(f"map_source:{scan}").data["image"][0]
        stored = open_results(reduced.output_dir, scan)["tilt_x"].values  # rad
        np.testing.assert_allclose(img, 1e3 * stored, rtol=1e-12)  # shown in mrad
        assert "tilt_x" in doc.get_model_by_name(f"map_figure:{scan}").title.text
        assert doc.get_model_by_name(f"color_bar:{scan}").title == "tilt_x (mrad)"


def test_sigma_loading_and_peak_maps_are_offered_lazily_with_units(reduced, tmp_path):
    root = tmp_path / "out"
    shutil.copytree(reduced.output_dir / "results.zarr", root / "results.zarr")
    # a decompose stage's loadings (3 PCA components) and a gaussian reduce's peak_chi2 on p1
    node = zarr.open_group(str(root / "results.zarr" / "p1"), mode="r+")
    ny, nx = node["strain"].shape
    loading = np.arange(ny * nx * 3, dtype=np.float32).reshape(ny, nx, 3)
    arr = node.create_array("pca_loading", shape=loading.shape, dtype="f4", chunks=(ny, nx, 3))
    arr[...] = loading
    arr.attrs.update({"_ARRAY_DIMENSIONS": ["y", "x", "pca_component"], "long_name": "PCA"})
    node.attrs.update({"decompose": {"fingerprint": "made-up"}})
    chi2 = node.create_array("peak_chi2", shape=(ny, nx), dtype="f4", chunks=(ny, nx))
    chi2[...] = 2.0
    chi2.attrs.update({"units": "1", "long_name": "reduced chi-square of the fit"})
    doc, app = _doc(root)
    options = doc.get_model_by_name("map_select").options
    sigmas = ["strain_sigma", "tilt_x_sigma", "tilt_y_sigma", "d_spacing_sigma"]
    assert set(sigmas) <= set(options)  # reduce writes them
    assert [o for o in options if o.startswith("pca")] == [f"pca_loading[{i}]" for i in range(3)]
    assert "peak_chi2" in options and "nmf_loading[0]" not in options
    assert ("p1", "pca_loading") not in app.data.reads  # offered from metadata alone
    doc.get_model_by_name("map_select").value = "pca_loading[2]"
    np.testing.assert_array_equal(
        doc.get_model_by_name("map_source:p1").data["image"][0], loading[:, :, 2]
    )
    assert np.isnan(doc.get_model_by_name("map_source:p2").data["image"][0]).all()  # p2 lacks it
    assert app.data.reads[("p1", "pca_loading")] == 1
    doc.get_model_by_name("map_select").value = "tilt_x_sigma"
    expect = zarr.open_array(str(root / "results.zarr" / "p2" / "tilt_x_sigma"), mode="r")
    np.testing.assert_allclose(
        doc.get_model_by_name("map_source:p2").data["image"][0], 1e3 * expect[...], rtol=1e-6
    )
    assert doc.get_model_by_name("color_bar:p2").title == "tilt_x_sigma (mrad)"
    assert "standard error of tilt_x" in doc.get_model_by_name("map_info").text
    doc.get_model_by_name("map_select").value = "strain"  # dimensionless: no unit
    assert doc.get_model_by_name("color_bar:p1").title == "strain"


def test_views_keep_the_data_visible(reduced):
    doc, _ = _doc(reduced.output_dir)
    rocking = doc.get_model_by_name("rocking_figure")
    legend = doc.get_model_by_name("rocking_legend")
    assert legend in rocking.above and legend.click_policy == "hide"  # not over the curve
    assert not [r for r in rocking.center if r.__class__.__name__ == "Legend"]
    fig = doc.get_model_by_name("map_figure:p1")
    bar = doc.get_model_by_name("color_bar:p1")
    assert bar.formatter.format == "%.3g"  # 0.001, not 1.000e-3
    pixels = doc.get_model_by_name("pixels_source:p1")
    (selectable,) = [r for r in fig.renderers if r.data_source is pixels]
    assert 0 < selectable.selection_glyph.fill_alpha < 1  # the map's colours show through
    assert selectable.selection_glyph.line_alpha == 0
    assert any("--highlight-color: transparent" in sheet.css for sheet in fig.stylesheets)


# -- partial and complete results ----------------------------------------------------------------
def test_partial_results_say_what_is_missing(reduced):
    doc, _ = _doc(reduced.source)
    status = doc.get_model_by_name("status_info").text
    assert f"clusters: not computed yet — run `spndi cluster {reduced.source}`" in status
    assert "particle labels and particles.csv: not computed yet — run `spndi stats" in status
    for name in ("cluster_legend", "particles_table", "cluster_pattern_source:qx_qy"):
        assert doc.get_model_by_name(name) is None


def test_cluster_views_once_clustered(clustered):
    out = clustered.output_dir
    doc, app = _doc(out)
    status = doc.get_model_by_name("status_info").text
    assert "not computed" not in status.replace("latent features: not computed yet", "")
    assert "particles, clusters, cluster means (analysis)" in status
    ds = open_results(out, "p1")
    clusters = ds["cluster"].values
    iy, ix = map(int, np.argwhere(clusters == 1)[0])
    _tap(doc, "p1", float(ds.y[iy]), float(ds.x[ix]))
    import xarray as xr

    analysis = xr.open_dataset(out / "analysis.zarr", engine="zarr", consolidated=False)
    mean = analysis["cluster_pattern"].values[1].astype(np.float64)
    got = doc.get_model_by_name("cluster_pattern_source:qy_qz").data["image"][0]
    np.testing.assert_array_equal(got, np.nansum(mean, axis=0).T)
    curve = doc.get_model_by_name("cluster_rocking_source").data["intensity"]
    np.testing.assert_array_equal(curve, analysis["cluster_rocking_curve"].values[0, 1])
    # the legend hides cluster 0 on the shown map
    doc.get_model_by_name("map_select").value = "cluster"
    doc.get_model_by_name("cluster_legend").active = [1]
    img = doc.get_model_by_name("map_source:p1").data["image"][0]
    assert np.isnan(img[clusters == 0]).all()
    np.testing.assert_array_equal(img[clusters != 0], clusters[clusters != 0])
    # a particles-table row shows that particle's scan alone, zoomed to it
    table = doc.get_model_by_name("particles_table")
    row = table.source.data["scan"].index("p2")
    titles = [c.title for c in table.columns]
    assert "tilt_x_mean_mrad" in titles and "d_spacing_mean_A" in titles  # units in the names
    table.source.selected.indices = [row]
    assert doc.get_model_by_name("scan_select").value == ["p2"]
    assert [f.name for f in app.maps_row.children] == ["map_figure:p2"]
    fig = doc.get_model_by_name("map_figure:p2")
    label = open_results(out, "p2")["label"].values
    xs = open_results(out, "p2")["x"].values[
        np.nonzero(label == table.source.data["label"][row])[1]
    ]
    assert fig.x_range.start < xs.min() and fig.x_range.end > xs.max()
    assert fig.x_range.end - fig.x_range.start < 0.05 * (label.shape[1] + 4)


def test_a_selection_replaces_the_clicked_pixel_in_every_view(clustered):
    out = clustered.output_dir
    doc, _ = _doc(out)
    ds = open_results(out, "p1")
    clusters = ds["cluster"].values
    analysis = zarr.open_group(str(out / "analysis.zarr"), mode="r")
    iy, ix = map(int, np.argwhere(clusters == 0)[0])
    _tap(doc, "p1", float(ds.y[iy]), float(ds.x[ix]))
    pixels = doc.get_model_by_name("pixels_source:p1")
    # inside cluster 1 alone: the cluster row shows cluster 1's mean
    pixels.selected.indices = [int(i) for i in np.flatnonzero(clusters == 1)[:3]]
    info = doc.get_model_by_name("pixel_info").text
    assert "the views show the selection" in info and "3 pixels" in info
    assert "in clusters {1}" in info and f"iy={iy}" not in info
    assert doc.get_model_by_name("pixel_source").data["iy"] == []
    curve = doc.get_model_by_name("cluster_rocking_source").data["intensity"]
    np.testing.assert_array_equal(curve, analysis["cluster_rocking_curve"][0, 1])
    assert "cluster 1's mean" in doc.get_model_by_name("cluster_pattern_figure:qx_qy").title.text
    # across both clusters: no one cluster's mean
    both = [int(np.flatnonzero(clusters == c)[0]) for c in (0, 1)]
    pixels.selected.indices = both
    assert "in clusters {0, 1}" in doc.get_model_by_name("pixel_info").text
    assert len(doc.get_model_by_name("cluster_rocking_source").data["intensity"]) == 0
    assert doc.get_model_by_name("cluster_pattern_source:qx_qy").data["image"] == []


def test_explore_returns_an_application_for_notebooks(reduced):
    app = explore(reduced.output_dir, scans=["p2"])
    doc = app.create_document()
    assert doc.get_model_by_name("map_figure:p2") is not None
    assert doc.get_model_by_name("map_figure:p1") is None


def test_a_session_without_results_gets_an_error_page(tmp_path, reduced):
    from spndi_dask.explorer import make_application

    out = tmp_path / "out"
    shutil.copytree(reduced.output_dir / "results.zarr", out / "results.zarr")
    app = make_application(out)
    assert app.create_document().get_model_by_name("map_figure:p1") is not None
    shutil.rmtree(out / "results.zarr")  # gone while the server runs: the next page load says so
    doc = app.create_document()
    error = doc.get_model_by_name("error_info")
    assert "neither results.zarr nor a beamtime manifest" in error.text
    assert "run `spndi reduce beamtime.toml` first" in error.text
    assert doc.get_model_by_name("map_figure:p1") is None


def test_missing_results_name_the_command(tmp_path, reduced):
    shutil.copy(reduced.source, tmp_path / "beamtime.toml")
    with pytest.raises(ExplorerError, match=r"results.zarr does not exist; run `spndi reduce "):
        ExplorerData(tmp_path / "beamtime.toml")


def test_address_warning():
    assert address_warning("127.0.0.1") is None and address_warning("localhost") is None
    assert address_warning("::1") is None
    assert "ssh -L" in address_warning("0.0.0.0")


# -- the command line --------------------------------------------------------------------------
def _spndi(*args: str, **kwargs):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "spndi_dask.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        **kwargs,
    )


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "nothing-here", "does not exist: give a beamtime manifest"),
        (lambda d: _write(d / "bad.toml", 'name = "x"\nbogus = 1\n'), "bad.toml"),
        (lambda d: _write(d / "beamtime.toml", ""), None),  # filled in below: no results
    ],
)
def test_view_errors_exit_2_with_the_fix(tmp_path, reduced, make, message, capsys):
    from spndi_dask.cli import main

    path = make(tmp_path)
    if message is None:
        shutil.copy(reduced.source, path)
        message = "run `spndi reduce"
    assert main(["view", str(path), "--no-browser"]) == 2
    out, err = capsys.readouterr()
    assert message in err and "Traceback" not in err
    assert out == ""


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_view_on_another_address_warns(reduced, caplog):
    from spndi_dask.explorer import serve

    server = serve(reduced.output_dir, port=0, address="0.0.0.0", block=False)
    try:
        assert server.port > 0
    finally:
        server.stop()
    assert "ssh -L" in caplog.text and "0.0.0.0" in caplog.text


def test_view_serves_the_page_and_ctrl_c_stops_it(reduced):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "spndi_dask.cli", "view", reduced.source, "--no-browser"]
    proc = subprocess.Popen(
        [*cmd, "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        line = proc.stdout.readline()
        match = re.fullmatch(r"Explorer: http://127\.0\.0\.1:(\d+)/\n", line)
        assert match, line or proc.stderr.read()
        # the line comes once the server listens
        with urllib.request.urlopen(f"http://127.0.0.1:{match.group(1)}/", timeout=30) as r:
            page, status = r.read().decode(), r.status
        assert status == 200 and "bokeh" in page.lower()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert out == ""  # the one line only
    assert "Traceback" not in err
