"""Compare the ``[features]`` recipes on a simulated beamtime: training time and how well
k-means on their latent vectors finds the true domains.

For each recipe (``spndi`` = today's default conv3d model; ``spndi-foldingnet``; ``study`` =
the original study's FoldingNet recipe) on the same ingested, reduced and segmented beamtime
and the same training sample (``train``'s draw: ``[features] sample_size`` pixels of the
particles, seeded; on ``demo`` and ``small`` that is every particle pixel):

- conv3d trains exactly as the preset's manifest says (what ``spndi demo`` does: on ``demo``
  ``max_epochs = 15`` with early stopping); the FoldingNets train ``--epochs`` epochs without
  early stopping (they are 100× slower per pattern on a CPU);
- before training, after epochs ``1, 2, 4, 8, ...`` and at the end (the best validation
  epoch's weights, as ``train`` keeps) the model encodes every sample pixel, k-means (K = the
  number of simulated domain types, the ``[cluster]`` settings otherwise) clusters the latent
  vectors, and the adjusted Rand index (ARI) against the true domains, boundary pixels left
  out, is printed;
- the table gives each recipe's training time, s/epoch, encoding cost, final ARI, and its ARI
  at conv3d's training time (equal-time comparison: the untrained model's ARI if its first
  epoch was not done by then).

The fit is :func:`spndi_dask.features.train.fit` on :func:`sample_patterns` and
:func:`model_inputs`, as ``train`` runs it, but in this process with ``--threads`` torch
threads (so the epochs can be scored); ``--stages RECIPE ...`` also runs those recipes through
the stages (``train`` → ``encode`` → ``cluster``) and prints the stage ARI as a check.

Usage: ``python scripts/compare_recipes.py [--preset demo] [--epochs 2] [--threads 1]
[--recipes spndi study] [--stages spndi] [--dir /tmp/spndi-bench]``
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

RECIPES: dict[str, dict[str, Any]] = {
    "spndi": {},
    "spndi-foldingnet": {"model": "foldingnet"},
    "study": {"recipe": "study"},
}


def _beamtime(args: argparse.Namespace) -> Any:
    """The preset's beamtime, simulated, ingested, reduced and segmented once."""
    from spndi_dask.config import load_manifest
    from spndi_dask.ingest import ingest
    from spndi_dask.particles import stats
    from spndi_dask.reduce import reduce
    from spndi_dask.simulate import preset, simulate_beamtime

    base = Path(args.dir) / f"recipes-{args.preset}"
    if not (base / "beamtime.toml").exists():
        m = simulate_beamtime(base, preset(args.preset))
        ingest(m)
        reduce(m)
        stats(m, figures=False)
    return load_manifest(base / "beamtime.toml")


def _given(manifest: Any) -> dict[str, Any]:
    """The manifest's ``[features]`` keys that differ from the defaults (the demo's training)."""
    from spndi_dask.config.settings import FeatureSettings

    defaults = FeatureSettings.model_fields
    return {k: v for k, v in manifest.features if v != defaults[k].default}


def _scorer(manifest: Any, sample: Any, k: int) -> Any:
    """``score(latent) -> ARI`` of k-means on the sample pixels' latent vectors vs the truth."""
    import dask.array as da
    from sklearn.metrics import adjusted_rand_score

    from spndi_dask.cluster import assign, fit_with_settings, scaling

    truth_dir = manifest.base_dir / "ground_truth"
    gt = {n: np.load(truth_dir / f"{n}.npz") for n in sample.scans}
    at = [(gt[sample.scans[i]], y, x) for i, y, x in sample.index]
    domain = np.array([g["domain"][y, x] for g, y, x in at])
    inner = ~np.array([g["boundary"][y, x] for g, y, x in at])
    c = manifest.cluster

    def score(latent: np.ndarray) -> float:
        z = da.from_array(latent.astype(np.float64), chunks=(-1, -1))
        offset, scale = scaling(z, c.standardize)
        zs = (z - offset) / scale
        fit = fit_with_settings(zs, k, c)
        labels = np.asarray(assign(zs, fit.centers).compute())
        return float(adjusted_rand_score(domain[inner], labels[inner]))

    score.inner = int(inner.sum())  # type: ignore[attr-defined]
    return score


def _run(name: str, manifest: Any, sample: Any, score: Any, args: argparse.Namespace) -> dict:
    """Fit one recipe on the sample, scoring the latent vectors after epochs 1, 2, 4, ..."""
    import torch

    from spndi_dask.config.settings import FeatureSettings
    from spndi_dask.features.inference import _encode_inputs
    from spndi_dask.features.model import build_model
    from spndi_dask.features.train import (
        FIT_SETTINGS,
        fit,
        hyper_parameters,
        model_inputs,
        normalisation,
    )

    given = _given(manifest)
    if name == "spndi":  # the manifest's own training (the demo's)
        settings = FeatureSettings(**{**given, **RECIPES[name]})
    else:  # the same sample, a fixed number of epochs
        run = {"max_epochs": args.epochs, "patience": args.epochs}
        settings = FeatureSettings(**{**given, **RECIPES[name], **run})
    hyper = hyper_parameters(settings, sample.grid["n"])
    meta = {
        "kind": settings.model,
        "hyper": hyper,
        "normalisation": normalisation(settings, sample.grid),
    }
    t0 = time.perf_counter()
    inputs = model_inputs(sample.patterns, meta, yx=sample.index[:, 1:], offsets=sample.offsets)
    t_inputs = time.perf_counter() - t0
    torch.manual_seed(settings.seed)
    model = build_model(settings.model, **hyper)
    print(
        f"\n{name}: {settings.model}, max_epochs {settings.max_epochs}, patience "
        f"{settings.patience}, batch {settings.batch_size}, lr {settings.learning_rate:g}, "
        f"weight decay {settings.weight_decay:g}; inputs {t_inputs:.1f} s\n"
        f"  {'epoch':>5}{'train loss':>12}{'val loss':>12}{'s':>8}{'train s':>9}{'ARI':>8}",
        flush=True,
    )
    trend: list[tuple[float, float]] = []  # (training seconds so far, ARI)
    clock: dict[str, Any] = {"train": 0.0, "encode": []}

    def latent() -> np.ndarray:
        te = time.perf_counter()
        z = _encode_inputs(model, inputs, "cpu", None)
        clock["encode"].append(time.perf_counter() - te)
        return z

    def on_epoch(row: dict) -> None:
        clock["train"] += row["seconds"]
        e, ari = row["epoch"], ""
        if e & (e - 1) == 0:  # a power of two: score the current weights
            trend.append((clock["train"], score(latent())))
            ari = f"{trend[-1][1]:.3f}"
        print(
            f"  {e:>5}{row['train_loss']:>12.4g}{row['val_loss']:>12.4g}{row['seconds']:>8.1f}"
            f"{clock['train']:>9.1f}{ari:>8}",
            flush=True,
        )

    trend.append((0.0, score(latent())))  # the untrained model: what training adds
    print(f"  {0:>5}{'':>12}{'':>12}{'':>8}{0.0:>9.1f}{trend[0][1]:>8.3f}", flush=True)
    result = fit(
        model,
        inputs,
        device="cpu",
        callback=on_epoch,
        **settings.model_dump(include=FIT_SETTINGS),
    )
    ari = score(latent())  # the best validation epoch's weights, as `train` keeps
    return {
        "recipe": name,
        "model": settings.model,
        "epochs": len(result.history),
        "best": result.best_epoch,
        "inputs_s": t_inputs,
        "train_s": clock["train"],
        "encode_ms": 1e3 * (t_inputs + min(clock["encode"])) / len(inputs),
        "ari": ari,
        "trend": trend,
    }


def _stage_ari(name: str, manifest: Any, k: int, epochs: int) -> tuple[float, float]:
    """Training seconds and ARI of the recipe through the train, encode and cluster stages."""
    from spndi_dask.cluster import cluster
    from spndi_dask.config.settings import FeatureSettings
    from spndi_dask.features import encode, train
    from spndi_dask.simulate.truth import cluster_ari_vs_truth

    given = _given(manifest)
    run = {} if name == "spndi" else {"max_epochs": epochs, "patience": epochs}
    features = FeatureSettings(**{**given, **RECIPES[name], **run})
    mm = manifest.model_copy(update={"features": features})
    t0 = time.perf_counter()
    train(mm, force=True, on_worker=False)
    seconds = time.perf_counter() - t0
    encode(mm, force=True)
    cluster(mm, k=k, figures=False)
    return seconds, cluster_ari_vs_truth(mm, manifest.base_dir / "ground_truth")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--dir", default="/tmp/spndi-bench")
    ap.add_argument("--epochs", type=int, default=2, help="FoldingNet epochs (no early stop)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    ap.add_argument(
        "--stages", nargs="*", default=[], choices=list(RECIPES), help="also through the stages"
    )
    args = ap.parse_args()

    import torch

    from spndi_dask.features.train import sample_patterns
    from spndi_dask.simulate import preset

    torch.set_num_threads(args.threads)
    m = _beamtime(args)
    k = len(preset(args.preset).domain_types)
    sample = sample_patterns(m)
    score = _scorer(m, sample, k)
    n = len(sample.patterns)
    print(
        f"{args.preset}: {len(sample.scans)} scans, sample {n} of "
        f"{sum(sample.candidates.values())} particle pixels ({score.inner} outside domain "
        f"boundaries scored), patterns {sample.grid['n']}³, K = {k}; "
        f"{len(os.sched_getaffinity(0))} cores, torch threads {torch.get_num_threads()}",
        flush=True,
    )
    rows = [_run(name, m, sample, score, args) for name in args.recipes]
    t_ref = next((r["train_s"] for r in rows if r["recipe"] == "spndi"), None)
    print(
        f"\n{'recipe':<18}{'model':<12}{'epochs':>7}{'best':>5}{'train s':>9}{'s/epoch':>9}"
        f"{'encode ms/px':>13}{'ARI':>7}{'ARI at conv3d time':>20}"
    )
    for r in rows:
        at = [a for t, a in r["trend"] if t_ref is not None and t <= t_ref]
        same = f"{at[-1]:.3f}" if at else "-"
        print(
            f"{r['recipe']:<18}{r['model']:<12}{r['epochs']:>7}{r['best']:>5}{r['train_s']:>9.1f}"
            f"{r['train_s'] / r['epochs']:>9.1f}{r['encode_ms']:>13.1f}{r['ari']:>7.3f}{same:>20}"
        )
    if t_ref is not None:
        print(f"(conv3d's training time: {t_ref:.1f} s)")
    for name in args.stages:
        seconds, ari = _stage_ari(name, m, k, args.epochs)
        print(f"stages check, {name}: train {seconds:.1f} s, ARI {ari:.3f}", flush=True)


if __name__ == "__main__":
    main()
