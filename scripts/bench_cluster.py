"""Benchmark clustering: our k-means vs scikit-learn KMeans on 2 M × 32 latent vectors.

Measured side by side in one run, interleaved (scikit-learn, ours, scikit-learn, ours, ...: the
machine may be shared, so each ratio compares neighbouring runs):

(1) scikit-learn ``KMeans`` (same K, same restarts, k-means++ init, Lloyd) on the vectors held in
    memory, in a child process kept for the whole run (all cores): time and peak RSS; its K scan
    (K = 1..``--kmax``, one restart each, as the elbow rule's scan);
(2) ``spndi_dask.cluster.fit_kmeans`` (``k-means||``, ``engine = "auto"``: here scikit-learn on
    a worker) on a LocalCluster (1 worker per core) on the same vectors persisted on the
    workers (as ``spndi cluster`` does): time, peak RSS per worker, inertia and agreement (ARI)
    with (1); its K scan (``fit_models`` of K = 1..kmax, as ``choose_k``);
(2b) the same fit forced out of core (``engine = "dask"``: Lloyd passes over the blocks), once;
(3) the same on a lazy array of ``--limited-rows`` vectors (default 8 M, 2 GB; blocks
    regenerated from a seeded generator, never held whole) with a per-worker memory limit of
    ``--limit-mb`` (default 1000 MB; a worker with the stack imported starts at ~315 MB): a
    matrix that does not fit in one worker's memory (the out-of-core path), running to
    completion.

The vectors are a seeded mixture of K Gaussian blobs in 32 dimensions (latent-like). (1) and (2)
run ``--repeat`` times each (the fit) and ``--scan-repeat`` times (the K scan), alternating.

Usage: ``python scripts/bench_cluster.py [--rows 2000000] [--k 6] [--restarts 2] [--kmax 10]
[--repeat 2] [--scan-repeat 1] [--skip-limited]``
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
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


def _sklearn(rows: int, k: int, restarts: int, kmax: int, jobs, q) -> None:
    """scikit-learn's side, in a child process: one job (``"fit"``, ``"scan"``) per request."""
    from sklearn.cluster import KMeans

    x = np.concatenate([_block(i, rows, k) for i in range((rows + BLOCK - 1) // BLOCK)])
    while (job := jobs.get()) is not None:
        t0 = time.perf_counter()
        if job == "fit":
            km = KMeans(k, n_init=restarts, random_state=0).fit(x)
            out = (float(km.inertia_), km.labels_[:200_000].copy())
        else:
            out = {
                kk: KMeans(kk, n_init=1, random_state=0).fit(x).inertia_
                for kk in range(1, kmax + 1)
            }
        seconds = time.perf_counter() - t0
        q.put((seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, out))


def _peak_rss() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _warm() -> None:
    """Import the k-means stack on a worker (as the stages before clustering have)."""
    import spndi_dask.kmeans  # noqa: F401


def _timed(f, *args, **kwargs):
    t0 = time.perf_counter()
    out = f(*args, **kwargs)
    return time.perf_counter() - t0, out


def _limited(rows: int, k: int, restarts: int, memory_limit: str) -> dict:
    """(3): the lazy matrix on workers whose memory limit is below its size."""
    from distributed import Client, LocalCluster

    from spndi_dask.cluster import fit_kmeans

    with LocalCluster(threads_per_worker=1, memory_limit=memory_limit) as cl, Client(cl) as client:
        client.run(_warm)
        seconds, fit = _timed(fit_kmeans, _lazy(rows, k), k, init="k-means||", n_init=restarts)
        return {
            "seconds": seconds,
            "fit": fit,
            "rss": max(client.run(_peak_rss).values()),
            "limit": cl.workers[next(iter(cl.workers))].memory_manager.memory_limit,
        }


def _uptime() -> str:
    return "load average " + " ".join(f"{v:.1f}" for v in os.getloadavg())


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
    ap.add_argument("--repeat", type=int, default=2, help="fits of (1) and (2), alternating")
    ap.add_argument("--scan-repeat", type=int, default=1, help="K scans of (1) and (2)")
    ap.add_argument("--only-limited", action="store_true", help="run (3) only")
    ap.add_argument("--skip-limited", action="store_true", help="skip (3)")
    args = ap.parse_args()
    from distributed import Client, LocalCluster, wait
    from sklearn.metrics import adjusted_rand_score

    from spndi_dask.cluster import assign, elbow_k, fit_kmeans
    from spndi_dask.kmeans import fit_models

    gb = args.rows * DIM * 8 / 1e9
    print(
        f"{args.rows} x {DIM} float64 vectors ({gb:.2f} GB), K = {args.k}, {args.restarts} "
        f"restarts; {os.cpu_count()} cores, {_uptime()}",
        flush=True,
    )
    limit_label = f"{args.limit_mb}MB"
    if args.only_limited:
        o = _limited(args.limited_rows, args.k, args.restarts, limit_label)
        print(
            f"(3) limit {o['limit'] / 1e6:.0f} MB: {o['seconds']:.1f} s, "
            f"peak RSS {o['rss']:.0f} MB, {o['fit'].inertia:.6g}"
        )
        return
    ctx = mp.get_context("spawn")
    jobs, q = ctx.Queue(), ctx.Queue()
    child = ctx.Process(
        target=_sklearn, args=(args.rows, args.k, args.restarts, args.kmax, jobs, q)
    )
    child.start()
    sk_fit, our_fit, sk_scan, our_scan = [], [], [], []
    with LocalCluster(threads_per_worker=1, processes=True) as cl, Client(cl) as client:
        client.run(_warm)  # scikit-learn's child process imports it before its clock too
        x = _lazy(args.rows, args.k).persist()  # as `spndi cluster` does when the matrix fits
        wait(x)
        for r in range(args.repeat):
            jobs.put("fit")
            sk_s, sk_rss, (sk_inertia, sk_labels) = q.get()
            sk_fit.append(sk_s)
            seconds, fit = _timed(fit_kmeans, x, args.k, init="k-means||", n_init=args.restarts)
            our_fit.append(seconds)
            print(
                f"fit {r + 1}: scikit-learn {sk_s:.1f} s, ours {seconds:.1f} s "
                f"(ratio {seconds / sk_s:.2f}); {_uptime()}",
                flush=True,
            )
        labels = assign(x[:200_000], fit.centers).compute()
        rss = max(client.run(_peak_rss).values())
        for r in range(args.scan_repeat if args.kmax else 0):
            jobs.put("scan")
            sk_s, _, sk_inertias = q.get()
            sk_scan.append(sk_s)
            seconds, scan = _timed(fit_models, x, [(kk, 0) for kk in range(1, args.kmax + 1)])
            our_scan.append(seconds)
            print(
                f"K scan {r + 1}: scikit-learn {sk_s:.1f} s, ours {seconds:.1f} s "
                f"(ratio {seconds / sk_s:.2f}); {_uptime()}",
                flush=True,
            )
        if args.kmax:
            dask_s, dask_fit = _timed(
                fit_kmeans, x, args.k, n_init=args.restarts, seed=0, engine="dask"
            )
    jobs.put(None)
    child.join()
    if args.skip_limited:
        lim = {"seconds": float("nan"), "rss": float("nan"), "fit": fit}
        lim["limit"] = args.limit_mb * 1e6
    else:
        lim = _limited(args.limited_rows, args.k, args.restarts, limit_label)
    limit = lim["limit"]
    sk_s, ours_s = min(sk_fit), min(our_fit)  # the best of each (the least disturbed)
    print(f"{'':<46}{'seconds':>9}{'peak RSS MB':>13}{'inertia':>14}")
    print(
        f"{'scikit-learn KMeans (in memory, 1 process)':<46}{sk_s:>9.1f}{sk_rss:>13.0f}"
        f"{sk_inertia:>14.6g}"
    )
    print(
        f"{'spndi fit_kmeans (auto: in memory), per worker':<46}{ours_s:>9.1f}"
        f"{rss:>13.0f}{fit.inertia:>14.6g}"
    )
    if args.kmax:
        print(
            f"{'  (2b) forced out of core (engine = dask)':<46}{dask_s:>9.1f}{'':>13}"
            f"{dask_fit.inertia:>14.6g}"
        )
    print(
        f"{f'  (3) lazy, worker limit {limit / 1e6:.0f} MB':<46}{lim['seconds']:>9.1f}"
        f"{lim['rss']:>13.0f}{lim['fit'].inertia:>14.6g}"
    )
    pairs = " ".join(f"{o / s:.2f}" for s, o in zip(sk_fit, our_fit, strict=True))
    print(
        f"time ours / scikit-learn: {ours_s / sk_s:.2f} best of {args.repeat} each (per "
        f"alternating pair: {pairs}); peak memory per worker / scikit-learn: {rss / sk_rss:.2f}; "
        f"inertia ratio {fit.inertia / sk_inertia:.6f}"
    )
    print(
        f"agreement with scikit-learn on the first 200k vectors: ARI "
        f"{adjusted_rand_score(sk_labels, labels):.4f}"
    )
    if args.kmax:
        print(
            f"(2b) out of core / scikit-learn: time {dask_s / sk_s:.2f}, inertia ratio "
            f"{dask_fit.inertia / sk_inertia:.6f}"
        )
        ours_scan = {kk: f.inertia for (kk, _), f in scan.items()}
        worst = max(abs(ours_scan[kk] / sk_inertias[kk] - 1) for kk in sk_inertias)
        pairs = " ".join(f"{o / s:.2f}" for s, o in zip(sk_scan, our_scan, strict=True))
        print(
            f"K scan 1..{args.kmax} (1 restart each): scikit-learn {min(sk_scan):.1f} s, ours "
            f"{min(our_scan):.1f} s (ratio {min(our_scan) / min(sk_scan):.2f}; per pair: "
            f"{pairs}); elbow K {elbow_k(sk_inertias)} vs {elbow_k(ours_scan)}; largest "
            f"inertia difference {worst:.2e}"
        )
    if not args.skip_limited:
        print(
            f"(3) {args.limited_rows} vectors, {args.limited_rows * DIM * 8 / 1e6:.0f} MB vs "
            f"worker limit {limit / 1e6:.0f} MB: completed, "
            f"inertia {lim['fit'].inertia:.6g}"
        )


if __name__ == "__main__":
    main()
