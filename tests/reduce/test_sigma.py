"""Per-pixel standard errors: hand-derived cases, Monte Carlo and calibration against the truth.

The check of the maps written for the ``tiny`` beamtime lives in test_reduce.py (its fixture).
"""

from __future__ import annotations

import numpy as np
import pytest

from spndi_dask.geometry import crystal_frame, strain_tilt
from spndi_dask.reduce import _kernels as K
from spndi_dask.reduce import open_results
from spndi_dask.simulate import SIGMA_QUANTITIES, preset, sigma_z_vs_truth

from .test_reduce import _ready


def test_covariance_of_three_voxels_by_hand_and_invariant_to_the_monitor_scale():
    # counts 1, 2, 1 at dq = (0,0,0), (1,0,0), (1,1,0): W = 4, q̄ = (3/4, 1/4, 0);
    # Var(q̄_x) = [1·(3/4)² + 2·(1/4)² + 1·(1/4)²]/16 = (12/16)/16 = 3/64,
    # Var(q̄_y) = [(1/4)² + 2·(1/4)² + (3/4)²]/16 = 3/64, Cov = [1·(-3/4)(-1/4)
    # + 2·(1/4)(-1/4) + (1/4)(3/4)]/16 = (4/16)/16 = 1/64
    raw = np.zeros((1, 1, 1, 1, 3))
    raw[..., :] = [1, 2, 1]
    dq = np.zeros((1, 1, 3, 3))
    dq[0, 0, 1] = [1, 0, 0]
    dq[0, 0, 2] = [1, 1, 0]
    want = np.array([[3, 1, 0], [1, 3, 0], [0, 0, 0]]) / 64
    for s in (1.0, 7.5):  # a monitor scale multiplies w by s and var by s²: q̄ and Cov stay
        w, var = K.corrected(raw, scale=np.full((1, 1, 1), s), background=np.zeros(1))
        m = K.moment_sums(w, var, dq, np.arange(1), np.arange(3))[0, 0, 0]
        np.testing.assert_allclose(m[1:4] / m[0], [0.75, 0.25, 0.0])
        np.testing.assert_allclose(K.com_covariance(m), want, atol=1e-12)


def test_sigma_matches_monte_carlo_of_one_pixel_with_gain_monitor_background_and_fill():
    """Many Poisson draws of one pixel's frames: std of the estimates ≈ the propagated sigma."""
    rng = np.random.default_rng(5)
    na, nr, nc, draws = 7, 8, 8, 4000
    h = np.array([0.0, 0.05, 1.34])
    a, r, c = np.meshgrid(np.arange(na), np.arange(nr), np.arange(nc), indexing="ij")
    dq = np.stack([2e-3 * (a - 3.2), 1.5e-3 * (r - 3.6), 1e-3 * (c - 4.1)], -1)
    flat = rng.uniform(0.7, 1.3, (nr, nc))
    bad = np.zeros((nr, nc), bool)
    bad[4, 3] = True  # one masked pixel in the peak, filled from its neighbours
    scale = rng.uniform(0.8, 1.25, na)  # monitor normalisation per angle
    bg = 0.4  # background counts per voxel, subtracted after normalisation
    peak = 25.0 * np.exp(-((a - 3.2) ** 2 / 4 + (r - 3.6) ** 2 / 5 + (c - 4.1) ** 2 / 3))
    lam = (peak + bg) * flat / scale[:, None, None]  # raw counts: the flat and the flux enter
    counts = rng.poisson(lam[:, None], size=(na, draws, nr, nc)).astype(np.float64)
    w, var = K.corrected(
        counts[:, :, None],
        scale=np.broadcast_to(scale[:, None, None], (na, draws, 1)),
        background=np.full(na, bg),
        flat=flat,
        bad=bad,
    )
    fill = K.fill_operator(bad)
    m = K.moment_sums(w, var, dq, np.arange(nr), np.arange(nc), fill=fill).sum(axis=0)[:, 0]
    q = h + m[:, 1:4] / m[:, :1]
    cov = K.com_covariance(m)
    frame = crystal_frame(h)
    got = strain_tilt(q, frame)
    sigma = K.strain_tilt_sigma(q, cov, frame)
    # the std over draws has a relative standard error of 1/sqrt(2 · 4000) ≈ 1.1 %
    for c in range(3):
        ratio = np.std(q[:, c]) / np.sqrt(np.median(cov[:, c, c]))
        assert ratio == pytest.approx(1.0, abs=0.05), (c, ratio)
    for name in SIGMA_QUANTITIES:
        ratio = np.std(got[name]) / np.median(sigma[name])
        assert ratio == pytest.approx(1.0, abs=0.05), (name, ratio)


def test_strain_tilt_sigma_is_the_jacobian_of_strain_tilt():
    """Gaussian draws of q with a known covariance, through the exact strain_tilt."""
    rng = np.random.default_rng(1)
    frame = crystal_frame([0.1, 0.2, 1.3])
    q0 = np.array([0.103, 0.195, 1.302])
    root = rng.normal(size=(3, 3)) * 2e-4
    cov = root @ root.T
    samples = rng.multivariate_normal(q0, cov, size=20000)
    got = strain_tilt(samples, frame)
    sigma = K.strain_tilt_sigma(q0, cov, frame)
    for name in SIGMA_QUANTITIES:
        assert np.std(got[name]) == pytest.approx(float(sigma[name]), rel=0.03), name


def test_sigma_is_calibrated_at_a_quarter_of_the_counts(tmp_path):
    from spndi_dask.reduce import reduce

    m = _ready(tmp_path, preset("tiny", peak_counts=10.0))
    reduce(m)
    for p in m.scans:
        z = sigma_z_vs_truth(
            open_results(m.output_dir, p.name), tmp_path / "ground_truth" / f"{p.name}.npz"
        )
        for name in SIGMA_QUANTITIES:
            assert 0.7 <= z[name]["rms"] <= 1.5, (p.name, name, z[name])
