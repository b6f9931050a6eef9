"""Recorded scan positions (fly scans) -> nodes of the regular scan grid (pure NumPy).

A fly scan records where the beam was at every frame: jittered around the nominal grid, with
lines that may run in alternating directions (snake) and overshoot past the end of the fast axis.
Ingest places each frame on the grid ``scan_shape × scan_step_um`` of the manifest:

1. The grid's origin is found once per particle, from the points of all angles together
   (:func:`grid_origin`): its sub-step phase is the circular mean of the positions modulo the
   step (per axis); its whole-step offset is the placement of the ``rows × cols`` window of
   nodes that holds the most points (ties, e.g. a raster whose every line overshoots by a whole
   step, go to the window with a corner at the nodes where the angles' scans start); then the
   origin is refined by the mean distance of those points from their nodes. Neither a jittered
   first point nor points beyond the grid move it.
2. Every point goes to its nearest node if that node is on the grid, i.e. if the point lies
   within half a step of it in both axes (:func:`assign_to_grid`); points beyond the grid are
   dropped and counted. If several points fall on one node the nearest is kept (the others are
   dropped and counted). A node without a point has no frame: ingest writes 0 and marks it
   invalid, as it does for the points an aborted scan lacks.

Examples
--------
>>> y = np.array([0.0, 0.0, 0.0, 0.5, 0.5, 0.5]) + 10.0  # snake: the second line runs back
>>> x = np.array([0.0, 0.51, 1.0, 1.02, 0.48, -0.01]) + 3.0
>>> origin = grid_origin([y], [x], scan_shape=(2, 3), step_um=(0.5, 0.5))
>>> [round(o, 3) for o in origin]
[10.0, 3.0]
>>> grid = assign_to_grid(y, x, origin=origin, scan_shape=(2, 3), step_um=(0.5, 0.5))
>>> grid.index.tolist()
[[0, 1, 2], [5, 4, 3]]
>>> round(float(grid.errors_um().max()), 3), grid.n_empty, grid.n_dropped
(0.02, 0, 0)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["GridAssignment", "assign_to_grid", "grid_origin"]


@dataclass(frozen=True)
class GridAssignment:
    """Which recorded point each node of the scan grid gets (one angle)."""

    #: (rows, cols) index of the point placed on each node, -1 where none
    index: np.ndarray
    #: (rows, cols) recorded position of that point minus the grid origin (µm), NaN where none
    y_um: np.ndarray
    x_um: np.ndarray
    #: the grid's step (µm)
    step_um: tuple[float, float]
    #: points not within half a step of a node of the grid (beyond it, or not finite)
    n_outside: int
    #: points within half a step of a node that a nearer point took
    n_duplicate: int

    @property
    def n_dropped(self) -> int:
        """Points not placed on the grid."""
        return self.n_outside + self.n_duplicate

    @property
    def n_empty(self) -> int:
        """Nodes without a point."""
        return int((self.index < 0).sum())

    def errors_um(self) -> np.ndarray:
        """Distance (µm) of every placed point from its node, in node order."""
        ny, nx = self.index.shape
        dy = self.y_um - np.arange(ny)[:, None] * self.step_um[0]
        dx = self.x_um - np.arange(nx)[None, :] * self.step_um[1]
        return np.hypot(dy, dx)[self.index >= 0]


def grid_origin(
    y: Sequence[np.ndarray],
    x: Sequence[np.ndarray],
    *,
    scan_shape: tuple[int, int],
    step_um: tuple[float, float],
) -> tuple[float, float]:
    """Position (µm) of node (0, 0) of the scan grid that fits the recorded points best.

    Parameters
    ----------
    y, x : sequence of arrays
        Recorded positions (µm) of every point, one array per angle in acquisition order.
    scan_shape : (rows, cols)
    step_um : (row step, col step)

    Returns
    -------
    (float, float)
        The origin shared by all angles: the placement of the grid that holds the most points
        within half a step of a node (module docstring).
    """
    ys = np.concatenate([np.asarray(v, dtype=np.float64).reshape(-1) for v in y])
    xs = np.concatenate([np.asarray(v, dtype=np.float64).reshape(-1) for v in x])
    ok = np.isfinite(ys) & np.isfinite(xs)
    if not ok.any():
        raise ValueError("no finite recorded position")
    ys, xs = ys[ok], xs[ok]
    sy, sx = step_um
    # sub-step phase: circular mean of the positions modulo the step (jitter averages out)
    phase = [_phase(v, s) for v, s in ((ys, sy), (xs, sx))]
    iy = np.rint((ys - phase[0]) / sy).astype(np.int64)
    ix = np.rint((xs - phase[1]) / sx).astype(np.int64)
    ny, nx = scan_shape
    # points per lattice node around the point nearest the median (the window that holds the
    # most points holds the median if it holds more than half of them): a stray position far
    # away cannot make the histogram huge
    centre = int(np.argmin(np.abs(iy - np.median(iy)) + np.abs(ix - np.median(ix))))
    y0 = int(iy[centre]) - 2 * ny
    x0 = int(ix[centre]) - 2 * nx
    near = (iy >= y0) & (iy < y0 + 4 * ny) & (ix >= x0) & (ix < x0 + 4 * nx)
    hist = np.zeros((4 * ny, 4 * nx), np.int64)
    np.add.at(hist, (iy[near] - y0, ix[near] - x0), 1)
    table = np.zeros((4 * ny + 1, 4 * nx + 1), np.int64)
    table[1:, 1:] = hist.cumsum(0).cumsum(1)
    counts = table[ny:, nx:] - table[:-ny, nx:] - table[ny:, :-nx] + table[:-ny, :-nx]
    # counts[i, j]: points in the window whose node (0, 0) is lattice node (y0 + i, x0 + j)
    best = np.argwhere(counts == counts.max())
    if len(best) > 1:  # ties: the window with a corner nearest where the scans start
        starts = [
            (np.rint((v[0] - phase[0]) / sy), np.rint((u[0] - phase[1]) / sx))
            for v, u in zip(y, x, strict=True)
            if np.size(v) and np.isfinite(v[0]) and np.isfinite(u[0])
        ]
        sy0, sx0 = np.median(starts, axis=0) if starts else (y0 + 2 * ny, x0 + 2 * nx)
        wy = best[:, 0] + y0
        wx = best[:, 1] + x0
        dy = np.minimum(np.abs(sy0 - wy), np.abs(sy0 - (wy + ny - 1)))
        dx = np.minimum(np.abs(sx0 - wx), np.abs(sx0 - (wx + nx - 1)))
        best = best[np.lexsort((best[:, 1], best[:, 0], dy + dx))]
    wy, wx = int(best[0, 0] + y0), int(best[0, 1] + x0)
    # refine: the mean offset of the points inside the window from their nodes
    inside = (iy >= wy) & (iy < wy + ny) & (ix >= wx) & (ix < wx + nx)
    origin_y = phase[0] + wy * sy
    origin_x = phase[1] + wx * sx
    origin_y += float(np.mean(ys[inside] - phase[0] - iy[inside] * sy))
    origin_x += float(np.mean(xs[inside] - phase[1] - ix[inside] * sx))
    return float(origin_y), float(origin_x)


def _phase(values: np.ndarray, step: float) -> float:
    """A node of the lattice of spacing ``step`` that fits ``values`` best (their circular mean
    modulo ``step``)."""
    # relative to a point of the data: keeps the angles small for large absolute positions
    ref = float(values[0])
    turns = (values - ref) / step
    angle = np.angle(np.mean(np.exp(2j * np.pi * (turns - np.rint(turns)))))
    return ref + float(angle) / (2 * np.pi) * step


def assign_to_grid(
    y: np.ndarray,
    x: np.ndarray,
    *,
    origin: tuple[float, float],
    scan_shape: tuple[int, int],
    step_um: tuple[float, float],
) -> GridAssignment:
    """Place one angle's recorded points on the nodes of the scan grid.

    Parameters
    ----------
    y, x : array (n_points,)
        Recorded positions (µm) in acquisition order (the frames' order).
    origin : (float, float)
        Position of node (0, 0) (:func:`grid_origin`).
    scan_shape, step_um
        The grid.

    Returns
    -------
    GridAssignment
        Per node the point placed on it (the nearest of the points within half a step in both
        axes), or -1.
    """
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    ny, nx = scan_shape
    sy, sx = step_um
    with np.errstate(invalid="ignore"):
        fy = (y - origin[0]) / sy
        fx = (x - origin[1]) / sx
        iy, ix = np.rint(fy), np.rint(fx)
        inside = (iy >= 0) & (iy < ny) & (ix >= 0) & (ix < nx)  # NaN: False
    cand = np.flatnonzero(inside)
    node = (iy[cand] * nx + ix[cand]).astype(np.int64)
    dist2 = ((fy[cand] - iy[cand]) * sy) ** 2 + ((fx[cand] - ix[cand]) * sx) ** 2
    order = np.lexsort((cand, dist2, node))  # per node: nearest first, then earliest
    node, cand = node[order], cand[order]
    first = np.ones(node.size, bool)
    first[1:] = node[1:] != node[:-1]
    keep, nodes = cand[first], node[first]
    index = np.full(ny * nx, -1, np.int64)
    index[nodes] = keep
    pos_y = np.full(ny * nx, np.nan)
    pos_x = np.full(ny * nx, np.nan)
    pos_y[nodes] = y[keep] - origin[0]
    pos_x[nodes] = x[keep] - origin[1]
    return GridAssignment(
        index=index.reshape(ny, nx),
        y_um=pos_y.reshape(ny, nx),
        x_um=pos_x.reshape(ny, nx),
        step_um=(float(sy), float(sx)),
        n_outside=int(y.size - cand.size),
        n_duplicate=int(cand.size - keep.size),
    )
