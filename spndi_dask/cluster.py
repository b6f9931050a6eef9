"""k-means over the features of all scans of a beamtime at once.

The feature vectors (``[cluster] features``: the autoencoder's ``latent`` by default, the
``pca_loading`` or ``nmf_loading`` of ``spndi decompose``, or the ``moments`` maps of reduce:
d_spacing, tilt_x, tilt_y, width_x/y/z) of every pixel inside a segmented particle
(``label > 0``) of every selected scan form one matrix, so cluster identities are shared across
particles. Features are scaled (min–max, as the original study, or z-score), then clustered by
:mod:`spndi_dask.kmeans`: scikit-learn on a worker when the matrix fits there, else Lloyd passes
over the dask blocks (``[cluster] engine``, ``memory_fraction``), seeded by

* ``init = "k-means||"`` (default): scikit-learn's k-means++ in memory, k-means|| out of core;
* ``init = "k-means++"``: seeds from ``sklearn.cluster.kmeans_plusplus`` on a sample.

``n_init`` restarts (seeds ``seed, seed+1, ...``); the lowest inertia is kept, the inertia being
the sum of squared distances to the nearest centre.

Choosing K (``k = "auto"``): the original elbow rule — the smallest K whose share of the inertia
drop from ``k_min`` (1) to ``k_max`` reaches ``elbow_fraction`` (0.95) — with the silhouette
score of each K on a seeded sample reported beside it. ``k_max = "auto"`` is the study's range:
K = 1..15 for one scan, 1..80 for a joint clustering, capped at one K per ``pixels_per_k``
particle pixels (so that a small beamtime, as the demo, stays fast).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Literal

import dask
import dask.array as da
import numpy as np
import zarr
from sklearn.metrics import silhouette_score

from spndi_dask import plot
from spndi_dask._deprecate import renamed_keyword
from spndi_dask._version import __version__
from spndi_dask.compute import active_client, compute
from spndi_dask.config import ClusterSettings, Manifest
from spndi_dask.io.results_store import open_results, write_csv, write_map
from spndi_dask.kmeans import Engine, KMeansFit, fit_models
from spndi_dask.kmeans import nearest as _nearest
from spndi_dask.stages import Outcome, StageError
from spndi_dask.units import shown_row, stored_unit_table

__all__ = [
    "ClusterError",
    "KMeansFit",
    "assign",
    "choose_k",
    "cluster",
    "elbow_k",
    "feature_array",
    "fit_kmeans",
    "fit_with_settings",
    "inertia",
    "scaling",
]

logger = logging.getLogger(__name__)


class ClusterError(StageError, ValueError):
    """Clustering cannot run on these inputs (no latent vectors, K too large...)."""


# -- kernels ------------------------------------------------------------------------------------
def elbow_k(inertias: dict[int, float], fraction: float = 0.95) -> int:
    """Smallest K whose share of the inertia drop (K=1 → largest K) reaches ``fraction``.

    Examples
    --------
    >>> elbow_k({1: 100.0, 2: 40.0, 3: 12.0, 4: 10.0, 5: 9.0}, 0.95)  # 88/91 of the drop
    3
    >>> elbow_k({1: 100.0, 2: 40.0, 3: 12.0, 4: 10.0, 5: 9.0}, 0.98)  # 90/91
    4
    """
    ks = sorted(inertias)
    top = inertias[ks[0]] - inertias[ks[-1]]
    if top <= 0:
        return ks[0]
    for k in ks:
        if (inertias[ks[0]] - inertias[k]) / top >= fraction - 1e-12:
            return k
    return ks[-1]


# -- lazy layer ---------------------------------------------------------------------------------
def scaling(x: da.Array, kind: Literal["minmax", "zscore"]) -> tuple[np.ndarray, np.ndarray]:
    """``(offset, scale)`` per feature so that ``(x - offset) / scale`` is min–max or z-score."""
    if kind == "minmax":
        lo, hi = compute([x.min(axis=0), x.max(axis=0)])
        offset, scale = np.asarray(lo, float), np.asarray(hi, float) - np.asarray(lo, float)
    else:
        mean, std = compute([x.mean(axis=0), x.std(axis=0)])
        offset, scale = np.asarray(mean, float), np.asarray(std, float)
    scale = np.where(scale > 0, scale, 1.0)
    return offset, scale


def _labels(block: np.ndarray, centers: np.ndarray) -> np.ndarray:
    return _nearest(block, centers)[0].astype(np.int32)


def _sq_dist(block: np.ndarray, centers: np.ndarray) -> np.ndarray:
    return _nearest(block, centers)[1]


def assign(x: da.Array, centers: np.ndarray) -> da.Array:
    """Lazy index of the nearest centre of every row of ``x``."""
    c = np.asarray(centers, dtype=np.float64)  # an argument, so it is part of the task key
    return x.map_blocks(
        _labels, centers=c, drop_axis=1, dtype=np.int32, meta=np.empty((0,), np.int32)
    )


def inertia(x: da.Array, centers: np.ndarray) -> da.Array:
    """Lazy sum of squared distances of the rows of ``x`` to their nearest centre."""
    c = np.asarray(centers, dtype=np.float64)
    per_row = x.map_blocks(_sq_dist, centers=c, drop_axis=1, dtype=np.float64, meta=np.empty((0,)))
    return per_row.sum()


def fit_kmeans(
    x: da.Array,
    k: int,
    *,
    init: Literal["k-means||", "k-means++"] = "k-means||",
    n_init: int = 4,
    seed: int = 0,
    max_iter: int = 300,
    tol: float = 1e-4,
    sample_size: int = 10_000,
    init_rounds: int = 5,
    engine: Engine = "auto",
    memory_fraction: float = 0.25,
) -> KMeansFit:
    """k-means of the rows of ``x``; ``n_init`` restarts (seeds ``seed, seed+1, ...``), lowest
    inertia kept. The engine (in memory or out of core) is :mod:`spndi_dask.kmeans`'s.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> pts = np.concatenate([rng.normal(0, 0.1, (50, 2)), rng.normal(3, 0.1, (50, 2))])
    >>> fit = fit_kmeans(da.from_array(pts, chunks=25), 2, init="k-means++", n_init=2)
    >>> sorted(np.round(fit.centers[:, 0]).astype(int).tolist())
    [0, 3]
    """
    return _best(
        _models(
            x,
            [(k, seed + r) for r in range(n_init)],
            init=init,
            max_iter=max_iter,
            tol=tol,
            sample_size=sample_size,
            init_rounds=init_rounds,
            engine=engine,
            memory_fraction=memory_fraction,
        ),
        k,
    )


def _models(x: da.Array, models: list[tuple[int, int]], **options: Any) -> dict:
    n = x.shape[0]
    if max(k for k, _ in models) > n:
        k = max(k for k, _ in models)
        raise ClusterError(f"K = {k} clusters need at least {k} latent vectors; there are {n}")
    return fit_models(x, models, **options)


def _best(fits: dict[tuple[int, int], KMeansFit], k: int) -> KMeansFit:
    """The restart of K with the lowest inertia, with the inertia of every restart."""
    mine = [f for (kk, _), f in sorted(fits.items()) if kk == k]
    best = min(mine, key=lambda f: f.inertia)
    return KMeansFit(
        k, best.centers, best.inertia, best.n_iter, best.seed, [f.inertia for f in mine]
    )


def _options(settings: ClusterSettings) -> dict[str, Any]:
    return {
        "init": settings.init,
        "max_iter": settings.max_iter,
        "tol": settings.tol,
        "init_rounds": settings.init_rounds,
        "engine": settings.engine,
        "memory_fraction": settings.memory_fraction,
    }


def fit_with_settings(
    x: da.Array, k: int, settings: ClusterSettings, n_init: int | None = None
) -> KMeansFit:
    """:func:`fit_kmeans` of ``x`` with the ``[cluster]`` settings (``n_init`` theirs if None)."""
    n_init = settings.n_init if n_init is None else n_init
    return fit_kmeans(x, k, n_init=n_init, seed=settings.seed, **_options(settings))


def choose_k(
    x: da.Array,
    settings: ClusterSettings,
    *,
    sample: np.ndarray | None = None,
    scans: int = 1,
) -> tuple[int, dict[int, KMeansFit], dict[int, float]]:
    """Fit K = k_min..k_max; ``(elbow K, fits, silhouette per K ≥ 2 on the sample)``.

    The range is :meth:`ClusterSettings.k_range` of the rows of ``x`` from ``scans`` scans.
    Each K of the scan gets ``scan_restarts`` restarts; the chosen K is refitted with
    ``n_init``.
    """
    k_min, k_max = settings.k_range(x.shape[0], scans)
    seeds = range(settings.seed, settings.seed + settings.scan_restarts)
    ks = range(k_min, k_max + 1)
    # all K and restarts together: parallel tasks in memory, shared passes out of core
    done = _models(x, [(k, s) for k in ks for s in seeds], **_options(settings))
    fits = {k: _best(done, k) for k in ks}
    for k in fits:
        logger.info("K = %d: inertia %.6g", k, fits[k].inertia)
    sil = {}
    if sample is not None and len(sample) > 2:
        for k in range(max(2, k_min), k_max + 1):
            lab = _nearest(sample, fits[k].centers)[0]
            if 1 < len(np.unique(lab)) < len(sample):
                sil[k] = float(silhouette_score(sample, lab))
    k = elbow_k({k: f.inertia for k, f in fits.items()}, settings.elbow_fraction)
    if settings.n_init > settings.scan_restarts:  # the chosen K gets all its restarts
        more = range(settings.seed + settings.scan_restarts, settings.seed + settings.n_init)
        done |= _models(x, [(k, s) for s in more], **_options(settings))
        fits[k] = _best(done, k)
    return k, fits, sil


# -- orchestration ------------------------------------------------------------------------------
STAT_MAPS = ("d_spacing", "strain", "tilt_x", "tilt_y")
#: The reduce maps of ``[cluster] features = "moments"`` (scaled by ``[cluster] standardize``).
MOMENT_MAPS = ("d_spacing", "tilt_x", "tilt_y", "width_x", "width_y", "width_z")
#: Per ``[cluster] features``: (what it is, in words; the node attrs key of the stage making it;
#: the command that makes it)
FEATURES = {
    "latent": ("latent vectors", "features", "spndi encode"),
    "pca": ("PCA loadings", "decompose", "spndi decompose"),
    "nmf": ("NMF loadings", "decompose", "spndi decompose"),
    "moments": ("moment maps", "spndi_dask", "spndi reduce"),
}


def feature_array(ds: Any, features: str, *, name: str = "?") -> da.Array:
    """Lazy ``(y, x, feature)`` array of the ``[cluster] features`` of one scan's node.

    Raises
    ------
    ClusterError
        When the features were not computed for this scan, naming the command that makes them.
    """
    what, key, command = FEATURES[features]
    var = {"latent": "latent", "pca": "pca_loading", "nmf": "nmf_loading"}.get(features)
    have = all(m in ds for m in MOMENT_MAPS) if var is None else var in ds
    if not have or not ds.attrs.get(key):
        raise ClusterError(
            f"scan '{name}' has no {what}; run `{command}` first ([cluster] features = "
            f"{features!r}; `spndi run` computes what the features need)"
        )
    if var is not None:
        return ds[var].data
    return da.stack([ds[m].data for m in MOMENT_MAPS], axis=-1)


def map_stats(
    maps: dict[str, np.ndarray], sel: np.ndarray, keys: tuple[str, ...] = STAT_MAPS
) -> dict[str, float]:
    """``<map>_mean`` and ``<map>_std`` over the finite values of each map where ``sel``."""
    row: dict[str, float] = {}
    for key in keys:
        v = maps[key][sel]
        v = v[np.isfinite(v)]
        row[f"{key}_mean"] = float(v.mean()) if len(v) else float("nan")
        row[f"{key}_std"] = float(v.std()) if len(v) else float("nan")
    return row


def _rows(name: str, labels: np.ndarray, maps: dict[str, np.ndarray], k: int) -> list[dict]:
    rows = []
    n_all = int((labels >= 0).sum())
    for c in range(k):
        sel = labels == c
        row: dict[str, Any] = {
            "scan": name,
            "cluster": c,
            "pixels": int(sel.sum()),
            "fraction": float(sel.sum() / n_all) if n_all else float("nan"),
            **map_stats(maps, sel),
        }
        rows.append(row)
    return rows


@renamed_keyword(particles="scans")
def cluster(
    manifest: Manifest,
    *,
    scans: list[str] | None = None,
    k: int | None = None,
    force: bool = False,
    figures: bool = True,
    progress: bool = False,
) -> dict[str, Any]:
    """Cluster the latent vectors of all (or the named) scans jointly.

    Writes ``cluster(y, x)`` (−1 outside particles or where a pixel has no latent vector) to
    every scan's node, the centres and the K selection to the root attrs, ``<output>/clusters.csv``
    (pixels, fraction and strain/tilt/d statistics of every cluster in every scan, then pooled
    as scan ``all``) and, with ``figures``, the K-selection and cluster-map figures.

    Returns
    -------
    dict
        ``status`` ('clustered' or 'up to date'), ``k``, ``k_source`` ('manifest', 'argument',
        'elbow'), ``inertia``, ``silhouette``, ``pixels`` per scan, ``seconds``, ``warnings``.
    """
    t0 = time.perf_counter()
    settings = manifest.cluster
    root = manifest.layout.results
    names = manifest.select_scans(scans, error=ClusterError)
    warnings: list[str] = []
    datasets, index, blocks, arrays = {}, {}, [], {}
    for name in names:
        try:
            ds = open_results(root, name)
        except (FileNotFoundError, RuntimeError, StageError) as exc:
            raise ClusterError(f"scan '{name}': {exc}") from None
        if "label" not in ds or not ds.attrs.get("particles"):
            raise ClusterError(f"scan '{name}' has no labels; run `spndi stats` first")
        datasets[name] = ds
        arrays[name] = feature_array(ds, settings.features, name=name)
    masks = compute(
        [
            (ds["label"].data > 0) & da.isfinite(arrays[name]).all(axis=-1)
            for name, ds in datasets.items()
        ]
    )
    what = FEATURES[settings.features][0]
    for name, mask in zip(datasets, masks, strict=True):
        flat = np.flatnonzero(mask)
        if not len(flat):
            warnings.append(f"scan '{name}' has no pixel with {what} inside a particle")
            logger.warning(warnings[-1])
        index[name] = flat
        f = arrays[name].shape[-1]
        if len(flat):
            blocks.append(arrays[name].reshape(-1, f)[flat])
    total = sum(len(v) for v in index.values())
    if total == 0:
        raise ClusterError(f"no {what} inside particles in any scan: nothing to cluster")
    x = da.concatenate(blocks, axis=0).astype(np.float64).rechunk((min(50_000, total), -1))
    if active_client() is not None:
        x = x.persist()
    source = FEATURES[settings.features][1]
    key = dask.base.tokenize(
        {n: datasets[n].attrs[source].get("fingerprint") for n in names},
        {n: datasets[n].attrs["particles"].get("fingerprint") for n in names},
        settings.model_dump(mode="json"),
        k,
        __version__,
    )
    meta = dict(zarr.open_group(str(root), mode="r").attrs).get("clusters", {})
    if (
        not force
        and meta.get("fingerprint") == key
        and all(datasets[n].attrs.get("cluster", {}).get("fingerprint") == key for n in names)
        and not stored_unit_table(manifest.layout.clusters_csv)
    ):
        return {"status": Outcome.UP_TO_DATE, "k": meta.get("k"), "seconds": 0.0}
    offset, scale = scaling(x, settings.standardize)
    xs = (x - offset) / scale
    rng = np.random.default_rng(settings.seed)
    s_idx = np.sort(rng.choice(total, size=min(total, settings.silhouette_sample), replace=False))
    (sample,) = compute([xs[s_idx]])
    fixed = k if k is not None else (None if settings.k == "auto" else int(settings.k))
    sil: dict[int, float] = {}
    fits: dict[int, KMeansFit] = {}
    if fixed is None:
        chosen, fits, sil = choose_k(
            xs, settings, sample=np.asarray(sample), scans=sum(len(v) > 0 for v in index.values())
        )
        k_source = "elbow"
    else:
        if fixed > total:
            raise ClusterError(
                f"K = {fixed} clusters but only {total} pixels have {what} inside "
                "particles; lower [cluster] k (or use k = 'auto')"
            )
        chosen = fixed
        fits[chosen] = fit_with_settings(xs, chosen, settings)
        k_source = "argument" if k is not None else "manifest"
    best = fits[chosen]
    (labels,) = compute([assign(xs, best.centers)], progress)
    labels = np.asarray(labels)
    info_root = {
        "fingerprint": key,
        "features": settings.features,
        "k": chosen,
        "k_source": k_source,
        "init": settings.init,
        "n_init": settings.n_init,
        "seed": best.seed,
        "standardize": settings.standardize,
        "offset": offset.tolist(),
        "scale": scale.tolist(),
        "centers_scaled": best.centers.tolist(),
        "centers": (best.centers * scale + offset).tolist(),
        "inertia": best.inertia,
        "restart_inertias": best.restarts,
        "inertia_by_k": {str(kk): f.inertia for kk, f in fits.items()},
        "silhouette_by_k": {str(kk): v for kk, v in sil.items()},
        "particles": names,
        "pixels": total,
        "version": __version__,
    }
    rows: list[dict[str, Any]] = []
    pooled_maps: dict[str, list[np.ndarray]] = {m: [] for m in STAT_MAPS}
    pooled_labels = []
    start = 0
    summary_pixels = {}
    for name, ds in datasets.items():
        flat = index[name]
        shape = ds["valid"].shape
        lab = np.full(int(np.prod(shape)), -1, dtype=np.int32)
        lab[flat] = labels[start : start + len(flat)]
        start += len(flat)
        lab = lab.reshape(shape)
        counts = np.bincount(lab[lab >= 0], minlength=chosen)
        write_map(
            root / name,
            "cluster",
            lab,
            stage="cluster",
            long_name="k-means cluster of the latent vector (-1 = outside particles)",
            fill_value=-1,
            info={
                "fingerprint": key,
                "k": chosen,
                "pixels": counts.tolist(),
                "version": __version__,
            },
        )
        maps = {m: np.asarray(ds[m].values, dtype=float) for m in STAT_MAPS}
        rows += _rows(name, lab, maps, chosen)
        for m in STAT_MAPS:
            pooled_maps[m].append(maps[m].ravel())
        pooled_labels.append(lab.ravel())
        summary_pixels[name] = int((lab >= 0).sum())
    rows += _rows(
        "all",
        np.concatenate(pooled_labels),
        {m: np.concatenate(v) for m, v in pooled_maps.items()},
        chosen,
    )
    table = manifest.layout.clusters_csv
    write_csv(table, [shown_row(r) for r in rows])  # tilt_x_mean_mrad, ... (spndi_dask.units)
    zarr.open_group(str(root), mode="r+").attrs.update({"clusters": info_root})
    if figures:
        plot.cluster_figures(manifest, info_root, {n: open_results(root, n) for n in names})
    logger.info(
        "k-means K=%d (%s) over %s of %d pixels of %d scans",
        chosen,
        k_source,
        what,
        total,
        len(names),
    )
    return {
        "status": Outcome.CLUSTERED,
        "k": chosen,
        "k_source": k_source,
        "features": settings.features,
        "inertia": best.inertia,
        "silhouette": sil,
        "inertia_by_k": {kk: f.inertia for kk, f in fits.items()},
        "pixels": summary_pixels,
        "seconds": round(time.perf_counter() - t0, 2),
        "warnings": warnings,
        "table": str(table),
    }
