import copy

import numpy as np
import pytest

from spndi_dask.config import Manifest, ManifestError, load_manifest
from spndi_dask.io.layout import OutputLayout

DESIGN_EXAMPLE = """
name = "lco-2024-07"
output = "results"

[geometry]
energy_kev = 9.0
detector_distance_m = 0.5
pixel_size_m = 55e-6
gamma_deg = 28.5
delta_deg = 18.1
beam_center = [256.0, 256.0]
row_direction = "y-"
col_direction = "x+"
rocking_axis = "y+"

[[scans]]
name = "bare_LCO_p1"
frames = "raw/p1/angle_{index:03d}.h5"
dataset = "/entry/instrument/detector/data"
monitor = "/entry/instrument/monitor/Io"
xrf = "/entry/instrument/xrf/Co_K"
angles_deg = [-39.7, -39.6, -39.5]
scan_shape = [140, 200]
scan_step_um = [0.05, 0.05]

[[scans]]
name = "cycled_p2"
frames = ["a.h5", "b.h5"]
angles_deg = { start = -38.0, stop = -37.9, num = 2 }
scan_shape = [10, 12]
scan_step_um = [0.1, 0.1]
[scans.geometry]
energy_kev = 10.0
"""


@pytest.fixture
def base():
    return {
        "name": "bt",
        "geometry": {
            "energy_kev": 9.0,
            "detector_distance_m": 0.5,
            "pixel_size_m": 55e-6,
            "beam_center": [32, 32],
        },
        "scans": [
            {
                "name": "p1",
                "frames": "raw/p1/angle_{index:03d}.h5",
                "angles_deg": [1.0, 1.1, 1.2],
                "scan_shape": [4, 5],
                "scan_step_um": [0.05, 0.05],
            }
        ],
    }


def errors(data):
    with pytest.raises(ManifestError) as info:
        Manifest.from_dict(data, source="bt.toml")
    return str(info.value)


def test_design_example_loads(tmp_path):
    path = tmp_path / "beamtime.toml"
    path.write_text(DESIGN_EXAMPLE)
    m = load_manifest(path)
    p1, p2 = m.scans
    assert p1.angles.tolist() == [-39.7, -39.6, -39.5]
    assert p1.n_points == 28000
    assert p1.frame_paths(m.base_dir)[2] == tmp_path / "raw/p1/angle_002.h5"
    assert p2.frame_paths(m.base_dir) == [tmp_path / "a.h5", tmp_path / "b.h5"]
    assert p2.angles == pytest.approx([-38.0, -37.9])
    assert m.output_dir == tmp_path / "results"
    # per-scan override merged onto the default geometry
    assert m.geometry_for("bare_LCO_p1").energy_kev == 9.0
    g2 = m.geometry_for("cycled_p2")
    assert (g2.energy_kev, g2.gamma_deg) == (10.0, 28.5)
    # processing defaults are filled in
    assert m.reduce.pattern_grid == 32 and m.cluster.init == "k-means||"


# -- the old key [[particles]] (manifests written before [[scans]]) ----------------------------
OLD_KEYS = DESIGN_EXAMPLE.replace("[[scans]]", "[[particles]]").replace(
    "[scans.geometry]", "[particles.geometry]"
)


def test_old_particles_key_loads_as_scans_with_one_warning(tmp_path, caplog):
    new, old = tmp_path / "new.toml", tmp_path / "old.toml"
    new.write_text(DESIGN_EXAMPLE)
    old.write_text(OLD_KEYS)
    assert "[[scans]]" not in OLD_KEYS and OLD_KEYS.count("[[particles]]") == 2
    with caplog.at_level("WARNING", logger="spndi_dask.config.manifest"):
        m_old = load_manifest(old)
    warned = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1
    assert str(old) in warned[0].getMessage()
    assert "rename [[particles]] to [[scans]]" in warned[0].getMessage()
    caplog.clear()
    with caplog.at_level("WARNING", logger="spndi_dask.config.manifest"):
        m_new = load_manifest(new)
    assert not caplog.records
    assert m_old.to_dict() == m_new.to_dict() and m_old.manifest_hash == m_new.manifest_hash
    assert m_old.geometry_for("cycled_p2").energy_kev == 10.0  # [particles.geometry] read
    # the deprecated Python names still answer, with a DeprecationWarning
    with pytest.warns(DeprecationWarning, match="Manifest.scans"):
        assert m_old.particles == m_old.scans
    # a folder holding only an old manifest still has one
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "lco.toml").write_text(OLD_KEYS)
    assert load_manifest(folder).source == str(folder / "lco.toml")


def test_both_scans_and_particles_is_an_error_naming_both(base):
    base["particles"] = copy.deepcopy(base["scans"])
    msg = errors(base)
    assert "bt.toml" in msg and "[[scans]]" in msg and "[[particles]]" in msg


def test_toml_round_trip_and_hash(tmp_path, base):
    m = Manifest.from_dict(base, base_dir=tmp_path)
    path = tmp_path / "again.toml"
    path.write_text(m.to_toml())
    again = load_manifest(path)
    assert again.to_dict() == m.to_dict()
    assert again.manifest_hash == m.manifest_hash
    changed = copy.deepcopy(base)
    changed["reduce"] = {"pattern_grid": 24}
    assert Manifest.from_dict(changed).manifest_hash != m.manifest_hash


def test_layout_is_the_output_directory(tmp_path, base):
    base["output"] = "out/run1"
    m = Manifest.from_dict(base, base_dir=tmp_path)
    assert m.layout == OutputLayout(tmp_path / "out/run1")
    assert m.layout.results == m.output_dir / "results.zarr"
    assert m.layout.node("p1") == tmp_path / "out/run1/results.zarr/p1"


def test_unknown_keys_named_with_allowed_ones(base):
    base["colour"] = "blue"
    base["scans"][0]["scan_shap"] = [1, 2]
    base["reduce"] = {"pattern_gird": 3}
    msg = errors(base)
    assert "unknown key 'colour'" in msg
    assert "unknown key 'scan_shap' in scans[0] ('p1')" in msg and "scan_shape" in msg
    assert "unknown key 'pattern_gird' in reduce" in msg and "pattern_grid" in msg


@pytest.mark.parametrize(
    "key,value,expected",
    [
        ("energy_kev", 0.0, "geometry.energy_kev = 0.0"),
        ("energy_kev", -9.0, "photon energy in keV"),
        ("detector_distance_m", 0, "geometry.detector_distance_m = 0"),
        ("pixel_size_m", float("inf"), "geometry.pixel_size_m"),
        ("rocking_axis", "w+", "one of x+"),
    ],
)
def test_nonsense_geometry(base, key, value, expected):
    base["geometry"][key] = value
    assert expected in errors(base)


def test_scan_geometry_override_errors_name_the_scan(base):
    base["scans"][0]["geometry"] = {"energy_kev": -1.0}
    assert "scans[0] ('p1').geometry.energy_kev = -1.0" in errors(base)
    base["scans"][0]["geometry"] = {"energy_ev": 9000}
    assert "unknown geometry key(s) ['energy_ev']" in errors(base)
    del base["geometry"]["energy_kev"]
    base["scans"][0]["geometry"] = {}
    assert "geometry.energy_kev is required" in errors(base)


@pytest.mark.parametrize(
    "angles,expected",
    [
        ([1.0, 1.1, 1.1, 1.2], "angle 1.1 at index 2 is duplicated"),
        ([1.0, 1.2, 1.1, 1.3], "strictly monotonic; angle 1.1 at index 2"),
        ([1.0], "at least 2"),
        ({"start": 0, "stop": 1, "num": 1}, "num = 1"),
        ({"start": 0, "stop": 1, "num": 5, "step": 2}, "unknown key 'step'"),
    ],
)
def test_bad_angles(base, angles, expected):
    base["scans"][0]["angles_deg"] = angles
    assert expected in errors(base)


def test_descending_angles_are_fine(base):
    base["scans"][0]["angles_deg"] = [1.2, 1.1, 1.0]
    assert Manifest.from_dict(base).scans[0].angles.tolist() == [1.2, 1.1, 1.0]


def test_frames_and_names(base):
    d = copy.deepcopy(base)
    d["scans"][0]["frames"] = ["a.h5", "b.h5"]
    assert "lists 2 files but angles_deg has 3 angles" in errors(d)
    d = copy.deepcopy(base)
    d["scans"][0]["frames"] = "one.h5"
    assert "no {index} placeholder" in errors(d)
    d = copy.deepcopy(base)
    d["scans"].append(copy.deepcopy(d["scans"][0]))
    assert "scans[1] ('p1').name = 'p1' is already the name of scans[0]" in errors(d)
    d = copy.deepcopy(base)
    d["scans"][0]["name"] = "p 1/x"
    assert "scans[0] ('p 1/x').name" in errors(d)
    for escaping in ("../elsewhere", "..", "/abs", ".hidden"):  # names become output paths
        d["scans"][0]["name"] = escaping
        assert f"scans[0] ('{escaping}').name" in errors(d)
    d = copy.deepcopy(base)
    d["scans"][0]["scan_shape"] = [0, 5]
    assert "scan_shape[0] = 0" in errors(d)


def test_settings_cross_checks(base):
    d = copy.deepcopy(base)
    d["reduce"] = {"strain_reference": "d0"}
    assert "needs d0_angstrom" in errors(d)
    d["reduce"] = {"roi": [10, 5, 0, 4]}
    assert "roi = [10, 5, 0, 4]" in errors(d)
    d = copy.deepcopy(base)
    d["ingest"] = {"scan_chunk": [8, 8], "scan_shard": [12, 16]}
    assert "multiple of scan_chunk" in errors(d)
    d["ingest"] = {"compressor": "snappy"}
    assert "ingest.compressor = 'snappy'" in errors(d)


def test_all_problems_reported_at_once(base):
    base["geometry"]["energy_kev"] = -1
    base["scans"][0]["angles_deg"] = [1, 1]
    base["bogus"] = 1
    msg = errors(base)
    assert msg.count("\n  - ") == 3
    assert msg.startswith("bt.toml: invalid manifest")


def test_file_errors(tmp_path):
    with pytest.raises(ManifestError, match="does not exist"):
        load_manifest(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("name = \n")
    with pytest.raises(ManifestError, match="not valid TOML"):
        load_manifest(bad)


def test_version_checked(base):
    base["manifest_version"] = 2
    assert "manifest_version" in errors(base)


def test_angle_range_values():
    m = Manifest.from_dict(
        {
            "name": "x",
            "geometry": {
                "energy_kev": 9,
                "detector_distance_m": 1,
                "pixel_size_m": 1e-4,
                "beam_center": [0, 0],
            },
            "scans": [
                {
                    "name": "a",
                    "frames": "f{index}.h5",
                    "scan_shape": [1, 1],
                    "scan_step_um": [1, 1],
                    "angles_deg": {"start": 1, "stop": 0, "num": 11},
                }
            ],
        }
    )
    assert m.scans[0].angles == pytest.approx(np.linspace(1, 0, 11))


# -- a folder given for the manifest -------------------------------------------------------------
def test_a_folder_holding_one_manifest_is_read(tmp_path, base):
    text = Manifest.from_dict(base, base_dir=tmp_path).to_toml()
    (tmp_path / "beamtime.toml").write_text(text)
    (tmp_path / "other.toml").write_text(text)  # beamtime.toml is the manifest's usual name
    m = load_manifest(tmp_path)
    assert m.source == str(tmp_path / "beamtime.toml") and m.base_dir == tmp_path.resolve()
    single = tmp_path / "single"
    single.mkdir()
    (single / "lco-2024.toml").write_text(text)
    (single / "notes.toml").write_text('title = "not a manifest"\n')  # no [[scans]]
    assert load_manifest(single).source == str(single / "lco-2024.toml")


def test_a_folder_without_exactly_one_manifest_says_which_to_pass(tmp_path, base):
    with pytest.raises(ManifestError) as info:
        load_manifest(tmp_path)
    msg = str(info.value)
    assert f"{tmp_path} is a folder" in msg and "beamtime.toml" in msg
    assert "IsADirectory" not in msg
    text = Manifest.from_dict(base, base_dir=tmp_path).to_toml()
    (tmp_path / "a.toml").write_text(text)
    (tmp_path / "b.toml").write_text(text)
    with pytest.raises(ManifestError) as info:
        load_manifest(tmp_path)
    msg = str(info.value)
    assert str(tmp_path / "a.toml") in msg and str(tmp_path / "b.toml") in msg
    assert "pass one of them" in msg


# -- errors about the scans list show only the entry at fault --------------------------------
def test_duplicate_names_show_the_entry_not_the_list(base):
    base["scans"].append(copy.deepcopy(base["scans"][0]))
    base["scans"][1]["scan_shape"] = [6, 7]
    base["scans"][1]["geometry"] = {"energy_kev": -1.0}
    msg = errors(base)
    assert "scans[1] ('p1').geometry.energy_kev = -1.0: must be > 0" in msg  # at once
    assert "scans[1] ('p1').name = 'p1'" in msg and "scans[0]" in msg
    assert "unique" in msg and "rename" in msg
    assert "'frames'" not in msg and "scan_shape" not in msg  # the list is not dumped
    assert "at least one scan" not in msg


def test_missing_geometry_shows_the_key_and_where_to_set_it(base):
    del base["geometry"]["energy_kev"]
    base["scans"].append({**copy.deepcopy(base["scans"][0]), "name": "p2"})
    msg = errors(base)
    assert "geometry.energy_kev is required (expected: photon energy in keV" in msg
    assert "set it in [geometry]" in msg
    assert "'frames'" not in msg and "at least one scan" not in msg
    assert msg.count("\n  - ") == 1  # one line for the key, not one per scan
    base["scans"][0]["geometry"] = {"energy_kev": 9.0}  # only p2 lacks it now
    msg = errors(base)
    assert "scans[1] ('p2'): geometry.energy_kev is required" in msg
    assert "'frames'" not in msg and "at least one scan" not in msg


# -- constrained values in plain words -----------------------------------------------------------
@pytest.mark.parametrize(
    "table,key,value,expected",
    [
        ("cluster", "k", 0, "cluster.k = 0: must be ≥ 1 or 'auto'"),
        ("cluster", "k", "x", "cluster.k = 'x': must be a whole number or 'auto'"),
        ("cluster", "k_max", 1, "cluster.k_max = 1: must be ≥ 2 or 'auto'"),
        ("cluster", "tol", 0, "cluster.tol = 0: must be > 0"),
        ("cluster", "n_init", 0, "cluster.n_init = 0: must be ≥ 1"),
        ("ingest", "clevel", 12, "ingest.clevel = 12: must be ≤ 9"),
        ("ingest", "scan_chunk", [0, 8], "ingest.scan_chunk[0] = 0: must be ≥ 1"),
        ("ingest", "allow_incomplete", "maybe", "must be true or false"),
        ("segment", "edge_fraction", 1.5, "segment.edge_fraction = 1.5: must be < 1"),
        ("features", "latent_dim", -3, "features.latent_dim = -3: must be ≥ 1 or 'auto'"),
        ("features", "validation_fraction", 0.5, "must be < 0.5"),
        ("reduce", "min_snr", -1.0, "reduce.min_snr = -1.0: must be > 0"),
        (
            "reduce",
            "pattern_extent",
            [1.0, 0.0, 1.0],
            "reduce.pattern_extent[1] = 0.0: must be > 0",
        ),
        ("geometry", "energy_kev", -9.0, "geometry.energy_kev = -9.0: must be > 0"),
    ],
)
def test_constrained_values_are_explained_in_plain_words(base, table, key, value, expected):
    base.setdefault(table, {})[key] = value
    msg = errors(base)
    assert expected in msg
    for internal in ("constrained", "Input should", "literal[", "function-after"):
        assert internal not in msg


def test_k_range_of_the_elbow_scan(base):
    base["cluster"] = {"k_min": 5, "k_max": 4}
    assert "k_min 5 must be smaller than k_max 4" in errors(base)
    from spndi_dask.config import ClusterSettings

    # the study's ranges: 1..15 for one scan, 1..80 joint; capped by the pixels
    assert ClusterSettings().k_range(100_000, 1) == (1, 15)
    assert ClusterSettings().k_range(100_000, 2) == (1, 80)
    assert ClusterSettings().k_range(2_345, 2) == (1, 23)
    assert ClusterSettings(pixels_per_k=10).k_range(2_345, 2) == (1, 80)
    assert ClusterSettings(k_min=3, k_max=40).k_range(20, 2) == (3, 20)


def test_scan_values_in_plain_words(base):
    base["scans"][0]["scan_shape"] = [0, 5]
    base["scans"][0]["scan_step_um"] = [0.05]
    msg = errors(base)
    assert "scans[0] ('p1').scan_shape[0] = 0: must be ≥ 1" in msg
    assert "scans[0] ('p1').scan_step_um needs 2 values" in msg
    assert "Input should" not in msg and "is required" not in msg


# -- output must not be a dangerous place --------------------------------------------------------
@pytest.mark.parametrize(
    "output,frames,expected",
    [
        ("/", "raw/p1/angle_{index:03d}.h5", "file system root"),
        ("~", "raw/p1/angle_{index:03d}.h5", "home directory"),
        ("..", "raw/p1/angle_{index:03d}.h5", "home directory"),  # the manifest is in ~/bt
        ("raw/p1", "raw/p1/angle_{index:03d}.h5", "frame files of scan 'p1'"),
        ("raw/p1/../p1/", "raw/p1/angle_{index:03d}.h5", "frame files of scan 'p1'"),
        (".", "angle_{index:03d}.h5", "frame files of scan 'p1'"),
    ],
)
def test_output_must_not_be_root_home_or_the_raw_data_folder(
    tmp_path, base, monkeypatch, output, frames, expected
):
    home = tmp_path / "home"
    (home / "bt").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    base["output"] = output
    base["scans"][0]["frames"] = frames
    with pytest.raises(ManifestError) as info:
        Manifest.from_dict(base, base_dir=home / "bt", source="bt.toml")
    msg = str(info.value)
    assert f"output = {output!r}" in msg and expected in msg
    assert 'set output to a folder of its own, e.g. output = "results"' in msg


def test_output_beside_the_raw_data_is_fine(tmp_path, base, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for output in ("results", "raw", "raw/p1/results", str(tmp_path / "elsewhere")):
        base["output"] = output
        assert Manifest.from_dict(base, base_dir=tmp_path).output == output
    base["scans"][0]["dark"] = "darks/dark.h5"
    base["output"] = "darks"
    assert "dark file of scan 'p1'" in errors(base)
