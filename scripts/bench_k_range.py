"""Benchmark the K scan of ``k = "auto"``: the old default (K = 1..10), the new default
(``k_max = "auto"``: the study's range capped at one K per 100 pixels) and the study's recipe
(K = 1..15 or 1..80, best of 3), side by side on the same latent-like vectors.

The vectors are a seeded mixture of 6 Gaussian blobs in 16 dimensions, ``--pixels`` rows from
``--scans`` scans (the demo beamtime: about 1,000–2,000 particle pixels in 3 scans).

Usage: ``python scripts/bench_k_range.py [--pixels 1500] [--scans 3] [--study]``
(``--study`` also runs the study's full recipe: slow with dask-ml k-means on 2 cores).
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pixels", type=int, default=1500)
    ap.add_argument("--scans", type=int, default=3)
    ap.add_argument("--study", action="store_true", help="also the study's full K scan")
    args = ap.parse_args()

    import dask
    import dask.array as da
    import numpy as np

    from spndi_dask.cluster import choose_k
    from spndi_dask.config import ClusterSettings

    dask.config.set(scheduler="threads")
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1, (6, 16))
    x = centres[rng.integers(0, 6, args.pixels)] + rng.normal(0, 0.3, (args.pixels, 16))
    x = (x - x.min(0)) / (x.max(0) - x.min(0))
    xs = da.from_array(x, chunks=(min(50_000, len(x)), -1))
    runs = {
        "old default (K 1..10, 1 restart)": ClusterSettings(k_max=10),
        "new default (k_max auto)": ClusterSettings(),
    }
    if args.study:
        runs["study (full range, best of 3)"] = ClusterSettings(
            k_max=15 if args.scans == 1 else 80, scan_restarts=3
        )
    base = None
    for label, s in runs.items():
        t0 = time.perf_counter()
        k, fits, _ = choose_k(xs, s, scans=args.scans)
        dt = time.perf_counter() - t0
        base = base or dt
        ks = sorted(fits)
        print(
            f"{label:34s} K {ks[0]}..{ks[-1]}: chosen K = {k}, {dt:6.1f} s "
            f"({dt / base:.2f}x the old default)"
        )


if __name__ == "__main__":
    main()
