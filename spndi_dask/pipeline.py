"""``spndi run``: every stage for every scan of a beamtime under one dask client.

Stages, in the order of :data:`spndi_dask.stages.STAGES`: ingest → reduce → stats (particles)
→ train → encode → decompose (when ``[cluster] features`` needs it, or ``[decompose] run =
"always"``) → cluster → analyze → report. Each is a function of ``(manifest, client,
options)`` returning the stage's summary; :func:`run` calls them in order, passes on only the
scans that succeeded upstream (one failing scan never stops the others), skips what
depends on a failed stage, and returns one :class:`StageResult` per stage for the summary
table. Each stage skips work that is already up to date (its own fingerprints), so a re-run only
does what is new.

A run writes ``<output>/logs/run-<time>.log`` (this process and, forwarded, the workers' log
records of ``spndi_dask``) and ``<output>/logs/run-<time>-dask.html`` (dask's
``performance_report``: task stream, worker profiles, bandwidth).
"""

from __future__ import annotations

import json
import logging
import signal
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import InitVar, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from distributed import performance_report as dask_performance_report

from spndi_dask.analysis import analyze
from spndi_dask.cluster import cluster
from spndi_dask.config import Manifest
from spndi_dask.decompose import decompose
from spndi_dask.features import encode, train
from spndi_dask.ingest import IngestError, ingest
from spndi_dask.interrupt import (
    Interrupted,
    at_forced_exit,
    check_interrupted,
    deferred,
    received,
)
from spndi_dask.io.layout import OutputLayout, check_output
from spndi_dask.particles import stats
from spndi_dask.reduce import reduce
from spndi_dask.report import write_report
from spndi_dask.stages import Outcome, parse_stages
from spndi_dask.stages import stage as stage_info
from spndi_dask.status import record_stage_timings, write_last_run
from spndi_dask.worker_plugins import WorkerLogLevel

__all__ = ["RunOptions", "StageResult", "parse_stages", "run", "run_logging"]

logger = logging.getLogger(__name__)


@dataclass
class RunOptions:
    """What the user asked of a run (all optional).

    Attributes
    ----------
    scans : list of str, optional
        Only these scans (default: all in the manifest). ``particles`` is the deprecated name.
    force : bool
        Redo stages even where their results are up to date.
    checkpoint : str, optional
        Use this trained model: the train stage is skipped.
    device : str, optional
        ``auto``, ``cpu`` or ``cuda`` for train/encode (default: ``[features] device``).
    weights : str, optional
        The original study's released weights: train loads them instead of training
        (default: ``[features] weights``).
    k : int, optional
        Number of clusters (default: ``[cluster] k`` or the elbow rule).
    boundary_width : float
        Scan pixels from another cluster that make a boundary pixel (analyze).
    figures : bool
        Write the figures (stats, cluster, analyze).
    progress : bool
        Show a progress bar per stage.
    on_epoch : callable, optional
        Called with each training epoch's summary dict (as the epoch ends, also when the model
        trains on a worker).
    train_on_worker : bool, optional
        Train as a task on a dask worker (default: when there is a distributed client); False
        trains in this process (see :func:`spndi_dask.features.train`).
    run_info : dict
        Cluster description etc. for the report's provenance.
    """

    scans: list[str] | None = None
    force: bool = False
    checkpoint: str | None = None
    device: str | None = None
    weights: str | None = None
    k: int | None = None
    boundary_width: float = 1.0
    figures: bool = True
    progress: bool = True
    on_epoch: Callable[[dict[str, Any]], None] | None = None
    train_on_worker: bool | None = None
    run_info: dict[str, Any] = field(default_factory=dict)
    particles: InitVar[list[str] | None] = None

    def __post_init__(self, particles: list[str] | None) -> None:
        if particles is not None:
            warnings.warn(
                "RunOptions(particles=...) is deprecated; use scans=... (a manifest entry is a "
                "scan)",
                DeprecationWarning,
                stacklevel=3,
            )
            self.scans = particles


@dataclass
class StageResult:
    """One stage of a run: per-scan statuses (or ``all``), wall time and messages."""

    stage: str
    status: Outcome
    seconds: float = 0.0
    scans: dict[str, Outcome] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    summary: Any = None

    @property
    def failed(self) -> bool:
        """True when the stage failed as a whole or for any scan."""
        return self.status == Outcome.FAILED or Outcome.FAILED in self.scans.values()

    def rows(self) -> list[dict[str, Any]]:
        """Table rows: one per status, with the scans that have it."""
        if not self.scans:
            note = self.errors.get("all", "")
            row = {"stage": self.stage, "scans": "all", "status": self.status}
            return [{**row, "seconds": round(self.seconds, 1), "note": note}]
        by_status: dict[str, list[str]] = {}
        for name, status in self.scans.items():
            by_status.setdefault(status, []).append(name)
        rows = []
        for i, (status, names) in enumerate(by_status.items()):
            notes = "; ".join(self.errors[n] for n in names if n in self.errors)
            rows.append(
                {
                    "stage": self.stage,
                    "scans": ", ".join(names),
                    "status": status,
                    "seconds": round(self.seconds, 1) if i == 0 else "",
                    "note": notes,
                }
            )
        return rows


# ---- stages: each (manifest, client, options, scans or None for all) -> summary --------------


def _ingest(m: Manifest, client: Any, o: RunOptions, names: list[str] | None) -> Any:
    try:
        return ingest(m, scans=names, force=o.force, progress=o.progress)
    except IngestError as exc:
        if not hasattr(exc, "summary"):
            raise
        return exc.summary  # per-scan failures; the good scans are ingested


def _reduce(m: Manifest, client: Any, o: RunOptions, names: list[str] | None) -> Any:
    return reduce(m, scans=names, force=o.force, progress=o.progress)


def _stats(m: Manifest, client: Any, o: RunOptions, names: list[str] | None) -> Any:
    return stats(m, scans=names, force=o.force, figures=o.figures)


def _feature_args(o: RunOptions, names: list[str] | None) -> dict[str, Any]:
    return {"scans": names, "force": o.force, "device": o.device, "progress": o.progress}


def _train(m: Manifest, client: Any, o: RunOptions, names: list[str] | None) -> Any:
    if o.checkpoint:
        return {"status": Outcome.NOT_NEEDED, "note": f"--checkpoint {o.checkpoint}"}
    return train(
        m,
        callback=o.on_epoch,
        on_worker=o.train_on_worker,
        weights=o.weights,
        **_feature_args(o, names),
    )


def _encode(m: Manifest, client: Any, o: RunOptions, names: list[str] | None) -> Any:
    return encode(m, checkpoint=o.checkpoint, **_feature_args(o, names))


def _decompose(m: Manifest, client: Any, o: RunOptions, names: list[str] | None) -> Any:
    return decompose(m, scans=names, force=o.force, figures=o.figures, progress=o.progress)


def _cluster(m: Manifest, client: Any, o: RunOptions, names: list[str] | None) -> Any:
    return cluster(m, scans=names, k=o.k, force=o.force, figures=o.figures, progress=o.progress)


def _analyze(m: Manifest, client: Any, o: RunOptions, names: list[str] | None) -> Any:
    return analyze(
        m,
        scans=names,
        boundary_width=o.boundary_width,
        figures=o.figures,
        progress=o.progress,
        force=o.force,
    )


# the stages of stages.STAGES that run a function (report is written from the others' results)
STAGE_FUNCTIONS: dict[str, Callable[[Manifest, Any, RunOptions, list[str] | None], Any]] = {
    "ingest": _ingest,
    "reduce": _reduce,
    "stats": _stats,
    "train": _train,
    "encode": _encode,
    "decompose": _decompose,
    "cluster": _cluster,
    "analyze": _analyze,
}


#: what the cluster stage reads for each ``[cluster] features`` (instead of its table's needs)
_CLUSTER_NEEDS = {
    "latent": ("encode", "stats"),
    "pca": ("decompose", "stats"),
    "nmf": ("decompose", "stats"),
    "moments": ("stats",),
}


def _needs(manifest: Manifest, stage: str) -> tuple[str, ...]:
    """The stages ``stage`` reads in this manifest (cluster's depend on its features)."""
    if stage == "cluster":
        return _CLUSTER_NEEDS[manifest.cluster.features]
    return stage_info(stage).needs


def _not_needed(manifest: Manifest, stage: str) -> str | None:
    """Why ``spndi run`` leaves ``stage`` out (``[decompose] run``), or None to run it."""
    if stage != "decompose":
        return None
    when, features = manifest.decompose.run, manifest.cluster.features
    if when == "never" or (when == "auto" and features not in ("pca", "nmf")):
        return f"[cluster] features = {features!r}, [decompose] run = {when!r}"
    return None


def _record(stage: str, summary: Any, seconds: float) -> StageResult:
    """A StageResult from a stage's summary (per scan, or one dict for the beamtime)."""
    if stage_info(stage).per_scan:
        parts = {n: Outcome(s["status"]) for n, s in summary.items()}
        errors = {n: s["error"] for n, s in summary.items() if "error" in s}
        for n, s in summary.items():
            if "error" not in s and s.get("warning"):
                errors[n] = s["warning"]
        failed = parts and all(v == Outcome.FAILED for v in parts.values())
        return StageResult(
            stage, Outcome.FAILED if failed else Outcome.DONE, seconds, parts, errors, summary
        )
    note = summary.get("note") or "; ".join(summary.get("warnings", []))
    status = Outcome(summary.get("status", Outcome.DONE))
    return StageResult(stage, status, seconds, {}, {"all": note}, summary)


def run(
    manifest: Manifest,
    client: Any = None,
    *,
    stages: list[str] | str | None = None,
    options: RunOptions | None = None,
    on_stage: Callable[[str, int, int], None] | None = None,
) -> list[StageResult]:
    """Run the pipeline's stages for the beamtime on ``client`` (the active one if None).

    Parameters
    ----------
    manifest : Manifest
    client : distributed.Client, optional
        Where the stages compute; stages also find it themselves as the active client.
    stages : list of str or str, optional
        Which stages (see :func:`parse_stages`); default all.
    options : RunOptions, optional
    on_stage : callable, optional
        Called as ``on_stage(name, index, total)`` before each stage (progress headers).

    Returns
    -------
    list of StageResult
        One per stage run or skipped, in order. A stage that raised is ``failed`` with the
        message; the stages that need it are ``skipped``; the report is written regardless.

    Raises
    ------
    Interrupted
        A signal stopped the run (see :mod:`spndi_dask.interrupt`); its ``stage`` is the stage
        that was running. ``last-run.json`` records that stage ``interrupted`` and the later
        ones ``not run``; a second run redoes only what is not complete.
    """
    o = options or RunOptions()
    chosen = parse_stages(stages)
    selected = manifest.select_scans(o.scans)
    check_output(manifest.output_dir)  # an output spndi did not write is left alone
    ok = list(selected)
    log = _RunLog(manifest, chosen)
    results = log.results
    failed_stages: set[str] = set()
    with at_forced_exit(log.write_if_interrupted):
        try:
            for i, stage in enumerate(chosen, 1):
                check_interrupted()  # between stages: nothing is running
                if on_stage:
                    on_stage(stage, i, len(chosen))
                blocked = [s for s in _needs(manifest, stage) if s in failed_stages]
                if blocked:
                    note = f"needs {', '.join(blocked)}, which failed"
                    logger.warning("stage %s skipped: %s", stage, note)
                    results.append(StageResult(stage, Outcome.SKIPPED, errors={"all": note}))
                    failed_stages.add(stage)
                    continue
                if not ok and stage != "report":
                    note = "no scan left"
                    results.append(StageResult(stage, Outcome.SKIPPED, errors={"all": note}))
                    failed_stages.add(stage)
                    continue
                why = _not_needed(manifest, stage)
                if why:
                    results.append(StageResult(stage, Outcome.NOT_NEEDED, errors={"all": why}))
                    continue
                t0 = log.start(stage)
                logger.debug("stage %s: %d scan(s)", stage, len(ok))
                try:
                    if stage == "report":
                        res = _report(manifest, o, results)
                    else:
                        summary = STAGE_FUNCTIONS[stage](manifest, client, o, list(ok))
                        res = _record(stage, summary, time.perf_counter() - t0)
                except Exception as exc:  # a stage's failure is reported, the run goes on
                    logger.exception("stage %s failed", stage)
                    seconds = time.perf_counter() - t0
                    res = StageResult(stage, Outcome.FAILED, seconds, errors={"all": str(exc)})
                log.finish(res)
                if res.status == Outcome.FAILED:
                    failed_stages.add(stage)
                bad = {n for n, s in res.scans.items() if s == Outcome.FAILED}
                if bad:
                    logger.warning(
                        "stage %s failed for %s; they skip later stages", stage, sorted(bad)
                    )
                    ok = [n for n in ok if n not in bad]
        except Interrupted as exc:
            exc.stage = exc.stage or log.running
            with deferred():
                records = log.write(exc.signum)
            not_run = [r.stage for r in records if r.status == Outcome.NOT_RUN]
            logger.warning(
                "%s: the run stopped %s; not run: %s",
                exc.signame,
                f"during {exc.stage}" if exc.stage else "between stages",
                ", ".join(not_run) or "none",
            )
            raise
        with deferred():
            log.write()
    return results


@dataclass
class _RunLog:
    """What a run did so far, for ``<output>/logs/last-run.json`` (also when it is stopped)."""

    manifest: Manifest
    chosen: list[str]
    results: list[StageResult] = field(default_factory=list)
    running: str | None = None
    started: float = 0.0

    def start(self, stage: str) -> float:
        """Note that ``stage`` starts; returns the time it starts."""
        self.running, self.started = stage, time.perf_counter()
        return self.started

    def finish(self, result: StageResult) -> None:
        """Record the result of the running stage."""
        self.results.append(result)
        self.running = None

    def records(self, signum: int | None = None) -> list[StageResult]:
        """The results so far; stopped by ``signum``: the running stage and those not run."""
        if signum is None:
            return list(self.results)
        name = signal.Signals(signum).name
        out = list(self.results)
        if self.running:
            seconds = time.perf_counter() - self.started
            note = {"all": f"interrupted by {name}"}
            out.append(StageResult(self.running, Outcome.INTERRUPTED, seconds, errors=note))
        seen = {r.stage for r in out}
        note = {"all": f"not started: the run was interrupted by {name}"}
        return out + [
            StageResult(s, Outcome.NOT_RUN, errors=note) for s in self.chosen if s not in seen
        ]

    def write(self, signum: int | None = None) -> list[StageResult]:
        """Write ``last-run.json`` (with the signal that stopped the run); returns its records."""
        records = self.records(signum)
        record: dict[str, Any] = {
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "stages": [_stage_record(r) for r in records],
        }
        if signum is not None:
            record["interrupted"] = {"signal": signal.Signals(signum).name, "stage": self.running}
        write_last_run(self.manifest.output_dir, record)
        return records

    def write_if_interrupted(self) -> None:
        """At a forced exit (a second signal): the record as it stands."""
        signum = received()
        if signum is not None:
            self.write(signum)


_UNFINISHED = (Outcome.FAILED, Outcome.INTERRUPTED, Outcome.NOT_RUN)


def _stage_record(r: StageResult) -> dict[str, Any]:
    """A stage in ``last-run.json``: ``errors`` only for what failed or did not finish, other
    messages (warnings, why a stage was skipped) under ``notes``, files made under ``outputs``."""
    rec: dict[str, Any] = {k: getattr(r, k) for k in ("stage", "status", "seconds", "scans")}
    if r.status in _UNFINISHED:
        errors = dict(r.errors)
    else:
        errors = {n: e for n, e in r.errors.items() if r.scans.get(n) in _UNFINISHED}
    if errors:
        rec["errors"] = errors
    if r.stage == "report" and r.status not in _UNFINISHED:
        rec["outputs"] = {"report": str(r.summary)}
    elif notes := {n: e for n, e in r.errors.items() if n not in errors}:
        rec["notes"] = notes
    return rec


def _report(manifest: Manifest, o: RunOptions, done: list[StageResult]) -> StageResult:
    start = time.perf_counter()
    timings = [row for r in done for row in r.rows()]
    finished = datetime.now(timezone.utc).isoformat(timespec="seconds")
    record_stage_timings(
        manifest.output_dir, json.loads(json.dumps(timings, default=str)), finished
    )
    path = write_report(manifest, timings=timings, run_info=o.run_info)
    return StageResult(
        "report",
        stage_info("report").made,
        time.perf_counter() - start,
        errors={"all": str(path)},
        summary=path,
    )


# ---- logging and diagnostics for a run ----------------------------------------------------------


#: What the command line prints for the user (epoch lines, the summary table): recorded in the
#: run log by :func:`run_logging`, never shown twice on the console (it does not propagate).
CONSOLE = logging.getLogger("spndi_dask.console")
CONSOLE.propagate = False
CONSOLE.setLevel(logging.INFO)


@contextmanager
def run_logging(
    output_dir: Path, client: Any = None, *, performance_report: bool = True
) -> Iterator[dict[str, Path]]:
    """Log this run to ``<output>/logs/run-<time>.log`` with the workers' records forwarded.

    Also records dask's ``performance_report`` to ``run-<time>-dask.html`` when a distributed
    client is given. Yields the paths (``log``, ``dask_report``).
    """
    logs = OutputLayout(output_dir).logs
    logs.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    paths = {"log": logs / f"run-{stamp}.log"}
    ours = logging.getLogger("spndi_dask")
    level = min(ours.getEffectiveLevel(), logging.INFO)
    handler = logging.FileHandler(paths["log"])
    handler.setLevel(level)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(processName)s]: %(message)s")
    )
    old_level = ours.level
    with ExitStack() as stack:
        ours.addHandler(handler)
        ours.setLevel(level)
        stack.callback(ours.setLevel, old_level)
        stack.callback(ours.removeHandler, handler)
        CONSOLE.addHandler(handler)  # what the CLI prints (epochs...) goes to the log too
        stack.callback(CONSOLE.removeHandler, handler)
        stack.callback(handler.close)
        if client is not None:
            try:
                client.register_plugin(WorkerLogLevel(level))
                client.forward_logging("spndi_dask", level=level)
                stack.callback(_stop_forwarding, client)
            except Exception as exc:  # an old scheduler: logs stay on the workers
                logger.warning("worker logs are not forwarded: %s", exc)
            if performance_report:
                paths["dask_report"] = logs / f"run-{stamp}-dask.html"
                stack.enter_context(dask_performance_report(filename=str(paths["dask_report"])))
        logger.debug("run log: %s", paths["log"])
        yield paths


def _stop_forwarding(client: Any) -> None:
    try:
        client.unforward_logging("spndi_dask")
    except Exception:  # the client may be closing
        pass
