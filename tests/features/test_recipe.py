"""The original study's FoldingNet recipe (``[features] recipe = "study"``) and its weights."""

from __future__ import annotations

import importlib
import math

import numpy as np
import pytest
import torch
from torch import nn

from spndi_dask.config.settings import FeatureSettings
from spndi_dask.features import _kernels as K
from spndi_dask.features import checkpoint as C
from spndi_dask.features.checkpoint import STUDY_HYPER, CheckpointError, load_study_weights
from spndi_dask.features.model import (
    FoldingNet,
    _study_local_feature,
    build_model,
    chamfer_distance,
    knn_indices,
    rotate_clouds,
)

T = importlib.import_module("spndi_dask.features.train")  # the module, not the function


# -- the study's point clouds -------------------------------------------------------------------
def test_study_cloud_clips_thresholds_scales_the_angle_and_drops_outliers():
    v = np.zeros((40, 30, 6))
    v[10:14, 5:9, 1:4] = 1e-3  # a 4×4×3 block just above 1e-4 of the peak once scaled
    v[12, 7, 2] = 1.0  # the peak (clipped to 0.05: still one point)
    v[11, 6, 1] = 5e-5  # below 1e-4 of the peak: no point
    v[39, 0, 5] = 2e-3  # far from the block: an outlier
    cloud = K.study_cloud(v, rng=np.random.default_rng(0), n_neighbours=10)
    assert cloud.shape == (2048, 3)
    # 1-based (row, col, 10 × angle) of the block's voxels (minus the one below threshold)
    block = {
        (r + 1, c + 1, 10 * (a + 1))
        for r in range(10, 14)
        for c in range(5, 9)
        for a in range(1, 4)
        if (r, c, a) != (11, 6, 1)
    }
    got = {tuple(p) for p in cloud.astype(int).tolist()}
    assert got == block  # 47 points drawn with replacement, every one seen; no outlier
    assert (12 + 1, 7 + 1, 30) in got and (40, 1, 60) not in got
    # enough points: drawn without replacement
    big = np.ones((20, 20, 8))
    c2 = K.study_cloud(big, rng=np.random.default_rng(1), angle_scale=1.0)
    assert len({tuple(p) for p in c2.tolist()}) == 2048 and c2[:, 2].max() <= 8
    rng = np.random.default_rng(2)
    with pytest.raises(ValueError, match="no voxel"):  # a threshold above the clip
        K.study_cloud(big, rng=rng, threshold=0.1)
    with pytest.raises(ValueError, match="no positive finite intensity"):
        K.study_cloud(np.zeros((2, 2, 2)), rng=rng)


def test_outlier_removal_is_the_mean_plus_ratio_std_rule():
    p = np.array([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [10, 0, 0]])
    # mean distance to 2 nearest others: 1, (1+√2)/2, (1+√2)/2, (9+√101)/2
    d = np.array([1, (1 + math.sqrt(2)) / 2, (1 + math.sqrt(2)) / 2, (9 + math.sqrt(101)) / 2])
    keep = d <= d.mean() + 0.8 * d.std()
    assert np.array_equal(K.remove_outliers(p, 2, 0.8), p[keep]) and keep.sum() == 3


# -- augmentation, loss, model ------------------------------------------------------------------
def test_rotation_turns_the_row_angle_plane_only_and_keeps_distances():
    x = torch.randn(3, 50, 3, dtype=torch.float64) + torch.tensor(
        [5.0, -2.0, 1.0], dtype=torch.float64
    )
    deg = torch.tensor([15.0, 90.0, 345.0], dtype=torch.float64)
    r = rotate_clouds(x, deg)
    for b, t in enumerate(np.deg2rad(deg.numpy())):
        m = np.array([[math.cos(t), 0, -math.sin(t)], [0, 1, 0], [math.sin(t), 0, math.cos(t)]])
        assert np.allclose(r[b].numpy(), x[b].numpy() @ m.T)
    assert torch.equal(r[..., 1], x[..., 1])  # the detector column is untouched
    assert r.shape == x.shape
    assert torch.allclose(r.norm(dim=-1), x.norm(dim=-1))  # about the origin
    assert torch.allclose(r.mean(dim=1).norm(dim=-1), x.mean(dim=1).norm(dim=-1))


def test_fit_rotates_by_multiples_of_15_degrees(monkeypatch):
    seen: list[torch.Tensor] = []

    def spy(x, degrees):
        seen.append(degrees)
        return rotate_clouds(x, degrees)

    monkeypatch.setattr(T, "rotate_clouds", spy)
    x = np.random.default_rng(0).random((12, 32, 3), dtype=np.float32)
    m = FoldingNet(n_points=32, latent_dim=8, k=4, hidden=16)
    T.fit(m, x, batch_size=4, max_epochs=2, rotate_step=15.0, weight_decay=1e-6)
    deg = torch.cat(seen)
    assert len(deg) == 2 * 11  # every training cloud of both epochs (one held out)
    assert torch.equal(deg % 15, torch.zeros_like(deg)) and deg.max() < 360
    assert len(deg.unique()) > 3


def test_chamfer_sum_is_the_hand_derived_value():
    a = torch.tensor([[[0.0, 0, 0], [2, 0, 0]]])
    b = torch.tensor([[[0.0, 1, 0]]])
    # a→b: 1 + (4 + 1); b→a: 1
    assert chamfer_distance(a, b, reduction="sum").item() == pytest.approx(7.0)
    assert chamfer_distance(a, b).item() == pytest.approx(6 / 2 + 1)


def test_study_local_feature_is_the_outer_product_with_the_nearest_point():
    pts = torch.tensor([[[0.0, 0, 1], [0, 2, 0], [3, 0, 0], [0, 0, 1.5]]])
    f = _study_local_feature(pts, knn_indices(pts, 3))
    assert f.shape == (1, 4, 12) and torch.equal(f[..., :3], pts)
    expect = torch.outer(pts[0, 0], pts[0, 3]).flatten()  # nearest of point 0 is point 3
    assert torch.equal(f[0, 0, 3:], expect)


def test_study_variant_folds_the_gaussian_source_points():
    m = build_model("foldingnet", **{**STUDY_HYPER, "n_points": 256})
    assert m.fold1[0].in_features == 512 + 3 and m.fold2[0].in_features == 512 + 3
    assert m.plane.shape == (2025, 3)
    with torch.inference_mode():
        x = torch.randn(2, 256, 3)
        assert m.encode(x).shape == (2, 512) and m(x).shape == (2, 2025, 3)
    assert FoldingNet().fold1[0].in_features == 512 + 2  # the default is unchanged


# -- the study's released weights ---------------------------------------------------------------
def _conv(i, o):
    return nn.Conv1d(i, o, 1)


class _StudyEncoder(nn.Module):
    """The published FoldNet_Encoder's parameter layout (feat_dims = f)."""

    def __init__(self, f):
        super().__init__()
        self.mlp1 = nn.Sequential(_conv(12, 64), nn.ReLU(), _conv(64, 64), nn.ReLU(), _conv(64, 64))
        self.linear1, self.conv1 = nn.Linear(64, 64), _conv(64, 128)
        self.linear2, self.conv2 = nn.Linear(128, 128), _conv(128, 1024)
        self.mlp2 = nn.Sequential(_conv(1024, f), nn.ReLU(), _conv(f, f))


class _StudyDecoder(nn.Module):
    """The published FoldNet_Decoder's parameter layout with shape 'gaussian'."""

    def __init__(self, f):
        super().__init__()
        for name in ("folding1", "folding2"):
            seq = nn.Sequential(_conv(f + 3, f), nn.ReLU(), _conv(f, f), nn.ReLU(), _conv(f, 3))
            setattr(self, name, seq)


class _StudyNet(nn.Module):
    def __init__(self, f=512):
        super().__init__()
        self.encoder, self.decoder = _StudyEncoder(f), _StudyDecoder(f)


@pytest.fixture(scope="module")
def study_pkl(tmp_path_factory):
    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("study") / "diffractiontest_best.pkl"
    torch.save(_StudyNet().state_dict(), path)  # a plain OrderedDict of tensors
    return path


def test_study_weights_load_like_setting_the_tensors_directly(study_pkl):
    hyper = {**STUDY_HYPER, "n_points": 128}
    loaded = load_study_weights(study_pkl, build_model("foldingnet", **hyper)).eval()
    sd = torch.load(study_pkl, weights_only=True)
    direct = build_model("foldingnet", **hyper).eval()
    pairs = {
        direct.mlp1[0]: "encoder.mlp1.0",
        direct.mlp1[2]: "encoder.mlp1.2",
        direct.mlp1[4]: "encoder.mlp1.4",
        direct.graph1[0]: "encoder.linear1",
        direct.graph1[1]: "encoder.conv1",
        direct.graph2[0]: "encoder.linear2",
        direct.graph2[1]: "encoder.conv2",
        direct.mlp2[0]: "encoder.mlp2.0",
        direct.mlp2[2]: "encoder.mlp2.2",
        **{direct.fold1[i]: f"decoder.folding1.{i}" for i in (0, 2, 4)},
        **{direct.fold2[i]: f"decoder.folding2.{i}" for i in (0, 2, 4)},
    }
    with torch.no_grad():
        for layer, name in pairs.items():
            layer.weight.copy_(sd[name + ".weight"].reshape(layer.weight.shape))
            layer.bias.copy_(sd[name + ".bias"])
    x = torch.randn(2, 128, 3)
    with torch.inference_mode():
        assert torch.equal(loaded.encode(x), direct.encode(x))
        assert torch.equal(loaded(x), direct(x))
    # DataParallel's "module." prefix is accepted
    prefixed = study_pkl.with_name("dp.pkl")
    torch.save({"module." + k: v for k, v in sd.items()}, prefixed)
    again = load_study_weights(prefixed, build_model("foldingnet", **hyper)).eval()
    with torch.inference_mode():
        assert torch.equal(again.encode(x), direct.encode(x))


def test_study_weights_of_other_sizes_name_the_first_mismatch(tmp_path):
    path = tmp_path / "feat256.pkl"
    torch.save(_StudyNet(f=256).state_dict(), path)
    with pytest.raises(CheckpointError) as err:
        load_study_weights(path, build_model("foldingnet", **STUDY_HYPER))
    msg = str(err.value)
    assert "'encoder.mlp2.0.weight' has shape (256, 1024, 1)" in msg
    assert "expects (512, 1024)" in msg and "recipe = 'study'" in msg
    other = tmp_path / "dgcnn.pkl"
    torch.save({"encoder.conv5.0.weight": torch.zeros(3)}, other)
    with pytest.raises(CheckpointError, match=r"no parameter 'encoder\.mlp1\.0\.weight'"):
        load_study_weights(other, build_model("foldingnet", **STUDY_HYPER))


class _Payload:
    """Stands for code smuggled into a weights file."""

    def __reduce__(self):
        return (print, ("this would run on load",))


def test_study_weights_are_read_with_weights_only(tmp_path, study_pkl, monkeypatch):
    bad = tmp_path / "bad.pkl"
    torch.save({"encoder.mlp1.0.weight": _Payload()}, bad)
    with pytest.raises(CheckpointError, match=r"bad\.pkl carries pickled code and is refused"):
        load_study_weights(bad, build_model("foldingnet", **STUDY_HYPER))
    calls = []
    real = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(C.torch, "load", spy)
    load_study_weights(study_pkl, build_model("foldingnet", **{**STUDY_HYPER, "n_points": 64}))
    assert calls == [True]


# -- settings -----------------------------------------------------------------------------------
def test_recipe_study_sets_the_study_hyper_parameters_unless_given():
    s = FeatureSettings(recipe="study")
    assert (s.model, s.k_neighbours, s.batch_size, s.learning_rate) == ("foldingnet", 32, 16, 1e-4)
    assert (s.weight_decay, s.rotate_step, s.latent_size, s.n_points) == (1e-6, 15.0, 512, 2048)
    assert FeatureSettings(recipe="study", batch_size=8).batch_size == 8  # given keys win
    with pytest.raises(ValueError, match="recipe 'study' is a foldingnet recipe"):
        FeatureSettings(recipe="study", model="conv3d")
    with pytest.raises(ValueError, match="set recipe = 'study'"):
        FeatureSettings(weights="x.pkl")
    hyper = T.hyper_parameters(s, 32)
    assert {k: hyper[k] for k in STUDY_HYPER} == STUDY_HYPER
    assert T.normalisation(s, {"extent": [1, 1, 1]})["patterns"] == "study_cloud"


def test_the_recipe_is_in_the_training_key():
    class Draw:
        fingerprint = "f"

    keys = {
        T._training_key(FeatureSettings(**kw), Draw())
        for kw in (
            {"model": "foldingnet"},
            {"recipe": "study"},
            {"recipe": "study", "rotate_step": 30.0},
        )
    }
    assert len(keys) == 3


# -- end to end on a tiny beamtime --------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    """One tiny scan reduced; its manifest with [features] recipe = 'study'."""
    from ..conftest import reduced_beamtime

    _, m = reduced_beamtime(tmp_path_factory, "recipe", "tiny", n_particles=1, train_epochs=1)
    study = FeatureSettings(recipe="study", sample_size=12, n_points=256, max_epochs=1)
    return m.model_copy(update={"features": study})


@pytest.mark.slow
def test_study_weights_become_the_checkpoint_that_encode_uses(tiny_study, study_pkl):
    from spndi_dask.features import encode, load_checkpoint
    from spndi_dask.reduce import open_results

    m = tiny_study
    s = T.train(m, weights=study_pkl)
    assert s["epochs"] == 0 and s["weights"] == str(study_pkl)
    model, meta = load_checkpoint(s["checkpoint"])
    assert meta["hyper"]["local_feature"] == "study" and meta["hyper"]["source"] == "gaussian"
    assert meta["normalisation"]["patterns"] == "study_cloud"
    assert meta["training"]["weights_sha256"] and T.train(m, weights=study_pkl)["status"] == (
        "up to date"
    )
    direct = load_study_weights(study_pkl, build_model("foldingnet", **meta["hyper"]))
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), direct.state_dict().values(), strict=True)
    )
    encode(m)
    ds = open_results(m.output_dir, m.scans[0].name)
    lat = ds["latent"].values
    valid = ds["valid"].values
    assert lat.shape[-1] == 512 and np.isfinite(lat[valid]).all() and np.isnan(lat[~valid]).all()


@pytest.mark.slow
def test_the_study_recipe_trains_on_its_clouds(tiny_study):
    s = T.train(tiny_study, force=True, on_worker=False)
    assert s["status"] == "trained" and s["epochs"] == 1 and np.isfinite(s["best_val_loss"])
