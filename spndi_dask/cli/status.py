"""``spndi status`` and ``spndi verify``: what is done and what is damaged."""

from __future__ import annotations

import argparse
from contextlib import nullcontext
from typing import Any

from spndi_dask.cli.common import _add_scans_arg, _manifest_parser
from spndi_dask.stages import stage as stage_info


def add_status(sub: Any) -> None:
    """``spndi status``."""
    p = _manifest_parser(
        sub,
        "status",
        help="per scan and stage: done, stale, failed or not run",
        description="Show per scan and stage what is done, stale (an input changed "
        "since), failed (in the last run) or not run, from the outputs alone.",
    )
    p.add_argument(
        "--verify",
        action="store_true",
        help="also check the stored chunks (the cheap form of `spndi verify`; marks nothing)",
    )
    p.set_defaults(func=_cmd_status)


def add_verify(sub: Any) -> None:
    """``spndi verify``."""
    p = _manifest_parser(
        sub,
        "verify",
        help="check every stored chunk against its checksum; mark damage to be recomputed",
        description="Read every chunk of raw.zarr, results.zarr and analysis.zarr and check it "
        "against its CRC32C checksum (the raw frames and the patterns by their files and shard "
        "indexes unless --deep). Damage is reported per scan and stage and marked as not "
        "done, so that the next `spndi run` recomputes only what is damaged. Exit status 1 when "
        "damage was found.",
    )
    p.add_argument(
        "--deep", action="store_true", help="also decode every chunk of the frames and patterns"
    )
    p.add_argument("--report-only", action="store_true", help="report damage without marking it")
    _add_scans_arg(p)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_cmd_verify)


def _cmd_status(args: argparse.Namespace) -> int:
    from spndi_dask.config import load_manifest
    from spndi_dask.status import STATUS_STAGES, lock_note, scan_status

    manifest = load_manifest(args.manifest)
    table = scan_status(manifest)
    if args.verify:
        from spndi_dask.io.integrity import verify
        from spndi_dask.status import with_damage

        table = with_damage(table, verify(manifest, mark=False).damage)
    print(f"{manifest.name}: {manifest.output_dir}")
    print(f"{'scan':<16}" + "".join(f"{stage_info(s).label:<11}" for s in STATUS_STAGES))
    notes = []
    for name, stages in table.items():
        print(f"{name:<16}" + "".join(f"{state:<11}" for state, _ in stages.values()))
        notes += [f"  {name} {stage_info(s).label}: {n}" for s, (_, n) in stages.items() if n]
    print("\n".join(notes))
    lock = lock_note(manifest.output_dir)
    if lock:
        print(lock)
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    import json

    from spndi_dask.config import load_manifest
    from spndi_dask.io.integrity import describe, verify
    from spndi_dask.io.lock import output_lock

    manifest = load_manifest(args.manifest)
    mark = not args.report_only
    lock = output_lock(manifest.output_dir) if mark else nullcontext()
    with lock:
        report = verify(manifest, deep=args.deep, mark=mark, scans=args.scans)
    if args.json:
        print(json.dumps(report.to_dict(), indent=1))
        return 0 if report.ok else 1
    mode = "deep: every chunk decoded" if args.deep else "frames and patterns by file and index"
    print(
        f"{manifest.name}: {manifest.output_dir} ({mode})\n"
        f"checked {report.arrays} arrays, {report.bytes / 1e6:.1f} MB in {report.seconds:.2f} s "
        f"({report.mb_per_s:.0f} MB/s)"
    )
    if report.ok:
        print("no damage found")
        return 0
    print(f"\n{'scan':<16}{'stage':<10}damage")
    for particle, stages in report.by_particle().items():
        for stage, items in stages.items():
            for d in items:
                print(f"{particle:<16}{stage:<10}{d.where()}: {d.reason}")
    if report.marked:
        print("\nmarked to be recomputed:\n  " + "\n  ".join(report.marked))
        print(f"`spndi run {manifest.source}` recomputes only what is damaged")
    else:
        print(f"\n{describe(report.damage, str(manifest.source))}")
    return 1
