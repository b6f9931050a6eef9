"""``spndi init`` on the command line: output, --force, and end to end on simulated files."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import tomllib

from spndi_dask.cli import main
from spndi_dask.config import load_manifest

from .test_init import GEOMETRY_FLAGS, plain_file


def test_output_and_force(tmp_path, capsys):
    raw = tmp_path / "raw"
    for a, theta in enumerate([1.0, 1.1]):
        plain_file(raw / "p1" / f"a{a}.h5", n=4, entry__theta=theta)
    args = ["init", str(raw), "-o", str(tmp_path / "bt" / "beamtime.toml"), "--scan-shape", "2,2",
            "--step", "0.1,0.1", *GEOMETRY_FLAGS]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "found in" in out and "manifest: " in out and "spndi run" in out
    assert "  scan  angle files  files  angles (deg)  grid  step (µm)  order" in out
    path = tmp_path / "bt" / "beamtime.toml"
    m = load_manifest(path)
    assert m.output_dir == tmp_path / "bt" / "results"
    assert m.scans[0].frames == "../raw/p1/a{index}.h5"  # relative to the manifest
    path.write_text("# mine\n")
    assert main(args) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert path.read_text() == "# mine\n"
    assert main([*args, "--force"]) == 0
    assert load_manifest(path).scans[0].name == "p1"
    # -o - prints the manifest and writes nothing
    capsys.readouterr()
    assert main([*args[:2], "-o", "-", *args[4:]]) == 0
    assert tomllib.loads(capsys.readouterr().out)["scans"][0]["name"] == "p1"


# -- end to end on the simulator's files -----------------------------------------------------------
def simulator_flags(cfg) -> list[str]:
    """What the simulator's files do not record: the step and the detector geometry."""
    g = cfg.geometry()
    return [
        "--step", f"{cfg.scan_step_um[0]},{cfg.scan_step_um[1]}",
        "--distance-m", str(g.detector_distance_m), "--pixel-size-m", str(g.pixel_size_m),
        "--beam-center", f"{g.beam_center[0]},{g.beam_center[1]}",
        "--gamma-deg", repr(g.gamma_deg), "--delta-deg", repr(g.delta_deg),
    ]  # fmt: skip


def test_simulated_beamtime_gives_the_simulators_manifest(tmp_path, capsys):
    from spndi_dask.simulate import preset, simulate_beamtime

    cfg = preset("tiny")
    truth = simulate_beamtime(tmp_path, cfg, scheduler="threads")
    path = tmp_path / "init.toml"
    assert main(["init", str(tmp_path / "raw"), "-o", str(path), *simulator_flags(cfg)]) == 0
    out = capsys.readouterr().out
    assert "recorded /entry/sample/theta" in out and "recorded /@scan_shape" in out
    made = load_manifest(path)
    assert made.output_dir == truth.output_dir
    assert made.geometry_for("p1") == truth.geometry_for("p1")
    for mine, theirs in zip(made.scans, truth.scans, strict=True):
        assert mine.name == theirs.name
        assert mine.frame_files(tmp_path) == theirs.frame_files(tmp_path)
        assert mine.frames == theirs.frames  # the same template
        for key in ("dataset", "monitor", "xrf", "scan_shape", "scan_step_um", "scan_order"):
            assert getattr(mine, key) == getattr(theirs, key), key
        assert mine.positions is None and mine.mask_dataset is None
        np.testing.assert_array_equal(mine.angles, theirs.angles)
    # --angles instead of the recorded angles: the same values
    start, stop = truth.scans[0].angles[[0, -1]]
    args = ["init", str(tmp_path / "raw"), "-o", str(path), "--force", *simulator_flags(cfg)]
    assert main([*args, "--angles", f"{start}:{stop}:{cfg.n_angles}"]) == 0
    np.testing.assert_allclose(load_manifest(path).scans[1].angles, truth.scans[1].angles)


@pytest.mark.slow
def test_init_then_ingest_and_reduce(tmp_path):
    from spndi_dask.ingest import ingest
    from spndi_dask.reduce import open_results, reduce
    from spndi_dask.simulate import preset, simulate_beamtime

    cfg = preset("tiny", n_particles=1)
    simulate_beamtime(tmp_path / "sim", cfg, scheduler="threads")
    (tmp_path / "sim" / "beamtime.toml").unlink()  # only the raw files are left
    path = tmp_path / "sim" / "beamtime.toml"
    assert (
        main(["init", str(tmp_path / "sim" / "raw"), "-o", str(path), *simulator_flags(cfg)]) == 0
    )
    manifest = load_manifest(path)
    assert ingest(manifest)["p1"]["status"] == "ingested"
    summary = reduce(manifest)
    assert summary["p1"]["status"] == "reduced", summary
    res = open_results(manifest.output_dir, "p1")
    assert res["strain"].shape == cfg.scan_shape
    assert int(res["valid"].sum()) > 0


def test_init_loads_no_heavy_library(tmp_path):
    """`spndi init` reads files and writes text: no cluster, array or plotting library."""

    for a, theta in enumerate([1.0, 1.1]):
        plain_file(tmp_path / "raw" / "p1" / f"a{a}.h5", n=4, entry__theta=theta)
    args = ["init", str(tmp_path / "raw"), "-o", "-", "--scan-shape", "2,2", "--step", "1,1",
            *GEOMETRY_FLAGS]  # fmt: skip
    # (the CLI's logging set-up imports distributed, for its loggers' levels)
    heavy = ("dask_jobqueue", "xarray", "zarr", "numba", "torch", "scipy", "matplotlib")
    code = (
        f"from spndi_dask.cli import main\ncode = main({args!r})\nimport sys\n"
        f"print(code, sorted(m for m in {heavy!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "0 []", out.stderr


@pytest.mark.parametrize("frames_4d", [False, True])
def test_beamline_preset_gives_the_simulators_manifest(tmp_path, capsys, frames_4d):
    """The simulator's ``beamline`` export (from the branch that adds it; skipped before)."""
    from spndi_dask.simulate import PRESETS, preset, simulate_beamtime

    if "beamline" not in PRESETS:
        pytest.skip("this simulator has no 'beamline' preset yet")
    split = {} if frames_4d else {"frames_per_file": 256}
    cfg = preset("beamline", n_particles=2, n_angles=4, frames_4d=frames_4d, **split)
    truth = simulate_beamtime(tmp_path, cfg, scheduler="threads")
    window = truth.scans[0].xrf_window_kev
    path = tmp_path / "init.toml"
    args = ["init", str(tmp_path / "raw"), "-o", str(path), "--xrf-window", "{}:{}".format(*window)]
    assert main(args) == 0, capsys.readouterr().err
    made = load_manifest(path)
    assert made.geometry_for("p2") == truth.geometry_for("p2")
    assert made.reduce.saturation == truth.reduce.saturation
    keys = ("name", "frames", "dataset", "monitor", "xrf", "xrf_window_kev", "xrf_energy",
            "xrf_calibration", "mask_dataset", "positions", "scan_shape", "scan_step_um",
            "scan_order")  # fmt: skip
    for mine, theirs in zip(made.scans, truth.scans, strict=True):
        for key in keys:
            assert getattr(mine, key) == getattr(theirs, key), key
        np.testing.assert_array_equal(mine.angles, theirs.angles)
