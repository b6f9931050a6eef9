"""Benchmark ``spndi verify``: its speed beside a plain read of the same files, and what the
CRC32C checksums cost.

Measured side by side in one run on a freshly ingested and reduced output:

* files:   every file of ``raw.zarr`` and ``results.zarr`` read into memory (nothing decoded): the
           disk/page-cache speed any check is bounded by
* verify:  ``spndi verify`` (raw frames and patterns by their files and shard indexes)
* deep:    ``spndi verify --deep`` (every chunk decoded and checked)
* crc32c:  the checksums alone over the same bytes in memory, and their share of a deep verify

Usage: ``python scripts/bench_verify.py [--preset medium] [--dir /tmp/spndi-bench]``
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path


def _files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", default="medium")
    ap.add_argument("--dir", default="/tmp/spndi-bench")
    ap.add_argument("--repeat", type=int, default=3, help="best of N for each measurement")
    args = ap.parse_args()

    import google_crc32c

    from spndi_dask.config import Manifest, load_manifest
    from spndi_dask.ingest import ingest
    from spndi_dask.io.integrity import verify
    from spndi_dask.reduce import reduce
    from spndi_dask.simulate import preset, simulate_beamtime

    base = Path(args.dir) / args.preset
    if not (base / "beamtime.toml").exists():
        t0 = time.perf_counter()
        simulate_beamtime(base, preset(args.preset))
        print(f"simulated {args.preset} in {time.perf_counter() - t0:.1f} s")
    source = load_manifest(base / "beamtime.toml")
    out = base / "verify-bench"
    shutil.rmtree(out, ignore_errors=True)
    m = Manifest.from_dict(
        {**source.model_dump(mode="json", exclude_none=True), "output": str(out)},
        base_dir=source.base_dir,
        source=str(source.source),
    )
    t0 = time.perf_counter()
    ingest(m)
    reduce(m)
    print(f"ingested and reduced {args.preset} into {out} in {time.perf_counter() - t0:.1f} s")

    files = _files(m.layout.raw) + _files(m.layout.results)
    total = sum(f.stat().st_size for f in files)

    def best(fn):
        times = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    def read_files():
        for f in files:
            f.read_bytes()

    blobs = [f.read_bytes() for f in files]

    def crc_files():
        for b in blobs:
            google_crc32c.value(b)

    t_read = best(read_files)
    t_crc = best(crc_files)
    t_verify = best(lambda: verify(m, mark=False))
    t_deep = best(lambda: verify(m, deep=True, mark=False))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    mb = total / 1e6
    print(f"\noutput: {mb:.1f} MB in {len(files)} files (raw.zarr + results.zarr), {cores} cores")
    print(f"{'':28}{'seconds':>9}{'MB/s':>9}{'vs files':>10}")
    for name, t in (
        ("files (read only)", t_read),
        ("spndi verify", t_verify),
        ("spndi verify --deep", t_deep),
    ):
        print(f"{name:<28}{t:9.3f}{mb / t:9.0f}{t / t_read:9.1f}x")
    print(
        f"crc32c of every byte in memory: {t_crc:.3f} s ({mb / t_crc:.0f} MB/s), "
        f"{100 * t_crc / t_deep:.0f} % of a deep verify"
    )


if __name__ == "__main__":
    main()
