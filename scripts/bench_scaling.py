"""Scale evidence: the demo pipeline on 1 and 2 workers, and a projection to a full beamtime.

Measured side by side in one run:

(1) the ``demo`` beamtime (simulated once, not timed) run through ``spndi_dask.pipeline.run``
    (ingest → reduce → stats → train → encode → cluster → analyze) from scratch on a LocalCluster
    with 1 worker and with 2 workers (1 thread each), each into its own output folder: seconds
    per stage and the speed-up 2 workers / 1 worker, per stage and in all. ``train`` runs in the
    client process (one torch model; threads = cores) and is listed apart.
(2) per-core throughput from the 2-worker run: raw bytes/s/core for ingest and for reduce,
    patterns/s/core for encode; and from those a projection for a full beamtime of
    ``--particles`` × ``--angles`` × ``--scan``² points × ``--detector``² pixels (uint16) on N
    cores, assuming throughput per core stays as measured on 2 (ingest and reduce read every
    byte; encode handles every scan pixel; training is fixed-size, from a sample).

Usage: ``python scripts/bench_scaling.py [--dir /tmp/spndi-bench-scaling] [--preset demo]``
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

STAGES = ["ingest", "reduce", "stats", "train", "encode", "cluster", "analyze"]


def _manifest_copy(src: Path, tag: str) -> Path:
    """``beamtime-<tag>.toml`` beside ``src`` writing to ``results-<tag>``."""
    text = src.read_text()
    out = src.with_name(f"beamtime-{tag}.toml")
    out.write_text(text.replace('output = "results"', f'output = "results-{tag}"', 1))
    return out


def _run(manifest_path: Path, workers: int) -> dict[str, float]:
    from spndi_dask.config import load_manifest
    from spndi_dask.dask_clusters import open_cluster
    from spndi_dask.pipeline import RunOptions, run

    m = load_manifest(manifest_path)
    shutil.rmtree(m.output_dir, ignore_errors=True)
    local = {"n_workers": workers, "threads_per_worker": 1, "dashboard_address": "127.0.0.1:0"}
    with open_cluster(**local) as s:
        t0 = time.perf_counter()
        results = run(m, s.client, stages=STAGES, options=RunOptions(progress=False, k=3))
        total = time.perf_counter() - t0
    bad = [r.stage for r in results if r.failed]
    if bad:
        raise SystemExit(f"stages failed with {workers} worker(s): {bad}")
    times = {r.stage: r.seconds for r in results}
    times["total"] = total
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default="/tmp/spndi-bench-scaling")
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--particles", type=int, default=8)
    ap.add_argument("--angles", type=int, default=41)
    ap.add_argument("--scan", type=int, default=200)
    ap.add_argument("--detector", type=int, default=512)
    args = ap.parse_args()

    from spndi_dask.config import load_manifest
    from spndi_dask.simulate import preset, simulate_beamtime

    root = Path(args.dir)
    cfg = preset(args.preset)
    if not (root / "beamtime.toml").exists():
        simulate_beamtime(root, cfg)
    runs = {n: _run(_manifest_copy(root / "beamtime.toml", f"w{n}"), n) for n in (1, 2)}

    print(
        f"(1) {args.preset} beamtime: {cfg.n_particles} particles x {cfg.n_angles} angles x "
        f"{cfg.scan_shape[0]}x{cfg.scan_shape[1]} points x {cfg.detector_shape[0]}x"
        f"{cfg.detector_shape[1]} pixels ({cfg.raw_bytes / 1e9:.2f} GB raw), seconds:"
    )
    print(f"    {'stage':<9}{'1 worker':>10}{'2 workers':>11}{'speed-up':>10}")
    for stage in [*STAGES, "total"]:
        a, b = runs[1][stage], runs[2][stage]
        note = "  (client process, not on workers)" if stage == "train" else ""
        print(f"    {stage:<9}{a:>10.1f}{b:>11.1f}{a / b:>10.2f}{note}")
    dist = [s for s in STAGES if s != "train"]
    a, b = sum(runs[1][s] for s in dist), sum(runs[2][s] for s in dist)
    print(f"    {'on workers (all but train)':<30}{a:>7.1f} s {b:>7.1f} s   speed-up {a / b:.2f}")

    # (2) per-core throughput on 2 workers and the projection
    m = load_manifest(root / "beamtime-w2.toml")
    pixels = cfg.n_particles * cfg.scan_shape[0] * cfg.scan_shape[1]
    cores = 2
    ingest_bpc = cfg.raw_bytes / runs[2]["ingest"] / cores
    reduce_bpc = cfg.raw_bytes / runs[2]["reduce"] / cores
    encode_ppc = pixels / runs[2]["encode"] / cores
    full_bytes = args.particles * args.angles * args.scan**2 * args.detector**2 * 2
    full_pixels = args.particles * args.scan**2
    print(
        f"(2) per core (2 workers): ingest {ingest_bpc / 1e6:.0f} MB/s, reduce "
        f"{reduce_bpc / 1e6:.0f} MB/s of raw frames, encode {encode_ppc:.0f} patterns/s; "
        f"train {runs[2]['train']:.0f} s (fixed-size sample)"
    )
    print(
        f"    full beamtime: {args.particles} particles x {args.angles} angles x "
        f"{args.scan}x{args.scan} points x {args.detector}^2 pixels = {full_bytes / 1e12:.1f} TB "
        f"raw, {full_pixels} patterns; projected hours:"
    )
    print(f"    {'cores':>7}{'ingest':>9}{'reduce':>9}{'encode':>9}{'total':>9}")
    for n in (16, 64, 256, 1024):
        ti = full_bytes / (ingest_bpc * n) / 3600
        tr = full_bytes / (reduce_bpc * n) / 3600
        te = full_pixels / (encode_ppc * n) / 3600
        total = ti + tr + te + runs[2]["train"] / 3600
        print(f"    {n:>7}{ti:>9.2f}{tr:>9.2f}{te:>9.2f}{total:>9.2f}")
    print(f"    (results of the 2-worker run: {m.output_dir})")


if __name__ == "__main__":
    main()
