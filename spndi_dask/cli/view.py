"""``spndi view``: registration of the explorer's subcommand (the explorer package owns it)."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_view"]


def add_view(sub: Any) -> None:
    """Add ``spndi view`` (:mod:`spndi_dask.explorer.cli`) to the subparsers ``sub``."""
    from spndi_dask.explorer.cli import add_view_parser

    add_view_parser(sub).set_defaults(func=_cmd_view)


def _cmd_view(args: argparse.Namespace) -> int:
    from spndi_dask.explorer.cli import cmd_view

    return cmd_view(args)
