"""Benchmark reduce: vs a plain read of the same bytes, memory vs dataset size, vs a NumPy loop.

Measured side by side in one run on the same LocalCluster (1 single-threaded worker per core):

(a) read:   the ROI voxels every particle's reduce reads, read and decompressed by the same
            workers in the same blocks (nothing computed, nothing written)
    reduce: ``spndi_dask.reduce.reduce`` of the same stores (planning, moments, drift-corrected
            q-grid patterns, maps, writing results.zarr), ``force=True``
(b) peak RSS per worker (workers restarted before each phase) at two dataset sizes 4× apart
(c) a straightforward NumPy reference as the original scripts: load one particle's ROI frames,
    then loop over scan pixels computing the intensity-weighted q moments of each 3D pattern.

Usage: ``python scripts/bench_reduce.py [--small medium] [--large large] [--dir /tmp/spndi-bench]``
(the simulated beamtimes are generated and ingested once and reused).
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import numpy as np


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _touch(block: np.ndarray) -> np.ndarray:
    return np.zeros((1,) * block.ndim)


def _prepare(out: Path, name: str):
    from spndi_dask.config import load_manifest
    from spndi_dask.ingest import ingest
    from spndi_dask.simulate import preset, simulate_beamtime

    if not (out / "beamtime.toml").exists():
        t0 = time.perf_counter()
        simulate_beamtime(out, preset(name))
        print(f"simulated {name} in {time.perf_counter() - t0:.1f} s")
    m = load_manifest(out / "beamtime.toml")
    t0 = time.perf_counter()
    summary = ingest(m)
    if any(s["status"] != "up to date" for s in summary.values()):
        print(f"ingested {name} in {time.perf_counter() - t0:.1f} s")
    return m


def _numpy_reference(plan, n_pixels: int | None) -> tuple[float, int]:
    """The per-pixel loop of the original scripts (background, monitor, mask, q moments)."""
    from spndi_dask.geometry import q_sample
    from spndi_dask.reduce.core import roi_frames

    t0 = time.perf_counter()
    frames = np.asarray(roi_frames(plan).compute(scheduler="sync"))
    r, c = plan.roi_slices
    q = q_sample(
        plan.geometry, plan.angles, rows=np.arange(r.start, r.stop), cols=np.arange(c.start, c.stop)
    )
    bad = plan.bad[r, c]
    ny, nx = frames.shape[1:3]
    pixels = [(y, x) for y in range(ny) for x in range(nx)][:n_pixels]
    out = np.zeros((ny, nx, 10))
    for y, x in pixels:
        pattern = frames[:, y, x].astype(np.float64)
        pattern *= plan.scale[:, y, x, None, None]
        pattern -= plan.background[:, None, None]
        pattern[:, bad] = 0.0
        s = pattern.sum()
        com = (pattern[..., None] * q).sum(axis=(0, 1, 2)) / s
        d = q - com
        cov = np.einsum("arc,arci,arcj->ij", pattern, d, d) / s
        out[y, x] = [s, *com, *cov[np.triu_indices(3)]]
    return time.perf_counter() - t0, len(pixels)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--small", default="medium")
    ap.add_argument("--large", default="large")
    ap.add_argument("--dir", default="/tmp/spndi-bench")
    ap.add_argument("--reference-pixels", type=int, default=None, help="limit the NumPy loop")
    args = ap.parse_args()

    from distributed import Client, LocalCluster

    from spndi_dask.cluster_setup import local_cluster_size
    from spndi_dask.reduce import plan_particle, reduce
    from spndi_dask.reduce.core import roi_frames
    from spndi_dask.simulate import preset

    n, t, mem = local_cluster_size()
    rows = []
    with (
        LocalCluster(
            n_workers=n, threads_per_worker=t, memory_limit=mem, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        for name in (args.small, args.large):
            m = _prepare(Path(args.dir) / name, name)
            plans = [plan_particle(m, p) for p in m.particles]
            arrays = [roi_frames(p) for p in plans]
            roi_bytes = sum(a.nbytes for a in arrays)
            client.restart()
            t0 = time.perf_counter()
            client.compute([a.map_blocks(_touch, chunks=(1,) * 5).sum() for a in arrays], sync=True)
            t_read = time.perf_counter() - t0
            rss_read = max(client.run(_peak_rss_mb).values())
            client.restart()
            t0 = time.perf_counter()
            summary = reduce(m, force=True)
            t_reduce = time.perf_counter() - t0
            rss_reduce = max(client.run(_peak_rss_mb).values())
            assert all(s["status"] == "reduced" for s in summary.values()), summary
            t_p1 = summary[m.particles[0].name]["seconds"]
            rows.append(
                (
                    name,
                    preset(name).raw_bytes,
                    roi_bytes,
                    t_read,
                    t_reduce,
                    rss_read,
                    rss_reduce,
                    t_p1,
                    plans[0],
                )
            )

    print(f"\n== reduce, {n} workers × {t} thread")
    print(
        f"{'preset':<8}{'raw GB':>8}{'ROI GB':>8}{'read s':>8}{'reduce s':>9}{'ratio':>7}"
        f"{'RSS read MB':>13}{'RSS reduce MB':>15}"
    )
    for name, raw, roi, tr, tred, rr, rred, *_ in rows:
        print(
            f"{name:<8}{raw / 1e9:8.2f}{roi / 1e9:8.2f}{tr:8.1f}{tred:9.1f}{tred / tr:7.2f}"
            f"{rr:13.0f}{rred:15.0f}"
        )
    s_name, l_name = rows[0][0], rows[1][0]
    print(f"(a) reduce / read on {rows[1][0]}: {rows[1][4] / rows[1][3]:.2f}")
    print(
        f"(b) peak RSS per worker in reduce, {l_name} / {s_name} (4x the data): "
        f"{rows[1][6] / rows[0][6]:.2f}"
    )

    plan = rows[0][8]
    t_ref, n_px = _numpy_reference(plan, args.reference_pixels)
    total_px = plan.scale.shape[1] * plan.scale.shape[2]
    t_ref_all = t_ref * total_px / n_px
    print(
        f"(c) NumPy per-pixel loop, {s_name} particle {plan.name}: {t_ref_all:.1f} s "
        f"({n_px} of {total_px} pixels timed); spndi reduce of that particle {rows[0][7]:.1f} s "
        f"(incl. patterns and writing): speed-up {t_ref_all / rows[0][7]:.1f}x"
    )


if __name__ == "__main__":
    main()
