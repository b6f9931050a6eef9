"""The interactive explorer of a beamtime's results: ``spndi view`` and ``spndi_dask.explore``.

:mod:`~spndi_dask.explorer.data` reads lazily only what a view shows,
:mod:`~spndi_dask.explorer.app` builds the Bokeh document, :mod:`~spndi_dask.explorer.server`
serves it (or returns it for a notebook), :mod:`~spndi_dask.explorer.cli` is ``spndi view``.
The names here are imported on first use, so ``spndi --help`` does not load Bokeh or Zarr.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "ExplorerApp": "spndi_dask.explorer.app",
    "build_document": "spndi_dask.explorer.app",
    "ExplorerData": "spndi_dask.explorer.data",
    "ExplorerError": "spndi_dask.explorer.data",
    "explore": "spndi_dask.explorer.server",
    "make_application": "spndi_dask.explorer.server",
    "serve": "spndi_dask.explorer.server",
}

__all__ = [
    "ExplorerApp",
    "ExplorerData",
    "ExplorerError",
    "build_document",
    "explore",
    "make_application",
    "serve",
]

if TYPE_CHECKING:
    from spndi_dask.explorer.app import ExplorerApp, build_document
    from spndi_dask.explorer.data import ExplorerData, ExplorerError
    from spndi_dask.explorer.server import explore, make_application, serve


def __getattr__(name: str) -> Any:
    try:
        module = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'spndi_dask.explorer' has no attribute {name!r}") from None
    return getattr(import_module(module), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
