"""Benchmark ``spndi decompose``: fit and projection speed beside a plain read of the patterns,
and how well k-means on each kind of feature finds the simulated domains.

Measured side by side in one run on a simulated beamtime (ingested, reduced, segmented once):

* read:        the patterns of every scan read and summed (dask, the same tasks' reads)
* fit PCA/NMF: scikit-learn on the ``[decompose] sample_size`` sample, in this process
* project:     ``loading_array`` of PCA alone, NMF alone and both (one read), summed

Speeds are particle pixels per second and per core (the cores of this machine: BLAS threads for
the fits, dask threads for the projections). Then k-means (K = number of simulated domain
types) on ``pca``, ``nmf`` and ``moments`` (and ``latent`` with ``--latent``: trains the
autoencoder) and the adjusted Rand index against the true domains, boundary pixels left out.

Usage: ``python scripts/bench_decompose.py [--preset small] [--dir /tmp/spndi-bench] [--latent]``
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path


def _best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--dir", default="/tmp/spndi-bench")
    ap.add_argument("--repeat", type=int, default=2, help="best of N for each measurement")
    ap.add_argument("--latent", action="store_true", help="also train + encode and compare")
    args = ap.parse_args()

    import dask

    from spndi_dask.cluster import cluster
    from spndi_dask.config import load_manifest
    from spndi_dask.decompose import decompose, fit_decomposition, loading_array, pattern_rows
    from spndi_dask.features.train import sample_patterns
    from spndi_dask.ingest import ingest
    from spndi_dask.particles import stats
    from spndi_dask.reduce import open_results, reduce
    from spndi_dask.simulate import preset, simulate_beamtime
    from spndi_dask.simulate.truth import cluster_ari_vs_truth

    base = Path(args.dir) / f"decompose-{args.preset}"
    if not (base / "beamtime.toml").exists():
        t0 = time.perf_counter()
        m = simulate_beamtime(base, preset(args.preset))
        ingest(m)
        reduce(m)
        stats(m, figures=False)
        print(
            f"simulated, ingested, reduced, segmented {args.preset} in "
            f"{time.perf_counter() - t0:.1f} s"
        )
    m = load_manifest(base / "beamtime.toml")
    cores = len(os.sched_getaffinity(0))
    s = m.decompose
    scans = {p.name: open_results(m.output_dir, p.name) for p in m.scans}
    masks = {n: ds["label"].data > 0 for n, ds in scans.items()}
    pixels = int(sum(int(v.sum().compute()) for v in masks.values()))
    grid = next(iter(scans.values())).sizes["dq_x"]
    print(
        f"{args.preset}: {len(scans)} scans, {pixels} particle pixels, patterns {grid}³, "
        f"{cores} cores, sample_size {s.sample_size}"
    )

    sample = sample_patterns(m, size=s.sample_size, seed=s.seed)
    rows, _ = pattern_rows(sample.patterns)
    n_fit = len(rows)
    models = {}
    t = {}
    t["read"] = _best(
        lambda: dask.compute([ds["pattern"].data.sum() for ds in scans.values()]), args.repeat
    )
    for kind, c in (("pca", s.pca_components), ("nmf", s.nmf_components)):
        t0 = time.perf_counter()
        models[kind] = fit_decomposition(rows, kind, c, seed=s.seed, max_iter=s.nmf_max_iter)
        t[f"fit {kind}"] = time.perf_counter() - t0
    for label, chosen in (("pca", ["pca"]), ("nmf", ["nmf"]), ("pca+nmf", ["pca", "nmf"])):
        ms = [models[k] for k in chosen]
        t[f"project {label}"] = _best(
            lambda ms=ms: dask.compute(
                [loading_array(ds["pattern"].data, masks[n], ms).sum() for n, ds in scans.items()]
            ),
            args.repeat,
        )
    print(f"\n{'step':<18}{'pixels':>8}{'seconds':>9}{'px/s':>10}{'px/s/core':>11}{'vs read':>9}")
    for step, sec in t.items():
        n = n_fit if step.startswith("fit") else pixels
        ratio = sec / t["read"] if not step.startswith("fit") else float("nan")
        print(
            f"{step:<18}{n:>8}{sec:>9.2f}{n / sec:>10.0f}{n / sec / cores:>11.0f}"
            + (f"{ratio:>8.2f}×" if ratio == ratio else f"{'':>9}")
        )

    decompose(m, figures=False)
    kinds = ["pca", "nmf", "moments"]
    if args.latent:
        from spndi_dask.features import encode, train

        train(m)
        encode(m)
        kinds.insert(0, "latent")
    k = len(preset(args.preset).domain_types)
    print(f"\nk-means K = {k} vs the true domains (ARI, boundary pixels left out)")
    print(f"{'features':<10}{'minmax':>8}{'zscore':>8}")
    for features in kinds:
        scores = []
        for std in ("minmax", "zscore"):
            mm = m.model_copy(
                update={
                    "cluster": m.cluster.model_copy(
                        update={"features": features, "standardize": std}
                    )
                }
            )
            cluster(mm, k=k, figures=False)
            scores.append(cluster_ari_vs_truth(mm, base / "ground_truth"))
        print(f"{features:<10}{scores[0]:>8.3f}{scores[1]:>8.3f}")


if __name__ == "__main__":
    main()
