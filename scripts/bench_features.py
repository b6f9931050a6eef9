"""Benchmark the feature stage: distributed conv3d inference scaling, vs single-process loops,
training time on the demo beamtime, and GPU vs CPU when a GPU is present.

Measured side by side in one run:

(1) training: ``spndi_dask.features.train`` on the simulated ``demo`` beamtime (its manifest's
    settings), seconds and patterns/s (forward + backward, validation included).
(2) inference on CPU: the demo's real patterns tiled to ``--pixels`` scan pixels in a Zarr
    array, encoded by ``latent_array`` (map_blocks, model loaded once per worker):
      - LocalCluster with 1 worker and with 2 workers, 1 thread each, torch 1 thread each
        → patterns/s and the scaling ratio (goal ≥ 1.8); once with the workers unpinned (the OS
        moves them between the cores they share with the scheduler and the client) and once
        pinned one per core, as ``start_client`` starts them;
      - the same with the default sizing (torch threads = cores ÷ worker threads);
      - plain single-process loops on the same Zarr array: per pixel (batch 1, as a
        straightforward script would) and in batches of ``CPU_BATCH`` with all cores.
(3) GPU (only when ``torch.cuda.is_available()``): single-process batched encoding on the GPU
    and the GPU/CPU patterns/s ratio; the same training as (1) on the GPU and its patterns/s
    against (1) on the CPU (all cores, and per core).

Usage: ``python scripts/bench_features.py [--dir /tmp/spndi-bench-features] [--pixels 16384]
[--block 16]``
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np


def _prepare(out: Path):
    from spndi_dask.config import load_manifest
    from spndi_dask.ingest import ingest
    from spndi_dask.particles import stats
    from spndi_dask.reduce import reduce
    from spndi_dask.simulate import preset, simulate_beamtime

    if not (out / "beamtime.toml").exists():
        simulate_beamtime(out, preset("demo"))
    m = load_manifest(out / "beamtime.toml")
    ingest(m)
    reduce(m)
    stats(m, figures=False)
    return m


def _tiled_patterns(m, root: Path, pixels: int):
    """A Zarr array of ``pixels`` real demo patterns (tiled), chunked like results.zarr."""
    import zarr
    from zarr.codecs import BloscCodec

    from spndi_dask.features._kernels import usable_patterns
    from spndi_dask.reduce import open_results

    path = root / "patterns.zarr"
    side = int(np.sqrt(pixels))
    ds = open_results(m.output_dir, "p1")
    n = ds["pattern"].shape[-1]
    if path.exists():
        arr = zarr.open_array(str(path), mode="r")
        if arr.shape[:2] == (side, side) and "blosc" in str(arr.compressors).lower():
            return arr, ds
    pats = ds["pattern"].values
    good = pats[usable_patterns(pats) & ds["valid"].values]
    arr = zarr.create_array(  # as results.zarr stores patterns
        str(path),
        shape=(side, side, n, n, n),
        chunks=(8, 8, n, n, n),
        dtype=np.float32,
        compressors=[BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")],
        overwrite=True,
    )
    idx = np.arange(side * side) % len(good)
    for r in range(0, side, 8):
        rows = idx[r * side : (r + 8) * side]
        arr[r : r + 8] = good[rows].reshape(-1, side, n, n, n)[: min(8, side - r)]
    return arr, ds


def _distributed(
    arr, ds, ckpt: str, n_workers: int, pin_threads: bool, block: int, pin_cores: bool = False
) -> float:
    import dask.array as da

    from spndi_dask.dask_clusters import start_client
    from spndi_dask.features.inference import ModelPlugin, latent_array, torch_threads
    from spndi_dask.worker_plugins import set_affinity

    mask = da.ones(arr.shape[:2], dtype=bool, chunks=(block, block))
    offsets = tuple(ds[d].values for d in ("dq_x", "dq_y", "dq_z"))
    with start_client(n_workers=n_workers, threads_per_worker=1) as client:
        threads = torch_threads(client)
        if not pin_cores:  # start_client pins worker i to core i: undo it
            client.run(set_affinity, set(os.sched_getaffinity(0)))
        if pin_threads:
            threads = dict.fromkeys(threads, 1)
        client.register_plugin(ModelPlugin(ckpt, "cpu", threads))
        lat = latent_array(
            arr, mask, ckpt, latent_dim=32, offsets=offsets, device="cpu", block=block
        )
        best = float("inf")
        for _ in range(2):  # the first run also warms the workers (imports, oneDNN kernels)
            t0 = time.perf_counter()
            lat.sum().compute()
            best = min(best, time.perf_counter() - t0)
        return best


def _single_process(arr, model, batch: int, limit: int | None = None) -> tuple[float, int]:
    import torch

    from spndi_dask.features._kernels import normalise_patterns

    ny = arr.shape[0]
    count = 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        for r in range(0, ny, 8):
            block = arr[r : r + 8].reshape(-1, *arr.shape[2:])
            if limit is not None:
                block = block[: max(0, limit - count)]
            for i in range(0, len(block), batch):
                x = torch.from_numpy(normalise_patterns(block[i : i + batch]))
                model.encode(x)
            count += len(block)
            if limit is not None and count >= limit:
                break
    return time.perf_counter() - t0, count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dir", default="/tmp/spndi-bench-features")
    ap.add_argument("--pixels", type=int, default=16384, help="patterns encoded (square scan)")
    ap.add_argument("--block", type=int, default=16, help="tile side of an encode task")
    args = ap.parse_args()

    import torch

    from spndi_dask.features import load_checkpoint, train
    from spndi_dask.features.inference import CPU_BATCH

    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    cores = len(os.sched_getaffinity(0))
    print(f"machine: {cores} cores, torch {torch.__version__}, CUDA {torch.cuda.is_available()}")
    m = _prepare(root / "demo")

    s = train(m, force=True, device="cpu")
    n_seen = s["epochs"] * (s["n_train"] + s["n_val"])
    print(
        f"(1) training conv3d on the demo: {s['n_train']} + {s['n_val']} patterns, "
        f"{s['epochs']} epochs, {s['seconds']:.1f} s ({n_seen / s['seconds']:.0f} patterns/s "
        f"incl. sampling and validation), device {s['device']}"
    )
    ckpt = s["checkpoint"]
    model, _ = load_checkpoint(ckpt)
    arr, ds = _tiled_patterns(m, root, args.pixels)
    n = arr.shape[0] * arr.shape[1]

    t1 = _distributed(arr, ds, ckpt, 1, pin_threads=True, block=args.block)
    t2 = _distributed(arr, ds, ckpt, 2, pin_threads=True, block=args.block)
    p1 = _distributed(arr, ds, ckpt, 1, pin_threads=True, block=args.block, pin_cores=True)
    p2 = _distributed(arr, ds, ckpt, 2, pin_threads=True, block=args.block, pin_cores=True)
    # (t: workers unpinned, as the OS schedules them; p: pinned one per core, spndi's default)
    t_auto = _distributed(arr, ds, ckpt, cores, pin_threads=False, block=args.block, pin_cores=True)
    torch.set_num_threads(cores)
    t_batch, _ = _single_process(arr, model, CPU_BATCH)
    t_loop, n_loop = _single_process(arr, model, 1, limit=min(n, 1024))
    rate_loop = n_loop / t_loop
    print(f"(2) conv3d inference on CPU, {n} patterns of {arr.shape[2]}³ from Zarr:")
    print(f"    {'setup':<52}{'patterns/s':>12}")
    rows = [
        ("dask, 1 worker x 1 thread (torch 1 thread)", n / t1),
        ("dask, 2 workers x 1 thread (torch 1 thread each)", n / t2),
        ("  the same, pinned one per core (default): 1 worker", n / p1),
        ("  the same, pinned one per core (default): 2 workers", n / p2),
        (f"dask, default sizing ({cores} workers, torch threads auto)", n / t_auto),
        (f"single process, batches of {CPU_BATCH}, torch {cores} threads", n / t_batch),
        (f"single process, per-pixel loop, torch {cores} threads", rate_loop),
    ]
    for label, rate in rows:
        print(f"    {label:<52}{rate:>12.0f}")
    print(
        f"    scaling 2 workers / 1 worker: {t1 / t2:.2f}; pinned, one core per worker: "
        f"{p1 / p2:.2f}   (goal >= 1.8)"
    )
    print(f"    dask default / single-process batched: {t_batch / t_auto:.2f}")
    print(f"    dask default / per-pixel loop: {(n / t_auto) / rate_loop:.1f}")
    if torch.cuda.is_available():
        gpu, _ = load_checkpoint(ckpt, device="cuda")
        from spndi_dask.features._kernels import normalise_patterns

        x = torch.from_numpy(normalise_patterns(arr[:8].reshape(-1, *arr.shape[2:]))).cuda()
        with torch.inference_mode():
            gpu.encode(x)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            reps = 20
            for _ in range(reps):
                gpu.encode(x)
            torch.cuda.synchronize()
        rate_gpu = reps * len(x) / (time.perf_counter() - t0)
        print(
            f"(3) GPU model throughput (on-device batches of {len(x)}): {rate_gpu:.0f} patterns/s"
        )
        print(f"    GPU / CPU single-process batched: {rate_gpu / (n / t_batch):.1f}")
        g = train(m, force=True, device="cuda")
        rate_train = g["epochs"] * (g["n_train"] + g["n_val"]) / g["seconds"]
        ratio = rate_train / (n_seen / s["seconds"])
        print(
            f"    training on the GPU ({torch.cuda.get_device_name()}): {g['epochs']} epochs, "
            f"{g['seconds']:.1f} s, {rate_train:.0f} patterns/s; GPU / CPU ({cores} cores): "
            f"{ratio:.1f}, GPU / one CPU core: {ratio * cores:.0f}"
        )
    else:
        print("(3) no CUDA GPU on this machine: GPU numbers not measured")


if __name__ == "__main__":
    main()
