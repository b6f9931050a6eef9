"""Exports (``spndi export tiff|nexus|mat``): bit-exact round trips with axes and units."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import tifffile
import xarray as xr
from scipy.io import loadmat

from spndi_dask import export
from spndi_dask.analysis import analyze
from spndi_dask.cli import main
from spndi_dask.reduce import open_results

from .test_analysis import clustered  # noqa: F401  (the hand-clustered tiny beamtime)


@pytest.fixture(scope="module")
def analysed(clustered):  # noqa: F811
    _, m = clustered
    analyze(m, figures=False)
    return m


def test_tiff_maps_and_patterns_round_trip(analysed, tmp_path):
    m = analysed
    paths = export.export_tiff(m, out_dir=tmp_path)
    assert len(paths) == 2 + 2 * (1 + len(m.scans))
    for p in m.scans:
        ds = open_results(m.output_dir, p.name)
        maps = export.map_stack(ds)
        assert {"d_spacing", "strain", "tilt_x", "label", "cluster", "region"} <= set(maps)
        with tifffile.TiffFile(tmp_path / f"{p.name}_maps.tif") as tif:
            assert tif.is_imagej and tif.series[0].axes == "CYX"
            data = tif.asarray()
            ij = tif.imagej_metadata
            assert ij["unit"] == "um" and ij["Labels"][: len(maps)] == [
                f"{k} ({export.EXPORT_MAPS[k]})" if export.EXPORT_MAPS[k] != "1" else k
                for k in maps
            ]
            assert "tilt_x (rad)" in ij["Labels"] and "strain" in ij["Labels"]  # units stated
            xres = tif.pages[0].tags["XResolution"].value
        for i, values in enumerate(maps.values()):  # float32, NaN where the map is NaN
            assert np.array_equal(data[i], values.astype(np.float32), equal_nan=True)
        step = float(ds["x"].values[1] - ds["x"].values[0])
        assert xres[0] / xres[1] == pytest.approx(1 / step, rel=1e-5)  # pixels per µm
    res = xr.open_dataset(m.layout.analysis, engine="zarr", consolidated=False)
    with tifffile.TiffFile(tmp_path / "cluster_patterns.tif") as tif:
        assert tif.series[0].axes == "ZCYX"
        data = tif.asarray()  # (dq_x, cluster, dq_y, dq_z)
        assert tif.imagej_metadata["unit"] == "1/A"
    want = res["cluster_pattern"].values.astype(np.float32)
    assert np.array_equal(data.transpose(1, 0, 2, 3), want, equal_nan=True)
    second = m.scans[1].name
    got = tifffile.imread(tmp_path / f"{second}_region_patterns.tif").transpose(1, 0, 2, 3)
    want = res["region_pattern_scan"].values[1].astype(np.float32)
    assert np.array_equal(got, want, equal_nan=True)


def test_nexus_nxdata_round_trip(analysed, tmp_path):
    m = analysed
    path = export.export_nexus(m, out_dir=tmp_path)
    with h5py.File(path, "r") as f:
        assert f.attrs["NX_class"] == "NXroot" and f.attrs["default"] == m.scans[0].name
        for p in m.scans:
            ds = open_results(m.output_dir, p.name)
            entry = f[p.name]
            assert entry.attrs["NX_class"] == "NXentry" and entry.attrs["default"] == "maps"
            g = entry["maps"]
            assert g.attrs["NX_class"] == "NXdata" and g.attrs["signal"] == "d_spacing"
            assert list(g.attrs["axes"]) == ["y", "x"]
            assert g.attrs["y_indices"] == 0 and g.attrs["x_indices"] == 1
            aux = list(g.attrs["auxiliary_signals"])
            assert "strain" in aux and "cluster" in aux and "d_spacing" not in aux
            for dim in ("y", "x"):
                assert np.array_equal(g[dim][()], ds[dim].values)
                assert g[dim].attrs["units"] == "um"
            for key in ("d_spacing", "tilt_y", "cluster", "region"):
                v = ds[key].values
                assert g[key].dtype == v.dtype
                assert np.array_equal(g[key][()], v, equal_nan=True)
            assert g["d_spacing"].attrs["units"] == "Å" and g["tilt_x"].attrs["units"] == "rad"


def test_mat_round_trip_and_the_cli(analysed, tmp_path, capsys):
    m = analysed
    assert main(["export", "mat", str(m.source), "--out", str(tmp_path)]) == 0
    first = m.scans[0].name
    assert capsys.readouterr().out.split() == [str(tmp_path / f"{p.name}.mat") for p in m.scans]
    got = loadmat(tmp_path / f"{first}.mat", squeeze_me=True)
    ds = open_results(m.output_dir, first)
    assert np.array_equal(got["strain"], ds["strain"].values, equal_nan=True)
    assert np.array_equal(got["cluster"], ds["cluster"].values)
    assert np.array_equal(got["x_um"], ds["x"].values)
    assert str(got["units"]["d_spacing"]) == "Å"
    assert main(["export", "tiff", str(m.source), "--scans", first, "-o", str(tmp_path)]) == 0
    assert (tmp_path / f"{first}_maps.tif").exists()
    assert not (tmp_path / f"{m.scans[1].name}_maps.tif").exists()
