"""Recorded scan positions (fly scans): grid placement, ingest, and accuracy after reduce."""

from __future__ import annotations

import logging

import h5py
import hdf5plugin
import numpy as np
import pytest
import zarr

from spndi_dask.config import Manifest
from spndi_dask.ingest import IngestError, ingest
from spndi_dask.io.raw_store import open_raw
from spndi_dask.positions import assign_to_grid, grid_origin
from spndi_dask.reduce import open_results, reduce
from spndi_dask.simulate import errors_vs_truth, preset, simulate_beamtime

from .conftest import load, manifest_dict, write_angle_files

FRAMES = "/entry/instrument/detector/data"
MONITOR = "/entry/instrument/monitor/Io"
XRF = "/entry/instrument/xrf/Co_K"
POS_Y = "/entry/instrument/positions/y"
POS_X = "/entry/instrument/positions/x"
POSITIONS = {"y": POS_Y, "x": POS_X}


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


def rewrite_as_fly_scan(
    paths,
    scan_shape,
    step_um,
    *,
    jitter: float = 0.0,
    overshoot: int = 0,
    snake: bool = True,
    origin_um=(12.34, -5.67),
    units: str = "nm",
    first_offset: tuple[float, float] = (0.0, 0.0),
    seed: int = 0,
    drop: dict[int, list[int]] | None = None,
) -> list[np.ndarray]:
    """Rewrite raster-ordered angle files as fly scans with recorded positions.

    The frames (and monitor, XRF) of each node are kept but stored in the fly scan's order;
    overshoot points get frames of zeros. Positions: node + gaussian jitter (``jitter`` steps),
    the first point moved by ``first_offset`` steps more, in ``units``. ``drop``: per angle
    nodes whose point is left out. Returns per angle the node of every written point.
    """
    rng = np.random.default_rng(seed)
    scale = {"um": 1.0, "nm": 1e3, "mm": 1e-3}[units]
    written = []
    for a, path in enumerate(paths):
        nodes, rows, cols = fly_scan_order(scan_shape, snake=snake, overshoot=overshoot)
        if drop and a in drop:
            keep = ~np.isin(nodes, drop[a])
            nodes, rows, cols = nodes[keep], rows[keep], cols[keep]
        with h5py.File(path, "r") as f:
            frames = f[FRAMES][()]
            vectors = {k: f[k][()] for k in (MONITOR, XRF) if k in f}
        y = origin_um[0] + (rows + jitter * rng.standard_normal(rows.size)) * step_um[0]
        x = origin_um[1] + (cols + jitter * rng.standard_normal(cols.size)) * step_um[1]
        y[0] += first_offset[0] * step_um[0]
        x[0] += first_offset[1] * step_um[1]
        out = np.zeros((nodes.size, *frames.shape[1:]), frames.dtype)
        out[nodes >= 0] = frames[nodes[nodes >= 0]]
        with h5py.File(path, "w") as f:
            f.create_dataset(
                FRAMES, data=out, chunks=(1, *out.shape[1:]), **hdf5plugin.Bitshuffle(cname="lz4")
            )
            for k, v in vectors.items():
                f.create_dataset(k, data=np.where(nodes >= 0, v[np.maximum(nodes, 0)], 1.0))
            f.create_dataset(POS_Y, data=y * scale)
            f.create_dataset(POS_X, data=x * scale)
        written.append(nodes)
    return written


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


# -- ingest -----------------------------------------------------------------------------------
def _handmade(tmp_path, *, scan_shape=(6, 7), n_angles=3, seed=1):
    rng = np.random.default_rng(seed)
    frames = rng.poisson(3.0, size=(n_angles, *scan_shape, 9, 10)).astype(np.uint16)
    monitor = rng.uniform(0.9, 1.1, size=frames.shape[:3])
    xrf = rng.uniform(0, 10, size=frames.shape[:3])
    paths = write_angle_files(tmp_path, frames, monitor=monitor, xrf=xrf)
    data = manifest_dict(n_angles=n_angles, scan_shape=scan_shape, monitor=MONITOR, xrf=XRF)
    data["ingest"] = {"scan_chunk": [2, 2], "scan_shard": [4, 4], "detector_chunk": [4, 4]}
    return paths, data, frames, monitor, xrf


def test_positions_exactly_on_the_grid_give_the_raster_ingest_bit_for_bit(tmp_path):
    paths, data, frames, *_ = _handmade(tmp_path)
    plain = load(tmp_path, data)
    ingest(plain)
    raster = zarr.open_group(str(plain.output_dir / "raw.zarr" / "p1"), mode="r")
    # the same frames in raster order, with their positions (in mm) written beside them
    for path in paths:
        with h5py.File(path, "r+") as f:
            rows, cols = np.divmod(np.arange(6 * 7), 7)
            f[POS_Y] = (3.0 + rows * 0.05) * 1e-3
            f[POS_X] = (-2.0 + cols * 0.05) * 1e-3
    data["scans"][0]["positions"] = {**POSITIONS, "units": "mm"}
    data["output"] = "results_positions"
    m = load(tmp_path, data)
    ingest(m)
    group = zarr.open_group(str(m.output_dir / "raw.zarr" / "p1"), mode="r")
    for name in ("frames", "monitor", "xrf", "valid", "det_sum"):
        assert np.array_equal(group[name][...], raster[name][...]), name
    ds = open_raw(m.output_dir, "p1")
    assert np.array_equal(ds.frames.values, frames) and ds.valid.values.all()
    info = ds.attrs["positions"]
    assert info["origin_um"] == pytest.approx([3.0, -2.0], abs=1e-9)
    assert info["max_error_um"] < 1e-9 and info["points_dropped"] == info["nodes_empty"] == 0
    assert ds.attrs["scan_order"] == "recorded positions"
    # positions are kept, in µm from node (0, 0): the node coordinates themselves here
    np.testing.assert_allclose(
        ds.position_y.values, np.broadcast_to(ds.y.values[:, None], (3, 6, 7)), atol=1e-9
    )
    np.testing.assert_allclose(
        ds.position_x.values, np.broadcast_to(ds.x.values, (3, 6, 7)), atol=1e-9
    )


def test_a_jittered_overshooting_snake_is_placed_on_the_grid(tmp_path, caplog):
    paths, data, frames, monitor, xrf = _handmade(tmp_path)
    # angle 1 lacks the point of node (2, 3): that node is invalid there
    written = rewrite_as_fly_scan(
        paths,
        (6, 7),
        (0.05, 0.05),
        jitter=0.1,
        overshoot=2,
        first_offset=(0.3, -0.3),
        drop={1: [2 * 7 + 3]},
    )
    data["scans"][0]["positions"] = {**POSITIONS, "units": "nm"}
    m = load(tmp_path, data)
    with caplog.at_level(logging.WARNING, logger="spndi_dask"):
        summary = ingest(m)
    assert summary["p1"]["status"] == "ingested"
    assert (
        "1 scan grid node(s) at 1 angle(s) (indices [1]) have no recorded position" in caplog.text
    )
    ds = open_raw(m.output_dir, "p1")
    valid = ds.valid.values
    assert not valid[1, 2, 3] and valid.sum() == valid.size - 1
    expected = frames.copy()
    expected[1, 2, 3] = 0
    assert np.array_equal(ds.frames.values, expected)
    exp_monitor = monitor.copy()
    exp_monitor[1, 2, 3] = 1.0
    exp_xrf = xrf.copy()
    exp_xrf[1, 2, 3] = np.nan
    assert np.array_equal(ds.monitor.values, exp_monitor)
    assert np.array_equal(ds.xrf.values, exp_xrf, equal_nan=True)
    assert (
        np.isnan(ds.position_y.values[1, 2, 3])
        and np.isfinite(ds.position_y.values).sum() == valid.sum()
    )
    info = ds.attrs["positions"]
    # every recorded point's error, from the files: node (i, j) is at origin + (i, j) × step
    errors = []
    origin = info["origin_um"]
    for path, nodes in zip(paths, written, strict=True):
        with h5py.File(path, "r") as f:
            y, x = f[POS_Y][()] * 1e-3, f[POS_X][()] * 1e-3
        i, j = np.divmod(nodes[nodes >= 0], 7)
        errors.append(
            np.hypot(y[nodes >= 0] - origin[0] - i * 0.05, x[nodes >= 0] - origin[1] - j * 0.05)
        )
    errors = np.concatenate(errors)
    assert info["max_error_um"] == pytest.approx(errors.max(), rel=1e-9)
    assert info["rms_error_um"] == pytest.approx(np.sqrt(np.mean(errors**2)), rel=1e-9)
    # the mean of 126 jittered points (σ 0.1 step) and one 0.3 step off: within 1/20 step
    assert info["origin_um"] == pytest.approx([12.34, -5.67], abs=0.05 * 0.05)
    assert info["points_outside_grid"] == 3 * 6 * 2 and info["points_on_taken_node"] == 0
    assert info["nodes_empty"] == 1 and info["nodes_empty_per_angle"] == [0, 1, 0]
    assert ds.attrs["incomplete_angles"] == [1]
    # up to date on a re-run (the index maps are planned the same way)
    assert ingest(m)["p1"]["status"] == "up to date"


def test_resume_and_switching_positions_on_and_off(tmp_path, monkeypatch):
    import dask

    import spndi_dask.ingest.write as ingest_write

    paths, data, frames, monitor, xrf = _handmade(tmp_path)
    plain = load(tmp_path, data)
    ingest(plain)
    assert "position_y" not in open_raw(plain.output_dir, "p1")
    rewrite_as_fly_scan(paths, (6, 7), (0.05, 0.05), jitter=0.1, overshoot=1)
    data["scans"][0]["positions"] = {**POSITIONS, "units": "nm"}
    m = load(tmp_path, data)
    real = ingest_write._write_tile

    def dies_on_angle_1(*args, **kwargs):
        if args[3] == 1:
            raise OSError("worker killed")
        return real(*args, **kwargs)

    # the plain store is replaced by one with positions; an ingest killed half-way resumes
    monkeypatch.setattr(ingest_write, "_write_tile", dies_on_angle_1)
    with dask.config.set(scheduler="sync"), pytest.raises(IngestError, match="worker killed"):
        ingest(m)
    monkeypatch.setattr(ingest_write, "_write_tile", real)
    done = zarr.open_array(str(m.output_dir / "raw.zarr/p1/done"), mode="r")[:]
    assert done[1] == 0
    assert ingest(m)["p1"]["angles_written"] == (done == 0).sum()
    ds = open_raw(m.output_dir, "p1")
    assert np.array_equal(ds.frames.values, frames) and np.isfinite(ds.position_x.values).all()
    assert ingest(m)["p1"]["status"] == "up to date"
    # raster files without positions again: the position arrays go
    write_angle_files(tmp_path, frames, monitor=monitor, xrf=xrf)
    del data["scans"][0]["positions"]
    ingest(load(tmp_path, data))
    ds = open_raw(m.output_dir, "p1")
    assert "position_y" not in ds and np.array_equal(ds.frames.values, frames)


def test_a_fly_scan_split_across_files_reads_as_one(tmp_path):
    paths, data, *_ = _handmade(tmp_path)
    rewrite_as_fly_scan(paths, (6, 7), (0.05, 0.05), jitter=0.15, overshoot=2, seed=5)
    data["scans"][0]["positions"] = {**POSITIONS, "units": "nm"}
    whole = load(tmp_path, data)
    ingest(whole)
    # each angle's 54 points in files of 20 and 34, positions with them, frames as (2, 10, r, c)
    listing = []
    for a, path in enumerate(paths):
        with h5py.File(path, "r") as f:
            content = {k: f[k][()] for k in (FRAMES, MONITOR, XRF, POS_Y, POS_X)}
        names = []
        for k, (lo, hi) in enumerate([(0, 20), (20, 54)]):
            name = f"fly/angle_{a}_{k}.h5"
            (tmp_path / name).parent.mkdir(exist_ok=True)
            with h5py.File(tmp_path / name, "w") as f:
                for key, value in content.items():
                    part = value[lo:hi]
                    if key == FRAMES and k == 0:
                        part = part.reshape(2, 10, *part.shape[1:])
                    f[key] = part
            names.append(name)
        listing.append(names)
    data["scans"][0]["frames"] = listing
    data["output"] = "results_split"
    split = load(tmp_path, data)
    ingest(split)
    a, b = open_raw(whole.output_dir, "p1"), open_raw(split.output_dir, "p1")
    for name in ("frames", "monitor", "xrf", "valid", "position_y", "position_x"):
        assert np.array_equal(a[name].values, b[name].values, equal_nan=True), name
    info_a, info_b = a.attrs["positions"], b.attrs["positions"]
    assert info_a == info_b and info_a["points_outside_grid"] == 3 * 6 * 2


def test_positions_whose_length_is_not_the_frames_are_refused(tmp_path):
    paths, data, *_ = _handmade(tmp_path)
    rewrite_as_fly_scan(paths, (6, 7), (0.05, 0.05))
    with h5py.File(paths[2], "r+") as f:
        x = f[POS_X][()]
        del f[POS_X]
        f[POS_X] = x[:-1]
    data["scans"][0]["positions"] = POSITIONS
    m = load(tmp_path, data)
    with pytest.raises(IngestError) as info:
        ingest(m)
    msg = str(info.value)
    assert "scan 'p1'" in msg and "angle_002.h5" in msg and POS_X in msg
    assert "41 values for 42 frames" in msg and "remove `positions`" in msg
    assert not m.layout.raw_node("p1").exists()


def test_positions_in_other_units_than_said_are_refused(tmp_path):
    paths, data, *_ = _handmade(tmp_path)
    rewrite_as_fly_scan(paths, (6, 7), (0.05, 0.05), units="nm")
    data["scans"][0]["positions"] = POSITIONS  # µm: the scan looks 1000 times too large
    m = load(tmp_path, data)
    with pytest.raises(IngestError) as info:
        ingest(m)
    msg = str(info.value)
    assert "only 3 of 126 recorded positions" in msg and POS_Y in msg and "angle_000.h5" in msg
    assert "span 250 × 300 µm (read as 'um'), the grid 0.25 × 0.3 µm" in msg
    assert "check `positions.units`" in msg
    assert not m.layout.raw_node("p1").exists()


def test_more_frames_than_nodes_need_positions(tmp_path):
    paths, data, *_ = _handmade(tmp_path)
    rewrite_as_fly_scan(paths, (6, 7), (0.05, 0.05), overshoot=1)
    with pytest.raises(IngestError, match=r"has 48 frames, scan_shape 6×7 needs 42.*`positions`"):
        ingest(load(tmp_path, data))


# -- accuracy against simulated ground truth --------------------------------------------------
_errors = errors_vs_truth  # as in tests/reduce/test_reduce.py


@pytest.fixture(scope="module")
def accuracy(tmp_path_factory):
    """Errors of the ideal raster and of the same frames as a jittered fly scan."""
    out = tmp_path_factory.mktemp("fly")
    m = simulate_beamtime(out, preset("small", n_particles=1), scheduler="sync")
    ingest(m)
    reduce(m)
    ideal = _errors(open_results(m.output_dir, "p1").compute(), out / "ground_truth" / "p1.npz")
    p = m.scans[0]
    rewrite_as_fly_scan(
        p.frame_paths(m.base_dir),
        p.scan_shape,
        p.scan_step_um,
        jitter=0.15,
        overshoot=2,
        first_offset=(0.25, -0.25),
        seed=3,
    )
    data = m.to_dict()
    data["scans"][0]["positions"] = {**POSITIONS, "units": "nm"}
    data["output"] = "results_fly"
    fly = Manifest.from_dict(data, base_dir=out, source=str(out / "beamtime.toml"))
    ingest(fly)
    reduce(fly)
    result = open_results(fly.output_dir, "p1").compute()
    jittered = _errors(result, out / "ground_truth" / "p1.npz")
    return ideal, jittered, open_raw(fly.output_dir, "p1"), result


def test_a_jittered_fly_scan_is_nearly_as_accurate_as_the_ideal_grid(accuracy):
    ideal, jittered, raw, _ = accuracy
    info = raw.attrs["positions"]
    print(f"ideal {ideal}\njittered {jittered}\npositions {info}")
    for key in ("d", "tilt_x", "tilt_y"):
        assert jittered[key] <= 2 * ideal[key], (key, ideal, jittered)
    assert jittered["coverage"] >= ideal["coverage"] - 0.02, (ideal, jittered)
    assert jittered["drift"] <= max(2 * ideal["drift"], 0.1), (ideal, jittered)
    # σ = 0.15 step jitter: a placed point lies within half a step of its node in both axes
    assert info["max_error_um"] < 0.5 * np.hypot(0.05, 0.05)
    assert 0.1 * 0.05 < info["rms_error_um"] < 0.3 * 0.05
    assert info["points_outside_grid"] == 15 * 20 * 2  # angles × lines × overshoot points


def test_reduce_masks_the_empty_nodes_of_a_fly_scan(accuracy):
    *_, raw, result = accuracy
    empty = ~raw["valid"].values  # (angle, y, x): nodes without a recorded point
    assert 0 < empty.sum() == raw.attrs["positions"]["nodes_empty"]
    # reduce flags exactly the pixels with a missing angle and still measures them
    flagged = (result["quality"].values.astype(int) & 4) > 0
    assert np.array_equal(flagged, empty.any(axis=0))
    valid = result["valid"].values
    for var in ("d_spacing", "strain", "tilt_x"):
        assert (
            np.isfinite(result[var].values[valid]).all()
            and np.isnan(result[var].values[~valid]).all()
        )
