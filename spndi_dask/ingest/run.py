"""The public :func:`ingest`: plan every particle, write what is not done, record it."""

from __future__ import annotations

import logging
import time
from datetime import datetime, timezone
from typing import Any

import numpy as np
import zarr

from spndi_dask._deprecate import renamed_keyword
from spndi_dask.compute import compute
from spndi_dask.config import Manifest
from spndi_dask.ingest.errors import IngestError
from spndi_dask.ingest.plan import IngestPlan, plan_ingest
from spndi_dask.ingest.records import _clear_angles, _keep_moved, _refresh
from spndi_dask.ingest.write import _tasks
from spndi_dask.interrupt import check_interrupted
from spndi_dask.io.integrity import is_damage
from spndi_dask.io.raw_store import create_particle_store
from spndi_dask.io.sources import SourceError
from spndi_dask.stages import Outcome

logger = logging.getLogger(__name__)


def _finalize(plan: IngestPlan, records: list[dict[str, Any]]) -> dict[str, Any]:
    group = zarr.open_group(plan.group_url, mode="r+")
    old = dict(group.attrs).get("sources") or [None] * len(plan.sources)
    sources = list(old) if len(old) == len(plan.sources) else [None] * len(plan.sources)
    for a, rec in zip(plan.todo, records, strict=True):
        sources[a] = rec
    _refresh(plan, sources)
    done = np.asarray(group["done"][:])
    complete = all(int(d) == f for d, f in zip(done, plan.fingerprints, strict=True))
    incomplete = [a for a, n in enumerate(plan.empty_nodes) if n]
    zeroed = sum((r or {}).get("zeroed_values", 0) for r in sources)
    flagged = np.asarray(group["flagged"][...])
    n_flagged = int(flagged.sum(dtype=np.uint64))
    attrs = {
        **plan.attrs,
        "sources": sources,
        "incomplete_angles": incomplete,
        "zeroed_values": zeroed,
        "flagged_values": n_flagged,
        "flagged_pixels": int((flagged > 0).any(axis=0).sum()),
        "ingested_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    attrs["spndi_dask"] = {**plan.attrs["spndi_dask"], "complete": bool(complete)}
    group.attrs.put(attrs)
    if incomplete and plan.positions is not None:
        logger.warning(
            "scan '%s': %d scan grid node(s) at %d angle(s) (indices %s) have no recorded "
            "position within half a step; their frames are 0 and marked invalid in `valid` "
            "(raw attrs `positions`)",
            plan.name,
            sum(plan.empty_nodes),
            len(incomplete),
            incomplete,
        )
    elif incomplete:
        logger.warning(
            "scan '%s': %d angle(s) had aborted scans (indices %s); missing points are 0 "
            "and marked invalid in `valid`",
            plan.name,
            len(incomplete),
            incomplete,
        )
    if zeroed:
        logger.warning("scan '%s': %d NaN/negative values replaced by 0", plan.name, zeroed)
    if n_flagged:
        logger.info(
            "scan '%s': %d values equal to the invalid value %s at %d detector pixels stored "
            "as 0 and counted in `flagged` (reduce masks those pixels)",
            plan.name,
            n_flagged,
            plan.invalid,
            attrs["flagged_pixels"],
        )
    return attrs


@renamed_keyword(particles="scans")
def ingest(
    manifest: Manifest,
    *,
    scans: list[str] | None = None,
    force: bool = False,
    progress: bool = False,
) -> dict[str, dict[str, Any]]:
    """Ingest the raw frames of a beamtime into ``<output>/raw.zarr``.

    Runs on the active ``distributed`` client if there is one, else on dask's default
    scheduler.

    Parameters
    ----------
    manifest : Manifest
    scans : list of str, optional
        Only these scans (default: all).
    force : bool
        Rewrite every angle even where the store is up to date.
    progress : bool
        Show a progress bar (for the CLI).

    Returns
    -------
    dict
        Per scan: ``status`` ('ingested', 'up to date' or 'failed'), ``angles_written``,
        ``seconds``, ``raw_bytes`` and ``error`` for failures.

    Raises
    ------
    IngestError
        After all good scans are ingested, if any scan failed (the message lists each).
    """
    selected = [manifest.scan(n) for n in scans] if scans else manifest.scans
    summary: dict[str, dict[str, Any]] = {}
    plans: list[IngestPlan] = []
    for p in selected:
        check_interrupted()
        try:
            plans.append(plan_ingest(manifest, p, force=force))
        except IngestError as exc:
            logger.error("%s", exc)
            summary[p.name] = {"status": Outcome.FAILED, "angles_written": 0, "error": str(exc)}
    manifest.layout.raw.mkdir(parents=True, exist_ok=True)
    work: list[tuple[IngestPlan, int, int]] = []
    tasks: list[Any] = []
    for plan in plans:
        check_interrupted()
        if not plan.todo:
            if plan.moved:
                _keep_moved(plan)
            summary[plan.name] = {"status": Outcome.UP_TO_DATE, "angles_written": 0, "seconds": 0.0}
            continue
        if plan.fresh:
            create_particle_store(
                plan.root, plan.name, plan.layout, plan.attrs, positions=plan.positions is not None
            )
        else:  # resuming: the store is not complete while angles are rewritten
            try:
                _clear_angles(plan)
            except Exception as exc:  # the store's metadata is damaged: start it again
                logger.warning("scan '%s': recreating %s (%s)", plan.name, plan.group_url, exc)
                plan.todo = list(range(len(plan.sources)))
                create_particle_store(
                    plan.root,
                    plan.name,
                    plan.layout,
                    plan.attrs,
                    positions=plan.positions is not None,
                )
        t = _tasks(plan)
        work.append((plan, len(tasks), len(tasks) + len(t)))
        tasks.extend(t)
        logger.info(
            "scan '%s': writing %d of %d angles", plan.name, len(plan.todo), len(plan.sources)
        )
    if tasks:
        start = time.perf_counter()
        try:
            results = compute(tasks, progress)
        except Exception:
            # a problem found while reading or writing (a bad file, a damaged store): report it
            # per particle, keep the others
            results = None
        seconds = time.perf_counter() - start
        if results is None:
            # re-run per particle so that good particles still complete
            for plan, _, _ in work:
                check_interrupted()
                try:
                    recs = compute(_tasks(plan), False)
                    _finalize(plan, recs)
                    summary[plan.name] = _ok(plan, seconds)
                except Exception as exc:
                    msg = _explain(plan, exc)
                    logger.error("%s", msg)
                    summary[plan.name] = {
                        "status": Outcome.FAILED,
                        "angles_written": 0,
                        "error": msg,
                    }
        else:
            for plan, lo, hi in work:
                check_interrupted()
                _finalize(plan, results[lo:hi])
                summary[plan.name] = _ok(plan, seconds)
    failed = {k: v for k, v in summary.items() if v["status"] == Outcome.FAILED}
    if failed:
        err = IngestError(
            f"ingest failed for {len(failed)} of {len(selected)} scan(s):\n"
            + "\n".join(f"  - {v['error']}" for v in failed.values())
        )
        err.summary = summary
        raise err
    return summary


def _explain(plan: IngestPlan, exc: BaseException) -> str:
    """A particle's ingest failure in words (a damaged store names the store and the fix)."""
    if isinstance(exc, IngestError):
        return str(exc)
    if isinstance(exc, SourceError):  # the angle file, not the store
        return f"scan '{plan.name}': {exc}"
    if is_damage(exc):
        return (
            f"scan '{plan.name}': {plan.group_url} is damaged ({type(exc).__name__}: {exc}); "
            f"`spndi ingest <manifest> --scans {plan.name} --force` writes it again"
        )
    return f"scan '{plan.name}': {type(exc).__name__}: {exc}"


def _ok(plan: IngestPlan, seconds: float) -> dict[str, Any]:
    return {
        "status": Outcome.INGESTED,
        "angles_written": len(plan.todo),
        "seconds": seconds,
        "raw_bytes": int(np.prod(plan.layout.shape)) * plan.layout.dtype.itemsize,
    }
