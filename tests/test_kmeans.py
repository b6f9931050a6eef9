"""k-means engine: both paths vs scikit-learn from the same seeds, determinism, path, K scan."""

from __future__ import annotations

import logging
import os

import dask
import dask.array as da
import numpy as np
import pytest
from distributed import Client, LocalCluster, wait
from sklearn.cluster import KMeans, kmeans_plusplus
from sklearn.metrics import adjusted_rand_score
from threadpoolctl import threadpool_info

import spndi_dask.kmeans as km
from spndi_dask.cluster import choose_k, elbow_k, fit_kmeans
from spndi_dask.config import ClusterSettings
from spndi_dask.kmeans import choose_path, fit_models, fit_threads, nearest
from spndi_dask.worker_plugins import PinToCore

TRUE_K = 4


@pytest.fixture(scope="module")
def blobs():
    """4000 × 6 rows from 4 Gaussian blobs (labels known), as a dask array of 6 blocks."""
    rng = np.random.default_rng(11)
    centres = rng.normal(0, 1.0, (TRUE_K, 6))
    truth = rng.integers(0, TRUE_K, 4000)
    pts = centres[truth] + rng.normal(0, 0.3, (4000, 6))
    return pts, truth, da.from_array(pts, chunks=700)


def _sse(pts, centers):
    return float(((pts[:, None] - centers[None]) ** 2).sum(-1).min(axis=1).sum())


@pytest.mark.parametrize("engine", ["memory", "dask"])
def test_same_seeds_same_fit_as_scikit_learn(blobs, engine):
    pts, truth, x = blobs
    # k-means++ seeds from a "sample" of all rows: the sorted sample is the matrix itself
    fits = fit_models(
        x, [(3, 5), (TRUE_K, 5)], init="k-means++", sample_size=len(pts), engine=engine
    )
    for k in (3, TRUE_K):
        start, _ = kmeans_plusplus(pts, k, random_state=5)
        ref = KMeans(k, init=start, n_init=1, random_state=5).fit(pts)
        fit = fits[k, 5]
        assert fit.inertia == pytest.approx(ref.inertia_, rel=1e-6)
        assert fit.inertia == pytest.approx(_sse(pts, fit.centers), rel=1e-9)  # squared, final
        np.testing.assert_allclose(fit.centers, ref.cluster_centers_, rtol=1e-6, atol=1e-9)
        assert adjusted_rand_score(ref.labels_, nearest(pts, fit.centers)[0]) >= 0.99
    assert adjusted_rand_score(truth, nearest(pts, fits[TRUE_K, 5].centers)[0]) >= 0.99


@pytest.mark.parametrize("engine", ["memory", "dask"])
def test_default_init_agrees_with_scikit_learn_and_is_deterministic(blobs, engine):
    pts, _, x = blobs
    a = fit_kmeans(x, TRUE_K, n_init=2, seed=3, engine=engine)
    b = fit_kmeans(x, TRUE_K, n_init=2, seed=3, engine=engine)
    np.testing.assert_array_equal(a.centers, b.centers)
    assert a.restarts == b.restarts and len(a.restarts) == 2 and a.inertia == min(a.restarts)
    ref = KMeans(TRUE_K, n_init=2, random_state=0).fit(pts)
    assert a.inertia == pytest.approx(ref.inertia_, rel=1e-6)
    assert adjusted_rand_score(ref.labels_, nearest(pts, a.centers)[0]) >= 0.99
    if engine == "memory":  # k-means|| in memory is scikit-learn's own k-means++, same seed
        one = KMeans(TRUE_K, n_init=1, random_state=3).fit(pts)
        assert a.restarts[0] == pytest.approx(one.inertia_, rel=1e-9)


def test_out_of_core_lloyd_matches_scikit_learn_iterations(blobs):
    """From a poor start (many iterations), the dask path's Lloyd is scikit-learn's Lloyd."""
    pts, _, x = blobs
    fits = fit_models(x, [(6, 0)], init="k-means++", sample_size=6, engine="dask", tol=1e-6)
    sample = pts[np.sort(np.random.default_rng(0).choice(len(pts), 6, replace=False))]
    start = kmeans_plusplus(sample, 6, random_state=0)[0]  # the engine's seeds from 6 rows
    ref = KMeans(6, init=start, n_init=1, tol=1e-6).fit(pts)
    assert fits[6, 0].n_iter == ref.n_iter_ > 3
    assert fits[6, 0].inertia == pytest.approx(ref.inertia_, rel=1e-9)


def test_the_path_follows_the_worker_memory_limit(blobs, caplog):
    x = blobs[2]  # 192 kB
    assert choose_path(x.nbytes, limit=10**6) == "memory"
    assert choose_path(x.nbytes, limit=10**5) == "dask"
    assert choose_path(x.nbytes, limit=10**5, engine="memory") == "memory"
    # the limit decides the path only: no pausing or spilling of the (in-process) workers
    off = {f"distributed.worker.memory.{key}": False for key in ("target", "spill", "pause")}
    with (
        dask.config.set({**off, "distributed.worker.memory.terminate": False}),
        caplog.at_level(logging.INFO, logger="spndi_dask.kmeans"),
    ):
        for limit, path in (("100kB", "out of core"), ("400MB", "in memory")):
            caplog.clear()
            with (
                LocalCluster(
                    n_workers=2,
                    threads_per_worker=1,
                    processes=False,
                    memory_limit=limit,
                    dashboard_address=":0",
                ) as cl,
                Client(cl),
            ):
                fits = fit_models(x, [(k, 0) for k in (2, 3, TRUE_K)] + [(TRUE_K, 1)])
            assert path in caplog.text, caplog.text
            local = fit_models(x, [(TRUE_K, 0)], engine="memory" if "memory" in path else "dask")
            np.testing.assert_allclose(fits[TRUE_K, 0].centers, local[TRUE_K, 0].centers, rtol=1e-9)
            assert fits[2, 0].inertia > fits[3, 0].inertia > fits[TRUE_K, 0].inertia


@pytest.mark.parametrize("engine", ["memory", "dask"])
def test_elbow_scan_finds_the_true_k(blobs, engine):
    pts, _, x = blobs
    settings = ClusterSettings(k_max=8, n_init=2, engine=engine)
    k, fits, sil = choose_k(x, settings, sample=pts[:500])
    assert k == TRUE_K and set(fits) == set(range(1, 9))
    assert len(fits[TRUE_K].restarts) == 2 and len(fits[5].restarts) == 1
    assert max(sil, key=sil.get) == TRUE_K
    # the same elbow as scikit-learn's K scan; at K = 1 and the true K the same optimum
    ref = {kk: KMeans(kk, n_init=4, random_state=0).fit(pts).inertia_ for kk in range(1, 9)}
    assert elbow_k(ref) == k
    for kk in (1, TRUE_K):
        assert fits[kk].inertia == pytest.approx(ref[kk], rel=1e-6)


def test_float32_rows_are_fitted_in_float32_as_scikit_learn_does(blobs, monkeypatch):
    pts = blobs[0].astype(np.float32)
    seen = []
    fit = km._sklearn_fit
    monkeypatch.setattr(km, "_sklearn_fit", lambda p, *a: seen.append(p[0].dtype) or fit(p, *a))
    x = da.from_array(pts, chunks=700)
    fits = fit_models(x, [(TRUE_K, 2)], init="k-means++", sample_size=len(pts), engine="memory")
    assert seen == [np.float32]  # not widened to float64 (twice the bytes per Lloyd step)
    start = kmeans_plusplus(pts.astype(np.float64), TRUE_K, random_state=2)[0]
    ref = KMeans(TRUE_K, init=start, n_init=1, random_state=2).fit(pts)
    assert ref.cluster_centers_.dtype == np.float32
    assert fits[TRUE_K, 2].inertia == pytest.approx(ref.inertia_, rel=1e-6)
    np.testing.assert_allclose(fits[TRUE_K, 2].centers, ref.cluster_centers_, rtol=1e-5)


def test_without_scikit_learns_lloyd_function_each_fit_is_a_whole_kmeans_fit(blobs, monkeypatch):
    pts, _, x = blobs
    models = [(3, 1), (TRUE_K, 1)]
    fast = fit_models(x, models, engine="memory")  # k-means|| in memory: scikit-learn's k-means++
    monkeypatch.setattr(km, "_lloyd", None)  # a scikit-learn that moved its private function
    whole = fit_models(x, models, engine="memory")
    for k, s in models:
        ref = KMeans(k, n_init=1, random_state=s).fit(pts)
        for fit in (fast[k, s], whole[k, s]):
            assert fit.inertia == pytest.approx(ref.inertia_, rel=1e-9)
            np.testing.assert_allclose(fit.centers, ref.cluster_centers_, rtol=1e-9, atol=1e-12)


def test_in_memory_fits_go_to_one_worker_per_host_with_all_its_threads():
    one_host = {"a": {"host": "h1", "nthreads": 1}, "b": {"host": "h1", "nthreads": 1}}
    # the worker holding most rows keeps its blocks; every fit gets both cores, one at a time
    assert km._hosts(one_host, {"a": 10, "b": 30}, 3) == [("b", 2)]
    two = {**one_host, "c": {"host": "h2", "nthreads": 4}}
    # h1 holds more rows: fits 0 and 2 there (one at a time, 2 threads), fit 1 on h2 (4)
    assert km._hosts(two, {"a": 10, "b": 30, "c": 20}, 3) == [("b", 2), ("c", 4)]
    assert km._hosts(two, {"a": 10, "b": 30, "c": 20}, 1) == [("b", 2)]
    # a 4-thread worker alone on its host runs 4 fits at once, 1 thread each; 2 fits: 2 each
    assert km._hosts({"c": {"host": "h2", "nthreads": 4}}, {}, 8) == [("c", 1)]
    assert km._hosts({"c": {"host": "h2", "nthreads": 4}}, {}, 2) == [("c", 2)]


def _threads_seen(threads):
    """On a worker: (OMP_NUM_THREADS, OpenMP and BLAS threads and cores outside and inside)."""

    def now():
        apis = {i["user_api"]: i["num_threads"] for i in threadpool_info()}
        return apis.get("openmp"), apis.get("blas"), len(os.sched_getaffinity(0))

    before = now()
    with fit_threads(threads) as n:
        inside = now()
    return os.environ.get("OMP_NUM_THREADS"), before, n, inside, now()


@pytest.fixture(scope="module")
def processes():
    """Two 1-thread worker processes (their nannies set OMP_NUM_THREADS=1), pinned per core."""
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0") as cluster,
        Client(cluster) as client,
    ):
        client.register_plugin(PinToCore(sorted(os.sched_getaffinity(0))[:2]))
        yield client


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores")
def test_a_fit_on_a_pinned_worker_uses_the_threads_of_its_host(processes):
    workers = list(processes.scheduler_info(n_workers=-1)["workers"])
    seen = [processes.submit(_threads_seen, 2, workers=[w], pure=False) for w in workers]
    for env, before, n, inside, after in processes.gather(seen):
        assert env == "1" and before == (1, 1, 1) == after  # pinned, 1 thread, re-pinned after
        assert n == 2 and inside == (2, 2, 2)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores")
def test_in_memory_fits_run_where_most_rows_are(blobs, processes, caplog):
    pts, _, x = blobs
    x = x.persist()
    wait(x)
    rows = {}  # rows of the matrix per worker
    for key, held in processes.who_has(x).items():
        for w in held:
            rows[w] = rows.get(w, 0) + x.chunks[0][key[1]]
    with caplog.at_level(logging.DEBUG, logger="spndi_dask.kmeans"):
        fits = fit_models(x, [(TRUE_K, 0), (3, 0)], init="k-means++", sample_size=len(pts))
    assert f"in memory on [('{max(rows, key=rows.get)}', 2)]" in caplog.text, caplog.text
    local = fit_models(blobs[2], [(TRUE_K, 0), (3, 0)], init="k-means++", sample_size=len(pts))
    for m in local:
        np.testing.assert_allclose(fits[m].centers, local[m].centers, rtol=1e-9)
