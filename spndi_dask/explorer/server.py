"""Serving the explorer: a Bokeh server (``spndi view``) and the notebook entry (``explore``).

Both wrap the same :func:`~spndi_dask.explorer.app.build_document` in a Bokeh
:class:`~bokeh.application.Application`; every browser session (or notebook cell) gets its own
document over one shared, read-only :class:`~spndi_dask.explorer.data.ExplorerData`.

The server listens on 127.0.0.1 by default: on a remote machine, forward the port
(``ssh -L 5006:localhost:5006 host``) rather than listening on every interface.
"""

from __future__ import annotations

import html
import ipaddress
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any

from bokeh.application import Application
from bokeh.application.handlers.function import FunctionHandler
from bokeh.models import Div

from spndi_dask._deprecate import renamed_keyword
from spndi_dask.explorer.app import build_document
from spndi_dask.explorer.data import ExplorerData

__all__ = ["address_warning", "explore", "make_application", "serve"]

logger = logging.getLogger(__name__)


@renamed_keyword(particles="scans")
def make_application(source: str | Path, *, scans: list[str] | None = None) -> Application:
    """A Bokeh application whose sessions each open ``source`` and build its explorer.

    Every session (a page load) opens the output anew, so a stage finished while the server
    runs (clusters, say) shows on the next reload. A session whose output cannot be opened
    gets a page with one Div named ``error_info`` saying why and what to run.
    """

    def modify_doc(doc: Any) -> None:
        try:
            build_document(doc, ExplorerData(source, scans=scans))
        except Exception as exc:
            logger.exception("explorer session failed to open %s", source)
            doc.clear()
            doc.add_root(
                Div(
                    name="error_info",
                    text=f"<h2>spndi explorer</h2><p style='color:#b00'>cannot show "
                    f"{html.escape(str(source))}: {html.escape(str(exc))}</p>",
                    width=900,
                )
            )
            doc.title = "spndi explorer: error"

    return Application(FunctionHandler(modify_doc))


@renamed_keyword(particles="scans")
def explore(source: str | Path, *, scans: list[str] | None = None) -> Application:
    """The explorer of a beamtime's results, for a Jupyter notebook.

    Parameters
    ----------
    source : path
        The output directory (holding ``results.zarr``), or the beamtime manifest or its folder.
    scans : list of str, optional
        Scans to show; default all.

    Returns
    -------
    bokeh.application.Application
        Show it inline with ``bokeh.io.output_notebook()`` then ``bokeh.io.show(app)`` (Bokeh
        runs a server for the notebook). Nothing but metadata is read until it is shown.

    Raises
    ------
    spndi_dask.explorer.ExplorerError
        If there are no results (the message says which command makes them).

    Examples
    --------
    >>> from bokeh.io import output_notebook, show  # doctest: +SKIP
    >>> output_notebook()  # doctest: +SKIP
    >>> show(explore("spndi-demo/results"))  # doctest: +SKIP
    """
    ExplorerData(source, scans=scans)  # fails here, not in the notebook's server
    return make_application(source, scans=scans)


def address_warning(address: str) -> str | None:
    """A warning when ``address`` is not a loopback address (others on the network can see)."""
    try:
        loopback = ipaddress.ip_address(address).is_loopback
    except ValueError:
        loopback = address == "localhost"
    if loopback:
        return None
    return (
        f"the explorer listens on {address}, reachable from other machines without a password; "
        "prefer the default 127.0.0.1 and `ssh -L PORT:localhost:PORT host` from your computer"
    )


def _has_display() -> bool:
    """Whether a graphical web browser can open here (a text one would take the terminal)."""
    return sys.platform in ("darwin", "win32") or bool(
        os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
    )


def _free_port(address: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET) as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


@renamed_keyword(particles="scans")
def serve(
    source: str | Path,
    *,
    port: int = 5006,
    address: str = "127.0.0.1",
    scans: list[str] | None = None,
    show: bool = False,
    block: bool = True,
) -> Any:
    """Serve the explorer of a beamtime's results on ``http://address:port/``.

    Parameters
    ----------
    source : path
        The beamtime manifest (or its folder), or the output directory.
    port : int
        TCP port; 0 picks a free one (the server's ``port`` tells which).
    address : str
        Interface to listen on; a non-loopback one is logged as a warning.
    scans : list of str, optional
        Scans to show; default all.
    show : bool
        Open the page in the default web browser (where there is a display).
    block : bool
        Run the server's event loop until it is stopped (Ctrl-C); else return it started (the
        caller runs ``server.io_loop.start()``).

    Returns
    -------
    bokeh.server.server.Server
        The started server (``server.port``, ``server.stop()``).

    Raises
    ------
    spndi_dask.config.ManifestError, spndi_dask.explorer.ExplorerError
        Before anything listens: a bad manifest, or no results to explore.
    """
    from bokeh.server.server import Server

    data = ExplorerData(source, scans=scans)
    warning = address_warning(address)
    if warning:
        logger.warning(warning)
    if port == 0:
        port = _free_port(address)
    hosts = {f"localhost:{port}", f"127.0.0.1:{port}", f"{address}:{port}"}
    server = Server(
        {"/": make_application(source, scans=scans)},
        port=port,
        address=address,
        allow_websocket_origin=sorted(hosts),
    )
    server.start()
    logger.info("explorer of %s at http://%s:%d/", data.output, address, server.port)
    if show and _has_display():
        server.io_loop.add_callback(server.show, "/")
    elif show:
        logger.info("no display here: open the link in a browser (through `ssh -L` if remote)")
    if block:
        try:
            server.io_loop.start()
        finally:
            server.stop()
    return server


def url(server: Any, address: str) -> str:
    """The page's address (``http://ADDRESS:PORT/``)."""
    host = f"[{address}]" if ":" in address else address
    return f"http://{host}:{server.port}/"
