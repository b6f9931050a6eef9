"""``[reduce] peak = "gaussian"``: the fit kernel, its lazy wrapper and the reduce option."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest

from spndi_dask.config import Manifest, ManifestError
from spndi_dask.ingest import ingest
from spndi_dask.reduce import open_results, reduce
from spndi_dask.reduce._peakfit import FIT_PARAMS, FIT_STATUS, fit_gaussian_3d
from spndi_dask.reduce.maps import QUALITY
from spndi_dask.reduce.peakfit import PEAK_CHANNELS, gaussian_peaks
from spndi_dask.reduce.plan import BeamtimeGrid
from spndi_dask.simulate import errors_vs_truth, preset, simulate_beamtime

from ..conftest import manifest_dict

N = 16
AXIS = np.arange(N) * 0.25 - 2.0  # grid coordinates (step 0.25, not index units)
STATUS = FIT_PARAMS.index("status")


def _gaussian(amp, centre, width, bg):
    x, y, z = np.meshgrid(AXIS, AXIS, AXIS, indexing="ij")
    u = sum(((c - m) / s) ** 2 for c, m, s in zip((x, y, z), centre, width, strict=True))
    return amp * np.exp(-u / 2) + bg


def test_noiseless_gaussian_is_recovered_exactly_with_uncovered_points_left_out():
    truth = (30.0, (0.31, -0.42, 0.17), (0.6, 0.45, 0.8), 1.5)
    pattern = _gaussian(*truth)
    covered = np.ones((N, N, N), bool)
    covered[:3] = False  # a corner outside the measured range, holding garbage
    pattern[~covered] = 1e3
    fit = fit_gaussian_3d(pattern[None].astype(np.float64), covered, (AXIS, AXIS, AXIS))[0]
    np.testing.assert_allclose(fit[1:4], truth[1], atol=1e-6)
    np.testing.assert_allclose(fit[4:7], truth[2], rtol=1e-6)
    np.testing.assert_allclose(fit[[0, 7]], [truth[0], truth[3]], rtol=1e-6)
    assert fit[STATUS] == FIT_STATUS["converged"] and fit[8] < 1e-12


def test_poisson_noise_recovers_hand_set_parameters_and_chi2_is_one():
    rng = np.random.default_rng(7)
    truths, patterns = [], []
    for _ in range(8):
        t = (200.0, tuple(rng.uniform(-0.5, 0.5, 3)), tuple(rng.uniform(0.4, 0.7, 3)), 4.0)
        truths.append([t[0], *t[1], *t[2], t[3]])
        patterns.append(rng.poisson(_gaussian(*t)))
    fit = fit_gaussian_3d(np.array(patterns, np.float32), np.ones((N,) * 3, bool), (AXIS,) * 3)
    truths = np.array(truths)
    assert (fit[:, STATUS] == FIT_STATUS["converged"]).all()
    # centres to a fifth of the 0.25 grid step (several standard errors, σ/√counts · 2 with
    # the background); widths and heights to a few per cent
    assert np.abs(fit[:, 1:4] - truths[:, 1:4]).max() < 0.05
    np.testing.assert_allclose(fit[:, 4:7], truths[:, 4:7], rtol=0.05)
    np.testing.assert_allclose(fit[:, 0], truths[:, 0], rtol=0.05)
    np.testing.assert_allclose(fit[:, 7], truths[:, 7], atol=0.1)
    # Pearson χ²/dof of Poisson counts (> 1 per voxel everywhere) against the right model: ~1
    assert np.abs(fit[:, 8] - 1).max() < 0.05


def test_no_signal_and_a_peak_off_the_grid_are_nan_with_their_status():
    covered = np.ones((N,) * 3, bool)
    off = _gaussian(50.0, (2.4, 0.0, 0.0), (0.5, 0.5, 0.5), 0.0)  # centre beyond the grid (1.75)
    fit = fit_gaussian_3d(np.stack([np.zeros((N,) * 3), off]), covered, (AXIS,) * 3)
    assert fit[0, STATUS] == FIT_STATUS["no_signal"]
    assert fit[1, STATUS] == FIT_STATUS["failed"]
    assert np.isnan(fit[:, :9]).all()


def test_wrapper_is_lazy_and_equals_the_kernel_in_the_sample_frame(raise_if_computes):
    rng = np.random.default_rng(1)
    axes = np.linalg.qr(rng.normal(size=(3, 3)))[0]
    grid = BeamtimeGrid(h=np.array([0.1, 0.2, 1.3]), axes=axes, extent=np.full(3, 2.0), n=N)
    one = _gaussian(30.0, (0.3, -0.2, 0.1), (0.5, 0.6, 0.7), 0.5)
    patterns = np.stack([one, np.roll(one, 2, axis=0), np.roll(one, -3, axis=2)]).reshape(
        3, 1, N, N, N
    )
    lazy = gaussian_peaks(da.from_array(patterns, chunks=(2, 1, N, N, N)), np.ones((N,) * 3), grid)
    assert isinstance(lazy, da.Array) and lazy.shape == (3, 1, len(PEAK_CHANNELS))
    with pytest.raises(AssertionError, match="computed"):
        lazy.compute()
    eager = gaussian_peaks(patterns, np.ones((N,) * 3, bool), grid)
    assert isinstance(eager, np.ndarray)
    # the centre, an offset along the grid axes, back in the sample frame: h + offset @ axes
    grid_offsets = np.array([0.3, -0.2, 0.1]) - AXIS[0] + grid.offsets[0][0]
    np.testing.assert_allclose(eager[0, 0, 1:4], grid.h + grid_offsets @ axes, atol=1e-9)


def test_bad_peak_option_names_the_field(tmp_path):
    d = manifest_dict(n_angles=3, scan_shape=(2, 2))
    d["reduce"] = {"peak": "gauss"}
    with pytest.raises(ManifestError) as info:
        Manifest.from_dict(d, base_dir=tmp_path)
    assert "reduce.peak = 'gauss'" in str(info.value) and "'gaussian'" in str(info.value)


@pytest.mark.slow
def test_fit_beats_the_moments_with_a_weak_second_domain_and_switching_reruns(tmp_path):
    config = preset("tiny", n_particles=1, second_domain_fraction=0.2)
    m = simulate_beamtime(tmp_path, config, scheduler="sync")
    ingest(m)
    truth = tmp_path / "ground_truth" / "p1.npz"
    assert reduce(m)["p1"]["status"] == "reduced"
    moments = open_results(tmp_path / "results", "p1").compute()
    d = m.to_dict()
    d["reduce"] = {"peak": "gaussian"}
    fitted = Manifest.from_dict(d, base_dir=tmp_path, source=str(tmp_path / "beamtime.toml"))
    assert reduce(fitted)["p1"]["status"] == "reduced"  # the method is in the fingerprint
    assert reduce(fitted)["p1"]["status"] == "up to date"
    gauss = open_results(tmp_path / "results", "p1").compute()
    assert moments.attrs["peak"] == "moments" and gauss.attrs["peak"] == "gaussian"
    assert "q_fit" not in moments and "peak_chi2" not in moments
    np.testing.assert_array_equal(gauss["q_com"], moments["q_com"])  # the moments are kept
    ok = gauss["valid"].values
    assert ok.sum() >= 0.95 * moments["valid"].values.sum()
    failed = (gauss["quality"].values & QUALITY["fit_failed"]) > 0
    assert not (failed & ok).any() and np.isnan(gauss["d_spacing"].values[failed]).all()
    for v in ("peak_amplitude", "peak_background", "peak_chi2", "width_x"):
        assert np.isfinite(gauss[v].values[ok]).all(), v
    e_mom, e_fit = errors_vs_truth(moments, truth), errors_vs_truth(gauss, truth)
    # the second domain is turned along tilt_x: the moments average it in, the fit does not
    assert e_fit["tilt_x"] < 0.5 * e_mom["tilt_x"], (e_fit, e_mom)
