"""Benchmark ``[reduce] peak = "gaussian"``: pixels/s per core of the fit vs the moments pass.

One particle of a simulated beamtime is ingested once; then, side by side in one run on one
core (dask's synchronous scheduler, numba kernels warmed by a first run):

* reduce, ``peak = "moments"``: the whole pass (read, corrections, moments, drift-corrected
  q-grid patterns, maps, writing results.zarr), ``force=True``;
* reduce, ``peak = "gaussian"``: the same pass with the fit of every pattern in it;
* the fit kernel alone (:func:`spndi_dask.reduce._peakfit.fit_gaussian_3d`) on the stored
  patterns of the particle's valid pixels.

Printed as scan pixels per second per core, and the ratios.

Usage: ``python scripts/bench_peakfit.py [--preset small] [--dir /tmp/spndi-bench-peakfit]``
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import dask
import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--dir", default="/tmp/spndi-bench-peakfit")
    args = ap.parse_args()

    from spndi_dask.config import Manifest
    from spndi_dask.ingest import ingest
    from spndi_dask.reduce import open_results, reduce
    from spndi_dask.reduce._peakfit import fit_gaussian_3d
    from spndi_dask.simulate import preset, simulate_beamtime

    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    m = simulate_beamtime(root, preset(args.preset, n_particles=1), scheduler="sync")
    ingest(m)

    def manifest(peak: str) -> Manifest:
        d = m.to_dict()
        d["reduce"] = {"peak": peak}
        return Manifest.from_dict(d, base_dir=root, source=str(root / "beamtime.toml"))

    rate = {}
    with dask.config.set(scheduler="sync"):
        for peak in ("moments", "gaussian"):
            reduce(manifest(peak), force=True)  # warm-up (imports, numba caches)
            t0 = time.perf_counter()
            reduce(manifest(peak), force=True)
            seconds = time.perf_counter() - t0
            ds = open_results(root / "results", "p1")
            pixels = ds.sizes["y"] * ds.sizes["x"]
            rate[peak] = pixels / seconds
    valid = ds["valid"].values
    patterns = ds["pattern"].values[valid]
    covered = ds["pattern_covered"].values
    offsets = tuple(ds[c].values for c in ("dq_x", "dq_y", "dq_z"))
    fit_gaussian_3d(patterns[:2], covered, offsets)
    t0 = time.perf_counter()
    fit = fit_gaussian_3d(patterns, covered, offsets)
    kernel = len(patterns) / (time.perf_counter() - t0)
    steps = np.median(fit[:, -2])
    n = ds.sizes["dq_x"]
    print(
        f"preset {args.preset!r}, 1 particle: {pixels} scan pixels ({valid.sum()} valid), "
        f"{ds.sizes['angle']} angles, q grid {n}³; one core"
    )
    print(f"reduce, peak = 'moments'       {rate['moments']:9.1f} pixels/s per core")
    print(
        f"reduce, peak = 'gaussian'      {rate['gaussian']:9.1f} pixels/s per core "
        f"({rate['moments'] / rate['gaussian']:.1f}x slower)"
    )
    print(
        f"fit kernel alone (valid px)    {kernel:9.1f} pixels/s per core "
        f"(median {steps:.0f} LM steps)"
    )


if __name__ == "__main__":
    main()
