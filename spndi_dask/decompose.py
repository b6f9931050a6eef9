"""PCA and NMF of the particle pixels' 3D patterns (as darfix and hyperspy do).

Every pattern inside a segmented particle (``label > 0``) is normalised as the autoencoder's
input is (``unit_sum_log1p``, :func:`spndi_dask.features._kernels.normalise_patterns`: shape
only, values in [0, 1]) and flattened to one row of ``n³`` voxels. The decompositions are fitted
with scikit-learn on ``[decompose] sample_size`` pixels drawn across all particles (the
autoencoder's seeded, proportional draw), then every particle pixel is projected lazily
(``map_blocks`` over the pattern tiles, one read of the patterns for both):

* **PCA** (``sklearn.decomposition.PCA``, randomized SVD):
  ``loading = (x − mean) · componentsᵀ``; the components are orthonormal,
  ``explained_variance_ratio`` sums to at most 1.
* **NMF** (``sklearn.decomposition.NMF``, ``nndsvda`` start): ``x ≈ W·H`` with ``W, H ≥ 0``; a
  pixel's loadings are ``NMF.transform`` (non-negative least squares with ``H`` fixed).

Results: ``pca_loading(y, x, pca_component)`` and ``nmf_loading(y, x, nmf_component)`` in every
scan's node of ``results.zarr`` (NaN outside particles and where a pattern is masked or empty;
``attrs["decompose"]`` when complete), and ``<output>/decomposition.zarr`` with the components as
3D patterns on the common q grid (``pca_components``, ``pca_mean``,
``pca_explained_variance_ratio``, ``nmf_components``) and figures. ``[cluster] features = "pca"``
or ``"nmf"`` clusters the loadings instead of the latent vectors.

Examples
--------
>>> rng = np.random.default_rng(0)
>>> x = rng.random((40, 2, 2, 2))
>>> pca = fit_decomposition(pattern_rows(x)[0], "pca", 3, seed=0)
>>> loadings = project_patterns(x.reshape(5, 8, 2, 2, 2), [pca])
>>> loadings.shape, bool(np.allclose(loadings.reshape(40, 3), pca.transform(pattern_rows(x)[0])))
((5, 8, 3), True)
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import dask
import dask.array as da
import numpy as np
import xarray as xr
import zarr
from sklearn.decomposition import NMF, PCA
from sklearn.exceptions import ConvergenceWarning

from spndi_dask._deprecate import renamed_keyword
from spndi_dask._version import __version__
from spndi_dask.compute import compute_each
from spndi_dask.config import DecomposeSettings, Manifest
from spndi_dask.features._kernels import normalise_patterns
from spndi_dask.features.train import _draw, _read
from spndi_dask.interrupt import check_interrupted
from spndi_dask.io.results_store import (
    mark_complete,
    open_results,
    replace_array,
    write_whole_store,
)
from spndi_dask.stages import Outcome, StageError

__all__ = [
    "KINDS",
    "DecomposeError",
    "decompose",
    "fit_decomposition",
    "loading_array",
    "pattern_rows",
    "project_patterns",
]

logger = logging.getLogger(__name__)

#: Relative tolerance of the NMF fit: 1e-3 halves the iterations of scikit-learn's 1e-4 and
#: changes the reconstruction error by < 0.01 % (on the ``tiny`` simulation)
NMF_TOL = 1e-3
#: The decompositions, in the order their loadings are computed (one pass for both).
KINDS: tuple[str, ...] = ("pca", "nmf")


class DecomposeError(StageError, ValueError):
    """The decomposition cannot run on these results (no labels, no patterns...)."""


# -- kernels ------------------------------------------------------------------------------------
def pattern_rows(patterns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(rows (k, n³) float32, usable (k,))`` of patterns ``(..., n, n, n)`` flattened.

    Rows are ``unit_sum_log1p``-normalised (as the autoencoder's input); an unusable pattern
    (a NaN voxel, no intensity) gives a row of zeros and ``usable`` False.
    """
    p = np.asarray(patterns)
    flat = p.reshape(-1, *p.shape[-3:])
    x, ok = normalise_patterns(flat, return_usable=True)
    return x.reshape(len(flat), -1), ok


def fit_decomposition(
    rows: np.ndarray,
    kind: Literal["pca", "nmf"],
    n_components: int,
    *,
    seed: int = 0,
    max_iter: int = 400,
) -> PCA | NMF:
    """A fitted scikit-learn ``PCA`` or ``NMF`` of ``rows (k, n³)`` (non-negative for NMF).

    ``n_components`` is capped at the number of rows (and voxels).
    """
    c = int(min(n_components, *rows.shape))
    if kind == "pca":
        # randomized (Halko et al.): the full SVD of a 2048 × 32768 sample takes minutes
        model: PCA | NMF = PCA(n_components=c, svd_solver="randomized", random_state=seed)
    elif kind == "nmf":
        model = NMF(
            n_components=c, init="nndsvda", tol=NMF_TOL, max_iter=max_iter, random_state=seed
        )
    else:
        raise ValueError(f"unknown decomposition {kind!r}; choose one of {', '.join(KINDS)}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(rows)
    if any(issubclass(w.category, ConvergenceWarning) for w in caught):
        logger.warning(
            "%s did not converge in %d iterations; raise [decompose] nmf_max_iter",
            kind.upper(),
            max_iter,
        )
    return model


def project_patterns(
    patterns: np.ndarray, models: Sequence[PCA | NMF], mask: np.ndarray | None = None
) -> np.ndarray:
    """Loadings ``(ty, tx, Σ components)`` float32 of a tile of patterns ``(ty, tx, n, n, n)``.

    The single-process reference of :func:`loading_array`: each model's ``transform`` of the
    normalised patterns, side by side. Pixels outside ``mask`` or with an unusable pattern are
    NaN.
    """
    ty, tx = patterns.shape[:2]
    total = sum(int(m.n_components_) for m in models)
    out = np.full((ty * tx, total), np.nan, dtype=np.float32)
    rows, ok = pattern_rows(patterns)
    if mask is not None:
        ok &= np.asarray(mask, dtype=bool).reshape(ty * tx)
    sel = np.flatnonzero(ok)
    if len(sel):
        x = rows[sel]
        out[sel] = np.concatenate([m.transform(x) for m in models], axis=1)
    return out.reshape(ty, tx, total)


def _project_block(
    patterns: np.ndarray, mask: np.ndarray, *, models: Sequence[PCA | NMF]
) -> np.ndarray:
    return project_patterns(patterns, models, mask.reshape(mask.shape[:2]))


# -- lazy layer ---------------------------------------------------------------------------------
def loading_array(patterns: da.Array, mask: da.Array, models: Sequence[PCA | NMF]) -> da.Array:
    """Lazy loadings ``(y, x, Σ components)`` float32 of ``patterns (y, x, n, n, n)``.

    One task per pattern chunk (the pattern axes whole); ``mask (y, x)`` selects the pixels
    projected (the others are NaN). The fitted models travel once in the graph.
    """
    patterns = patterns.rechunk({2: -1, 3: -1, 4: -1})
    mask = mask.astype(bool).rechunk(patterns.chunks[:2])
    total = sum(int(m.n_components_) for m in models)
    return da.map_blocks(
        _project_block,
        patterns,
        mask[:, :, None, None, None],
        models=list(models),
        drop_axis=[2, 3, 4],
        new_axis=[2],
        chunks=(*patterns.chunks[:2], (total,)),
        dtype=np.float32,
        meta=np.empty((0, 0, 0), np.float32),
    )


# -- orchestration ------------------------------------------------------------------------------
def _settings_key(settings: DecomposeSettings) -> dict[str, Any]:
    fields = settings.model_dump(mode="json")
    fields.pop("run", None)  # when it runs, not what it computes
    return fields


def _components(models: dict[str, Any], first: xr.Dataset, info: dict[str, Any]) -> xr.Dataset:
    """The components as 3D patterns on the q grid, with the fits' figures of merit."""
    dims = ("dq_x", "dq_y", "dq_z")
    shape = tuple(first.sizes[d] for d in dims)
    pca, nmf = models["pca"], models["nmf"]
    data = {
        "pca_components": (("pca_component", *dims), pca.components_.reshape(-1, *shape)),
        "pca_mean": (dims, pca.mean_.reshape(shape)),
        "pca_explained_variance_ratio": (("pca_component",), pca.explained_variance_ratio_),
        "pca_explained_variance": (("pca_component",), pca.explained_variance_),
        "nmf_components": (("nmf_component", *dims), nmf.components_.reshape(-1, *shape)),
    }
    coords = {d: first[d].values for d in dims}
    coords["pca_component"] = np.arange(pca.n_components_)
    coords["nmf_component"] = np.arange(nmf.n_components_)
    return xr.Dataset(data, coords=coords, attrs={"spndi_dask": {"kind": "decomposition"}, **info})


@renamed_keyword(particles="scans")
def decompose(
    manifest: Manifest,
    *,
    scans: list[str] | None = None,
    force: bool = False,
    figures: bool = True,
    progress: bool = False,
) -> dict[str, Any]:
    """PCA and NMF of the particle pixels of all (or the named) scans; project every pixel.

    Fits on a sample drawn across the scans (:mod:`module docstring <spndi_dask.decompose>`),
    then writes ``pca_loading`` and ``nmf_loading`` to every scan's node in one distributed
    computation, the components to ``<output>/decomposition.zarr`` and, with ``figures``,
    ``decomposition_*.png``. Up to date (nothing done) when the sample, the labels and the
    settings are those of the decomposition on disk, unless ``force``.

    Returns
    -------
    dict
        ``status`` ('decomposed' or 'up to date'), ``pixels`` per scan, ``sample`` (pixels fitted
        on), ``pca_explained`` (sum of the explained variance ratios), ``nmf_error`` (relative
        Frobenius reconstruction error of the sample), ``fit_seconds``, ``seconds``.
    """
    t0 = time.perf_counter()
    settings = manifest.decompose
    layout = manifest.layout
    root = layout.results
    names = manifest.select_scans(scans, error=DecomposeError)
    datasets = {}
    for name in names:
        try:
            ds = open_results(root, name)
        except (FileNotFoundError, StageError) as exc:
            raise DecomposeError(f"scan '{name}': {exc}") from None
        if "pattern" not in ds:
            raise DecomposeError(
                f"scan '{name}' in {root} has no q-grid patterns; reduce with patterns first"
            )
        if "label" not in ds or not ds.attrs.get("particles"):
            raise DecomposeError(f"scan '{name}' has no labels; run `spndi stats` first")
        datasets[name] = ds
    draw = _draw(manifest, settings.sample_size, settings.seed, names)
    key = dask.base.tokenize(
        draw.fingerprint,
        {n: datasets[n].attrs["particles"].get("fingerprint") for n in names},
        _settings_key(settings),
        __version__,
    )
    store = layout.decomposition
    if not force and (store / "zarr.json").exists():
        meta = dict(zarr.open_group(str(store), mode="r").attrs)
        nodes_ok = all(
            d.attrs.get("decompose", {}).get("fingerprint") == key for d in datasets.values()
        )
        if meta.get("fingerprint") == key and nodes_ok:
            return {"status": Outcome.UP_TO_DATE, "seconds": 0.0, "decomposition": str(store)}
    sample = _read(draw, progress)
    rows, _ = pattern_rows(sample.patterns)
    tf = time.perf_counter()
    models = {
        "pca": fit_decomposition(rows, "pca", settings.pca_components, seed=settings.seed),
        "nmf": fit_decomposition(
            rows,
            "nmf",
            settings.nmf_components,
            seed=settings.seed,
            max_iter=settings.nmf_max_iter,
        ),
    }
    fit_seconds = time.perf_counter() - tf
    nmf_error = float(models["nmf"].reconstruction_err_ / max(np.linalg.norm(rows), 1e-30))
    sizes = {k: int(m.n_components_) for k, m in models.items()}
    logger.info(
        "PCA (%d components, %.1f %% of the variance) and NMF (%d, error %.3g) fitted on %d "
        "patterns in %.1f s",
        sizes["pca"],
        100 * float(models["pca"].explained_variance_ratio_.sum()),
        sizes["nmf"],
        nmf_error,
        len(rows),
        fit_seconds,
    )
    jobs, arrays, pixels = [], {}, {}
    ordered = [models[k] for k in KINDS]
    for name, ds in datasets.items():
        check_interrupted()
        mask = da.from_array(np.asarray(ds["label"].values) > 0)
        lo = loading_array(ds["pattern"].data, mask, ordered)
        cy, cx = lo.chunks[0][0], lo.chunks[1][0]
        start, sources, targets = 0, [], []
        for kind in KINDS:
            c = sizes[kind]
            arr = replace_array(
                root / name,
                f"{kind}_loading",
                stage="decompose",
                dims=["y", "x", f"{kind}_component"],
                long_name=f"{kind.upper()} loading of the normalised pattern (NaN = not projected)",
                shape=(*lo.shape[:2], c),
                dtype=np.float32,
                chunks=(cy, cx, c),  # the dask chunks: every write is one whole chunk
                fill_value=np.nan,
            )
            arrays[(name, kind)] = arr
            sources.append(lo[:, :, start : start + c])
            targets.append(arr)
            start += c
        jobs.append(da.store(sources, targets, lock=False, compute=False))  # one read for both
    done = compute_each(jobs, progress)
    failed = [e for _, e in done if e is not None]
    if failed:
        raise DecomposeError(f"projecting the patterns failed: {failed[0]}")
    info = {
        "fingerprint": key,
        "sample": len(rows),
        "sample_scans": {
            n: int((sample.index[:, 0] == i).sum()) for i, n in enumerate(sample.scans)
        },
        "normalisation": "unit_sum_log1p",
        "pca_components": sizes["pca"],
        "nmf_components": sizes["nmf"],
        "pca_explained": float(models["pca"].explained_variance_ratio_.sum()),
        "nmf_error": nmf_error,
        "nmf_iterations": int(models["nmf"].n_iter_),
        "settings": settings.model_dump(mode="json"),
        "version": __version__,
    }
    comps = _components(models, next(iter(datasets.values())), info)
    write_whole_store(comps, store, layout.root)
    for name in datasets:
        arr = arrays[(name, "pca")]
        pixels[name] = int(np.isfinite(arr[:, :, 0]).sum())
        mark_complete(
            root / name,
            "decompose",
            {"fingerprint": key, "pixels": pixels[name], **sizes, "version": __version__},
        )
    if figures:
        from spndi_dask import plot

        plot.decomposition_figures(layout.figures, comps, {n: open_results(root, n) for n in names})
    return {
        "status": Outcome.DECOMPOSED,
        "pixels": pixels,
        "sample": len(rows),
        "pca_explained": info["pca_explained"],
        "nmf_error": nmf_error,
        "fit_seconds": round(fit_seconds, 2),
        "seconds": round(time.perf_counter() - t0, 2),
        "decomposition": str(store),
    }
