"""Stage outputs added to a particle's node of ``results.zarr`` (label, latent, cluster).

A stage replaces its array and records its completion under one attrs key: the key is removed
before the array is rewritten and set again only after the data are in, so an interrupted stage
never reads as complete.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import zarr

__all__ = ["mark_complete", "replace_array", "write_csv"]


def replace_array(
    node: str | Path,
    name: str,
    *,
    stage: str,
    dims: list[str],
    long_name: str,
    **create: Any,
) -> zarr.Array:
    """A new empty array ``name`` in a results node; the node's ``stage`` attrs are dropped.

    ``create`` goes to ``zarr.Group.create_array`` (shape, dtype, chunks, fill_value, ...).
    """
    group = zarr.open_group(str(node), mode="r+")
    attrs = dict(group.attrs)
    attrs.pop(stage, None)  # not complete while rewriting
    group.attrs.put(attrs)
    if name in group:
        del group[name]
    arr = group.create_array(name, dimension_names=dims, **create)
    arr.attrs.update({"long_name": long_name, "units": "1"})
    return arr


def mark_complete(node: str | Path, stage: str, info: dict[str, Any]) -> None:
    """Record a stage as complete in a results node (``attrs[stage] = info``)."""
    zarr.open_group(str(node), mode="r+").attrs.update({stage: info})


def write_csv(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """Write rows (floats as 6 significant digits) to ``path``, replacing it in one move."""
    path = Path(path)
    cols = list(rows[0]) if rows else ["particle"]
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    tmp.replace(path)
