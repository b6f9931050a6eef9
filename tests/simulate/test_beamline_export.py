"""The beamline export traits of the simulator: files as a nanoprobe beamline writes them."""

import hashlib

import h5py
import hdf5plugin  # noqa: F401
import numpy as np
import pytest
import tomllib
from scipy import ndimage

from spndi_dask.config import load_manifest
from spndi_dask.simulate import datasets, preset, scan_path, simulate_beamtime

from . import CLEAN_PHYSICS

EIGER = "/entry/instrument/eiger"
FLAG = 2**32 - 1


@pytest.fixture(scope="module")
def beamline(tmp_path_factory):
    """The ``beamline`` preset, made small: 2 particles × 5 angles × 12×14 points."""
    cfg = preset("beamline", n_particles=2, n_angles=5, scan_shape=(12, 14), frames_per_file=50)
    out = tmp_path_factory.mktemp("beamline")
    return out, cfg, simulate_beamtime(out, cfg, scheduler="sync")


def read_scan(files, name):
    """A dataset of a scan split across files, parts concatenated in order."""
    parts = []
    for path in files:
        with h5py.File(path) as f:
            parts.append(f[name][()])
    return np.concatenate(parts)


def dataset_names(f):
    """Names of every dataset in an HDF5 file, sorted."""
    names = []
    f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
    return sorted(names)


# -- files and manifest -----------------------------------------------------------------------
def test_scan_files_in_acquisition_order(beamline):
    out, cfg, _ = beamline
    m = load_manifest(out)  # the manifest written validates
    assert [p.name for p in m.scans] == ["p1", "p2"]
    parts = [(0, 50), (50, 100), (100, 150), (150, 192)]  # 12 rows × (14 + 2 overshoot)
    ids = []
    for p in m.scans:
        files = p.frame_files(m.base_dir)
        assert len(files) == cfg.n_angles
        for scan in files:
            assert [f.name for f in scan] == [f"data_{k:03d}.h5" for k in range(len(parts))]
            assert all(f.is_file() and f.parent.parent == out / "raw" / p.name for f in scan)
            ids.append(int(scan[0].parent.name.removeprefix("scan_")))
        assert np.all(np.diff(p.angles) > 0)  # angles increase with the scan id
        for angle, scan in zip(p.angles, files, strict=True):
            for f, (a, b) in zip(scan, parts, strict=True):
                with h5py.File(f) as h:
                    assert h[f"{EIGER}/data"].shape == (b - a, *cfg.detector_shape)
                    assert h[f"{EIGER}/data"].dtype == np.uint32
                    assert h["/entry/instrument/positioners/theta"][()] == angle
                    assert h["/entry"].attrs["theta"] == angle
    # acquisition order across the beamtime, crossing a digit boundary; 2 scans between particles
    assert ids[:3] == [99998, 99999, 100000]
    assert ids == sorted(ids) and ids[cfg.n_angles] - ids[cfg.n_angles - 1] == 3
    # p1's scans sorted by name are not in acquisition (angle) order
    folders = [scan[0].parent.name for scan in m.scans[0].frame_files(m.base_dir)]
    assert sorted(p.name for p in (out / "raw" / "p1").iterdir()) == [*folders[2:], *folders[:2]]


def test_manifest_describes_the_files(beamline):
    out, cfg, m = beamline
    p = m.scans[0]
    assert p.dataset == f"{EIGER}/data" and p.mask_dataset == f"{EIGER}/pixel_mask"
    assert p.monitor == "/entry/instrument/monitor/i0"
    assert p.positions.y == "/entry/measurement/samy"
    assert p.positions.x == "/entry/measurement/samx"
    assert p.positions.units == "um" and p.scan_order == "snake"
    assert p.xrf == "/entry/instrument/xspress3/data"
    assert p.xrf_energy == "/entry/instrument/xspress3/energy"
    assert p.xrf_window_kev[0] < 6.93 < p.xrf_window_kev[1]
    assert p.scan_shape == cfg.scan_shape  # the grid, not the recorded frames
    assert m.ingest.invalid_value == FLAG
    assert m.reduce.saturation == cfg.saturation_counts
    raw = tomllib.loads((out / "beamtime.toml").read_text())
    assert raw["scans"][0]["frames"][0][0] == "raw/p1/scan_99998/data_000.h5"


def test_nexus_metadata_is_the_geometry(beamline):
    _, cfg, m = beamline
    g = m.geometry_for("p2")
    with h5py.File(m.scans[1].frame_files(m.base_dir)[3][2]) as f:
        det = f[EIGER]
        assert det["x_pixel_size"][()] == det["y_pixel_size"][()] == g.pixel_size_m
        assert det["distance"][()] == g.detector_distance_m
        assert (det["beam_center_y"][()], det["beam_center_x"][()]) == g.beam_center
        assert det["distance"].attrs["units"] == "m"
        assert det["saturation_value"][()] == cfg.saturation_counts
        assert f["/entry/instrument/monochromator/energy"][()] == g.energy_kev
        assert f["/entry/instrument/positioners/gamma"][()] == pytest.approx(g.gamma_deg)
        assert f["/entry/instrument/positioners/delta"][()] == g.delta_deg
        assert f["/entry"].attrs["scan_id"] == 100008


# -- fly scan ---------------------------------------------------------------------------------
def test_recorded_positions_jitter_around_a_snaked_grid(beamline):
    out, cfg, m = beamline
    gt = np.load(out / "ground_truth/p1.npz")
    step = np.asarray(cfg.scan_step_um)
    origin = np.array([gt["scan_y_um"][0], gt["scan_x_um"][0]])
    assert np.allclose(np.diff(gt["scan_y_um"]), step[0])
    assert np.allclose(np.diff(gt["scan_x_um"]), step[1])
    # the grid is centred on the scan's motor position
    assert gt["scan_y_um"].mean() == pytest.approx(cfg.scan_center_um[0])
    assert gt["scan_x_um"].mean() == pytest.approx(cfg.scan_center_um[1])
    nodes = scan_path(cfg)
    residuals = []
    for scan in m.scans[0].frame_files(m.base_dir):
        y = read_scan(scan, "/entry/measurement/samy")
        x = read_scan(scan, "/entry/measurement/samx")
        assert y.shape == x.shape == (cfg.frames_per_scan,)
        residuals.append((np.stack([y, x], -1) - origin) / step - nodes)
        rows_x = x.reshape(cfg.scan_shape[0], cfg.frames_per_row)
        assert (np.diff(rows_x[0::2], axis=1) > 0).all()  # snake: even rows run +x
        assert (np.diff(rows_x[1::2], axis=1) < 0).all()  # odd rows run back
        beyond = (rows_x < gt["scan_x_um"][0] - step[1] / 2) | (
            rows_x > gt["scan_x_um"][-1] + step[1] / 2
        )
        assert (beyond.sum(axis=1) == cfg.overshoot_points).all()  # past every row's end
    r = np.concatenate(residuals)
    assert np.abs(r).max() <= 3 * cfg.position_jitter + 1e-9  # truncated at 3σ
    assert r.std(axis=0) == pytest.approx([cfg.position_jitter] * 2, rel=0.15)
    assert np.abs(r.mean(axis=0)).max() < 0.02


def test_diffraction_is_seen_at_the_recorded_position(tmp_path):
    """Each frame diffracts from the sample at its recorded (jittered) position: with one
    uniform crystal in Bragg condition, no noise sources but counting, and no drift, a frame's
    counts follow the thickness interpolated there, not at the grid node; frames off the
    sample (overshoot, rim) see nothing."""
    cfg = preset(
        "tiny",
        n_particles=1,
        n_angles=3,
        domain_types=((0.0, 0.0, 0.0, 1.5e-3),),
        gradient_strain=0.0,
        particle_tilt_spread=0.0,
        **CLEAN_PHYSICS,
        peak_counts=200.0,
        fly_scan=True,
        position_jitter=0.3,
        overshoot_points=3,
    )
    m = simulate_beamtime(tmp_path, cfg, scheduler="sync")
    gt = np.load(tmp_path / "ground_truth/p1.npz")
    origin = np.array([gt["scan_y_um"][0], gt["scan_x_um"][0]])
    with h5py.File(m.scans[0].frame_paths(m.base_dir)[1]) as f:  # the Bragg angle
        counts = f["/entry/instrument/detector/data"][:].sum(axis=(1, 2)).astype(float)
        pos = np.stack([f["/entry/measurement/samy"][:], f["/entry/measurement/samx"][:]], -1)
    recorded = (pos - origin) / np.asarray(cfg.scan_step_um)  # in scan pixels

    def at(field, where, cval):
        return ndimage.map_coordinates(field, where.T, order=1, mode="constant", cval=cval)

    g = np.stack([at(gt["G"][..., k], recorded, np.nan) for k in range(3)], -1)
    lit = np.isfinite(g).all(axis=1) & (at(gt["thickness"], recorded, 0.0) > 1e-3)
    assert np.array_equal(counts > 0, lit) and lit.sum() > 50

    def misfit(where):  # relative rms misfit of counts ∝ thickness at ``where``
        t = at(gt["thickness"], where, 0.0)[lit]
        k = (t @ counts[lit]) / (t @ t)
        return np.sqrt(np.mean((counts[lit] - k * t) ** 2)) / counts[lit].mean()

    poisson = 1 / np.sqrt(counts[lit].mean())
    assert misfit(recorded) < 1.5 * poisson  # counting noise only
    assert misfit(scan_path(cfg)) > 3 * misfit(recorded)  # the nodes miss the jitter


# -- detector ---------------------------------------------------------------------------------
def test_module_gaps_flagged_and_saturated_pixels(beamline):
    _, cfg, m = beamline
    nr, nc = cfg.detector_shape
    gap = np.zeros((nr, nc), bool)
    gap[nr // 2 - 1 : nr // 2 + 1] = True  # a cross of 2-px lines through the centre
    gap[:, nc // 2 - 1 : nc // 2 + 1] = True
    mask = None
    for p in m.scans:
        n_saturated = 0
        total = 0
        for scan in p.frame_files(m.base_dir):
            for path in scan:
                with h5py.File(path) as f:
                    this = f[f"{EIGER}/pixel_mask"][:]
                    assert this.dtype == np.uint32
                    mask = this if mask is None else mask
                    assert np.array_equal(this, mask)  # the same in every file
            d = read_scan(scan, f"{EIGER}/data")
            flagged = mask == 2
            assert (mask[gap] == 1).all() and set(np.unique(mask[~gap])) == {0, 2}
            assert 1 <= flagged.sum() <= cfg.flagged_pixels
            assert (d[:, gap] == 0).all()
            assert (d[:, flagged] == FLAG).all() and (d[:, ~flagged] < FLAG).all()
            saturated = (d == cfg.saturation_counts).any(axis=(1, 2))
            n_saturated += int(saturated.sum())
            assert not (d[:, mask > 0] == cfg.saturation_counts).any()
            # the diffraction: without hot pixels (thousands of counts), flagged and saturated
            total = total + np.where(d < 1000, d, 0).sum(0)
        assert n_saturated == cfg.saturated_frames
        # a gap runs through the Bragg peak: the rows beside the row gap are among the brightest
        rows = total.sum(1)
        assert rows[nr // 2 - 2] > 0.8 * rows.max() and rows[nr // 2 + 1] > 0.8 * rows.max()


def test_beamline_preset_puts_the_peak_on_a_gap():
    cfg = preset("beamline")
    row, col = cfg.geometry().beam_center  # the arm-axis pixel: the peak at the centre angle
    assert abs(row - (cfg.detector_shape[0] - 1) / 2) < 1  # on the row gap
    assert 8 < abs(col - (cfg.detector_shape[1] - 1) / 2) < 16  # the column gap on its flank
    assert cfg.dtype == "uint32" and cfg.frames_per_scan == 24 * 34
    assert 15 <= cfg.n_angles <= 21 and cfg.detector_shape == (64, 64)


# -- XRF --------------------------------------------------------------------------------------
def test_xrf_spectra_follow_the_fluorescence_map(beamline):
    out, cfg, m = beamline
    p = m.scans[1]
    gt = np.load(out / f"ground_truth/{p.name}.npz")
    origin = np.array([gt["scan_y_um"][0], gt["scan_x_um"][0]])
    got, want = [], []
    for a, scan in enumerate(p.frame_files(m.base_dir)):
        spectra = read_scan(scan, "/entry/instrument/xspress3/data")
        assert spectra.shape == (cfg.frames_per_scan, 4, 256) and spectra.dtype == np.uint32
        with h5py.File(scan[-1]) as f:
            energy = f["/entry/instrument/xspress3/energy"][:]
        assert np.allclose(energy, np.arange(256) * 0.04)
        i0 = read_scan(scan, "/entry/instrument/monitor/i0")
        pos = np.stack(
            [
                read_scan(scan, "/entry/measurement/samy"),
                read_scan(scan, "/entry/measurement/samx"),
            ],
            -1,
        )
        coords = (pos - origin) / np.asarray(cfg.scan_step_um) - gt["drift"][a]
        yield_ = ndimage.map_coordinates(gt["xrf_yield"], coords.T, order=1, cval=0.0)
        window = (energy >= p.xrf_window_kev[0]) & (energy <= p.xrf_window_kev[1])
        got.append(spectra[:, :, window].sum(axis=(1, 2)))
        want.append(cfg.xrf_counts * yield_ * i0 / cfg.monitor_counts)
        # the summed spectrum peaks at Co Kα (the elastic line at the beam energy is weaker)
        assert energy[np.argmax(spectra.sum(axis=(0, 1)))] == pytest.approx(6.93, abs=0.03)
    got, want = np.concatenate(got), np.concatenate(want)
    slope, offset = np.polyfit(want, got, 1)
    assert slope == pytest.approx(1.0, abs=0.05)  # the whole line falls in the window
    assert 0 < offset < 0.1 * want.max()  # plus a small continuum
    assert np.corrcoef(got, want)[0, 1] > 0.98


# -- other traits, one at a time --------------------------------------------------------------
def test_frames_4d_are_the_same_frames_with_the_scan_axes(tmp_path):
    base = dict(n_particles=1, n_angles=3, fly_scan=True)
    flat = simulate_beamtime(tmp_path / "3d", preset("tiny", **base), scheduler="sync")
    cfg = preset("tiny", **base, frames_4d=True)
    four = simulate_beamtime(tmp_path / "4d", cfg, scheduler="sync")
    name = datasets(cfg)["frames"]
    with h5py.File(flat.scans[0].frame_paths(flat.base_dir)[1]) as f:
        a = f[name][:]
    with h5py.File(four.scans[0].frame_paths(four.base_dir)[1]) as f:
        b = f[name][:]
        assert f[name].chunks == (1, 1, *cfg.detector_shape)
    assert b.shape == (cfg.scan_shape[0], cfg.frames_per_row, *cfg.detector_shape)
    assert np.array_equal(b.reshape(a.shape), a)


def test_split_4d_files_hold_whole_rows(tmp_path):
    cfg = preset("tiny", n_particles=1, n_angles=2, frames_4d=True, frames_per_file=40)
    m = simulate_beamtime(tmp_path, cfg, scheduler="sync")
    files = m.scans[0].frame_files(m.base_dir)
    # the ideal names, each scan in a folder of parts: 40 frames -> 2 rows of 14 per part
    assert [f.relative_to(tmp_path).as_posix() for f in files[1]] == [
        f"raw/p1/angle_001/data_{k:03d}.h5" for k in range(6)
    ]
    for path in files[0]:
        with h5py.File(path) as f:
            assert f[datasets(cfg)["frames"]].shape == (2, 14, *cfg.detector_shape)
            assert f[datasets(cfg)["monitor"]].shape == (28,)


def test_ideal_layout_is_unchanged(tiny_beamtime):
    """The ``tiny`` preset writes the same data as before the beamline traits existed."""
    out, _ = tiny_beamtime
    h = hashlib.sha256()
    for path in sorted((out / "raw").rglob("*.h5")):
        h.update(path.relative_to(out).as_posix().encode())
        with h5py.File(path) as f:
            for name in dataset_names(f):
                a = np.asarray(f[name][()])
                h.update(f"{name}{a.dtype.str}{a.shape}".encode())
                h.update(a.tobytes())
            for k in sorted(f.attrs):
                h.update(f"{k}={np.asarray(f.attrs[k]).tolist()}".encode())
    for path in sorted((out / "ground_truth").glob("*.npz")):
        with np.load(path) as z:
            for k in sorted(z.files):
                h.update(k.encode())
                h.update(np.ascontiguousarray(z[k]).tobytes())
    data = tomllib.loads((out / "beamtime.toml").read_text())
    keys = ("name", "frames", "dataset", "monitor", "xrf", "angles_deg", "scan_shape")
    h.update(repr(sorted(data["geometry"].items())).encode())
    for p in data["scans"]:
        h.update(repr([p.get(k) for k in (*keys, "scan_step_um")]).encode())
    assert h.hexdigest() == "3f5a2f508d4340b954085f6c9cc08cfb126467a00cada3d3392de52db2da205b"


def test_invalid_trait_settings_are_refused():
    with pytest.raises(ValueError, match="frames_per_file"):
        preset("tiny", frames_per_file=-1)
    with pytest.raises(ValueError, match="saturation_counts = 70000"):
        preset("tiny", saturated_frames=1, saturation_counts=70000)
