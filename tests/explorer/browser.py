"""Drive the explorer (``spndi view``) in headless Chromium: for tests and the README screenshots.

Playwright drives the system Chromium (Debian's ``chromium`` package; ``.ci/run`` installs it):
Playwright's own browser downloads are not needed. Everything here reads the page through the
Bokeh models the explorer names (``Bokeh.documents[0].get_model_by_name``) and clicks with the
real mouse at the screen position of a data coordinate, computed from the figure's view (its
frame's scales and its canvas' place on the page).
"""

from __future__ import annotations

import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

#: How long the explorer may take to print its URL, and a page or model update to arrive (s).
START_TIMEOUT = 90.0
UPDATE_TIMEOUT_MS = 30_000


def find_chromium() -> str | None:
    """The Chromium binary: ``$SPNDI_CHROMIUM``, else ``chromium`` or ``chromium-browser``."""
    given = os.environ.get("SPNDI_CHROMIUM")
    if given:
        return given
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


def missing_browser() -> str | None:
    """Why the browser tests cannot run here (None when they can)."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -e '.[test]')"
    found = find_chromium()
    if found is not None and not Path(found).is_file():
        return f"SPNDI_CHROMIUM={found} is not a file"
    if found is None:
        return (
            "no Chromium found (install Debian's `chromium`, as .ci/run does, "
            "or set SPNDI_CHROMIUM to a Chromium binary)"
        )
    return None


def launch(playwright: Any) -> Any:
    """Headless system Chromium through Playwright."""
    return playwright.chromium.launch(
        executable_path=find_chromium(),
        headless=True,
        args=["--disable-gpu", "--no-first-run", "--disable-background-networking"],
    )


class PageWatch:
    """Collect what went wrong in a page: console errors, uncaught exceptions, failed requests."""

    def __init__(self, page: Any) -> None:
        self.errors: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.errors.append(f"page error: {exc}"))
        page.on(
            "requestfailed",
            lambda req: self.errors.append(f"request failed: {req.url} ({req.failure})"),
        )
        page.on("response", self._response)

    def _console(self, msg: Any) -> None:
        if msg.type == "error":
            self.errors.append(f"console error: {msg.text}")

    def _response(self, response: Any) -> None:
        if response.status >= 400:
            self.errors.append(f"HTTP {response.status}: {response.url}")


def processed_beamtime(
    root: Path, cfg: Any, *, k: int = 2, copy_after_reduce: Path | None = None
) -> Any:
    """Simulate ``cfg`` (a :class:`~spndi_dask.simulate.SimulationConfig`) in ``root`` and run
    every stage in-process (clustering with ``k``); the manifest.

    ``copy_after_reduce``: a folder to copy the beamtime to after reduce (a partial output).
    """
    from spndi_dask.analysis import analyze
    from spndi_dask.cluster import cluster
    from spndi_dask.features import encode, train
    from spndi_dask.ingest import ingest
    from spndi_dask.particles import stats
    from spndi_dask.reduce import reduce
    from spndi_dask.simulate import simulate_beamtime

    m = simulate_beamtime(root, cfg, scheduler="sync")
    ingest(m)
    reduce(m)
    if copy_after_reduce is not None:
        shutil.copytree(root, copy_after_reduce)
    stats(m, figures=False)
    train(m)
    encode(m)
    cluster(m, k=k, figures=False)
    analyze(m, figures=False)
    return m


# -- the explorer as a subprocess ------------------------------------------------------------------
class Explorer:
    """``spndi view TARGET --port 0 --no-browser`` in a subprocess; ``url`` from its one line."""

    def __init__(self, target: str | Path, *args: str, log: Path | None = None) -> None:
        cmd = [sys.executable, "-m", "spndi_dask.cli", "view", str(target), "--port", "0"]
        self.log = log
        self._stderr = open(log, "w") if log else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [*cmd, "--no-browser", *args],
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._drain, daemon=True).start()
        self.url = self._wait_for_url()

    def _drain(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)

    def _wait_for_url(self) -> str:
        deadline = time.monotonic() + START_TIMEOUT
        seen = []
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            seen.append(line)
            if line.startswith("Explorer: "):
                return line.split(" ", 1)[1].strip()
        self.proc.kill()
        self.proc.wait()
        raise RuntimeError(
            f"spndi view printed no 'Explorer: URL' line in {START_TIMEOUT:.0f} s "
            f"(exit code {self.proc.returncode}); stdout: {''.join(seen)!r}; "
            f"stderr: {self.stderr()!r}"
        )

    def stderr(self) -> str:
        return self.log.read_text() if self.log and self.log.exists() else ""

    def stop(self, timeout: float = 30.0) -> int:
        """Ctrl-C (SIGINT) and wait: the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise
        if self._stderr is not subprocess.DEVNULL:
            self._stderr.close()
        return self.proc.returncode


# -- reading and clicking the page ---------------------------------------------------------------
_DOC = "Bokeh.documents[0]"

_JS_READY = """(names) => {
  if (!window.Bokeh || Bokeh.documents.length === 0) return false;
  for (const name of names) {
    const model = Bokeh.documents[0].get_model_by_name(name);
    if (model == null) return false;
    // a shown widget or plot must have its view (a data source has none)
    const shown = model.data === undefined && model.visible !== false;
    if (shown && Bokeh.index.find_one(model) == null) return false;
  }
  return true;
}"""

_JS_NAMES = """(prefix) => {
  const names = [];
  for (const model of Bokeh.documents[0].all_models) {
    if (model.name != null && model.name.startsWith(prefix)) names.push(model.name);
  }
  return names.sort();
}"""

_JS_DATA = """(name) => {
  const model = Bokeh.documents[0].get_model_by_name(name);
  if (model == null) return null;
  const out = {};
  for (const [key, column] of Object.entries(model.data)) {
    // an image column holds n-D arrays: a typed array with a shape
    out[key] = Array.from(column, (v) => {
      if (ArrayBuffer.isView(v) && v.shape != null) {
        return {shape: Array.from(v.shape), flat: Array.from(v)};
      }
      return ArrayBuffer.isView(v) ? Array.from(v) : v;
    });
  }
  return out;
}"""

_JS_TO_PAGE = """([name, x, y]) => {
  const figure = Bokeh.documents[0].get_model_by_name(name);
  const view = Bokeh.index.find_one(figure);
  const frame = view.frame;
  const sx = frame.x_scale.compute(x), sy = frame.y_scale.compute(y);
  const box = view.canvas_view.el.getBoundingClientRect();
  return [box.left + sx, box.top + sy];
}"""

_JS_FRAME = """(name) => {
  const view = Bokeh.index.find_one(Bokeh.documents[0].get_model_by_name(name));
  const box = view.canvas_view.el.getBoundingClientRect();
  const b = view.frame.bbox;
  return {left: box.left + b.left, top: box.top + b.top, width: b.width, height: b.height,
          x: [view.frame.x_range.start, view.frame.x_range.end],
          y: [view.frame.y_range.start, view.frame.y_range.end]};
}"""


_JS_TOOL = """([name, type]) => {
  const figure = Bokeh.documents[0].get_model_by_name(name);
  const toolbar = Bokeh.index.find_one(figure.toolbar);
  const button = toolbar.tool_button_views.find((v) => v.model.tool.type === type);
  if (button == null) throw new Error(`no ${type} in the toolbar of ${name}`);
  const box = button.el.getBoundingClientRect();
  return [box.left + box.width / 2, box.top + box.height / 2];
}"""


def wait_ready(page: Any, names: list[str], timeout_ms: int = UPDATE_TIMEOUT_MS) -> None:
    """Wait until the document holds every named model, and every shown widget or plot among
    them has its view (is laid out on the page)."""
    page.wait_for_function(_JS_READY, arg=names, timeout=timeout_ms)


def model_names(page: Any, prefix: str) -> list[str]:
    """Names of the document's models starting with ``prefix``, sorted."""
    return page.evaluate(_JS_NAMES, prefix)


def model_data(page: Any, name: str) -> dict[str, list] | None:
    """A ColumnDataSource's columns as JSON: 2-D image entries as ``{"shape", "flat"}``."""
    return page.evaluate(_JS_DATA, name)


def source_image(page: Any, name: str) -> Any:
    """The first entry of a named source's ``image`` column as a 2-D float64 NumPy array."""
    import numpy as np

    entry = model_data(page, name)["image"][0]
    if isinstance(entry, dict):
        return np.asarray(entry["flat"], dtype=np.float64).reshape(entry["shape"])
    return np.asarray(entry, dtype=np.float64)


def pixel_centre(page: Any, scan: str, iy: float, ix: float) -> tuple[float, float]:
    """Data coordinates ``(x, y)`` (µm) of the centre of pixel ``(iy, ix)`` of the scan's map,
    from the image as drawn (``map_source:<scan>``: anchor ``x``, ``y``, size ``dw``, ``dh``)."""
    src = model_data(page, f"map_source:{scan}")
    ny, nx = source_image(page, f"map_source:{scan}").shape
    x = src["x"][0] + (ix + 0.5) * src["dw"][0] / nx
    y = src["y"][0] + (iy + 0.5) * src["dh"][0] / ny
    return x, y


def model_property(page: Any, name: str, prop: str) -> Any:
    """One property of a named model (e.g. a Div's ``text``, a Select's ``value``)."""
    return page.evaluate(
        f"([n, p]) => {_DOC}.get_model_by_name(n)[p]",
        [name, prop],
    )


def frame(page: Any, figure: str) -> dict[str, Any]:
    """The figure's plot frame on the page (CSS pixels) and its x/y range ends (data units)."""
    return page.evaluate(_JS_FRAME, figure)


def to_page(page: Any, figure: str, x: float, y: float) -> tuple[float, float]:
    """Page position (CSS pixels) of the data point ``(x, y)`` in the named figure."""
    px, py = page.evaluate(_JS_TO_PAGE, [figure, x, y])
    return px, py


def click_data(page: Any, figure: str, x: float, y: float) -> None:
    """A real mouse click at data coordinates ``(x, y)`` of the named figure."""
    page.mouse.click(*to_page(page, figure, x, y))


def click_tool(page: Any, figure: str, tool_type: str) -> None:
    """Click the toolbar button of the figure's tool of type ``tool_type`` (``"BoxSelectTool"``)."""
    page.mouse.click(*page.evaluate(_JS_TOOL, [figure, tool_type]))


def choose(page: Any, select: str, value: str) -> None:
    """Choose ``value`` in the named Select's ``<select>`` element, as a user does."""
    handle = page.evaluate_handle(
        "(n) => Bokeh.index.find_one(Bokeh.documents[0].get_model_by_name(n)).input_el", select
    )
    handle.as_element().select_option(value)


def drag_data(page: Any, figure: str, start: tuple[float, float], end: tuple[float, float]) -> None:
    """A real mouse drag between two data points of the named figure (box select, pan...)."""
    x0, y0 = to_page(page, figure, *start)
    x1, y1 = to_page(page, figure, *end)
    page.mouse.move(x0, y0)
    page.mouse.down()
    for i in range(1, 9):  # intermediate moves: Bokeh's pan gestures need them
        page.mouse.move(x0 + (x1 - x0) * i / 8, y0 + (y1 - y0) * i / 8)
    page.mouse.up()


def wait_for_change(
    page: Any, expression: str, before: Any, timeout_ms: int = UPDATE_TIMEOUT_MS
) -> Any:
    """Wait until the JS ``expression`` (JSON-able) differs from ``before``; its new value."""
    page.wait_for_function(
        "([expr, before]) => JSON.stringify(eval(expr)) !== JSON.stringify(before)",
        arg=[expression, before],
        timeout=timeout_ms,
    )
    return page.evaluate(f"() => {expression}")


def data_expression(name: str, column: str) -> str:
    """A JS expression for a ColumnDataSource column as plain JSON (for :func:`wait_for_change`)."""
    return (
        f"Array.from({_DOC}.get_model_by_name({name!r}).data[{column!r}], "
        "(v) => (ArrayBuffer.isView(v) ? Array.from(v) : v))"
    )
