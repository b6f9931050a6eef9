"""Cluster analysis: rocking curves and mean 3D patterns per cluster; domains vs boundaries.

After ``spndi cluster`` every particle pixel has a cluster shared across the beamtime. Here:

* **rocking curves**, each the mean drift-corrected ``rocking_curve`` per pixel: of each scan's
  particle pixels, of its clusters and of its domains and boundaries, on the scan's own angles
  (``scan_angle``; scans may differ), and per cluster pooled over scans that share the angles;
* **mean 3D patterns** per cluster and per region on the common q grid, per scan and pooled over
  all scans (patterns with a masked voxel or no intensity are left out), and their projections;
* **domains vs boundaries**: a particle pixel is a *boundary* pixel when a pixel of another
  cluster lies within ``boundary_width`` scan pixels (Euclidean), else a *domain* pixel unless
  it lies within ``[analysis] rim_width`` of the particle outline (the *rim*, in neither, as the
  original study left the Canny edge of the mask out). Their mean patterns and rocking curves,
  and per scan the mean and std of d-spacing, strain and tilt in each and the differences
  domain − boundary with standard errors and permutation-test p-values (:func:`region_stats`).

All pattern sums come from one dask pass over the pattern arrays (per block: one-hot cluster
matrix × patterns). Results: ``<output>/analysis.zarr`` (xarray Dataset), ``region(y, x)`` in
each scan's node (−1 outside particles, 0 domain, 1 boundary, 2 rim), ``<output>/regions.csv`` and
figures.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr
import zarr
from scipy import ndimage

from spndi_dask import plot
from spndi_dask._deprecate import renamed_keyword
from spndi_dask._version import __version__
from spndi_dask.cluster import STAT_MAPS, map_stats
from spndi_dask.compute import compute
from spndi_dask.config import Manifest
from spndi_dask.figures_study import cluster_detector_images, detector_images_figure
from spndi_dask.io.layout import OutputLayout
from spndi_dask.io.raw_store import open_raw
from spndi_dask.io.results_store import open_results, write_csv, write_map, write_whole_store
from spndi_dask.kernels import usable_patterns
from spndi_dask.stages import Outcome, StageError
from spndi_dask.units import shown_row, stored_unit_table

__all__ = [
    "AnalysisError",
    "analyze",
    "boundary_mask",
    "difference_test",
    "group_sums",
    "region_map",
    "region_stats",
    "rim_mask",
]

logger = logging.getLogger(__name__)


class AnalysisError(StageError, ValueError):
    """The analysis cannot run (no clusters yet...)."""


# -- kernels ------------------------------------------------------------------------------------
def _disk(width: float) -> np.ndarray:
    r = int(np.floor(width))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return (yy**2 + xx**2) <= width**2 + 1e-9


def boundary_mask(clusters: np.ndarray, width: float = 1.0) -> np.ndarray:
    """Pixels (cluster ≥ 0) with a pixel of another cluster within ``width`` pixels.

    Examples
    --------
    >>> c = np.array([[0, 0, 0, 1, 1, 1]])
    >>> boundary_mask(c, 1).astype(int).tolist()
    [[0, 0, 1, 1, 0, 0]]
    >>> boundary_mask(np.array([[0, 0, -1, 1, 1]]), 1).astype(int).tolist()  # -1 is not a cluster
    [[0, 0, 0, 0, 0]]
    """
    disk = _disk(width)
    out = np.zeros(clusters.shape, dtype=bool)
    inside = clusters >= 0
    for c in np.unique(clusters[inside]):
        own = clusters == c
        others = inside & ~own
        out |= own & ndimage.binary_dilation(others, structure=disk)
    return out


def rim_mask(clusters: np.ndarray, width: float = 1.0) -> np.ndarray:
    """Particle pixels (cluster ≥ 0) with a pixel outside the particles within ``width`` pixels.

    The particle's outline, which the original study left out of the domains (the Canny edge of
    the mask). Outside the scan does not count as outside a particle; ``width = 0``: no rim.

    Examples
    --------
    >>> c = np.array([[-1, 0, 0, 0, 1, 1, -1]])
    >>> rim_mask(c, 1).astype(int).tolist()
    [[0, 1, 0, 0, 0, 1, 0]]
    >>> rim_mask(c, 2).astype(int).tolist(), bool(rim_mask(c, 0).any())
    ([[0, 1, 1, 0, 1, 1, 0]], False)
    """
    inside = clusters >= 0
    if width <= 0:
        return np.zeros(clusters.shape, dtype=bool)
    return inside & ndimage.binary_dilation(~inside, structure=_disk(width))


#: ``region(y, x)`` codes
OUTSIDE, DOMAIN, BOUNDARY, RIM = -1, 0, 1, 2


def region_map(
    clusters: np.ndarray, *, boundary_width: float = 1.0, rim_width: float = 1.0
) -> np.ndarray:
    """``int8`` map: −1 outside, 0 domain, 1 boundary between clusters, 2 particle rim.

    A boundary pixel stays a boundary on the rim (as in the study); the rim is left out of
    the domains only.

    Examples
    --------
    >>> c = np.array([[-1, 0, 0, 0, 0, 1, 1, 1, 1, -1]])
    >>> region_map(c).tolist()
    [[-1, 2, 0, 0, 1, 1, 0, 0, 2, -1]]
    """
    bnd = boundary_mask(clusters, boundary_width)
    rim = rim_mask(clusters, rim_width) & ~bnd
    out = np.where(bnd, np.int8(BOUNDARY), np.int8(DOMAIN))
    out[rim] = RIM
    out[clusters < 0] = OUTSIDE
    return out.astype(np.int8)


def _block_sums(patterns: np.ndarray, groups: np.ndarray, n_groups: int) -> np.ndarray:
    """``(1, 1, n_groups, n³ + 1)``: per group Σ pattern and (last column) the pixel count."""
    g = np.asarray(groups).reshape(-1)
    flat = patterns.reshape(len(g), -1)
    ok = (g >= 0) & usable_patterns(patterns.reshape(len(g), *patterns.shape[-3:]))
    out = np.zeros((n_groups, flat.shape[1] + 1))
    if ok.any():
        onehot = np.zeros((n_groups, len(g)))
        onehot[g[ok], np.flatnonzero(ok)] = 1.0
        out[:, :-1] = onehot[:, ok] @ flat[ok].astype(np.float64)
        out[:, -1] = onehot.sum(axis=1)
    return out[None, None]


def group_sums(patterns: da.Array, groups: da.Array, n_groups: int) -> da.Array:
    """Lazy ``(n_groups, n³ + 1)``: Σ of the usable patterns of each group and their count.

    ``groups (y, x)`` holds a group index per pixel (−1 = none). One task per pattern block.
    """
    groups = groups.rechunk(patterns.chunks[:2])
    n_vox = int(np.prod(patterns.shape[2:]))
    parts = da.map_blocks(
        _block_sums,
        patterns,
        groups[:, :, None, None, None],
        n_groups=n_groups,
        drop_axis=[2, 3, 4],
        new_axis=[2, 3],
        chunks=(
            (1,) * len(patterns.chunks[0]),
            (1,) * len(patterns.chunks[1]),
            (n_groups,),
            (n_vox + 1,),
        ),
        dtype=np.float64,
        meta=np.empty((0, 0, 0, 0)),
    )
    return parts.sum(axis=(0, 1))


#: Prefix of the domain − boundary columns of regions.csv (the study's sign)
DIFF = "diff_domain_minus_boundary"


def difference_test(
    domain: np.ndarray,
    boundary: np.ndarray,
    *,
    permutations: int = 1000,
    rng: np.random.Generator | int | None = 0,
) -> dict[str, float]:
    """Domain − boundary difference of the means and of the (population) stds, with errors.

    ``mean``, ``std``: the differences; ``mean_se``: Welch's standard error
    √(s²_d/n_d + s²_b/n_b) (sample variances); ``std_se``: the normal-theory standard error
    √(σ²_d/2(n_d−1) + σ²_b/2(n_b−1)); ``mean_p``, ``std_p``: two-sided permutation-test p-values
    (``scipy.stats.permutation_test``, pixels relabelled at random ``permutations`` times;
    NaN when 0). Pixels are treated as independent: neighbouring pixels are correlated, so the
    errors are lower bounds and the p-values optimistic.

    Examples
    --------
    >>> t = difference_test(np.array([1.0, 3.0]), np.array([10.0, 10.0]), permutations=0)
    >>> t["mean"], t["std"], round(t["mean_se"], 4)
    (-8.0, 1.0, 1.0)
    """
    from scipy.stats import permutation_test

    d, b = np.asarray(domain, dtype=float), np.asarray(boundary, dtype=float)
    nan = float("nan")
    out = {k: nan for k in ("mean", "std", "mean_se", "std_se", "mean_p", "std_p")}
    if not len(d) or not len(b):
        return out
    out["mean"] = float(d.mean() - b.mean())
    out["std"] = float(d.std() - b.std())
    if len(d) < 2 or len(b) < 2:
        return out
    out["mean_se"] = float(np.sqrt(d.var(ddof=1) / len(d) + b.var(ddof=1) / len(b)))
    out["std_se"] = float(np.sqrt(d.var() / (2 * (len(d) - 1)) + b.var() / (2 * (len(b) - 1))))
    if permutations > 0:
        rng = np.random.default_rng(rng)
        batch = max(1, int(2e7 // (len(d) + len(b))))  # ≤ 160 MB of relabelled values
        for key, stat in (
            ("mean", lambda x, y, axis: x.mean(axis=axis) - y.mean(axis=axis)),
            ("std", lambda x, y, axis: x.std(axis=axis) - y.std(axis=axis)),
        ):
            res = permutation_test(
                (d, b),
                stat,
                permutation_type="independent",
                vectorized=True,
                n_resamples=permutations,
                batch=batch,
                rng=rng,
            )
            out[f"{key}_p"] = float(res.pvalue)
    return out


def region_stats(
    maps: dict[str, np.ndarray],
    region: np.ndarray,
    keys: tuple[str, ...] = STAT_MAPS,
    *,
    permutations: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Pixels, mean and std of each map in domains and boundaries, and their differences.

    ``region``: −1 outside, 0 domain, 1 boundary, 2 rim (:func:`region_map`; the rim is in
    neither). Keys: ``domain_pixels``, ``boundary_pixels``, ``rim_pixels``,
    ``domain_<map>_mean``, ``domain_<map>_std``, the same for ``boundary_``, and per map
    ``diff_domain_minus_boundary_<map>_{mean,std}`` — domain − boundary, the original study's
    "mean difference" and "std difference" — each with ``_se`` and ``_p``
    (:func:`difference_test`). Means and (population) standard deviations are over the finite
    values of each map. The test of each map is seeded with ``seed`` and the map's position.

    Examples
    --------
    >>> region = np.array([[0, 0, 1, 1, -1, 2]])
    >>> strain = np.array([[1.0, 3.0, 10.0, 10.0, 99.0, 50.0]])
    >>> row = region_stats({"strain": strain}, region, ("strain",), permutations=0)
    >>> row["domain_strain_mean"], row["domain_strain_std"], row["rim_pixels"]
    (2.0, 1.0, 1)
    >>> row["diff_domain_minus_boundary_strain_mean"], row["diff_domain_minus_boundary_strain_std"]
    (-8.0, 1.0)
    """
    dom, bnd = map_stats(maps, region == DOMAIN, keys), map_stats(maps, region == BOUNDARY, keys)
    row: dict[str, Any] = {
        "domain_pixels": int((region == DOMAIN).sum()),
        "boundary_pixels": int((region == BOUNDARY).sum()),
        "rim_pixels": int((region == RIM).sum()),
    }
    row.update({f"domain_{a}": b for a, b in dom.items()})
    row.update({f"boundary_{a}": b for a, b in bnd.items()})
    for i, key in enumerate(keys):
        v = maps[key]
        ok = np.isfinite(v)
        test = difference_test(
            v[ok & (region == DOMAIN)],
            v[ok & (region == BOUNDARY)],
            permutations=permutations,
            rng=np.random.default_rng([seed, i]),
        )
        for what in ("mean", "std"):
            col = f"{DIFF}_{key}_{what}"
            row[col] = test[what]
            row[f"{col}_se"] = test[f"{what}_se"]
            row[f"{col}_p"] = test[f"{what}_p"]
    return row


def _curve_means(curves: np.ndarray, groups: np.ndarray, n_groups: int) -> np.ndarray:
    """``(n_groups, angle)`` mean rocking curve of each group's pixels (NaN if none)."""
    out = np.full((n_groups, curves.shape[0]), np.nan)
    for g in range(n_groups):
        sel = (groups == g) & np.isfinite(curves).all(axis=0)
        if sel.any():
            out[g] = curves[:, sel].mean(axis=1)
    return out


# -- orchestration ------------------------------------------------------------------------------
ANALYSIS_FIGURES = (
    "cluster_rocking_curves.png",
    "rocking_curves_by_scan.png",
    "cluster_patterns.png",
    "region_patterns.png",
)


#: Version of what analysis.zarr holds; 2: per-scan curves on ``scan_angle``, per-scan patterns;
#: 3: the particle rim left out of the domains, regions.csv domain − boundary with errors;
#: 4: the scans' dimension is ``scan`` (was ``particle``).
ANALYSIS_LAYOUT = 4


def _fingerprint(
    clusters: dict[str, Any], names: list[str], boundary_width: float, settings: dict
) -> str:
    """What an analysis depends on: clustering, scans, widths, tests, version and layout."""
    key = [
        clusters.get("fingerprint"),
        sorted(names),
        float(boundary_width),
        settings,
        __version__,
        ANALYSIS_LAYOUT,
    ]
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:32]


def _is_current(
    path: Path, out: OutputLayout, datasets: dict[str, Any], fp: str, figures: bool
) -> bool:
    """The analysis on disk is complete and has this fingerprint (and its figures, if asked)."""
    if not (path / "zarr.json").exists() or not out.regions_csv.exists():
        return False
    if stored_unit_table(out.regions_csv):  # old column names (tilts in rad)
        return False
    if dict(zarr.open_group(str(path), mode="r").attrs).get("fingerprint") != fp:
        return False
    if any(ds.attrs.get("analysis", {}).get("fingerprint") != fp for ds in datasets.values()):
        return False
    return not figures or all((out.figures / f).exists() for f in ANALYSIS_FIGURES)


def _detector_images(manifest: Manifest, datasets: dict[str, Any], k: int) -> dict[str, Any]:
    """Lazy ``(k, det_row, det_col)`` per scan with raw frames (:func:`cluster_detector_images`)."""
    out = {}
    for name, ds in datasets.items():
        try:
            raw = open_raw(manifest.layout.root, name)
        except (FileNotFoundError, ValueError, StageError) as exc:
            logger.warning("scan '%s': no detector images per cluster (%s)", name, exc)
            continue
        lab = np.asarray(ds["cluster"].values)
        if raw["frames"].shape[1:3] != lab.shape:
            logger.warning("scan '%s': raw scan grid differs from the maps; skipped", name)
            continue
        out[name] = cluster_detector_images(raw["frames"].data, lab, k)
    return out


def _read_regions(table: Path) -> dict[str, tuple[int, int]]:
    with open(table, newline="") as f:
        rows = list(csv.DictReader(f))
    # "particle": the column's name before it was "scan"
    return {
        r.get("scan", r.get("particle")): (int(r["domain_pixels"]), int(r["boundary_pixels"]))
        for r in rows
    }


@renamed_keyword(particles="scans")
def analyze(
    manifest: Manifest,
    *,
    scans: list[str] | None = None,
    boundary_width: float = 1.0,
    rim_width: float | None = None,
    figures: bool = True,
    progress: bool = False,
    force: bool = False,
) -> dict[str, Any]:
    """Cluster rocking curves, mean patterns, domains vs boundaries for all clustered scans.

    ``rim_width`` (default ``[analysis] rim_width``): particle pixels this close to the particle
    outline are left out of the domains (:func:`region_map`).

    Returns a summary: ``status`` ('done' or 'up to date': the same clustering, scans and
    boundary width as the complete analysis on disk, unless ``force``), ``k``, ``regions``
    (domain and boundary pixels per scan), ``seconds``, output paths.
    """
    t0 = time.perf_counter()
    root = manifest.layout.results
    names = manifest.select_scans(scans, error=AnalysisError)
    meta = (
        dict(zarr.open_group(str(root), mode="r").attrs).get("clusters")
        if (root / "zarr.json").exists()
        else None
    )
    if not meta:
        raise AnalysisError(f"no clusters in {root}; run `spndi cluster` first")
    k = int(meta["k"])
    datasets = {}
    for name in names:
        ds = open_results(root, name)
        if "cluster" not in ds or ds.attrs.get("cluster", {}).get("fingerprint") != meta.get(
            "fingerprint"
        ):
            raise AnalysisError(
                f"scan '{name}' has no clusters of the current clustering; run "
                "`spndi cluster` on these particles first"
            )
        datasets[name] = ds
    out = manifest.layout
    path = out.analysis
    settings = manifest.analysis.model_dump(mode="json")
    if rim_width is not None:
        settings["rim_width"] = float(rim_width)
    fp = _fingerprint(meta, names, boundary_width, settings)
    if not force and _is_current(path, out, datasets, fp, figures):
        return {
            "status": Outcome.UP_TO_DATE,
            "k": k,
            "regions": _read_regions(out.regions_csv),
            "analysis": str(path),
            "table": str(out.regions_csv),
            "seconds": round(time.perf_counter() - t0, 2),
        }
    # per scan: cluster and region pattern sums, mean rocking curves, region statistics
    regions, sums, curves, rows, counts = {}, {}, {}, [], {}
    for name, ds in datasets.items():
        lab = np.asarray(ds["cluster"].values)
        counts[name] = np.bincount(lab[lab >= 0], minlength=k)
        regions[name] = region_map(
            lab, boundary_width=boundary_width, rim_width=settings["rim_width"]
        )
        region = np.where(regions[name] == RIM, OUTSIDE, regions[name])  # rim: in neither
        if "pattern" in ds:
            pat = ds["pattern"].data
            sums[name] = (
                group_sums(pat, da.from_array(lab), k),
                group_sums(pat, da.from_array(region.astype(np.int32)), 2),
            )
        rc = np.asarray(ds["rocking_curve"].values, dtype=float)
        curves[name] = {
            "particle": _curve_means(rc, np.where(lab >= 0, 0, -1), 1)[0],
            "cluster": _curve_means(rc, lab, k),
            "region": _curve_means(rc, region, 2),
            "angle": np.asarray(ds["angle"].values, dtype=float),
        }
        maps = {m: np.asarray(ds[m].values, dtype=float) for m in STAT_MAPS}
        rows.append(
            {
                "scan": name,
                **region_stats(
                    maps,
                    regions[name],
                    permutations=settings["permutations"],
                    seed=settings["seed"],
                ),
            }
        )
    detector = _detector_images(manifest, datasets, k) if settings["detector_images"] else {}
    lazy = [a for pair in sums.values() for a in pair] + list(detector.values())
    flat = compute(lazy, progress) if lazy else []
    totals = {nm: (flat[2 * i], flat[2 * i + 1]) for i, nm in enumerate(sums)}
    detector = dict(zip(detector, flat[2 * len(sums) :], strict=True))
    first = next(iter(datasets.values()))
    data: dict[str, Any] = {}
    coords: dict[str, Any] = {
        "cluster": np.arange(k),
        "region": np.array(["domain", "boundary"], dtype=object),
        "scan": np.array(names, dtype=object),
    }
    if totals:
        shape = (first.sizes["dq_x"], first.sizes["dq_y"], first.sizes["dq_z"])
        dims = ("dq_x", "dq_y", "dq_z")
        for d in dims:
            coords[d] = first[d].values
        for j, (key, dim) in enumerate(
            (("cluster_pattern", "cluster"), ("region_pattern", "region"))
        ):
            blank = np.zeros_like(np.asarray(next(iter(totals.values()))[j]))
            per_scan = [np.asarray(totals[nm][j]) if nm in totals else blank for nm in names]
            for name_, total, lead in (
                (key, sum(per_scan), ()),
                (f"{key}_scan", np.stack(per_scan), ("scan",)),
            ):
                count = total[..., -1]
                mean = total[..., :-1] / np.where(count > 0, count, np.nan)[..., None]
                data[name_] = (
                    (*lead, dim, *dims),
                    mean.reshape(*count.shape, *shape),
                    {"long_name": f"mean {key}" + (" of each scan" if lead else "")},
                )
                data[f"{name_}_pixels"] = ((*lead, dim), count.astype(np.int64))
    # rocking curves of each scan on its own angles (scans may differ: the original study's
    # particles had 21 to 41 angles), padded with NaN to the longest scan
    steps = max(len(c["angle"]) for c in curves.values())

    def padded(key: str) -> np.ndarray:
        arrs = [curves[nm][key] for nm in names]
        out_ = np.full((len(arrs), *arrs[0].shape[:-1], steps), np.nan)
        for i, a in enumerate(arrs):
            out_[i, ..., : a.shape[-1]] = a
        return out_

    coords["scan_angle"] = (("scan", "step"), padded("angle"), {"units": "deg"})
    data["particle_rocking_curve"] = (("scan", "step"), padded("particle"))
    data["cluster_rocking_curve"] = (("scan", "cluster", "step"), padded("cluster"))
    data["region_rocking_curve"] = (("scan", "region", "step"), padded("region"))
    angle_sets = {tuple(np.round(c["angle"], 9)) for c in curves.values()}
    if len(angle_sets) == 1:
        coords["angle"] = curves[names[0]]["angle"]
        weights = np.stack([counts[nm] for nm in names]).astype(float)
        pooled = np.nansum(data["cluster_rocking_curve"][1] * weights[:, :, None], axis=0)
        data["cluster_rocking_curve_pooled"] = (
            ("cluster", "angle"),
            pooled / np.where(weights.sum(0) > 0, weights.sum(0), np.nan)[:, None],
        )
    else:
        logger.warning(
            "scans have different angles: per-scan rocking curves are kept on their own "
            "angles (scan_angle); the pooled curve per cluster is not formed"
        )
    shapes = {np.shape(v) for v in detector.values()}
    if detector and len(shapes) == 1 and len(detector) == len(names):
        data["cluster_detector_image"] = (
            ("scan", "cluster", "det_row", "det_col"),
            np.stack([np.asarray(detector[nm]) for nm in names]),
            {"long_name": "mean raw frame of each cluster over angles and pixels"},
        )
    ds_out = xr.Dataset(
        data,
        coords=coords,
        attrs={
            "spndi_dask": {"kind": "analysis", "version": __version__},
            "k": k,
            "boundary_width": boundary_width,
            "rim_width": settings["rim_width"],
            "version": __version__,
            "fingerprint": fp,
        },
    )
    write_whole_store(ds_out, path, out.root)
    for name, region in regions.items():
        write_map(
            root / name,
            "region",
            region,
            stage="analysis",
            long_name="-1 outside particles, 0 domain, 1 boundary between clusters, "
            "2 particle rim (neither)",
            fill_value=-1,
            info={
                "boundary_width": boundary_width,
                "rim_width": settings["rim_width"],
                "k": k,
                "fingerprint": fp,
            },
        )
    prefixes = ("domain_", "boundary_", f"{DIFF}_")  # shown units, spndi_dask.units
    write_csv(out.regions_csv, [shown_row(r, prefixes=prefixes) for r in rows])
    if figures:
        plot.analysis_figures(out.figures, ds_out)
        for name, images in detector.items():
            detector_images_figure(
                np.asarray(images),
                out.figures / f"{name}_cluster_detector_images.png",
                title=f"{name}: mean detector image per cluster (log10, over angle and pixels)",
            )
    return {
        "status": Outcome.DONE,
        "k": k,
        "regions": {r["scan"]: (r["domain_pixels"], r["boundary_pixels"]) for r in rows},
        "analysis": str(path),
        "table": str(out.regions_csv),
        "seconds": round(time.perf_counter() - t0, 2),
    }
