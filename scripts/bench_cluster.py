"""Benchmark clustering: our k-means vs scikit-learn KMeans on 2 M × 32 latent vectors.

Measured side by side in one run:

(1) scikit-learn ``KMeans`` (same K, same restarts, k-means++ init, Lloyd) on the vectors held in
    memory, in a child process (all cores): time and peak RSS; then its K scan (K = 1..``--kmax``,
    one restart each, as the elbow rule's scan);
(2) ``spndi_dask.cluster.fit_kmeans`` (``k-means||``, ``engine = "auto"``: here scikit-learn on
    the workers) on a LocalCluster (1 worker per core) on the same vectors persisted on the
    workers (as ``spndi cluster`` does): time, peak RSS per worker, inertia and agreement (ARI)
    with (1); then the K scan (``fit_models`` of K = 1..kmax, as ``choose_k``);
(2b) the same fit forced out of core (``engine = "dask"``: Lloyd passes over the blocks);
(3) the same on a lazy array of ``--limited-rows`` vectors (default 8 M, 2 GB; blocks
    regenerated from a seeded generator, never held whole) with a per-worker memory limit of
    ``--limit-mb`` (default 1000 MB; a worker with the stack imported starts at ~315 MB): a
    matrix that does not fit in one worker's memory (the out-of-core path), running to
    completion.

The vectors are a seeded mixture of K Gaussian blobs in 32 dimensions (latent-like).

Usage: ``python scripts/bench_cluster.py [--rows 2000000] [--k 6] [--restarts 2] [--kmax 10]``
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import time

import numpy as np

DIM = 32
BLOCK = 25_000


def _centres(k: int) -> np.ndarray:
    return np.random.default_rng(123).normal(0, 1.0, (k, DIM))


def _block(i: int, rows: int, k: int) -> np.ndarray:
    rng = np.random.default_rng([7, i])
    n = min(BLOCK, rows - i * BLOCK)
    lab = rng.integers(0, k, n)
    return _centres(k)[lab] + rng.normal(0, 0.35, (n, DIM))


def _lazy(rows: int, k: int):
    import dask
    import dask.array as da

    parts = [
        da.from_delayed(
            dask.delayed(_block)(i, rows, k), (min(BLOCK, rows - i * BLOCK), DIM), np.float64
        )
        for i in range((rows + BLOCK - 1) // BLOCK)
    ]
    return da.concatenate(parts)


def _sklearn(rows: int, k: int, restarts: int, kmax: int, q) -> None:
    from sklearn.cluster import KMeans

    x = np.concatenate([_block(i, rows, k) for i in range((rows + BLOCK - 1) // BLOCK)])
    t0 = time.perf_counter()
    km = KMeans(k, n_init=restarts, random_state=0).fit(x)
    seconds = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    scan = {kk: KMeans(kk, n_init=1, random_state=0).fit(x).inertia_ for kk in range(1, kmax + 1)}
    scan_s = time.perf_counter() - t0
    q.put((seconds, rss, float(km.inertia_), km.labels_[:200_000].copy(), scan_s, scan))


def _peak_rss() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _warm() -> None:
    """Import the k-means stack on a worker (as the stages before clustering have)."""
    import spndi_dask.kmeans  # noqa: F401


def _ours(rows: int, k: int, restarts: int, memory_limit: str | None, kmax: int = 0):
    from distributed import Client, LocalCluster, wait

    from spndi_dask.cluster import assign, fit_kmeans
    from spndi_dask.kmeans import fit_models

    kwargs = {"memory_limit": memory_limit} if memory_limit else {}
    out = {}
    with LocalCluster(threads_per_worker=1, processes=True, **kwargs) as cl, Client(cl) as client:
        client.run(_warm)  # scikit-learn's child process imports it before its clock too
        x = _lazy(rows, k)
        if memory_limit is None:  # as `spndi cluster` does when the matrix fits the cluster
            x = x.persist()
            wait(x)
        t0 = time.perf_counter()
        fit = fit_kmeans(x, k, init="k-means||", n_init=restarts, seed=0)
        out["seconds"] = time.perf_counter() - t0
        out["fit"] = fit
        out["labels"] = assign(x[:200_000], fit.centers).compute()
        out["rss"] = max(client.run(_peak_rss).values())
        out["limit"] = cl.workers[next(iter(cl.workers))].memory_manager.memory_limit
        if kmax:
            t0 = time.perf_counter()
            scan = fit_models(x, [(kk, 0) for kk in range(1, kmax + 1)])
            out["scan_s"] = time.perf_counter() - t0
            out["scan"] = {kk: f.inertia for (kk, _), f in scan.items()}
            t0 = time.perf_counter()
            out["dask_fit"] = fit_kmeans(x, k, n_init=restarts, seed=0, engine="dask")
            out["dask_s"] = time.perf_counter() - t0
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--k", type=int, default=6)
    ap.add_argument("--restarts", type=int, default=2)
    ap.add_argument(
        "--limit-mb", type=int, default=1000, help="worker memory limit of (3), below its data"
    )
    ap.add_argument("--limited-rows", type=int, default=8_000_000, help="vectors of (3)")
    ap.add_argument("--kmax", type=int, default=10, help="K scan 1..kmax (0: skip)")
    ap.add_argument("--only-limited", action="store_true", help="run (3) only")
    ap.add_argument("--skip-limited", action="store_true", help="skip (3)")
    args = ap.parse_args()
    from sklearn.metrics import adjusted_rand_score

    from spndi_dask.cluster import elbow_k

    gb = args.rows * DIM * 8 / 1e9
    print(
        f"{args.rows} x {DIM} float64 vectors ({gb:.2f} GB), K = {args.k}, {args.restarts} restarts"
    )
    if args.only_limited:
        o = _ours(args.limited_rows, args.k, args.restarts, f"{args.limit_mb}MB")
        print(
            f"(3) limit {o['limit'] / 1e6:.0f} MB: {o['seconds']:.1f} s, "
            f"peak RSS {o['rss']:.0f} MB, {o['fit'].inertia:.6g}"
        )
        return
    q = mp.get_context("spawn").Queue()
    p = mp.get_context("spawn").Process(
        target=_sklearn, args=(args.rows, args.k, args.restarts, args.kmax, q)
    )
    p.start()
    sk_s, sk_rss, sk_inertia, sk_labels, sk_scan_s, sk_scan = q.get()
    p.join()
    print(f"scikit-learn: {sk_s:.1f} s, peak RSS {sk_rss:.0f} MB", flush=True)
    o = _ours(args.rows, args.k, args.restarts, None, args.kmax)
    fit = o["fit"]
    print(f"ours: {o['seconds']:.1f} s, peak RSS per worker {o['rss']:.0f} MB", flush=True)
    if args.skip_limited:
        lim = {"seconds": float("nan"), "rss": float("nan"), "fit": fit}
        lim["limit"] = args.limit_mb * 1e6
    else:
        lim = _ours(args.limited_rows, args.k, args.restarts, f"{args.limit_mb}MB")
    limit = lim["limit"]
    print(f"{'':<46}{'seconds':>9}{'peak RSS MB':>13}{'inertia':>14}")
    print(
        f"{'scikit-learn KMeans (in memory, 1 process)':<46}{sk_s:>9.1f}{sk_rss:>13.0f}"
        f"{sk_inertia:>14.6g}"
    )
    print(
        f"{'spndi fit_kmeans (auto: in memory), per worker':<46}{o['seconds']:>9.1f}"
        f"{o['rss']:>13.0f}{fit.inertia:>14.6g}"
    )
    if args.kmax:
        print(
            f"{'  (2b) forced out of core (engine = dask)':<46}{o['dask_s']:>9.1f}{'':>13}"
            f"{o['dask_fit'].inertia:>14.6g}"
        )
    print(
        f"{f'  (3) lazy, worker limit {limit / 1e6:.0f} MB':<46}{lim['seconds']:>9.1f}"
        f"{lim['rss']:>13.0f}{lim['fit'].inertia:>14.6g}"
    )
    print(
        f"time ours / scikit-learn: {o['seconds'] / sk_s:.2f}; peak memory per worker / "
        f"scikit-learn: {o['rss'] / sk_rss:.2f}; inertia ratio {fit.inertia / sk_inertia:.6f}"
    )
    print(
        f"agreement with scikit-learn on the first 200k vectors: ARI "
        f"{adjusted_rand_score(sk_labels, o['labels']):.4f}"
    )
    if args.kmax:
        print(
            f"(2b) out of core / scikit-learn: time {o['dask_s'] / sk_s:.2f}, inertia ratio "
            f"{o['dask_fit'].inertia / sk_inertia:.6f}"
        )
        worst = max(abs(o["scan"][kk] / sk_scan[kk] - 1) for kk in sk_scan)
        print(
            f"K scan 1..{args.kmax} (1 restart each): scikit-learn {sk_scan_s:.1f} s, ours "
            f"{o['scan_s']:.1f} s (ratio {o['scan_s'] / sk_scan_s:.2f}); elbow K "
            f"{elbow_k(sk_scan)} vs {elbow_k(o['scan'])}; largest inertia difference {worst:.2e}"
        )
    if not args.skip_limited:
        print(
            f"(3) {args.limited_rows} vectors, {args.limited_rows * DIM * 8 / 1e6:.0f} MB vs "
            f"worker limit {limit / 1e6:.0f} MB: completed, "
            f"inertia {lim['fit'].inertia:.6g}"
        )


if __name__ == "__main__":
    main()
