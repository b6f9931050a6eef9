import dask.array as da
import numpy as np
import pytest

from spndi_dask.geometry import (
    Geometry,
    crystal_frame,
    q_from_strain_tilt,
    q_lab,
    q_sample,
    rotation_matrix,
    strain_tilt,
    wavelength_angstrom,
)


def geom(**kw):
    base = dict(
        energy_kev=9.0,
        detector_distance_m=0.5,
        pixel_size_m=55e-6,
        gamma_deg=16.0,
        delta_deg=4.0,
        beam_center=(30.5, 20.25),
    )
    return Geometry(**{**base, **kw})


def test_wavelength_and_k():
    assert wavelength_angstrom(12.398419843320026) == pytest.approx(1.0, rel=1e-15)
    g = geom(energy_kev=8.0)
    assert g.k == pytest.approx(2 * np.pi * 8.0 / 12.398419843320026, rel=1e-15)


@pytest.mark.parametrize("gamma,delta", [(0.0, 0.0), (28.5, 18.1), (16.0, -4.0), (-40.0, 60.0)])
def test_bragg_law_at_arm_axis_pixel(gamma, delta):
    g = geom(gamma_deg=gamma, delta_deg=delta)
    q = q_sample(g, [-5.0, 0.0, 13.7], rows=[g.beam_center[0]], cols=[g.beam_center[1]])
    two_theta = np.arccos(np.cos(np.radians(gamma)) * np.cos(np.radians(delta)))
    # |q| = 2k sin θ  <=>  λ = 2 d sin θ with d = 2π/|q|
    assert np.linalg.norm(q, axis=-1) == pytest.approx(2 * g.k * np.sin(two_theta / 2), rel=1e-12)
    if gamma or delta:
        d = 2 * np.pi / np.linalg.norm(q[0, 0, 0])
        assert 2 * d * np.sin(two_theta / 2) == pytest.approx(g.wavelength, rel=1e-12)


def test_hand_worked_cases():
    k = geom().k
    # gamma = 90: k_f along +x -> q_lab = (k, 0, -k)
    g = geom(gamma_deg=90.0, delta_deg=0.0, beam_center=(0.0, 0.0))
    assert q_lab(g, rows=[0], cols=[0])[0, 0] == pytest.approx([k, 0, -k], abs=1e-12)
    # rotated sample by 90 deg about y: q = R(y,90)^T (k,0,-k) = (k, 0, k)
    assert q_sample(g, [90.0], rows=[0], cols=[0])[0, 0, 0] == pytest.approx([k, 0, k], abs=1e-12)
    # delta = 90 (about -x) lifts the arm to +y
    g = geom(gamma_deg=0.0, delta_deg=90.0, beam_center=(0.0, 0.0))
    assert q_lab(g, rows=[0], cols=[0])[0, 0] == pytest.approx([0, k, -k], abs=1e-12)
    # straight-through pixel has q = 0; next row moves down (row_direction y-), next col along +x
    g = geom(gamma_deg=0.0, delta_deg=0.0, beam_center=(10.0, 10.0))
    q = q_lab(g, rows=[10, 11], cols=[10, 11])
    assert q[0, 0] == pytest.approx([0, 0, 0], abs=1e-15)
    assert q[1, 0, 1] < 0 and abs(q[1, 0, 0]) < 1e-15
    assert q[0, 1, 0] > 0 and abs(q[0, 1, 1]) < 1e-15
    expected = k * 55e-6 / np.hypot(0.5, 55e-6)
    assert q[0, 1, 0] == pytest.approx(expected, rel=1e-12)


def test_rotation_properties():
    rng = np.random.default_rng(0)
    u = rng.normal(size=3)
    a, b = 0.7, -1.9
    r = rotation_matrix(u, a)
    assert r @ r.T == pytest.approx(np.eye(3), abs=1e-14)
    assert np.linalg.det(r) == pytest.approx(1.0)
    assert r @ (u / np.linalg.norm(u)) == pytest.approx(u / np.linalg.norm(u))  # axis fixed
    assert rotation_matrix(u, a) @ rotation_matrix(u, b) == pytest.approx(rotation_matrix(u, a + b))
    assert rotation_matrix("z+", np.pi / 2) @ [1, 0, 0] == pytest.approx([0, 1, 0], abs=1e-15)
    assert rotation_matrix("x-", np.pi / 2) @ [0, 0, 1] == pytest.approx([0, 1, 0], abs=1e-15)
    assert rotation_matrix("y+", [0.1, 0.2]).shape == (2, 3, 3)


def test_rocking_rotates_q_rigidly():
    g = geom()
    rows, cols = np.arange(0, 60, 7), np.arange(3, 40, 5)
    q = q_sample(g, [0.0, 2.5], rows=rows, cols=cols)
    # |q| does not depend on the sample angle; q(θ) = R(a, θ)^T q(0)
    assert np.linalg.norm(q[1], axis=-1) == pytest.approx(np.linalg.norm(q[0], axis=-1))
    r = rotation_matrix("y+", np.radians(2.5))
    assert q[1] == pytest.approx(np.einsum("ji,rcj->rci", r, q[0]), abs=1e-14)


def test_roi_matches_full_detector():
    g = geom()
    full = q_sample(g, [8.0], rows=np.arange(64), cols=np.arange(48))
    roi = q_sample(g, [8.0], rows=np.arange(10, 20), cols=np.arange(30, 40))
    assert roi == pytest.approx(full[:, 10:20, 30:40])


def test_against_xrayutilities():
    xu = pytest.importorskip("xrayutilities")
    g = geom(gamma_deg=28.5, delta_deg=18.1, beam_center=(20.3, 11.7))
    nr, nc = 40, 30
    qc = xu.experiment.QConversion(["y+"], ["y+", "x-"], [0, 0, 1])
    qc.init_area(
        "y-",
        "x+",
        cch1=g.beam_center[0],
        cch2=g.beam_center[1],
        Nch1=nr,
        Nch2=nc,
        distance=g.detector_distance_m,
        pwidth1=g.pixel_size_m,
        pwidth2=g.pixel_size_m,
    )
    angles = np.array([-3.0, 0.5, 7.0])
    qx, qy, qz = qc.area(
        angles, np.full(3, g.gamma_deg), np.full(3, g.delta_deg), en=g.energy_kev * 1000
    )
    ours = q_sample(g, angles, rows=np.arange(nr), cols=np.arange(nc))
    assert np.stack([qx, qy, qz], -1) == pytest.approx(ours, abs=1e-12)


def test_crystal_frame_and_strain_tilt_hand_worked():
    h = np.array([0.0, 0.0, 2.0])
    f = crystal_frame(h, "y+")
    assert f.x == pytest.approx([1, 0, 0]) and f.y == pytest.approx([0, 1, 0])
    assert f.d_spacing == pytest.approx(np.pi)
    # compressed lattice: |q| larger -> d smaller -> negative strain
    out = strain_tilt(np.array([0.0, 0.0, 2.002]), f)
    assert out["strain"] == pytest.approx(2 / 2.002 - 1)
    assert out["d_spacing"] == pytest.approx(2 * np.pi / 2.002)
    # rotate h by 1 mrad about y_c: tilt_x = 1e-3, tilt_y = 0
    q = rotation_matrix(f.y, 1e-3) @ h
    out = strain_tilt(q, f)
    assert out["tilt_x"] == pytest.approx(1e-3, rel=1e-12)
    assert out["tilt_y"] == pytest.approx(0, abs=1e-15)
    assert out["strain"] == pytest.approx(0, abs=1e-15)
    # about x_c by -2 mrad: tilt_y = +2e-3 (rotation about x moves z towards -y)
    out = strain_tilt(rotation_matrix(f.x, -2e-3) @ h, f)
    assert out["tilt_y"] == pytest.approx(2e-3, rel=1e-12)


def test_crystal_frame_is_right_handed_and_errors():
    f = crystal_frame([0.3, -0.2, 1.4], "y+")
    m = f.matrix
    assert m @ m.T == pytest.approx(np.eye(3), abs=1e-14)
    assert np.cross(f.x, f.y) == pytest.approx(f.z)
    with pytest.raises(ValueError, match="parallel to the rocking axis"):
        crystal_frame([0.0, 1.0, 0.0], "y+")
    with pytest.raises(ValueError, match="non-zero"):
        crystal_frame([0.0, 0.0, 0.0])


def test_strain_tilt_round_trip():
    rng = np.random.default_rng(3)
    f = crystal_frame([0.2, 0.1, 1.3], "y+")
    e, tx, ty = rng.normal(0, 1e-3, (3, 50))
    out = strain_tilt(q_from_strain_tilt(e, tx, ty, f), f)
    assert out["strain"] == pytest.approx(e, abs=1e-13)
    assert out["tilt_x"] == pytest.approx(tx, abs=1e-13)
    assert out["tilt_y"] == pytest.approx(ty, abs=1e-13)


def test_strain_tilt_stays_lazy(raise_if_computes):
    f = crystal_frame([0.2, 0.1, 1.3])
    q = da.from_array(np.tile([0.2, 0.1, 1.3], (8, 8, 1)), chunks=(4, 4, 3))
    out = strain_tilt(q, f)
    assert all(isinstance(v, da.Array) for v in out.values())
    assert out["strain"].shape == (8, 8)


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"energy_kev": 0.0}, "energy_kev"),
        ({"detector_distance_m": -1.0}, "detector_distance_m"),
        ({"pixel_size_m": float("nan")}, "pixel_size_m"),
        ({"row_direction": "x+", "col_direction": "x-"}, "row_direction"),
        ({"rocking_axis": "q+"}, "q\\+"),
    ],
)
def test_nonsense_geometry_rejected(kw, match):
    with pytest.raises(ValueError, match=match):
        geom(**kw)
