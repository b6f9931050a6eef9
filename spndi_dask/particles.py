"""Particles: segmentation of every scan, per-particle statistics, ``particles.csv`` and figures.

``spndi stats beamtime.toml`` runs :func:`stats` after ``reduce``: each scan is segmented into
particle labels (automatic, or the manifest's ``mask``), ``label`` is added to the scan's node
of ``results.zarr``, statistics of every map for every label are computed lazily for all scans
in one dask graph and written to ``<output>/particles.csv`` (and the node's attrs), and the
figures go to ``<output>/figures/``.

Segmentation (:func:`segment_image`), documented choices:

1. the image (ROI-integrated Bragg intensity, or the drift-registered mean XRF map) is smoothed
   by a Gaussian of ``smooth_sigma`` scan pixels (the probe size);
2. a global threshold (Otsu by default; Li or triangle) separates particle from background;
   a scan whose brighter class is not above the background by 5 robust standard deviations, or
   whose pixels lack Bragg signal, has no particle;
3. ``edge_fraction``: the histogram threshold only separates the classes; Otsu's level lies
   about half-way up the particle and cuts the probe-blurred rim off (IoU ≈ 0.88 on the
   simulated beamtime). The outline is drawn instead at ``background + edge_fraction ×
   (particle median − background)`` (class medians from the threshold): the rim of a
   lens-shaped particle is about 60 % of its median thickness and the blurred step crosses
   half of that, 0.3 (IoU ≥ 0.95 against the true masks, tested);
4. holes are filled and objects below ``min_size`` pixels removed;
5. connected components (4-connectivity) get labels; ``split_touching`` separates particles that
   touch at a neck (watershed of the distance transform from its h-maxima, h = 2 px), so a
   satellite touching the main particle gets its own label;
6. an optional ``erosion`` margin keeps the statistics away from the particle edges;
7. labels are numbered by decreasing area (1 = the largest particle of the scan).
"""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path
from typing import Any

import dask
import numpy as np
import tifffile
import xarray as xr
from scipy import ndimage
from skimage import filters
from skimage.morphology import disk, h_maxima
from skimage.segmentation import watershed

from spndi_dask import plot
from spndi_dask._deprecate import renamed_keyword
from spndi_dask._version import __version__
from spndi_dask.compute import compute_each
from spndi_dask.config import Manifest, SegmentSettings
from spndi_dask.io.integrity import DamagedStoreError
from spndi_dask.io.layout import atomic_path
from spndi_dask.io.raw_store import open_raw
from spndi_dask.io.results_store import open_results, write_map
from spndi_dask.io.sources import SourceError
from spndi_dask.kernels import shift_maps
from spndi_dask.stages import Outcome, StageError
from spndi_dask.units import column, shown_row, stored_unit_table

__all__ = [
    "MAPS",
    "SEM",
    "SIGMA_MAPS",
    "STATS",
    "ParticleError",
    "label_stats",
    "read_user_mask",
    "segment_image",
    "stats",
]

logger = logging.getLogger(__name__)

#: Maps summarised per particle, in table order.
MAPS = ("d_spacing", "strain", "tilt_x", "tilt_y", "width_x", "width_y", "width_z", "intensity")
#: Statistics of every map (columns ``<map>_<stat>`` of ``particles.csv``).
STATS = ("mean", "std", "median", "p5", "p25", "p75", "p95")
#: Maps with per-pixel standard errors (``<map>_sigma`` from reduce), and the two standard errors
#: of their particle mean: ``<map>_sem`` = std / √n from the pixel-to-pixel scatter (real
#: variation and noise: the uncertainty of the mean as a sample of the particle's pixels), and
#: ``<map>_sem_counting`` = √(Σ σ²) / n from the counting statistics alone (the error of the
#: mean of exactly these pixels; pixels taken as independent).
SIGMA_MAPS = ("d_spacing", "strain", "tilt_x", "tilt_y")
SEM = ("sem", "sem_counting")
_PERCENTILES = {"p5": 5, "p25": 25, "median": 50, "p75": 75, "p95": 95}


class ParticleError(StageError, ValueError):
    """A segmentation input that cannot be used (message names the file/field and the fix)."""


# -- segmentation (NumPy) ---------------------------------------------------------------------
def _threshold(image: np.ndarray, method: str) -> float:
    fn = {
        "otsu": filters.threshold_otsu,
        "li": filters.threshold_li,
        "triangle": filters.threshold_triangle,
    }[method]
    return float(fn(image))


def _find(root: list[int], i: int) -> int:
    """Union-find root with path halving."""
    while root[i] != i:
        root[i] = root[root[i]]
        i = root[i]
    return i


def _split_touching(labels: np.ndarray, neck: float = 0.6) -> np.ndarray:
    """Split each region at necks narrower than ``neck`` × the smaller side's half-width.

    The distance transform's maxima seed a watershed; neighbouring basins are merged back
    (highest saddle first) unless the saddle between them is below ``neck`` times the lower of
    their peaks — a real neck between two particles, not the wobble of one irregular outline.
    """
    out = np.zeros_like(labels)
    n = 0
    for region in range(1, labels.max() + 1):
        mask = labels == region
        if not mask.any():
            continue
        dist = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
        peaks, n_peaks = ndimage.label(h_maxima(dist, 1.0) & mask)
        if n_peaks <= 1:
            n += 1
            out[mask] = n
            continue
        parts = watershed(-dist, peaks, mask=mask)
        peak = ndimage.maximum(dist, parts, index=np.arange(n_peaks + 1))
        saddles: dict[tuple[int, int], float] = {}
        for a, b, da_, db_ in (
            (parts[:, :-1], parts[:, 1:], dist[:, :-1], dist[:, 1:]),
            (parts[:-1], parts[1:], dist[:-1], dist[1:]),
        ):
            sel = (a != b) & (a > 0) & (b > 0)
            for pa, pb, v in zip(a[sel], b[sel], np.minimum(da_[sel], db_[sel]), strict=True):
                key = (min(pa, pb), max(pa, pb))
                saddles[key] = max(saddles.get(key, 0.0), float(v))
        root = list(range(n_peaks + 1))
        for (pa, pb), v in sorted(saddles.items(), key=lambda kv: -kv[1]):
            ra, rb = _find(root, pa), _find(root, pb)
            if ra != rb and v >= neck * min(peak[ra], peak[rb]):
                root[rb] = ra
                peak[ra] = max(peak[ra], peak[rb])
        groups = np.array([_find(root, i) for i in range(n_peaks + 1)])[parts]
        for g in np.unique(groups[mask]):
            n += 1
            out[mask & (groups == g)] = n
    return out


def _order_by_area(labels: np.ndarray, min_size: int) -> np.ndarray:
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    keep = [k for k in np.argsort(-sizes, kind="stable") if k and sizes[k] >= min_size]
    lut = np.zeros(len(sizes), np.int32)
    lut[keep] = np.arange(1, len(keep) + 1)
    return lut[labels]


def _erode_labels(labels: np.ndarray, margin: int) -> np.ndarray:
    if margin <= 0:
        return labels
    fp = disk(margin)
    pad = np.pad(labels, margin)
    same = ndimage.minimum_filter(pad, footprint=fp) == ndimage.maximum_filter(pad, footprint=fp)
    return np.where(same[margin:-margin, margin:-margin], labels, 0)


def segment_image(
    image: np.ndarray,
    *,
    valid: np.ndarray | None = None,
    method: str = "otsu",
    smooth_sigma: float = 0.5,
    edge_fraction: float | None = 0.3,
    split_touching: bool = True,
    min_size: int = 20,
    erosion: int = 0,
) -> np.ndarray:
    """Particle labels of one scan image (0 = background, 1 = largest particle, ...).

    Parameters
    ----------
    image : array (ny, nx)
        Bright particles on a dark background; NaN counts as background.
    valid : bool array (ny, nx), optional
        Pixels with signal (reduce's ``valid``); a particle must be mostly valid.
    method, smooth_sigma, edge_fraction, split_touching, min_size, erosion
        See :class:`~spndi_dask.config.SegmentSettings` and the module docstring.

    Returns
    -------
    numpy.ndarray (ny, nx), int32

    Examples
    --------
    Two discs, one touching the other at a narrow neck:

    >>> yy, xx = np.mgrid[:40, :60]
    >>> img = ((yy - 20) ** 2 + (xx - 20) ** 2 < 12**2) | ((yy - 20) ** 2 + (xx - 39) ** 2 < 8**2)
    >>> labels = segment_image(img.astype(float), smooth_sigma=0)
    >>> int(labels.max()), int((labels == 1).sum()) > int((labels == 2).sum())
    (2, True)
    """
    img = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    if smooth_sigma > 0:
        img = ndimage.gaussian_filter(img, smooth_sigma)
    empty = np.zeros(img.shape, np.int32)
    if not np.isfinite(img).all() or np.ptp(img) == 0:
        return empty
    t = _threshold(img, method)
    fg = img > t
    bg_values = img[~fg]
    if not bg_values.size or not fg.any():
        return empty
    bg = float(np.median(bg_values))
    level = float(np.median(img[fg]))
    noise = 1.4826 * float(np.median(np.abs(bg_values - bg)))
    if level - bg < 5 * max(noise, 1e-12 * max(abs(level), 1.0)):
        return empty  # no class clearly above the background: no particle
    if edge_fraction is not None:
        fg = img > bg + edge_fraction * (level - bg)
    fg = ndimage.binary_fill_holes(fg)
    labels, _ = ndimage.label(fg)
    labels = _order_by_area(labels, min_size)
    if split_touching and labels.max():
        labels = _order_by_area(_split_touching(labels), min_size)
    if valid is not None:  # drop objects that are mostly without Bragg signal
        v = np.asarray(valid, bool)
        for k in range(1, labels.max() + 1):
            region = labels == k
            if v[region].mean() < 0.5:
                labels[region] = 0
        labels = _order_by_area(labels, min_size)
    return _order_by_area(_erode_labels(labels, erosion), 1)


def read_user_mask(path: str | Path, *, particle: str, shape: tuple[int, int]) -> np.ndarray:
    """Labels from a user mask (TIFF or .npy; nonzero = particle; integer values > 1 = labels).

    A binary mask is split into connected components; the labels are renumbered by area.
    """
    path = Path(path)
    if not path.exists():
        raise ParticleError(
            f"scan '{particle}': mask file {path} does not exist; fix [[scans]] mask"
        )
    try:
        if path.suffix.lower() == ".npy":
            mask = np.load(path, allow_pickle=False)
        else:
            mask = tifffile.imread(path)
    except Exception as exc:
        raise ParticleError(
            f"scan '{particle}': cannot read mask {path} ({exc}); use a TIFF or .npy image"
        ) from None
    mask = np.squeeze(np.asarray(mask))
    if mask.shape != tuple(shape):
        raise ParticleError(
            f"scan '{particle}': mask {path} has shape {list(mask.shape)} but the scan is "
            f"{list(shape)} (rows, cols); make the mask on the scan grid"
        )
    values = np.unique(mask[mask != 0])
    if len(values) > 1 and np.issubdtype(mask.dtype, np.integer):
        labels = np.searchsorted(values, mask) + 1
        labels[mask == 0] = 0
    else:
        labels, _ = ndimage.label(mask != 0)
    return _order_by_area(labels, 1)


# -- statistics (NumPy) -----------------------------------------------------------------------
def _corr(a: np.ndarray, b: np.ndarray) -> float:
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3 or np.std(a[ok]) == 0 or np.std(b[ok]) == 0:
        return math.nan
    return float(np.corrcoef(a[ok], b[ok])[0, 1])


def label_stats(
    maps: dict[str, np.ndarray],
    labels: np.ndarray,
    *,
    valid: np.ndarray,
    pixel_area_um2: float,
    y_um: np.ndarray,
    x_um: np.ndarray,
) -> list[dict[str, Any]]:
    """Statistics of every map over every label's valid pixels (one dict per label).

    Keys: ``label, pixels, valid_pixels, area_um2, centroid_y_um, centroid_x_um``,
    ``<map>_<stat>`` for :data:`MAPS` × :data:`STATS`, ``<map>_sem`` and ``<map>_sem_counting``
    for :data:`SIGMA_MAPS` (:data:`SEM`; the latter NaN without ``<map>_sigma`` in ``maps``),
    ``corr_strain_tilt_x``, ``corr_strain_tilt_y`` (Pearson, over the label's valid pixels).
    """
    rows = []
    yy, xx = np.meshgrid(y_um, x_um, indexing="ij")
    for k in range(1, int(labels.max()) + 1):
        region = labels == k
        use = region & valid
        row: dict[str, Any] = {
            "label": k,
            "pixels": int(region.sum()),
            "valid_pixels": int(use.sum()),
            "area_um2": float(region.sum() * pixel_area_um2),
            "centroid_y_um": float(yy[region].mean()),
            "centroid_x_um": float(xx[region].mean()),
        }
        for name in MAPS:
            v = maps[name][use]
            v = v[np.isfinite(v)]
            if v.size:
                pct = np.percentile(v, list(_PERCENTILES.values()))
                row[f"{name}_mean"] = float(v.mean())
                row[f"{name}_std"] = float(v.std(ddof=1)) if v.size > 1 else 0.0
                for key, value in zip(_PERCENTILES, pct, strict=True):
                    row[f"{name}_{key}"] = float(value)
            else:
                row.update({f"{name}_{s}": math.nan for s in STATS})
            if name in SIGMA_MAPS:
                ok = use & np.isfinite(maps[name])
                n = int(ok.sum())
                row[f"{name}_sem"] = row[f"{name}_std"] / math.sqrt(n) if n else math.nan
                sigma = maps.get(f"{name}_sigma")
                counting = math.nan
                if sigma is not None and n:
                    counting = np.sqrt(np.sum(sigma[ok] ** 2)) / n
                row[f"{name}_sem_counting"] = float(counting)
        row["corr_strain_tilt_x"] = _corr(maps["strain"][use], maps["tilt_x"][use])
        row["corr_strain_tilt_y"] = _corr(maps["strain"][use], maps["tilt_y"][use])
        rows.append(row)
    return rows


#: Columns of ``particles.csv`` in order: ``scan`` (the manifest entry), ``label`` (the
#: particle's number in the scan's ``label`` map), then :func:`label_stats`'s keys in the
#: shown units (:func:`spndi_dask.units.column`: ``tilt_x_mean_mrad``, ``d_spacing_p5_A``).
COLUMNS = (
    "scan",
    "label",
    "pixels",
    "valid_pixels",
    "area_um2",
    "centroid_y_um",
    "centroid_x_um",
    *(column(m, s) for m in MAPS for s in STATS),
    *(column(m, s) for m in SIGMA_MAPS for s in SEM),
    "corr_strain_tilt_x",
    "corr_strain_tilt_y",
    "warning",
)


def _scan_summary(
    maps: dict[str, np.ndarray],
    rocking: np.ndarray,
    labels: np.ndarray,
    valid: np.ndarray,
    meta: dict[str, Any],
) -> dict[str, Any]:
    rows = label_stats(
        maps,
        labels,
        valid=valid,
        pixel_area_um2=meta["pixel_area_um2"],
        y_um=meta["y"],
        x_um=meta["x"],
    )
    curves = [
        np.nansum(np.where(labels == k, rocking, 0.0), axis=(1, 2))
        for k in range(1, int(labels.max()) + 1)
    ]
    # mean per pixel (the original study's rocking curve) over pixels with a curve at all angles
    complete = np.isfinite(rocking).all(axis=0)
    means = []
    for k in range(1, int(labels.max()) + 1):
        use = (labels == k) & complete
        means.append(np.where(use, rocking, 0.0).sum(axis=(1, 2)) / np.maximum(use.sum(), 1))
    return {"rows": rows, "curves": curves, "mean_curves": means}


# -- orchestration ----------------------------------------------------------------------------
def _segment_scan(
    manifest: Manifest, name: str, ds: xr.Dataset, settings: SegmentSettings
) -> tuple[np.ndarray, str]:
    """Labels of a scan and how they were made."""
    particle = manifest.scan(name)
    shape = (ds.sizes["y"], ds.sizes["x"])
    if particle.mask:
        path = manifest.resolve(particle.mask)
        return read_user_mask(path, particle=name, shape=shape), f"user mask {particle.mask}"
    valid = np.asarray(ds["valid"].values, bool)
    if settings.source == "xrf":
        raw = open_raw(manifest.output_dir, name)
        xrf = np.asarray(raw["xrf"].values, np.float64)
        if not np.isfinite(xrf).any() or not np.nanmax(np.abs(xrf)):
            raise ParticleError(
                f"scan '{name}': [segment] source = 'xrf' but the scan has no XRF signal; "
                "set xrf in the manifest or use source = 'intensity'"
            )
        image = np.nanmean(shift_maps(xrf, np.asarray(ds["drift"].values), fill=np.nan), axis=0)
        valid = None  # XRF sees particles whatever their diffraction
    else:
        image = np.asarray(ds["intensity"].values, np.float64)
    labels = segment_image(
        image,
        valid=valid,
        method=settings.method,
        smooth_sigma=settings.smooth_sigma,
        edge_fraction=settings.edge_fraction,
        split_touching=settings.split_touching,
        min_size=settings.min_size,
        erosion=settings.erosion,
    )
    return labels, f"{settings.source} {settings.method}"


def _fingerprint(manifest: Manifest, name: str, ds: xr.Dataset) -> str:
    mask = manifest.scan(name).mask
    mask_stat = None
    if mask:
        p = manifest.resolve(mask)
        mask_stat = [str(p), p.stat().st_size, p.stat().st_mtime_ns] if p.exists() else str(p)
    key = {
        "reduce": ds.attrs.get("spndi_dask", {}).get("fingerprint"),
        "segment": manifest.segment.model_dump(mode="json"),
        "mask": mask_stat,
        "version": __version__,
    }
    return dask.base.tokenize(json.dumps(key, sort_keys=True, default=str))


def _write_labels(node: Path, labels: np.ndarray, info: dict[str, Any]) -> None:
    """Add ``label(y, x)`` to a particle's results node; the info attrs mark it complete."""
    write_map(
        node,
        "label",
        labels.astype(np.int32),
        stage="particles",
        long_name="particle label (0 = background)",
        fill_value=0,
        info=info,
    )


def _read_table(path: Path) -> dict[str, list[dict[str, str]]]:
    if not path.exists():
        return {}
    if stored_unit_table(path):  # old column names, tilts in rad: redo the scans
        logger.info("%s has the old column names (before one unit per quantity); redoing it", path)
        return {}
    out: dict[str, list[dict[str, str]]] = {}
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            if "scan" not in row and "particle" in row:  # written before the column was "scan"
                row = {"scan": row.pop("particle"), **row}
            out.setdefault(row["scan"], []).append(row)
    return out


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.9g}"
    return v


def _write_table(path: Path, order: list[str], rows: dict[str, list[dict[str, Any]]]) -> None:
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(COLUMNS), extrasaction="ignore")
        writer.writeheader()
        for name in order:
            for row in rows.get(name, []):
                writer.writerow({k: _fmt(row.get(k, "")) for k in COLUMNS})


@renamed_keyword(particles="scans")
def stats(
    manifest: Manifest,
    *,
    scans: list[str] | None = None,
    force: bool = False,
    figures: bool = True,
) -> dict[str, dict[str, Any]]:
    """Segment every reduced scan, write ``label``, ``particles.csv`` and the figures.

    Parameters
    ----------
    manifest : Manifest
    scans : list of str, optional
        Scans to (re)process; default all. The table keeps the rows of the others.
    force : bool
        Redo scans whose labels are up to date.
    figures : bool
        Write the figures to ``<output>/figures/``.

    Returns
    -------
    dict
        Per scan: ``status`` ('done', 'up to date', 'no particle' or 'failed'), ``labels``
        (number of particles), ``method``, ``error``/``warning``.
    """
    root = manifest.layout.results
    order = [p.name for p in manifest.scans]
    wanted = manifest.select_scans(scans, error=ParticleError)
    table_path = manifest.layout.particles_csv
    table = _read_table(table_path)
    summary: dict[str, dict[str, Any]] = {}
    jobs: dict[str, Any] = {}
    opened: dict[str, tuple[xr.Dataset, np.ndarray]] = {}
    for name in order:
        try:
            ds = open_results(manifest.output_dir, name)
        except (FileNotFoundError, ValueError) as exc:  # incomplete: a StageError too
            if name in wanted:
                logger.error("scan '%s': %s", name, exc)
                summary[name] = {
                    "status": Outcome.FAILED,
                    "error": f"{exc}; run `spndi reduce` first",
                }
            continue
        fp = _fingerprint(manifest, name, ds)
        info = ds.attrs.get("particles", {})
        current = info.get("fingerprint") == fp and "label" in ds and name in table
        if current and (not force or name not in wanted):
            try:
                opened[name] = (ds, np.asarray(ds["label"].values))
            except DamagedStoreError as exc:
                logger.error("scan '%s': %s", name, exc)
                if name in wanted:
                    summary[name] = {"status": Outcome.FAILED, "error": str(exc)}
                continue
            if name in wanted:
                summary[name] = {
                    "status": Outcome.UP_TO_DATE,
                    "labels": int(info.get("n_labels", 0)),
                }
            continue
        if name not in wanted:
            continue
        try:
            labels, how = _segment_scan(manifest, name, ds, manifest.segment)
        except (ParticleError, SourceError, OSError, DamagedStoreError) as exc:
            logger.error("%s", exc)
            summary[name] = {"status": Outcome.FAILED, "error": str(exc)}
            continue
        opened[name] = (ds, labels)
        summary[name] = {"status": Outcome.DONE, "labels": int(labels.max()), "method": how}
        y, x = np.asarray(ds["y"].values), np.asarray(ds["x"].values)
        dy = float(np.median(np.diff(y))) if len(y) > 1 else 1.0
        dx = float(np.median(np.diff(x))) if len(x) > 1 else 1.0
        meta = {"pixel_area_um2": abs(dy * dx), "y": y, "x": x}
        maps = {m: ds[m].data for m in MAPS}
        # results reduced before the standard errors existed have no *_sigma (NaN columns)
        maps |= {f"{m}_sigma": ds[f"{m}_sigma"].data for m in SIGMA_MAPS if f"{m}_sigma" in ds}
        jobs[name] = (
            dask.delayed(_scan_summary)(
                maps, ds["rocking_curve"].data, labels, ds["valid"].data, meta
            ),
            fp,
            how,
        )
    if jobs:
        results = compute_each([j[0] for j in jobs.values()])
        for (name, (_, fp, how)), (result, exc) in zip(jobs.items(), results, strict=True):
            if exc is not None:  # one bad scan (a damaged map) never stops the others
                logger.error("scan '%s': %s", name, exc)
                summary[name] = {"status": Outcome.FAILED, "error": str(exc)}
                opened.pop(name, None)
                continue
            ds, labels = opened[name]
            rows = [{"scan": name, **shown_row(r)} for r in result["rows"]]
            if not rows:
                msg = "no particle found in the scan"
                logger.warning("scan '%s': %s (check [segment] or give a mask)", name, msg)
                rows = [{"scan": name, "label": "", "pixels": 0, "warning": msg}]
                summary[name].update(status=Outcome.NO_PARTICLE, warning=msg)
            table[name] = rows
            info = {
                "fingerprint": fp,
                "method": how,
                "n_labels": int(labels.max()),
                "settings": manifest.segment.model_dump(mode="json"),
                "version": __version__,
                "stats": [{k: _fmt(v) for k, v in r.items()} for r in result["rows"]],
                "rocking_curves": [c.tolist() for c in result["curves"]],
                "rocking_curves_mean": [c.tolist() for c in result["mean_curves"]],
            }
            _write_labels(root / name, labels, info)
    table = {k: v for k, v in table.items() if k in opened or k not in order}
    _write_table(table_path, order, table)
    fig_dir = manifest.layout.figures
    stale = bool(jobs) or not (fig_dir / "beamtime_overview.png").exists()
    if figures and opened and stale:
        written = plot.particle_figures(
            {n: open_results(manifest.output_dir, n) for n in order if n in opened},
            fig_dir,
        )
        for name in summary:
            summary[name].setdefault("figures", sum(p.name.startswith(f"{name}_") for p in written))
    return summary
