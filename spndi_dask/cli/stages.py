"""``spndi <stage>``: one stage of the pipeline (ingest ... analyze, report) and its console
summary.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from spndi_dask.cli.common import (
    _add_cluster_args,
    _add_scans_arg,
    _client,
    _manifest_parser,
    _print_table,
    _run_options,
)
from spndi_dask.io.layout import OutputLayout, disk_usage
from spndi_dask.stages import STAGES, Outcome, Stage
from spndi_dask.stages import stage as stage_info

# options a stage's subcommand may have (Stage.options), each added the same way everywhere
_STAGE_OPTIONS: dict[str, Callable[[argparse.ArgumentParser], Any]] = {
    "checkpoint": lambda p: p.add_argument(
        "--checkpoint", help="default: [features] checkpoint or <output>/features/model"
    ),
    "device": lambda p: p.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], help="default: [features] device"
    ),
    "weights": lambda p: p.add_argument(
        "--weights",
        metavar="FILE.pkl",
        help="load the original study's released state_dict instead of training "
        "([features] recipe = 'study'; default: [features] weights)",
    ),
    "k": lambda p: p.add_argument("-k", type=int, help="number of clusters (default: [cluster] k)"),
    "boundary_width": lambda p: p.add_argument(
        "--boundary-width", type=float, default=1.0, help="scan pixels from another cluster (1)"
    ),
    "figures": lambda p: p.add_argument("--no-figures", action="store_true", help="skip figures"),
    "train_in_client": lambda p: p.add_argument(
        "--train-in-client",
        action="store_true",
        help="train in this process, not as a task on a dask worker (the GPU worker, else the "
        "one with most threads)",
    ),
}


def _stage_parser(sub: Any, info: Stage) -> argparse.ArgumentParser:
    """The subcommand of one stage of the table (``spndi <stage> beamtime.toml ...``)."""
    p = _manifest_parser(sub, info.name, help=info.help, description=info.description)
    if info.name == "report":
        return p
    _add_scans_arg(p)
    for option in info.options:
        _STAGE_OPTIONS[option](p)
    p.add_argument("--force", action="store_true", help="redo even what is up to date")
    _add_cluster_args(p)
    return p


def _print_ingest(summary: dict[str, dict[str, Any]], out: OutputLayout) -> None:
    _print_table(
        summary,
        {
            "angles": (lambda s: s.get("angles_written", 0), 8),
            "raw GB": (lambda s: f"{s.get('raw_bytes', 0) / 1e9:.3f}", 10),
        },
    )
    print(f"raw.zarr: {out.raw} ({disk_usage(out.raw) / 1e6:.1f} MB on disk)")


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
    print(
        f"results: {out.results} (open with spndi_dask.open_results(output_dir), or "
        "xarray.open_datatree(path, engine='zarr', consolidated=False))"
    )


def _print_stats(summary: dict[str, dict[str, Any]], out: OutputLayout) -> None:
    _print_table(summary, {"labels": ("labels", 7), "method": ("method", 0)})
    print(f"table: {out.particles_csv}\nfigures: {out.figures}")


def _print_train(s: dict[str, Any], out: OutputLayout) -> None:
    if s["status"] == Outcome.UP_TO_DATE:
        print(f"model up to date: {s['checkpoint']}")
        return
    if s["status"] == Outcome.NOT_NEEDED:
        print(f"training not needed: {s.get('note', '')}")
        return
    if s.get("weights"):
        print(f"study weights {s['weights']} loaded\ncheckpoint: {s['checkpoint']}")
        return
    print(
        f"trained on {s['n_train']} patterns (+{s['n_val']} validation), {s['epochs']} epochs, "
        f"best validation loss {s['best_val_loss']:.4g} at epoch {s['best_epoch']}, "
        f"{s['seconds']} s on {s['device']}"
        + (f" (worker {s['worker']}, {s['threads']} threads)" if s.get("worker") else "")
        + f"\ncheckpoint: {s['checkpoint']}"
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
    print(f"\n{'scan':<16}{'pixels':>8}")
    for name, n in s["pixels"].items():
        print(f"{name:<16}{n:>8}")
    for w in s.get("warnings", []):
        print(f"  warning: {w}")
    print(f"table: {out.clusters_csv}\nfigures: {out.figures}")


def _print_decompose(s: dict[str, Any], out: OutputLayout) -> None:
    if s["status"] == Outcome.UP_TO_DATE:
        print(f"decomposition up to date: {s['decomposition']}")
        return
    print(
        f"fitted on {s['sample']} patterns in {s['fit_seconds']} s: PCA explains "
        f"{100 * s['pca_explained']:.1f} % of the variance, NMF relative error "
        f"{s['nmf_error']:.3g}; {sum(s['pixels'].values())} pixels projected, {s['seconds']} s"
        f"\ncomponents: {s['decomposition']}"
    )


def _print_analyze(s: dict[str, Any], out: OutputLayout) -> None:
    print(f"\n{'scan':<16}{'domain px':>10}{'boundary px':>12}")
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
    "decompose": _print_decompose,
    "cluster": _print_cluster,
    "analyze": _print_analyze,
}


def _cmd_stage(args: argparse.Namespace) -> int:
    """``spndi <stage>``: one stage of the pipeline on the command's client, then its summary.

    Exit code 1 when the stage failed for a scan (the others are done); a stage that
    refuses its input raises a StageError, which :func:`main` prints with exit code 2.
    """
    from spndi_dask.config import load_manifest
    from spndi_dask.pipeline import STAGE_FUNCTIONS

    info = stage_info(args.command)
    manifest = load_manifest(args.manifest)
    options = _run_options(args)
    with _client(args):
        summary = STAGE_FUNCTIONS[info.name](manifest, None, options, args.scans)
    _PRINTERS[info.name](summary, manifest.layout)
    failed = [n for n, s in summary.items() if info.per_scan and s["status"] == Outcome.FAILED]
    if failed:
        print(
            f"\nerror: {info.name} failed for {len(failed)} of {len(summary)} scan(s): "
            f"{', '.join(failed)} (the others are done; details above)",
            file=sys.stderr,
        )
    return 1 if failed else 0


def _cmd_report(args: argparse.Namespace) -> int:
    from spndi_dask.config import load_manifest
    from spndi_dask.report import write_report

    print(f"report: {write_report(load_manifest(args.manifest))}")
    return 0


def add_stages(sub: Any) -> None:
    """A subcommand for each stage of the table but report (``spndi ingest`` ... ``analyze``)."""
    for info in STAGES:
        if info.name != "report":
            _stage_parser(sub, info).set_defaults(func=_cmd_stage)


def add_report(sub: Any) -> None:
    """``spndi report``."""
    _stage_parser(sub, stage_info("report")).set_defaults(func=_cmd_report)
