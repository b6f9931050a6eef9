"""``spndi`` command line: argument parsing and console output only.

Each subcommand (or family of them) is a module of this package with a function that adds its
parser to the subparsers and sets ``func``, the function that runs it
(``p.set_defaults(func=...)``); :data:`COMMANDS` lists those functions in the order that
``spndi --help`` shows them. A new subcommand is a new module and one line in :data:`COMMANDS`.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from spndi_dask._version import __version__
from spndi_dask.cli import export, init, run, stages, status, view
from spndi_dask.interrupt import Interrupted, at_forced_exit, handle_signals, received
from spndi_dask.stages import STAGE_NAMES, StageError

__all__ = ["COMMANDS", "main"]

logger = logging.getLogger(__name__)

#: The functions that add the subcommands' parsers (each sets ``func``), in the order of help.
COMMANDS: list[Callable[[Any], None]] = [
    run.add_demo,
    run.add_run,
    init.add_init,
    run.add_simulate,
    stages.add_stages,
    status.add_status,
    status.add_verify,
    stages.add_report,
    export.add_export,
    export.add_export_ply,
    view.add_view,
]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spndi",
        description="Scanning probe nano-diffraction beamtimes: ingest raw frames into Zarr, "
        "reduce them to strain and tilt maps, and cluster lattice defects with dask.",
    )
    parser.add_argument("--version", action="version", version=f"spndi_dask {__version__}")
    _add_verbosity(parser, default=0)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    _add_verbosity_to_subcommands(parser)
    return parser


def _add_verbosity(parser: argparse.ArgumentParser, *, default: Any) -> None:
    """``-v``/``-q`` on ``parser``; ``default=argparse.SUPPRESS`` keeps the outer value."""
    parser.add_argument(
        "-v", "--verbose", action="count", default=default, help="more log output (-vv: debug)"
    )
    parser.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=False if default == 0 else default,
        help="only warnings and errors",
    )


def _add_verbosity_to_subcommands(parser: argparse.ArgumentParser) -> None:
    """Accept ``-v``/``-q`` after any subcommand too (``spndi run beamtime.toml -v``)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):  # aliases share a parser
                _add_verbosity(sub, default=argparse.SUPPRESS)
                _add_verbosity_to_subcommands(sub)


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
    for note in getattr(args, "deprecated", []):
        logger.warning("%s", note)
    if args.command not in ("init", "status", "report", "export", "export-ply", "view"):
        # dask_jobqueue sets its own SIGINT handler (sys.exit) when imported: import it first
        import spndi_dask.dask_clusters  # noqa: F401

    def forced() -> None:  # a second signal: no stage known, the lock goes, nothing else
        line = _interrupted(args, received() or signal.SIGINT, None, " twice (stopped at once)")
        os.write(2, (line + "\n").encode())

    with handle_signals(), at_forced_exit(forced):
        try:
            return args.func(args)
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
