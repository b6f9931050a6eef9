"""What each angle was ingested from (its ``sources`` record), and keeping those records
true when files move or an ingest was interrupted.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr

from spndi_dask.io.hashing import relative_to, sha256_file, source_parts
from spndi_dask.io.layout import read_attrs
from spndi_dask.io.raw_store import ANGLE_SOURCES
from spndi_dask.io.sources import SourceInfo

if TYPE_CHECKING:
    from spndi_dask.ingest.plan import IngestPlan

logger = logging.getLogger(__name__)


def _recorded_paths(record: dict[str, Any] | None) -> list[str]:
    return [part.get("path") for part in source_parts(record)]


#: µm per unit of recorded positions


def _source_record(
    source: SourceInfo,
    base_dir: str | Path,
    checksum: str,
    previous: dict[str, Any] | None = None,
    *,
    stat: bool = True,
) -> dict[str, Any]:
    """An angle's ``sources`` record: path, relative path, size, modification time, SHA-256 and
    points of its file, or of each of its files under ``parts`` (a split scan).

    ``stat``: the files' size and time now (else as probed); ``previous``: a record of the same
    content whose SHA-256 is kept instead of hashing the files again.
    """
    old = source_parts(previous)
    parts = []
    for i, part in enumerate(source.parts):
        size, mtime = part.size, part.mtime_ns
        if stat:
            st = os.stat(part.path)
            size, mtime = st.st_size, st.st_mtime_ns
        if i < len(old) and len(old) == len(source.parts):
            sha = old[i].get("sha256")
        else:
            sha = sha256_file(part.path) if checksum == "sha256" else None
        parts.append(
            {
                "path": part.path,
                "relpath": relative_to(part.path, base_dir),
                "size": size,
                "mtime_ns": mtime,
                "sha256": sha,
                "n_points": part.n_points,
            }
        )
    zeroed = (previous or {}).get("zeroed_values", 0)
    if len(parts) == 1:
        return {**parts[0], "zeroed_values": zeroed}
    return {
        "path": parts[0]["path"],
        "relpath": parts[0]["relpath"],
        "parts": parts,
        "n_points": source.n_points,
        "zeroed_values": zeroed,
    }


def _refresh(plan: IngestPlan, sources: list[dict[str, Any] | None]) -> None:
    """Record the angles that are done but whose record is out of date: files moved or touched
    that hold the same data, and angles written before an interrupted ingest could record them
    (their records, and their done marks for the new modification time)."""
    if not plan.moved:
        return
    done = zarr.open_group(plan.group_url, mode="r+")["done"]
    sources += [None] * (len(plan.sources) - len(sources))
    for a, rec in plan.moved.items():
        kept = rec or _angle_record(plan.group_url, a)
        if not rec and kept and _recorded_paths(kept) == plan.sources[a].paths:
            sources[a] = kept  # finished, then interrupted before _finalize recorded it
        else:  # stores written before angles kept their records hash the files again
            sources[a] = _source_record(
                plan.sources[a], plan.base_dir, plan.checksum, kept or None, stat=False
            )
        done[a] = np.uint64(plan.fingerprints[a])


def _angle_record(group_url: str, angle: int) -> dict[str, Any] | None:
    """The source record :func:`_finish_angle` kept for one angle (None: none, an old store)."""
    return read_attrs(Path(group_url) / ANGLE_SOURCES / str(angle)) or None


def _keep_moved(plan: IngestPlan) -> None:
    """An up-to-date particle with out-of-date source records: only the records are updated."""
    group = zarr.open_group(plan.group_url, mode="r+")
    attrs = dict(group.attrs)
    sources = list(attrs.get("sources") or [])
    _refresh(plan, sources)
    group.attrs.put({**attrs, "sources": sources})
    logger.info(
        "scan '%s': %d angle file(s) moved, touched or unrecorded since ingest hold the "
        "ingested data: kept",
        plan.name,
        len(plan.moved),
    )


def _clear_angles(plan: IngestPlan) -> None:
    """Before angles of an existing store are written again: mark them not done, the store not
    complete, and delete their shards (a damaged shard is never read to be rewritten)."""
    group = zarr.open_group(plan.group_url, mode="r+")
    group.attrs.put(
        {**dict(group.attrs), "spndi_dask": {**plan.attrs["spndi_dask"], "complete": False}}
    )
    group.require_group(ANGLE_SOURCES)  # a store written before angles kept their records
    frames = Path(plan.group_url) / "frames" / "c"
    for a in plan.todo:
        group["done"][a] = 0
        shutil.rmtree(frames / str(a), ignore_errors=True)
