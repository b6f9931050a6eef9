"""The original study's comparison figures: data kernels, one lazy reduction, matplotlib figures.

* :func:`centred_values` and :func:`centred_kde_figure`: per scan the joint density of tilt
  vs d-spacing of its particle pixels, centred on their mean, on one fixed scale for all scans,
  with marginal densities, one panel per scan in one figure (``SPNDI_statistics``
  "bias value … jointplot");
* :func:`cluster_detector_images` and :func:`detector_images_figure`: each cluster's mean
  detector image, averaged over the rocking angle and the cluster's scan pixels
  (``Diffraction_pattern_visualization`` projection), from the raw frames.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr
from scipy.stats import gaussian_kde

from spndi_dask.plot import _save, plt
from spndi_dask.units import shown, unit

__all__ = [
    "centred_kde_figure",
    "centred_values",
    "cluster_detector_images",
    "detector_images_figure",
]


# -- kernels ------------------------------------------------------------------------------------
def centred_values(
    d_spacing: np.ndarray, tilt: np.ndarray, inside: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``(d − mean d, tilt − mean tilt)`` over the pixels ``inside`` where both are finite.

    Examples
    --------
    >>> dd, dt = centred_values(np.array([4.0, 4.2, 9.0]), np.array([0.1, 0.3, 1.0]),
    ...                         np.array([True, True, False]))
    >>> np.round(dd, 6).tolist(), np.round(dt, 6).tolist()
    ([-0.1, 0.1], [-0.1, 0.1])
    """
    ok = np.asarray(inside, bool) & np.isfinite(d_spacing) & np.isfinite(tilt)
    d, t = np.asarray(d_spacing, float)[ok], np.asarray(tilt, float)[ok]
    return d - d.mean(), t - t.mean()


def _detector_block(frames: np.ndarray, groups: np.ndarray, n_groups: int) -> np.ndarray:
    """``(1, 1, 1, n_groups, r·c + 1)``: per group Σ over angle and pixels, and pixel-angles."""
    a, ny, nx, r, c = frames.shape
    g = np.asarray(groups).reshape(-1)
    out = np.zeros((n_groups, r * c + 1))
    ok = g >= 0
    if ok.any():
        summed = frames.sum(axis=0, dtype=np.float64).reshape(ny * nx, r * c)
        onehot = np.zeros((n_groups, ny * nx))
        onehot[g[ok], np.flatnonzero(ok)] = 1.0
        out[:, :-1] = onehot @ summed
        out[:, -1] = onehot.sum(axis=1) * a
    return out[None, None, None]


# -- lazy layer ---------------------------------------------------------------------------------
def cluster_detector_images(frames: da.Array, clusters: Any, n_groups: int) -> da.Array:
    """Lazy ``(n_groups, det_row, det_col)``: each group's mean frame over angles and pixels.

    ``frames (angle, y, x, det_row, det_col)`` as in ``raw.zarr``; ``clusters (y, x)`` a group
    per scan pixel (−1 = none). One task per frame block; a group without pixels is NaN.
    The frames are not drift-corrected: the scan grid of angle 0.
    """
    r, c = frames.shape[-2:]
    frames = frames.rechunk({3: -1, 4: -1})
    groups = da.asarray(clusters).rechunk(frames.chunks[1:3])
    parts = da.map_blocks(
        _detector_block,
        frames,
        groups[None, :, :, None, None],
        n_groups=n_groups,
        drop_axis=[3, 4],
        new_axis=[3, 4],
        chunks=(
            (1,) * len(frames.chunks[0]),
            (1,) * len(frames.chunks[1]),
            (1,) * len(frames.chunks[2]),
            (n_groups,),
            (r * c + 1,),
        ),
        dtype=np.float64,
        meta=np.empty((0,) * 5),
    )
    total = parts.sum(axis=(0, 1, 2))
    count = total[:, -1:]
    return (total[:, :-1] / da.where(count > 0, count, np.nan)).reshape(n_groups, r, c)


# -- figures ------------------------------------------------------------------------------------
def centred_kde_figure(
    datasets: dict[str, xr.Dataset],
    path: str | Path,
    *,
    tilt: str = "tilt_y",
    limits: tuple[float, float] | None = None,
    max_points: int = 4000,
    seed: int = 0,
) -> Path:
    """Joint density of ``tilt`` vs d-spacing per scan, centred, one scale, with marginals.

    ``limits``: half-ranges (Å, mrad) of the axes, the same for every scan (default: the
    99th percentile of the centred values pooled over all scans). Each scan's particle
    pixels (``label > 0``) form one panel.
    """
    rng = np.random.default_rng(seed)
    values = {}
    for name, ds in datasets.items():
        dd, dt = centred_values(
            ds["d_spacing"].values, ds[tilt].values, np.asarray(ds["label"].values) > 0
        )
        values[name] = (shown("d_spacing", dd), shown(tilt, dt))  # Å, mrad (spndi_dask.units)
    if limits is None:
        pooled = [np.concatenate([v[i] for v in values.values()]) for i in (0, 1)]
        limits = tuple(float(np.percentile(np.abs(p), 99)) if len(p) else 1.0 for p in pooled)  # type: ignore[assignment]
    lx, ly = (max(v, 1e-12) for v in limits)
    gx, gy = np.linspace(-lx, lx, 60), np.linspace(-ly, ly, 60)
    fig = plt.figure(figsize=(3.6 * len(values), 3.8))
    gs = fig.add_gridspec(
        2, 2 * len(values), width_ratios=(4, 1) * len(values), height_ratios=(1, 4)
    )
    for i, (name, (dd, dt)) in enumerate(values.items()):
        ax = fig.add_subplot(gs[1, 2 * i])
        top = fig.add_subplot(gs[0, 2 * i], sharex=ax)
        right = fig.add_subplot(gs[1, 2 * i + 1], sharey=ax)
        if len(dd) > max_points:
            pick = rng.choice(len(dd), max_points, replace=False)
            dd, dt = dd[pick], dt[pick]
        if len(dd) > 3 and np.ptp(dd) > 0 and np.ptp(dt) > 0:
            kde = gaussian_kde(np.vstack([dd, dt]))
            xx, yy = np.meshgrid(gx, gy)
            zz = kde(np.vstack([xx.ravel(), yy.ravel()])).reshape(xx.shape)
            ax.contourf(xx, yy, zz, levels=8, cmap="Blues")
            top.fill_between(gx, gaussian_kde(dd)(gx), color="C0", alpha=0.5)
            right.fill_betweenx(gy, gaussian_kde(dt)(gy), color="C0", alpha=0.5)
        ax.axhline(0, color="k", lw=0.5)
        ax.axvline(0, color="k", lw=0.5)
        ax.set_xlim(-lx, lx)
        ax.set_ylim(-ly, ly)
        ax.set_xlabel(f"d − mean d ({unit('d_spacing').shown})")
        ax.set_ylabel(f"{tilt} − mean ({unit(tilt).shown})")
        top.set_title(f"{name} ({len(dd)} px)", fontsize=9)
        top.axis("off")
        right.axis("off")
    return _save(fig, Path(path))


def detector_images_figure(images: np.ndarray, path: str | Path, *, title: str = "") -> Path:
    """One panel per cluster: its mean detector image over angles and pixels (log scale)."""
    k = images.shape[0]
    fig, axes = plt.subplots(1, k, figsize=(2.8 * k, 3), squeeze=False)
    for c, ax in enumerate(axes[0]):
        img = np.asarray(images[c], float)
        ax.imshow(np.log10(np.clip(img, 1e-3, None)), cmap="viridis")
        ax.set_title(f"cluster {c}", fontsize=9)
        ax.set_xlabel("det col")
        ax.set_ylabel("det row")
    fig.suptitle(title or "mean detector image per cluster (log10, averaged over angle)")
    return _save(fig, Path(path))
