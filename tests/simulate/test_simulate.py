import json

import h5py
import hdf5plugin  # noqa: F401
import numpy as np
import pytest

from spndi_dask.geometry import crystal_frame, q_sample, rotation_matrix, strain_tilt
from spndi_dask.simulate import expected_counts, preset, pupil_rings, simulate_beamtime

from . import CLEAN_PHYSICS

FRAMES = "/entry/instrument/detector/data"


def test_beamline_layout_and_manifest(tiny_beamtime):
    out, m = tiny_beamtime
    cfg = preset("tiny")
    assert [p.name for p in m.scans] == ["p1", "p2"]
    p = m.scans[0]
    assert len(p.angles) == cfg.n_angles and p.scan_shape == cfg.scan_shape
    with h5py.File(p.frame_paths(m.base_dir)[0]) as f:
        d = f[FRAMES]
        assert d.shape == (cfg.scan_shape[0] * cfg.scan_shape[1], *cfg.detector_shape)
        assert d.dtype == np.uint16 and d.chunks == (1, *cfg.detector_shape)
        assert d.id.get_create_plist().get_filter(0)[0] == 32008  # bitshuffle, as Eiger files
        assert f["/entry/instrument/monitor/Io"].shape == (d.shape[0],)
        assert f["/entry/instrument/xrf/Co_K"].shape == (d.shape[0],)
    truth = json.loads((out / "ground_truth/truth.json").read_text())
    assert truth["d0_angstrom"] == pytest.approx(cfg.d0_angstrom, rel=1e-9)


def test_reference_satisfies_bragg_and_truth_is_consistent(tiny_beamtime):
    out, _ = tiny_beamtime
    gt = np.load(out / "ground_truth/p1.npz")
    g0 = gt["G0"]
    assert 2 * np.pi / np.linalg.norm(g0) == pytest.approx(preset("tiny").d0_angstrom, rel=1e-9)
    frame = crystal_frame(g0, "y+")
    st = strain_tilt(gt["G"], frame)
    inside = gt["particle_mask"]
    for key in ("strain", "tilt_x", "tilt_y"):
        assert st[key][inside] == pytest.approx(gt[key][inside], abs=1e-12)
        assert np.isnan(gt[key][~inside]).all()
    # several domain types and boundaries between them; objects separate
    assert len(np.unique(gt["domain"][inside])) >= 2 and gt["boundary"].any()
    assert set(np.unique(np.load(out / "ground_truth/p2.npz")["objects"])) == {0, 1, 2}


def test_deterministic_per_seed(tmp_path):
    cfg = preset("tiny", n_particles=1, n_angles=3)
    a = simulate_beamtime(tmp_path / "a", cfg, scheduler="sync")
    b = simulate_beamtime(tmp_path / "b", cfg, scheduler="threads")
    c = simulate_beamtime(
        tmp_path / "c", preset("tiny", n_particles=1, n_angles=3, seed=1), scheduler="sync"
    )
    read = lambda m: h5py.File(m.scans[0].frame_paths(m.base_dir)[1])[FRAMES][:]  # noqa: E731
    assert np.array_equal(read(a), read(b))
    assert not np.array_equal(read(a), read(c))


def test_ring_average_is_exact():
    """The closed-form pupil ring average equals a brute-force average over azimuths."""
    rng = np.random.default_rng(0)
    q = rng.normal(0, 4e-3, (200, 3)) + np.array([0.1, 0.0, 1.3])
    G = np.array([[0.1, 0.001, 1.3], [0.102, -0.002, 1.299]])
    sigma = np.array([1.5e-3, 2.5e-3])
    beam = rotation_matrix("y+", 0.15)[2]
    rho, c = 4e-3, 2e-6
    ref = np.zeros((2, 200))
    u1 = np.cross(beam, [0, 1, 0])
    u1 /= np.linalg.norm(u1)
    u2 = np.cross(beam, u1)
    phis = np.linspace(0, 2 * np.pi, 2000, endpoint=False)
    for phi in phis:
        shift = c * beam - rho * (np.cos(phi) * u1 + np.sin(phi) * u2)
        d2 = (((q + shift)[None] - G[:, None]) ** 2).sum(-1)
        ref += np.exp(-d2 / (2 * sigma[:, None] ** 2)) / len(phis)
    got = expected_counts(q, G, sigma, np.ones(2), beam=beam, rings=np.array([[rho, c, 1.0]]))
    assert got == pytest.approx(ref, abs=2e-4 * ref.max())


def test_pupil_rings_cover_the_annulus():
    cfg = preset("tiny")
    rings = pupil_rings(cfg)
    k = cfg.geometry().k
    assert rings[:, 2].sum() == pytest.approx(1.0)
    alpha = np.arcsin(rings[:, 0] / k)
    assert (alpha > cfg.pupil_inner_mrad * 1e-3).all() and (
        alpha < cfg.pupil_outer_mrad * 1e-3
    ).all()
    assert pupil_rings(preset("tiny", pupil=False)).tolist() == [[0.0, 0.0, 1.0]]


def test_centre_of_mass_of_clean_frames_is_G(tmp_path):
    """Without noise sources, pupil or drift, each pixel's intensity-weighted q is its G."""
    cfg = preset(
        "tiny",
        n_particles=1,
        pupil=False,
        **CLEAN_PHYSICS,
        peak_counts=5000.0,
        n_angles=21,
        angle_step_deg=0.05,
        detector_shape=(48, 48),
    )
    m = simulate_beamtime(tmp_path, cfg, scheduler="sync")
    p = m.scans[0]
    g = m.geometry_for(p)
    q = q_sample(g, p.angles, rows=np.arange(48), cols=np.arange(48)).reshape(len(p.angles), -1, 3)
    num = np.zeros((p.n_points, 3))
    den = np.zeros(p.n_points)
    for a, path in enumerate(p.frame_paths(m.base_dir)):
        with h5py.File(path) as f:
            w = f[FRAMES][:].reshape(p.n_points, -1).astype(float)
        num += w @ q[a]
        den += w.sum(1)
    gt = np.load(tmp_path / "ground_truth/p1.npz")
    core = gt["particle_mask"].reshape(-1) & (gt["thickness"].reshape(-1) > 0.5)
    com = num[core] / den[core, None]
    G = gt["G"].reshape(-1, 3)[core]
    rel = np.linalg.norm(com - G, axis=1) / np.linalg.norm(G, axis=1)
    assert np.median(rel) < 2e-4  # finite angular range and Poisson noise only
    st = strain_tilt(com, crystal_frame(gt["G0"]))
    assert np.corrcoef(st["strain"], gt["strain"].reshape(-1)[core])[0, 1] > 0.95


def test_drift_moves_the_xrf_map(tiny_beamtime):
    from skimage.registration import phase_cross_correlation

    out, m = tiny_beamtime
    p = m.scans[0]
    gt = np.load(out / "ground_truth/p1.npz")
    maps = []
    for a in (0, len(p.angles) // 2):
        with h5py.File(p.frame_paths(m.base_dir)[a]) as f:
            maps.append(f["/entry/instrument/xrf/Co_K"][:].reshape(p.scan_shape))
    shift, *_ = phase_cross_correlation(maps[0], maps[1], upsample_factor=10)
    # content moved by +drift[0] relative to the reference (middle) angle
    assert shift == pytest.approx(gt["drift"][0], abs=0.6)
    assert gt["drift"][len(p.angles) // 2] == pytest.approx([0, 0])


def test_detector_defects_are_fixed(tiny_beamtime):
    _, m = tiny_beamtime
    p = m.scans[0]
    with h5py.File(p.frame_paths(m.base_dir)[0]) as f:
        d = f[FRAMES][:]
    hot = (d > 1000).all(axis=0)
    assert hot.any() and (d[:, hot] > 1000).all()
    assert ((d == 0).all(axis=0)).any()  # dead pixels


def test_presets_have_the_sizes_benchmarks_need():
    assert preset("large").raw_bytes >= 10e9
    assert preset("large").raw_bytes == pytest.approx(4 * preset("medium").raw_bytes)
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        preset("huge")
