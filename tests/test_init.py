"""``spndi init``: a manifest from a folder of raw scan files (hand-made HDF5/TIFF layouts)."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
import tomllib

from spndi_dask.config import load_manifest
from spndi_dask.init import InitError, InitOptions, infer_grid, init_manifest

# geometry flags for files that record none
GEOMETRY = dict(
    energy_kev=9.0,
    distance_m=0.5,
    pixel_size_m=55e-6,
    beam_center=(4.0, 5.0),
    gamma_deg=16.0,
    delta_deg=4.0,
)
GEOMETRY_FLAGS = [
    "--energy-kev", "9", "--distance-m", "0.5", "--pixel-size-m", "55e-6",
    "--beam-center", "4,5", "--gamma-deg", "16", "--delta-deg", "4",
]  # fmt: skip
DET = (6, 8)
EIGER = "/entry/instrument/eiger"


def fly_positions(rows, cols, step=(0.05, 0.04), *, snake=True, jitter=0.15, overshoot=2, seed=0):
    """Recorded (y, x) in µm of a fly scan: snake lines, jitter and overshoot past each line end."""
    rng = np.random.default_rng(seed)
    ys, xs = [], []
    for r in range(rows):
        c = np.arange(cols + int(rng.integers(0, overshoot + 1)))
        if snake and r % 2:
            c = cols - 1 - c
        ys.append(np.full(c.size, float(r)))
        xs.append(c.astype(float))
    y, x = np.concatenate(ys), np.concatenate(xs)
    y = 12.0 + step[0] * (y + rng.normal(0, jitter, y.size))
    x = -3.0 + step[1] * (x + rng.normal(0, jitter, x.size))
    return y, x


def beamline_file(
    path: Path,
    theta: float,
    *,
    scan=(5, 6),
    step=(0.05, 0.04),
    seed=0,
    parts=1,
    four_d=False,
    spectra=True,
    extra: dict | None = None,
):
    """One scan in the beamline preset's layout (Eiger, NeXus metadata, positions, xspress3).

    ``parts > 1`` writes ``path`` as a folder of ``data_000.h5 ...`` holding the scan in parts.
    """
    if four_d:
        n = scan[0] * scan[1]
        y = x = None
    else:
        y, x = fly_positions(*scan, step, seed=seed)
        n = y.size
    rng = np.random.default_rng(seed)
    frames = rng.poisson(3, (n, *DET)).astype("u4")
    bounds = np.linspace(0, n, parts + 1).astype(int)
    files = [path] if parts == 1 else [path / f"data_{k:03d}.h5" for k in range(parts)]
    for k, file in enumerate(files):
        file.parent.mkdir(parents=True, exist_ok=True)
        lo, hi = bounds[k], bounds[k + 1]
        with h5py.File(file, "w") as f:
            if four_d:
                f[f"{EIGER}/data"] = frames.reshape(*scan, *DET)
            else:
                f[f"{EIGER}/data"] = frames[lo:hi]
                f["/entry/measurement/samy"] = y[lo:hi]
                f["/entry/measurement/samx"] = x[lo:hi]
                f["/entry/measurement/samy"].attrs["units"] = "um"
                f["/entry/measurement/samx"].attrs["units"] = "um"
            mask = np.zeros(DET, "u4")
            mask[0, 0] = 1
            f[f"{EIGER}/pixel_mask"] = mask
            for key, value, units in (
                ("x_pixel_size", 75e-6, "m"),
                ("y_pixel_size", 75e-6, "m"),
                ("distance", 350.0, "mm"),
                ("beam_center_x", 3.5, "pixel"),
                ("beam_center_y", 2.25, "pixel"),
            ):
                f[f"{EIGER}/{key}"] = value
                f[f"{EIGER}/{key}"].attrs["units"] = units
            f["/entry/instrument/monochromator/energy"] = 10000.0
            f["/entry/instrument/monochromator/energy"].attrs["units"] = "eV"
            f["/entry/instrument/positioners/theta"] = theta
            f["/entry"].attrs["theta"] = theta
            f["/entry/instrument/monitor/i0"] = np.full(scan if four_d else hi - lo, 1e5)
            if spectra:
                shape = (hi - lo, 4, 16) if not four_d else (*scan, 4, 16)
                f["/entry/instrument/xspress3/data"] = np.ones(shape, "u4")
                f["/entry/instrument/xspress3/energy"] = np.linspace(0, 15, 16)
                f["/entry/instrument/xspress3/energy"].attrs["units"] = "keV"
            for name, value in (extra or {}).items():
                f[name] = value
    return files


def write_scan_folder(raw: Path, name: str, ids, thetas, **kw) -> None:
    for i, (scan_id, theta) in enumerate(zip(ids, thetas, strict=True)):
        beamline_file(raw / name / f"scan_{scan_id}.h5", theta, seed=i, **kw)


def plain_file(path: Path, n: int = 20, **datasets) -> None:
    """A file with frames at /entry/instrument/detector/data and the given datasets only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f["/entry/instrument/detector/data"] = np.ones((n, *DET), "u2")
        for name, value in datasets.items():
            f[name.replace("__", "/")] = value


def init(raw, tmp_path, **options):
    return init_manifest(raw, manifest=tmp_path / "beamtime.toml", options=InitOptions(**options))


def problems(raw, tmp_path, **options) -> str:
    with pytest.raises(InitError) as info:
        init(raw, tmp_path, **options)
    assert "nothing written" in str(info.value) or "exists" in str(info.value)
    assert not (tmp_path / "beamtime.toml").exists()
    return str(info.value)


# -- the beamline layout ---------------------------------------------------------------------------
def test_beamline_layout_gives_every_field(tmp_path):
    raw = tmp_path / "raw"
    ids = [99998, 99999, 100000, 100001]  # file-name order would put 100000 first
    write_scan_folder(raw, "p1", ids, [10.0, 10.05, 10.1, 10.15])
    # p2: every angle split across files in scan_<id>/data_NNN.h5
    for i, (scan_id, theta) in enumerate(zip([7, 8, 9], [10.2, 10.1, 10.0], strict=True)):
        beamline_file(raw / "p2" / f"scan_{scan_id}", theta, seed=10 + i, parts=3)
    result = init(raw, tmp_path, xrf_window_kev=(6.8, 7.1), gamma_deg=30.0, delta_deg=5.0)

    path = result.write()
    assert path.read_text() == result.text
    m = load_manifest(path)  # accepted unchanged
    data = tomllib.loads(result.text)
    p1, p2 = (data["scans"][i] for i in range(2))
    assert [p1["name"], p2["name"]] == ["p1", "p2"]
    assert p1["frames"] == [f"raw/p1/scan_{i}.h5" for i in ids]
    assert p2["frames"] == [
        [f"raw/p2/scan_{i}/data_{k:03d}.h5" for k in range(3)] for i in (7, 8, 9)
    ]
    for p in (p1, p2):
        assert p["dataset"] == f"{EIGER}/data"
        assert p["monitor"] == "/entry/instrument/monitor/i0"
        assert p["xrf"] == "/entry/instrument/xspress3/data"
        assert p["xrf_window_kev"] == [6.8, 7.1]
        assert p["xrf_energy"] == "/entry/instrument/xspress3/energy"
        assert "xrf_calibration" not in p
        assert p["mask_dataset"] == f"{EIGER}/pixel_mask"
        assert p["positions"] == {
            "y": "/entry/measurement/samy",
            "x": "/entry/measurement/samx",
            "units": "um",
        }
        assert p["scan_shape"] == [5, 6]
        assert p["scan_step_um"] == [0.05, 0.04]
        assert p["scan_order"] == "snake"
    assert p1["angles_deg"] == [10.0, 10.05, 10.1, 10.15]
    assert p2["angles_deg"] == [10.2, 10.1, 10.0]  # scan order, decreasing
    assert data["geometry"] == {
        "energy_kev": 10.0,  # 10000 eV
        "detector_distance_m": 0.35,  # 350 mm
        "pixel_size_m": 75e-6,
        "beam_center": [2.25, 3.5],  # (row = y, col = x)
        "gamma_deg": 30.0,
        "delta_deg": 5.0,
        "rocking_axis": "y+",
    }
    assert data["output"] == "results" and m.output_dir == tmp_path / "results"
    # comments say where values came from; the report says what was guessed
    assert "# recorded /entry/instrument/monochromator/energy (10000 eV)" in result.text
    assert "/entry/instrument/positioners/theta (= /entry@theta)" in result.text
    assert any("rocking axis y+" in g for g in result.report.guesses)
    table = result.report.format()
    assert "p1" in table and "5×6" in table and "snake" in table and "10 … 10.15" in table
    # a scan per row: its angle files, and the files they are split across
    lines = table.splitlines()
    assert lines[1] == "  scan  angle files  files  angles (deg)  grid  step (µm)  order"
    assert lines[2].split()[:3] == ["p1", "4", "4"] and lines[3].split()[:3] == ["p2", "3", "9"]
    assert [s.name for s in result.report.scans] == ["p1", "p2"]
    with pytest.warns(DeprecationWarning, match="InitReport.scans"):
        assert result.report.particles is result.report.scans  # the old name still reads


def test_4d_frames_give_the_scan_shape(tmp_path):
    raw = tmp_path / "raw"
    write_scan_folder(raw, "p1", [1, 2, 3], [0.0, 0.1, 0.2], four_d=True, scan=(3, 4))
    result = init(raw, tmp_path, step_um=(0.1, 0.1), gamma_deg=1.0, delta_deg=0.0, xrf="none")
    p = result.manifest.scans[0]
    assert p.scan_shape == (3, 4) and p.scan_step_um == (0.1, 0.1) and p.xrf is None
    assert p.dataset == f"{EIGER}/data" and p.monitor == "/entry/instrument/monitor/i0"
    assert "# the scan axes of the 4-D frames; step --step" in result.text
    # a plain raster is assumed and said so (no positions recorded)
    assert any("raster order" in g and "--scan-order" in g for g in result.report.guesses)


# -- other layouts ---------------------------------------------------------------------------------
def test_angle_files_without_metadata_need_angles(tmp_path):
    raw = tmp_path / "raw"
    for a in range(5):
        plain_file(raw / "p1" / f"angle_{a:03d}.h5", n=12)
    shape = dict(scan_shape=(3, 4), step_um=(0.05, 0.05), **GEOMETRY)
    err = problems(raw, tmp_path, **shape)
    assert "scan 'p1': no rocking angle recorded" in err and "--angles START:STOP:NUM" in err
    result = init(raw, tmp_path, angles=(1.0, 2.0, 5), **shape)
    p = tomllib.loads(result.text)["scans"][0]
    assert p["frames"] == "raw/p1/angle_{index:03d}.h5"
    assert p["angles_deg"] == {"start": 1.0, "stop": 2.0, "num": 5}
    assert p["scan_shape"] == [3, 4] and p["scan_step_um"] == [0.05, 0.05]
    assert "monitor" not in p and "xrf" not in p and "positions" not in p
    assert result.manifest.scans[0].frame_paths(tmp_path)[4] == raw / "p1/angle_004.h5"
    # the wrong number of angles is named
    err = problems(raw, tmp_path, angles=(1.0, 2.0, 4), **shape)
    assert "has 5 angle files but --angles 1.0:2.0:4 gives 4 angles; give NUM = 5" in err


def test_tiff_stacks(tmp_path):
    raw = tmp_path / "raw"
    for a in range(3):
        (raw / "p7").mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(raw / "p7" / f"img_{a + 1}.tif", np.ones((6, *DET), "u2"))
    err = problems(raw, tmp_path, **GEOMETRY)
    assert "TIFF files record no angle; pass --angles START:STOP:NUM" in err
    result = init(raw, tmp_path, angles=(0.0, 0.2, 3), scan_shape=(2, 3), step_um=(1.0, 1.0),
                  **GEOMETRY)  # fmt: skip
    p = tomllib.loads(result.text)["scans"][0]
    assert p["frames"] == [f"raw/p7/img_{a}.tif" for a in (1, 2, 3)]
    assert "dataset" not in p  # TIFF pages are the frames
    # too few frames for the scan shape: an error, or aborted scans with --allow-incomplete
    err = problems(raw, tmp_path, angles=(0.0, 0.2, 3), scan_shape=(3, 3), step_um=(1.0, 1.0),
                   **GEOMETRY)  # fmt: skip
    assert "fewer frames than scan_shape 3×3 = 9" in err and "--allow-incomplete" in err
    result = init(raw, tmp_path, angles=(0.0, 0.2, 3), scan_shape=(3, 3), step_um=(1.0, 1.0),
                  allow_incomplete=True, **GEOMETRY)  # fmt: skip
    assert result.manifest.scans[0].allow_incomplete is True


def test_nested_scan_folders(tmp_path):
    raw = tmp_path / "raw"
    for sample in ("bare", "coated"):
        for a, theta in enumerate([5.0, 5.1]):
            plain_file(raw / sample / "p1" / f"s{a}.h5", n=6, entry__theta=theta)
    (raw / "notes.txt").write_text("beamtime log")
    plain_file(raw / "bare" / "dark.h5", n=6)
    result = init(raw, tmp_path, scan_shape=(2, 3), step_um=(0.1, 0.1), **GEOMETRY)
    m = result.manifest
    assert [p.name for p in m.scans] == ["bare_p1", "coated_p1"]
    assert m.scans[1].frames == "raw/coated/p1/s{index}.h5"  # a template where one fits
    assert m.scans[1].frame_paths(tmp_path) == [
        raw / "coated/p1/s0.h5",
        raw / "coated/p1/s1.h5",
    ]
    assert m.scans[0].angles.tolist() == [5.0, 5.1]
    assert m.name == tmp_path.name  # "raw" says nothing: the folder above names the beamtime
    skipped = "\n".join(result.report.skipped)
    assert "bare/dark.h5 (named like a dark" in skipped and "1 files that are not HDF5" in skipped


def test_group_regex_makes_scans_of_a_flat_folder(tmp_path):
    raw = tmp_path / "raw"
    for p in ("p1", "p2"):
        for a, theta in enumerate([3.0, 3.2, 3.4]):
            plain_file(raw / f"{p}_scan_{a}.h5", n=4, entry__instrument__positioners__eta=theta)
    grid = dict(scan_shape=(2, 2), step_um=(0.1, 0.1), **GEOMETRY)
    result = init(raw, tmp_path, group=r"(?P<scan>p\d+)_scan", **grid)
    m = result.manifest
    assert [p.name for p in m.scans] == ["p1", "p2"]
    assert m.scans[1].frames == "raw/p2_scan_{index}.h5"
    assert m.scans[1].angles.tolist() == [3.0, 3.2, 3.4]
    assert "# --group match 'p2'" in result.text
    # the group's old name, particle, makes the same manifest
    old = init(raw, tmp_path, group=r"(?P<particle>p\d+)_scan", **grid)
    assert old.text == result.text
    err = problems(raw, tmp_path, group=r"p\d+", **grid)
    assert "has no named group 'scan'" in err and "(?P<scan>" in err
    # without --group the flat folder is one scan whose angles repeat
    err = problems(raw, tmp_path, **grid)
    assert "record the same angle 3" in err and "--exclude" in err


# -- ambiguity and bad input: errors naming the flag --------------------------------------------
def test_two_detector_datasets_of_the_same_size(tmp_path):
    raw = tmp_path / "raw"
    for a in range(2):
        plain_file(raw / "p1" / f"a{a}.h5", n=6, entry__other__frames=np.ones((6, *DET), "u2"),
                   entry__theta=float(a))  # fmt: skip
    err = problems(raw, tmp_path, scan_shape=(2, 3), step_um=(0.1, 0.1), **GEOMETRY)
    assert "2 candidate detector datasets of the same size" in err and "--dataset PATH" in err
    assert "raw/p1/a0.h5" in err and "raw/p1/a1.h5" in err  # every file named
    result = init(raw, tmp_path, dataset="/entry/other/frames", scan_shape=(2, 3),
                  step_um=(0.1, 0.1), **GEOMETRY)  # fmt: skip
    assert result.manifest.scans[0].dataset == "/entry/other/frames"


def test_two_monitors_and_two_angles(tmp_path):
    raw = tmp_path / "raw"
    for a in range(3):
        plain_file(raw / "p1" / f"a{a}.h5", n=6, entry__i0=np.ones(6), entry__ic1=np.ones(6),
                   entry__theta=1.0 + a, entry__omega=20.0 - a)  # fmt: skip
    grid = dict(scan_shape=(2, 3), step_um=(0.1, 0.1), **GEOMETRY)
    err = problems(raw, tmp_path, **grid)
    assert "2 candidate per-point monitor datasets: /entry/i0, /entry/ic1" in err
    assert "pass --monitor PATH (or --monitor none)" in err
    assert "several recorded angles change between the angle files" in err and "--angle-path" in err
    m = init(raw, tmp_path, monitor="/entry/ic1", angle_path="/entry/omega", **grid).manifest
    assert m.scans[0].monitor == "/entry/ic1" and m.scans[0].angles.tolist() == [
        20.0, 19.0, 18.0
    ]  # fmt: skip
    m = init(raw, tmp_path, monitor="none", angle_path="/entry/theta", **grid).manifest
    assert m.scans[0].monitor is None
    # --angles settles it too
    m = init(raw, tmp_path, monitor="none", angles=(5.0, 6.0, 3), **grid).manifest
    assert m.scans[0].angles.tolist() == [5.0, 5.5, 6.0]


def test_angles_not_monotonic_in_scan_order(tmp_path):
    raw = tmp_path / "raw"
    for scan_id, theta in ((10, 1.0), (11, 1.1), (12, 1.3), (13, 1.2)):
        plain_file(raw / "p1" / f"scan_{scan_id}.h5", n=4, entry__theta=theta)
    grid = dict(scan_shape=(2, 2), step_um=(0.1, 0.1), **GEOMETRY)
    err = problems(raw, tmp_path, **grid)
    assert "not monotonic in scan number order" in err
    assert "raw/p1/scan_12.h5 (1.3) -> raw/p1/scan_13.h5 (1.2)" in err
    assert "--sort angle" in err and "--exclude" in err
    m = init(raw, tmp_path, sort="angle", **grid).manifest
    assert m.scans[0].frames[2:] == ["raw/p1/scan_13.h5", "raw/p1/scan_12.h5"]
    m = init(raw, tmp_path, exclude=("scan_13.h5",), **grid).manifest
    assert m.scans[0].angles.tolist() == [1.0, 1.1, 1.3]


def test_inconsistent_scan_shapes_between_files(tmp_path):
    raw = tmp_path / "raw"
    write_scan_folder(raw, "p1", [1, 2], [0.0, 0.1])
    beamline_file(raw / "p1" / "scan_3.h5", 0.2, scan=(6, 6), seed=5)
    err = problems(raw, tmp_path, xrf="none", gamma_deg=1.0, delta_deg=1.0)
    assert (
        "inconsistent scan shapes between its files: most are 5×6, but raw/p1/scan_3.h5 6×6" in err
    )
    assert "--scan-shape R,C --step Y,X" in err


def test_xrf_spectra_need_a_window_and_energies(tmp_path):
    raw = tmp_path / "raw"
    for a in range(2):
        plain_file(raw / "p1" / f"a{a}.h5", n=6, entry__theta=float(a),
                   entry__fluo__spectrum=np.ones((6, 32), "u4"))  # fmt: skip
    grid = dict(scan_shape=(2, 3), step_um=(0.1, 0.1), **GEOMETRY)
    err = problems(raw, tmp_path, **grid)
    assert "/entry/fluo/spectrum (6, 32) holds XRF spectra; pass --xrf-window LOW:HIGH" in err
    err = problems(raw, tmp_path, xrf_window_kev=(6.8, 7.1), **grid)
    assert "no dataset of the energy of the 32 bins" in err and "--xrf-calibration" in err
    p = init(raw, tmp_path, xrf_window_kev=(6.8, 7.1), xrf_calibration=(0.0, 0.5), **grid)
    scan = p.manifest.scans[0]
    assert scan.xrf == "/entry/fluo/spectrum" and scan.xrf_window_kev == (6.8, 7.1)
    assert scan.xrf_calibration.gain_kev == 0.5 and scan.xrf_energy is None


def test_missing_geometry_names_every_flag(tmp_path):
    raw = tmp_path / "raw"
    for a in range(2):
        plain_file(raw / "p1" / f"a{a}.h5", n=4, entry__theta=float(a))
    err = problems(raw, tmp_path, scan_shape=(2, 2), step_um=(0.1, 0.1), energy_kev=9.0)
    for flag in ("--distance-m M", "--pixel-size-m M", "--beam-center ROW,COL", "--gamma-deg",
                 "--delta-deg"):  # fmt: skip
        assert flag in err
    assert "--energy-kev" not in err


def test_every_bad_file_is_reported(tmp_path):
    raw = tmp_path / "raw"
    for p in ("p1", "p2"):
        for a in range(3):
            plain_file(raw / p / f"a{a}.h5", n=4, entry__theta=float(a))
    (raw / "p1" / "a1.h5").write_bytes(b"not hdf5 at all")
    (raw / "p2" / "a2.h5").write_bytes(b"\x89HDF\r\n\x1a\n truncated")
    with h5py.File(raw / "p2" / "a0.h5", "a") as f:
        del f["/entry/instrument/detector/data"]
    err = problems(raw, tmp_path, scan_shape=(2, 2), step_um=(0.1, 0.1), **GEOMETRY)
    assert "3 problems" in err
    assert "raw/p1/a1.h5: cannot be read" in err and "--exclude 'p1/a1.h5'" in err
    assert "raw/p2/a2.h5: cannot be read" in err
    assert "raw/p2/a0.h5: no 3-D (n_points, rows, cols)" in err and "--dataset PATH" in err


def test_a_split_angle_file_whose_parts_record_different_angles(tmp_path):
    raw = tmp_path / "raw"
    for a in range(3):  # a scan folder named like a beamline scan: its files are angles, not parts
        plain_file(raw / "scan_5" / f"data_{a}.h5", n=4, entry__theta=float(a))
    grid = dict(scan_shape=(2, 2), step_um=(0.1, 0.1), **GEOMETRY)
    err = problems(raw, tmp_path, **grid)
    assert (
        "scan_5/ was taken for one angle file split across 3 files" in err and "--no-split" in err
    )
    m = init(raw, tmp_path, split=False, **grid).manifest
    assert m.scans[0].name == "scan_5" and m.scans[0].angles.tolist() == [0.0, 1.0, 2.0]


def test_other_names_by_flag(tmp_path):
    raw = tmp_path / "raw"
    for a in range(3):
        y, x = fly_positions(4, 5, (0.2, 0.2), seed=a)
        plain_file(raw / "p1" / f"a{a}.h5", n=y.size, entry__scan__flux=np.ones(y.size),
                   entry__scan__motor_a=y, entry__scan__motor_b=x)  # fmt: skip
        with h5py.File(raw / "p1" / f"a{a}.h5", "a") as f:
            f["/entry"].attrs["rot"] = 30.0 + a
    err = problems(raw, tmp_path, **GEOMETRY)
    assert "--angles START:STOP:NUM, or --angle-path PATH" in err
    assert "no recorded positions" in err and "pass --scan-shape R,C and --step Y,X" in err
    assert "(or --positions Y_PATH,X_PATH)" in err
    options = dict(angle_path="/entry@rot", **GEOMETRY)
    result = init(raw, tmp_path, names=(("monitor", ("flux",), True),),
                  positions=("/entry/scan/motor_a", "/entry/scan/motor_b"), **options)  # fmt: skip
    p = result.manifest.scans[0]
    assert p.monitor == "/entry/scan/flux" and p.angles.tolist() == [30.0, 31.0, 32.0]
    assert p.positions.y == "/entry/scan/motor_a" and p.positions.units == "um"
    assert p.scan_shape == (4, 5) and p.scan_step_um == (0.2, 0.2) and p.scan_order == "snake"
    assert any("no units attribute; µm assumed" in g for g in result.report.guesses)
    # the same by names: a monitor list of its own, a pair of position names
    names = (("monitor", ("flux",), False), ("positions", ("motor_a:motor_b",), True))
    again = init(raw, tmp_path, names=names, **options).manifest.scans[0]
    assert again.positions == p.positions and again.monitor == p.monitor


def test_results_folder_is_never_the_raw_folder(tmp_path):
    raw = tmp_path / "raw"
    for a in range(2):
        plain_file(raw / "p1" / f"a{a}.h5", n=4, entry__theta=float(a))
    grid = dict(scan_shape=(2, 2), step_um=(0.1, 0.1), **GEOMETRY)
    with pytest.raises(InitError, match=r"would be RAW_DIR itself.*--results DIR"):
        init_manifest(raw, manifest=raw / "bt.toml", options=InitOptions(results=".", **grid))
    with pytest.raises(InitError, match=r"would be a folder of frame files.*--results DIR"):
        init_manifest(raw, manifest=raw / "bt.toml", options=InitOptions(results="p1", **grid))
    # a manifest inside RAW_DIR: results beside it, never read as angle files once spndi wrote there
    result = init_manifest(raw, manifest=raw / "bt.toml", options=InitOptions(**grid))
    result.write()
    (raw / "results" / "raw.zarr").mkdir(parents=True)
    plain_file(raw / "results" / "stray.h5", n=4)
    again = init_manifest(raw, manifest=raw / "bt.toml", options=InitOptions(**grid), force=True)
    assert again.manifest.output_dir == raw / "results"
    assert [p.name for p in again.manifest.scans] == ["p1"]


def test_an_angle_some_files_lack(tmp_path):
    raw = tmp_path / "raw"
    for a in range(3):
        plain_file(raw / "p1" / f"a{a}.h5", n=4, **({"entry__theta": float(a)} if a else {}))
    err = problems(raw, tmp_path, scan_shape=(2, 2), step_um=(0.1, 0.1), **GEOMETRY)
    assert "/entry/theta changes between the angle files but is missing from raw/p1/a0.h5" in err
    assert "--exclude" in err and "--angles" in err


def test_metadata_without_units_is_a_reported_guess(tmp_path):
    raw = tmp_path / "raw"
    for a in range(2):
        plain_file(raw / "p1" / f"a{a}.h5", n=4, entry__theta=float(a),
                   entry__instrument__monochromator__energy=8980.0)  # fmt: skip
    geometry = {k: v for k, v in GEOMETRY.items() if k != "energy_kev"}
    result = init(raw, tmp_path, scan_shape=(2, 2), step_um=(0.1, 0.1), **geometry)
    assert result.manifest.geometry["energy_kev"] == 8.98
    assert any(
        "energy (8980, no units: eV assumed); --energy-kev" in g for g in result.report.guesses
    )


# -- the scan grid from positions ---------------------------------------------------------------
@pytest.mark.parametrize("snake", [True, False])
@pytest.mark.parametrize(("rows", "cols"), [(12, 14), (40, 9), (7, 120)])
def test_infer_grid_from_jittered_fly_scans(rows, cols, snake):
    for seed in range(5):
        y, x = fly_positions(rows, cols, (0.05, 0.04), snake=snake, overshoot=2 * snake, seed=seed)
        fit = infer_grid(y, x)
        assert fit.shape == (rows, cols) and fit.order == ("snake" if snake else "raster")
        assert fit.step == pytest.approx((0.05, 0.04), rel=0.01)
        assert fit.fast_axis == "x" and fit.n_points == y.size
        assert fit.on_grid >= 0.99 * rows * cols
        flipped = infer_grid(x, y)  # the fast axis may be y
        assert flipped.shape == (cols, rows) and flipped.fast_axis == "y"


def test_infer_grid_refuses_what_is_not_a_grid():
    rng = np.random.default_rng(1)
    with pytest.raises(ValueError, match="no lines"):
        infer_grid(rng.random(200), rng.random(200))
    y, x = fly_positions(6, 10, jitter=0.0, overshoot=0)
    y[30:] += 0.2  # a gap of 4 rows
    with pytest.raises(ValueError, match="irregular line spacing"):
        infer_grid(y, x)
