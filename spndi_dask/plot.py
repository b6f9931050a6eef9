"""Figures (matplotlib, PNG) from computed results: no computation beyond what is plotted.

Values and labels are in the shown units of :mod:`spndi_dask.units` (tilts in mrad, strain a
plain number with matplotlib's one ×10⁻ⁿ factor on its axis). Per scan
(``<output>/figures/<scan>_*.png``): the strain, tilt_x, tilt_y, d_spacing and intensity maps
in rows of :data:`MAP_COLUMNS` (µm axes, scale bar, background masked, diverging maps centred
at zero with limits shared across all scans), the rocking curve of every particle label (mean
per pixel, as the original study's), and the joint density (Gaussian KDE) of strain vs tilt as
the original study plotted. For the beamtime (``beamtime_overview.png``): violins of strain,
tilt_x, tilt_y and d-spacing per scan, in manifest order.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import xarray as xr
from matplotlib.ticker import MaxNLocator, ScalarFormatter
from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar
from scipy.stats import gaussian_kde

from spndi_dask.io.layout import atomic_path
from spndi_dask.units import label, shown

__all__ = [
    "analysis_figures",
    "beamtime_overview",
    "cluster_figures",
    "decomposition_figures",
    "map_limits",
    "particle_figures",
    "pattern_grid",
    "region_difference",
]

logger = logging.getLogger(__name__)

#: Maps of the per-particle map figure: (variable, label, colour map, diverging); values and
#: labels in the shown units of :mod:`spndi_dask.units` (tilts in mrad).
MAP_PANELS = (
    ("strain", label("strain"), "RdBu_r", True),
    ("tilt_x", label("tilt_x"), "PuOr_r", True),
    ("tilt_y", label("tilt_y"), "PuOr_r", True),
    ("d_spacing", label("d_spacing"), "viridis", False),
    ("intensity", label("intensity"), "magma", False),
)
#: Panels per row of the map figure: readable at the report's width (about 1270 px).
MAP_COLUMNS = 3
#: Clusters are coloured ``CLUSTER_COLOURS(c)`` in every figure (maps and curves); the whole
#: particle, domains and boundaries are drawn in greys (:data:`REGION_STYLE`) and scans are told
#: apart by markers, so no colour has two meanings in one figure.
CLUSTER_COLOURS = plt.get_cmap("tab10")
REGION_STYLE = {
    "particle": {"color": "k", "ls": ":", "lw": 2.0},
    "domain": {"color": "0.3", "ls": "-", "lw": 1.3},
    "boundary": {"color": "0.6", "ls": "--", "lw": 1.3},
}
_SCAN_MARKERS = "osD^v<>ph*"


def _cluster_colour(c: int, k: int) -> Any:
    cmap = CLUSTER_COLOURS if k <= 10 else plt.get_cmap("tab20")
    return cmap(c % cmap.N)


def _one_scale(axis: Any) -> None:
    """Tick labels of a small quantity (strain) as plain numbers with one shared ``1e-4``
    factor at the axis' end (matplotlib's offset text), not long decimals that overlap."""
    fmt = ScalarFormatter(useMathText=True)
    fmt.set_powerlimits((-2, 3))
    axis.set_major_formatter(fmt)


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    with atomic_path(path) as tmp:  # the report may read the figures while a stage writes them
        fig.savefig(tmp, dpi=90, format=Path(path).suffix.lstrip(".") or "png")
    plt.close(fig)
    return path


def _masked(ds: xr.Dataset, name: str) -> np.ndarray:
    v = shown(name, np.asarray(ds[name].values, np.float64))
    inside = np.asarray(ds["label"].values) > 0
    return np.where(inside & np.isfinite(v), v, np.nan)


def map_limits(datasets: dict[str, xr.Dataset]) -> dict[str, tuple[float, float]]:
    """Colour limits per map shared by all scans: ±99th percentile of |v| for diverging maps,
    1st–99th percentiles otherwise (over the particle pixels of every scan)."""
    limits = {}
    for name, _, _, diverging in MAP_PANELS:
        values = np.concatenate([_masked(ds, name).ravel() for ds in datasets.values()])
        values = values[np.isfinite(values)]
        if not values.size:
            limits[name] = (-1.0, 1.0) if diverging else (0.0, 1.0)
        elif diverging:
            m = float(np.percentile(np.abs(values), 99)) or 1e-12
            limits[name] = (-m, m)
        else:
            lo, hi = np.percentile(values, [1, 99])
            limits[name] = (float(lo), float(hi) if hi > lo else float(lo) + 1e-12)
    return limits


def _nice_length(span: float) -> float:
    """A round scale-bar length near a fifth of ``span``."""
    target = span / 5
    if target <= 0:
        return 1.0
    p = 10 ** np.floor(np.log10(target))
    return float(min((1, 2, 5, 10), key=lambda m: abs(m * p - target)) * p)


def _extent(ds: xr.Dataset) -> tuple[float, float, float, float]:
    y, x = np.asarray(ds["y"].values), np.asarray(ds["x"].values)
    dy = float(np.median(np.diff(y))) if len(y) > 1 else 1.0
    dx = float(np.median(np.diff(x))) if len(x) > 1 else 1.0
    return (x[0] - dx / 2, x[-1] + dx / 2, y[-1] + dy / 2, y[0] - dy / 2)


def _scale_bar(ax: Any, ds: xr.Dataset) -> None:
    x0, x1, _, _ = _extent(ds)
    length = _nice_length(abs(x1 - x0))
    bar = AnchoredSizeBar(
        ax.transData,
        length,
        f"{length:g} µm",
        "lower right",
        pad=0.3,
        frameon=False,
        size_vertical=0,
    )
    ax.add_artist(bar)


def _map_figure(name: str, ds: xr.Dataset, limits: dict, path: Path) -> Path:
    rows = -(-len(MAP_PANELS) // MAP_COLUMNS)
    fig, axes = plt.subplots(
        rows, MAP_COLUMNS, figsize=(4 * MAP_COLUMNS, 3.4 * rows + 0.4), squeeze=False
    )
    for ax, (var, title, cmap, _) in zip(axes.flat, MAP_PANELS, strict=False):
        lo, hi = limits[var]
        cm = plt.get_cmap(cmap).with_extremes(bad="0.85")
        im = ax.imshow(_masked(ds, var), cmap=cm, vmin=lo, vmax=hi, extent=_extent(ds))
        ax.set_title(title)
        ax.set_xlabel("x (µm)")
        ax.set_ylabel("y (µm)")
        _scale_bar(ax, ds)
        _one_scale(fig.colorbar(im, ax=ax, shrink=0.8).ax.yaxis)
    for ax in axes.flat[len(MAP_PANELS) :]:
        ax.set_axis_off()
    fig.suptitle(f"{name}: maps (grey = background)")
    return _save(fig, path)


def _rocking_figure(
    name: str, ds: xr.Dataset, curves: list, path: Path, *, per_pixel: bool = True
) -> Path:
    angles = np.asarray(ds["angle"].values)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for k, c in enumerate(curves, start=1):
        ax.plot(angles, c, marker="o", ms=3, label=f"particle {k}")
    ax.set_xlabel("rocking angle (deg)")
    ax.set_ylabel("mean intensity per pixel" if per_pixel else "integrated intensity (counts)")
    ax.set_title(f"{name}: rocking curves")
    if curves:
        ax.legend(fontsize=8)
    return _save(fig, path)


def _kde_figure(name: str, ds: xr.Dataset, path: Path, *, max_points: int = 4000) -> Path:
    strain = _masked(ds, "strain").ravel()
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.6))
    for ax, tilt in zip(axes, ("tilt_x", "tilt_y"), strict=True):
        t = _masked(ds, tilt).ravel()
        ok = np.isfinite(strain) & np.isfinite(t)
        s_ok, t_ok = strain[ok], t[ok]
        if len(s_ok) > max_points:
            pick = np.random.default_rng(0).choice(len(s_ok), max_points, replace=False)
            s_ok, t_ok = s_ok[pick], t_ok[pick]
        ax.set_xlabel(label("strain"))
        ax.set_ylabel(label(tilt))
        _one_scale(ax.xaxis)
        ax.xaxis.set_major_locator(MaxNLocator(5))
        if len(s_ok) >= 5 and np.std(s_ok) > 0 and np.std(t_ok) > 0:
            kde = gaussian_kde(np.vstack([s_ok, t_ok]))
            xs = np.linspace(s_ok.min(), s_ok.max(), 80)
            ys = np.linspace(t_ok.min(), t_ok.max(), 80)
            gx, gy = np.meshgrid(xs, ys)
            dens = kde(np.vstack([gx.ravel(), gy.ravel()])).reshape(gx.shape)
            ax.contourf(gx, gy, dens, levels=12, cmap="Blues")
            ax.scatter(s_ok, t_ok, s=1, c="k", alpha=0.15)
        else:
            ax.text(0.5, 0.5, "not enough pixels", ha="center", transform=ax.transAxes)
    fig.suptitle(f"{name}: strain vs tilt (joint density)")
    return _save(fig, path)


def beamtime_overview(datasets: dict[str, xr.Dataset], path: Path) -> Path:
    """Violins of strain, tilt_x, tilt_y and d-spacing per particle label, in manifest order."""
    panels = ("strain", "tilt_x", "tilt_y", "d_spacing")
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(5, 1.2 * len(datasets) + 3), 9))
    for ax, var in zip(axes, panels, strict=True):
        data, names = [], []
        for name, ds in datasets.items():
            labels = np.asarray(ds["label"].values)
            v = shown(var, np.asarray(ds[var].values, np.float64))
            for k in range(1, int(labels.max()) + 1):
                vals = v[(labels == k) & np.isfinite(v)]
                if vals.size >= 2:
                    data.append(vals)
                    names.append(name if labels.max() == 1 else f"{name}#{k}")
        if data:
            ax.violinplot(data, showmedians=True)
            ax.set_xticks(range(1, len(names) + 1), names, fontsize=8)
        ax.set_ylabel(label(var))
        _one_scale(ax.yaxis)
    axes[0].set_title("beamtime overview: per-particle distributions")
    return _save(fig, path)


def particle_figures(datasets: dict[str, xr.Dataset], out_dir: str | Path) -> list[Path]:
    """All figures of ``stats`` for the given scans (datasets with ``label``), in manifest order.

    Returns the written paths.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    datasets = {n: ds for n, ds in datasets.items() if "label" in ds}
    if not datasets:
        return []
    limits = map_limits(datasets)
    written = []
    for name, ds in datasets.items():
        info = ds.attrs.get("particles", {})
        per_pixel = "rocking_curves_mean" in info  # older stats stored the sums only
        curves = info.get("rocking_curves_mean" if per_pixel else "rocking_curves", [])
        written.append(_map_figure(name, ds, limits, out_dir / f"{name}_maps.png"))
        path = out_dir / f"{name}_rocking_curve.png"
        written.append(_rocking_figure(name, ds, curves, path, per_pixel=per_pixel))
        written.append(_kde_figure(name, ds, out_dir / f"{name}_strain_tilt_kde.png"))
    written.append(beamtime_overview(datasets, out_dir / "beamtime_overview.png"))
    from spndi_dask.figures_study import centred_kde_figure  # it imports this module

    written.append(centred_kde_figure(datasets, out_dir / "tilt_d_spacing_kde.png"))
    logger.info("wrote %d figures to %s", len(written), out_dir)
    return written


def _k_selection_figure(info: dict[str, Any], path: Path) -> Path:
    """Inertia and its explained share vs K (elbow), and the silhouette score per K."""
    inertia = {int(k): v for k, v in info["inertia_by_k"].items()}
    sil = {int(k): v for k, v in info["silhouette_by_k"].items()}
    ks = sorted(inertia)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    axes[0].plot(ks, [inertia[k] for k in ks], "o-")
    axes[0].axvline(info["k"], color="C3", ls="--", label=f"K = {info['k']} ({info['k_source']})")
    if sil:
        best = max(sil, key=sil.get)
        axes[0].axvline(best, color="C2", ls=":", label=f"K = {best} (best silhouette)")
        axes[1].axvline(best, color="C2", ls=":")
        axes[1].axvline(info["k"], color="C3", ls="--")
    axes[0].set_xlabel("K")
    axes[0].set_ylabel("inertia (scaled features)")
    # above the axes, outside the data (the curves fill the plot at every K)
    axes[0].legend(loc="lower left", bbox_to_anchor=(0, 1.02), ncol=2, fontsize=8, frameon=False)
    if len(ks) > 1:
        drop = inertia[ks[0]] - inertia[ks[-1]]
        share = [(inertia[ks[0]] - inertia[k]) / drop if drop > 0 else 1.0 for k in ks]
        twin = axes[0].twinx()
        twin.plot(ks, share, "s:", color="C1")
        twin.set_ylabel("explained share of the drop", color="C1")
    if sil:
        axes[1].plot(sorted(sil), [sil[k] for k in sorted(sil)], "o-", color="C2")
    axes[1].set_xlabel("K")
    axes[1].set_ylabel("silhouette (sample)")
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(f"choosing K over K = {ks[0]}..{ks[-1]}")
    return _save(fig, path)


def _outlines(ax: Any, lab: np.ndarray, ds: xr.Dataset, clusters: Any) -> None:
    """Outline of each of ``clusters`` on a map drawn with :func:`_extent` (as the study)."""
    y, x = np.asarray(ds["y"].values), np.asarray(ds["x"].values)
    limits = ax.get_xlim(), ax.get_ylim()
    for c in clusters:
        sel = (lab == c).astype(float)
        if 0 < sel.sum() < sel.size:
            ax.contour(x, y, sel, levels=[0.5], colors="k", linewidths=0.6)
    ax.set_xlim(limits[0])
    ax.set_ylim(limits[1])


def _cluster_map_figure(name: str, ds: xr.Dataset, k: int, path: Path) -> Path:
    """The combined cluster map, then each cluster highlighted on the grey particle."""
    lab = np.asarray(ds["cluster"].values)
    inside = np.asarray(ds["label"].values) > 0
    fig, axes = plt.subplots(1, k + 1, figsize=(3.2 * (k + 1), 3.2), squeeze=False)
    axes = axes[0]
    rgb = np.ones((*lab.shape, 3))
    rgb[inside] = 0.7
    for c in range(k):
        rgb[lab == c] = _cluster_colour(c, k)[:3]
    axes[0].imshow(rgb, extent=_extent(ds))
    _outlines(axes[0], lab, ds, range(k))
    axes[0].set_title(f"{name}: clusters")
    for c in range(k):
        img = np.ones((*lab.shape, 3))
        img[inside] = 0.75
        img[lab == c] = _cluster_colour(c, k)[:3]
        axes[c + 1].imshow(img, extent=_extent(ds))
        _outlines(axes[c + 1], lab, ds, [c])
        axes[c + 1].set_title(f"cluster {c} ({int((lab == c).sum())} px)")
    for ax in axes:
        ax.set_xlabel("x (µm)")
        ax.set_ylabel("y (µm)")
    _scale_bar(axes[0], ds)
    return _save(fig, path)


def cluster_figures(manifest: Any, info: dict[str, Any], datasets: dict[str, xr.Dataset]) -> list:
    """K selection (``clusters_k.png``) and per scan ``<scan>_clusters.png``."""
    out = manifest.layout.figures
    out.mkdir(parents=True, exist_ok=True)
    paths = [_k_selection_figure(info, out / "clusters_k.png")]
    for name, ds in datasets.items():
        paths.append(_cluster_map_figure(name, ds, info["k"], out / f"{name}_clusters.png"))
    return paths


def _projections(
    ax_row: Any,
    pattern: np.ndarray,
    ds: xr.Dataset,
    title: str,
    *,
    diverging: bool = False,
    vmax: list[float] | None = None,
) -> None:
    """The three sums of a 3D pattern over one q axis each, with a colour bar each
    (``diverging``: a signed pattern, e.g. a difference, on a colour scale centred at zero;
    ``vmax``: the top of each projection's colour scale, e.g. shared by the rows of a grid)."""
    names = ("dq_x", "dq_y", "dq_z")
    fig = ax_row[0].figure
    for axis, ax in enumerate(ax_row):
        keep = [d for i, d in enumerate(names) if i != axis]
        proj = np.nansum(pattern, axis=axis)
        a, b = ds[keep[0]].values * 1e3, ds[keep[1]].values * 1e3
        kw: dict[str, Any] = {"vmin": 0.0, "vmax": vmax[axis]} if vmax else {}
        if diverging:
            m = float(np.nanmax(np.abs(proj))) if np.isfinite(proj).any() else 0.0
            kw = {"cmap": "RdBu_r", "vmin": -(m or 1.0), "vmax": m or 1.0}
        im = ax.imshow(
            proj.T, origin="lower", extent=(a[0], a[-1], b[0], b[-1]), aspect="auto", **kw
        )
        _one_scale(fig.colorbar(im, ax=ax, shrink=0.9).ax.yaxis)
        ax.set_xlabel(f"{keep[0]} (1e-3/Å)")
        ax.set_ylabel(f"{keep[1]} (1e-3/Å)")
        ax.set_title(f"{title}: sum over {names[axis]}", fontsize=9)


def _scan_curve(ax: Any, ds: xr.Dataset, p: int, curve: Any, **kw: Any) -> None:
    """Plot one scan's curve on that scan's own angles (``scan_angle``, NaN-padded)."""
    angles = np.asarray(ds["scan_angle"][p].values)
    keep = np.isfinite(angles)
    ax.plot(angles[keep], np.asarray(curve)[keep], **kw)


def rocking_curves_by_scan(ds: xr.Dataset, path: Path) -> Path:
    """Per scan: the particle's mean rocking curve with domains and boundaries; each cluster's.

    One row per scan, as the original study's figures (there in a 2 × 4 grid of particles), on
    each scan's own angles. Curves are means per pixel (intensity per scan pixel).
    """
    names = [str(n) for n in ds["scan"].values]
    k = ds.sizes["cluster"]
    fig, axes = plt.subplots(len(names), 2, figsize=(10, 3 * len(names)), squeeze=False)
    for p, name in enumerate(names):
        left, right = axes[p]
        curve = ds["particle_rocking_curve"][p]
        _scan_curve(left, ds, p, curve, label="particle", **REGION_STYLE["particle"])
        for r, region in enumerate(("domain", "boundary")):
            curve = ds["region_rocking_curve"][p, r]
            _scan_curve(left, ds, p, curve, label=region, **REGION_STYLE[region])
        left.set_title(f"{name}: particle, domains, boundaries", fontsize=9)
        for c in range(k):
            curve = ds["cluster_rocking_curve"][p, c]
            _scan_curve(right, ds, p, curve, label=f"cluster {c}", color=_cluster_colour(c, k))
        right.set_title(f"{name}: per cluster", fontsize=9)
        for ax in (left, right):
            ax.set_xlabel("angle (deg)")
            ax.set_ylabel("mean intensity per pixel")
            ax.legend(fontsize=7)
    return _save(fig, path)


def analysis_figures(out_dir: str | Path, ds: xr.Dataset) -> list[Path]:
    """Cluster rocking curves, pattern projections per cluster, domains vs boundaries."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    k = ds.sizes["cluster"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    if "cluster_rocking_curve_pooled" in ds:
        for c in range(k):
            curve = ds["cluster_rocking_curve_pooled"][c]
            axes[0].plot(ds["angle"], curve, label=f"cluster {c}", color=_cluster_colour(c, k))
        axes[0].set_title("rocking curve per cluster (all scans)")
    else:
        axes[0].set_title("scans have different angles: see rocking_curves_by_scan.png")
    for r, region in enumerate(ds["region"].values):
        for p, name in enumerate(ds["scan"].values):
            curve = ds["region_rocking_curve"][p, r]
            marker = _SCAN_MARKERS[p % len(_SCAN_MARKERS)]
            kw = {**REGION_STYLE[str(region)], "marker": marker, "ms": 4}
            _scan_curve(axes[1], ds, p, curve, label=f"{name} {region}", **kw)
    axes[1].set_title("domains (solid) vs boundaries (dashed), per scan")
    for ax in axes:
        ax.set_xlabel("angle (deg)")
        ax.set_ylabel("mean intensity per pixel")
        if ax.lines:
            ax.legend(fontsize=7)
    paths.append(_save(fig, out / "cluster_rocking_curves.png"))
    paths.append(rocking_curves_by_scan(ds, out / "rocking_curves_by_scan.png"))
    for key, dim, name in (
        ("cluster_pattern", "cluster", "cluster_patterns.png"),
        ("region_pattern", "region", "region_patterns.png"),
    ):
        if key not in ds:
            continue
        paths.append(_save(pattern_grid(ds, key, dim), out / name))
    return paths


def region_difference(ds: xr.Dataset) -> np.ndarray:
    """The domain − boundary mean pattern ``(dq_x, dq_y, dq_z)`` of an analysis dataset."""
    pat = np.asarray(ds["region_pattern"].values, np.float64)
    return pat[0] - pat[1]


def pattern_grid(ds: xr.Dataset, key: str, dim: str) -> Any:
    """Figure of the mean patterns ``ds[key]`` (one row per ``dim`` value, three projections
    with colour bars, one scale per projection for all rows); for the regions a last row of
    domain − boundary (:func:`region_difference`, on a diverging scale centred at zero)."""
    rows = ds.sizes[dim]
    extra = key == "region_pattern" and rows == 2
    fig, axes = plt.subplots(rows + extra, 3, figsize=(11, 3 * (rows + extra)), squeeze=False)
    patterns = np.asarray(ds[key].values, np.float64)
    # one colour scale per projection for all rows, so the rows compare
    top = [float(np.nanmax(np.nansum(patterns, axis=a + 1), initial=0.0)) or 1.0 for a in range(3)]
    for i in range(rows):
        title = f"{dim} {ds[dim].values[i]}"
        _projections(axes[i], patterns[i], ds, title, vmax=top)
    if extra:
        _projections(axes[rows], region_difference(ds), ds, "domain − boundary", diverging=True)
    return fig


def decomposition_figures(
    out_dir: str | Path, ds: xr.Dataset, datasets: dict[str, xr.Dataset], *, first: int = 3
) -> list[Path]:
    """PCA explained variance, the ``first`` components of each kind, their loading maps."""
    from spndi_dask.report.context import DECOMPOSITION_FIGURES  # file names and captions

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = [f for f, _ in DECOMPOSITION_FIGURES]
    ratio = np.asarray(ds["pca_explained_variance_ratio"].values)
    fig, ax = plt.subplots(figsize=(5, 3.4))
    idx = np.arange(1, len(ratio) + 1)
    ax.bar(idx, ratio, color="C0", label="per component")
    ax.plot(idx, np.cumsum(ratio), "o-", color="C1", label="cumulative")
    ax.set_xlabel("PCA component")
    ax.set_ylabel("explained variance ratio")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    paths = [_save(fig, out / names[0])]
    kinds = [
        (kind, i)
        for kind in ("pca", "nmf")
        for i in range(min(first, ds.sizes[f"{kind}_component"]))
    ]
    fig, axes = plt.subplots(len(kinds), 3, figsize=(10, 2.8 * len(kinds)), squeeze=False)
    for row, (kind, i) in zip(axes, kinds, strict=True):
        comp = np.asarray(ds[f"{kind}_components"][i].values)
        _projections(row, comp, ds, f"{kind.upper()} {i}", diverging=kind == "pca")
    paths.append(_save(fig, out / names[1]))
    fig, axes = plt.subplots(
        len(datasets), len(kinds), figsize=(2.6 * len(kinds), 2.6 * len(datasets)), squeeze=False
    )
    for row, (name, scan) in zip(axes, datasets.items(), strict=True):
        for ax, (kind, i) in zip(row, kinds, strict=True):
            img = np.asarray(scan[f"{kind}_loading"][:, :, i].values, dtype=float)
            lim = np.nanmax(np.abs(img)) if np.isfinite(img).any() else 1.0
            cmap, lo = ("RdBu_r", -lim) if kind == "pca" else ("viridis", 0.0)
            ax.imshow(img, cmap=cmap, vmin=lo, vmax=lim, extent=_extent(scan))
            ax.set_title(f"{name}: {kind.upper()} {i}", fontsize=9)
            ax.set_xlabel("x (µm)", fontsize=8)
    paths.append(_save(fig, out / names[2]))
    return paths
