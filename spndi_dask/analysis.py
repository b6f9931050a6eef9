"""Cluster analysis: rocking curves and mean 3D patterns per cluster; domains vs boundaries.

After ``spndi cluster`` every particle pixel has a cluster shared across the beamtime. Here:

* **rocking curves**, each the mean drift-corrected ``rocking_curve`` per pixel: of each scan's
  particle pixels, of its clusters and of its domains and boundaries, on the scan's own angles
  (``scan_angle``; scans may differ), and per cluster pooled over scans that share the angles;
* **mean 3D patterns** per cluster and per region on the common q grid, per scan and pooled over
  all scans (patterns with a masked voxel or no intensity are left out), and their projections;
* **domains vs boundaries**: a particle pixel is a *boundary* pixel when a pixel of another
  cluster lies within ``boundary_width`` scan pixels (Euclidean), else a *domain* pixel. Their
  mean patterns and rocking curves, and per scan the mean and std of d-spacing, strain and tilt
  in each and the differences boundary − domain (:func:`region_stats`).

All pattern sums come from one dask pass over the pattern arrays (per block: one-hot cluster
matrix × patterns). Results: ``<output>/analysis.zarr`` (xarray Dataset), ``region(y, x)`` in
each scan's node (−1 outside particles, 0 domain, 1 boundary), ``<output>/regions.csv`` and
figures.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr
import zarr
from scipy import ndimage

from spndi_dask import plot
from spndi_dask._version import __version__
from spndi_dask.cluster import STAT_MAPS, map_stats
from spndi_dask.compute import compute
from spndi_dask.config import Manifest
from spndi_dask.io.integrity import checksum_encoding
from spndi_dask.io.layout import OutputLayout, replace_tree
from spndi_dask.io.results_store import open_results, write_csv, write_map
from spndi_dask.kernels import usable_patterns
from spndi_dask.stages import Outcome, StageError

__all__ = ["AnalysisError", "analyze", "boundary_mask", "group_sums", "region_stats"]

logger = logging.getLogger(__name__)


class AnalysisError(StageError, ValueError):
    """The analysis cannot run (no clusters yet...)."""


# -- kernels ------------------------------------------------------------------------------------
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
    r = int(np.floor(width))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    disk = (yy**2 + xx**2) <= width**2 + 1e-9
    out = np.zeros(clusters.shape, dtype=bool)
    inside = clusters >= 0
    for c in np.unique(clusters[inside]):
        own = clusters == c
        others = inside & ~own
        out |= own & ndimage.binary_dilation(others, structure=disk)
    return out


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


def region_stats(
    maps: dict[str, np.ndarray], region: np.ndarray, keys: tuple[str, ...] = STAT_MAPS
) -> dict[str, Any]:
    """Pixels, mean and std of each map in domains (``region == 0``) and boundaries (``== 1``).

    Keys: ``domain_pixels``, ``boundary_pixels``, ``domain_<map>_mean``, ``domain_<map>_std``,
    the same for ``boundary_``, and ``diff_<map>_mean``, ``diff_<map>_std`` (boundary − domain:
    the original study's "mean difference" and "std difference", there domain − boundary).
    Means and (population) standard deviations are over the finite values of each map.

    Examples
    --------
    >>> region = np.array([[0, 0, 1, 1, -1]])
    >>> strain = np.array([[1.0, 3.0, 10.0, 10.0, 99.0]])
    >>> row = region_stats({"strain": strain}, region, ("strain",))
    >>> row["domain_strain_mean"], row["domain_strain_std"], row["diff_strain_mean"]
    (2.0, 1.0, 8.0)
    >>> row["diff_strain_std"], row["boundary_pixels"]
    (-1.0, 2)
    """
    dom, bnd = map_stats(maps, region == 0, keys), map_stats(maps, region == 1, keys)
    row: dict[str, Any] = {
        "domain_pixels": int((region == 0).sum()),
        "boundary_pixels": int((region == 1).sum()),
    }
    row.update({f"domain_{a}": b for a, b in dom.items()})
    row.update({f"boundary_{a}": b for a, b in bnd.items()})
    row.update({f"diff_{a}": bnd[a] - dom[a] for a in dom})
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


#: Version of what analysis.zarr holds; 2: per-scan curves on ``scan_angle``, per-scan patterns.
ANALYSIS_LAYOUT = 2


def _fingerprint(clusters: dict[str, Any], names: list[str], boundary_width: float) -> str:
    """What an analysis depends on: clustering, scans, width, package version and layout."""
    key = [
        clusters.get("fingerprint"),
        sorted(names),
        float(boundary_width),
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
    if dict(zarr.open_group(str(path), mode="r").attrs).get("fingerprint") != fp:
        return False
    if any(ds.attrs.get("analysis", {}).get("fingerprint") != fp for ds in datasets.values()):
        return False
    return not figures or all((out.figures / f).exists() for f in ANALYSIS_FIGURES)


def _read_regions(table: Path) -> dict[str, tuple[int, int]]:
    with open(table, newline="") as f:
        rows = list(csv.DictReader(f))
    return {r["particle"]: (int(r["domain_pixels"]), int(r["boundary_pixels"])) for r in rows}


def analyze(
    manifest: Manifest,
    *,
    particles: list[str] | None = None,
    boundary_width: float = 1.0,
    figures: bool = True,
    progress: bool = False,
    force: bool = False,
) -> dict[str, Any]:
    """Cluster rocking curves, mean patterns, domains vs boundaries for all clustered scans.

    Returns a summary: ``status`` ('done' or 'up to date': the same clustering, scans and
    boundary width as the complete analysis on disk, unless ``force``), ``k``, ``regions``
    (domain and boundary pixels per scan), ``seconds``, output paths.
    """
    t0 = time.perf_counter()
    root = manifest.layout.results
    names = manifest.select_particles(particles, error=AnalysisError)
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
                f"particle '{name}' has no clusters of the current clustering; run "
                "`spndi cluster` on these particles first"
            )
        datasets[name] = ds
    out = manifest.layout
    path = out.analysis
    fp = _fingerprint(meta, names, boundary_width)
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
        bnd = boundary_mask(lab, boundary_width)
        region = np.where(lab >= 0, bnd.astype(np.int8), np.int8(-1))
        regions[name] = region
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
        rows.append({"particle": name, **region_stats(maps, region)})
    flat = compute([a for pair in sums.values() for a in pair], progress) if sums else []
    totals = {nm: (flat[2 * i], flat[2 * i + 1]) for i, nm in enumerate(sums)}
    first = next(iter(datasets.values()))
    data: dict[str, Any] = {}
    coords: dict[str, Any] = {
        "cluster": np.arange(k),
        "region": np.array(["domain", "boundary"], dtype=object),
        "particle": np.array(names, dtype=object),
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
                (f"{key}_scan", np.stack(per_scan), ("particle",)),
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

    coords["scan_angle"] = (("particle", "step"), padded("angle"), {"units": "deg"})
    data["particle_rocking_curve"] = (("particle", "step"), padded("particle"))
    data["cluster_rocking_curve"] = (("particle", "cluster", "step"), padded("cluster"))
    data["region_rocking_curve"] = (("particle", "region", "step"), padded("region"))
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
    ds_out = xr.Dataset(
        data,
        coords=coords,
        attrs={
            "spndi_dask": {"kind": "analysis", "version": __version__},
            "k": k,
            "boundary_width": boundary_width,
            "version": __version__,
            "fingerprint": fp,
        },
    )
    tmp = out.tmp / path.name
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    ds_out.to_zarr(
        str(tmp),
        mode="w",
        consolidated=False,
        zarr_format=3,
        encoding=checksum_encoding(ds_out.variables),
        write_empty_chunks=True,
    )
    replace_tree(tmp, path)
    for name, region in regions.items():
        write_map(
            root / name,
            "region",
            region,
            stage="analysis",
            long_name="-1 outside particles, 0 domain, 1 boundary between clusters",
            fill_value=-1,
            info={"boundary_width": boundary_width, "k": k, "fingerprint": fp},
        )
    write_csv(out.regions_csv, rows)
    if figures:
        plot.analysis_figures(out.figures, ds_out)
    return {
        "status": Outcome.DONE,
        "k": k,
        "regions": {r["particle"]: (r["domain_pixels"], r["boundary_pixels"]) for r in rows},
        "analysis": str(path),
        "table": str(out.regions_csv),
        "seconds": round(time.perf_counter() - t0, 2),
    }
