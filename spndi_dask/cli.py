"""``spndi`` command line: argument parsing and console output only."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path
from typing import Any

from spndi_dask._version import __version__
from spndi_dask.interrupt import Interrupted, at_forced_exit, deferred, handle_signals, received
from spndi_dask.io.layout import OutputLayout
from spndi_dask.stages import STAGE_NAMES, STAGES, Outcome, Stage, StageError, parse_stages
from spndi_dask.stages import stage as stage_info

__all__ = ["main"]

logger = logging.getLogger(__name__)


def _add_cluster_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cluster")
    g.add_argument(
        "--cluster",
        metavar="NAME|FILE|ADDRESS",
        help="cluster config: local (default), slurm, slurm-gpu, pbs, mpi or one of yours, a "
        "YAML file, or a running scheduler's address tcp://host:port",
    )
    g.add_argument("--scheduler", dest="cluster", help=argparse.SUPPRESS)  # the old name
    g.add_argument(
        "--workers", type=int, help="LocalCluster workers (default: cores); SLURM/PBS: jobs"
    )
    g.add_argument("--threads-per-worker", type=int, help="threads per worker (default: 1)")


def _manifest_parser(sub: Any, name: str, **kwargs: Any) -> argparse.ArgumentParser:
    """A subcommand whose first argument is the beamtime manifest."""
    p = sub.add_parser(name, **kwargs)
    p.add_argument("manifest", help="beamtime TOML manifest, or the folder holding it")
    return p


# options a stage's subcommand may have (Stage.options), each added the same way everywhere
_STAGE_OPTIONS: dict[str, Callable[[argparse.ArgumentParser], Any]] = {
    "checkpoint": lambda p: p.add_argument(
        "--checkpoint", help="default: [features] checkpoint or <output>/features/model"
    ),
    "device": lambda p: p.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], help="default: [features] device"
    ),
    "k": lambda p: p.add_argument("-k", type=int, help="number of clusters (default: [cluster] k)"),
    "boundary_width": lambda p: p.add_argument(
        "--boundary-width", type=float, default=1.0, help="scan pixels from another cluster (1)"
    ),
    "figures": lambda p: p.add_argument("--no-figures", action="store_true", help="skip figures"),
}


def _stage_parser(sub: Any, info: Stage) -> argparse.ArgumentParser:
    """The subcommand of one stage of the table (``spndi <stage> beamtime.toml ...``)."""
    p = _manifest_parser(sub, info.name, help=info.help, description=info.description)
    if info.name == "report":
        return p
    p.add_argument("--particles", nargs="+", metavar="NAME", help="only these particle scans")
    for option in info.options:
        _STAGE_OPTIONS[option](p)
    p.add_argument("--force", action="store_true", help="redo even what is up to date")
    _add_cluster_args(p)
    return p


def _add_run_args(p: argparse.ArgumentParser, demo: bool = False) -> None:
    p.add_argument(
        "--stages",
        nargs="+",
        metavar="STAGE",
        help=f"only these stages ({', '.join(STAGE_NAMES)}; ranges like reduce-encode; "
        "default all)",
    )
    if not demo:
        p.add_argument("--particles", nargs="+", metavar="NAME", help="only these particles")
        p.add_argument("--force", action="store_true", help="redo stages even if up to date")
        p.add_argument("--checkpoint", help="use this trained model (skips train)")
        p.add_argument("-k", type=int, help="number of clusters (default: [cluster] k)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default: [features] device")
    p.add_argument("--no-figures", action="store_true", help="skip the figures")
    p.add_argument(
        "--no-performance-report",
        action="store_true",
        help="do not record dask's performance report (logs/run-*-dask.html)",
    )


def _add_simulation_args(p: argparse.ArgumentParser, presets: dict[str, Any]) -> None:
    p.add_argument("--preset", default="demo", choices=list(presets), help="simulation size")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    _add_cluster_args(p)


def _parser() -> argparse.ArgumentParser:
    from spndi_dask.simulate import PRESETS

    parser = argparse.ArgumentParser(
        prog="spndi",
        description="Scanning probe nano-diffraction beamtimes: ingest raw frames into Zarr, "
        "reduce them to strain and tilt maps, and cluster lattice defects with dask.",
    )
    parser.add_argument("--version", action="version", version=f"spndi_dask {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "demo",
        help="simulate a beamtime and run every stage on it",
        description="Simulate a small multi-particle beamtime (beamline HDF5 layout) and run "
        "every available stage on it on a LocalCluster.",
    )
    p.add_argument("out", nargs="?", default="spndi-demo", help="directory (default: spndi-demo)")
    _add_run_args(p, demo=True)
    _add_simulation_args(p, PRESETS)

    p = _manifest_parser(
        sub,
        "run",
        help="every stage for every particle: ingest ... analyze, report",
        description="Run the whole pipeline on a beamtime under one dask client: ingest, "
        "reduce, stats, train (or --checkpoint), encode, cluster, analyze, report. Up-to-date "
        "results are kept; a summary table, a run log and dask's performance report are written.",
    )
    _add_run_args(p)
    _add_cluster_args(p)

    from spndi_dask import init as init_

    p = sub.add_parser(
        "init",
        help="write beamtime.toml from a folder of raw scan files (HDF5/TIFF per angle)",
        description="Inspect a folder of per-angle (per-scan) HDF5 files or TIFF stacks and write "
        "a commented beamtime manifest: particles (one per sub-folder, or --group), angle files "
        "in scan order, the detector, monitor, XRF, mask and position datasets (found by name), "
        "the rocking angles, the scan grid and the geometry (from the files' metadata, else from "
        "the flags below). Prints what it found and every guess; anything ambiguous is an error "
        "naming the flag that settles it. Nothing is written until all is clear.",
        epilog="Dataset names looked for: spndi_dask.init.NAMES (README: Your own data).",
    )
    p.add_argument("raw_dir", metavar="RAW_DIR", help="folder of the raw scan files")
    p.add_argument(
        "-o", "--output", dest="manifest", default="beamtime.toml",
        help="manifest to write (default ./beamtime.toml; - prints it)",
    )  # fmt: skip
    p.add_argument("--force", action="store_true", help="replace an existing manifest")
    g = p.add_argument_group("files and particles")
    g.add_argument("--name", help="beamtime name (default: the folder's name)")
    g.add_argument("--results", default="results", help="output folder beside the manifest")
    g.add_argument(
        "--group",
        metavar="REGEX",
        help=r"particle = named group of REGEX in each "
        r"scan's path, e.g. '(?P<particle>p\d+)_scan' (default: one per folder)",
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
        help="every file is a scan of its own (no folders of split scans)",
    )
    g.add_argument(
        "--sort",
        choices=["auto", "id", "angle"],
        default="auto",
        help="scan order: scan number, else recorded angle (auto); or id, angle",
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
        help="rocking angles of every particle (degrees)",
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
        help="scans with fewer points were aborted: fill and mask the rest",
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

    p = sub.add_parser(
        "simulate",
        help="write a simulated beamtime (HDF5 per angle, beamtime.toml, ground truth)",
        description="Write a physics-based simulated beamtime with ground truth.",
    )
    p.add_argument("out", help="output directory")
    p.add_argument("--particles", type=int, help="number of particles (default: preset)")
    _add_simulation_args(p, PRESETS)

    for info in STAGES:
        if info.name != "report":
            _stage_parser(sub, info)
    p = _manifest_parser(
        sub,
        "status",
        help="per particle and stage: done, stale, failed or not run",
        description="Show per particle scan and stage what is done, stale (an input changed "
        "since), failed (in the last run) or not run, from the outputs alone.",
    )
    p.add_argument(
        "--verify",
        action="store_true",
        help="also check the stored chunks (the cheap form of `spndi verify`; marks nothing)",
    )

    p = _manifest_parser(
        sub,
        "verify",
        help="check every stored chunk against its checksum; mark damage to be recomputed",
        description="Read every chunk of raw.zarr, results.zarr and analysis.zarr and check it "
        "against its CRC32C checksum (the raw frames and the patterns by their files and shard "
        "indexes unless --deep). Damage is reported per particle and stage and marked as not "
        "done, so that the next `spndi run` recomputes only what is damaged. Exit status 1 when "
        "damage was found.",
    )
    p.add_argument(
        "--deep", action="store_true", help="also decode every chunk of the frames and patterns"
    )
    p.add_argument("--report-only", action="store_true", help="report damage without marking it")
    p.add_argument("--particles", nargs="+", metavar="NAME", help="only these particles")
    p.add_argument("--json", action="store_true", help="print the report as JSON")

    _stage_parser(sub, stage_info("report"))

    p = _manifest_parser(
        sub,
        "export-ply",
        help="patterns -> PLY point clouds (1/Å coordinates + intensity)",
        description="Write per-pixel or particle-mean 3D patterns of a scan as PLY point clouds "
        "(crystal-frame q offsets in 1/Å, intensity property).",
    )
    p.add_argument("particle", help="particle scan name")
    p.add_argument(
        "--pixel", nargs=2, type=int, action="append", metavar=("Y", "X"), help="scan pixel"
    )
    p.add_argument("--label", type=int, action="append", help="mean pattern of this label")
    p.add_argument("--threshold", type=float, default=0.05, help="fraction of the max (0.05)")
    p.add_argument("-o", "--out", help="directory (default <output>/ply)")

    from spndi_dask.explorer.cli import add_view_parser

    add_view_parser(sub)
    return parser


def _setup_logging(verbose: int, quiet: bool) -> None:
    """Our messages at INFO (DEBUG with -vv); dask's own only from WARNING (INFO with -vv)."""
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(
        level=logging.INFO if verbose > 1 else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        force=True,
    )
    logging.getLogger("spndi_dask").setLevel(level)
    if verbose < 2:
        import distributed  # noqa: F401  (creates its loggers with their own levels)

        for name in list(logging.root.manager.loggerDict):
            if name.split(".")[0] in ("distributed", "tornado", "bokeh"):
                logging.getLogger(name).setLevel(logging.ERROR)


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


@contextmanager
def _session(args: argparse.Namespace) -> Iterator[Any]:
    """The command's cluster; Ctrl-C is this process's to handle, not its local workers'.

    A signal while a LocalCluster starts is raised once it is up (a second or two): one
    stopped half-way fails distributed's own close at exit with a traceback.
    """
    from spndi_dask.dask_clusters import load_cluster_config, open_cluster
    from spndi_dask.worker_plugins import IgnoreInterrupts

    local = load_cluster_config(args.cluster).type == "local"
    with ExitStack() as stack:
        with deferred() if local else nullcontext():
            session = stack.enter_context(
                open_cluster(
                    args.cluster,
                    n_workers=args.workers,
                    threads_per_worker=args.threads_per_worker,
                )
            )
            session.client.register_plugin(IgnoreInterrupts(os.getpid()))
        yield session


@contextmanager
def _locked(output_dir: Path) -> Iterator[Path]:
    """Hold the output's lock; a forced exit (a second signal) still removes it."""
    from spndi_dask.io.lock import output_lock, read_lock

    with output_lock(output_dir) as path:

        def release() -> None:
            if (read_lock(output_dir) or {}).get("pid") == os.getpid():
                path.unlink(missing_ok=True)

        with at_forced_exit(release):
            yield path


@contextmanager
def _client(args: argparse.Namespace) -> Iterator[Any]:
    with _session(args) as session:
        print(f"dask dashboard: {session.client.dashboard_link}")
        yield session.client


def _print_table(summary: dict[str, dict[str, Any]], columns: dict[str, tuple[Any, int]]) -> None:
    """One row per particle: name, status and ``columns``.

    ``columns`` maps a header to ``(summary key or function of the summary, width)``; width 0
    is a last free-width column.
    """

    def cell(text: Any, width: int) -> str:
        return f"{text!s:>{width}}" if width else f"  {text}"

    print(
        f"\n{'particle':<16}{'status':<14}" + "".join(cell(h, w) for h, (_, w) in columns.items())
    )
    for name, s in summary.items():
        cells = "".join(
            cell(get(s) if callable(get) else s.get(get, ""), w) for get, w in columns.values()
        )
        print(f"{name:<16}{s['status']:<14}{cells}")
        for w in s.get("warnings", []):
            print(f"  warning: {w}")
        for key in ("warning", "error"):
            if key in s:
                print(f"  {key}: {s[key]}")


def _print_ingest(summary: dict[str, dict[str, Any]], out: OutputLayout) -> None:
    _print_table(
        summary,
        {
            "angles": (lambda s: s.get("angles_written", 0), 8),
            "raw GB": (lambda s: f"{s.get('raw_bytes', 0) / 1e9:.3f}", 10),
        },
    )
    print(f"raw.zarr: {out.raw} ({_du(out.raw) / 1e6:.1f} MB on disk)")


def _print_reduce(summary: dict[str, dict[str, Any]], out: OutputLayout) -> None:
    _print_table(
        summary,
        {
            "valid px": ("valid_pixels", 9),
            "drift": ("drift_method", 11),
            "seconds": ("seconds", 9),
            "ROI": ("roi", 0),
        },
    )
    print(f"results: {out.results} (open with xarray.open_datatree(path, engine='zarr'))")


def _print_stats(summary: dict[str, dict[str, Any]], out: OutputLayout) -> None:
    _print_table(summary, {"labels": ("labels", 7), "method": ("method", 0)})
    print(f"table: {out.particles_csv}\nfigures: {out.figures}")


def _print_epoch(row: dict[str, Any]) -> None:
    print(
        f"  epoch {row['epoch']:>3}/{row['max_epochs']}  train {row['train_loss']:.4g}  "
        f"validation {row['val_loss']:.4g}  ({row['seconds']:.1f} s)",
        flush=True,
    )


def _print_train(s: dict[str, Any], out: OutputLayout) -> None:
    if s["status"] == Outcome.UP_TO_DATE:
        print(f"model up to date: {s['checkpoint']}")
        return
    if s["status"] == Outcome.NOT_NEEDED:
        print(f"training not needed: {s.get('note', '')}")
        return
    print(
        f"trained on {s['n_train']} patterns (+{s['n_val']} validation), {s['epochs']} epochs, "
        f"best validation loss {s['best_val_loss']:.4g} at epoch {s['best_epoch']}, "
        f"{s['seconds']} s on {s['device']}\ncheckpoint: {s['checkpoint']}"
    )


def _print_encode(summary: dict[str, dict[str, Any]], out: OutputLayout) -> None:
    _print_table(summary, {"pixels": ("pixels", 8), "seconds": ("seconds", 9)})


def _print_cluster(s: dict[str, Any], out: OutputLayout) -> None:
    if s["status"] == Outcome.UP_TO_DATE:
        print(f"clusters up to date (K = {s['k']})")
        return
    sil = s.get("silhouette", {})
    print(
        f"K = {s['k']} ({s['k_source']}), inertia {s['inertia']:.4g}"
        + (f", silhouette {sil[s['k']]:.3f}" if s["k"] in sil else "")
        + f", {sum(s['pixels'].values())} pixels, {s['seconds']} s"
    )
    print(f"\n{'particle':<16}{'pixels':>8}")
    for name, n in s["pixels"].items():
        print(f"{name:<16}{n:>8}")
    for w in s.get("warnings", []):
        print(f"  warning: {w}")
    print(f"table: {out.clusters_csv}\nfigures: {out.figures}")


def _print_analyze(s: dict[str, Any], out: OutputLayout) -> None:
    print(f"\n{'particle':<16}{'domain px':>10}{'boundary px':>12}")
    for name, (dom, bnd) in s["regions"].items():
        print(f"{name:<16}{dom:>10}{bnd:>12}")
    print(f"analysis: {s['analysis']}\ntable: {s['table']}")


# the console summary of each stage of the table but report
_PRINTERS: dict[str, Callable[[Any, OutputLayout], None]] = {
    "ingest": _print_ingest,
    "reduce": _print_reduce,
    "stats": _print_stats,
    "train": _print_train,
    "encode": _print_encode,
    "cluster": _print_cluster,
    "analyze": _print_analyze,
}


def _run_options(args: argparse.Namespace, **extra: Any) -> Any:
    """The pipeline's RunOptions from a command's arguments (those it has)."""
    from spndi_dask.pipeline import RunOptions

    return RunOptions(
        particles=getattr(args, "particles", None),
        force=getattr(args, "force", False),
        checkpoint=getattr(args, "checkpoint", None),
        device=getattr(args, "device", None),
        k=getattr(args, "k", None),
        boundary_width=getattr(args, "boundary_width", 1.0),
        figures=not getattr(args, "no_figures", False),
        on_epoch=_print_epoch,
        **extra,
    )


def _cmd_stage(args: argparse.Namespace) -> int:
    """``spndi <stage>``: one stage of the pipeline on the command's client, then its summary.

    Exit code 1 when the stage failed for a particle scan (the others are done); a stage that
    refuses its input raises a StageError, which :func:`main` prints with exit code 2.
    """
    from spndi_dask.config import load_manifest
    from spndi_dask.pipeline import STAGE_FUNCTIONS

    info = stage_info(args.command)
    manifest = load_manifest(args.manifest)
    options = _run_options(args)
    with _client(args):
        summary = STAGE_FUNCTIONS[info.name](manifest, None, options, args.particles)
    _PRINTERS[info.name](summary, manifest.layout)
    failed = [n for n, s in summary.items() if info.per_particle and s["status"] == Outcome.FAILED]
    if failed:
        print(
            f"\nerror: {info.name} failed for {len(failed)} of {len(summary)} particle(s): "
            f"{', '.join(failed)} (the others are done; details above)",
            file=sys.stderr,
        )
    return 1 if failed else 0


def _cmd_export_ply(args: argparse.Namespace) -> int:
    from spndi_dask.config import load_manifest
    from spndi_dask.features.ply import export_ply

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
    print(f"{'particle':<16}" + "".join(f"{stage_info(s).label:<11}" for s in STATUS_STAGES))
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
    from contextlib import nullcontext

    from spndi_dask.config import load_manifest
    from spndi_dask.io.integrity import describe, verify
    from spndi_dask.io.lock import output_lock

    manifest = load_manifest(args.manifest)
    mark = not args.report_only
    lock = output_lock(manifest.output_dir) if mark else nullcontext()
    with lock:
        report = verify(manifest, deep=args.deep, mark=mark, particles=args.particles)
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
    print(f"\n{'particle':<16}{'stage':<10}damage")
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


def _cmd_report(args: argparse.Namespace) -> int:
    from spndi_dask.config import load_manifest
    from spndi_dask.report import write_report

    print(f"report: {write_report(load_manifest(args.manifest))}")
    return 0


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


def _cmd_simulate(args: argparse.Namespace) -> int:
    from spndi_dask.simulate import preset, simulate_beamtime

    overrides: dict[str, Any] = {"seed": args.seed}
    if getattr(args, "particles", None):
        overrides["n_particles"] = args.particles
    cfg = preset(args.preset, **overrides)
    t0 = time.perf_counter()
    with _client(args):
        manifest = simulate_beamtime(args.out, cfg)
    out = Path(args.out)
    print(
        f"simulated {cfg.n_particles} particles × {cfg.n_angles} angles × "
        f"{cfg.scan_shape[0]}×{cfg.scan_shape[1]} points × {cfg.detector_shape[0]}×"
        f"{cfg.detector_shape[1]} pixels ({cfg.raw_bytes / 1e9:.2f} GB raw, "
        f"{_du(out / 'raw') / 1e6:.1f} MB as compressed HDF5) in {time.perf_counter() - t0:.1f} s"
    )
    print(f"manifest: {out / 'beamtime.toml'}\nground truth: {out / 'ground_truth'}")
    return 0 if manifest else 1


def _print_summary(results: list[Any]) -> None:
    print(f"\n{'stage':<9}{'status':<12}{'seconds':>8}  {'particles':<18}note")
    for r in results:
        for row in r.rows():
            print(
                f"{row['stage']:<9}{row['status']:<12}{row['seconds']!s:>8}  "
                f"{row['particles']:<18}{row['note']}"
            )


def _run_pipeline(args: argparse.Namespace, manifest: Any, session: Any, first: int = 0) -> int:
    """The pipeline on ``session``'s client with logs and reports; prints progress and summary."""
    from spndi_dask.pipeline import run, run_logging

    stages = parse_stages(args.stages)
    total = len(stages) + first
    options = _run_options(args, run_info=session.info())
    t0 = time.perf_counter()
    with run_logging(
        manifest.output_dir, session.client, performance_report=not args.no_performance_report
    ) as logs:
        print(f"run log: {logs['log']}")
        results = run(
            manifest,
            session.client,
            stages=stages,
            options=options,
            on_stage=lambda name, i, n: print(f"[{i + first}/{total}] {name}", flush=True),
        )
    _print_summary(results)
    print(f"\ntotal {time.perf_counter() - t0:.1f} s; run log: {logs['log']}")
    if "dask_report" in logs:
        print(f"dask performance report: {logs['dask_report']}")
    report = next((r.summary for r in results if r.stage == "report" and r.summary), None)
    if report:
        print(f"report: {report}")
    failed = [r.stage for r in results if r.failed or r.status == "skipped"]
    if failed:
        print(f"failed or skipped: {', '.join(failed)} (details above and in the run log)")
    return 1 if failed else 0


def _print_session(session: Any) -> None:
    info = session.info()
    print(
        f"dask cluster: {info['cluster']} ({info['type']}), {info['workers']} worker(s), "
        f"{info['threads']} thread(s); scheduler {info['scheduler']}\n"
        f"dask dashboard: {info['dashboard']}"
    )


def _cmd_run(args: argparse.Namespace) -> int:
    from spndi_dask.config import load_manifest
    from spndi_dask.dask_clusters import load_cluster_config
    from spndi_dask.io.layout import check_output

    load_cluster_config(args.cluster)  # a misspelt config fails before anything else
    manifest = load_manifest(args.manifest)
    check_output(manifest.output_dir)  # before the lock and the logs are written
    with _locked(manifest.output_dir), _session(args) as session:
        _print_session(session)
        return _run_pipeline(args, manifest, session)


def _cmd_demo(args: argparse.Namespace) -> int:
    from spndi_dask.config import load_manifest
    from spndi_dask.simulate import preset, simulate_beamtime

    out = Path(args.out)
    cfg = preset(args.preset, seed=args.seed)
    t0 = time.perf_counter()
    with _session(args) as session:
        _print_session(session)
        n = len(parse_stages(args.stages)) + 1
        print(
            f"[1/{n}] simulate: {cfg.n_particles} particles, {cfg.raw_bytes / 1e9:.2f} GB raw "
            f"-> {out}",
            flush=True,
        )
        simulate_beamtime(out, cfg)
        manifest = load_manifest(out / "beamtime.toml")
        with _locked(manifest.output_dir):
            code = _run_pipeline(args, manifest, session, first=1)
    print(
        f"\ndemo done in {time.perf_counter() - t0:.1f} s\n"
        f"  manifest:     {out / 'beamtime.toml'}\n"
        f"  raw frames:   {out / 'raw'} (one HDF5 file per angle)\n"
        f"  ground truth: {out / 'ground_truth'}\n"
        f"  results:      {manifest.output_dir}  "
        f"(open with spndi_dask.open_results('{manifest.output_dir}'))"
    )
    return code


def _cmd_view(args: argparse.Namespace) -> int:
    from spndi_dask.explorer.cli import cmd_view

    return cmd_view(args)


def _user_errors() -> tuple[type[Exception], ...]:
    """Errors that are the input's or the environment's, printed without a traceback.

    Imported when an error is raised, so a command does not load the modules it does not use.
    """
    from spndi_dask.config import ManifestError
    from spndi_dask.dask_clusters import ClusterConfigError, ClusterStartError
    from spndi_dask.io.lock import LockError

    return (
        StageError,
        ManifestError,
        ConnectionError,
        FileNotFoundError,
        ClusterConfigError,
        ClusterStartError,
        LockError,
    )


def _interrupted(args: argparse.Namespace, signum: int, stage: str | None, how: str = "") -> str:
    """The line a command ends with when a signal stopped it."""
    if stage is None and args.command in STAGE_NAMES:
        stage = args.command
    resumable = args.command in ("run", "demo", *STAGE_NAMES)
    return (
        f"interrupted by {signal.Signals(signum).name}{how}"
        + (f" during {stage}" if stage else "")
        + (f"; the next `spndi {args.command}` resumes" if resumable else "")
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``spndi`` command.

    SIGINT and SIGTERM stop any command (see :mod:`spndi_dask.interrupt`): the stage that was
    running is recorded as interrupted, the cluster closed, the lock released; the exit status
    is 130 or 143 and one line says where the run stopped.
    """
    args = _parser().parse_args(argv)
    _setup_logging(args.verbose, args.quiet)
    commands: dict[str, Callable[[argparse.Namespace], int]] = {
        "demo": _cmd_demo,
        "init": _cmd_init,
        "run": _cmd_run,
        "simulate": _cmd_simulate,
        **{s.name: _cmd_stage for s in STAGES},
        "report": _cmd_report,
        "export-ply": _cmd_export_ply,
        "status": _cmd_status,
        "verify": _cmd_verify,
        "view": _cmd_view,
    }
    if args.command not in ("init", "status", "report", "export-ply", "view"):
        # dask_jobqueue sets its own SIGINT handler (sys.exit) when imported: import it first
        import spndi_dask.dask_clusters  # noqa: F401

    def forced() -> None:  # a second signal: no stage known, the lock goes, nothing else
        line = _interrupted(args, received() or signal.SIGINT, None, " twice (stopped at once)")
        os.write(2, (line + "\n").encode())

    with handle_signals(), at_forced_exit(forced):
        try:
            return commands[args.command](args)
        except Interrupted as exc:
            print(_interrupted(args, exc.signum, exc.stage), file=sys.stderr)
            return exc.exit_code
        except Exception as exc:
            signum = received()
            if signum is not None:  # a failure of the stopping (Ctrl-C killed starting workers)
                logger.debug("after %s: %s", signal.Signals(signum).name, exc, exc_info=True)
                print(_interrupted(args, signum, None), file=sys.stderr)
                return 128 + signum
            if not isinstance(exc, _user_errors()):
                raise
            print(f"error: {exc}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
