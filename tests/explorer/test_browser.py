"""The explorer (``spndi view``) in a real headless Chromium, driven by Playwright.

One ``tiny`` beamtime (2 scans) is processed in-process: simulate → ingest → reduce (copied as
the *partial* output) → stats → train 1 epoch → encode → cluster K=2 → analyze (the *full*
output). ``spndi view OUT --port 0 --no-browser`` runs as a subprocess per output; the tests
load its page, click and drag with the real mouse at data coordinates, and compare what the
server sent into the page's Bokeh models with the values read independently from
``results.zarr``. The browser tests skip (with the reason) where Chromium or Playwright is
missing; ``.ci/run`` installs both.
"""

from __future__ import annotations

import io
import re
from contextlib import contextmanager

import numpy as np
import pytest

from spndi_dask.reduce import open_results
from spndi_dask.units import shown

from . import browser as bw

NO_BROWSER = bw.missing_browser()
needs_browser = pytest.mark.skipif(NO_BROWSER is not None, reason=str(NO_BROWSER))
#: float32 / float64 values through JSON and back: compare to this relative tolerance.
RTOL = 1e-6


# -- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """``(full_manifest, partial_manifest)``: the tiny beamtime processed to the end, and a copy
    of it taken after reduce."""
    from spndi_dask.config import load_manifest
    from spndi_dask.simulate import preset

    partial = tmp_path_factory.mktemp("explore-partial") / "beamtime"
    full = tmp_path_factory.mktemp("explore-full")
    m = bw.processed_beamtime(full, preset("tiny", train_epochs=1), copy_after_reduce=partial)
    return m, load_manifest(partial / "beamtime.toml")


@pytest.fixture(scope="module")
def chromium():
    """One headless Chromium for the module (Playwright driving the system browser)."""
    if NO_BROWSER:
        pytest.skip(NO_BROWSER)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = bw.launch(p)
        yield browser
        browser.close()


def _serve(manifest, tmp_path_factory, name):
    log = tmp_path_factory.mktemp(name) / "stderr.txt"
    return bw.Explorer(manifest.source, log=log)


@pytest.fixture(scope="module")
def explorer(chromium, outputs, tmp_path_factory):
    """``spndi view`` on the full output; stopped with SIGINT by the last test (or here)."""
    server = _serve(outputs[0], tmp_path_factory, "view-full")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def page(chromium, explorer):
    """One page on the full output's explorer for the module (each test waits for the changes
    it causes, so the order does not matter); its error watch as ``page.watch``."""
    with _open_page(chromium, explorer.url) as pg:
        yield pg


@contextmanager
def _open_page(chromium, url):
    context = chromium.new_context(viewport={"width": 1280, "height": 800})
    pg = context.new_page()
    pg.watch = bw.PageWatch(pg)
    pg.goto(url)
    bw.wait_ready(pg, ["map_select", "pixel_source", "rocking_source", "status_info"])
    bw.wait_ready(pg, bw.model_names(pg, "map_figure:"))
    try:
        yield pg
    finally:
        context.close()


def _no_errors(pg):
    pg.wait_for_timeout(300)  # let late messages arrive
    assert pg.watch.errors == [], "\n".join(pg.watch.errors)


def _pixel_inside(ds, rank=0):
    """A pixel inside the particle, away from the edge: the ``rank``-th brightest."""
    intensity = ds["intensity"].values.copy()
    intensity[[0, -1], :] = intensity[:, [0, -1]] = -np.inf
    flat = np.argsort(intensity, axis=None)[::-1][rank]
    return tuple(int(i) for i in np.unravel_index(flat, intensity.shape))


# -- the page ------------------------------------------------------------------------------------
@needs_browser
@pytest.mark.slow
def test_page_loads_without_errors_and_draws_every_scans_map(page, outputs):
    m = outputs[0]
    scans = [p.name for p in m.scans]
    assert bw.model_names(page, "map_figure:") == sorted(f"map_figure:{s}" for s in scans)
    variable = bw.model_property(page, "map_select", "value")
    for scan in scans:
        # the map sent is the store's map of the selected variable
        expected = open_results(m.output_dir, scan)[variable].values
        got = bw.source_image(page, f"map_source:{scan}")
        np.testing.assert_allclose(got, expected, rtol=RTOL)
        # and it is drawn: the plot frame on the screen holds many colours
        f = bw.frame(page, f"map_figure:{scan}")
        assert f["width"] > 100 and f["height"] > 100, f
        png = page.screenshot(
            clip={"x": f["left"], "y": f["top"], "width": f["width"], "height": f["height"]}
        )
        from matplotlib import image as mpimg

        pixels = mpimg.imread(io.BytesIO(png), format="png")[..., :3].reshape(-1, 3)
        assert len(np.unique(pixels, axis=0)) > 10, f"the map of {scan} is not drawn"
    _no_errors(page)


@needs_browser
@pytest.mark.slow
def test_a_click_on_a_pixel_sends_exactly_that_pixels_data(page, outputs):
    m = outputs[0]
    for scan, rank in (("p2", 0), ("p1", 5)):  # two scans, two pixels: no stale data passes
        ds = open_results(m.output_dir, scan)
        iy, ix = _pixel_inside(ds, rank)
        shown = (  # the pixel shown, as JSON
            "['scan', 'iy', 'ix'].map((c) => "
            "Array.from(Bokeh.documents[0].get_model_by_name('pixel_source').data[c]))"
        )
        before = page.evaluate(f"() => {shown}")
        bw.click_data(page, f"map_figure:{scan}", *bw.pixel_centre(page, scan, iy, ix))
        bw.wait_for_change(page, shown, before)
        pixel = bw.model_data(page, "pixel_source")
        assert (pixel["scan"], pixel["iy"], pixel["ix"]) == ([scan], [iy], [ix])
        np.testing.assert_allclose(pixel["y_um"], [ds.y.values[iy]], rtol=RTOL)
        np.testing.assert_allclose(pixel["x_um"], [ds.x.values[ix]], rtol=RTOL)
        # the rocking curve sent is exactly the stored one of that pixel
        rocking = bw.model_data(page, "rocking_source")
        np.testing.assert_allclose(rocking["angle"], ds.angle.values, rtol=RTOL)
        np.testing.assert_allclose(
            rocking["intensity"], ds["rocking_curve"].values[:, iy, ix], rtol=RTOL
        )
        # the pattern projections: the stored 3D pattern summed over the third axis,
        # image rows along the second axis of the name (Bokeh's image rows run along y)
        pattern = ds["pattern"].values[iy, ix].astype(np.float64)  # (dq_x, dq_y, dq_z)
        expected = {
            "qx_qy": np.nansum(pattern, axis=2).T,
            "qx_qz": np.nansum(pattern, axis=1).T,
            "qy_qz": np.nansum(pattern, axis=0).T,
        }
        for name, image in expected.items():
            np.testing.assert_allclose(
                bw.source_image(page, f"pattern_source:{name}"), image, rtol=RTOL, err_msg=name
            )
        info = bw.model_property(page, "pixel_info", "text")
        assert scan in info, info
        # the clicked map has focus but draws no focus outline
        focused = page.evaluate(_JS_FOCUS_OUTLINE)
        assert focused is not None  # the click focused an element of the map
        assert focused[0] == "none" or focused[1] == "rgba(0, 0, 0, 0)", focused
    _no_errors(page)


# the focused element's outline (style, colour), through the open shadow roots
_JS_FOCUS_OUTLINE = """() => {
  let e = document.activeElement;
  while (e && e.shadowRoot && e.shadowRoot.activeElement) e = e.shadowRoot.activeElement;
  if (!e || e === document.body) return null;
  const cs = getComputedStyle(e);
  return [cs.outlineStyle, cs.outlineColor];
}"""


@needs_browser
@pytest.mark.slow
def test_a_box_selection_counts_its_pixels(page, outputs):
    m = outputs[0]
    scan = "p1"
    figure = f"map_figure:{scan}"
    bw.click_tool(page, figure, "BoxSelectTool")  # its toolbar button, as a user does
    page.wait_for_function(
        "(n) => Bokeh.documents[0].get_model_by_name(n).toolbar.tools"
        ".find((t) => t.type === 'BoxSelectTool').active",
        arg=figure,
    )
    ny, nx = open_results(m.output_dir, scan)["intensity"].shape
    iy0, iy1, ix0, ix1 = 2, ny - 4, 3, nx - 3  # rows 2..ny-4, columns 3..nx-3
    # corners a quarter pixel outside the corner pixels' centres: by centre or by overlap,
    # exactly those pixels are in the box
    x0, y0 = bw.pixel_centre(page, scan, iy0 - 0.25, ix0 - 0.25)
    x1, y1 = bw.pixel_centre(page, scan, iy1 + 0.25, ix1 + 0.25)
    before = bw.model_property(page, "selection_info", "text")
    bw.drag_data(page, figure, (x0, y1), (x1, y0))
    after = bw.wait_for_change(
        page, "Bokeh.documents[0].get_model_by_name('selection_info').text", before
    )
    count = (iy1 - iy0 + 1) * (ix1 - ix0 + 1)
    assert re.search(rf"\b{count}\b", after), (count, after)
    _no_errors(page)


@needs_browser
@pytest.mark.slow
def test_choosing_a_variable_redraws_every_map_with_its_values(page, outputs):
    m = outputs[0]
    options = bw.model_property(page, "map_select", "options")
    values = [o[0] if isinstance(o, list) else o for o in options]
    current = bw.model_property(page, "map_select", "value")
    variable = next(v for v in ("tilt_x", "d_spacing", "strain") if v in values and v != current)
    old = bw.data_expression("map_source:p1", "image")
    before = page.evaluate(f"() => {old}")
    bw.choose(page, "map_select", variable)
    bw.wait_for_change(page, old, before)
    assert bw.model_property(page, "map_select", "value") == variable
    for p in m.scans:
        expected = shown(variable, open_results(m.output_dir, p.name)[variable].values)  # mrad
        page.wait_for_function(
            "(n) => Bokeh.documents[0].get_model_by_name(n).data.image.length > 0",
            arg=f"map_source:{p.name}",
        )
        got = bw.source_image(page, f"map_source:{p.name}")
        np.testing.assert_allclose(got, expected, rtol=RTOL)
    _no_errors(page)


@needs_browser
@pytest.mark.slow
def test_a_partial_output_names_the_missing_stages_damage_and_a_lost_store(
    chromium, outputs, tmp_path_factory
):
    partial = outputs[1]
    server = _serve(partial, tmp_path_factory, "view-partial")
    try:
        with _open_page(chromium, server.url) as pg:
            status = bw.model_property(pg, "status_info", "text")
            for command in ("spndi stats", "spndi cluster", "spndi analyze"):
                assert command in status, status
            assert bw.model_names(pg, "cluster_pattern_source:") == []
            _no_errors(pg)
            # a pattern chunk damaged on disk after the page opened: a click on a pixel of that
            # scan row says which array is damaged and what to run, in the page
            ds = open_results(partial.output_dir, "p1")
            iy, ix = _pixel_inside(ds)
            chunk = partial.layout.node("p1") / "pattern" / "c" / str(iy) / "0" / "0" / "0" / "0"
            assert chunk.is_file(), f"the pattern's chunk layout changed: no {chunk}"
            chunk.write_bytes(b"not a blosc chunk")
            bw.click_data(pg, "map_figure:p1", *bw.pixel_centre(pg, "p1", iy, ix))
            text = bw.wait_for_change(
                pg, "Bokeh.documents[0].get_model_by_name('status_info').text", status
            )
            assert "error" in text and "pattern" in text and "spndi" in text, text
            _no_errors(pg)  # told in the page, not a crash of the page
        # the results store gone while the server runs: the next page is an error page
        results = partial.layout.results
        results.rename(results.with_name("elsewhere.zarr"))
        context = chromium.new_context()
        try:
            pg = context.new_page()
            watch = bw.PageWatch(pg)
            pg.goto(server.url)
            bw.wait_ready(pg, ["error_info"])
            text = bw.model_property(pg, "error_info", "text")
            assert "results.zarr" in text and "spndi reduce" in text, text
            assert bw.model_names(pg, "map_figure:") == []
            pg.wait_for_timeout(300)
            assert watch.errors == [], watch.errors
        finally:
            context.close()
    finally:
        assert server.stop() == 0, server.stderr()


# -- last: Ctrl-C ----------------------------------------------------------------------------------
@needs_browser
@pytest.mark.slow
def test_ctrl_c_stops_the_explorer_cleanly(explorer):
    assert explorer.stop() == 0, explorer.stderr()
    assert "Traceback" not in explorer.stderr(), explorer.stderr()
