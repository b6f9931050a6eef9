"""Benchmark reduce: vs a plain read of the same bytes, memory vs dataset size, vs a NumPy loop.

Measured side by side in one run, each phase on fresh workers of ``start_client`` (1
single-threaded worker per core, as ``spndi run``), run twice and the second run timed (the first
warms imports and the numba kernels):

(a) read:   the ROI voxels every particle's reduce reads, read and decompressed by the same
            workers in the same blocks by the same reader (``spndi_dask.io.shards``; nothing
            computed, nothing written); also timed through zarr's codec pipeline (a plain
            dask/zarr read of the same voxels), for comparison
    reduce: ``spndi_dask.reduce.reduce`` of the same stores, all particles (planning, moments,
            drift-corrected q-grid patterns, maps, writing results.zarr), ``force=True``
(b) peak RSS per worker over a phase, at two dataset sizes 4× apart
(c) a straightforward NumPy reference as the original scripts: load one particle's ROI frames,
    correct and drift-shift them, then loop over scan pixels computing the intensity-weighted
    q moments of each 3D pattern and gridding it onto the q grid; against ``reduce`` of that
    particle alone (its patterns are compared with the reference's, to show both compute the
    same thing).

Usage: ``python scripts/bench_reduce.py [--small medium] [--large large] [--dir /tmp/spndi-bench]``
(the simulated beamtimes are generated and ingested once and reused).
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import dask
import numpy as np


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _touch(block: np.ndarray) -> np.ndarray:
    return np.zeros((1,) * block.ndim)


def _reads(plans, *, direct: bool) -> list:
    """Graphs that read and decompress every particle's ROI voxels, and nothing else."""
    from spndi_dask.reduce.graph import roi_frames

    return [roi_frames(p, direct=direct).map_blocks(_touch, chunks=(1,) * 5).sum() for p in plans]


#: Task-name prefixes of reduce's graph, by what they do.
_KINDS = {
    "raw-roi": "read + decode raw tiles",
    "reduce-block": "fused kernel (correct, moments, shift, q grid)",
    "reduce-strip": "pack neighbour strips",
    "store-map": "compress + write results",
}


def _breakdown(stream: list[dict], wall: float, threads: int) -> list[str]:
    """Worker-seconds per kind of task (and transfers, and idle) of one run's task stream."""
    busy: dict[str, float] = {}
    tiles = 0
    for task in stream:
        key = task["key"][0] if isinstance(task["key"], tuple) else task["key"]
        kind = next((v for k, v in _KINDS.items() if str(key).startswith(k)), "other tasks")
        tiles += kind == _KINDS["raw-roi"]
        for part in task["startstops"]:
            name = kind if part["action"] == "compute" else f"{part['action']}s between workers"
            busy[name] = busy.get(name, 0.0) + part["stop"] - part["start"]
    busy["idle (client work: planning, graphs, publishing)"] = wall * threads - sum(busy.values())
    return [
        f"{s:6.1f} worker-s  {1e3 * s / max(tiles, 1):5.0f} ms per tile  {name}"
        for name, s in sorted(busy.items(), key=lambda kv: -kv[1])
    ]


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


def _numpy_reference(plan, grid, n_pixels: int | None) -> tuple[float, int, np.ndarray]:
    """The per-pixel loop of the original scripts, producing what reduce produces per pixel.

    Load the particle's ROI frames, correct them (monitor, background, masked pixels filled from
    their neighbours), shift each angle's frames back by the drift (``scipy.ndimage.shift``,
    bilinear), then per scan pixel:
    the intensity-weighted q moments of its 3D pattern, and the pattern gridded onto the common
    q grid (trilinear ``scipy.ndimage.map_coordinates`` at the grid points' fractional
    (angle, row, col), as the point clouds of the original study were made).
    """
    from scipy import ndimage

    from spndi_dask.geometry import q_sample
    from spndi_dask.reduce import _kernels as K
    from spndi_dask.reduce.graph import roi_frames

    t0 = time.perf_counter()
    frames = np.asarray(roi_frames(plan).compute(scheduler="sync"), dtype=np.float64)
    r, c = plan.roi_slices
    rows, cols = np.arange(r.start, r.stop), np.arange(c.start, c.stop)
    q = q_sample(plan.geometry, plan.angles, rows=rows, cols=cols)
    frames *= plan.scale[..., None, None]
    frames -= plan.background[:, None, None, None, None]
    frames[..., plan.bad[r, c]] = 0.0
    if plan.fill is not None:  # masked ROI pixels filled from their neighbours, as reduce does
        flat = frames.reshape(-1, frames.shape[3] * frames.shape[4])
        frames = np.asarray(plan.fill @ flat.T).T.reshape(frames.shape)
    for a, (dy, dx) in enumerate(plan.drift):
        frames[a] = ndimage.shift(frames[a], (-dy, -dx, 0, 0), order=1, mode="constant")
    order = np.argsort(plan.angles)
    theta, q_lab = K.solve_rocking_angle(grid.points(), plan.geometry, float(plan.angles.mean()))
    det_r, det_c = K._detector_pixel(q_lab, plan.geometry)
    fa = np.interp(theta, plan.angles[order], np.arange(len(order)), left=np.nan, right=np.nan)
    coords = np.nan_to_num(np.stack([fa, det_r - r.start, det_c - c.start]), nan=-10.0)
    ny, nx = frames.shape[1:3]
    pixels = [(y, x) for y in range(ny) for x in range(nx)][:n_pixels]
    out = np.zeros((ny, nx, 10))
    patterns = np.zeros((ny, nx, grid.n**3), np.float32)
    for y, x in pixels:
        pattern = frames[:, y, x]
        s = pattern.sum()
        com = (pattern[..., None] * q).sum(axis=(0, 1, 2)) / s
        d = q - com
        cov = np.einsum("arc,arci,arcj->ij", pattern, d, d) / s
        out[y, x] = [s, *com, *cov[np.triu_indices(3)]]
        gridded = ndimage.map_coordinates(pattern[order], coords, order=1, cval=0.0)
        patterns[y, x] = np.maximum(gridded, 0)
    return time.perf_counter() - t0, len(pixels), patterns


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--small", default="medium")
    ap.add_argument("--large", default="large")
    ap.add_argument("--dir", default="/tmp/spndi-bench")
    ap.add_argument("--reference-pixels", type=int, default=None, help="limit the NumPy loop")
    args = ap.parse_args()

    from spndi_dask.dask_clusters import local_cluster_size, start_client
    from spndi_dask.reduce import beamtime_grid, plan_particle, reduce
    from spndi_dask.reduce.graph import roi_frames
    from spndi_dask.simulate import preset

    n, t, _ = local_cluster_size()

    streams = {}

    def phase(run, stream: str | None = None):
        """``run()`` twice on fresh workers (the first warms imports and kernels): the second
        run's seconds and the workers' peak RSS over both (and its task stream, if named)."""
        from distributed import get_task_stream

        with start_client(n_workers=n, threads_per_worker=t) as client:
            run()
            with get_task_stream(client) as ts:
                t0 = time.perf_counter()
                result = run()
                seconds = time.perf_counter() - t0
            if stream:
                streams[stream] = ts.data
            return seconds, max(client.run(_peak_rss_mb).values()), result

    rows = []
    for name in (args.small, args.large):
        m = _prepare(Path(args.dir) / name, name)
        plans = [plan_particle(m, p) for p in m.scans]
        arrays = [roi_frames(p) for p in plans]
        roi_bytes = sum(a.nbytes for a in arrays)
        reads, zarr_reads = _reads(plans, direct=True), _reads(plans, direct=False)
        t_read, rss_read, _ = phase(lambda: dask.compute(*reads))  # noqa: B023
        t_zarr, _, _ = phase(lambda: dask.compute(*zarr_reads))  # noqa: B023
        t_reduce, rss_reduce, summary = phase(lambda: reduce(m, force=True), name)  # noqa: B023
        assert all(s["status"] == "reduced" for s in summary.values()), summary
        if name == args.small:  # (c): one particle alone
            p1 = m.scans[0].name
            t_p1, _, _ = phase(lambda: reduce(m, scans=[p1], force=True))  # noqa: B023
            ref_m, ref_plan, ref_grid = m, plans[0], beamtime_grid(m, plans)
        rows.append(
            (
                name,
                preset(name).raw_bytes,
                roi_bytes,
                t_read,
                t_reduce,
                rss_read,
                rss_reduce,
                t_zarr,
            )
        )

    print(f"\n== reduce, {n} workers × {t} thread")
    print(
        f"{'preset':<8}{'raw GB':>8}{'ROI GB':>8}{'read s':>8}{'reduce s':>9}{'ratio':>7}"
        f"{'RSS read MB':>13}{'RSS reduce MB':>15}{'zarr read s':>13}"
    )
    for name, raw, roi, tr, tred, rr, rred, tz in rows:
        print(
            f"{name:<8}{raw / 1e9:8.2f}{roi / 1e9:8.2f}{tr:8.1f}{tred:9.1f}{tred / tr:7.2f}"
            f"{rr:13.0f}{rred:15.0f}{tz:13.1f}"
        )
    s_name, l_name = rows[0][0], rows[1][0]
    print(
        f"(a) reduce / read on {l_name}: {rows[1][4] / rows[1][3]:.2f}   (read: the same bytes "
        f"by the reader reduce uses, spndi_dask.io.shards)"
    )
    print(
        f"    reduce / read through zarr's codec pipeline (a plain dask/zarr read of the same "
        f"bytes): {rows[1][4] / rows[1][7]:.2f}; zarr read / direct read "
        f"{rows[1][7] / rows[1][3]:.2f}"
    )
    print(
        f"(b) peak RSS per worker in reduce, {l_name} / {s_name} (4x the data): "
        f"{rows[1][6] / rows[0][6]:.2f}"
    )

    print(f"    where the worker time of reduce on {l_name} goes:")
    for line in _breakdown(streams[l_name], rows[1][4], n * t):
        print("     ", line)

    t_ref, n_px, ref_patterns = _numpy_reference(ref_plan, ref_grid, args.reference_pixels)
    from spndi_dask.reduce import open_results

    # pixels at least the drift away from the scan border (the two treat the outside apart)
    ours = open_results(ref_m.output_dir, ref_plan.name)["pattern"].values
    ours = ours.reshape(ref_patterns.shape)
    ny, nx = ours.shape[:2]
    e = int(np.ceil(np.abs(ref_plan.drift).max()))
    timed = (np.arange(ny * nx) < n_px).reshape(ny, nx)
    timed[:e], timed[ny - e :], timed[:, :e], timed[:, nx - e :] = False, False, False, False
    diff = np.linalg.norm(ours[timed] - ref_patterns[timed]) / np.linalg.norm(ref_patterns[timed])
    total_px = ref_plan.scale.shape[1] * ref_plan.scale.shape[2]
    t_ref_all = t_ref * total_px / n_px
    print(
        f"(c) NumPy per-pixel loop (moments + gridded pattern), {s_name} particle "
        f"{ref_plan.name}: {t_ref_all:.1f} s ({n_px} of {total_px} pixels timed); spndi reduce "
        f"of that particle alone {t_p1:.1f} s (planning, maps, patterns, writing): speed-up "
        f"{t_ref_all / t_p1:.1f}x"
    )
    print(
        f"    patterns of reduce vs the reference ({timed.sum()} pixels inside the drift "
        f"margin): relative L2 difference {diff:.1e}"
    )


if __name__ == "__main__":
    main()
