"""The interactive explorer of a beamtime's results: ``spndi view`` and ``spndi_dask.explore``.

:mod:`~spndi_dask.explorer.data` reads lazily only what a view shows,
:mod:`~spndi_dask.explorer.app` builds the Bokeh document, :mod:`~spndi_dask.explorer.server`
serves it (or returns it for a notebook), :mod:`~spndi_dask.explorer.cli` is ``spndi view``.
"""

from spndi_dask.explorer.app import ExplorerApp, build_document
from spndi_dask.explorer.data import ExplorerData, ExplorerError
from spndi_dask.explorer.server import explore, make_application, serve

__all__ = [
    "ExplorerApp",
    "ExplorerData",
    "ExplorerError",
    "build_document",
    "explore",
    "make_application",
    "serve",
]
