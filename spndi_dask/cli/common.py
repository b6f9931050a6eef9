"""What the ``spndi`` subcommands share: manifest, scan and cluster arguments, the cluster
session, the output's lock, the per-scan summary table, the pipeline's options.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path
from typing import Any

from spndi_dask.interrupt import at_forced_exit, deferred


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


class _OldName(argparse.Action):
    """A deprecated option name: stores into the new option's ``dest``, and leaves one line in
    ``args.deprecated`` that :func:`spndi_dask.cli.main` logs once logging is set up."""

    def __init__(self, option_strings: list[str], dest: str, *, new: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.new = new

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: Any = None) -> None:
        setattr(namespace, self.dest, values)
        note = f"{option_string} is deprecated: use {self.new} (a manifest entry is a scan)"
        namespace.deprecated = [*getattr(namespace, "deprecated", []), note]


def _add_scans_arg(
    p: argparse.ArgumentParser, help: str = "only these scans (default: all)", **kwargs: Any
) -> None:
    """``--scans``, and its old name ``--particles`` (hidden; logs that it is deprecated)."""
    kwargs = {"nargs": "+", "metavar": "NAME", **kwargs}
    p.add_argument("--scans", help=help, **kwargs)
    p.add_argument(
        "--particles",
        dest="scans",
        action=_OldName,
        new="--scans",
        help=argparse.SUPPRESS,
        **kwargs,
    )


def _manifest_parser(sub: Any, name: str, **kwargs: Any) -> argparse.ArgumentParser:
    """A subcommand whose first argument is the beamtime manifest."""
    p = sub.add_parser(name, **kwargs)
    p.add_argument("manifest", help="beamtime TOML manifest, or the folder holding it")
    return p


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
    """One row per scan: name, status and ``columns``.

    ``columns`` maps a header to ``(summary key or function of the summary, width)``; width 0
    is a last free-width column.
    """

    def cell(text: Any, width: int) -> str:
        return f"{text!s:>{width}}" if width else f"  {text}"

    print(f"\n{'scan':<16}{'status':<14}" + "".join(cell(h, w) for h, (_, w) in columns.items()))
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


def _epoch_printer() -> Callable[[dict[str, Any]], None]:
    """A training callback: one line per epoch with the time left at most (early stopping may
    end it sooner); printed, and recorded in the run log. Each call gives a fresh clock."""
    from spndi_dask.pipeline import CONSOLE

    seconds: list[float] = []

    def print_epoch(row: dict[str, Any]) -> None:
        seconds.append(row["seconds"])
        left = (row["max_epochs"] - row["epoch"]) * sum(seconds) / len(seconds)
        eta = f", at most {_duration(left)} left" if row["epoch"] < row["max_epochs"] else ""
        text = (
            f"  epoch {row['epoch']:>3}/{row['max_epochs']}  train {row['train_loss']:.4g}  "
            f"validation {row['val_loss']:.4g}  ({row['seconds']:.1f} s{eta})"
        )
        print(text, flush=True)
        CONSOLE.info(text.strip())

    return print_epoch


def _duration(seconds: float) -> str:
    """``42 s``, ``3 min 5 s``."""
    s = round(seconds)
    return f"{s} s" if s < 60 else f"{s // 60} min {s % 60} s"


def _run_options(args: argparse.Namespace, **extra: Any) -> Any:
    """The pipeline's RunOptions from a command's arguments (those it has)."""
    from spndi_dask.pipeline import RunOptions

    return RunOptions(
        scans=getattr(args, "scans", None),
        force=getattr(args, "force", False),
        checkpoint=getattr(args, "checkpoint", None),
        device=getattr(args, "device", None),
        weights=getattr(args, "weights", None),
        k=getattr(args, "k", None),
        boundary_width=getattr(args, "boundary_width", 1.0),
        figures=not getattr(args, "no_figures", False),
        train_on_worker=False if getattr(args, "train_in_client", False) else None,
        on_epoch=_epoch_printer(),
        **{"progress": _progress_bars(), **extra},
    )


def _progress_bars() -> bool:
    """Progress bars only on a terminal: never ``\\r`` sequences in a redirected log."""
    return sys.stdout.isatty()
