"""io.results_store: opening, publishing and partly rewriting results.zarr nodes."""

from __future__ import annotations

import csv

import dask.array as da
import numpy as np
import pytest
import xarray as xr
import zarr

from spndi_dask.io.results_store import (
    PATTERN_ROWS,
    IncompleteResultError,
    is_current,
    mark_complete,
    open_results,
    publish,
    replace_array,
    results_group,
    stored_q_grid,
    write_csv,
    write_temporary,
)
from spndi_dask.stages import StageError


def _node(seed: int, ny: int = 40) -> xr.Dataset:
    rng = np.random.default_rng(seed)
    pattern = rng.random((ny, 3, 4, 4, 4)).astype(np.float32)
    return xr.Dataset(
        {
            "strain": (("y", "x"), rng.random((ny, 3))),
            "pattern": (
                ("y", "x", "qx", "qy", "qz"),
                da.from_array(pattern, chunks=(1, 3, 4, 4, 4)),
            ),
        },
        coords={"y": np.arange(ny) * 0.05, "x": np.arange(3) * 0.05},
    )


def _write(out, name, ds, fingerprint, previous=None):
    attrs = {"spndi_dask": {"fingerprint": fingerprint}}
    delayed, tmp = write_temporary(ds, out, name, attrs)
    assert not is_current(out, name, fingerprint)
    delayed.compute()
    # written but not published: a reader finds the previous node (or none) whole
    if previous is None:
        with pytest.raises(FileNotFoundError, match=f"no reduce result for scan '{name}'"):
            open_results(out, name)
    else:
        assert open_results(out, name).attrs["spndi_dask"]["fingerprint"] == previous
    assert zarr.open_group(str(tmp)).attrs["spndi_dask"]["complete"] is False
    publish(tmp, out, name, attrs)
    assert not tmp.exists()


def test_round_trip_is_bit_exact_and_patterns_read_in_row_blocks(tmp_path):
    root = results_group(tmp_path, "bt")
    assert root.attrs["name"] == "bt" and root.attrs["spndi_dask"]["kind"] == "results"
    assert stored_q_grid(tmp_path) is None
    root.attrs["q_grid"] = {"n": 4}
    assert stored_q_grid(tmp_path) == {"n": 4}
    ds = _node(0)
    _write(tmp_path, "p1", ds, "f1")
    got = open_results(tmp_path, "p1")
    assert got["pattern"].chunks[0][0] == PATTERN_ROWS
    np.testing.assert_array_equal(got["pattern"].values, ds["pattern"].values)
    np.testing.assert_array_equal(got["strain"].values, ds["strain"].values)
    assert is_current(tmp_path, "p1", "f1") and not is_current(tmp_path, "p1", "f2")
    tree = open_results(tmp_path)
    assert list(tree.children) == ["p1"]


def test_republishing_replaces_the_node_whole(tmp_path):
    results_group(tmp_path, "bt")
    _write(tmp_path, "p1", _node(0), "f1")
    new = _node(1, ny=20)
    _write(tmp_path, "p1", new, "f2", previous="f1")
    got = open_results(tmp_path, "p1")
    assert got.sizes["y"] == 20 and is_current(tmp_path, "p1", "f2")
    np.testing.assert_array_equal(got["pattern"].values, new["pattern"].values)


def test_missing_and_incomplete_results_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"run `spndi reduce beamtime\.toml` first"):
        open_results(tmp_path, "p1")
    results_group(tmp_path, "bt")
    _write(tmp_path, "p1", _node(0), "f1")
    g = zarr.open_group(str(tmp_path / "results.zarr" / "p1"), mode="r+")
    g.attrs["spndi_dask"] = {"fingerprint": "f1", "complete": False}
    with pytest.raises(IncompleteResultError, match=r"scan 'p1' .* is incomplete") as info:
        open_results(tmp_path, "p1")
    assert isinstance(info.value, StageError) and isinstance(info.value, ValueError)
    assert not is_current(tmp_path, "p1", "f1")


def test_a_rewritten_stage_array_reads_incomplete_until_marked(tmp_path):
    results_group(tmp_path, "bt")
    _write(tmp_path, "p1", _node(0), "f1")
    node = tmp_path / "results.zarr" / "p1"
    mark_complete(node, "cluster", {"k": 3})
    arr = replace_array(
        node, "cluster", stage="cluster", dims=["y", "x"], long_name="cluster",
        shape=(40, 3), dtype=np.int32, chunks=(40, 3), fill_value=-1,
    )  # fmt: skip
    assert "cluster" not in zarr.open_group(str(node)).attrs  # not complete while rewriting
    arr[:] = 2
    mark_complete(node, "cluster", {"k": 2})
    ds = open_results(tmp_path, "p1")
    assert ds.attrs["cluster"] == {"k": 2} and (ds["cluster"].values == 2).all()
    assert ds["cluster"].attrs["long_name"] == "cluster" and ds["cluster"].dims == ("y", "x")


def test_write_csv_rounds_floats_and_replaces_in_one_move(tmp_path):
    path = tmp_path / "clusters.csv"
    write_csv(path, [{"scan": "p1", "strain": 1.23456789e-4, "pixels": 7}])
    write_csv(path, [{"scan": "p2", "strain": 0.5, "pixels": 1}])
    with open(path, newline="") as f:
        assert list(csv.DictReader(f)) == [{"scan": "p2", "strain": "0.5", "pixels": "1"}]
    write_csv(path, [])
    assert path.read_text().strip() == "scan"
    assert [p.name for p in tmp_path.iterdir()] == ["clusters.csv"]
