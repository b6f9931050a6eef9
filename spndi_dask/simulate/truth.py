"""How close a reduce result is to the simulated ground truth (tests, benchmarks, examples).

Examples
--------
>>> sorted(TRUTH_ERRORS)
['coverage', 'd', 'drift', 'tilt_x', 'tilt_y']
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "SIGMA_QUANTITIES",
    "TRUTH_ERRORS",
    "cluster_ari_vs_truth",
    "errors_vs_truth",
    "sigma_z_vs_truth",
]

#: What :func:`errors_vs_truth` returns, in words.
TRUTH_ERRORS = {
    "d": "RMS relative error of the d-spacing inside the particle",
    "tilt_x": "RMS error of tilt_x (rad, crystal frame of the true reference) inside the particle",
    "tilt_y": "RMS error of tilt_y (rad) inside the particle",
    "drift": "largest error of the registered drift (scan pixels)",
    "coverage": "fraction of the particle's pixels with a valid result",
}


def errors_vs_truth(
    results: Any, truth_file: str | Path, rocking_axis: str = "y+"
) -> dict[str, float]:
    """Errors of one particle's reduce result against ``ground_truth/<particle>.npz``.

    Parameters
    ----------
    results : xarray.Dataset
        The particle's node of ``results.zarr`` (:func:`~spndi_dask.io.results_store.open_results`):
        ``q_com`` (or ``q_fit`` where the peaks were fitted), ``d_spacing``, ``valid`` and
        ``drift``.
    truth_file : path
        The simulator's ground truth of that particle (``G``, ``G0``, ``particle_mask``,
        ``drift`` on the regular scan grid).
    rocking_axis : str
        The rocking axis the beamtime was simulated with.

    Returns
    -------
    dict
        :data:`TRUTH_ERRORS` (inside = the true particle where the result is valid).
    """
    from spndi_dask.geometry import crystal_frame, strain_tilt

    gt = np.load(truth_file)
    frame = crystal_frame(gt["G0"], rocking_axis)
    centre = "q_fit" if "q_fit" in results else "q_com"  # the one the maps were made from
    ours = strain_tilt(np.asarray(results[centre].values), frame)
    true = strain_tilt(gt["G"], frame)
    inside = gt["particle_mask"] & np.asarray(results["valid"].values)
    d_true = 2 * np.pi / np.linalg.norm(gt["G"], axis=-1)
    rel = (np.asarray(results["d_spacing"].values) - d_true) / d_true

    def rms(e: np.ndarray) -> float:
        return float(np.sqrt(np.mean(e[inside] ** 2)))

    return {
        "d": rms(rel),
        "tilt_x": rms(ours["tilt_x"] - true["tilt_x"]),
        "tilt_y": rms(ours["tilt_y"] - true["tilt_y"]),
        "drift": float(np.abs(np.asarray(results["drift"].values) - gt["drift"]).max()),
        "coverage": float(inside.sum() / gt["particle_mask"].sum()),
    }


#: The maps with a ``<name>_sigma`` standard error that :func:`sigma_z_vs_truth` checks.
SIGMA_QUANTITIES = ("d_spacing", "strain", "tilt_x", "tilt_y")


def sigma_z_vs_truth(
    results: Any, truth_file: str | Path, rocking_axis: str = "y+"
) -> dict[str, dict[str, float]]:
    """How well the reduce result's standard errors describe its errors against the truth.

    Per quantity of :data:`SIGMA_QUANTITIES`, ``z = (estimate − truth) / sigma`` over the true
    particle's valid pixels. Strain and tilts of the truth are taken against the result's own
    reference vector (``reference_q``), as reduce computes them, so ``z`` measures the
    per-pixel error alone. Calibrated standard errors give ``rms ≈ 1``; ``mean`` shows a bias.
    The counting statistics leave out the spatial resolution: a scan pixel's pattern mixes its
    neighbours' (probe size, the drift's bilinear shift), which biases it where the true ``G``
    changes from pixel to pixel (grain boundaries). ``rms_smooth`` is the RMS z over the half
    of the pixels where ``G`` changes least to its 8 neighbours.

    Parameters
    ----------
    results : xarray.Dataset
        The particle's node of ``results.zarr`` (with ``*_sigma``, ``reference_q``, ``valid``).
    truth_file : path
        ``ground_truth/<particle>.npz`` of the simulator (``G``, ``particle_mask``).
    rocking_axis : str
        The rocking axis the beamtime was simulated with.

    Returns
    -------
    dict
        ``{quantity: {"rms", "rms_smooth", "mean" (z), "sigma" (median), "n" (pixels)}}``.
    """
    from spndi_dask.geometry import crystal_frame, strain_tilt

    gt = np.load(truth_file)
    frame = crystal_frame(np.asarray(results["reference_q"].values), rocking_axis)
    true = strain_tilt(gt["G"], frame)
    inside = gt["particle_mask"] & np.asarray(results["valid"].values)
    g = np.pad(gt["G"], ((1, 1), (1, 1), (0, 0)), mode="edge")
    ny, nx = inside.shape
    change = np.max(
        [
            np.linalg.norm(g[1 + dy : 1 + dy + ny, 1 + dx : 1 + dx + nx] - gt["G"], axis=-1)
            for dy in (-1, 0, 1)
            for dx in (-1, 0, 1)
        ],
        axis=0,
    )
    smooth = inside & (change <= np.median(change[inside])) if inside.any() else inside
    out = {}
    for name in SIGMA_QUANTITIES:
        sigma = np.asarray(results[f"{name}_sigma"].values)[inside]
        z = (np.asarray(results[name].values)[inside] - true[name][inside]) / sigma
        out[name] = {
            "rms": float(np.sqrt(np.mean(z**2))),
            "rms_smooth": float(np.sqrt(np.mean(z[smooth[inside]] ** 2))),
            "mean": float(np.mean(z)),
            "sigma": float(np.median(sigma)),
            "n": int(inside.sum()),
        }
    return out


def cluster_ari_vs_truth(manifest: Any, truth_dir: str | Path) -> float:
    """Adjusted Rand index of the clusters of all scans against the true domains.

    Pixels inside particles (``cluster >= 0``) of every scan of ``manifest``, pooled; the true
    domain boundaries (a boundary pixel's probe sees two domains) are left out. ``truth_dir``
    holds ``<particle>.npz`` with ``domain`` and ``boundary`` (``spndi simulate``'s
    ``ground_truth/``). Chance agreement is ≈ 0, identical partitions 1.
    """
    from sklearn.metrics import adjusted_rand_score

    from spndi_dask.io.results_store import open_results

    got, truth, boundary = [], [], []
    for p in manifest.scans:
        ds = open_results(manifest.output_dir, p.name)
        gt = np.load(Path(truth_dir) / f"{p.name}.npz")
        sel = ds["cluster"].values >= 0
        got.append(ds["cluster"].values[sel])
        truth.append(gt["domain"][sel])
        boundary.append(gt["boundary"][sel])
    g, t, b = (np.concatenate(v) for v in (got, truth, boundary))
    return float(adjusted_rand_score(t[~b], g[~b]))
