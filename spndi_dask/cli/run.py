"""``spndi run``, ``spndi demo`` and ``spndi simulate``: the whole pipeline under one client, and
simulated beamtimes.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from spndi_dask.cli.common import (
    _add_cluster_args,
    _add_scans_arg,
    _client,
    _locked,
    _manifest_parser,
    _progress_bars,
    _run_options,
    _session,
)
from spndi_dask.io.layout import disk_usage
from spndi_dask.stages import STAGE_NAMES, parse_stages


def _add_run_args(p: argparse.ArgumentParser, demo: bool = False) -> None:
    p.add_argument(
        "--stages",
        nargs="+",
        metavar="STAGE",
        help=f"only these stages ({', '.join(STAGE_NAMES)}; ranges like reduce-encode; "
        "default all)",
    )
    if not demo:
        _add_scans_arg(p)
        p.add_argument("--force", action="store_true", help="redo stages even if up to date")
        p.add_argument("--checkpoint", help="use this trained model (skips train)")
        p.add_argument("-k", type=int, help="number of clusters (default: [cluster] k)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default: [features] device")
    p.add_argument(
        "--train-in-client",
        action="store_true",
        help="train in this process, not as a task on a dask worker",
    )
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


def add_demo(sub: Any) -> None:
    """``spndi demo``."""
    from spndi_dask.simulate import PRESETS

    p = sub.add_parser(
        "demo",
        help="simulate a beamtime and run every stage on it",
        description="Simulate a small beamtime of several scans (beamline HDF5 layout) and run "
        "every available stage on it on a LocalCluster.",
    )
    p.add_argument("out", nargs="?", default="spndi-demo", help="directory (default: spndi-demo)")
    _add_run_args(p, demo=True)
    _add_simulation_args(p, PRESETS)
    p.set_defaults(func=_cmd_demo)


def add_run(sub: Any) -> None:
    """``spndi run``."""
    p = _manifest_parser(
        sub,
        "run",
        help="every stage for every scan: ingest ... analyze, report",
        description="Run the whole pipeline on a beamtime under one dask client: ingest, "
        "reduce, stats, train (or --checkpoint), encode, cluster, analyze, report. Up-to-date "
        "results are kept; a summary table, a run log and dask's performance report are written.",
    )
    _add_run_args(p)
    _add_cluster_args(p)
    p.set_defaults(func=_cmd_run)


def add_simulate(sub: Any) -> None:
    """``spndi simulate``."""
    from spndi_dask.simulate import PRESETS

    p = sub.add_parser(
        "simulate",
        help="write a simulated beamtime (HDF5 per angle, beamtime.toml, ground truth)",
        description="Write a physics-based simulated beamtime with ground truth.",
    )
    p.add_argument("out", help="output directory")
    _add_scans_arg(p, "number of scans (default: preset)", type=int, nargs=None, metavar="N")
    _add_simulation_args(p, PRESETS)
    p.set_defaults(func=_cmd_simulate)


def _cmd_simulate(args: argparse.Namespace) -> int:
    from spndi_dask.simulate import preset, simulate_beamtime

    overrides: dict[str, Any] = {"seed": args.seed}
    if getattr(args, "scans", None):
        overrides["n_particles"] = args.scans
    cfg = preset(args.preset, **overrides)
    t0 = time.perf_counter()
    with _client(args):
        manifest = simulate_beamtime(args.out, cfg, progress=_progress_bars())
    out = Path(args.out)
    print(
        f"simulated {cfg.n_particles} scans × {cfg.n_angles} angles × "
        f"{cfg.scan_shape[0]}×{cfg.scan_shape[1]} points × {cfg.detector_shape[0]}×"
        f"{cfg.detector_shape[1]} pixels ({cfg.raw_bytes / 1e9:.2f} GB raw, "
        f"{disk_usage(out / 'raw') / 1e6:.1f} MB as compressed HDF5) "
        f"in {time.perf_counter() - t0:.1f} s"
    )
    print(f"manifest: {out / 'beamtime.toml'}\nground truth: {out / 'ground_truth'}")
    return 0 if manifest else 1


def _summary(results: list[Any]) -> str:
    """The run's summary table, one line per stage and status."""
    rows = [row for r in results for row in r.rows()]
    w = max([len("stage"), *(len(str(row["stage"])) for row in rows)]) + 2
    lines = [f"{'stage':<{w}}{'status':<12}{'seconds':>8}  {'scans':<18}note"]
    for row in rows:
        lines.append(
            f"{row['stage']:<{w}}{row['status']:<12}{row['seconds']!s:>8}  "
            f"{row['scans']:<18}{row['note']}"
        )
    return "\n".join(lines)


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
    summary = f"{_summary(results)}\n\ntotal {time.perf_counter() - t0:.1f} s"
    print(f"\n{summary}; run log: {logs['log']}")
    with open(logs["log"], "a", encoding="utf-8") as f:  # the log ends with the same table
        f.write(f"summary:\n{summary}\n")
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
            f"[1/{n}] simulate: {cfg.n_particles} scans, {cfg.raw_bytes / 1e9:.2f} GB raw -> {out}",
            flush=True,
        )
        simulate_beamtime(out, cfg, progress=_progress_bars())
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
