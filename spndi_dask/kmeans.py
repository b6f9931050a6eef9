"""k-means engine: scikit-learn in memory on a worker, or Lloyd passes over dask blocks.

Every fit of a call — each K of the elbow scan times each restart seed — is a *model*; all the
models of one call run together, on one of two paths chosen from the matrix size
(:func:`choose_path`):

* ``"memory"`` (the matrix fits on one worker): the matrix is concatenated on one worker per
  host, the one holding most of its blocks, and prepared there once as ``KMeans.fit`` prepares
  it (centred, squared row norms, feature variance); every model is then one task of
  scikit-learn's k-means++ and Lloyd iterations on that copy, with all the host's cores
  (:func:`fit_threads`), so that K values and restarts share the preparation (which
  ``KMeans.fit`` redoes, with a copy of the matrix, on every call). float32 rows stay float32
  (as in scikit-learn). Without a distributed client the tasks run in this process on dask's
  threads.
* ``"dask"`` (out of core): every Lloyd iteration of *all* models is one pass over the blocks of
  the matrix (per-block sums, counts and squared distances of every model's clusters, one tree
  reduction), so K values and restarts share their reads of the data; the matrix is never held
  whole anywhere.

Seeding (per model, restart seed ``s``):

* ``init = "k-means++"``: ``sklearn.cluster.kmeans_plusplus`` on a seeded sample of
  ``sample_size`` rows (the same sample for every K of a seed), on both paths;
* ``init = "k-means||"``: in memory, scikit-learn's own greedy k-means++ on the whole matrix
  (``random_state = s``), which is what k-means|| approximates; out of core, k-means||
  (Bahmani et al. 2012): ``init_rounds`` rounds sampling each row with probability
  ``l·d²/φ`` (``l = 2·K``, the largest K of the seed's models), one candidate set per seed
  shared by all its K, the candidates weighted by the rows nearest to them and reduced to K
  seeds by weighted k-means++.

Lloyd's stopping rule is scikit-learn's: the summed squared centre shift at most
``tol × mean feature variance``; from the same seeds both paths reach the same centres. An
empty cluster keeps its centre on the dask path (scikit-learn relocates it). The inertia is the
sum of squared distances to the final centres.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import dask
import dask.array as da
import numpy as np
import psutil
from sklearn.cluster import KMeans, kmeans_plusplus
from sklearn.utils.extmath import row_norms

from spndi_dask.compute import active_client, compute
from spndi_dask.interrupt import check_interrupted
from spndi_dask.worker_plugins import worker_cores

try:  # scikit-learn's Lloyd iterations, without the per-call setup of ``KMeans.fit``
    from sklearn.cluster._kmeans import _kmeans_single_lloyd as _lloyd
except ImportError:  # pragma: no cover - a scikit-learn that moved it: KMeans.fit each time
    _lloyd = None

__all__ = [
    "Engine",
    "KMeansFit",
    "choose_path",
    "fit_models",
    "fit_threads",
    "memory_limit",
    "nearest",
]

logger = logging.getLogger(__name__)

Engine = Literal["auto", "memory", "dask"]
Init = Literal["k-means||", "k-means++"]


@dataclass
class KMeansFit:
    """The kept restart of a k-means fit (centres in the scaled feature space)."""

    k: int
    centers: np.ndarray
    inertia: float
    n_iter: int
    seed: int
    restarts: list[float] = field(default_factory=list)  # inertia of every restart


# -- kernels ------------------------------------------------------------------------------------
def nearest(block: np.ndarray, centers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(index of the nearest centre, squared distance to it) of each row.

    Examples
    --------
    >>> idx, d2 = nearest(np.array([[0.0, 0.0], [3.0, 1.0]]), np.array([[0.0, 1.0], [3.0, 0.0]]))
    >>> idx.tolist(), d2.tolist()
    ([0, 1], [1.0, 1.0])
    """
    b = np.asarray(block, dtype=np.float64)
    d = (b**2).sum(1)[:, None] - 2 * b @ centers.T + (centers**2).sum(1)[None, :]
    idx = d.argmin(axis=1)
    return idx, np.maximum(d[np.arange(len(b)), idx], 0.0)


def _lloyd_stats(block: np.ndarray, centers: tuple[np.ndarray, ...]) -> np.ndarray:
    """Per model, per cluster: ``[sum of member rows (d), member count, their squared distances]``.

    The rows of all models are stacked (model after model), shape ``(1, Σ k, d + 2)``: one
    block's share of one Lloyd step of every model, summed over blocks by the caller.
    """
    b = np.asarray(block, dtype=np.float64)
    n, d = b.shape
    norms = (b**2).sum(1)
    out = []
    for c in centers:
        dist = norms[:, None] - 2 * b @ c.T + (c**2).sum(1)[None, :]
        idx = dist.argmin(axis=1)
        d2 = np.maximum(dist[np.arange(n), idx], 0.0)
        stats = np.zeros((len(c), d + 2))
        onehot = np.zeros((n, len(c)))
        onehot[np.arange(n), idx] = 1.0
        stats[:, :d] = onehot.T @ b
        stats[:, d] = onehot.sum(0)
        stats[:, d + 1] = onehot.T @ d2
        out.append(stats)
    return np.concatenate(out)[None]


def _sample_rows(
    block: np.ndarray,
    start: int,
    candidates: list[np.ndarray],
    phi: np.ndarray,
    factor: np.ndarray,
    seeds: list[int],
    rnd: int,
) -> list[np.ndarray]:
    """k-means|| sampling of one block: every row with probability ``factor · d² / phi``.

    Per seed group, the rows drawn. The uniform draws come from ``(seed, round, first row)``, so
    the sample does not depend on where or in which order the blocks run.
    """
    b = np.asarray(block, dtype=np.float64)
    out = []
    for j, c in enumerate(candidates):
        d2 = nearest(b, c)[1]
        u = np.random.default_rng([seeds[j], rnd, start]).random(len(b))
        out.append(b[u * phi[j] < factor[j] * d2])
    return out


@contextmanager
def fit_threads(threads: int) -> Iterator[int]:
    """Run a fit on ``threads`` OpenMP and BLAS threads (at most the cores this process may use).

    Dask's nannies start workers with ``OMP_NUM_THREADS=1``, which this lifts for the fit; a
    worker pinned to one core runs the fit on the cores it was pinned from
    (:func:`~spndi_dask.worker_plugins.worker_cores`). Yields the threads.
    """
    from threadpoolctl import threadpool_limits

    with worker_cores(_this_worker()) as cores:
        n = max(1, min(threads, len(cores) if cores else os.cpu_count() or 1))
        with threadpool_limits(limits=n):
            yield n


Prepared = tuple[np.ndarray, np.ndarray, np.ndarray, float]


def _prepare(blocks: list[np.ndarray], dtype: np.dtype = np.float64) -> Prepared:
    """The matrix as scikit-learn's ``KMeans.fit`` prepares it, once for all the fits of a copy.

    ``(rows minus their mean, the mean, the rows' squared norms, the mean feature variance)``:
    the same centring, norms and tolerance base (``np.var`` of the rows) as ``KMeans.fit``,
    which redoes them (and copies the matrix) on every call.
    """
    x = np.ascontiguousarray(np.concatenate(blocks), dtype=dtype)
    variance = float(np.mean(np.var(x, axis=0)))
    mean = x.mean(axis=0)
    x -= mean
    return x, mean, row_norms(x, squared=True), variance


def _sklearn_fit(
    prepared: Prepared,
    k: int,
    init: np.ndarray | None,
    seed: int,
    max_iter: int,
    tol: float,
    threads: int,
) -> tuple[np.ndarray, float, int]:
    """One scikit-learn Lloyd fit from ``init`` (its own k-means++ when None) on ``threads``.

    ``KMeans(k, init=..., n_init=1, random_state=seed).fit`` on the rows of ``prepared``
    (:func:`_prepare`): its k-means++ and its Lloyd iterations on the prepared rows.
    """
    x, mean, norms, variance = prepared
    with fit_threads(threads) as n:
        if _lloyd is None:  # scikit-learn moved its Lloyd iterations: the whole fit
            start = "k-means++" if init is None else np.asarray(init, np.float64) - mean
            model = KMeans(k, init=start, n_init=1, max_iter=max_iter, tol=tol, random_state=seed)
            model.fit(x)
            centers, inertia, n_iter = model.cluster_centers_, model.inertia_, model.n_iter_
        else:
            if init is None:
                start = kmeans_plusplus(x, k, x_squared_norms=norms, random_state=seed)[0]
            else:
                start = np.asarray(init, x.dtype) - mean
            weight = np.ones(len(x), x.dtype)
            _, inertia, centers, n_iter = _lloyd(
                x, weight, start, max_iter=max_iter, tol=variance * tol, n_threads=n
            )
    return np.asarray(centers + mean, np.float64), float(inertia), int(n_iter)


def _this_worker() -> Any:
    """The dask worker running this task, or None (dask's local threads)."""
    from distributed import get_worker

    try:
        return get_worker()
    except ValueError:
        return None


def _work_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype of the in-memory fit: float32 stays float32 (as scikit-learn keeps it)."""
    return np.dtype(np.float32) if dtype == np.float32 else np.dtype(np.float64)


# -- choosing the path --------------------------------------------------------------------------
def memory_limit() -> tuple[int, int]:
    """``(smallest worker memory limit in bytes, worker threads)`` of the active client.

    Workers without a limit count with their machine's memory; without a client, this
    machine's available memory and its cores.
    """
    client = active_client()
    workers = client.scheduler_info(n_workers=-1)["workers"] if client is not None else {}
    if not workers:
        return int(psutil.virtual_memory().available), os.cpu_count() or 1
    total = int(psutil.virtual_memory().total)
    limits = [int(w.get("memory_limit") or total) for w in workers.values()]
    return min(limits), sum(int(w.get("nthreads", 1)) for w in workers.values())


def choose_path(
    nbytes: int, *, engine: Engine = "auto", memory_fraction: float = 0.25, limit: int
) -> Literal["memory", "dask"]:
    """The k-means path for a matrix of ``nbytes``: in memory when it fits a worker.

    The in-memory path holds the matrix and a working copy on a worker, so it is chosen when
    ``nbytes ≤ memory_fraction × limit``; ``engine`` forces either path.

    Examples
    --------
    >>> choose_path(512 * 2**20, limit=4 * 2**30), choose_path(2 * 2**30, limit=4 * 2**30)
    ('memory', 'dask')
    >>> choose_path(2 * 2**30, limit=4 * 2**30, engine="memory")
    'memory'
    """
    if engine != "auto":
        return engine
    return "memory" if nbytes <= memory_fraction * limit else "dask"


# -- seeds --------------------------------------------------------------------------------------
def _sample_seeds(
    x: da.Array, models: list[tuple[int, int]], sample_size: int
) -> dict[tuple[int, int], np.ndarray]:
    """k-means++ seeds of every model from one seeded sample per restart seed."""
    n = x.shape[0]
    seeds = sorted({s for _, s in models})
    idx = {
        s: np.sort(
            np.random.default_rng(s).choice(
                n, size=min(n, max(sample_size, max(k for k, _ in models))), replace=False
            )
        )
        for s in seeds
    }
    samples = dict(zip(seeds, compute([x[idx[s]] for s in seeds]), strict=True))
    return {
        (k, s): kmeans_plusplus(np.asarray(samples[s], float), k, random_state=s)[0]
        for k, s in models
    }


def _parallel_seeds(
    x: da.Array, models: list[tuple[int, int]], rounds: int
) -> dict[tuple[int, int], np.ndarray]:
    """k-means|| seeds of every model; one candidate set per restart seed, shared by its K."""
    n = x.shape[0]
    seeds = sorted({s for _, s in models})
    factor = np.array([2.0 * max(k for k, s in models if s == g) for g in seeds])
    first = [int(np.random.default_rng(s).integers(n)) for s in seeds]
    cand = [np.asarray(c, float) for c in compute([x[i : i + 1] for i in first])]
    for rnd in range(rounds):
        check_interrupted()
        (stats,) = compute([_pass(x, cand)])
        phi = _split(stats, cand)
        phi = np.array([p[:, -1].sum() for p in phi])
        if not (phi > 0).any():
            break
        factor = np.where(phi > 0, factor, 0.0)
        phi = np.where(phi > 0, phi, 1.0)
        starts = np.cumsum((0, *x.chunks[0][:-1]))
        picks = [
            dask.delayed(_sample_rows)(block, int(i0), cand, phi, factor, seeds, rnd)
            for block, i0 in zip(x.to_delayed().ravel(), starts, strict=True)
        ]
        per_block = compute(picks)
        cand = [
            np.unique(np.concatenate([c, *(p[j] for p in per_block)]), axis=0)
            for j, c in enumerate(cand)
        ]
    (stats,) = compute([_pass(x, cand)])
    weights = [s[:, -2] for s in _split(stats, cand)]
    out = {}
    for k, s in models:
        j = seeds.index(s)
        c, w = cand[j], weights[j]
        if (w > 0).sum() < k:  # fewer distinct candidates than clusters: add sampled rows
            extra = np.sort(np.random.default_rng(s).choice(n, size=min(n, 4 * k), replace=False))
            (more,) = compute([x[extra]])
            c = np.concatenate([c, np.asarray(more, float)])
            w = np.concatenate([w, np.ones(len(more))])
        km = KMeans(k, init="k-means++", n_init=1, random_state=s).fit(c, sample_weight=w)
        out[(k, s)] = np.asarray(km.cluster_centers_, np.float64)
    return out


# -- the two paths ------------------------------------------------------------------------------
def _pass(x: da.Array, centers: list[np.ndarray]) -> da.Array:
    """Lazy one-pass Lloyd statistics of every model: ``(Σ k, d + 2)`` (see ``_lloyd_stats``)."""
    rows = sum(len(c) for c in centers)
    parts = x.map_blocks(
        _lloyd_stats,
        tuple(np.asarray(c, np.float64) for c in centers),  # in the task keys
        new_axis=2,
        chunks=((1,) * x.numblocks[0], (rows,), (x.shape[1] + 2,)),
        dtype=np.float64,
        meta=np.empty((0, 0, 0)),
    )
    return parts.sum(axis=0)


def _split(stats: np.ndarray, centers: list[np.ndarray]) -> list[np.ndarray]:
    bounds = np.cumsum([len(c) for c in centers])[:-1]
    return np.split(np.asarray(stats), bounds)


def _lloyd_dask(
    x: da.Array, starts: dict[Any, np.ndarray], max_iter: int, tol: float
) -> dict[Any, tuple[np.ndarray, float, int]]:
    """Lloyd iterations of every model, one pass over ``x`` per iteration for all of them.

    ``tol`` is relative to the mean feature variance (scikit-learn's rule), computed in the
    first pass.
    """
    d = x.shape[1]
    abs_tol = None
    centers = {m: np.asarray(c, np.float64) for m, c in starts.items()}
    n_iter = dict.fromkeys(starts, 0)
    active, finishing, out = list(starts), [], {}
    while active or finishing:
        check_interrupted()
        models = active + finishing
        if abs_tol is None:  # the variances in the same pass (blocks read once)
            stats, var = compute([_pass(x, [centers[m] for m in models]), x.var(axis=0)])
            abs_tol = float(np.mean(var)) * tol
        else:
            (stats,) = compute([_pass(x, [centers[m] for m in models])])
        done = []
        for m, s in zip(models, _split(stats, [centers[m] for m in models]), strict=True):
            if m in finishing:  # a pass at the final centres: the inertia
                out[m] = (centers[m], float(s[:, d + 1].sum()), n_iter[m])
                continue
            count = s[:, d]
            new = np.where(count[:, None] > 0, s[:, :d] / np.maximum(count, 1)[:, None], centers[m])
            shift = float(((new - centers[m]) ** 2).sum())
            n_iter[m] += 1
            if shift == 0:  # labels unchanged: this pass's inertia is the final one
                out[m] = (centers[m], float(s[:, d + 1].sum()), n_iter[m])
            elif shift <= abs_tol or n_iter[m] >= max_iter:
                done.append(m)
            centers[m] = new
        active = [m for m in active if m not in out and m not in done]
        finishing = done
    return out


def _gather(client: Any, futures: list[Any]) -> list[Any]:
    """The results of ``futures``; all cancelled if interrupted or failed."""
    try:
        check_interrupted()
        return client.gather(futures)
    except BaseException:
        client.cancel(futures)
        raise


def _hosts(workers: dict[str, dict], held: dict[str, int], n: int) -> list[tuple[str, int]]:
    """Where ``n`` in-memory fits run: ``(worker, OpenMP threads of each of its fits)``.

    One worker per host, the one holding most rows of the matrix there (fewest bytes to move),
    on at most ``n`` hosts (those holding most rows first); each gets one copy of the matrix and
    every ``len(result)``-th fit. A worker runs as many fits at once as it has threads (at most
    its fits), and each fit gets its share of the threads of *all* the workers on its host: one
    fit on a host of 1-thread workers uses every core while the other workers idle.

    Examples
    --------
    >>> w = {"a": {"host": "h", "nthreads": 1}, "b": {"host": "h", "nthreads": 1}}
    >>> _hosts(w, {"a": 10, "b": 30}, 2)
    [('b', 2)]
    """
    by_host: dict[str, list[str]] = {}
    for addr, info in workers.items():
        by_host.setdefault(info.get("host", addr), []).append(addr)
    ranked = []  # (rows held on the host, its threads, its chosen worker)
    for addrs in by_host.values():
        best = max(addrs, key=lambda a: (held.get(a, 0), workers[a].get("nthreads", 1), a))
        cores = sum(int(workers[a].get("nthreads", 1)) for a in addrs)
        ranked.append((sum(held.get(a, 0) for a in addrs), cores, best))
    ranked = sorted(ranked, key=lambda r: (-r[0], -r[1], r[2]))[:n]
    out = []
    for j, (_, cores, best) in enumerate(ranked):
        at_once = min(int(workers[best].get("nthreads", 1)), len(range(j, n, len(ranked))))
        out.append((best, max(1, cores // at_once)))
    return out


def _on(worker: str) -> dict[str, Any]:
    """``submit`` options: on ``worker``; elsewhere only if it leaves (else it would wait)."""
    return {"workers": [worker], "allow_other_workers": True}


def _fit_in_memory(
    x: da.Array,
    models: list[tuple[int, int]],
    starts: dict[tuple[int, int], np.ndarray | None],
    max_iter: int,
    tol: float,
    threads: int,
) -> dict[tuple[int, int], tuple[np.ndarray, float, int]]:
    """Every model as one scikit-learn task on one copy of the matrix per host used.

    The blocks are computed (or, persisted, found) where the scheduler puts them, then
    concatenated on the worker that holds most of them (see :func:`_hosts`). Without a client
    the tasks run on this process's dask threads.
    """
    order = sorted(models, key=lambda m: (-m[0], m[1]))  # the largest K first
    dtype = _work_dtype(x.dtype)
    client = active_client()
    if client is None:
        cores = max(1, threads // len(models))  # OpenMP threads of one fit
        whole = dask.delayed(_prepare)(x.to_delayed().ravel().tolist(), dtype)
        fits = [
            dask.delayed(_sklearn_fit)(whole, k, starts[k, s], s, max_iter, tol, cores)
            for k, s in order
        ]
        return dict(zip(order, compute(fits), strict=True))
    from distributed import wait

    wholes: list[Any] = []
    futures: list[Any] = []
    try:
        blocks = client.compute(x.to_delayed().ravel().tolist())
        check_interrupted()
        wait(blocks)
        who = client.who_has(blocks)
        held: dict[str, int] = {}  # rows of the matrix per worker
        for b, rows in zip(blocks, x.chunks[0], strict=True):
            for w in who.get(b.key, ()):
                held[w] = held.get(w, 0) + rows
        workers = client.scheduler_info(n_workers=-1)["workers"]
        places = _hosts(workers, held, len(order))
        logger.debug("k-means in memory on %s", places)
        wholes = [client.submit(_prepare, blocks, dtype, **_on(w), pure=False) for w, _ in places]
        wait(wholes)
        del blocks  # the copies hold the matrix now (unless the caller persisted it)
        for i, (k, s) in enumerate(order):
            w, cores = places[i % len(places)]
            futures.append(
                client.submit(
                    _sklearn_fit,
                    wholes[i % len(places)],
                    k,
                    starts[k, s],
                    s,
                    max_iter,
                    tol,
                    cores,
                    **_on(w),
                    pure=False,
                )
            )
        return dict(zip(order, _gather(client, futures), strict=True))
    finally:
        client.cancel([*futures, *wholes])


def fit_models(
    x: da.Array,
    models: Sequence[tuple[int, int]],
    *,
    init: Init = "k-means||",
    max_iter: int = 300,
    tol: float = 1e-4,
    sample_size: int = 10_000,
    init_rounds: int = 5,
    engine: Engine = "auto",
    memory_fraction: float = 0.25,
) -> dict[tuple[int, int], KMeansFit]:
    """Fit every ``(K, seed)`` model of ``models`` on the rows of ``x`` (see the module doc).

    Returns
    -------
    dict
        ``{(K, seed): KMeansFit}`` (``restarts`` empty: one fit per model).

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> pts = np.concatenate([rng.normal(0, 0.1, (50, 2)), rng.normal(3, 0.1, (50, 2))])
    >>> fits = fit_models(da.from_array(pts, chunks=25), [(1, 0), (2, 0)], engine="dask")
    >>> c = sorted(np.round(fits[2, 0].centers[:, 0]).astype(int).tolist())
    >>> c, fits[1, 0].inertia > fits[2, 0].inertia
    ([0, 3], True)
    """
    models = list(dict.fromkeys((int(k), int(s)) for k, s in models))
    if x.ndim != 2:
        raise ValueError(f"k-means needs a matrix of rows; got shape {x.shape}")
    limit, threads = memory_limit()
    dtype = _work_dtype(x.dtype)  # in memory, float32 stays float32 (as in scikit-learn)
    nbytes = x.shape[0] * x.shape[1] * dtype.itemsize
    path = choose_path(nbytes, engine=engine, memory_fraction=memory_fraction, limit=limit)
    if path == "dask":
        dtype = np.dtype(np.float64)
    x = (x.astype(dtype) if x.dtype != dtype else x).rechunk({1: -1})
    logger.info(
        "k-means of %d models on %d × %d (%.0f MB) %s (worker limit %.0f MB)",
        len(models), *x.shape, nbytes / 1e6, "in memory" if path == "memory" else "out of core",
        limit / 1e6,
    )  # fmt: skip
    if init == "k-means++":
        starts: dict[tuple[int, int], np.ndarray | None] = dict(
            _sample_seeds(x, models, sample_size)
        )
    elif path == "memory":
        starts = dict.fromkeys(models)
    else:
        starts = dict(_parallel_seeds(x, models, init_rounds))
    if path == "memory":
        raw = _fit_in_memory(x, models, starts, max_iter, tol, threads)
    else:
        raw = _lloyd_dask(x, starts, max_iter, tol)
    return {m: KMeansFit(m[0], c, i, n, m[1]) for m, (c, i, n) in raw.items()}
