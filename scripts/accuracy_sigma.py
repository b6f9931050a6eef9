"""Calibration of the per-pixel standard errors (``*_sigma``) against the simulated truth.

Simulates a preset at two count levels (its ``peak_counts`` and 10× fewer; the simulator draws
every detector voxel from a Poisson distribution: Bragg peak, background and dark), ingests and
reduces it, and prints per quantity the RMS and mean of ``z = (estimate − truth) / sigma`` over
the true particles' valid pixels (:func:`spndi_dask.simulate.sigma_z_vs_truth`). Calibrated
errors give RMS z ≈ 1; a systematic error (finite ROI and angle range, pupil, background
estimate) not in the counting statistics shows as RMS z above 1 and a mean z away from 0;
"smooth" is the RMS z over the half of the pixels where the true G changes least between
neighbouring scan pixels (the spatial resolution — probe, drift shift — mixes neighbours).

Usage: ``python scripts/accuracy_sigma.py [--preset small] [--factors 1,0.1] [--dir ...]``
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dir", default="/tmp/spndi-sigma")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--factors", default="1,0.1", help="count levels, × the preset's peak_counts")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from spndi_dask.ingest import ingest
    from spndi_dask.io.results_store import open_results
    from spndi_dask.reduce import reduce
    from spndi_dask.simulate import SIGMA_QUANTITIES, preset, sigma_z_vs_truth, simulate_beamtime

    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    base = preset(args.preset, seed=args.seed)
    print(
        f"{'peak_counts':>11} {'quantity':<10}{'RMS z':>7}{'smooth':>7}{'mean z':>8}"
        f"{'median σ':>11}{'n':>6}"
    )
    for factor in (float(f) for f in args.factors.split(",")):
        counts = base.peak_counts * factor
        out = root / f"counts_{counts:g}"
        t0 = time.perf_counter()
        m = simulate_beamtime(out, preset(args.preset, seed=args.seed, peak_counts=counts))
        ingest(m)
        reduce(m)
        stats = [
            sigma_z_vs_truth(
                open_results(m.output_dir, p.name), out / "ground_truth" / f"{p.name}.npz"
            )
            for p in m.scans
        ]
        for q in SIGMA_QUANTITIES:
            n = np.array([s[q]["n"] for s in stats])
            rms = np.sqrt(
                np.sum([s[q]["rms"] ** 2 * k for s, k in zip(stats, n, strict=True)]) / n.sum()
            )
            smooth = np.sqrt(np.mean([s[q]["rms_smooth"] ** 2 for s in stats]))
            mean = np.sum([s[q]["mean"] * k for s, k in zip(stats, n, strict=True)]) / n.sum()
            sig = np.median([s[q]["sigma"] for s in stats])
            print(f"{counts:11g} {q:<10}{rms:7.2f}{smooth:7.2f}{mean:8.2f}{sig:11.3g}{n.sum():6d}")
        print(f"{'':11} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
