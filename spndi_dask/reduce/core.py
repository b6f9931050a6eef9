"""Lazy reduction of ``raw.zarr`` into maps, rocking curves and q-grid patterns: orchestration.

Per particle, :func:`~spndi_dask.reduce.plan.plan_particle` decides everything that needs only
small arrays (detector projection recorded at ingest, monitor, XRF): hot/dead pixels, the Bragg
ROI, background, monitor normalisation and the scan drift.
:func:`~spndi_dask.reduce.maps.reduce_particle` then builds one lazy graph
(:mod:`spndi_dask.reduce.graph`) that reads every ROI voxel once, in blocks of ``(all angles,
scan tile, ROI)``, and produces

* per (angle, y, x) the additive moment sums of :data:`~spndi_dask.reduce._kernels.MOMENTS`
  (intensity, Σw·q, Σw·q·qᵀ, detector centre of mass), from which the per-angle maps are
  brought back to the reference scan grid (drift) and summed over angles;
* per (y, x) the drift-corrected 3D pattern resampled onto the beamtime's common crystal-frame
  q grid by a precomputed sparse trilinear operator. The sub-pixel drift shifts need a halo of
  scan points around each block: it comes from packed strips of the neighbouring tiles, never
  from another read, and the tiles are scheduled in raster order so a worker's memory does not
  grow with the scan.

Nothing is computed until :func:`reduce` writes ``<output>/results.zarr/<particle>`` (written
aside and published whole by :mod:`spndi_dask.io.results_store`). Particles whose inputs,
settings and grid are unchanged are skipped (:func:`_fingerprint`); with
``strain_reference = "beamtime_median"`` a second step refers every particle's strain and tilt
to the beamtime's median q.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Iterator
from contextlib import closing
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import dask
import numpy as np
import xarray as xr
import zarr
from zarr.codecs import BloscCodec

from spndi_dask._deprecate import renamed_keyword
from spndi_dask._version import __version__
from spndi_dask.compute import compute_as_completed, compute_each
from spndi_dask.config import Manifest
from spndi_dask.geometry import crystal_frame, strain_tilt
from spndi_dask.interrupt import check_interrupted, deferred
from spndi_dask.io.hashing import source_identity
from spndi_dask.io.integrity import damage_error, is_damage, read, writable
from spndi_dask.io.layout import OutputLayout, check_output
from spndi_dask.io.results_store import (
    is_current,
    publish,
    results_group,
    stored_q_grid,
    write_temporary,
)
from spndi_dask.io.sources import SourceError
from spndi_dask.reduce import _kernels as K
from spndi_dask.reduce.graph import _KEEP_PRIORITIES, _block_graph, _lazy_context
from spndi_dask.reduce.maps import QUALITY, reduce_particle
from spndi_dask.reduce.peakfit import failed_fits_note
from spndi_dask.reduce.plan import (
    BeamtimeGrid,
    ParticlePlan,
    ReduceError,
    _checked_drift,
    _other_plans,
    beamtime_grid,
    plan_particle,
)
from spndi_dask.stages import Outcome

__all__ = ["ReduceError", "reduce"]

logger = logging.getLogger(__name__)


def _fingerprint(manifest: Manifest, plan: ParticlePlan, grid: BeamtimeGrid) -> str:
    """What the reduce result of a particle depends on (raw sources, settings, grid, version)."""
    key = {
        "sources": [source_identity(s) for s in plan.raw_sources],
        "raw_layout": plan.raw_layout,
        "geometry": plan.geometry.to_dict(),
        "settings": manifest.reduce.model_dump(mode="json"),
        "dark": manifest.scan(plan.name).dark,
        "grid": grid.to_dict(),
        "version": __version__,
    }
    return dask.base.tokenize(json.dumps(key, sort_keys=True, default=str))


def _write_graph(
    ds: xr.Dataset, output_dir: str | Path, name: str, attrs: dict[str, Any]
) -> tuple[Any, Path]:
    """The lazy write of a particle's dataset next to ``results.zarr`` (marked incomplete).

    :func:`~spndi_dask.io.results_store.publish` marks it complete and moves it in, so a reader
    sees the previous complete result or the new complete one; a crash leaves only a temporary
    directory behind (removed by the next run).
    """
    encoding: dict[str, Any] = {}
    if "pattern" in ds:
        # one scan row of a tile per chunk: the output blocks' rows are moved by the drift halo
        # (see _block_graph), so only 1 divides them; their columns are whole tiles
        xtiles = ds["pattern"].chunks[1]
        encoding["pattern"] = {
            "chunks": (1, xtiles[0], *ds["pattern"].shape[2:]),
            # mostly zeros (clipped): byte shuffling only spreads them; lz4 of the plain floats
            # writes a 16 × 16 tile in 0.064 s and 1.6 MB per 4 MB (0.081 s and 2.0 MB shuffled)
            "compressors": [BloscCodec(cname="lz4", clevel=1, shuffle="noshuffle")],
        }
    with dask.config.set(_KEEP_PRIORITIES):  # da.store optimises its sources
        return write_temporary(ds, output_dir, name, attrs, encoding=encoding)


def _apply_beamtime_median(
    out: OutputLayout, names: list[str], rocking_axes: dict[str, str]
) -> None:
    """Strain and tilt of every particle relative to the beamtime's median q (second step)."""
    pooled = []
    for name in names:
        g = zarr.open_group(str(out.node(name)), mode="r")
        q = np.asarray(read(g[_centre(g)], (slice(None),) * 3))
        pooled.append(q[np.asarray(read(g["valid"], (slice(None),) * 2))])
    pooled = np.concatenate(pooled) if pooled else np.zeros((0, 3))
    if not len(pooled):
        return
    h = np.median(pooled, axis=0)
    for name in names:
        g = zarr.open_group(str(out.node(name)), mode="r+")
        frame = crystal_frame(h, rocking_axes[name])
        st = strain_tilt(np.asarray(g[_centre(g)][:]), frame)
        for key in ("strain", "tilt_x", "tilt_y"):  # a map of fill values is still written
            writable(g[key])[:] = st[key]
        writable(g["reference_q"])[:] = h
        g.attrs.update({"strain_reference": "beamtime_median"})


def _centre(group: zarr.Group) -> str:
    """The variable the maps of a stored result were made from: the fitted or moments' centre."""
    return "q_fit" if "q_fit" in group else "q_com"


def _saturation_note(tmp: Path, plan: ParticlePlan) -> str | None:
    """A warning on the saturated voxels of a written (unpublished) result, added to its attrs."""
    group = zarr.open_group(str(tmp), mode="r+")
    n = int(np.asarray(group["saturated_voxels"][...]).sum())
    if not n:
        return None
    quality = np.asarray(group["quality"][...])
    points = int(((quality & QUALITY["saturated"]) > 0).sum())
    note = (
        f"{n} detector values in the Bragg ROI were at or above the saturation level "
        f"{plan.saturation:g} counts and masked in their frames, at {points} scan pixels (flag "
        "'saturated' in `quality`, counts per angle in `saturated_voxels`): the intensity there "
        "is biased low; measure with less flux (attenuators, shorter count time), or set "
        "[reduce] saturation if that is not the detector's saturation level"
    )
    group.attrs.update({"warnings": [*group.attrs.get("warnings", []), note]})
    logger.warning("scan '%s': %s", plan.name, note)
    return note


def _explain_failure(manifest: Manifest, name: str, exc: BaseException) -> str:
    """The failure of one particle in words: a damaged store names the chunk and the fix."""
    if is_damage(exc):
        err = damage_error(exc)
        if err.damage:
            return str(err)
        store = manifest.layout.raw_node(name)
        return (
            f"the ingested frames of scan '{name}' cannot be decoded "
            f"({type(exc).__name__}: {exc}): a chunk of {store} is damaged; "
            f"`spndi verify {manifest.source}` finds it and marks it to be ingested again"
        )
    return f"{type(exc).__name__}: {exc}"


@renamed_keyword(particles="scans")
def reduce(
    manifest: Manifest,
    *,
    scans: list[str] | None = None,
    force: bool = False,
    progress: bool = False,
) -> dict[str, dict[str, Any]]:
    """Reduce every (or the named) ingested scan into ``<output>/results.zarr``.

    Parameters
    ----------
    manifest : Manifest
    scans : list of str, optional
        Names to reduce; default all.
    force : bool
        Recompute results that are up to date. The common q grid is remade only when every
        scan is reduced (a subset keeps the stored one, so patterns stay comparable).
    progress : bool
        Show a progress bar per scan.

    Returns
    -------
    dict
        Per scan: ``status`` ('reduced', 'up to date' or 'failed'), ``seconds`` (scans
        are reduced together: the wall time until its result was complete), ``roi``,
        ``drift_method``, ``valid_pixels``, ``warnings`` or ``error``.

    Examples
    --------
    >>> import tempfile
    >>> from spndi_dask.ingest import ingest
    >>> from spndi_dask.simulate import preset, simulate_beamtime
    >>> m = simulate_beamtime(tempfile.mkdtemp(), preset("tiny", n_particles=1))
    >>> _ = ingest(m)
    >>> reduce(m)["p1"]["status"]
    'reduced'
    >>> reduce(m)["p1"]["status"]
    'up to date'
    """
    settings = manifest.reduce
    wanted = manifest.select_scans(scans, error=ReduceError)
    check_output(manifest.output_dir)  # results.zarr is spndi's, or absent
    out = manifest.layout
    summary: dict[str, dict[str, Any]] = {}
    plans: dict[str, ParticlePlan] = {}
    for p in manifest.scans:
        if p.name not in wanted:
            continue
        check_interrupted()
        try:
            plans[p.name] = plan_particle(manifest, p)
        except (ReduceError, SourceError, FileNotFoundError, RuntimeError) as exc:
            logger.error("scan '%s': %s", p.name, exc)
            summary[p.name] = {"status": Outcome.FAILED, "error": str(exc)}
    if not plans:
        return summary
    # the q grid is the beamtime's: kept when only some scans are redone (forced or not),
    # and made from every particle's projection when it is (re)made
    whole = len(wanted) == len(manifest.scans)
    stored = None if force and whole else stored_q_grid(out.root)
    grid = None if stored is None else BeamtimeGrid.from_dict(stored)
    if grid is None or grid.n != settings.pattern_grid:
        grid = beamtime_grid(manifest, [*plans.values(), *_other_plans(manifest, plans)])
    group = results_group(out.root, manifest.name)
    group.attrs.update({"q_grid": grid.to_dict()})
    base = {
        "version": __version__,
        "manifest_hash": manifest.manifest_hash,
        "strain_reference": settings.strain_reference,
    }
    reduced = []
    todo: dict[str, str] = {}  # name -> fingerprint
    for name, plan in plans.items():
        fp = _fingerprint(manifest, plan, grid)
        if not force and is_current(out.root, name, fp):
            summary[name] = {"status": Outcome.UP_TO_DATE, "seconds": 0.0}
            reduced.append(name)
        else:
            todo[name] = fp
    for rank, name in enumerate(todo):  # one particle's tiles after another's (_raster_priority)
        plans[name] = dataclasses.replace(plans[name], rank=rank)
    t0 = time.perf_counter()

    def fail(name: str, exc: BaseException) -> None:  # one bad particle never stops the others
        msg = _explain_failure(manifest, name, exc)
        logger.error(
            "scan %r: reduce failed: %s", name, msg, exc_info=logger.isEnabledFor(logging.DEBUG)
        )
        summary[name] = {"status": Outcome.FAILED, "error": msg}
        todo.pop(name, None)

    # intensity registration needs the per-angle moments first (one pass of its own)
    unregistered = [n for n in todo if plans[n].drift is None]
    graphs = [_block_graph(plans[n], _lazy_context(plans[n], None), None)[0] for n in unregistered]
    with dask.config.set(_KEEP_PRIORITIES):
        passes = compute_each(graphs, progress)
    for name, (values, exc) in zip(unregistered, passes, strict=True):
        if exc is not None:
            fail(name, exc)
            continue
        plan = plans[name]
        plans[name] = _checked_drift(
            plan,
            K.register_chain(
                values[..., 0],
                reference=plan.reference_angle,
                upsample=settings.registration_upsample,
            ),
        )
    # each particle's graph is submitted as soon as it is built (the workers start on the first
    # while the next is planned) and published as soon as it is written
    pending: dict[str, tuple[Path, dict[str, Any]]] = {}

    def built() -> Iterator[tuple[str, Any]]:
        for name in list(todo):
            check_interrupted()
            plan = plans[name]
            try:
                ds = reduce_particle(
                    plan,
                    grid,
                    min_snr=settings.min_snr,
                    d0=settings.d0_angstrom if settings.strain_reference == "d0" else None,
                    peak=settings.peak,
                )
                attrs = {
                    **base,
                    "spndi_dask": {
                        "kind": "reduce",
                        "version": __version__,
                        "fingerprint": todo[name],
                    },
                    "raw_sources": plan.raw_sources,
                    "reduced_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                }
                delayed, tmp = _write_graph(ds, out.root, name, attrs)
            except Exception as exc:
                fail(name, exc)
                continue
            pending[name] = (tmp, attrs)
            yield name, delayed

    # closed at once if interrupted: its futures are cancelled then, not when it is collected
    with (
        dask.config.set(_KEEP_PRIORITIES),
        closing(compute_as_completed(built(), progress)) as done,
    ):
        for name, _, exc in done:
            tmp, attrs = pending[name]
            notes: list[str] = []
            if exc is None:
                try:
                    notes = [_saturation_note(tmp, plans[name]), failed_fits_note(tmp, name)]
                    notes = [n for n in notes if n]
                    with deferred():  # marked complete and moved in, or neither
                        publish(tmp, out.root, name, attrs)
                    valid = zarr.open_array(str(out.node(name) / "valid"), mode="r")
                    n_valid = int(np.asarray(read(valid, (slice(None),) * 2)).sum())
                except Exception as publish_error:
                    exc = publish_error
            if exc is not None:
                fail(name, exc)
                continue
            plan = plans[name]
            summary[name] = {
                "status": Outcome.REDUCED,
                "seconds": round(time.perf_counter() - t0, 2),
                "roi": list(plan.roi),
                "drift_method": plan.drift_method,
                "valid_pixels": n_valid,
                "warnings": [*plan.warnings, *notes],
            }
            reduced.append(name)
    if settings.strain_reference == "beamtime_median" and reduced:
        axes = {n: plans[n].geometry.rocking_axis for n in reduced}
        with deferred():  # every particle's maps on the one reference, not some of them
            _apply_beamtime_median(out, reduced, axes)
    return {p.name: summary[p.name] for p in manifest.scans if p.name in summary}
