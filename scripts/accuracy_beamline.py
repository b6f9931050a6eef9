"""Accuracy of a beamline export (``spndi init`` → ingest → reduce) next to the ideal layout.

Simulates the ``beamline`` preset twice with the same seed (the same particles and ground
truth): once with every trait of a nanoprobe beamline's export (per-scan files with ids crossing
a digit boundary, split files, uint32 frames with module gaps through the Bragg peak, flagged
pixels and saturated frames, a recorded jittered snake fly scan with overshoot, multi-channel XRF
spectra) and once in the ideal layout (one file per angle, frames on the grid, no gaps). The
beamline export gets its manifest from ``spndi init`` alone (plus the XRF energy window); both
are ingested and reduced, and the RMS errors against the ground truth inside the particles are
printed side by side.

Usage: ``python scripts/accuracy_beamline.py [--dir /tmp/spndi-beamline] [--seed 0]``
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dir", default="/tmp/spndi-beamline")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from spndi_dask.config import load_manifest
    from spndi_dask.ingest import ingest
    from spndi_dask.io.results_store import open_results
    from spndi_dask.reduce import reduce
    from spndi_dask.simulate import IDEAL_LAYOUT, errors_vs_truth, preset, simulate_beamtime

    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    cases = {}
    for case, overrides in (("ideal", IDEAL_LAYOUT), ("beamline", {})):
        out = root / case
        t0 = time.perf_counter()
        simulate_beamtime(out, preset("beamline", seed=args.seed, **overrides))
        manifest = out / "beamtime.toml"
        if case == "beamline":  # the manifest from the files alone
            manifest = out / "init.toml"
            cmd = [sys.executable, "-m", "spndi_dask.cli", "-q", "init", str(out / "raw")]
            cmd += ["-o", str(manifest), "--xrf-window", "6.73:7.13"]
            subprocess.run(cmd, check=True)
        m = load_manifest(manifest)
        ingest(m)
        summary = reduce(m)
        failed = {k: v.get("error") for k, v in summary.items() if v["status"] == "failed"}
        if failed:
            raise SystemExit(f"{case}: reduce failed: {failed}")
        cases[case] = {
            p.name: errors_vs_truth(
                open_results(m.output_dir, p.name), out / "ground_truth" / f"{p.name}.npz"
            )
            for p in m.scans
        }
        print(f"{case}: simulated, ingested and reduced in {time.perf_counter() - t0:.1f} s")

    keys = ("d", "tilt_x", "tilt_y", "coverage")
    print(f"\n{'particle':<10}{'quantity':<10}{'ideal':>11}{'beamline':>11}{'ratio':>8}")
    for name in cases["ideal"]:
        for k in keys:
            a, b = cases["ideal"][name][k], cases["beamline"][name][k]
            print(f"{name:<10}{k:<10}{a:11.3g}{b:11.3g}{b / a if a else float('nan'):8.2f}")
    for k in keys:
        a = np.mean([v[k] for v in cases["ideal"].values()])
        b = np.mean([v[k] for v in cases["beamline"].values()])
        print(f"{'mean':<10}{k:<10}{a:11.3g}{b:11.3g}{b / a if a else float('nan'):8.2f}")


if __name__ == "__main__":
    main()
