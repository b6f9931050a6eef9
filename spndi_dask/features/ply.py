"""PLY export of 3D diffraction patterns as point clouds with intensity.

The original study exchanged point clouds of thresholded voxels (detector row, column, angle
index). Here a vertex is a grid voxel above ``threshold × max`` of the pattern, with
``x, y, z`` its crystal-frame q offset from the beamtime reference vector in 1/Å (axes
``dq_x, dq_y, dq_z`` of ``results.zarr``) and ``intensity`` its value. The header comments
carry the reference vector ``h`` and the crystal axes (sample-frame 1/Å), so the absolute q of
a vertex is ``h + x·x̂_c + y·ŷ_c + z·ẑ_c``. Files are binary little-endian PLY written with
``plyfile``; any PLY reader opens them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
from plyfile import PlyData, PlyElement

from spndi_dask.analysis import group_sums
from spndi_dask.compute import compute
from spndi_dask.io.layout import atomic_path
from spndi_dask.io.results_store import open_results

__all__ = ["export_ply", "grid_comments", "load_point_cloud", "pattern_vertices", "write_ply"]


def pattern_vertices(
    pattern: np.ndarray,
    offsets: tuple[np.ndarray, np.ndarray, np.ndarray],
    *,
    threshold: float = 0.05,
) -> tuple[np.ndarray, np.ndarray]:
    """``(points (k, 3), intensity (k,))`` of the voxels at or above ``threshold × max``.

    Examples
    --------
    >>> p = np.zeros((2, 2, 2)); p[1, 0, 1] = 4.0; p[0, 0, 0] = 0.1
    >>> pts, w = pattern_vertices(p, (np.array([0.0, 0.5]),) * 3, threshold=0.5)
    >>> pts.tolist(), w.tolist()
    ([[0.5, 0.0, 0.5]], [4.0])
    """
    w = np.asarray(pattern, dtype=np.float64)
    peak = np.nanmax(w) if np.isfinite(w).any() else np.nan
    if not np.isfinite(peak) or peak <= 0:
        raise ValueError("the pattern has no positive finite intensity (masked or empty pixel)")
    idx = np.nonzero(np.nan_to_num(w, nan=0.0) >= threshold * peak)
    pts = np.stack([np.asarray(offsets[a])[idx[a]] for a in range(3)], axis=1)
    return pts.astype(np.float32), w[idx].astype(np.float32)


def write_ply(
    path: str | Path,
    points: np.ndarray,
    intensity: np.ndarray | None = None,
    *,
    comments: list[str] | None = None,
) -> Path:
    """Write a point cloud (``x, y, z`` float32 [+ ``intensity`` float32]) as binary PLY."""
    points = np.asarray(points, dtype=np.float32)
    fields = [("x", "f4"), ("y", "f4"), ("z", "f4")]
    if intensity is not None:
        fields.append(("intensity", "f4"))
    vertex = np.empty(len(points), dtype=fields)
    vertex["x"], vertex["y"], vertex["z"] = points.T
    if intensity is not None:
        vertex["intensity"] = np.asarray(intensity, dtype=np.float32)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        PlyData(
            [PlyElement.describe(vertex, "vertex")],
            text=False,
            byte_order="<",
            comments=comments or [],
        ).write(str(tmp))
    return path


def load_point_cloud(path: str | Path) -> np.ndarray:
    """A point cloud ``(n, 3)`` float32 from ``.npy`` (no pickles) or ``.ply`` (vertex x, y, z).

    Examples
    --------
    >>> import tempfile
    >>> p = write_ply(tempfile.mkdtemp() + "/c.ply", np.eye(3))
    >>> load_point_cloud(p).tolist()
    [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    """
    path = Path(path)
    if path.suffix == ".npy":
        try:
            pts = np.load(path, allow_pickle=False)
        except ValueError as exc:
            raise ValueError(f"{path}: not a plain numeric .npy array ({exc})") from None
    elif path.suffix == ".ply":
        v = PlyData.read(str(path))["vertex"]
        pts = np.stack([v["x"], v["y"], v["z"]], axis=1)
    else:
        raise ValueError(f"{path}: point clouds are read from .npy or .ply files")
    if pts.ndim != 2 or pts.shape[1] != 3 or not np.isfinite(pts).all():
        raise ValueError(f"{path}: expected finite points of shape (n, 3), got {pts.shape}")
    return pts.astype(np.float32)


def grid_comments(grid: dict[str, Any], what: str) -> list[str]:
    """PLY header comments: what the cloud is and how to get absolute q."""
    h = ", ".join(f"{v:.8g}" for v in grid["h"])
    axes = "; ".join(", ".join(f"{v:.8g}" for v in a) for a in grid["axes"])
    return [
        f"spndi_dask {what}",
        "x y z: crystal-frame q offsets (dq_x dq_y dq_z) in 1/A from the reference vector h",
        f"h (sample frame, 1/A): {h}",
        f"crystal axes x_c; y_c; z_c (sample frame): {axes}",
        "intensity: pattern value of the voxel (monitor-normalised counts)",
    ]


def export_ply(
    manifest: Any,
    particle: str,
    *,
    pixels: list[tuple[int, int]] | None = None,
    labels: list[int] | None = None,
    threshold: float = 0.05,
    out_dir: str | Path | None = None,
) -> list[Path]:
    """Write per-pixel patterns and/or label-mean patterns of a reduced scan as PLY files.

    Parameters
    ----------
    manifest : Manifest
    particle : str
        Scan name (a manifest ``[[scans]]`` entry).
    pixels : list of (y, x), optional
        Scan-pixel indices; one file ``<particle>_y{y}_x{x}.ply`` each.
    labels : list of int, optional
        Particle labels of ``spndi stats``; the mean pattern over each label's usable pixels,
        ``<particle>_label{L}.ply``.
    threshold : float
        Voxels below ``threshold × max`` are left out.
    out_dir : path, optional
        Default ``<output>/ply``.
    """
    root = manifest.layout.results
    ds = open_results(root, particle)
    if "pattern" not in ds:
        raise ValueError(f"scan '{particle}' in {root} has no q-grid patterns")
    out = Path(out_dir) if out_dir else manifest.layout.ply
    grid = ds.attrs["q_grid"]
    offsets = tuple(np.asarray(ds[d].values) for d in ("dq_x", "dq_y", "dq_z"))
    ny, nx = ds["valid"].shape
    written = []
    for y, x in pixels or []:
        if not (0 <= y < ny and 0 <= x < nx):
            raise ValueError(f"pixel ({y}, {x}) is outside the {ny}×{nx} scan '{particle}'")
        pattern = np.asarray(ds["pattern"][y, x].values)
        try:
            pts, w = pattern_vertices(pattern, offsets, threshold=threshold)  # type: ignore[arg-type]
        except ValueError as exc:
            raise ValueError(f"scan '{particle}', pixel ({y}, {x}): {exc}") from None
        comments = grid_comments(grid, f"pattern of {particle} scan pixel y={y} x={x}")
        written.append(write_ply(out / f"{particle}_y{y}_x{x}.ply", pts, w, comments=comments))
    if labels:
        if "label" not in ds:
            raise ValueError(f"scan '{particle}' has no labels; run `spndi stats` first")
        lab = np.asarray(ds["label"].values)
        for L in labels:
            if not (lab == L).any():
                raise ValueError(f"scan '{particle}' has no label {L} (labels 1..{int(lab.max())})")
        # group g = the g-th requested label; one pass over the patterns for all of them
        groups = np.full(lab.shape, -1, dtype=np.int32)
        for g, L in enumerate(labels):
            groups[lab == L] = g
        (sums,) = compute([group_sums(ds["pattern"].data, da.from_array(groups), len(labels))])
        shape = ds["pattern"].shape[2:]
        for L, row in zip(labels, np.asarray(sums), strict=True):
            total, count = row[:-1].reshape(shape), row[-1]
            if not count:
                raise ValueError(f"scan '{particle}', label {L}: no usable pattern")
            pts, w = pattern_vertices(total / count, offsets, threshold=threshold)  # type: ignore[arg-type]
            comments = grid_comments(
                grid, f"mean pattern of {particle} label {L} over {int(count)} pixels"
            )
            written.append(write_ply(out / f"{particle}_label{L}.ply", pts, w, comments=comments))
    return written
