"""Compare the ``[features]`` recipes on a simulated beamtime: training time and how well
k-means on their latent vectors finds the true domains.

For each recipe (``spndi`` = today's default conv3d model; ``spndi-foldingnet``; ``study`` =
the original study's FoldingNet recipe) on the same ingested, reduced and segmented beamtime:
train (``--sample`` patterns, ``--epochs`` epochs, no early stop), encode every particle pixel,
k-means with K = the number of simulated domain types (``[cluster]`` defaults otherwise), and
the adjusted Rand index (ARI) against the true domains with boundary pixels left out.

Usage: ``python scripts/compare_recipes.py [--preset small] [--sample 256] [--epochs 4]
[--dir /tmp/spndi-bench] [--device auto]``
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--dir", default="/tmp/spndi-bench")
    ap.add_argument("--sample", type=int, default=256, help="training patterns")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--device", default="auto")
    ap.add_argument(
        "--recipes", nargs="+", default=["spndi", "spndi-foldingnet", "study"], help="to compare"
    )
    args = ap.parse_args()

    import torch

    from spndi_dask.cluster import cluster
    from spndi_dask.config import load_manifest
    from spndi_dask.config.settings import FeatureSettings
    from spndi_dask.features import encode, train
    from spndi_dask.ingest import ingest
    from spndi_dask.particles import stats
    from spndi_dask.reduce import open_results, reduce
    from spndi_dask.simulate import preset, simulate_beamtime
    from spndi_dask.simulate.truth import cluster_ari_vs_truth

    base = Path(args.dir) / f"recipes-{args.preset}"
    if not (base / "beamtime.toml").exists():
        m = simulate_beamtime(base, preset(args.preset))
        ingest(m)
        reduce(m)
        stats(m, figures=False)
    m = load_manifest(base / "beamtime.toml")
    names = [p.name for p in m.scans]
    k = len(preset(args.preset).domain_types)
    pixels = sum(int((open_results(m.output_dir, n)["label"].values > 0).sum()) for n in names)
    grid = open_results(m.output_dir, names[0]).sizes["dq_x"]
    print(
        f"{args.preset}: {len(names)} scans, {pixels} particle pixels, patterns {grid}³, "
        f"{len(os.sched_getaffinity(0))} cores, torch threads {torch.get_num_threads()}, "
        f"sample {args.sample}, {args.epochs} epochs, K = {k}"
    )
    common = {
        "sample_size": args.sample,
        "max_epochs": args.epochs,
        "patience": args.epochs,
        "device": args.device,
    }
    recipes = {
        "spndi": {},
        "spndi-foldingnet": {"model": "foldingnet"},
        "study": {"recipe": "study"},
    }
    print(f"\n{'recipe':<18}{'model':<12}{'train s':>9}{'s/epoch':>9}{'encode s':>9}{'ARI':>8}")
    for name in args.recipes:
        features = FeatureSettings(**{**common, **recipes[name]})
        mm = m.model_copy(update={"features": features})
        t0 = time.perf_counter()
        s = train(mm, force=True, on_worker=False)
        t_train = time.perf_counter() - t0
        t0 = time.perf_counter()
        encode(mm, force=True)
        t_encode = time.perf_counter() - t0
        cluster(mm, k=k, figures=False)
        ari = cluster_ari_vs_truth(mm, base / "ground_truth")
        print(
            f"{name:<18}{features.model:<12}{t_train:>9.1f}{t_train / s['epochs']:>9.1f}"
            f"{t_encode:>9.1f}{ari:>8.3f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
