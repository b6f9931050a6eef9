"""Screenshots of the explorer (``spndi view``) for the README, taken in headless Chromium.

Simulates a beamtime (default: the ``demo`` preset, 3 epochs of training), runs every stage,
serves it with ``spndi view``, clicks a pixel inside a particle and saves the page
(``explorer-pixel.png``), then draws a box selection and saves it again
(``explorer-selection.png``); whole pages 1280 px wide, as palette PNGs.

Run from the repository root (needs Playwright and a Chromium; see ``.ci/run``)::

    PYTHONPATH=$PWD python scripts/screenshot_explorer.py            # -> docs/images/
    PYTHONPATH=$PWD python scripts/screenshot_explorer.py --output spndi-demo  # an existing run
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.explorer import browser as bw  # noqa: E402  (the browser helpers of the tests)

VIEWPORT = {"width": 1280, "height": 800}


def _save(page, path: Path) -> None:
    """The whole page (1280 px wide) as an optimised palette PNG."""
    import io

    from PIL import Image

    image = Image.open(io.BytesIO(page.screenshot(full_page=True))).convert("RGB")
    image.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    print(f"{path}: {image.size[0]}x{image.size[1]}, {path.stat().st_size / 1024:.0f} KiB")


def shoot(source: Path, images: Path) -> None:
    """Serve ``source`` (manifest or output) and save the two screenshots in ``images``."""
    import numpy as np
    from playwright.sync_api import sync_playwright

    from spndi_dask.explorer.data import ExplorerData

    data = ExplorerData(source)
    scan = next(iter(data.scans))
    intensity = data.map(scan, "intensity")
    label = data.map(scan, "label") if data.has(scan, "label") else np.ones_like(intensity)
    inside = np.where(label > 0, np.nan_to_num(intensity, nan=-np.inf), -np.inf)
    iy, ix = np.unravel_index(np.argmax(inside), inside.shape)
    ny, nx = intensity.shape
    images.mkdir(parents=True, exist_ok=True)
    server = bw.Explorer(source)
    try:
        with sync_playwright() as p:
            browser = bw.launch(p)
            page = browser.new_page(viewport=VIEWPORT)
            watch = bw.PageWatch(page)
            page.goto(server.url)
            bw.wait_ready(page, ["map_select", "pixel_source"])
            bw.wait_ready(page, bw.model_names(page, "map_figure:"))
            figure = f"map_figure:{scan}"
            bw.click_data(page, figure, *bw.pixel_centre(page, scan, iy, ix))
            page.wait_for_function(
                "() => Bokeh.documents[0].get_model_by_name('pixel_source').data.ix.length > 0"
            )
            page.wait_for_timeout(1000)  # let the canvases repaint
            _save(page, images / "explorer-pixel.png")
            bw.click_tool(page, figure, "BoxSelectTool")
            before = bw.model_property(page, "selection_info", "text")
            y0, y1 = max(iy - ny // 4, 0), min(iy + ny // 4, ny - 1)
            x0, x1 = max(ix - nx // 4, 0), min(ix + nx // 4, nx - 1)
            corners = [bw.pixel_centre(page, scan, y, x) for y, x in ((y0, x0), (y1, x1))]
            bw.drag_data(page, figure, *corners)
            bw.wait_for_change(
                page, "Bokeh.documents[0].get_model_by_name('selection_info').text", before
            )
            page.wait_for_timeout(1000)
            _save(page, images / "explorer-selection.png")
            browser.close()
        if watch.errors:
            print("errors in the page:\n  " + "\n  ".join(watch.errors))
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", type=Path, help="an existing processed beamtime to show")
    parser.add_argument("--preset", default="demo", help="simulation preset (default demo)")
    parser.add_argument("--epochs", type=int, default=3, help="training epochs (default 3)")
    parser.add_argument("--images", type=Path, default=ROOT / "docs" / "images")
    args = parser.parse_args(argv)
    why = bw.missing_browser()
    if why:
        print(f"cannot take screenshots: {why}", file=sys.stderr)
        return 2
    if args.output is not None:
        shoot(args.output, args.images)
        return 0
    from spndi_dask.simulate import preset

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        m = bw.processed_beamtime(Path(tmp), preset(args.preset, train_epochs=args.epochs))
        print(f"{args.preset} beamtime processed in {time.perf_counter() - t0:.0f} s")
        shoot(Path(m.source), args.images)
    return 0


if __name__ == "__main__":
    sys.exit(main())
