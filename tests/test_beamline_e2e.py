"""End to end on a beamline export: ``spndi init`` → ``spndi run``, accurate against the truth.

The simulator's ``beamline`` preset writes what a nanoprobe beamline exports (per-scan files with
ids crossing a digit boundary, split files, uint32 frames with module gaps through the Bragg
peak, flagged pixels and saturated frames, a jittered snake fly scan with overshoot, XRF
spectra). The manifest comes from ``spndi init`` alone (plus the XRF energy window); the run's
d-spacing and tilts must stay within 2× of the same particle simulated in the ideal layout.
"""

from __future__ import annotations

import pytest

from spndi_dask.cli import main
from spndi_dask.config import load_manifest
from spndi_dask.ingest import ingest
from spndi_dask.io.results_store import open_results
from spndi_dask.reduce import reduce
from spndi_dask.simulate import IDEAL_LAYOUT, errors_vs_truth, preset, simulate_beamtime


@pytest.mark.slow
def test_spndi_init_then_run_on_a_beamline_export_is_as_accurate_as_the_ideal_layout(
    tmp_path, capsys
):
    sizes = dict(n_particles=1, n_angles=11)
    ideal = simulate_beamtime(tmp_path / "ideal", preset("beamline", **sizes, **IDEAL_LAYOUT))
    ingest(ideal)
    reduce(ideal)
    want = errors_vs_truth(
        open_results(ideal.output_dir, "p1"), tmp_path / "ideal/ground_truth/p1.npz"
    )

    bt = tmp_path / "beamline"
    simulate_beamtime(bt, preset("beamline", **sizes))
    manifest = bt / "init.toml"
    args = ["init", str(bt / "raw"), "-o", str(manifest), "--xrf-window", "6.73:7.13"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "p1" in printed and "samy" in printed  # the table of what it found
    m = load_manifest(manifest)
    p = m.scan("p1")
    assert p.positions is not None and p.mask_dataset and p.xrf_window_kev == (6.73, 7.13)
    assert all(len(files) > 1 for files in p.frame_files(m.base_dir))  # split scans
    assert main(["run", str(manifest), "--stages", "ingest-reduce", "--workers", "1"]) == 0
    got = errors_vs_truth(open_results(m.output_dir, "p1"), bt / "ground_truth/p1.npz")
    assert got["coverage"] > 0.97
    for key in ("d", "tilt_x", "tilt_y"):
        assert got[key] < 2 * want[key], (key, got[key], want[key])
    raw = open_results(m.output_dir, "p1").attrs
    assert raw["masked_pixels"]["module_gaps"] > 0 and raw["masked_pixels"]["flagged"] > 0
