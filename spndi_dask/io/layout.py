"""Every path under a beamtime's ``<output>`` directory, and the one way to replace a file there.

The output contract (DESIGN.md) names these paths; code asks :class:`OutputLayout` for them
instead of joining string literals, so a path is spelled once. Anything a reader may open while a
run writes it is replaced in one move: :func:`atomic_path` (a file written under a temporary
name beside it, then renamed), :func:`write_text_atomic`, and :func:`replace_tree` (a whole
directory, such as a Zarr store, moved in with the previous one kept until the new one is in).

Examples
--------
>>> out = OutputLayout("/data/lco")
>>> out.results.as_posix(), out.checkpoint.name
('/data/lco/results.zarr', 'model.safetensors')
>>> out.node("p1").as_posix()
'/data/lco/results.zarr/p1'
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["OutputLayout", "atomic_path", "read_attrs", "replace_tree", "write_text_atomic"]


class OutputLayout:
    """The paths of one beamtime's output directory (nothing is created or read).

    Parameters
    ----------
    root : str or path-like
        The manifest's ``output`` directory.
    """

    __slots__ = ("root",)

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"OutputLayout({str(self.root)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, OutputLayout) and other.root == self.root

    def __hash__(self) -> int:
        return hash(self.root)

    # -- stores ----------------------------------------------------------------------------
    @property
    def raw(self) -> Path:
        """``raw.zarr``: ingested frames, one array group per particle."""
        return self.root / "raw.zarr"

    @property
    def results(self) -> Path:
        """``results.zarr``: one node per particle (maps, patterns, label, latent, cluster)."""
        return self.root / "results.zarr"

    def node(self, particle: str) -> Path:
        """``results.zarr/<particle>``."""
        return self.results / particle

    def raw_node(self, particle: str) -> Path:
        """``raw.zarr/<particle>``."""
        return self.raw / particle

    @property
    def analysis(self) -> Path:
        """``analysis.zarr``: cluster rocking curves, mean patterns, domains vs boundaries."""
        return self.root / "analysis.zarr"

    # -- tables, figures, report -------------------------------------------------------------
    @property
    def particles_csv(self) -> Path:
        """``particles.csv``: per-particle statistics."""
        return self.root / "particles.csv"

    @property
    def clusters_csv(self) -> Path:
        """``clusters.csv``: per-cluster statistics."""
        return self.root / "clusters.csv"

    @property
    def regions_csv(self) -> Path:
        """``regions.csv``: domains vs boundaries per cluster."""
        return self.root / "regions.csv"

    @property
    def figures(self) -> Path:
        """``figures/``."""
        return self.root / "figures"

    @property
    def report_dir(self) -> Path:
        """``report/``."""
        return self.root / "report"

    @property
    def report(self) -> Path:
        """``report/index.html``: the self-contained HTML report."""
        return self.report_dir / "index.html"

    @property
    def ply(self) -> Path:
        """``ply/``: exported point clouds (default of ``spndi export-ply``)."""
        return self.root / "ply"

    # -- model, logs, bookkeeping ------------------------------------------------------------
    @property
    def features(self) -> Path:
        """``features/``: the trained model."""
        return self.root / "features"

    @property
    def checkpoint(self) -> Path:
        """``features/model.safetensors`` (metadata beside it as ``model.json``)."""
        return self.features / "model.safetensors"

    @property
    def logs(self) -> Path:
        """``logs/``: run logs and dask performance reports."""
        return self.root / "logs"

    @property
    def last_run(self) -> Path:
        """``logs/last-run.json``: the stages and failures of the last ``spndi run``."""
        return self.logs / "last-run.json"

    @property
    def lock(self) -> Path:
        """``.spndi.lock``: held by the one process writing the output."""
        return self.root / ".spndi.lock"

    @property
    def tmp(self) -> Path:
        """``.tmp/``: stores being written before they are moved in."""
        return self.root / ".tmp"


def read_attrs(group: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The attributes of a Zarr v3 group (its ``zarr.json``), or None where there is none.

    Read as JSON, without zarr: what ``spndi status`` and the report read of every stage.
    """
    try:
        return json.loads((Path(group) / "zarr.json").read_text()).get("attributes", {})
    except (OSError, ValueError):
        return None


def _temporary(path: Path) -> Path:
    # one name per target: a temporary left by a killed writer is replaced by the next write
    return path.with_name(f".{path.name}.tmp")


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary path beside ``path`` to write; renamed onto ``path`` when the block succeeds.

    The temporary file is removed if the block raises, so a reader finds the previous file
    whole or the new one whole, never half of one. The parent directory is created.

    Examples
    --------
    >>> import tempfile
    >>> target = Path(tempfile.mkdtemp()) / "table.csv"
    >>> with atomic_path(target) as tmp:
    ...     _ = tmp.write_text("a,b\\n")
    >>> target.read_text(), [p.name for p in target.parent.iterdir()]
    ('a,b\\n', ['table.csv'])
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` in one move; returns the path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def replace_tree(tmp: str | os.PathLike[str], dest: str | os.PathLike[str]) -> None:
    """Move the directory ``tmp`` onto ``dest``, replacing what is there.

    The previous ``dest`` is moved aside (one rename) before it is deleted, so a reader finds
    the old tree whole, briefly none, then the new one whole; if the move fails, the old tree is
    put back. ``tmp`` and ``dest`` must be on one file system.
    """
    tmp, dest = Path(tmp), Path(dest)
    old = tmp.with_name(tmp.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if dest.exists():
        dest.replace(old)
    try:
        tmp.replace(dest)
    except OSError:
        if old.exists() and not dest.exists():
            old.replace(dest)  # the previous tree stays
        raise
    shutil.rmtree(old, ignore_errors=True)
