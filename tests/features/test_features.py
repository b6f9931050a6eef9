"""Features: models, normalisation, checkpoints, training sample, distributed encoding, PLY."""

from __future__ import annotations

import glob
import importlib
import json
import os
import pickle
import threading
from pathlib import Path

import dask
import numpy as np
import pytest
import torch
import zarr

from spndi_dask.config import Manifest
from spndi_dask.features import (
    CheckpointError,
    Conv3dAutoencoder,
    FeatureError,
    FoldingNet,
    chamfer_distance,
    encode,
    encode_patterns,
    fit,
    latent_array,
    load_checkpoint,
    sample_patterns,
    save_checkpoint,
    train,
)
from spndi_dask.features import _kernels as K
from spndi_dask.features.checkpoint import check_grid
from spndi_dask.features.ply import export_ply, load_point_cloud, pattern_vertices
from spndi_dask.particles import stats
from spndi_dask.reduce import open_results

from ..conftest import reduced_beamtime

# measured point clouds of the original study (copied from ../shared/data/seed_pointclouds)
SEEDS = sorted(glob.glob(str(Path(__file__).parents[1] / "data" / "seed_pointclouds" / "*.npy")))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two tiny scans reduced and segmented; a conv3d model trained 3 epochs on them."""
    out, m = reduced_beamtime(tmp_path_factory, "features", "tiny", n_particles=2, train_epochs=3)
    stats(m, figures=False)
    summary = train(m)
    return out, m, summary


# -- kernels ------------------------------------------------------------------------------------
def test_normalisation_keeps_shape_only_and_flags_unusable_patterns():
    rng = np.random.default_rng(1)
    p = rng.gamma(2.0, size=(3, 6, 6, 6))
    p[2, 1, 2, 3] = np.nan
    x = K.normalise_patterns(p)
    # scale invariant (intensity lives in the maps), in [0, 1], log of n³·I/ΣI
    assert np.allclose(K.normalise_patterns(p[:2] * 37.5), x[:2], atol=1e-6)
    assert np.allclose(x[0], np.log1p(216 * p[0] / p[0].sum()) / np.log1p(216), atol=1e-6)
    assert x.dtype == np.float32 and 0 <= x[:2].min() and x[:2].max() <= 1
    assert K.usable_patterns(p).tolist() == [True, True, False]
    assert not x[2].any()


def test_point_cloud_follows_the_intensity_inside_its_voxels():
    p = np.zeros((5, 5, 5))
    p[1, 2, 3], p[3, 3, 1], p[0, 0, 0] = 3.0, 1.0, 0.05  # last one below the threshold
    axes = (np.linspace(-1, 1, 5), np.linspace(0, 2, 5), np.linspace(5, 9, 5))
    c = K.cloud_from_pattern(p, axes, n_points=4000, threshold=0.1, rng=np.random.default_rng(2))
    steps = np.array([0.5, 0.5, 1.0])
    near_a = np.all(np.abs(c - [axes[0][1], axes[1][2], axes[2][3]]) <= steps / 2, axis=1)
    near_b = np.all(np.abs(c - [axes[0][3], axes[1][3], axes[2][1]]) <= steps / 2, axis=1)
    assert np.all(near_a | near_b)
    assert abs(near_a.mean() - 0.75) < 0.03
    # the same pixel draws the same cloud whatever the blocking
    r1, r2 = K.pixel_rng(7, 3, 4), K.pixel_rng(7, 3, 4)
    assert np.array_equal(
        K.cloud_from_pattern(p, axes, n_points=50, rng=r1),
        K.cloud_from_pattern(p, axes, n_points=50, rng=r2),
    )


# -- models -------------------------------------------------------------------------------------
def test_conv3d_handles_grids_that_are_not_multiples_of_eight():
    m = Conv3dAutoencoder(grid=20, latent_dim=5)
    x = torch.rand(3, 20, 20, 20)
    assert m.encode(x).shape == (3, 5) and m(x).shape == x.shape
    # encoding a pattern does not depend on the other patterns of the batch
    with torch.inference_mode():
        assert torch.allclose(m.encode(x)[1:2], m.encode(x[1:2]), atol=1e-6)


def test_foldingnet_loads_and_encodes_the_measured_point_clouds():
    assert len(SEEDS) == 2, "tests/data/seed_pointclouds is missing"
    clouds = np.stack([K.normalise_cloud(load_point_cloud(p)) for p in SEEDS])
    assert clouds.shape == (len(SEEDS), 2048, 3)
    m = FoldingNet()  # the original study's configuration: 2048 points, 512-d codeword
    with torch.inference_mode():
        z = m.encode(torch.from_numpy(clouds))
        rec = m(torch.from_numpy(clouds))
    assert z.shape == (len(SEEDS), 512) and torch.isfinite(z).all()
    assert rec.shape == (len(SEEDS), 45 * 45, 3)


@pytest.mark.slow
def test_foldingnet_learns_to_reconstruct_the_measured_point_clouds():
    rng = np.random.default_rng(0)
    n = 512  # a random subset of each measured cloud keeps the test short on 2 cores
    x = np.stack(
        [
            K.normalise_cloud(c[rng.choice(len(c), n, replace=False)])
            for c in map(load_point_cloud, SEEDS)
        ]
    )
    torch.manual_seed(0)
    m = FoldingNet(n_points=n)
    xt = torch.from_numpy(x)
    with torch.no_grad():
        before = chamfer_distance(xt, m(xt))
    fit(m, x, validation_fraction=0, batch_size=len(x), max_epochs=300, patience=300)
    with torch.no_grad():
        after = chamfer_distance(xt, m(xt))
    assert torch.all(before / after >= 10), (before, after)


# -- checkpoints --------------------------------------------------------------------------------
def _meta(n=8, latent=4):
    return {
        "kind": "conv3d",
        "hyper": {"grid": n, "latent_dim": latent},
        "normalisation": {"patterns": "unit_sum_log1p", "n": n},
        "grid": {"n": n, "h": [1.0, 0.0, 0.0], "axes": np.eye(3).tolist(), "extent": [0.01] * 3},
    }


def test_checkpoint_round_trip_is_bit_exact(tmp_path):
    torch.manual_seed(3)
    m = Conv3dAutoencoder(grid=8, latent_dim=4)
    path = save_checkpoint(m, tmp_path / "model", _meta())
    m2, meta = load_checkpoint(path)
    for k, v in m.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k
    assert meta["kind"] == "conv3d" and meta["format"] == "spndi_dask.features/1"
    assert json.loads(path.with_suffix(".json").read_text())["hyper"] == _meta()["hyper"]
    # a plain torch .pt holding only tensors and a JSON string loads as well
    pt = tmp_path / "plain.pt"
    torch.save({"state_dict": m.state_dict(), "metadata": json.dumps(meta)}, pt)
    m3, _ = load_checkpoint(pt)
    x = torch.rand(2, 8, 8, 8)
    assert torch.equal(m.eval().encode(x), m3.encode(x))


class _Payload:
    """Stands for code smuggled into a checkpoint."""

    def __reduce__(self):
        return (print, ("this would run on load",))


def test_checkpoint_carrying_pickled_code_is_refused(tmp_path):
    m = Conv3dAutoencoder(grid=8, latent_dim=4)
    bad = tmp_path / "bad.pt"
    torch.save({"state_dict": m.state_dict(), "metadata": "{}", "x": _Payload()}, bad)
    with pytest.raises(CheckpointError, match=r"bad\.pt carries pickled code and is refused"):
        load_checkpoint(bad)
    whole = tmp_path / "whole_model.pt"
    torch.save(m, whole)  # a pickled module: classes, not plain tensors
    with pytest.raises(CheckpointError, match="pickled code"):
        load_checkpoint(whole)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"junk\.safetensors is not a readable"):
        load_checkpoint(junk)


def test_grid_mismatch_names_both_grids():
    meta = _meta(n=16)
    grid = {**meta["grid"], "n": 32}
    with pytest.raises(
        CheckpointError,
        match=r"model\.safetensors was trained on .*n=16.*but "
        r"results\.zarr has n=32.*pattern_grid = 16",
    ):
        check_grid(meta, grid, checkpoint="model.safetensors", results="results.zarr")
    check_grid(meta, {**meta["grid"], "h": [2.0, 0.1, 0.0]}, checkpoint="a", results="b")


# -- beamtime: sample, training, distributed encoding --------------------------------------------
def test_sample_draws_from_every_particle_in_proportion(trained):
    _, m, _ = trained
    s = sample_patterns(m, size=60, seed=5)
    assert s.source == "label"
    counts = {n: int((s.index[:, 0] == i).sum()) for i, n in enumerate(s.scans)}
    total = sum(s.candidates.values())
    for name, c in counts.items():
        assert abs(c - 60 * s.candidates[name] / total) <= 1, (counts, s.candidates)
    for i, name in enumerate(s.scans):  # every drawn pixel lies inside a particle
        ds = open_results(m.output_dir, name)
        sel = s.index[s.index[:, 0] == i]
        assert (ds["label"].values[sel[:, 1], sel[:, 2]] > 0).all()
        assert np.array_equal(
            s.patterns[s.index[:, 0] == i][0], ds["pattern"][sel[0, 1], sel[0, 2]]
        )
    again = sample_patterns(m, size=60, seed=5)
    assert np.array_equal(again.index, s.index) and again.fingerprint == s.fingerprint
    assert not np.array_equal(sample_patterns(m, size=60, seed=6).index, s.index)


def test_training_writes_a_checkpoint_with_its_provenance(trained):
    _, m, summary = trained
    assert summary["status"] == "trained" and summary["epochs"] == 3
    _, meta = load_checkpoint(summary["checkpoint"])
    t = meta["training"]
    assert meta["grid"]["n"] == m.reduce.pattern_grid
    assert meta["normalisation"]["patterns"] == "unit_sum_log1p"
    assert t["n_train"] + t["n_val"] == sum(t["scans"].values()) and t["n_val"] >= 1
    assert len(t["history"]) == 3 and t["history"][-1]["train_loss"] < t["history"][0]["train_loss"]
    assert set(t["scans"]) == {"p1", "p2"} and len(t["fingerprint"]) == 32
    assert train(m)["status"] == "up to date"


def test_training_on_a_worker_gives_the_same_model_and_streams_its_epochs(trained, monkeypatch):
    from distributed import Client, LocalCluster

    _, m, summary = trained
    ref, ref_meta = load_checkpoint(summary["checkpoint"])
    module = importlib.import_module("spndi_dask.features.train")

    def read_in_client(*args, **kwargs):
        raise AssertionError("the client read the training sample")

    monkeypatch.setattr(module, "_read", read_in_client)
    rows, main = [], []

    def on_epoch(row):
        rows.append(row)
        main.append(threading.current_thread() is threading.main_thread())

    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=False, dashboard_address=":0"
        ) as cluster,
        Client(cluster) as client,
    ):
        s = train(m, force=True, callback=on_epoch)
        workers = client.scheduler_info()["workers"]
        if not torch.cuda.is_available():
            with pytest.raises(FeatureError, match="no dask worker sees a CUDA GPU"):
                train(m, force=True, device="cuda")
    assert s["worker"] in workers and summary["worker"] is None  # the fixture: in-process
    assert [r["epoch"] for r in rows] == [1, 2, 3] and all(main)
    model, meta = load_checkpoint(s["checkpoint"])
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref.state_dict()[k]), k
    t, t_ref = meta["training"], ref_meta["training"]
    assert [r["train_loss"] for r in rows] == [r["train_loss"] for r in t_ref["history"]]
    assert t["worker"] == s["worker"] and t["threads"] == t_ref["threads"] == s["threads"]
    assert (t["key"], t["scans"], t["n_val"]) == (t_ref["key"], t_ref["scans"], t_ref["n_val"])
    with pytest.raises(FeatureError, match="needs an active dask distributed Client"):
        train(m, force=True, on_worker=True)


class _CountComputes:
    def __init__(self):
        self.calls = 0

    def __call__(self, dsk, keys, **kwargs):
        self.calls += 1
        return dask.get(dsk, keys, **kwargs)


def test_encoding_graph_is_lazy_and_does_not_carry_the_model(trained, raise_if_computes):
    _, m, summary = trained
    ds = open_results(m.output_dir, "p1")
    lat = latent_array(
        ds["pattern"].data,
        ds["valid"].data,
        summary["checkpoint"],
        latent_dim=32,
        offsets=tuple(ds[d].values for d in ("dq_x", "dq_y", "dq_z")),
        block=8,
    )
    assert lat.shape == (*ds["valid"].shape, 32) and lat.dtype == np.float32
    weights = Path(summary["checkpoint"]).stat().st_size
    graph = dict(lat.__dask_graph__())
    encode_tasks = {k: v for k, v in graph.items() if "encode" in str(k)}
    assert encode_tasks
    assert len(pickle.dumps(encode_tasks)) < weights / 4


def test_inference_batches_are_small_on_cpu_and_whole_tiles_on_gpu():
    from spndi_dask.features.inference import CPU_BATCH, _batch_size

    assert _batch_size(None, "cpu", 256) == CPU_BATCH == 32
    assert _batch_size(None, "cuda", 256) == 256
    assert _batch_size(8, "cpu", 256) == 8


def test_distributed_encoding_equals_single_process(trained):
    from spndi_dask.dask_clusters import start_client

    _, m, summary = trained
    root = m.output_dir / "results.zarr"
    ref, _ = load_checkpoint(summary["checkpoint"])
    with start_client(n_workers=2, threads_per_worker=1) as client:
        # training on a worker process (pinned to one core, given all back while it trains):
        # the model trained in this process, bit for bit
        s = train(m, force=True)
        assert s["worker"] in client.scheduler_info()["workers"]
        assert s["threads"] == summary["threads"] == len(os.sched_getaffinity(0))
        model, _ = load_checkpoint(s["checkpoint"])
        assert all(torch.equal(v, ref.state_dict()[k]) for k, v in model.state_dict().items())
        # a masked pixel (NaN pattern) inside the particle, and an empty scan
        g = zarr.open_group(str(root / "p1"), mode="r+")
        y, x = np.argwhere(g["valid"][:])[3]
        pat = g["pattern"]
        block = pat[y, x]
        block[0, 0, 0] = np.nan
        pat[y, x] = block
        # tiles of 4 x 4 pixels: many tasks per scan, each reading its own tile of the store
        m = Manifest.from_dict(
            {**m.to_dict(), "features": {**m.features.model_dump(mode="json"), "block": 4}},
            base_dir=m.base_dir,
            source=m.source,
        )
        res = encode(m)
        assert {s["status"] for s in res.values()} == {"encoded"}
        assert encode(m)["p1"]["status"] == "up to date"
        threads = client.run(torch.get_num_threads)
    assert set(threads.values()) == {1}  # 2 workers x 1 thread on 2 cores (or more)
    model, meta = load_checkpoint(summary["checkpoint"])
    for name in ("p1", "p2"):
        ds = open_results(m.output_dir, name)
        lat = ds["latent"].values
        ref = encode_patterns(ds["pattern"].values, model, meta, mask=ds["valid"].values)
        assert ds["latent"].dims == ("y", "x", "feature")
        assert np.array_equal(np.isnan(lat), np.isnan(ref))
        assert np.nanmax(np.abs(lat - ref)) <= 1e-6
        assert ds.attrs["features"]["pixels"] == int(np.isfinite(lat[..., 0]).sum())
        assert np.isnan(lat[~ds["valid"].values]).all()
    assert np.isnan(open_results(m.output_dir, "p1")["latent"].values[y, x]).all()


def test_an_empty_particle_gets_an_all_nan_latent(trained, tmp_path):
    _, m, _ = trained
    g = zarr.open_group(str(m.output_dir / "results.zarr" / "p2"), mode="r+")
    valid = g["valid"][:]
    g["valid"][:] = False
    try:
        res = encode(m, scans=["p2"], force=True)
    finally:
        g["valid"][:] = valid
    assert res["p2"]["status"] == "encoded" and res["p2"]["pixels"] == 0
    assert "no pixels with signal" in res["p2"]["warning"]
    assert np.isnan(open_results(m.output_dir, "p2")["latent"].values).all()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_a_clear_error(trained):
    _, m, _ = trained
    with pytest.raises(FeatureError, match="no CUDA GPU here; use --device cpu or auto"):
        encode(m, device="cuda", force=True)


def test_unknown_particles_are_named(trained):
    _, m, _ = trained
    with pytest.raises(FeatureError, match=r"\['nope'\] are not in the manifest"):
        sample_patterns(m, scans=["nope"])
    with pytest.raises(FeatureError, match=r"\['nope'\] are not in the manifest"):
        encode(m, scans=["nope"])


# -- PLY ----------------------------------------------------------------------------------------
def test_ply_export_is_read_by_a_standard_reader(trained):
    trimesh = pytest.importorskip("trimesh")
    _, m, _ = trained
    ds = open_results(m.output_dir, "p1")
    y, x = np.argwhere(ds["valid"].values & np.isfinite(ds["pattern"].values).all(axis=(2, 3, 4)))[
        0
    ]
    paths = export_ply(m, "p1", pixels=[(int(y), int(x))], labels=[1], threshold=0.1)
    assert [p.name for p in paths] == [f"p1_y{y}_x{x}.ply", "p1_label1.ply"]
    offsets = tuple(ds[d].values for d in ("dq_x", "dq_y", "dq_z"))
    pts, w = pattern_vertices(ds["pattern"].values[y, x], offsets, threshold=0.1)
    cloud = trimesh.load(paths[0])
    vertex = cloud.metadata["_ply_raw"]["vertex"]["data"]
    assert np.allclose(cloud.vertices, pts) and np.array_equal(vertex["intensity"], w)
    assert np.abs(cloud.vertices).max() <= max(np.abs(o).max() for o in offsets)  # 1/Å offsets
    assert np.allclose(load_point_cloud(paths[1]).shape[1], 3)
    header = paths[0].read_bytes()[:2000].decode("latin-1")
    assert "h (sample frame, 1/A)" in header and "property float intensity" in header
    with pytest.raises(ValueError, match="outside the"):
        export_ply(m, "p1", pixels=[(999, 0)])


def test_training_uses_every_core_even_after_a_local_cluster_set_one_thread():
    import os

    from spndi_dask.features.train import _all_cores

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # what torch picks when OMP_NUM_THREADS=1 (set by a LocalCluster)
    try:
        with _all_cores(torch.device("cpu")):
            assert torch.get_num_threads() == len(os.sched_getaffinity(0))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
