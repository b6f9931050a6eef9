"""``spndi view``: its arguments and its handler (the main parser registers and dispatches them).

The handler prints exactly one line, ``Explorer: http://ADDRESS:PORT/``, once the server
listens, and blocks; Ctrl-C or SIGTERM stop it with exit status 0. A bad manifest or an output
without results is one paragraph on stderr naming the file and the fix, exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from spndi_dask.cli.common import _add_scans_arg

__all__ = ["add_view_parser", "cmd_view"]


def add_view_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``spndi view`` on the subparsers ``sub``."""
    p = sub.add_parser(
        "view",
        help="interactive explorer of the results in the web browser (Bokeh server)",
        description="Serve the interactive explorer of a beamtime's results: per scan the maps "
        "(strain, tilts, d-spacing, widths, intensity, labels, clusters, regions); a click on a "
        "pixel shows its rocking curve and 3D pattern, a box or lasso its selection's mean. "
        "Only what is shown is read. Listens on 127.0.0.1: from another computer, forward the "
        "port (ssh -L 5006:localhost:5006 host) and open http://localhost:5006/.",
    )
    p.add_argument("source", help="beamtime TOML manifest, the folder holding it, or the output")
    p.add_argument("--port", type=int, default=5006, help="TCP port; 0 = a free one (5006)")
    p.add_argument(
        "--address", default="127.0.0.1", help="interface to listen on (127.0.0.1; others warn)"
    )
    _add_scans_arg(
        p,
        "only these scans (comma-separated)",
        type=lambda s: [n for n in s.split(",") if n],
        nargs=None,
        metavar="P1,P2",
    )
    p.add_argument("--no-browser", action="store_true", help="do not open a web browser")
    return p


def cmd_view(args: argparse.Namespace) -> int:
    """Run ``spndi view`` with parsed ``args``; returns the exit status."""
    from spndi_dask.interrupt import Interrupted

    try:
        return _serve(args)
    except Interrupted:  # stopped while starting: nothing to clean up
        return 0


def _serve(args: argparse.Namespace) -> int:
    from spndi_dask.config import ManifestError
    from spndi_dask.explorer.data import ExplorerError
    from spndi_dask.explorer.server import serve, url
    from spndi_dask.interrupt import Interrupted

    try:
        server = serve(
            args.source,
            port=args.port,
            address=args.address,
            scans=args.scans,
            show=not args.no_browser,
            block=False,
        )
    except (ExplorerError, ManifestError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the port is taken, the address is not this machine's
        print(
            f"error: cannot listen on {args.address}:{args.port}: {exc.strerror or exc}; choose "
            "another --port (0 picks a free one) or --address",
            file=sys.stderr,
        )
        return 2
    print(f"Explorer: {url(server, args.address)}", flush=True)
    try:
        server.io_loop.start()
    except (Interrupted, KeyboardInterrupt):
        pass
    finally:
        server.stop()
    return 0
