"""Reduce: kernels against hand-worked cases, laziness, results layout, accuracy, bad input."""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import xarray as xr
import zarr

from spndi_dask.config import Manifest
from spndi_dask.geometry import q_sample
from spndi_dask.ingest import ingest
from spndi_dask.kernels import shift_maps
from spndi_dask.reduce import (
    ReduceError,
    beamtime_grid,
    open_results,
    plan_particle,
    reduce,
    reduce_particle,
)
from spndi_dask.reduce import _kernels as K
from spndi_dask.simulate import (
    SIGMA_QUANTITIES,
    errors_vs_truth,
    preset,
    sigma_z_vs_truth,
    simulate_beamtime,
)

from ..conftest import load, manifest_dict, write_angle_files


def _ready(tmp_path, config, **reduce_settings) -> Manifest:
    m = simulate_beamtime(tmp_path, config, scheduler="sync")
    if reduce_settings:
        d = m.to_dict()
        d["reduce"] = reduce_settings
        m = Manifest.from_dict(d, base_dir=tmp_path, source=str(tmp_path / "beamtime.toml"))
    ingest(m)
    return m


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_reduce")
    m = _ready(out, preset("tiny"))
    summary = reduce(m)
    return out, m, summary


_errors = errors_vs_truth  # RMS of d (relative), tilts (rad), drift, coverage


# -- kernels ----------------------------------------------------------------------------------
def test_moments_of_a_sampled_gaussian_give_its_centre_and_width():
    g = np.linspace(-0.01, 0.01, 41)
    dq = np.stack(np.meshgrid(g, g, g, indexing="ij"), -1)  # (41, 41, 41, 3): angle, row, col
    centre, sigma = np.array([1e-3, -2e-3, 5e-4]), np.array([1.5e-3, 1e-3, 2e-3])
    w = np.exp(-0.5 * (((dq - centre) / sigma) ** 2).sum(-1)).astype(np.float32)
    m = K.moment_sums(w[:, None, None], w[:, None, None], dq, np.arange(41), np.arange(41))
    maps = K.maps_from_moments(m.sum(axis=0), np.zeros(3), np.eye(3))
    np.testing.assert_allclose(maps["q_com"][0, 0], centre, atol=1e-7)
    got = [maps[f"width_{a}"][0, 0] for a in "xyz"]
    np.testing.assert_allclose(got, sigma, rtol=1e-3)
    assert maps["det_row"][0, 0] == pytest.approx(20 + centre[1] / 5e-4, abs=1e-3)


def test_no_signal_is_nan_and_invalid_never_inf():
    m = np.zeros((2, 3, len(K.MOMENTS)))
    var = K.MOMENTS.index("var")
    m[0, 0, 0], m[0, 0, var] = 100.0, 100.0  # SNR 10: valid
    m[0, 1, 0], m[0, 1, var] = 10.0, 100.0  # SNR 1: not valid
    m[1, 0, 0] = -5.0  # negative after background subtraction
    maps = K.maps_from_moments(m, np.array([0.0, 0.0, 1.0]), np.eye(3))
    assert maps["valid"].tolist() == [[True, False, False], [False, False, False]]
    for key in ("intensity", "width_x", "det_row"):
        assert not np.isinf(maps[key]).any()
        assert np.isnan(maps[key][~maps["valid"]]).all()


def test_corrections_dark_flat_monitor_background_masks():
    frames = np.full((1, 1, 2, 2, 2), 10, dtype=np.uint16)
    frames[0, 0, 1, 1, 1] = 65535  # saturated
    scale = np.array([[[2.0, 0.0]]])  # second point invalid
    bad = np.array([[False, True], [False, False]])
    w, var = K.corrected(
        frames,
        scale=scale,
        background=np.array([1.0]),
        dark=np.full((2, 2), 2.0),
        flat=np.full((2, 2), 0.5),
        bad=bad,
        saturation=65535,
    )
    # (10 - 2) / 0.5 * 2 - 1 = 31
    assert w[0, 0, 0].tolist() == [[31.0, 0.0], [31.0, 31.0]]
    assert (w[0, 0, 1] == 0).all() and (var[0, 0, 1] == 0).all()
    assert var[0, 0, 0, 0, 0] == pytest.approx(8 / 0.25 * 4)


@pytest.mark.parametrize("dtype", [np.uint16, np.float32])
def test_fused_block_kernel_equals_the_numpy_reference(dtype):
    """The numba one-pass block kernel reproduces corrected → moment_sums / patterns_block."""
    from scipy import sparse

    from spndi_dask.reduce import _fused as F

    rng = np.random.default_rng(7)
    na, ty, tx, nr, nc, halo = 5, 6, 7, 9, 8, 2
    raw = rng.poisson(20, (na, ty + 2 * halo, tx + 2 * halo, nr, nc)).astype(dtype)
    raw[1, 3, 4, 2, 2] = 65535  # saturated
    if dtype == np.float32:
        raw[2, 4, 5, 1, 1] = np.nan
    scale = rng.uniform(0.8, 1.2, raw.shape[:3]).astype(np.float32)
    scale[3, 5, 5] = 0.0  # invalid point
    scale[:, :halo] = 0.0  # outside the scan
    dark = rng.uniform(0, 2, (nr, nc))
    flat = rng.uniform(0.8, 1.2, (nr, nc))
    bad = np.zeros((nr, nc), bool)
    bad[4, 4] = True
    bad[:, 6] = True  # a gap column: filled from its neighbours
    raw[2, 3, 3, 5, 1] = 65535  # saturated at a valid point, pixel not masked: counted
    raw[2, 3, 3, 5, 6] = 65535  # ... in a masked pixel: not counted
    fill = K.fill_operator(bad)
    background = rng.uniform(0, 1, na)
    drift = np.array([[0.0, 0.0], [0.4, -1.3], [-2.0, 1.5], [1.7, 0.2], [-0.3, -2.0]])
    dq = rng.normal(size=(na, nr, nc, 3))
    rows, cols = np.arange(10, 10 + nr), np.arange(3, 3 + nc)
    # a sparse trilinear-like operator that leaves some voxels unused
    n_grid, nv = 40, na * nr * nc
    op = sparse.random(n_grid, nv, density=0.02, random_state=1, dtype=np.float32).tocsr()

    w, var = K.corrected(
        raw,
        scale=scale,
        background=background,
        dark=dark,
        flat=flat,
        bad=bad,
        saturation=65535,
    )
    core = (slice(None), slice(halo, -halo), slice(halo, -halo))
    saturated = (raw[core] >= 65535) & ~bad & (scale[core] != 0)[..., None, None]
    assert saturated.sum() == 2
    want_m = K.moment_sums(w[core], var[core], dq, rows, cols, fill=fill, saturated=saturated)
    filled_op = K.fill_patterns_operator(op, fill, na)
    want_p = K.patterns_block(w, drift, filled_op, halo=halo, out_shape=(ty, tx))
    # the fill is the harmonic interpolation: the filled voxels, then the plain sums
    w_filled = (w.reshape(-1, nr * nc) @ fill.T.toarray()).reshape(w.shape)
    plain = K.moment_sums(w_filled[core], var[core], dq, rows, cols)
    np.testing.assert_allclose(want_m[..., :12], plain[..., :12], rtol=1e-4, atol=1e-2)
    np.testing.assert_allclose(
        want_m[..., 12], (w_filled - w)[core].sum(axis=(3, 4)), rtol=1e-4, atol=1e-2
    )
    np.testing.assert_array_equal(want_m[..., 14], saturated.sum(axis=(3, 4)))

    offset, gain = F.correction_tables((nr, nc), dark=dark, flat=flat, bad=bad)
    features, var_weight = K.filled_features(K.moment_features(dq, rows, cols), fill)
    used_op, voxels = K.used_voxels(filled_op, na)
    assert used_op.shape[1] < nv
    kwargs = dict(
        offset=offset,
        gain=gain,
        background=background,
        saturation=65535,
        features=features,
        var_weight=var_weight,
        operator=used_op,
        voxels=voxels,
        halo=halo,
    )
    F.block_reduce(raw, scale, drift, **kwargs)
    # the kernels reuse per-thread scratch: what a previous block left there is never read
    for buf in F._LOCAL.buffers.values():
        buf[:] = np.nan
    moments, patterns = F.block_reduce(raw, scale, drift, **kwargs)
    scale_m = np.abs(want_m).max(axis=(0, 1, 2))
    np.testing.assert_allclose(moments / scale_m, want_m / scale_m, atol=2e-6)
    np.testing.assert_allclose(patterns.reshape(want_p.shape), want_p, rtol=1e-5, atol=1e-3)
    assert np.isfinite(moments).all() and np.isfinite(patterns).all()
    # a drift beyond the halo is refused, not silently wrapped
    with pytest.raises(ValueError, match="exceeds the halo"):
        F.block_reduce(raw, scale, drift * 3, **kwargs)
    with pytest.raises(ValueError, match="not finite"):  # (NaN would index out of bounds)
        F.block_reduce(raw, scale, np.where(drift == 0.4, np.nan, drift), **kwargs)


def test_fused_kernel_at_integer_tiny_and_halo_wide_drifts():
    """Edge drifts: integers (taps of weight 0), ±halo, ±1e-9, 1 − 1e-12; an angle whose
    voxels the operator never uses; a missing neighbour strip (zeros). Stale scratch is NaN."""
    from scipy import sparse

    from spndi_dask.reduce import _fused as F

    rng = np.random.default_rng(11)
    halo, ty, tx, nr, nc = 2, 4, 5, 3, 4
    values = [0.0, 1.0, -1.0, 2.0, -2.0, 1e-9, -1e-9, 1 - 1e-12, -1.7, 1.7]
    for k, (dy, dx) in enumerate(zip(values, values[::-1], strict=True)):
        drift = np.array([[dy, dx], [0.0, 0.0], [dx, dy], [dy, -dx]])
        na = len(drift)
        raw = rng.poisson(20, (na, ty + 2 * halo, tx + 2 * halo, nr, nc)).astype(np.uint16)
        scale = rng.uniform(0.8, 1.2, raw.shape[:3]).astype(np.float32)
        op = sparse.random(30, na * nr * nc, density=0.15, random_state=k, dtype=np.float32)
        op = op.tolil()
        op[:, nr * nc : 2 * nr * nc] = 0  # angle 1: no voxel used
        op = op.tocsr()
        op.eliminate_zeros()
        used_op, voxels = K.used_voxels(op, na)
        assert len(voxels[1]) == 0
        background = rng.uniform(0, 1, na)
        offset, gain = F.correction_tables((nr, nc), dark=None, flat=None, bad=None)
        dq = rng.normal(size=(na, nr, nc, 3))
        kwargs = dict(
            offset=offset,
            gain=gain,
            background=background,
            saturation=None,
            features=K.moment_features(dq, np.arange(nr), np.arange(nc)),
            operator=used_op,
            voxels=voxels,
            halo=halo,
        )
        # the top strip missing (outside the scan): zeros, with no monitor
        ny, nx = raw.shape[1:3]
        mosaic = F.Mosaic.from_grid([[None], [raw[:, halo:]]], [halo, ny - halo], [nx])
        ref_raw, ref_scale = raw.copy(), scale.copy()
        ref_raw[:, :halo], ref_scale[:, :halo] = 0, 0
        w, _ = K.corrected(ref_raw, scale=ref_scale, background=background)
        want = K.patterns_block(w, drift, op, halo=halo, out_shape=(ty, tx))
        for source in (ref_raw, mosaic):
            for buf in getattr(F._LOCAL, "buffers", {}).values():
                buf[:] = np.nan
            _, patterns = F.block_reduce(source, ref_scale, drift, **kwargs)
            np.testing.assert_allclose(
                patterns.reshape(want.shape), want, rtol=1e-5, atol=1e-4, err_msg=str(drift)
            )


def test_registration_recovers_subpixel_shifts():
    rng = np.random.default_rng(3)
    from scipy import ndimage

    # a particle-like XRF map: compact blobs on a flat background
    yy, xx = np.mgrid[:40, :48]
    base = sum(
        a * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s**2))
        for a, cy, cx, s in ((5, 18, 20, 5), (3, 25, 30, 3), (2, 12, 28, 2))
    )
    base = base + 0.01 * ndimage.gaussian_filter(rng.random((40, 48)), 1.0)
    truth = np.array([[0.0, 0.0], [0.6, -1.3], [-2.25, 0.4]])
    images = np.stack([ndimage.shift(base, d, order=3, mode="nearest") for d in truth])
    got = K.register_to_reference(images, reference=0, upsample=50)
    np.testing.assert_allclose(got, truth, atol=0.06)
    chained = K.register_chain(images, reference=0, upsample=50)
    np.testing.assert_allclose(chained, truth, atol=0.1)
    # shifting the maps back puts every image on the reference grid
    back = shift_maps(images[..., None], got, fill=np.nan)[..., 0]
    core = (slice(4, -4), slice(4, -4))
    assert np.nanmax(np.abs(back[2][core] - base[core])) < 0.02 * np.ptp(base)


def test_grid_operator_traces_q_back_to_the_measured_voxel():
    cfg = preset("demo")
    g, angles = cfg.geometry(), cfg.angles()
    roi = (10, 50, 20, 60)
    voxels = q_sample(g, angles, rows=np.arange(10, 50), cols=np.arange(20, 60))
    # an off-lattice point measured at a fractional angle and pixel
    target = q_sample(g, [angles[7] + 0.021], rows=[30.4], cols=[33.3]).reshape(1, 3)
    theta, _ = K.solve_rocking_angle(target, g, float(angles.mean()))
    assert theta[0] == pytest.approx(angles[7] + 0.021, abs=1e-9)
    op, covered = K.grid_operator(g, angles, roi, np.vstack([target, target * 1.1]))
    assert covered.tolist() == [True, False]  # 10 % longer q is not on the detector ROI
    assert op[0].nnz == 8 and op[0].sum() == pytest.approx(1.0, abs=1e-6)
    interp = [op[0] @ voxels[..., k].ravel() for k in range(3)]
    np.testing.assert_allclose(np.concatenate(interp), target[0], atol=2e-7)


@pytest.mark.parametrize("counts", [0.5, 30.0])
def test_hot_pixels_equal_the_full_median_filter_test(counts):
    """Medians only where the neighbourhood minimum leaves a doubt: same pixels as filtering
    the whole detector (edges, a moving peak and hot pixels of all strengths included)."""
    from scipy import ndimage

    rng = np.random.default_rng(1)
    s = rng.poisson(counts, (21, 64, 64)).astype(float)
    at = rng.integers(0, 64, (30, 2))
    s[:, at[:, 0], at[:, 1]] += rng.uniform(1, 300, 30) * counts
    s[:, 0, 0] = s[:, 63, 5] = 1e5
    s[:, 30:34, 30:34] += 1e4 * rng.random((21, 1, 1))
    med = ndimage.median_filter(s, size=(1, 5, 5), mode="nearest")
    outlier = (s - med > 10 * np.sqrt(med + 1)) & (s > 3 * (med + 1))
    want = outlier.mean(axis=0) >= 0.8
    hot, _ = K.bad_pixels(s)
    assert want.sum() >= 20 and want[0, 0] and want[63, 5]
    np.testing.assert_array_equal(hot, want)


def test_bad_pixels_and_roi_on_a_simulated_projection(tiny):
    _out, m, _ = tiny
    plan = plan_particle(m, m.scans[0])
    cfg = preset("tiny")
    rng = np.random.default_rng([cfg.seed, 7919])
    npix = int(np.prod(cfg.detector_shape))
    hot = (rng.random(npix) < cfg.hot_fraction).reshape(cfg.detector_shape)
    # every simulated hot pixel found; nothing else flagged hot
    assert plan.n_hot == hot.sum() and plan.bad[hot].all()
    r0, r1, c0, c1 = plan.roi
    peak = q_sample(
        cfg.geometry(),
        cfg.angles()[[4]],
        rows=[cfg.geometry().beam_center[0]],
        cols=[cfg.geometry().beam_center[1]],
    )
    assert peak.shape == (1, 1, 1, 3)
    br, bc = cfg.geometry().beam_center
    assert r0 < br < r1 and c0 < bc < c1


# -- the lazy graph and the results layout ----------------------------------------------------
def test_building_the_graph_computes_nothing(tiny, raise_if_computes):
    _out, m, _ = tiny
    plans = [plan_particle(m, p) for p in m.scans]
    grid = beamtime_grid(m, plans)
    ds = reduce_particle(plans[0], grid)
    for name in ("pattern", "strain", "rocking_curve", "q_com", "reference_q"):
        assert isinstance(ds[name].data, da.Array), name
    assert ds["pattern"].dims == ("y", "x", "dq_x", "dq_y", "dq_z")
    assert ds["pattern"].shape[2:] == (32, 32, 32)


@pytest.mark.parametrize("shard", [2, 3])
def test_tiles_with_neighbour_strips_equal_one_block(tiny, shard):
    """Moments and drift-corrected patterns do not depend on how the scan is tiled, and each
    block reads only its own tile (the drift halo comes from copied strips of neighbours)."""
    import dask

    from spndi_dask.reduce import graph as reduce_graph

    _out, m, _ = tiny
    plan = plan_particle(m, m.scans[0])
    grid = beamtime_grid(m, [plan])
    rng = np.random.default_rng(4)
    drift = rng.uniform(-2.4, 2.4, plan.drift.shape)  # halo 3: rows of 6 (shard 2 or 3)
    plan = dataclasses.replace(plan, drift=drift)
    ctx = dask.delayed(reduce_graph._context(plan, grid), pure=True)
    whole = reduce_graph._block_graph(plan, ctx, grid)
    assert whole[1].numblocks[:2] == (1, 1)
    layout = dict(plan.raw_layout)
    plan = dataclasses.replace(plan, raw_layout={**layout, "shards": [1, shard, shard]})
    tiled = reduce_graph._block_graph(plan, ctx, grid)
    assert tiled[1].numblocks[0] >= 2 and tiled[1].numblocks[1] >= 2
    # the output rows are the tiles' moved up by the halo
    ytiles = reduce_graph.roi_frames(plan, halo=3).chunks[1]
    assert tiled[1].chunks[0] == (ytiles[0] - 3, *ytiles[1:-1], ytiles[-1] + 3)
    graph = dict(tiled[1].__dask_graph__())
    deps = {k: dask.core.get_dependencies(graph, k) for k in graph if "reduce-block" in k[0]}
    for k, d in deps.items():
        assert sum(str(x[0]).startswith("raw-roi") for x in d) == 1, (k, d)
    (mw, pw), (mt, pt) = dask.compute(whole, tiled, scheduler="sync")
    np.testing.assert_allclose(mt, mw, rtol=1e-5, atol=1e-6 * np.abs(mw).max())
    np.testing.assert_allclose(pt, pw, rtol=1e-5, atol=1e-6 * np.abs(pw).max())
    assert np.abs(pw).max() > 0


def test_tiles_are_scheduled_in_raster_order(tiny, tmp_path):
    """The write graph carries raster priorities (reads, strips, blocks) to the scheduler, so a
    worker holds a couple of tiles and a row of strips, not tiles from all over the scan."""
    from dask.base import collections_to_expr

    from spndi_dask.reduce import core

    _out, m, _ = tiny
    plan = plan_particle(m, m.scans[0])
    layout = dict(plan.raw_layout)
    plan = dataclasses.replace(
        plan,
        drift=np.full_like(plan.drift, 1.5),
        raw_layout={**layout, "shards": [1, 4, 4]},  # 3 x 4 tiles
    )
    ds = reduce_particle(plan, beamtime_grid(m, [plan]))
    write, _ = core._write_graph(ds, tmp_path / "r.zarr", "p1", {"spndi_dask": {}})
    prio = collections_to_expr([write]).__dask_annotations__()["priority"]
    kind = lambda key, prefix: str(key[0]).startswith(prefix)  # noqa: E731
    reads = {k[2:4]: v for k, v in prio.items() if kind(k, "raw-roi")}
    blocks = {k[1:3]: v for k, v in prio.items() if kind(k, "reduce-block")}
    strips = [(k[1:3], v) for k, v in prio.items() if kind(k, "reduce-strip")]
    nx = 1 + max(j for _, j in reads)
    assert len(reads) == len(blocks) >= 6 and nx >= 3 and strips
    order = sorted(reads, key=lambda t: -reads[t])
    assert order == sorted(reads)  # raster
    for (i, j), p in blocks.items():  # after the next tile (in raster order) is read, before
        k = i * nx + j  # the one after it
        assert p < reads[divmod(k + 1, nx)] if k + 1 < len(order) else p < reads[(i, j)]
        assert k + 2 >= len(order) or p > reads[divmod(k + 2, nx)]
    for (i, j), p in strips:  # copied right after their tile is read
        assert reads[(i, j)] < p < reads[(i, j)] + 2
    # the next particle of a run: all its tasks after all of this one's (else the first tiles of
    # every particle would be read first, each held until its neighbour is read)
    plan = dataclasses.replace(plan, rank=1)
    ds2 = reduce_particle(plan, beamtime_grid(m, [plan]))
    write2, _ = core._write_graph(ds2, tmp_path / "r.zarr", "p2", {"spndi_dask": {}})
    prio2 = collections_to_expr([write2]).__dask_annotations__()["priority"]
    tiles = ("raw-roi", "reduce-strip", "reduce-block")
    first = [v for k, v in prio.items() if any(kind(k, t) for t in tiles)]
    second = [v for k, v in prio2.items() if any(kind(k, t) for t in tiles)]
    assert len(second) == len(first) and max(second) < min(first)


def test_results_open_as_a_datatree_with_units_and_provenance(tiny):
    out, m, summary = tiny
    assert {s["status"] for s in summary.values()} == {"reduced"}
    tree = xr.open_datatree(
        str(out / "results" / "results.zarr"), engine="zarr", consolidated=False
    )
    assert set(tree.children) == {"p1", "p2"}
    ds = tree["p1"].to_dataset()
    for var in (
        "intensity",
        "d_spacing",
        "strain",
        "tilt_x",
        "tilt_y",
        "width_x",
        "width_y",
        "width_z",
        "peak_angle",
        "det_row_com",
        "det_col_com",
        "valid",
        "quality",
    ):
        assert ds[var].dims == ("y", "x"), var
    assert ds["rocking_curve"].dims == ("angle", "y", "x")
    assert ds["q_com"].dims == ("y", "x", "component")
    assert ds["drift"].dims == ("angle", "axis")
    assert ds["d_spacing"].attrs["units"] == "Å" and ds["tilt_x"].attrs["units"] == "rad"
    assert ds["y"].attrs["units"] == "µm" and ds["angle"].attrs["units"] == "deg"
    # CF style: every variable says what it is in long_name; units is a unit string only
    unit_strings = {"counts", "Å", "1", "rad", "1/Å", "deg", "pixel", "µm"}
    for name, var in {**ds.data_vars, **ds.coords}.items():
        if name not in ("component", "axis"):
            assert var.attrs.get("long_name"), name
        assert var.attrs.get("units", "1") in unit_strings, (name, var.attrs["units"])
        assert "_FillValue" not in var.attrs, name
    meta = ds.attrs["spndi_dask"]
    assert meta["complete"] and meta["kind"] == "reduce"
    assert ds.attrs["manifest_hash"] == m.manifest_hash and ds.attrs["raw_sources"]
    # patterns are chunked for per-pixel access and the common grid is the same for all
    # (one scan row of a tile per chunk: a few MB, read whole for one pixel)
    stored = zarr.open_array(str(out / "results/results.zarr/p1/pattern"))
    assert stored.chunks[:2] == (1, min(16, ds.sizes["x"]))
    assert tree["p1"].attrs["q_grid"] == tree["p2"].attrs["q_grid"]
    # NaN exactly where not valid; never inf
    valid = ds["valid"].values
    assert valid.sum() > 20
    for var in ("d_spacing", "strain", "tilt_x", "width_z", "peak_angle"):
        v = ds[var].values
        assert np.isfinite(v[valid]).all() and np.isnan(v[~valid]).all(), var


def test_sigma_maps_are_written_with_units_and_are_calibrated(tiny):
    out, m, _ = tiny
    for p in m.scans:
        ds = open_results(m.output_dir, p.name)
        for name in SIGMA_QUANTITIES:
            sig = ds[f"{name}_sigma"]
            assert sig.attrs["units"] == ds[name].attrs["units"]
            assert sig.attrs["long_name"].startswith(f"standard error of {name}")
            valid = ds["valid"].values
            assert np.all(sig.values[valid] > 0) and np.all(np.isnan(sig.values[~valid]))
        z = sigma_z_vs_truth(ds, out / "ground_truth" / f"{p.name}.npz")
        for name in SIGMA_QUANTITIES:
            # away from grain boundaries (where the probe mixes neighbouring pixels' patterns)
            assert 0.7 <= z[name]["rms_smooth"] <= 1.5, (p.name, name, z[name])


def test_particle_mean_reference_has_zero_mean_strain_and_tilt(tiny):
    out, _m, _ = tiny
    ds = open_results(out / "results", "p1").compute()
    w = np.where(ds["valid"], ds["intensity"], 0.0)
    for var in ("strain", "tilt_x", "tilt_y"):
        mean = np.nansum(w * ds[var].values) / w.sum()
        assert abs(mean) < 5e-5, var  # weighted mean of a nonlinear map: ≈ 0, not exactly
    # strain and d-spacing agree: strain = d / d_ref − 1
    d_ref = 2 * np.pi / np.linalg.norm(ds["reference_q"].values)
    np.testing.assert_allclose(ds["strain"], ds["d_spacing"] / d_ref - 1, atol=1e-12)


def test_patterns_centre_of_mass_matches_the_maps(tiny):
    out, _m, _ = tiny
    ds = open_results(out / "results", "p1").compute()
    grid = ds.attrs["q_grid"]
    axes, h = np.asarray(grid["axes"]), np.asarray(grid["h"])
    p = ds["pattern"].values
    valid = ds["valid"].values & (ds["intensity"].values > np.nanpercentile(ds["intensity"], 50))
    offsets = [ds[d].values for d in ("dq_x", "dq_y", "dq_z")]
    total = p.sum(axis=(2, 3, 4))
    com = (
        np.stack(
            [
                np.einsum("yxijk,i->yx", p, offsets[0]),
                np.einsum("yxijk,j->yx", p, offsets[1]),
                np.einsum("yxijk,k->yx", p, offsets[2]),
            ],
            -1,
        )
        / total[..., None]
    )
    expected = (ds["q_com"].values - h) @ axes.T
    err = np.abs(com - expected)[valid]
    # clipping at 0 and the grid's finite extent cost a little; far below the voxel size
    assert np.median(err) < 2e-4 and err.max() < 1e-3


def test_rerun_is_up_to_date_and_force_recomputes(tiny, monkeypatch):
    _out, m, _ = tiny
    assert {s["status"] for s in reduce(m).values()} == {"up to date"}
    root = m.output_dir / "results.zarr"
    grid = dict(zarr.open_group(str(root), mode="r").attrs)["q_grid"]
    p1 = open_results(m.output_dir, "p1")["pattern"].values
    # the old result is replaced whole: moved aside before it is deleted, never half deleted
    deleted = []
    real_rmtree = shutil.rmtree
    monkeypatch.setattr(
        "spndi_dask.io.layout.shutil.rmtree",
        lambda path, **kw: deleted.append(Path(path)) or real_rmtree(path, **kw),
    )
    s = reduce(m, scans=["p2"], force=True)
    assert list(s) == ["p2"] and s["p2"]["status"] == "reduced"
    assert deleted and root / "p2" not in deleted
    assert not list((m.output_dir / ".tmp").glob("*.old"))
    # a result that cannot be moved in fails alone and leaves the previous one in place
    p2 = open_results(m.output_dir, "p2")["pattern"].values
    real_replace = Path.replace

    def replace(self, target):
        if self.name == "reduce-p2.zarr":
            raise OSError("disk quota exceeded")
        return real_replace(self, target)

    monkeypatch.setattr(Path, "replace", replace)
    s = reduce(m, scans=["p2"], force=True)
    assert s["p2"]["status"] == "failed" and "disk quota" in s["p2"]["error"]
    monkeypatch.undo()
    np.testing.assert_array_equal(open_results(m.output_dir, "p2")["pattern"].values, p2)
    # the beamtime's q grid stays (a grid from p2 alone would make p1's patterns incomparable)
    assert dict(zarr.open_group(str(root), mode="r").attrs)["q_grid"] == grid
    np.testing.assert_array_equal(open_results(m.output_dir, "p1")["pattern"].values, p1)
    assert open_results(m.output_dir, "p2").attrs["q_grid"] == grid
    with pytest.raises(ReduceError, match="not in the manifest"):
        reduce(m, scans=["nope"])


def test_d0_and_beamtime_median_references(tmp_path):
    m = _ready(tmp_path, preset("tiny"), strain_reference="d0", d0_angstrom=4.70)
    reduce(m)
    ds = open_results(tmp_path / "results", "p1").compute()
    np.testing.assert_allclose(ds["strain"], ds["d_spacing"] / 4.70 - 1, atol=1e-12)
    d = m.to_dict()
    d["reduce"] = {"strain_reference": "beamtime_median"}
    m2 = Manifest.from_dict(d, base_dir=tmp_path, source=str(tmp_path / "beamtime.toml"))
    reduce(m2)
    a = open_results(tmp_path / "results", "p1").compute()
    b = open_results(tmp_path / "results", "p2").compute()
    np.testing.assert_array_equal(a["reference_q"], b["reference_q"])
    pooled = np.concatenate([a["d_spacing"].values[a["valid"]], b["d_spacing"].values[b["valid"]]])
    d_ref = 2 * np.pi / np.linalg.norm(a["reference_q"].values)
    assert abs(np.median(pooled) - d_ref) / d_ref < 2e-5


# -- accuracy against simulated ground truth --------------------------------------------------
@pytest.mark.slow
def test_accuracy_on_the_demo_with_and_without_drift_correction(tmp_path):
    m = _ready(tmp_path, preset("demo", n_particles=1))
    reduce(m)
    ok = _errors(
        open_results(tmp_path / "results", "p1").compute(), tmp_path / "ground_truth" / "p1.npz"
    )
    assert ok["coverage"] > 0.99
    assert ok["d"] <= 1e-4, ok
    assert ok["tilt_x"] <= 1e-4 and ok["tilt_y"] <= 1e-4, ok
    assert ok["drift"] < 0.2, ok
    d = m.to_dict()
    d["reduce"] = {"registration": "none"}
    m2 = Manifest.from_dict(d, base_dir=tmp_path, source=str(tmp_path / "beamtime.toml"))
    reduce(m2)
    bad = _errors(
        open_results(tmp_path / "results", "p1").compute(), tmp_path / "ground_truth" / "p1.npz"
    )
    assert bad["d"] > 3 * ok["d"] and bad["tilt_x"] > 3 * ok["tilt_x"], (ok, bad)
    # the fallback without XRF (chained intensity maps) still beats no correction
    d["reduce"] = {"registration": "intensity"}
    m3 = Manifest.from_dict(d, base_dir=tmp_path, source=str(tmp_path / "beamtime.toml"))
    reduce(m3)
    chained = _errors(
        open_results(tmp_path / "results", "p1").compute(), tmp_path / "ground_truth" / "p1.npz"
    )
    assert chained["d"] < bad["d"], (chained, bad)


# -- bad input --------------------------------------------------------------------------------
def test_all_zero_particle_is_flagged_not_a_crash(tmp_path, caplog):
    frames = np.zeros((3, 5, 6, 16, 16), dtype=np.uint16)
    write_angle_files(tmp_path, frames)
    m = load(tmp_path, manifest_dict(n_angles=3, scan_shape=(5, 6)))
    ingest(m)
    with caplog.at_level(logging.WARNING):
        s = reduce(m)
    assert s["p1"]["status"] == "reduced" and s["p1"]["valid_pixels"] == 0
    assert "no Bragg signal" in caplog.text
    ds = open_results(tmp_path / "results", "p1").compute()
    assert not ds["valid"].any() and np.isnan(ds["d_spacing"]).all()
    assert (ds["quality"] & 1).all()


def test_angle_without_signal_and_nan_voxels(tiny, tmp_path):
    import shutil

    out, m, _ = tiny
    shutil.copytree(out, tmp_path / "b")
    m2 = Manifest.from_dict(
        m.to_dict(), base_dir=tmp_path / "b", source=str(tmp_path / "b" / "beamtime.toml")
    )
    g = zarr.open_group(str(tmp_path / "b/results/raw.zarr/p1"), mode="r+")
    g["frames"][0] = 0  # no signal at the first angle
    g["det_sum"][0] = 0
    s = reduce(m2, force=True)
    assert s["p1"]["status"] == "reduced"
    ds = open_results(tmp_path / "b" / "results", "p1").compute()
    assert float(np.abs(ds["rocking_curve"][0]).max()) < 5.0  # background only
    assert ds["valid"].sum() > 20 and np.isfinite(ds["d_spacing"].values[ds["valid"]]).all()

    # NaN voxels in a float raw store are masked, the rest reduces
    frames = np.random.default_rng(0).poisson(1.0, (3, 4, 5, 16, 16)).astype(np.float32)
    frames[:, :, :, 6:10, 6:10] += 200.0
    write_angle_files(tmp_path / "c", frames)
    mc = load(tmp_path / "c", manifest_dict(n_angles=3, scan_shape=(4, 5)))
    ingest(mc)
    arr = zarr.open_array(str(tmp_path / "c/results/raw.zarr/p1/frames"), mode="r+")
    arr[1, 2, 3] = np.nan
    sc = reduce(mc)
    assert sc["p1"]["status"] == "reduced"
    dc = open_results(tmp_path / "c" / "results", "p1").compute()
    assert dc["valid"].all() and np.isfinite(dc["d_spacing"]).all()


def test_peak_outside_the_rocking_range_warns_and_flags(tmp_path, caplog):
    cfg = preset("tiny", n_particles=1)
    m = simulate_beamtime(tmp_path, cfg, scheduler="sync")
    d = m.to_dict()
    p = d["scans"][0]
    p["frames"] = [f"raw/p1/angle_{i:03d}.h5" for i in range(3)]  # angles before the peak
    p["angles_deg"] = p["angles_deg"][:3]
    m = Manifest.from_dict(d, base_dir=tmp_path, source=str(tmp_path / "beamtime.toml"))
    ingest(m)
    with caplog.at_level(logging.WARNING):
        s = reduce(m)
    assert s["p1"]["status"] == "reduced"
    assert "outside the rocking range" in caplog.text
    ds = open_results(tmp_path / "results", "p1").compute()
    assert ((ds["quality"].values & 2) > 0).sum() > 0.5 * ds["valid"].sum()


def test_roi_touching_the_detector_edge_is_flagged(tmp_path, caplog):
    m = _ready(tmp_path, preset("tiny", n_particles=1, beam_center_offset=(13.0, 0.0)))
    with caplog.at_level(logging.WARNING):
        reduce(m)
    assert "touches the detector edge" in caplog.text
    ds = open_results(tmp_path / "results", "p1").compute()
    assert ds.attrs["roi_at_detector_edge"] and ((ds["quality"].values & 8) > 0).all()


def test_bad_settings_and_files_name_the_fix(tiny, tmp_path):
    out, m, _ = tiny
    d = m.to_dict()
    d["reduce"] = {"roi": [0, 100, 0, 8]}
    bad_roi = Manifest.from_dict(d, base_dir=out, source=str(out / "beamtime.toml"))
    s = reduce(bad_roi, scans=["p1"])
    assert s["p1"]["status"] == "failed" and "beyond the detector" in s["p1"]["error"]
    np.save(tmp_path / "mask.npy", np.zeros((5, 5)))
    d["reduce"] = {"detector_mask": str(tmp_path / "mask.npy")}
    bad_mask = Manifest.from_dict(d, base_dir=out, source=str(out / "beamtime.toml"))
    s = reduce(bad_mask, scans=["p1"])
    assert "[5, 5]" in s["p1"]["error"] and "[32, 32]" in s["p1"]["error"]


def test_an_unrelated_results_zarr_is_refused_and_left_alone(tmp_path):
    from spndi_dask.io.layout import ForeignOutputError

    frames = np.random.default_rng(0).poisson(1.0, (3, 4, 5, 16, 16)).astype(np.uint16)
    write_angle_files(tmp_path, frames)
    m = load(tmp_path, manifest_dict(n_angles=3, scan_shape=(4, 5)))
    ingest(m)
    foreign = m.layout.results
    (foreign / "p1").mkdir(parents=True)
    (foreign / "p1" / "old.csv").write_text("a,b\n")
    with pytest.raises(ForeignOutputError, match=r"results\.zarr is no Zarr store"):
        reduce(m)
    assert [p.name for p in foreign.rglob("*")] == ["p1", "old.csv"]  # no zarr.json added
    assert not m.layout.tmp.exists()


@pytest.mark.parametrize(
    "dtype,level,settings",
    [(np.uint16, 65535, {}), (np.float32, 5000.0, {"saturation": 5000.0})],
)
def test_saturated_frames_are_diagnosed_as_saturated_not_empty(tmp_path, dtype, level, settings):
    frames = np.full((3, 4, 5, 16, 16), level, dtype=dtype)
    write_angle_files(tmp_path, frames)
    data = manifest_dict(n_angles=3, scan_shape=(4, 5))
    data["reduce"] = settings
    m = load(tmp_path, data)
    ingest(m)
    s = reduce(m)
    assert s["p1"]["status"] == "reduced" and s["p1"]["valid_pixels"] == 0
    text = " ".join(s["p1"]["warnings"])
    assert "saturated" in text and f"{level:g}" in text
    assert "256 of 256 detector pixels" in text
    assert "attenuat" in text and "[reduce] saturation" in text  # the fixes
    assert "frames are not empty" not in text


def test_points_without_monitor_flux_are_masked_and_reported(tmp_path):
    import h5py

    m = simulate_beamtime(tmp_path, preset("tiny", n_particles=1), scheduler="sync")
    frames_file = m.scans[0].frame_paths(m.base_dir)[2]
    with h5py.File(frames_file, "r+") as f:
        # beam lost for a moment at angle 2, at the three brightest points of the particle
        brightest = np.argsort(f[m.scans[0].dataset][...].sum(axis=(1, 2)))[-3:]
        io = f[m.scans[0].monitor]
        values = io[...]
        values[brightest] = 0.0
        io[...] = values
    ingest(m)
    raw = zarr.open_group(str(m.layout.raw_node("p1")), mode="r")
    lost = np.asarray(raw["monitor"][2]) == 0
    assert lost.sum() == 3
    s = reduce(m)
    assert s["p1"]["status"] == "reduced"
    text = " ".join(s["p1"]["warnings"])
    assert "monitor is 0, negative or not finite at 3 scan points (angles [2])" in text
    assert "masked" in text and "missing_angles" in text
    ds = open_results(tmp_path / "results", "p1").compute()
    assert np.isfinite(ds["rocking_curve"]).all()
    assert ds["valid"].sum() > 20 and ds["valid"].values[lost].all()  # the other angles count
    for var in ("intensity", "d_spacing", "strain", "tilt_x"):
        assert np.isfinite(ds[var].values[ds["valid"].values]).all()
    assert ((ds["quality"].values & 4) > 0)[lost].all()
    assert not ((ds["quality"].values & 4) > 0)[~lost].any()
