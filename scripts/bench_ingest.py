"""Benchmark ingest: throughput vs a plain h5py read, compression, worker memory, chunk layouts.

Everything is measured side by side in one run on the same LocalCluster:

* read:   every angle file read and decompressed with h5py by the same workers (nothing written)
* ingest: ``spndi_dask.ingest.ingest`` of the same files into a fresh ``raw.zarr``
* ratio:  ingest time / read time, compression ratios, peak RSS per worker for each phase
* layouts: candidate (scan chunk, detector chunk, codec) layouts for a subset of angles, each
  written and then read the way ``reduce`` reads (all angles of a scan tile, a detector ROI).

Usage: ``python scripts/bench_ingest.py [--preset medium] [--dir /tmp/spndi-bench]``
"""

from __future__ import annotations

import argparse
import resource
import shutil
import time
from pathlib import Path

import numpy as np

from spndi_dask.io.layout import disk_usage


def _read_file(path: str, dataset: str) -> int:
    import h5py
    import hdf5plugin  # noqa: F401

    with h5py.File(path, "r") as f:
        return int(f[dataset][:].nbytes)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reduce_like_read(frames_url: str, ys: slice, xs: slice, roi: tuple[slice, slice]) -> float:
    import zarr

    arr = zarr.open_array(frames_url, mode="r")
    return float(arr[:, ys, xs, roi[0], roi[1]].sum(dtype=np.float64))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", default="medium")
    ap.add_argument("--dir", default="/tmp/spndi-bench")
    ap.add_argument("--layout-angles", type=int, default=8, help="angles in the layout study")
    args = ap.parse_args()

    from distributed import Client, LocalCluster

    from spndi_dask.config import Manifest, load_manifest
    from spndi_dask.dask_clusters import local_cluster_size
    from spndi_dask.ingest import ingest
    from spndi_dask.simulate import preset, simulate_beamtime

    out = Path(args.dir) / args.preset
    n, t, mem = local_cluster_size()
    with (
        LocalCluster(
            n_workers=n, threads_per_worker=t, memory_limit=mem, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        if not (out / "beamtime.toml").exists():
            t0 = time.perf_counter()
            simulate_beamtime(out, preset(args.preset))
            print(f"simulated {args.preset} in {time.perf_counter() - t0:.1f} s")
        m = load_manifest(out / "beamtime.toml")
        files = [str(p) for part in m.scans for p in part.frame_paths(m.base_dir)]
        raw_bytes = preset(args.preset).raw_bytes
        h5_bytes = sum(Path(f).stat().st_size for f in files)

        client.restart()
        t0 = time.perf_counter()
        nbytes = sum(
            client.gather(
                client.map(_read_file, files, [m.scans[0].dataset] * len(files), pure=False)
            )
        )
        t_read = time.perf_counter() - t0
        rss_read = max(client.run(_peak_rss_mb).values())
        assert nbytes == raw_bytes

        shutil.rmtree(m.layout.raw, ignore_errors=True)
        client.restart()
        t0 = time.perf_counter()
        ingest(m)
        t_ingest = time.perf_counter() - t0
        rss_ingest = max(client.run(_peak_rss_mb).values())
        zarr_bytes = disk_usage(m.layout.raw)

        print(
            f"\n== ingest, preset {args.preset}: {len(files)} files, {raw_bytes / 1e9:.2f} GB raw,"
            f" {n} workers × {t} thread"
        )
        print(f"plain h5py read      {t_read:8.1f} s  {raw_bytes / t_read / 1e6:8.0f} MB/s")
        print(f"ingest               {t_ingest:8.1f} s  {raw_bytes / t_ingest / 1e6:8.0f} MB/s")
        print(f"ratio ingest / read  {t_ingest / t_read:8.2f}")
        print(
            f"compression: raw/HDF5(bitshuffle-lz4) {raw_bytes / h5_bytes:6.1f}×   "
            f"raw/Zarr {raw_bytes / zarr_bytes:6.1f}×   Zarr/HDF5 {zarr_bytes / h5_bytes:5.2f}"
        )
        print(f"peak RSS per worker: read {rss_read:.0f} MB, ingest {rss_ingest:.0f} MB")

        # -- layout study: a subset of angles, written then read like reduce ------------------
        p = m.scans[0]
        sub = Manifest.from_dict(
            {
                **m.to_dict(),
                "output": str(out / "layouts"),
                "scans": [
                    {
                        **p.model_dump(mode="json"),
                        "frames": [str(x) for x in p.frame_paths(m.base_dir)[: args.layout_angles]],
                        "angles_deg": [float(a) for a in p.angles[: args.layout_angles]],
                    }
                ],
            },
            base_dir=out,
        )
        nr, nc = preset(args.preset).detector_shape
        roi = (slice(nr // 2 - 24, nr // 2 + 24), slice(nc // 2 - 24, nc // 2 + 24))
        candidates = [
            ("scan 8x8, det 32x32, lz4 (default)", [8, 8], [32, 32], "lz4", 5),
            ("scan 8x8, det 64x64, lz4", [8, 8], [64, 64], "lz4", 5),
            ("scan 16x16, det whole, lz4", [16, 16], [nr, nc], "lz4", 5),
            ("scan 4x4, det 64x64, lz4", [4, 4], [64, 64], "lz4", 5),
            ("scan 8x8, det 64x64, zstd-3", [8, 8], [64, 64], "zstd", 3),
        ]
        print(
            f"\n== layouts ({args.layout_angles} angles of {p.name}; reduce-like read = all angles"
            f" of each 16×16 scan tile, 48×48 ROI)"
        )
        print(f"{'layout':<36}{'write s':>9}{'read s':>9}{'MB':>8}")
        for label, sc, dc, comp, lvl in candidates:
            cfg = Manifest.from_dict(
                {
                    **sub.to_dict(),
                    "ingest": {
                        **sub.ingest.model_dump(mode="json"),
                        "scan_chunk": sc,
                        "detector_chunk": dc,
                        "scan_shard": [16, 16],
                        "compressor": comp,
                        "clevel": lvl,
                    },
                },
                base_dir=out,
            )
            shutil.rmtree(cfg.layout.raw, ignore_errors=True)
            t0 = time.perf_counter()
            ingest(cfg)
            t_w = time.perf_counter() - t0
            url = str(cfg.layout.raw / p.name / "frames")
            ny, nx = p.scan_shape
            tiles = [
                (slice(y, y + 16), slice(x, x + 16))
                for y in range(0, ny, 16)
                for x in range(0, nx, 16)
            ]
            t0 = time.perf_counter()
            client.gather(
                client.map(
                    _reduce_like_read,
                    [url] * len(tiles),
                    [a for a, _ in tiles],
                    [b for _, b in tiles],
                    [roi] * len(tiles),
                    pure=False,
                )
            )
            t_r = time.perf_counter() - t0
            print(f"{label:<36}{t_w:9.2f}{t_r:9.2f}{disk_usage(cfg.layout.raw) / 1e6:8.1f}")


if __name__ == "__main__":
    main()
