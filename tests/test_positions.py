"""Recorded scan positions (fly scans): placement on the scan grid."""

from __future__ import annotations

import numpy as np
import pytest

from spndi_dask.positions import assign_to_grid, grid_origin


def fly_scan_order(
    scan_shape: tuple[int, int], *, snake: bool = True, overshoot: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Acquisition order of a fly scan: per line its nodes, then ``overshoot`` points past the
    line's end (every other line reversed with ``snake``).

    Returns the node (row-major index, -1 for overshoot points) and the nominal row and column
    (in steps; overshoot columns lie beyond the grid) of every recorded point.
    """
    ny, nx = scan_shape
    nodes, rows, cols = [], [], []
    for i in range(ny):
        line = list(range(nx + overshoot))
        if snake and i % 2:
            line = [nx - 1 - c for c in line]
        for c in line:
            nodes.append(i * nx + c if 0 <= c < nx else -1)
            rows.append(i)
            cols.append(c)
    return np.array(nodes), np.array(rows, float), np.array(cols, float)


# -- the placement kernel ---------------------------------------------------------------------
def test_points_on_a_jittered_snake_go_to_their_nodes_and_overshoot_is_dropped():
    # 3 × 4 grid, step 0.5 µm; hand-placed points: a snake, the first one jittered by 0.3 step,
    # 2 overshoot points per line beyond the fast axis, one point 0.2 step from node (1, 2)
    # competing with the point of that node (0.1 step away): the nearer is kept
    nodes, rows, cols = fly_scan_order((3, 4), overshoot=2)
    y = 100.0 + rows * 0.5
    x = -3.0 + cols * 0.5
    y[0] += 0.15  # 0.3 step
    extra_y, extra_x = 100.0 + 0.5, -3.0 + 2 * 0.5 + 0.1  # 0.2 step from node (1, 2)
    i = int(np.flatnonzero(nodes == 1 * 4 + 2)[0])
    x[i] += 0.05  # 0.1 step
    y, x = np.append(y, extra_y), np.append(x, extra_x)
    origin = grid_origin([y], [x], scan_shape=(3, 4), step_um=(0.5, 0.5))
    # refined by the mean offset of the 12 + 1 points on the grid: (0.15 / 13, (0.05 + 0.1) / 13)
    assert origin == pytest.approx((100.0 + 0.15 / 13, -3.0 + 0.15 / 13), abs=1e-12)
    grid = assign_to_grid(y, x, origin=(100.0, -3.0), scan_shape=(3, 4), step_um=(0.5, 0.5))
    expected = np.full(12, -1)
    expected[nodes[nodes >= 0]] = np.flatnonzero(nodes >= 0)
    assert grid.index.reshape(-1).tolist() == expected.tolist()
    assert grid.n_outside == 6 and grid.n_duplicate == 1 and grid.n_dropped == 7
    assert grid.n_empty == 0
    errors = np.sort(grid.errors_um())
    assert errors[-2:] == pytest.approx([0.05, 0.15]) and (errors[:-2] < 1e-12).all()
    assert grid.y_um[0, 0] == pytest.approx(0.15) and grid.x_um[1, 2] == pytest.approx(1.05)


def test_a_node_without_a_point_is_empty_and_nan():
    nodes, rows, cols = fly_scan_order((2, 3), snake=False)
    keep = nodes != 4
    grid = assign_to_grid(
        rows[keep] * 0.1, cols[keep] * 0.1, origin=(0.0, 0.0), scan_shape=(2, 3), step_um=(0.1, 0.1)
    )
    assert grid.index.tolist() == [[0, 1, 2], [3, -1, 4]]
    assert grid.n_empty == 1 and np.isnan(grid.y_um[1, 1]) and np.isnan(grid.x_um[1, 1])


def test_the_origin_ignores_a_whole_overshoot_column_and_far_strays():
    # a raster whose every line overshoots by one whole step: two placements hold the same
    # number of points; the scans start at node (0, 0)
    _, rows, cols = fly_scan_order((4, 5), snake=False, overshoot=1)
    y, x = 7.0 + rows * 0.2, 1.0 + cols * 0.2
    y[3], x[3] = 1e9, -1e9  # a stray reading far away: no huge histogram, no effect
    origin = grid_origin([y, y], [x, x], scan_shape=(4, 5), step_um=(0.2, 0.2))
    assert origin == pytest.approx((7.0, 1.0), abs=1e-9)
    # scanning towards -x: the scans start at the other end, the overshoot lies below the grid
    origin = grid_origin([y], [2.0 - x], scan_shape=(4, 5), step_um=(0.2, 0.2))
    assert origin == pytest.approx((7.0, 2.0 - 1.0 - 4 * 0.2), abs=1e-9)


def test_no_finite_position_is_refused():
    with pytest.raises(ValueError, match="no finite"):
        grid_origin([np.full(3, np.nan)], [np.zeros(3)], scan_shape=(1, 3), step_um=(1, 1))
