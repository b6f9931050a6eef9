"""Accuracy of ``[reduce] peak = "gaussian"`` against the moments, on simulated ground truth.

Simulates the ``small`` preset (one particle) twice with the same seed: clean, and with a weak
second domain under every scan point (``second_domain_fraction`` of the main peak's height,
turned by ``second_domain_tilt`` about the rocking axis, i.e. along tilt_x; the ground truth is
the main domain). Each is ingested and reduced with ``peak = "moments"`` and ``"gaussian"``, and
the RMS errors against the ground truth inside the particle are printed side by side
(:func:`spndi_dask.simulate.errors_vs_truth`).

Usage: ``python scripts/accuracy_peakfit.py [--dir /tmp/spndi-peakfit] [--preset small]
[--fraction 0.2] [--seed 0]``
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dir", default="/tmp/spndi-peakfit")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--fraction", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from spndi_dask.config import Manifest
    from spndi_dask.ingest import ingest
    from spndi_dask.reduce import open_results, reduce
    from spndi_dask.simulate import errors_vs_truth, preset, simulate_beamtime

    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    print(f"preset {args.preset!r}, 1 particle, seed {args.seed}; RMS errors inside the particle")
    print(
        f"{'case':<28}{'peak':<10}{'d (rel)':>10}{'tilt_x':>10}{'tilt_y':>10}{'cover':>7}"
        f"{'reduce s':>10}"
    )
    for case, fraction in (("clean", 0.0), (f"second domain {args.fraction:g}", args.fraction)):
        out = root / case.split()[0]
        config = preset(args.preset, n_particles=1, seed=args.seed, second_domain_fraction=fraction)
        m = simulate_beamtime(out, config, scheduler="sync")
        ingest(m)
        for peak in ("moments", "gaussian"):
            d = m.to_dict()
            d["reduce"] = {"peak": peak}
            mp = Manifest.from_dict(d, base_dir=out, source=str(out / "beamtime.toml"))
            t0 = time.perf_counter()
            reduce(mp)
            seconds = time.perf_counter() - t0
            e = errors_vs_truth(
                open_results(out / "results", "p1").compute(), out / "ground_truth" / "p1.npz"
            )
            print(
                f"{case:<28}{peak:<10}{e['d']:>10.2e}{e['tilt_x']:>10.2e}{e['tilt_y']:>10.2e}"
                f"{e['coverage']:>7.3f}{seconds:>10.1f}"
            )


if __name__ == "__main__":
    main()
