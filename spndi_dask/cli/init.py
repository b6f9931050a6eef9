"""``spndi init``: a commented beamtime manifest from a folder of raw scan files."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def add_init(sub: Any) -> None:
    """``spndi init``."""
    from spndi_dask import init as init_

    p = sub.add_parser(
        "init",
        help="write beamtime.toml from a folder of raw scan files (HDF5/TIFF per angle)",
        description="Inspect a folder of per-angle HDF5 files or TIFF stacks (angle files) and "
        "write a commented beamtime manifest: [[scans]] (one per sub-folder, or --group), angle "
        "files in acquisition order, the detector, monitor, XRF, mask and position datasets (found "
        "by name), the rocking angles, the scan grid and the geometry (from the files' metadata, "
        "else from the flags below). Prints what it found and every guess; anything ambiguous is "
        "an error naming the flag that settles it. Nothing is written until all is clear.",
        epilog="Dataset names looked for: spndi_dask.init.NAMES (README: Your own data).",
    )
    p.add_argument("raw_dir", metavar="RAW_DIR", help="folder of the raw scan files")
    p.add_argument(
        "-o", "--output", dest="manifest", default="beamtime.toml",
        help="manifest to write (default ./beamtime.toml; - prints it)",
    )  # fmt: skip
    p.add_argument("--force", action="store_true", help="replace an existing manifest")
    g = p.add_argument_group("files and scans")
    g.add_argument("--name", help="beamtime name (default: the folder's name)")
    g.add_argument("--results", default="results", help="output folder beside the manifest")
    g.add_argument(
        "--group",
        metavar="REGEX",
        help=r"scan = named group of REGEX in each angle file's path, e.g. "
        r"'(?P<scan>p\d+)_scan' (old name: (?P<particle>...); default: one scan per folder)",
    )
    g.add_argument(
        "--exclude",
        metavar="GLOB",
        action="append",
        default=[],
        help="leave out files or folders matching GLOB (repeatable)",
    )
    g.add_argument(
        "--no-split",
        dest="split",
        action="store_false",
        help="every file is an angle file of its own (no folders of split angle files)",
    )
    g.add_argument(
        "--sort",
        choices=["auto", "id", "angle"],
        default="auto",
        help="order of the angle files: the scan number in their names, else the recorded angle "
        "(auto); or id, angle",
    )
    g = p.add_argument_group("datasets (found by name; give PATH, or none to leave one out)")
    g.add_argument("--dataset", metavar="PATH", help="detector frames")
    g.add_argument("--monitor", metavar="PATH|none", help="per-point incident flux")
    g.add_argument("--xrf", metavar="PATH|none", help="per-point XRF map or spectra")
    g.add_argument("--mask-dataset", metavar="PATH|none", help="detector pixel mask")
    g.add_argument(
        "--positions",
        metavar="Y_PATH,X_PATH|none",
        type=init_.parse_positions,
        help="recorded per-point positions, slow (row) axis first",
    )
    g.add_argument("--positions-units", choices=["um", "nm", "mm"], help="default: units attr")
    g.add_argument(
        "--names",
        metavar="KEY=a,b",
        action="append",
        default=[],
        type=init_.parse_names,
        help="names to look for (KEY+=a,b adds to the list); "
        f"KEY: {', '.join([*init_.NAMES, 'positions'])}",
    )
    g.add_argument(
        "--xrf-window",
        dest="xrf_window_kev",
        metavar="LOW:HIGH",
        type=init_.parse_window,
        help="keV window summed from XRF spectra",
    )
    g.add_argument(
        "--xrf-calibration",
        metavar="OFFSET:GAIN",
        type=init_.parse_window,
        help="keV of bin 0 : keV per bin of the XRF spectra",
    )
    g.add_argument("--xrf-energy", metavar="PATH", help="the XRF bins' energies (keV)")
    g = p.add_argument_group("angles and scan grid (when the files do not record them)")
    g.add_argument("--angle-path", metavar="PATH|GROUP@ATTR", help="where the rocking angle is")
    g.add_argument(
        "--angles",
        metavar="START:STOP:NUM",
        type=init_.parse_angles,
        help="rocking angles of every [[scans]] entry (degrees)",
    )
    g.add_argument("--scan-shape", metavar="R,C", type=init_.parse_shape, help="scan rows, cols")
    g.add_argument(
        "--step",
        dest="step_um",
        metavar="Y,X",
        type=init_.parse_step,
        help="scan step in µm (row, column)",
    )
    g.add_argument("--scan-order", choices=["raster", "snake"], help="default raster")
    g.add_argument(
        "--allow-incomplete",
        action="store_true",
        help="angle files with fewer points were aborted: fill and mask the rest",
    )
    g = p.add_argument_group("geometry (when the files do not record it)")
    g.add_argument(
        "--energy-kev", metavar="KEV", type=init_.parse_positive, help="photon energy (keV)"
    )
    g.add_argument(
        "--distance-m", metavar="M", type=init_.parse_positive, help="sample-detector distance"
    )
    g.add_argument(
        "--pixel-size-m", metavar="M", type=init_.parse_positive, help="detector pixel pitch"
    )
    g.add_argument(
        "--beam-center",
        metavar="ROW,COL",
        type=init_.parse_pair,
        help="pixel on the detector-arm axis",
    )
    g.add_argument("--gamma-deg", metavar="DEG", type=float, help="detector arm yaw about +y")
    g.add_argument("--delta-deg", metavar="DEG", type=float, help="detector arm elevation about -x")
    g.add_argument(
        "--rocking-axis",
        choices=["x+", "x-", "y+", "y-", "z+", "z-"],
        help="sample rotation axis (default y+)",
    )
    g.add_argument(
        "--saturation",
        metavar="COUNTS",
        type=init_.parse_positive,
        help="[reduce] saturation (default: the files' saturation_value, else the dtype maximum)",
    )
    p.set_defaults(func=_cmd_init)


def _cmd_init(args: argparse.Namespace) -> int:
    """``spndi init``: print what was found, then write the manifest (or print it with -o -)."""
    from dataclasses import fields

    from spndi_dask.init import InitError, InitOptions, init_manifest

    given = {f.name: getattr(args, f.name) for f in fields(InitOptions) if hasattr(args, f.name)}
    options = InitOptions(**{k: tuple(v) if isinstance(v, list) else v for k, v in given.items()})
    to_stdout = args.manifest == "-"
    try:
        result = init_manifest(
            args.raw_dir,
            manifest="beamtime.toml" if to_stdout else args.manifest,
            options=options,
            force=args.force or to_stdout,
        )
        if to_stdout:
            print(result.report.format(), file=sys.stderr)
            print(result.text, end="")
            return 0
        print(result.report.format())
        path = result.write(force=args.force)
    except InitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"\nmanifest: {path}\nnext: check it and the guesses above, then `spndi run {path}`")
    return 0
