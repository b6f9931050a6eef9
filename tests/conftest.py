"""Shared fixtures: small simulated beamtimes and hand-made beamline files."""

from __future__ import annotations

from pathlib import Path

import dask
import numpy as np
import pytest

from spndi_dask.config import Manifest

GEOMETRY = {
    "energy_kev": 9.0,
    "detector_distance_m": 0.5,
    "pixel_size_m": 55e-6,
    "gamma_deg": 16.0,
    "delta_deg": 4.0,
    "beam_center": [4.0, 5.0],
}


class RaiseOnCompute:
    """A dask scheduler that fails the test if anything is computed (laziness checks)."""

    def __call__(self, dsk, keys, **kwargs):  # pragma: no cover - only runs on failure
        raise AssertionError("a dask graph was computed where everything should stay lazy")


@pytest.fixture
def raise_if_computes():
    with dask.config.set(scheduler=RaiseOnCompute()):
        yield


def write_angle_files(
    root: Path,
    frames: np.ndarray,
    *,
    name: str = "p1",
    order: str = "raster",
    monitor: np.ndarray | None = None,
    xrf: np.ndarray | None = None,
    dataset: str = "/entry/instrument/detector/data",
) -> list[Path]:
    """Write ``frames (angle, y, x, r, c)`` as one HDF5 file per angle in acquisition order."""
    import h5py
    import hdf5plugin

    n_angle, ny, nx = frames.shape[:3]
    paths = []
    for a in range(n_angle):
        grid = frames[a].copy()
        if order == "snake":
            grid[1::2] = grid[1::2, ::-1]
        path = root / "raw" / name / f"angle_{a:03d}.h5"
        path.parent.mkdir(parents=True, exist_ok=True)
        with h5py.File(path, "w") as f:
            f.create_dataset(
                dataset,
                data=grid.reshape(ny * nx, *frames.shape[3:]),
                chunks=(1, *frames.shape[3:]),
                **hdf5plugin.Bitshuffle(cname="lz4"),
            )
            if monitor is not None:
                f.create_dataset("/entry/instrument/monitor/Io", data=monitor[a].reshape(-1))
            if xrf is not None:
                f.create_dataset("/entry/instrument/xrf/Co_K", data=xrf[a].reshape(-1))
        paths.append(path)
    return paths


def manifest_dict(name: str = "p1", *, n_angles: int, scan_shape, **particle) -> dict:
    entry = {
        "name": name,
        "frames": f"raw/{name}/angle_{{index:03d}}.h5",
        "angles_deg": {"start": 8.0, "stop": 8.0 + 0.05 * (n_angles - 1), "num": n_angles},
        "scan_shape": list(scan_shape),
        "scan_step_um": [0.05, 0.05],
        **particle,
    }
    return {"name": "test", "output": "results", "geometry": dict(GEOMETRY), "scans": [entry]}


@pytest.fixture
def handmade(tmp_path):
    """A random 5-D uint16 frame stack written as beamline files, with its manifest dict."""
    rng = np.random.default_rng(1)
    frames = rng.poisson(3.0, size=(5, 6, 7, 9, 10)).astype(np.uint16)
    monitor = rng.uniform(0.9, 1.1, size=frames.shape[:3])
    xrf = rng.uniform(0, 10, size=frames.shape[:3])
    write_angle_files(tmp_path, frames, monitor=monitor, xrf=xrf)
    data = manifest_dict(
        n_angles=5,
        scan_shape=(6, 7),
        monitor="/entry/instrument/monitor/Io",
        xrf="/entry/instrument/xrf/Co_K",
    )
    # small chunks so the 6x7 scan and 9x10 detector span several shards and tiles
    data["ingest"] = {"scan_chunk": [2, 2], "scan_shard": [4, 4], "detector_chunk": [4, 4]}
    return tmp_path, data, frames, monitor, xrf


def load(tmp_path: Path, data: dict) -> Manifest:
    return Manifest.from_dict(data, base_dir=tmp_path, source=str(tmp_path / "beamtime.toml"))


@pytest.fixture(scope="session")
def tiny_beamtime(tmp_path_factory):
    """The ``tiny`` simulated beamtime (2 particles), written once per test session."""
    from spndi_dask.simulate import preset, simulate_beamtime

    out = tmp_path_factory.mktemp("tiny")
    manifest = simulate_beamtime(out, preset("tiny"), scheduler="sync")
    return out, manifest


def reduced_beamtime(tmp_path_factory, name: str, preset_name: str, **overrides):
    """A simulated beamtime (``preset_name`` with ``overrides``), ingested and reduced."""
    from spndi_dask.ingest import ingest
    from spndi_dask.reduce import reduce
    from spndi_dask.simulate import preset, simulate_beamtime

    out = tmp_path_factory.mktemp(name)
    m = simulate_beamtime(out, preset(preset_name, **overrides), scheduler="sync")
    ingest(m)
    reduce(m)
    return out, m
