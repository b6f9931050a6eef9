"""Step 3 of the forward model, and the files: the beamline layout described in
:mod:`spndi_dask.simulate`, ``beamtime.toml`` and the ground truth.

Every (particle, angle) scan is one dask task with its own random streams, its file(s) written
under a temporary name beside each and renamed when complete
(:func:`~spndi_dask.io.layout.atomic_path`), so an interrupted simulation leaves no truncated file
behind.

The dataset names of both layouts are module constants; :func:`datasets` tells which a
configuration writes, :func:`scan_path` the nominal position of every frame it records.
"""

from __future__ import annotations

import json
import logging
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import Any

import dask
import h5py
import hdf5plugin
import numpy as np
from dask.diagnostics import ProgressBar
from scipy import ndimage
from scipy.special import ndtr

from spndi_dask.compute import active_client, compute
from spndi_dask.config import Manifest
from spndi_dask.geometry import q_sample, rotation_matrix
from spndi_dask.io.layout import atomic_path
from spndi_dask.simulate.physics import expected_counts, make_particle, pupil_rings
from spndi_dask.simulate.presets import SimulationConfig

__all__ = [
    "CO_KALPHA_KEV",
    "FRAMES_DATASET",
    "MONITOR_DATASET",
    "THETA_DATASET",
    "XRF_DATASET",
    "datasets",
    "scan_path",
    "simulate_beamtime",
]

logger = logging.getLogger(__name__)

# the ideal layout: one file per angle
FRAMES_DATASET = "/entry/instrument/detector/data"
MONITOR_DATASET = "/entry/instrument/monitor/Io"
XRF_DATASET = "/entry/instrument/xrf/Co_K"
THETA_DATASET = "/entry/sample/theta"

# a nanoprobe beamline's export (``scan_files``): NeXus-style names
EIGER_GROUP = "/entry/instrument/eiger"
I0_DATASET = "/entry/instrument/monitor/i0"
POSITIONERS_GROUP = "/entry/instrument/positioners"
ENERGY_DATASET = "/entry/instrument/monochromator/energy"
POSITION_DATASETS = ("/entry/measurement/samy", "/entry/measurement/samx")  # (y, x), µm
XRF_SPECTRA_DATASET = "/entry/instrument/xspress3/data"
XRF_ENERGY_DATASET = "/entry/instrument/xspress3/energy"

CO_KALPHA_KEV = 6.930  # the line the XRF map follows
CO_KBETA_KEV = 7.649
XRF_WINDOW_KEV = (6.73, 7.13)  # the Kα window written to the manifest
XRF_FWHM_KEV = 0.15  # energy resolution of the fluorescence detector's channels
SKIPPED_SCANS = 2  # scan ids not exported between two particles (alignment scans)

# pixel_mask bits (NeXus NXdetector): gap between modules, dead / defective pixel
MASK_GAP, MASK_DEFECT = 1, 2


def datasets(config: SimulationConfig) -> dict[str, str]:
    """The HDF5 datasets a configuration writes in every frame file, by role.

    Keys: ``frames``, ``monitor``, ``xrf``, ``theta`` always; ``mask`` (module gaps or flagged
    pixels), ``position_y`` / ``position_x`` (fly scans) and ``xrf_energy`` (XRF spectra) when
    written.

    Examples
    --------
    >>> from spndi_dask.simulate import preset
    >>> datasets(preset("tiny"))["frames"]
    '/entry/instrument/detector/data'
    >>> names = datasets(preset("beamline"))
    >>> names["frames"], names["mask"]
    ('/entry/instrument/eiger/data', '/entry/instrument/eiger/pixel_mask')
    >>> names["position_y"], names["position_x"], names["xrf"]
    ('/entry/measurement/samy', '/entry/measurement/samx', '/entry/instrument/xspress3/data')
    """
    nexus = config.scan_files
    frames = f"{EIGER_GROUP}/data" if nexus else FRAMES_DATASET
    names = {
        "frames": frames,
        "monitor": I0_DATASET if nexus else MONITOR_DATASET,
        "xrf": XRF_SPECTRA_DATASET if config.xrf_spectra else XRF_DATASET,
        "theta": f"{POSITIONERS_GROUP}/theta" if nexus else THETA_DATASET,
    }
    if config.module_gap_px or config.flagged_pixels:
        names["mask"] = frames.rsplit("/", 1)[0] + "/pixel_mask"
    if config.fly_scan:
        names["position_y"], names["position_x"] = POSITION_DATASETS
    if config.xrf_spectra:
        names["xrf_energy"] = XRF_ENERGY_DATASET
    return names


def scan_path(config: SimulationConfig) -> np.ndarray:
    """Nominal scan-grid position ``(row, col)`` of every frame, in acquisition order.

    A raster (row-major) scan of the grid; a fly scan snakes (every other row reversed) and
    records ``overshoot_points`` frames past the end of every row, outside the grid.

    Examples
    --------
    >>> from spndi_dask.simulate import preset
    >>> cfg = preset("tiny", scan_shape=(2, 3), fly_scan=True, overshoot_points=1)
    >>> scan_path(cfg).astype(int).tolist()
    [[0, 0], [0, 1], [0, 2], [0, 3], [1, 2], [1, 1], [1, 0], [1, -1]]
    """
    ny, nx = config.scan_shape
    if not config.fly_scan:
        return np.stack(np.divmod(np.arange(ny * nx), nx), -1).astype(float)
    cols = np.arange(config.frames_per_row)
    return np.concatenate(
        [
            np.stack([np.full(cols.size, r), cols if r % 2 == 0 else nx - 1 - cols], -1)
            for r in range(ny)
        ]
    ).astype(float)


def _scan_origin_um(config: SimulationConfig) -> np.ndarray:
    """Motor position (µm) of the scan-grid node (0, 0)."""
    centre = np.asarray(config.scan_center_um, float)
    half = (np.asarray(config.scan_shape) - 1) / 2
    return centre - half * np.asarray(config.scan_step_um)


def _parts(config: SimulationConfig) -> list[tuple[int, int]]:
    """Frame ranges ``[start, stop)`` of the files a scan is split into (whole rows when 4D)."""
    n, step = config.frames_per_scan, config.frames_per_file
    if step == 0:
        return [(0, n)]
    if config.frames_4d:
        step = max(1, step // config.frames_per_row) * config.frames_per_row
    return [(s, min(s + step, n)) for s in range(0, n, step)]


def _scan_id(config: SimulationConfig, particle_index: int, angle_index: int) -> int:
    return config.first_scan_id + particle_index * (config.n_angles + SKIPPED_SCANS) + angle_index


def _scan_files(config: SimulationConfig, particle: str, particle_index: int, angle_index: int):
    """Paths (relative to the beamtime) of the file(s) of one scan, in frame order."""
    if config.scan_files:
        stem = f"raw/{particle}/scan_{_scan_id(config, particle_index, angle_index)}"
    else:
        stem = f"raw/{particle}/angle_{angle_index:03d}"
    if config.frames_per_file == 0:
        return [f"{stem}.h5"]
    return [f"{stem}/data_{k:03d}.h5" for k in range(len(_parts(config)))]


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


def _detector_modules(config: SimulationConfig) -> tuple[np.ndarray, np.ndarray]:
    """Module gaps (a cross through the detector centre) and flagged pixels, flat bool."""
    nr, nc = config.detector_shape
    gap = np.zeros((nr, nc), bool)
    w = config.module_gap_px
    if w:
        gap[nr // 2 - w // 2 : nr // 2 - w // 2 + w, :] = True
        gap[:, nc // 2 - w // 2 : nc // 2 - w // 2 + w] = True
    flagged = np.zeros(nr * nc, bool)
    if config.flagged_pixels:
        rng = np.random.default_rng([config.seed, 7919, 1])
        good = np.flatnonzero(~gap.ravel())
        flagged[rng.choice(good, min(config.flagged_pixels, good.size), replace=False)] = True
    return gap.ravel(), flagged


def _saturated_frames(
    config: SimulationConfig, particle_index: int, thickness: np.ndarray
) -> dict[int, list[int]]:
    """Frames (acquisition index, per angle index) whose Bragg peak saturates the detector.

    Frames in the particle's core at angles next to the centre one, where it diffracts most.
    """
    if not config.saturated_frames:
        return {}
    rng = np.random.default_rng([config.seed, particle_index, 3])
    nx = config.scan_shape[1]
    r, c = scan_path(config).astype(int).T
    on_grid = (c >= 0) & (c < nx)
    core = np.flatnonzero(on_grid & (thickness[r, c.clip(0, nx - 1)] > 0.5))
    if core.size == 0:
        return {}
    k = min(config.saturated_frames, core.size)
    mid = config.n_angles // 2
    angles = np.clip(rng.integers(mid - 1, mid + 2, size=k), 0, config.n_angles - 1)
    out: dict[int, list[int]] = {}
    for a, j in zip(angles, rng.choice(core, k, replace=False), strict=True):
        out.setdefault(int(a), []).append(int(j))
    return out


def _sample_at(
    fields: dict[str, Any], coords: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Thickness, G, σ_q and XRF yield at off-grid points ``coords`` (n, 2) of the sample.

    Bilinear interpolation of the per-pixel fields, as the drift of the regular grid is
    applied (``ndimage.shift``, order 1); outside the grid: no sample (``G`` NaN, no thickness).
    """
    c = np.asarray(coords, float).T

    def at(field: np.ndarray, cval: float) -> np.ndarray:
        return ndimage.map_coordinates(field, c, order=1, mode="constant", cval=cval)

    thick = at(fields["thickness"], 0.0)
    G = np.stack([at(fields["G"][..., k], np.nan) for k in range(3)], -1)
    sigma = at(np.nan_to_num(fields["sigma_q"], nan=1e-3), 1e-3)
    xrf = at(fields["xrf_yield"], 0.0)
    return thick, G, sigma, xrf


def _recorded_positions(
    config: SimulationConfig, particle_index: int, angle_index: int
) -> np.ndarray:
    """Where a fly scan's frames were taken (scan pixels): the nodes of :func:`scan_path` plus a
    Gaussian position error of ``position_jitter`` steps (truncated at 3σ) on both axes."""
    rng = np.random.default_rng([config.seed, particle_index, angle_index, 2])
    nodes = scan_path(config)
    z = rng.standard_normal(nodes.shape)
    while (bad := np.abs(z) > 3).any():
        z[bad] = rng.standard_normal(int(bad.sum()))
    return nodes + config.position_jitter * z


def _xrf_line_shape(config: SimulationConfig, centre_kev: float) -> np.ndarray:
    """Fraction of a Gaussian line of ``XRF_FWHM_KEV`` falling into every energy bin."""
    e = np.arange(config.xrf_bins) * config.xrf_gain_kev
    sigma = XRF_FWHM_KEV / (2 * np.sqrt(2 * np.log(2)))
    half = config.xrf_gain_kev / 2
    return ndtr((e + half - centre_kev) / sigma) - ndtr((e - half - centre_kev) / sigma)


def _xrf_spectra(
    config: SimulationConfig, line: np.ndarray, flux: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Spectra ``(n_points, channels, bins)``: the Co Kα line of ``line`` expected counts (all
    channels together) with its Kβ, the elastic scatter at the beam energy and a flat
    continuum, each channel with its own efficiency, Poisson noise."""
    eff = 1 + 0.08 * np.sin(1.7 * np.arange(config.xrf_channels) + 0.4)
    share = eff / eff.sum()
    fluo = _xrf_line_shape(config, CO_KALPHA_KEV) + 0.135 * _xrf_line_shape(config, CO_KBETA_KEV)
    scatter = 0.25 * config.xrf_counts * _xrf_line_shape(config, config.energy_kev)
    continuum = config.xrf_background / 10  # counts per bin and channel at full flux
    lam = line[:, None] * fluo + flux[:, None] * (scatter + continuum)  # (n, bins)
    return rng.poisson(share[None, :, None] * lam[:, None, :]).astype(np.uint32)


def _write_metadata(
    f: h5py.File, config: SimulationConfig, angle: float, scan_id: int, mask: np.ndarray | None
) -> None:
    """What a NeXus-style beamline file carries besides the data (``scan_files``)."""
    geometry = config.geometry()
    entry = f.require_group("/entry")
    entry.attrs.update(
        NX_class="NXentry",
        theta=angle,
        scan_id=scan_id,
        plan_name="fly2d" if config.fly_scan else "raster2d",
        scan_shape=list(config.scan_shape),
    )
    f.require_group("/entry/instrument").attrs["NX_class"] = "NXinstrument"
    det = f.require_group(EIGER_GROUP)
    det.attrs["NX_class"] = "NXdetector"
    values = {
        f"{EIGER_GROUP}/x_pixel_size": (geometry.pixel_size_m, "m"),
        f"{EIGER_GROUP}/y_pixel_size": (geometry.pixel_size_m, "m"),
        f"{EIGER_GROUP}/distance": (geometry.detector_distance_m, "m"),
        f"{EIGER_GROUP}/beam_center_x": (geometry.beam_center[1], "pixel"),
        f"{EIGER_GROUP}/beam_center_y": (geometry.beam_center[0], "pixel"),
        f"{EIGER_GROUP}/saturation_value": (config.saturation_counts, "counts"),
        ENERGY_DATASET: (config.energy_kev, "keV"),
        f"{POSITIONERS_GROUP}/theta": (angle, "deg"),
        f"{POSITIONERS_GROUP}/gamma": (geometry.gamma_deg, "deg"),
        f"{POSITIONERS_GROUP}/delta": (geometry.delta_deg, "deg"),
    }
    for name, (value, units) in values.items():
        f.create_dataset(name, data=value).attrs["units"] = units
    f[ENERGY_DATASET].parent.attrs["NX_class"] = "NXmonochromator"
    det["description"] = "Eiger2 X 500K, 2x2 modules (simulated)"
    if mask is not None:
        det.create_dataset("pixel_mask", data=mask)


def _write_part(
    f: h5py.File,
    config: SimulationConfig,
    points: dict[str, np.ndarray],
    *,
    angle: float,
    scan_id: int,
    mask: np.ndarray | None,
) -> None:
    """Everything of a scan's file but the frames: its share of the per-point datasets
    ``points`` (by :func:`datasets` role) and the scan's metadata."""
    names = datasets(config)
    f.create_dataset(names["monitor"], data=points["monitor"])
    if config.xrf_spectra:
        spectra = points["xrf"]
        chunks = (min(len(spectra), 64), *spectra.shape[1:])
        f.create_dataset(names["xrf"], data=spectra, chunks=chunks, **_h5_compression(config))
        energy = np.arange(config.xrf_bins) * config.xrf_gain_kev
        f.create_dataset(names["xrf_energy"], data=energy).attrs["units"] = "keV"
    else:
        f.create_dataset(names["xrf"], data=points["xrf"])
    if config.scan_files:
        _write_metadata(f, config, angle, scan_id, mask)
    else:  # the ideal layout (in this order: its files stay byte for byte the same)
        f.create_dataset(names["theta"], data=angle)
        f.attrs["energy_kev"] = config.energy_kev
        f.attrs["scan_shape"] = list(config.scan_shape)
        f.attrs["simulated"] = True
        if mask is not None:
            f.create_dataset(names["mask"], data=mask)
    for key in ("position_y", "position_x"):
        if key in points:
            f.create_dataset(names[key], data=points[key]).attrs["units"] = "um"


def _write_scan(
    paths: list[str],
    config: SimulationConfig,
    particle_index: int,
    angle_index: int,
    fields: dict[str, Any],
) -> dict[str, Any]:
    """Simulate and write one scan (one angle of one particle) into its file(s); atomic."""
    geometry = config.geometry()
    angle = float(config.angles()[angle_index])
    rng = np.random.default_rng([config.seed, particle_index, angle_index, 1])
    shape = config.detector_shape
    npix = shape[0] * shape[1]
    shift = fields["drift"][angle_index]
    names = datasets(config)

    positions = None
    if config.fly_scan:  # the sample as seen at the recorded, off-grid positions
        positions = _recorded_positions(config, particle_index, angle_index)
        thick, G, sigma, xrf = _sample_at(fields, positions - shift)
    else:  # the regular grid, raster order
        thick = _shifted(fields["thickness"], shift, 0.0).ravel()
        G = np.stack([_shifted(fields["G"][..., k], shift, np.nan) for k in range(3)], -1)
        G = G.reshape(-1, 3)
        sigma = _shifted(np.nan_to_num(fields["sigma_q"], nan=1e-3), shift, 1e-3).ravel()
        xrf = _shifted(fields["xrf_yield"], shift, 0.0).ravel()
    n = thick.size

    decay = 1 - config.monitor_decay * angle_index / max(config.n_angles - 1, 1)
    io = config.monitor_counts * decay * (1 + config.monitor_noise * rng.standard_normal(n))
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
        if config.second_domain_fraction > 0:
            off = abs(config.second_domain_strain) + abs(config.second_domain_tilt)
            reach += np.linalg.norm(centre) * off
        near = np.linalg.norm(q - centre, axis=-1) < reach
    else:
        near = np.zeros(npix, bool)
    near_idx = np.flatnonzero(near)
    second = rotation_matrix(geometry.rocking_axis, config.second_domain_tilt) / (
        1 + config.second_domain_strain
    )

    hot, dead, dark = fields["hot"], fields["dead"], fields["dark"]
    gap, flagged = fields["gap"], fields["flagged"]
    saturated = fields["saturated"].get(angle_index, [])
    dtype = np.dtype(config.dtype)
    vmax = np.iinfo(dtype).max if dtype.kind in "ui" else np.inf
    row = config.frames_per_row
    block = config.block_points
    if config.frames_4d:  # whole rows per block
        block = max(1, block // row) * row
    total_counts = 0
    parts = _parts(config)
    with ExitStack() as stack:
        files = [
            stack.enter_context(h5py.File(stack.enter_context(atomic_path(path)), "w"))
            for path in paths
        ]
        for f, (p0, p1) in zip(files, parts, strict=True):
            lead = ((p1 - p0) // row, row) if config.frames_4d else (p1 - p0,)
            dset = f.create_dataset(
                names["frames"],
                shape=(*lead, *shape),
                dtype=dtype,
                chunks=(*(1 for _ in lead), *shape),
                **_h5_compression(config),
            )
            for start in range(p0, p1, block):
                stop = min(start + block, p1)
                m = stop - start
                # background (+ dark): independent Poisson per voxel; without dark it is
                # uniform, so draw the total and scatter it (same distribution, fewer numbers)
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
                    if config.second_domain_fraction > 0:
                        lam += expected_counts(
                            q[near_idx],
                            G[pts] @ second.T,
                            sigma[pts],
                            config.second_domain_fraction * amplitude[pts],
                            beam=beam,
                            rings=rings,
                        )
                    counts[np.ix_(sel, near_idx)] += rng.poisson(lam.astype(np.float64))
                    for j in saturated:  # count-rate saturation: the peak reads one level
                        for k in np.flatnonzero(pts == j):
                            peak = near_idx[lam[k] >= 0.5 * lam[k].max()]
                            counts[j - start, peak] = config.saturation_counts
                counts[:, hot] = rng.poisson(config.hot_counts, size=(m, int(hot.sum())))
                counts[:, dead] = 0
                counts[:, gap] = 0
                np.minimum(counts, vmax, out=counts)
                total_counts += int(counts.sum())
                counts[:, flagged] = vmax
                a, b = start - p0, stop - p0
                if config.frames_4d:
                    a, b = a // row, b // row
                dset[a:b] = counts.astype(dtype).reshape(b - a, *dset.shape[1:])
        if config.xrf_spectra:
            flux = io / config.monitor_counts
            xrf_data = _xrf_spectra(config, config.xrf_counts * xrf * flux, flux, rng)
        else:
            xrf_data = rng.poisson(
                config.xrf_counts * xrf * io / config.monitor_counts + config.xrf_background
            ).astype(np.float64)
        mask = None
        if "mask" in names:
            mask = (MASK_GAP * gap + MASK_DEFECT * flagged).astype(np.uint32).reshape(shape)
        scan_id = _scan_id(config, particle_index, angle_index)
        positions_um = None
        if positions is not None:
            positions_um = _scan_origin_um(config) + positions * np.asarray(config.scan_step_um)
        for f, (p0, p1) in zip(files, parts, strict=True):
            part = {"monitor": io[p0:p1].astype(np.float64), "xrf": xrf_data[p0:p1]}
            if positions_um is not None:
                part["position_y"], part["position_x"] = positions_um[p0:p1].T
            _write_part(f, config, part, angle=angle, scan_id=scan_id, mask=mask)
    return {"paths": paths, "angle": angle, "counts": total_counts}


def _write_dark(path: Path, config: SimulationConfig, dark: np.ndarray) -> None:
    rng = np.random.default_rng([config.seed, 104729])
    frames = rng.poisson(np.broadcast_to(dark, (10, dark.size))).reshape(10, *config.detector_shape)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset(datasets(config)["frames"], data=frames.astype(config.dtype))


def simulate_beamtime(
    out_dir: str | Path,
    config: SimulationConfig | None = None,
    *,
    scheduler: str | None = None,
    progress: bool = False,
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
    progress : bool
        Show a progress bar of the scans written (the CLI: on a terminal only).

    Returns
    -------
    Manifest
        The manifest written to ``out_dir / 'beamtime.toml'``.

    Examples
    --------
    >>> import tempfile
    >>> from spndi_dask.simulate import preset
    >>> m = simulate_beamtime(tempfile.mkdtemp(), preset("tiny", n_particles=1, n_angles=3))
    >>> [p.name for p in m.scans]
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
    gap, flagged = _detector_modules(config)
    names = datasets(config)
    sigma_ref = float(np.median(np.asarray(config.domain_types)[:, 3]))

    scans_toml = []
    tasks = []
    for i in range(config.n_particles):
        rng = np.random.default_rng([config.seed, i, 0])
        sp = make_particle(config, i, g0, rng=rng)
        grid = {}
        if config.fly_scan:  # the motor positions of the grid nodes the truth is given on
            origin = _scan_origin_um(config)
            for axis, key in enumerate(("scan_y_um", "scan_x_um")):
                nodes = np.arange(config.scan_shape[axis])
                grid[key] = origin[axis] + nodes * config.scan_step_um[axis]
        sp.save(
            out / "ground_truth" / f"{sp.name}.npz",
            angles=angles,
            G0=g0,
            d0=2 * np.pi / np.linalg.norm(g0),
            **grid,
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
            "gap": gap,
            "flagged": flagged,
            "saturated": _saturated_frames(config, i, sp.thickness),
            "sigma_ref": sigma_ref,
        }
        files = []
        for a in range(config.n_angles):
            names_a = _scan_files(config, sp.name, i, a)
            paths = [str(out / name) for name in names_a]
            tasks.append(dask.delayed(_write_scan, pure=False)(paths, config, i, a, fields))
            files.append(names_a if config.frames_per_file else names_a[0])
        ideal = not (config.scan_files or config.frames_per_file)
        entry = {
            "name": sp.name,
            "frames": f"raw/{sp.name}/angle_{{index:03d}}.h5" if ideal else files,
            "dataset": names["frames"],
            "monitor": names["monitor"],
            "xrf": names["xrf"],
            "angles_deg": [float(x) for x in angles],
            "scan_shape": list(config.scan_shape),
            "scan_step_um": list(config.scan_step_um),
        }
        if config.xrf_spectra:
            entry["xrf_window_kev"] = list(XRF_WINDOW_KEV)
            entry["xrf_energy"] = names["xrf_energy"]
        if config.fly_scan:
            entry["positions"] = {"y": names["position_y"], "x": names["position_x"], "units": "um"}
            entry["scan_order"] = "snake"
        if "mask" in names:
            entry["mask_dataset"] = names["mask"]
        if config.dark_counts > 0:
            entry["dark"] = "raw/dark.h5"
        scans_toml.append(entry)
    if config.dark_counts > 0:
        _write_dark(out / "raw" / "dark.h5", config, dark)

    if scheduler is None and active_client() is None:  # else: use the active client
        scheduler = "processes" if config.raw_bytes > 2**28 else "threads"
    logger.info(
        "simulating %d scans (%.2f GB raw) into %s", len(tasks), config.raw_bytes / 1e9, out
    )
    if scheduler is None:  # the active distributed client
        results = compute(tasks, progress=progress)
    elif progress:
        with ProgressBar():
            results = dask.compute(*tasks, scheduler=scheduler)
    else:
        results = dask.compute(*tasks, scheduler=scheduler)

    data = {
        "name": config.name,
        "output": "results",
        "geometry": geometry.to_dict(),
        "scans": scans_toml,
        "features": {"max_epochs": config.train_epochs},
    }
    dtype = np.dtype(config.dtype)
    if config.flagged_pixels and dtype.kind in "ui":
        data["ingest"] = {"invalid_value": int(np.iinfo(dtype).max)}
    if config.saturated_frames:
        data["reduce"] = {"saturation": float(config.saturation_counts)}
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
