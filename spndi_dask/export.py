"""Exports in the formats users open elsewhere: TIFF stacks (ImageJ/Fiji, Avizo), NeXus (DAWN,
silx), MATLAB ``.mat``; PLY point clouds are :func:`spndi_dask.features.ply.export_ply`.

``spndi export tiff|nexus|mat|ply MANIFEST [--out DIR]`` writes under ``<output>/export/``:

* ``tiff``: per scan ``<scan>_maps.tif``, an ImageJ hyperstack with one channel per map
  (float32, stored units; channel labels are the map names with their units, ``tilt_x (rad)``;
  x/y resolution in µm per pixel), and from
  ``analysis.zarr`` the mean 3D patterns ``cluster_patterns.tif`` (channel = cluster),
  ``region_patterns.tif`` (channel 0 domain, 1 boundary) and per scan
  ``<scan>_cluster_patterns.tif``, ``<scan>_region_patterns.tif`` (slices = dq_x,
  rows = dq_y, columns = dq_z, 1/Å per voxel);
* ``nexus``: ``<beamtime>.nxs``, one ``NXentry`` per scan with an ``NXdata`` group ``maps``
  (signal ``d_spacing``, the other maps as ``auxiliary_signals``, axes ``y``, ``x`` in µm, every
  map with its ``units``), values in their stored dtype;
* ``mat``: per scan ``<scan>.mat`` with each map, ``y_um``, ``x_um`` and a struct ``units``.

Maps are the reduce maps, ``label``, ``cluster`` and ``region`` where present.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from spndi_dask._deprecate import renamed_keyword
from spndi_dask.io.results_store import MAP_VARIABLES, open_results

__all__ = ["EXPORT_MAPS", "export_mat", "export_nexus", "export_tiff", "map_stack"]

logger = logging.getLogger(__name__)

#: The maps exported, in this order, where a scan has them (with their units).
EXPORT_MAPS = {
    **{k: MAP_VARIABLES[k].split(" ")[0] for k in MAP_VARIABLES},
    "label": "1",
    "cluster": "1",
    "region": "1",
}


def map_stack(ds: xr.Dataset) -> dict[str, np.ndarray]:
    """The exported ``(y, x)`` maps of one scan's node, in :data:`EXPORT_MAPS` order."""
    return {
        k: np.asarray(ds[k].values) for k in EXPORT_MAPS if k in ds and ds[k].dims == ("y", "x")
    }


def _step_um(ds: xr.Dataset, dim: str) -> float:
    c = np.asarray(ds[dim].values, dtype=float)
    return float(abs(c[1] - c[0])) if len(c) > 1 else 1.0


def _out(manifest: Any, out_dir: str | Path | None) -> Path:
    out = Path(out_dir) if out_dir else manifest.layout.root / "export"
    out.mkdir(parents=True, exist_ok=True)
    return out


def _scans(manifest: Any, scans: list[str] | None) -> dict[str, xr.Dataset]:
    names = manifest.select_scans(scans, error=ValueError)
    return {n: open_results(manifest.layout.results, n) for n in names}


def _write_tiff(path: Path, data: np.ndarray, axes: str, res: tuple[float, float], **meta) -> Path:
    import tifffile

    tifffile.imwrite(
        path,
        np.ascontiguousarray(data, dtype=np.float32),
        imagej=True,
        resolution=(1.0 / res[1], 1.0 / res[0]),  # pixels per unit along x, y
        metadata={"axes": axes, **meta},
    )
    return path


@renamed_keyword(particles="scans")
def export_tiff(
    manifest: Any, *, scans: list[str] | None = None, out_dir: str | Path | None = None
) -> list[Path]:
    """Maps and mean cluster/domain/boundary patterns as ImageJ hyperstacks (float32).

    Returns the written paths. Patterns come from ``analysis.zarr`` when ``spndi analyze`` ran.
    """
    out = _out(manifest, out_dir)
    written = []
    for name, ds in _scans(manifest, scans).items():
        maps = map_stack(ds)
        stack = np.stack([m.astype(np.float32) for m in maps.values()])
        written.append(
            _write_tiff(
                out / f"{name}_maps.tif",
                stack,
                "CYX",
                (_step_um(ds, "y"), _step_um(ds, "x")),
                unit="um",
                # the stored units (tilts in rad), stated in every channel's label
                Labels=[k if EXPORT_MAPS[k] == "1" else f"{k} ({EXPORT_MAPS[k]})" for k in maps],
            )
        )
    path = manifest.layout.analysis
    if (path / "zarr.json").exists():
        res = xr.open_dataset(path, engine="zarr", consolidated=False)
        if "cluster_pattern" in res:
            step = tuple(_step_um(res, d) for d in ("dq_x", "dq_y", "dq_z"))
            for key in ("cluster_pattern", "region_pattern"):
                groups = [str(v) for v in res[res[key].dims[0]].values]
                for scan, arr in [("", res[key].values)] + [
                    (f"{p}_", res[f"{key}_scan"].values[i])
                    for i, p in enumerate(res["scan"].values)
                ]:
                    written.append(
                        _write_tiff(
                            out / f"{scan}{key}s.tif",
                            arr.transpose(1, 0, 2, 3),  # (dq_x, group, dq_y, dq_z): ZCYX
                            "ZCYX",
                            (step[1], step[2]),
                            unit="1/A",
                            spacing=step[0],
                            Labels=groups * arr.shape[1],
                        )
                    )
    logger.info("wrote %d TIFF files to %s", len(written), out)
    return written


@renamed_keyword(particles="scans")
def export_nexus(
    manifest: Any, *, scans: list[str] | None = None, out_dir: str | Path | None = None
) -> Path:
    """All scans' maps in one NeXus file (HDF5): ``/<scan>/maps`` ``NXdata`` per scan."""
    import h5py

    out = _out(manifest, out_dir)
    path = out / f"{manifest.name}.nxs"
    tmp = path.with_suffix(".nxs.tmp")
    with h5py.File(tmp, "w") as f:
        f.attrs.update({"NX_class": "NXroot", "creator": "spndi_dask"})
        scans = _scans(manifest, scans)
        f.attrs["default"] = next(iter(scans))
        for name, ds in scans.items():
            entry = f.create_group(name)
            entry.attrs.update({"NX_class": "NXentry", "default": "maps"})
            data = entry.create_group("maps")
            maps = map_stack(ds)
            signal = "d_spacing" if "d_spacing" in maps else next(iter(maps))
            data.attrs.update(
                {
                    "NX_class": "NXdata",
                    "signal": signal,
                    "auxiliary_signals": [k for k in maps if k != signal],
                    "axes": ["y", "x"],
                    "y_indices": 0,
                    "x_indices": 1,
                }
            )
            for dim in ("y", "x"):
                axis = data.create_dataset(dim, data=np.asarray(ds[dim].values))
                axis.attrs.update({"units": "um", "long_name": f"{dim} (µm)"})
            for key, values in maps.items():
                d = data.create_dataset(key, data=values, compression="gzip")
                d.attrs.update({"units": EXPORT_MAPS[key], "long_name": key})
    tmp.replace(path)
    logger.info("wrote %s", path)
    return path


@renamed_keyword(particles="scans")
def export_mat(
    manifest: Any, *, scans: list[str] | None = None, out_dir: str | Path | None = None
) -> list[Path]:
    """Per scan ``<scan>.mat`` (MATLAB 5): the maps, ``y_um``, ``x_um``, struct ``units``."""
    from scipy.io import savemat

    out = _out(manifest, out_dir)
    written = []
    for name, ds in _scans(manifest, scans).items():
        maps = map_stack(ds)
        content: dict[str, Any] = dict(maps)
        content["y_um"] = np.asarray(ds["y"].values)
        content["x_um"] = np.asarray(ds["x"].values)
        content["units"] = {k: EXPORT_MAPS[k] for k in maps}
        path = out / f"{name}.mat"
        savemat(path, content, do_compression=True)
        written.append(path)
    return written
