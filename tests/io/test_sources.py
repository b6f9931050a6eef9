"""Frame sources: one or several files per angle, scan axes first, ranges read across files."""

from __future__ import annotations

import math

import h5py
import numpy as np
import pytest

from spndi_dask.io.sources import SourceError, _runs, probe_source, read_per_point, read_points


@pytest.mark.parametrize("axes", [(7,), (3, 4), (2, 3, 4), (1, 5)])
def test_runs_cover_every_range_in_row_major_order(axes):
    n = math.prod(axes)
    flat = np.arange(n).reshape(axes)
    for start in range(n + 1):
        for stop in range(start, n + 1):
            runs = list(_runs(axes, start, stop))
            got = [flat[run].reshape(-1) for run in runs]
            got = np.concatenate(got) if got else np.array([], int)
            assert got.tolist() == list(range(start, stop)), (start, stop, runs)
            # never more than two partial pieces per axis level: whole rows read as one slab
            assert len(runs) <= 2 * len(axes) - 1


def test_ranges_across_split_files_with_scan_axes_first_are_bit_exact(tmp_path):
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 2**16, size=(60, 3, 2), dtype=np.uint16)
    shapes = [(2, 5), (13,), (3, 2, 4), (1, 1), (2,), (1, 2, 5)]  # 10 + 13 + 24 + 1 + 2 + 10
    assert sum(math.prod(s) for s in shapes) == 60
    files, start = [], 0
    for k, shape in enumerate(shapes):
        n = math.prod(shape)
        files.append(tmp_path / f"part{k}.h5")
        with h5py.File(files[-1], "w") as f:
            f["frames"] = frames[start : start + n].reshape(*shape, 3, 2)
            f["io"] = np.arange(start, start + n + 2, dtype=float)  # 2 values too many: cut
        start += n
    info = probe_source(files, "frames")
    assert info.n_points == 60 and info.detector_shape == (3, 2) and info.dtype == "uint16"
    assert [p.scan_axes for p in info.parts] == shapes
    assert info.stamp == tuple((p.size, p.mtime_ns) for p in info.parts)
    for lo in range(61):
        for hi in range(lo, 61, 7):
            got = read_points(info, "frames", lo, hi)
            assert got.shape == (hi - lo, 3, 2) and got.dtype == np.uint16
            assert np.array_equal(got, frames[lo:hi]), (lo, hi)
    assert read_per_point(info, "io", "monitor", key="monitor").tolist() == list(range(60))
    with pytest.raises(SourceError, match=r"part0.h5:io \(x\) has 12 values for 10 frames.*"):
        read_per_point(info, "io", "x", key="positions", exact=True)
    # a single file given as a path still works
    assert np.array_equal(read_points(files[1], "frames", 2, 9), frames[12:19])


def test_a_dataset_without_detector_axes_is_refused(tmp_path):
    with h5py.File(tmp_path / "a.h5", "w") as f:
        f["frames"] = np.zeros((4, 5))
    with pytest.raises(SourceError, match=r"a.h5:frames has shape \(4, 5\); expected"):
        probe_source(tmp_path / "a.h5", "frames")
