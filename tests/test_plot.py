"""Figures and the units registry: labels, values in the shown units, layout properties."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from matplotlib.colors import to_rgba

from spndi_dask import plot
from spndi_dask.units import QUANTITIES, column, label, shown, shown_row, unit


@pytest.fixture
def figures(monkeypatch):
    """The figures the plot functions make, kept open instead of saved: {file name: Figure}."""
    made: dict[str, object] = {}

    def keep(fig, path):
        fig.canvas.draw()  # lays the figure out as _save does (tight_layout, then draw)
        fig.tight_layout()
        fig.canvas.draw()
        made[Path(path).name] = fig
        return Path(path)

    monkeypatch.setattr(plot, "_save", keep)
    yield made
    for fig in made.values():
        plot.plt.close(fig)


def _scan(seed: int = 0, ny: int = 12, nx: int = 14) -> xr.Dataset:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:ny, :nx]
    label = (((yy - ny / 2) ** 2 + (xx - nx / 2) ** 2) < 20).astype(np.int32)
    maps = {
        "strain": rng.normal(0, 3e-4, (ny, nx)),
        "tilt_x": rng.normal(0, 5e-4, (ny, nx)),
        "tilt_y": rng.normal(0, 4e-4, (ny, nx)),
        "d_spacing": 4.68 + rng.normal(0, 2e-3, (ny, nx)),
        "intensity": rng.uniform(500, 3000, (ny, nx)),
        "label": label,
        "cluster": np.where(label > 0, (xx > nx / 2).astype(np.int32), -1),
    }
    return xr.Dataset(
        {k: (("y", "x"), v) for k, v in maps.items()},
        coords={"y": 0.05 * np.arange(ny), "x": 0.05 * np.arange(nx), "angle": np.arange(5.0)},
        attrs={"particles": {"rocking_curves_mean": [list(range(5))]}},
    )


def test_registry_units_labels_and_columns():
    assert column("tilt_x", "mean") == "tilt_x_mean_mrad"
    assert column("tilt_y", "sem_counting") == "tilt_y_sem_counting_mrad"
    assert column("d_spacing", "p95") == "d_spacing_p95_A"
    assert column("strain", "std") == "strain_std"  # a plain number: no suffix
    assert column("width_z", "mean") == "width_z_mean_per_A"
    assert column("tilt_x", "mean_se", "diff_domain_minus_boundary_").endswith("_mean_se_mrad")
    assert label("tilt_x_sigma") == "tilt_x_sigma (mrad)" and label("strain") == "strain"
    assert shown("tilt_y_sigma", 2e-3) == pytest.approx(2.0)
    assert shown("strain", 2e-4) == 2e-4 and shown("pca_loading[0]", 5.0) == 5.0
    # the stored units are results.zarr's (the machine contract)
    from spndi_dask.io.results_store import MAP_VARIABLES

    for q, u in QUANTITIES.items():
        assert MAP_VARIABLES[q] == u.stored, q
    assert unit("tilt_x").factor == 1e3
    row = shown_row(
        {"domain_tilt_x_mean": 1e-3, "diff_tilt_x_mean_p": 0.2, "corr_strain_tilt_x": 0.5},
        prefixes=("domain_", "diff_"),
    )
    assert row == {
        "domain_tilt_x_mean_mrad": 1.0,
        "diff_tilt_x_mean_p": 0.2,
        "corr_strain_tilt_x": 0.5,
    }


def test_map_figure_wraps_into_rows_with_values_in_shown_units(figures, tmp_path):
    scans = {"p1": _scan(0), "p2": _scan(1)}
    plot.particle_figures(scans, tmp_path)
    fig = figures["p1_maps.png"]
    maps = [ax for ax in fig.axes if ax.images]
    assert len(maps) == len(plot.MAP_PANELS)
    rows = {round(ax.get_position().y0, 3) for ax in maps}
    assert len(rows) == 2  # 3 + 2 panels: readable at the report's width
    assert fig.get_size_inches()[0] <= 12.5
    by_title = {ax.get_title(): ax for ax in maps}
    tilt = by_title["tilt_x (mrad)"].images[0].get_array()
    inside = scans["p1"]["label"].values > 0
    np.testing.assert_allclose(tilt[inside], 1e3 * scans["p1"]["tilt_x"].values[inside])
    assert "strain" in by_title and "d_spacing (Å)" in by_title
    # the overview's axes are labelled from the registry
    ylabels = [ax.get_ylabel() for ax in figures["beamtime_overview.png"].axes]
    assert ylabels == ["strain", "tilt_x (mrad)", "tilt_y (mrad)", "d_spacing (Å)"]


def _overlaps(labels) -> bool:
    boxes = [t.get_window_extent() for t in labels if t.get_visible() and t.get_text()]
    return any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])


def test_kde_tick_labels_do_not_overlap(figures, tmp_path):
    plot.particle_figures({"p1": _scan(0)}, tmp_path)
    fig = figures["p1_strain_tilt_kde.png"]
    for ax in fig.axes:
        assert not _overlaps(ax.get_xticklabels()), [t.get_text() for t in ax.get_xticklabels()]
    strain_axis = fig.axes[0].xaxis
    assert strain_axis.get_offset_text().get_text()  # one ×10⁻ⁿ factor, stated once


def _analysis(k: int = 3) -> xr.Dataset:
    rng = np.random.default_rng(3)
    shape = (4, 5, 6)
    names = ["p1", "p2"]
    angle = np.linspace(8.0, 9.0, 7)
    curve = np.exp(-((angle - 8.5) ** 2) / 0.05)
    return xr.Dataset(
        {
            "cluster_pattern": (
                ("cluster", "dq_x", "dq_y", "dq_z"),
                rng.uniform(0, 5, (k, *shape)),
            ),
            "region_pattern": (("region", "dq_x", "dq_y", "dq_z"), rng.uniform(0, 5, (2, *shape))),
            "particle_rocking_curve": (("scan", "step"), np.stack([curve, curve])),
            "cluster_rocking_curve": (("scan", "cluster", "step"), np.ones((2, k, 1)) * curve),
            "region_rocking_curve": (("scan", "region", "step"), np.ones((2, 2, 1)) * curve),
            "cluster_rocking_curve_pooled": (("cluster", "angle"), np.ones((k, 1)) * curve),
        },
        coords={
            "cluster": np.arange(k),
            "region": np.array(["domain", "boundary"], dtype=object),
            "scan": np.array(names, dtype=object),
            "angle": angle,
            "scan_angle": (("scan", "step"), np.stack([angle, angle])),
            **{
                d: np.linspace(-0.01, 0.01, n)
                for d, n in zip(("dq_x", "dq_y", "dq_z"), shape, strict=True)
            },
        },
    )


def test_pattern_grids_have_colour_bars_and_a_difference_row(figures, tmp_path):
    ds = _analysis()
    plot.analysis_figures(tmp_path, ds)
    fig = figures["region_patterns.png"]
    images = [ax for ax in fig.axes if ax.images]
    assert len(images) == 9  # domain, boundary, domain − boundary × 3 projections
    assert len(fig.axes) == 2 * len(images)  # a colour bar beside every projection
    diff = np.asarray(ds["region_pattern"][0] - ds["region_pattern"][1])
    np.testing.assert_array_equal(plot.region_difference(ds), diff)
    last = images[6:]
    for axis, ax in enumerate(last):
        assert ax.get_title().startswith("domain − boundary")
        np.testing.assert_allclose(ax.images[0].get_array(), diff.sum(axis=axis).T)
        lo, hi = ax.images[0].get_clim()
        assert lo == -hi  # centred at zero
    # the rows of a grid share one colour scale per projection
    cluster_images = [ax.images[0] for ax in figures["cluster_patterns.png"].axes if ax.images]
    assert len({im.get_clim() for im in cluster_images[0::3]}) == 1


def _colours(ax) -> set:
    return {to_rgba(line.get_color()) for line in ax.lines}


def test_no_colour_means_a_cluster_and_something_else_in_one_figure(figures, tmp_path):
    plot.analysis_figures(tmp_path, _analysis())
    for name in ("cluster_rocking_curves.png", "rocking_curves_by_scan.png"):
        fig = figures[name]
        clusters = {to_rgba(plot._cluster_colour(c, 3)) for c in range(3)}
        for ax in fig.axes:
            lines = {line.get_label(): to_rgba(line.get_color()) for line in ax.lines}
            others = {c for lab, c in lines.items() if not lab.startswith("cluster")}
            assert not (others & clusters), (name, ax.get_title())
    # scans on one panel are told apart by markers, the regions by line style
    ax = figures["cluster_rocking_curves.png"].axes[1]
    assert len({line.get_marker() for line in ax.lines}) == 2


def test_k_selection_legend_is_outside_the_data(figures, tmp_path):
    info = {
        "k": 3,
        "k_source": "elbow",
        "inertia_by_k": {"1": 600.0, "2": 250.0, "3": 190.0, "4": 170.0},
        "silhouette_by_k": {"2": 0.47, "3": 0.39, "4": 0.35},
    }
    plot._k_selection_figure(info, tmp_path / "clusters_k.png")
    fig = figures["clusters_k.png"]
    ax = fig.axes[0]
    legend = ax.get_legend()
    texts = [t.get_text() for t in legend.get_texts()]
    assert texts == ["K = 3 (elbow)", "K = 2 (best silhouette)"]
    assert not legend.get_window_extent().overlaps(ax.get_window_extent())
    ticks = [float(t) for t in ax.get_xticks() if 1 <= t <= 4]
    assert ticks and all(t == int(t) for t in ticks)  # K is an integer
