"""Benchmark the explorer: open time and click/selection-to-update time vs plain zarr reads.

Measured side by side in one process on one reduced simulated beamtime (default the ``large``
preset: 2 scans of 72×72 points, 31 angles, patterns on a 32³ q grid):

open       ``ExplorerData(output)`` + ``build_document`` into a fresh Bokeh ``Document`` (what
           a browser session costs the server before the page is sent): cold (first, imports
           warm) and warm (median of 5)
click      the tap handler end to end (a ``Tap`` event on a map figure: µm -> pixel, reading
           the pixel's rocking curve, 3D pattern and map values, projecting the pattern, filling
           the Bokeh sources), median and 90th percentile over 20 random pixels
selection  a 10×10-pixel box, and the whole scan as one lasso (mean curve, mean pattern,
           statistics)
zarr read  plain ``zarr`` reads of the same pixels' patterns (``array[iy, ix]``), and of
           the same pixels' rocking curves: what a click cannot go below

The websocket transfer to the browser is not included (a click sends three 32² images and a
31-point curve, about 25 kB).

Usage: ``python scripts/bench_explore.py [--preset large] [--dir /tmp/spndi-bench]`` (the
beamtime is simulated, ingested and reduced once when ``<dir>/<preset>`` has no results, and
reused after).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np


def _beamtime(root: Path, name: str) -> Path:
    from spndi_dask.config import load_manifest
    from spndi_dask.ingest import ingest
    from spndi_dask.reduce import reduce
    from spndi_dask.simulate import preset, simulate_beamtime

    out = root / name
    if not (out / "beamtime.toml").exists():
        t0 = time.perf_counter()
        simulate_beamtime(out, preset(name))
        print(f"simulated {name} in {time.perf_counter() - t0:.1f} s")
    m = load_manifest(out / "beamtime.toml")
    if not (m.layout.results / "zarr.json").exists():
        t0 = time.perf_counter()
        ingest(m)
        reduce(m)
        print(f"ingested and reduced {name} in {time.perf_counter() - t0:.1f} s")
    return m.output_dir


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="large")
    ap.add_argument("--dir", default="/tmp/spndi-bench")
    ap.add_argument("--clicks", type=int, default=20)
    args = ap.parse_args()
    out = _beamtime(Path(args.dir), args.preset)

    import zarr
    from bokeh.document import Document
    from bokeh.events import Tap

    from spndi_dask.explorer import ExplorerData, build_document
    from spndi_dask.io.layout import OutputLayout
    from spndi_dask.simulate import PRESETS, preset

    def open_doc():
        data = ExplorerData(out)
        doc = Document()
        return doc, build_document(doc, data)

    cold = _timed(open_doc)
    warm = statistics.median(_timed(open_doc) for _ in range(5))
    doc, app = open_doc()
    scans = app.data.scans
    raw_gb = preset(args.preset).raw_bytes / 1e9 if args.preset in PRESETS else float("nan")
    first = next(iter(scans.values()))
    pattern = zarr.open_array(str(OutputLayout(out).node(first.name) / "pattern"), mode="r")
    print(
        f"{args.preset}: {len(scans)} scans of {first.shape[0]}×{first.shape[1]} points, "
        f"{first.angle.size} angles, patterns {pattern.shape[2:]} stored in chunks of "
        f"{pattern.chunks[:2]} scan points; raw frames {raw_gb:.1f} GB uncompressed, "
        f"results.zarr {_du(OutputLayout(out).results) / 1e9:.2f} GB"
    )

    rng = np.random.default_rng(0)
    picks = []
    for _ in range(args.clicks):
        s = scans[rng.choice(list(scans))]
        picks.append((s, int(rng.integers(s.shape[0])), int(rng.integers(s.shape[1]))))

    def click(s, iy, ix):
        fig = doc.get_model_by_name(f"map_figure:{s.name}")
        fig._trigger_event(Tap(fig, x=float(s.x[ix]), y=float(s.y[iy])))

    def zarr_pattern(s, iy, ix):
        zarr.open_array(str(OutputLayout(out).node(s.name) / "pattern"), mode="r")[iy, ix]

    def zarr_curve(s, iy, ix):
        zarr.open_array(str(OutputLayout(out).node(s.name) / "rocking_curve"), mode="r")[:, iy, ix]

    click(*picks[0])  # warm the first read of each array
    clicks = [_timed(click, *p) for p in picks]
    assert doc.get_model_by_name("pixel_source").data["iy"] == [picks[-1][1]]
    plain = [_timed(zarr_pattern, *p) for p in picks]
    curves = [_timed(zarr_curve, *p) for p in picks]

    def select(scan, mask):
        doc.get_model_by_name(f"pixels_source:{scan.name}").selected.indices = []
        doc.get_model_by_name(f"pixels_source:{scan.name}").selected.indices = list(
            np.flatnonzero(mask)
        )

    box = np.zeros(first.shape, dtype=bool)
    y0, x0 = first.shape[0] // 3, first.shape[1] // 3
    box[y0 : y0 + 10, x0 : x0 + 10] = True
    boxes = [_timed(select, first, box) for _ in range(5)]
    whole = [_timed(select, first, np.ones(first.shape, dtype=bool)) for _ in range(2)]
    box_read = statistics.median(
        _timed(lambda: pattern[y0 : y0 + 10, x0 : x0 + 10]) for _ in range(5)
    )
    whole_read = min(_timed(lambda: pattern[...]) for _ in range(2))

    med_plain = statistics.median(plain)
    rows = [
        ("open: data + document, cold", cold),
        ("open: data + document, warm (median of 5)", warm),
        (f"click: tap -> views updated (median of {len(clicks)})", statistics.median(clicks)),
        ("click: 90th percentile", float(np.percentile(clicks, 90))),
        ("zarr read of one pixel's pattern (median)", med_plain),
        ("zarr read of one pixel's rocking curve (median)", statistics.median(curves)),
        ("selection: 10×10 box (median of 5)", statistics.median(boxes)),
        ("zarr read of the box's patterns (median of 5)", box_read),
        (f"selection: whole scan, {first.shape[0] * first.shape[1]} pixels", min(whole)),
        ("zarr read of the whole scan's patterns", whole_read),
    ]
    print(f"\n{'':<52}{'seconds':>10}{'÷ zarr pattern read':>22}")
    for label, sec in rows:
        print(f"{label:<52}{sec:>10.4f}{sec / med_plain:>22.1f}")
    target = statistics.median(clicks) < 0.3
    print(f"\nclick target < 0.3 s: {'met' if target else 'NOT met'}")


if __name__ == "__main__":
    main()
