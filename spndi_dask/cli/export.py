"""``spndi export tiff|nexus|mat|ply``: results in the formats users open elsewhere
(:mod:`spndi_dask.export`, :func:`spndi_dask.features.ply.export_ply`); ``spndi export-ply`` is
the older name of ``spndi export ply``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from spndi_dask.cli.common import _add_scans_arg, _manifest_parser

_FORMATS = {
    "tiff": "maps and mean cluster/domain/boundary patterns as ImageJ hyperstacks (Fiji, Avizo)",
    "nexus": "maps as NeXus NXdata in one HDF5 file (DAWN, silx)",
    "mat": "maps as MATLAB .mat files",
}


def _ply_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("particle", metavar="scan", help="scan name")
    p.add_argument(
        "--pixel", nargs=2, type=int, action="append", metavar=("Y", "X"), help="scan pixel"
    )
    p.add_argument("--label", type=int, action="append", help="mean pattern of this label")
    p.add_argument("--threshold", type=float, default=0.05, help="fraction of the max (0.05)")
    p.add_argument("-o", "--out", help="directory (default <output>/ply)")
    p.set_defaults(func=_cmd_export_ply)


def add_export(sub: Any) -> None:
    """``spndi export FORMAT MANIFEST``."""
    p = sub.add_parser(
        "export",
        help="results -> TIFF, NeXus, .mat or PLY files",
        description="Write the results in other programs' formats, under <output>/export "
        "(PLY: <output>/ply) unless --out is given.",
    )
    formats = p.add_subparsers(dest="format", required=True, metavar="FORMAT")
    for name, what in _FORMATS.items():
        f = _manifest_parser(formats, name, help=what, description=what)
        _add_scans_arg(f)
        f.add_argument("-o", "--out", help="directory (default <output>/export)")
        f.set_defaults(func=_cmd_export)
    _ply_arguments(
        _manifest_parser(
            formats,
            "ply",
            help="patterns -> PLY point clouds (1/Å coordinates + intensity)",
            description="Write per-pixel or particle-mean 3D patterns of a scan as PLY point "
            "clouds (crystal-frame q offsets in 1/Å, intensity property).",
        )
    )


def add_export_ply(sub: Any) -> None:
    """``spndi export-ply``: the older name of ``spndi export ply`` (deprecated)."""
    _ply_arguments(
        _manifest_parser(
            sub,
            "export-ply",
            help="deprecated: use `spndi export ply`",
            description="Deprecated name of `spndi export ply` (same arguments).",
        )
    )


def _cmd_export(args: argparse.Namespace) -> int:
    from spndi_dask import export
    from spndi_dask.config import load_manifest

    manifest = load_manifest(args.manifest)
    write = {"tiff": export.export_tiff, "nexus": export.export_nexus, "mat": export.export_mat}
    try:
        paths = write[args.format](manifest, scans=args.scans, out_dir=args.out)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for p in paths if isinstance(paths, list) else [paths]:
        print(p)
    return 0


def _cmd_export_ply(args: argparse.Namespace) -> int:
    from spndi_dask.config import load_manifest
    from spndi_dask.features.ply import export_ply

    if args.command == "export-ply":
        print("note: `spndi export-ply` is now `spndi export ply`", file=sys.stderr)
    manifest = load_manifest(args.manifest)
    if not args.pixel and not args.label:
        print("error: give --pixel Y X and/or --label L", file=sys.stderr)
        return 2
    try:
        paths = export_ply(
            manifest,
            args.particle,
            pixels=[tuple(p) for p in args.pixel or []],
            labels=args.label,
            threshold=args.threshold,
            out_dir=args.out,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for p in paths:
        print(p)
    return 0
