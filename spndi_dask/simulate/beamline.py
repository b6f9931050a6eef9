"""Step 3 of the forward model, and the files: the beamline layout described in
:mod:`spndi_dask.simulate`, ``beamtime.toml`` and the ground truth.

Every (particle, angle) file is one dask task with its own random stream, written under a
temporary name beside it and renamed when complete (:func:`~spndi_dask.io.layout.atomic_path`),
so an interrupted simulation leaves no truncated file behind.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import dask
import h5py
import hdf5plugin
import numpy as np
from scipy import ndimage

from spndi_dask.compute import active_client
from spndi_dask.config import Manifest
from spndi_dask.geometry import q_sample, rotation_matrix
from spndi_dask.io.layout import atomic_path
from spndi_dask.simulate.physics import expected_counts, make_particle, pupil_rings
from spndi_dask.simulate.presets import SimulationConfig

__all__ = [
    "FRAMES_DATASET",
    "MONITOR_DATASET",
    "THETA_DATASET",
    "XRF_DATASET",
    "simulate_beamtime",
]

logger = logging.getLogger(__name__)

FRAMES_DATASET = "/entry/instrument/detector/data"
MONITOR_DATASET = "/entry/instrument/monitor/Io"
XRF_DATASET = "/entry/instrument/xrf/Co_K"
THETA_DATASET = "/entry/sample/theta"


def _detector_defects(config: SimulationConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng([config.seed, 7919])
    npix = int(np.prod(config.detector_shape))
    hot = rng.random(npix) < config.hot_fraction
    dead = (rng.random(npix) < config.dead_fraction) & ~hot
    dark = (
        config.dark_counts * (1 + 0.2 * rng.standard_normal(npix)).clip(0.2)
        if config.dark_counts > 0
        else np.zeros(npix)
    )
    return hot, dead, dark


def _shifted(field2d: np.ndarray, shift: np.ndarray, cval: float) -> np.ndarray:
    return ndimage.shift(field2d, shift, order=1, mode="constant", cval=cval)


def _h5_compression(config: SimulationConfig) -> dict[str, Any]:
    if config.compression == "bitshuffle-lz4":
        return dict(hdf5plugin.Bitshuffle(cname="lz4"))
    if config.compression == "gzip":
        return {"compression": "gzip", "compression_opts": 4, "shuffle": True}
    return {}


def _write_angle_file(
    path: str,
    config: SimulationConfig,
    particle_index: int,
    angle_index: int,
    fields: dict[str, np.ndarray],
) -> dict[str, Any]:
    """Simulate and write one angle's frames; atomic (temporary name, then rename)."""
    geometry = config.geometry()
    angle = float(config.angles()[angle_index])
    rng = np.random.default_rng([config.seed, particle_index, angle_index, 1])
    ny, nx = config.scan_shape
    shape = config.detector_shape
    npix = shape[0] * shape[1]
    shift = fields["drift"][angle_index]

    thick = _shifted(fields["thickness"], shift, 0.0).ravel()
    G = np.stack([_shifted(fields["G"][..., k], shift, np.nan) for k in range(3)], -1)
    G = G.reshape(-1, 3)
    sigma = _shifted(np.nan_to_num(fields["sigma_q"], nan=1e-3), shift, 1e-3).ravel()
    xrf = _shifted(fields["xrf_yield"], shift, 0.0).ravel()

    decay = 1 - config.monitor_decay * angle_index / max(config.n_angles - 1, 1)
    io = config.monitor_counts * decay * (1 + config.monitor_noise * rng.standard_normal(ny * nx))
    io = np.maximum(io, 1.0)
    amplitude = config.peak_counts * thick * (io / config.monitor_counts)
    amplitude *= (fields["sigma_ref"] / sigma) ** 3  # conserve integrated intensity
    lit = (thick > 1e-3) & np.all(np.isfinite(G), axis=1)

    q = q_sample(geometry, [angle], rows=np.arange(shape[0]), cols=np.arange(shape[1]))
    q = q.reshape(-1, 3)
    beam = rotation_matrix(geometry.rocking_axis, np.deg2rad(angle))[2]  # Rᵀ ẑ
    rings = pupil_rings(config)
    # cull detector pixels that no peak of this particle can reach at this angle
    g_lit = G[lit]
    if g_lit.size:
        centre = g_lit.mean(axis=0)
        reach = np.linalg.norm(g_lit - centre, axis=1).max() + 6 * sigma[lit].max()
        reach += rings[:, 0].max() + rings[:, 1].max()
        near = np.linalg.norm(q - centre, axis=-1) < reach
    else:
        near = np.zeros(npix, bool)
    near_idx = np.flatnonzero(near)

    hot, dead, dark = fields["hot"], fields["dead"], fields["dark"]
    dtype = np.dtype(config.dtype)
    vmax = np.iinfo(dtype).max if dtype.kind in "ui" else np.inf
    total_counts = 0
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        dset = f.create_dataset(
            FRAMES_DATASET,
            shape=(ny * nx, *shape),
            dtype=dtype,
            chunks=(1, *shape),
            **_h5_compression(config),
        )
        for start in range(0, ny * nx, config.block_points):
            stop = min(start + config.block_points, ny * nx)
            m = stop - start
            # background (+ dark): independent Poisson per voxel; without dark it is uniform,
            # so draw the total and scatter it (same distribution, far fewer random numbers)
            if dark.any():
                counts = rng.poisson(config.background + np.broadcast_to(dark, (m, npix)))
            else:
                n_bg = rng.poisson(config.background * m * npix)
                flat = np.bincount(rng.integers(0, m * npix, n_bg), minlength=m * npix)
                counts = flat.reshape(m, npix)
            sel = np.flatnonzero(lit[start:stop])
            if sel.size and near_idx.size:
                pts = start + sel
                lam = expected_counts(
                    q[near_idx], G[pts], sigma[pts], amplitude[pts], beam=beam, rings=rings
                )
                counts[np.ix_(sel, near_idx)] += rng.poisson(lam.astype(np.float64))
            counts[:, hot] = rng.poisson(config.hot_counts, size=(m, int(hot.sum())))
            counts[:, dead] = 0
            np.minimum(counts, vmax, out=counts)
            total_counts += int(counts.sum())
            dset[start:stop] = counts.astype(dtype).reshape(stop - start, *shape)
        f.create_dataset(MONITOR_DATASET, data=io.astype(np.float64))
        xrf_counts = rng.poisson(
            config.xrf_counts * xrf * io / config.monitor_counts + config.xrf_background
        )
        f.create_dataset(XRF_DATASET, data=xrf_counts.astype(np.float64))
        f.create_dataset(THETA_DATASET, data=angle)
        f.attrs["energy_kev"] = config.energy_kev
        f.attrs["scan_shape"] = list(config.scan_shape)
        f.attrs["simulated"] = True
    return {"path": path, "angle": angle, "counts": total_counts}


def _write_dark(path: Path, config: SimulationConfig, dark: np.ndarray) -> None:
    rng = np.random.default_rng([config.seed, 104729])
    frames = rng.poisson(np.broadcast_to(dark, (10, dark.size))).reshape(10, *config.detector_shape)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset(FRAMES_DATASET, data=frames.astype(config.dtype))


def simulate_beamtime(
    out_dir: str | Path,
    config: SimulationConfig | None = None,
    *,
    scheduler: str | None = None,
) -> Manifest:
    """Simulate a whole beamtime into ``out_dir`` and return its validated manifest.

    Parameters
    ----------
    out_dir : path
        Created if needed. Receives ``beamtime.toml``, ``raw/`` and ``ground_truth/``.
    config : SimulationConfig, optional
        Defaults to the ``demo`` preset.
    scheduler : str, optional
        dask scheduler for the per-(particle, angle) tasks; default: the active distributed
        client if any, else ``'processes'`` (spawned) for large and ``'threads'`` for small jobs.

    Returns
    -------
    Manifest
        The manifest written to ``out_dir / 'beamtime.toml'``.

    Examples
    --------
    >>> import tempfile
    >>> from spndi_dask.simulate import preset
    >>> m = simulate_beamtime(tempfile.mkdtemp(), preset("tiny", n_particles=1, n_angles=3))
    >>> [p.name for p in m.particles]
    ['p1']
    """
    config = config or SimulationConfig()
    out = Path(out_dir).resolve()
    (out / "ground_truth").mkdir(parents=True, exist_ok=True)
    geometry = config.geometry()
    angles = config.angles()
    # reference G0: Bragg condition on the arm-axis pixel at the centre angle
    g0 = q_sample(
        geometry,
        [angles[config.n_angles // 2]],
        rows=[geometry.beam_center[0]],
        cols=[geometry.beam_center[1]],
    )[0, 0, 0]
    hot, dead, dark = _detector_defects(config)
    sigma_ref = float(np.median(np.asarray(config.domain_types)[:, 3]))

    particles_toml = []
    tasks = []
    for i in range(config.n_particles):
        rng = np.random.default_rng([config.seed, i, 0])
        sp = make_particle(config, i, g0, rng=rng)
        sp.save(
            out / "ground_truth" / f"{sp.name}.npz",
            angles=angles,
            G0=g0,
            d0=2 * np.pi / np.linalg.norm(g0),
        )
        fields = {
            "thickness": sp.thickness,
            "G": sp.G,
            "sigma_q": sp.sigma_q,
            "drift": sp.drift,
            "xrf_yield": sp.xrf_yield,
            "hot": hot,
            "dead": dead,
            "dark": dark,
            "sigma_ref": sigma_ref,
        }
        for a in range(config.n_angles):
            path = str(out / "raw" / sp.name / f"angle_{a:03d}.h5")
            tasks.append(dask.delayed(_write_angle_file, pure=False)(path, config, i, a, fields))
        entry = {
            "name": sp.name,
            "frames": f"raw/{sp.name}/angle_{{index:03d}}.h5",
            "dataset": FRAMES_DATASET,
            "monitor": MONITOR_DATASET,
            "xrf": XRF_DATASET,
            "angles_deg": [float(x) for x in angles],
            "scan_shape": list(config.scan_shape),
            "scan_step_um": list(config.scan_step_um),
        }
        if config.dark_counts > 0:
            entry["dark"] = "raw/dark.h5"
        particles_toml.append(entry)
    if config.dark_counts > 0:
        _write_dark(out / "raw" / "dark.h5", config, dark)

    if scheduler is None and active_client() is None:  # else: use the active client
        scheduler = "processes" if config.raw_bytes > 2**28 else "threads"
    logger.info(
        "simulating %d files (%.2f GB raw) into %s", len(tasks), config.raw_bytes / 1e9, out
    )
    results = dask.compute(*tasks, scheduler=scheduler) if scheduler else dask.compute(*tasks)

    data = {
        "name": config.name,
        "output": "results",
        "geometry": geometry.to_dict(),
        "particles": particles_toml,
        "features": {"max_epochs": config.train_epochs},
    }
    manifest = Manifest.from_dict(data, base_dir=out, source=str(out / "beamtime.toml"))
    (out / "beamtime.toml").write_text(
        "# Simulated beamtime written by `spndi simulate`; ground truth in ground_truth/\n"
        + manifest.to_toml()
    )
    truth = {
        "config": asdict(config),
        "G0": g0.tolist(),
        "d0_angstrom": float(2 * np.pi / np.linalg.norm(g0)),
        "domain_types": [
            dict(zip(("strain", "tilt_x", "tilt_y", "sigma_q"), row, strict=True))
            for row in config.domain_types
        ],
        "total_counts": int(sum(r["counts"] for r in results)),
        "raw_bytes": config.raw_bytes,
    }
    (out / "ground_truth" / "truth.json").write_text(json.dumps(truth, indent=2))
    return Manifest.from_toml(out / "beamtime.toml")
