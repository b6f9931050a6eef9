"""Particles: segmentation vs true masks, statistics vs true fields, table, figures, bad input."""

from __future__ import annotations

import csv
import logging

import numpy as np
import pytest

from spndi_dask.config import Manifest
from spndi_dask.particles import COLUMNS, ParticleError, segment_image, stats
from spndi_dask.plot import map_limits
from spndi_dask.reduce import open_results

from .conftest import reduced_beamtime


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """Two demo scans (p1: one particle, p2: a particle with a touching satellite)."""
    out, m = reduced_beamtime(tmp_path_factory, "particles", "demo", n_particles=2)
    summary = stats(m)
    return out, m, summary


def _with(m: Manifest, out, **particle_keys) -> Manifest:
    d = m.to_dict()
    for p in d["scans"]:
        p.update(particle_keys.get(p["name"], {}))
    return Manifest.from_dict(d, base_dir=out, source=str(out / "beamtime.toml"))


def test_masks_match_the_true_particles(small):
    out, m, summary = small
    assert {s["status"] for s in summary.values()} == {"done"}
    for p in m.scans:
        ds = open_results(m.output_dir, p.name)
        truth = np.load(out / "ground_truth" / f"{p.name}.npz")
        labels = ds["label"].values
        assert ds["label"].dims == ("y", "x")
        assert _iou(labels > 0, truth["particle_mask"]) >= 0.95, p.name
        # every true object (including a satellite touching the main particle) has its label
        objects = truth["objects"]
        assert labels.max() == objects.max(), p.name
        for k in range(1, objects.max() + 1):
            best = max(_iou(labels == j, objects == k) for j in range(1, labels.max() + 1))
            assert best >= 0.85, (p.name, k, best)


def test_statistics_match_the_true_fields(small):
    out, m, _ = small
    with open(m.output_dir / "particles.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(COLUMNS)
    assert [r["scan"] for r in rows] == ["p1", "p2", "p2"]  # manifest order, one per label
    for row in rows:
        ds = open_results(m.output_dir, row["scan"])
        truth = np.load(out / "ground_truth" / f"{row['scan']}.npz")
        region = (ds["label"].values == int(row["label"])) & ds["valid"].values
        assert int(row["valid_pixels"]) == region.sum()
        inside = region & truth["particle_mask"]  # the truth has no fields outside
        assert inside.sum() >= 0.97 * region.sum()
        d_true = (2 * np.pi / np.linalg.norm(truth["G"], axis=-1))[inside]
        # the reduce accuracy is 1e-4 RMS per pixel: centres within 1e-4, tails within 3e-4
        for stat, fn, tol in (
            ("mean", np.mean, 1e-4),
            ("median", np.median, 1e-4),
            ("p5", lambda v: np.percentile(v, 5), 3e-4),
            ("p95", lambda v: np.percentile(v, 95), 3e-4),
        ):
            got = float(row[f"d_spacing_{stat}_A"])
            assert got == pytest.approx(fn(d_true), rel=tol), (row["scan"], row["label"], stat)
        # spreads are frame independent: compare with the true strain / tilt spreads
        assert float(row["strain_std"]) == pytest.approx(truth["strain"][inside].std(), abs=1e-4)
        for tilt in ("tilt_x", "tilt_y"):  # mrad in the table, rad in the truth and the maps
            std = 1e3 * truth[tilt][inside].std()
            assert float(row[f"{tilt}_std_mrad"]) == pytest.approx(std, abs=1e-1)
            mean = 1e3 * np.nanmean(ds[tilt].values[region])
            assert float(row[f"{tilt}_mean_mrad"]) == pytest.approx(mean, rel=1e-6, abs=1e-9)
        assert float(row["strain_mean"]) == pytest.approx(np.nanmean(ds["strain"].values[region]))
        # standard errors of the mean: pixel scatter std/√n, counting √Σσ²/n (smaller: the
        # scatter holds the real strain/tilt variation too); in the quantity's shown unit
        for name, unit, factor in (
            ("d_spacing", "_A", 1.0),
            ("strain", "", 1.0),
            ("tilt_x", "_mrad", 1e3),
            ("tilt_y", "_mrad", 1e3),
        ):
            n = int(row["valid_pixels"])
            sem = float(row[f"{name}_std{unit}"]) / np.sqrt(n)
            assert float(row[f"{name}_sem{unit}"]) == pytest.approx(sem, rel=1e-6)
            sigma = ds[f"{name}_sigma"].values[region]
            counting = float(row[f"{name}_sem_counting{unit}"])
            assert counting == pytest.approx(factor * np.sqrt(np.sum(sigma**2)) / n, rel=1e-6)
            assert 0 < counting < float(row[f"{name}_sem{unit}"])
        # the correlation is what the table says it is
        s, t = ds["strain"].values[region], ds["tilt_x"].values[region]
        assert float(row["corr_strain_tilt_x"]) == pytest.approx(np.corrcoef(s, t)[0, 1], abs=1e-6)
        attrs = ds.attrs["particles"]["stats"][int(row["label"]) - 1]
        assert float(attrs["strain_mean"]) == pytest.approx(float(row["strain_mean"]))
        # results.zarr keeps the stored units (rad): the table is 1000 × them
        tilt = float(row["tilt_x_mean_mrad"])
        assert 1e3 * float(attrs["tilt_x_mean"]) == pytest.approx(tilt, rel=1e-6)


def test_figures_are_written_with_shared_centred_limits(small):
    _, m, _ = small
    fig_dir = m.output_dir / "figures"
    names = {p.name for p in fig_dir.iterdir()}
    for p in ("p1", "p2"):
        for kind in ("maps", "rocking_curve", "strain_tilt_kde"):
            assert f"{p}_{kind}.png" in names
    assert "beamtime_overview.png" in names
    for path in fig_dir.iterdir():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    limits = map_limits({p.name: open_results(m.output_dir, p.name) for p in m.scans})
    for name in ("strain", "tilt_x", "tilt_y"):
        lo, hi = limits[name]
        assert lo == -hi and hi > 0
    lo, hi = limits["d_spacing"]
    assert 0 < lo < hi


def test_rerun_is_up_to_date_and_force_redoes(small):
    _, m, _ = small
    assert {s["status"] for s in stats(m, figures=False).values()} == {"up to date"}
    again = stats(m, scans=["p1"], force=True, figures=False)
    assert again == {"p1": {"status": "done", "labels": 1, "method": "intensity otsu"}}
    with open(m.output_dir / "particles.csv", newline="") as f:
        assert [r["scan"] for r in csv.DictReader(f)] == ["p1", "p2", "p2"]
    # a table written before the column was "scan" is read, and rewritten with "scan"
    path = m.output_dir / "particles.csv"
    text = path.read_text()
    assert text.startswith("scan,label,")
    path.write_text("particle" + text.removeprefix("scan"))
    with pytest.warns(DeprecationWarning, match=r"stats\(particles=...\) is deprecated"):
        old_keyword = stats(m, particles=["p2"], figures=False)  # the old keyword still works
    assert old_keyword == {"p2": {"status": "up to date", "labels": 2}}
    assert path.read_text() == text


def test_a_table_in_stored_units_is_redone_with_unit_columns(small):
    _, m, _ = small
    path = m.output_dir / "particles.csv"
    new = path.read_text()
    header, rest = new.split("\n", 1)
    old = (
        header.replace("_mrad", "").replace("_A,", ",").replace("_per_A", "").replace("_counts", "")
    )
    path.write_text(f"{old}\n{rest}")  # as written before one unit per quantity
    assert {s["status"] for s in stats(m, figures=False).values()} == {"done"}
    assert path.read_text().split("\n", 1)[0] == header


def test_user_masks_empty_scan_and_wrong_shape(small, caplog):
    out, m, _ = small
    ny, nx = m.scans[0].scan_shape
    mask = np.zeros((ny, nx), np.uint8)
    mask[2:8, 3:9] = 1
    np.save(out / "p1_mask.npy", mask)
    np.save(out / "empty.npy", np.zeros((ny, nx), np.uint8))
    np.save(out / "wrong.npy", np.zeros((ny + 1, nx), np.uint8))

    m1 = _with(m, out, p1={"mask": "p1_mask.npy"}, p2={"mask": "empty.npy"})
    with caplog.at_level(logging.WARNING):
        summary = stats(m1, figures=False)
    assert summary["p1"]["method"] == "user mask p1_mask.npy"
    labels = open_results(m.output_dir, "p1")["label"].values
    assert (labels > 0).sum() == 36 and labels.max() == 1
    assert summary["p2"]["status"] == "no particle"
    assert "no particle" in caplog.text
    with open(m.output_dir / "particles.csv", newline="") as f:
        rows = {r["scan"]: r for r in csv.DictReader(f)}
    assert rows["p2"]["pixels"] == "0" and "no particle" in rows["p2"]["warning"]

    m2 = _with(m, out, p1={"mask": "wrong.npy"})
    summary = stats(m2, scans=["p1"], figures=False)
    assert summary["p1"]["status"] == "failed"
    assert f"[{ny + 1}, {nx}]" in summary["p1"]["error"]
    assert f"[{ny}, {nx}]" in summary["p1"]["error"]
    with pytest.raises(ParticleError, match="not in the manifest"):
        stats(m, scans=["nope"])
    stats(m, force=True, figures=False)  # back to the automatic labels for other tests


def test_segmentation_noise_touching_and_irregular_shapes():
    rng = np.random.default_rng(0)
    # pure noise: no particle, not a crash
    assert segment_image(rng.normal(10, 1, (30, 30))).max() == 0
    assert segment_image(np.zeros((30, 30))).max() == 0
    yy, xx = np.mgrid[:50, :60]
    # an irregular single particle (bumpy outline) is not split
    phi = np.arctan2(yy - 25, xx - 30)
    r = 15 * (1 + 0.12 * np.cos(3 * phi) + 0.08 * np.cos(5 * phi + 1))
    blob = np.hypot(yy - 25, xx - 30) < r
    img = 100.0 * blob + rng.normal(0, 1, blob.shape)
    labels = segment_image(img)
    assert labels.max() == 1 and _iou(labels > 0, blob) > 0.95
    # two particles touching at a neck get two labels; apart they are two components
    two = (np.hypot(yy - 25, xx - 20) < 12) | (np.hypot(yy - 25, xx - 41) < 9)
    labels = segment_image(100.0 * two + rng.normal(0, 1, two.shape))
    assert labels.max() == 2
    assert (labels == 1).sum() > (labels == 2).sum()  # numbered by area
    # erosion margin
    eroded = segment_image(100.0 * blob, erosion=2)
    assert 0 < (eroded > 0).sum() < (labels > 0).sum()


def test_statistics_of_all_scans_are_one_dask_computation(small, monkeypatch):
    """The per-scan summaries are lazy and computed together (one graph for the beamtime)."""
    import spndi_dask.particles as cs

    _, m, _ = small
    calls = []
    real = cs.compute_each

    def spy(collections, progress=False):
        calls.append([c.__dask_graph__() is not None for c in collections])
        return real(collections, progress)

    monkeypatch.setattr(cs, "compute_each", spy)
    stats(m, force=True, figures=False)
    assert calls == [[True, True]]
