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

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from spndi_dask.stages import StageError

__all__ = [
    "ForeignOutputError",
    "OutputLayout",
    "atomic_path",
    "check_output",
    "disk_usage",
    "read_attrs",
    "replace_tree",
    "write_text_atomic",
]


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
        """``raw.zarr``: ingested frames, one array group per scan."""
        return self.root / "raw.zarr"

    @property
    def results(self) -> Path:
        """``results.zarr``: one node per scan (maps, patterns, label, latent, cluster)."""
        return self.root / "results.zarr"

    def node(self, particle: str) -> Path:
        """``results.zarr/<scan>``."""
        return self.results / particle

    def raw_node(self, particle: str) -> Path:
        """``raw.zarr/<scan>``."""
        return self.raw / particle

    @property
    def analysis(self) -> Path:
        """``analysis.zarr``: cluster rocking curves, mean patterns, domains vs boundaries."""
        return self.root / "analysis.zarr"

    @property
    def decomposition(self) -> Path:
        """``decomposition.zarr``: PCA and NMF components of the patterns (``spndi decompose``)."""
        return self.root / "decomposition.zarr"

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
    def stage_timings(self) -> Path:
        """``logs/stage-timings.json``: per stage, the timing of the last run that did its work."""
        return self.logs / "stage-timings.json"

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


class ForeignOutputError(StageError, ValueError):
    """The output folder holds a store spndi did not write (a stage would write into it)."""


#: The arrays ``ingest`` creates in a particle's group of ``raw.zarr``: a group without attributes
#: that holds only these is one whose creation was interrupted (its attributes come last).
_RAW_ARRAYS = frozenset(
    {
        "frames",
        "monitor",
        "xrf",
        "valid",
        "position_y",
        "position_x",
        "det_sum",
        "flagged",
        "pixel_mask",
        "done",
        "angle_sources",
    }
)


def _group_meta(path: Path) -> dict[str, Any] | None:
    """A Zarr v3 group's ``zarr.json``, or None where there is none (or it is no group)."""
    try:
        meta = json.loads((path / "zarr.json").read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("node_type") == "group" else None


def _labelled(path: Path) -> bool:
    """Whether ``path`` is a group spndi labelled (attrs ``spndi_dask.kind``)."""
    meta = _group_meta(path) or {}
    own = (meta.get("attributes") or {}).get("spndi_dask")
    return isinstance(own, dict) and "kind" in own


def _unfinished_raw_group(path: Path) -> bool:
    """A particle group of raw.zarr that ingest began to create (no attributes yet)."""
    if _group_meta(path) is None:
        return False
    return {p.name for p in path.iterdir()} - {"zarr.json"} <= _RAW_ARRAYS


def _foreign(store: Path) -> str | None:
    """Why ``store`` (raw.zarr, results.zarr, analysis.zarr) is not spndi's; None where it is, or
    is empty."""
    if not store.exists() and not store.is_symlink():
        return None
    if not store.is_dir():
        return "is a file, not a Zarr store spndi wrote" if store.is_file() else "is no folder"
    entries = sorted(store.iterdir())
    if not entries:
        return None  # an empty folder holds nothing to lose
    meta = _group_meta(store)
    if meta is None:
        return "is no Zarr store spndi wrote (no Zarr group zarr.json in it)"
    if _labelled(store):
        return None
    if store.name == "analysis.zarr" and {"fingerprint", "boundary_width"} <= set(
        meta.get("attributes") or {}
    ):
        return None  # written by spndi before analysis.zarr was labelled
    if meta.get("attributes"):
        return "is a Zarr store without spndi_dask attributes (another program's)"
    # raw.zarr's root has no attributes of its own: every group in it must be spndi's
    for entry in entries:
        if entry.name == "zarr.json":
            continue
        if entry.is_dir() and (_labelled(entry) or _unfinished_raw_group(entry)):
            continue
        return f"is a Zarr store without spndi_dask attributes ({entry.name} in it is not spndi's)"
    return None


def check_output(root: str | os.PathLike[str]) -> None:
    """Refuse an output folder whose ``raw.zarr``, ``results.zarr`` or ``analysis.zarr`` spndi
    did not write.

    Stages write into these stores and replace trees in them; an unrelated file or folder of
    that name (another program's Zarr store, someone's notes) is never touched. Absent or empty
    stores, and stores whose creation by spndi was interrupted, pass. Reads only.

    Raises
    ------
    ForeignOutputError
        Naming each such path and the fix (move it away, or choose another ``output``).

    Examples
    --------
    >>> import tempfile
    >>> out = Path(tempfile.mkdtemp())
    >>> check_output(out)  # nothing there yet
    >>> _ = (out / "raw.zarr").write_text("notes")
    >>> try:
    ...     check_output(out)
    ... except ForeignOutputError as exc:
    ...     print(str(exc).replace(str(out), "OUT"))
    the output folder OUT holds data spndi did not write, which its stages would overwrite:
        OUT/raw.zarr is a file, not a Zarr store spndi wrote
    move it away (or rename it), or set `output` in the manifest to another folder
    """
    layout = OutputLayout(root)
    if layout.root.exists() and not layout.root.is_dir():
        raise ForeignOutputError(
            f"the output {layout.root} is a file, not a folder: set `output` in the manifest to a "
            "folder (spndi makes it), or move the file away"
        )
    stores = (layout.raw, layout.results, layout.analysis, layout.decomposition)
    problems = [f"{path} {why}" for path in stores if (why := _foreign(path))]
    if problems:
        raise ForeignOutputError(
            f"the output folder {layout.root} holds data spndi did not write, which its stages "
            "would overwrite:\n    "
            + "\n    ".join(problems)
            + "\nmove it away (or rename it), or set `output` in the manifest to another folder"
        )


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


def disk_usage(path: str | os.PathLike[str]) -> int:
    """Bytes in the files under the directory ``path`` (0 if it does not exist).

    Files that vanish or cannot be read while it walks (a store being written) are skipped.
    """
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.stat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total


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
    put back. ``tmp`` and ``dest`` must be on one file system. A ``.tmp/`` folder that
    held ``tmp`` is removed once it is empty (other writers' stores keep it).
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
    if tmp.parent.name == ".tmp":
        with contextlib.suppress(OSError):  # not empty: another store is being written
            tmp.parent.rmdir()
