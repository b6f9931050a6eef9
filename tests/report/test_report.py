"""HTML report: self-contained, complete, degrading to "not run", and rendered by Chromium.

One ``tiny`` beamtime is processed in-process (simulate → ingest → reduce → stats, a report,
then train 3 epochs → encode → cluster K=2 → analyze, another report). The rendering test runs
headless Chromium and installs it with apt-get when it is missing (CI runs as root on a fresh
Debian); it skips only where it cannot install (no apt-get, not root).
"""

from __future__ import annotations

import base64
import csv
import hashlib
import html
import io
import os
import re
import shutil
import stat
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest
from matplotlib import image as mpimg

from spndi_dask import __version__
from spndi_dask.analysis import analyze
from spndi_dask.cluster import cluster
from spndi_dask.features import encode, train
from spndi_dask.particles import stats
from spndi_dask.report import file_fingerprint, render_report, write_report

from ..conftest import reduced_beamtime

pytestmark = pytest.mark.slow

TIMINGS = [
    {"stage": "ingest", "scans": "p1, p2", "status": "ingested", "seconds": 1.5, "note": ""},
    {"stage": "cluster", "scans": ["p1", "p2"], "status": "clustered", "seconds": 2.25},
]
RUN_INFO = {
    "type": "local",
    "dashboard": "http://127.0.0.1:8787/status",
    "workers": 2,
    "note": "<script>alert('x')</script> & more",
}


@pytest.fixture(scope="module")
def processed(tmp_path_factory):
    """The tiny beamtime: a report after stats (no clustering yet), then after every stage."""
    _, m = reduced_beamtime(tmp_path_factory, "report", "tiny", train_epochs=3)
    stats(m)
    early = write_report(m).read_text()
    train(m)
    encode(m)
    cluster(m, k=2)
    analyze(m)
    path = write_report(m, timings=TIMINGS, run_info=RUN_INFO)
    return m, path, early


class _Page(HTMLParser):
    """Tags with their attributes, ids, headings and the text of each section."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.ids: set[str] = set()
        self.headings: list[str] = []
        self.sections: dict[str, str] = {}
        self._heading: list[str] | None = None
        self._section: str | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        if a.get("id"):
            self.ids.add(a["id"])
        if tag == "section":
            self._section = a.get("id")
            self.sections[self._section] = ""
        if tag in ("h1", "h2", "h3", "h4"):
            self._heading = []

    def handle_endtag(self, tag):
        if tag in ("h1", "h2", "h3", "h4") and self._heading is not None:
            self.headings.append("".join(self._heading).strip())
            self._heading = None
        if tag == "section":
            self._section = None

    def handle_data(self, data):
        if self._heading is not None:
            self._heading.append(data)
        if self._section is not None:
            self.sections[self._section] += data


def _parse(text: str) -> _Page:
    page = _Page()
    page.feed(text)
    return page


def test_report_is_one_self_contained_file(processed):
    m, path, _ = processed
    assert path == m.output_dir / "report" / "index.html"
    assert [p.name for p in path.parent.iterdir()] == ["index.html"]  # no temporary left
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    text = path.read_text()
    page = _parse(text)
    # no script, stylesheet link, frame or remote resource of any kind
    assert not {t for t, _ in page.tags} & {"script", "link", "iframe", "object", "embed"}
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", text, re.I)
    assert "url(" not in text and "@import" not in text
    for tag, attrs in page.tags:
        if tag == "a" and "href" in attrs:  # table of contents: links to anchors of this page
            assert attrs["href"].startswith("#") and attrs["href"][1:] in page.ids, attrs
    # every figure written by the stages is embedded, as a PNG that decodes
    images = [a["src"] for t, a in page.tags if t == "img"]
    pngs = sorted((m.output_dir / "figures").glob("*.png"))
    assert len(images) == len(pngs) >= 11
    for src in images:
        assert src.startswith("data:image/png;base64,")
        data = base64.b64decode(src.split(",", 1)[1], validate=True)
        pixels = mpimg.imread(io.BytesIO(data), format="png")
        assert pixels.ndim == 3 and min(pixels.shape[:2]) > 50
    embedded = {hashlib.sha256(base64.b64decode(s.split(",", 1)[1])).hexdigest() for s in images}
    assert embedded == {hashlib.sha256(p.read_bytes()).hexdigest() for p in pngs}
    assert path.stat().st_size < 1.5 * sum(p.stat().st_size for p in pngs) + 500_000


def test_report_shows_particles_clusters_and_provenance(processed):
    m, path, _ = processed
    text = path.read_text()
    page = _parse(text)
    assert page.headings[0] == m.name and __version__ in text
    for name in ("p1", "p2"):
        assert f"Scan {name}" in page.headings
        sec = page.sections[f"particle-{name}"]
        assert "Label 1: statistics over its pixels" in sec and "not run" not in sec
        assert f"{name}_maps.png" in sec and f"{name}_rocking_curve.png" in sec
    with open(m.output_dir / "particles.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:  # one statistics table per particle label, with its numbers
        sec = page.sections[f"particle-{r['scan']}"]
        assert f"Label {r['label']}: statistics over its pixels" in sec
        assert f"{float(r['strain_mean']):.4g}" in sec
        assert f"{float(r['tilt_x_p95_mrad']):.4g}" in sec and "tilt_x (mrad)" in sec
    clustering = page.sections["clustering"]
    assert "K = 2 given for this run" in clustering and "not run" not in clustering
    assert "clusters_k.png" in clustering and "p2_clusters.png" in clustering
    analysis = page.sections["analysis"]
    assert "Domains vs boundaries (regions.csv)" in analysis and "not run" not in analysis
    assert "cluster_rocking_curves.png" in analysis and "cluster_patterns.png" in analysis
    assert "training best_val_loss" in page.sections["features"]
    # run: timings with their total, run info as escaped text (no link, no script)
    run = page.sections["run"]
    assert "p1, p2" in run and "3.75" in run and "http://127.0.0.1:8787/status" in run
    assert "live only while that run lasted" in run  # not shown as if it were live
    assert html.escape(RUN_INFO["note"]) in text and "<script" not in text
    # provenance: the manifest file's hash and text, versions, inputs, stage records
    prov = page.sections["provenance"]
    manifest_file = Path(m.source)
    assert hashlib.sha256(manifest_file.read_bytes()).hexdigest() in prov
    assert m.manifest_hash in prov
    assert html.escape(manifest_file.read_text(), quote=True) in text
    for lib in ("numpy", "dask", "distributed", "zarr", "xarray", "torch", "dask-ml"):
        assert f"<th>{lib}</th>" in text
    frames = [f for p in m.scans for f in p.frame_paths(m.base_dir)]
    fp = file_fingerprint(frames[-1])
    assert fp["edge_sha256"] in prov and f"All {len(frames)} input files" in prov
    assert prov.count("same") >= len(frames)  # size and mtime as ingest recorded them
    for record in ("ingest (raw.zarr)", "reduce (results.zarr)", "stats", "features", "cluster"):
        assert record in page.headings


def test_report_before_clustering_says_not_run(processed):
    _, _, early = processed
    page = _parse(early)
    for sid in ("features", "clustering", "analysis"):
        assert "not run" in page.sections[sid], sid
    assert "No timings given" in page.sections["run"]
    assert "Label 1: statistics" in page.sections["particle-p1"]  # what ran is shown
    # 3 per scan + overview + the centred tilt vs d-spacing density of all particles
    assert early.count('src="data:image/png;base64,') == 8
    assert "centred on the means of its particles" in page.sections["overview"]


def test_missing_figure_is_skipped_with_a_note(processed):
    m, _, _ = processed
    fig = m.output_dir / "figures" / "p1_maps.png"
    moved = fig.with_name("moved.bin")  # not a .png: not picked up as an extra figure
    fig.rename(moved)
    try:
        text = render_report(m)
    finally:
        moved.rename(fig)
    assert "figure p1_maps.png not written." in _parse(text).sections["particle-p1"]
    assert 'alt="p2_maps.png"' in text


# -- rendering in headless Chromium ---------------------------------------------------------------
@pytest.fixture(scope="module")
def chromium():
    """The chromium binary; installed with apt-get (as root) when missing."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        pytest.skip("chromium is missing and cannot be installed here (needs apt-get as root)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    t0 = time.perf_counter()
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "chromium"]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=480)
        assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}"
    print(f"installed chromium in {time.perf_counter() - t0:.1f} s")
    return shutil.which("chromium")


def _chromium_args(binary: str, profile: Path) -> list[str]:
    return [
        binary,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
    ]


def test_report_renders_in_headless_chromium(processed, chromium, tmp_path):
    _, path, _ = processed
    shot = tmp_path / "shot.png"
    args = _chromium_args(chromium, tmp_path / "profile")
    t0 = time.perf_counter()
    subprocess.run(
        [*args, f"--screenshot={shot}", "--window-size=1280,2000", path.as_uri()],
        capture_output=True,
        timeout=180,
        check=True,
    )
    print(f"screenshot in {time.perf_counter() - t0:.1f} s")
    img = mpimg.imread(shot)
    assert img.shape[:2] == (2000, 1280)
    rgb = img[..., :3]
    assert rgb.std() > 0.1  # not a blank page
    # the embedded figures are drawn: coloured (not grey) pixels in the main column
    main = rgb[:, 300:]
    assert ((main.max(axis=-1) - main.min(axis=-1)) > 0.3).mean() > 0.005
    dom = subprocess.run(
        [*args, "--dump-dom", path.as_uri()],
        capture_output=True,
        text=True,
        timeout=180,
        check=True,
    ).stdout
    page = _parse(dom)
    for heading in ("Summary", "Beamtime overview", "Scan p1", "Scan p2"):
        assert heading in page.headings
    for heading in ("Clustering", "Analysis: domains and boundaries", "Run", "Provenance"):
        assert heading in page.headings
    assert len([1 for t, _ in page.tags if t == "img"]) >= 11
