"""End to end on a beamline export: ``spndi init`` → ``spndi run``, accurate against the truth.

The simulator's ``beamline`` preset writes what a nanoprobe beamline exports (per-scan files with
ids crossing a digit boundary, split files, uint32 frames with module gaps through the Bragg
peak, flagged pixels and saturated frames, a jittered snake fly scan with overshoot, XRF
spectra). The manifest comes from ``spndi init`` alone (plus the XRF energy window); the run's
d-spacing and tilts must stay within 2× of the same particle simulated in the ideal layout.
"""

from __future__ import annotations

import numpy as np
import pytest

from spndi_dask.cli import main
from spndi_dask.config import load_manifest
from spndi_dask.geometry import crystal_frame, strain_tilt
from spndi_dask.ingest import ingest
from spndi_dask.io.results_store import open_results
from spndi_dask.reduce import reduce
from spndi_dask.simulate import preset, simulate_beamtime

IDEAL = dict(
    scan_files=False,
    frames_per_file=0,
    fly_scan=False,
    module_gap_px=0,
    flagged_pixels=0,
    saturated_frames=0,
    xrf_spectra=False,
)


def _errors(ds, truth_file) -> dict[str, float]:
    gt = np.load(truth_file)
    frame = crystal_frame(gt["G0"], "y+")
    ours, true = strain_tilt(ds["q_com"].values, frame), strain_tilt(gt["G"], frame)
    inside = gt["particle_mask"] & ds["valid"].values
    d_true = 2 * np.pi / np.linalg.norm(gt["G"], axis=-1)
    rel = (ds["d_spacing"].values - d_true) / d_true
    rms = lambda e: float(np.sqrt(np.mean(e[inside] ** 2)))  # noqa: E731
    return {
        "d": rms(rel),
        "tilt_x": rms(ours["tilt_x"] - true["tilt_x"]),
        "tilt_y": rms(ours["tilt_y"] - true["tilt_y"]),
        "coverage": float(inside.sum() / gt["particle_mask"].sum()),
    }


@pytest.mark.slow
def test_spndi_init_then_run_on_a_beamline_export_is_as_accurate_as_the_ideal_layout(
    tmp_path, capsys
):
    sizes = dict(n_particles=1, n_angles=11)
    ideal = simulate_beamtime(tmp_path / "ideal", preset("beamline", **sizes, **IDEAL))
    ingest(ideal)
    reduce(ideal)
    want = _errors(open_results(ideal.output_dir, "p1"), tmp_path / "ideal/ground_truth/p1.npz")

    bt = tmp_path / "beamline"
    simulate_beamtime(bt, preset("beamline", **sizes))
    manifest = bt / "init.toml"
    args = ["init", str(bt / "raw"), "-o", str(manifest), "--xrf-window", "6.73:7.13"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "p1" in printed and "samy" in printed  # the table of what it found
    m = load_manifest(manifest)
    p = m.particle("p1")
    assert p.positions is not None and p.mask_dataset and p.xrf_window_kev == (6.73, 7.13)
    assert all(len(files) > 1 for files in p.frame_files(m.base_dir))  # split scans
    assert main(["run", str(manifest), "--stages", "ingest-reduce", "--workers", "1"]) == 0
    got = _errors(open_results(m.output_dir, "p1"), bt / "ground_truth/p1.npz")
    assert got["coverage"] > 0.97
    for key in ("d", "tilt_x", "tilt_y"):
        assert got[key] < 2 * want[key], (key, got[key], want[key])
    raw = open_results(m.output_dir, "p1").attrs
    assert raw["masked_pixels"]["module_gaps"] > 0 and raw["masked_pixels"]["flagged"] > 0
