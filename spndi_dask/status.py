"""What is done, stale, failed or not run, per scan and stage (``spndi status``).

Read from what the stages leave behind, without computing anything: the completion attrs of
``raw.zarr`` and ``results.zarr`` (zarr.json files), the source files' size and modification time
against those ingest recorded, the fingerprints that tie a stage to its inputs (clusters,
analysis, the encoding checkpoint), and ``<output>/logs/last-run.json`` written by
:func:`spndi_dask.pipeline.run` for failures. :func:`lock_note` says whether a run holds the
output now, checking that its process still exists as ``spndi run`` does.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

from spndi_dask.config import Manifest
from spndi_dask.io.hashing import relative_to, sha256_file, source_identity, source_parts
from spndi_dask.io.layout import OutputLayout, read_attrs, write_text_atomic
from spndi_dask.io.lock import lock_holder
from spndi_dask.stages import status_stages

__all__ = [
    "STATUS_STAGES",
    "lock_note",
    "read_stage_timings",
    "record_stage_timings",
    "scan_status",
    "with_damage",
    "write_last_run",
]

#: Outcomes of a stage that did no work (a re-run keeps the timing of the run that did).
NO_WORK = frozenset({"up to date", "not needed", "skipped", "no particle", "not run"})

# the columns of `spndi status`: the stages that record completion per scan (stages.STAGES)
STATUS_STAGES = tuple(s.name for s in status_stages())
# what each column needs among the columns (train has none: encode checks the model's digest)
_NEEDS = {
    s.name: tuple(n for n in STATUS_STAGES if n in s.needs) for s in status_stages() if s.needs
}
_KEY = {s.name: s.attrs_key for s in status_stages()}
_LABEL = {s.name: s.label for s in status_stages()}


def write_last_run(output_dir: Path, record: dict[str, Any]) -> Path:
    """Write ``<output>/logs/last-run.json`` in one move."""
    return write_text_atomic(
        OutputLayout(output_dir).last_run, json.dumps(record, indent=1, default=str)
    )


def record_stage_timings(
    output_dir: Path, rows: list[dict[str, Any]], finished: str
) -> dict[str, dict[str, Any]]:
    """Keep, per stage, the timing rows of the last run that did its work.

    ``rows`` are this run's timing rows (``stage``, ``scans``, ``status``, ``seconds``, ...);
    a stage whose rows all say it did no work (:data:`NO_WORK`, e.g. "up to date") keeps the
    rows recorded before. Written to ``logs/stage-timings.json`` in one move; returns the
    record (stage -> ``{"finished", "rows"}``).
    """
    record = read_stage_timings(output_dir)
    by_stage: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_stage.setdefault(row["stage"], []).append(row)
    for stage, mine in by_stage.items():
        if any(str(r.get("status")) not in NO_WORK for r in mine):
            record[stage] = {"finished": finished, "rows": mine}
    path = OutputLayout(output_dir).stage_timings
    write_text_atomic(path, json.dumps(record, indent=1, default=str))
    return record


def read_stage_timings(output_dir: Path) -> dict[str, dict[str, Any]]:
    """``logs/stage-timings.json`` (see :func:`record_stage_timings`); empty when absent."""
    try:
        record = json.loads(OutputLayout(output_dir).stage_timings.read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def lock_note(output_dir: str | os.PathLike[str]) -> str | None:
    """One line on ``<output>/.spndi.lock``, or None when no run holds the output.

    The holder's pid is checked as ``spndi run`` checks it: a lock left by a process that no
    longer runs (a run killed with SIGKILL) is stale and the next run takes it over; one of
    another host cannot be checked from here.
    """
    holder = lock_holder(output_dir)
    if holder is None:
        return None
    info = holder.info
    pid, host = info.get("pid"), info.get("host")
    run = f"started {info.get('started')}: {info.get('command')}"
    if holder.state == "running":
        return f"lock: the output is being written by pid {pid} on {host} ({run})"
    if holder.state == "stale":
        return (
            f"lock: stale, left by pid {pid} on {host} ({run}), no longer running; "
            "the next run takes it over"
        )
    if host is None:
        return (
            f"lock: the lock file {holder.path} cannot be read; if no spndi run is writing "
            f"{Path(output_dir)}, delete it"
        )
    return (
        f"lock: held by pid {pid} on {host} ({run}); a process on another host cannot be "
        f"checked from this host ({socket.gethostname()}): if that run is over, delete "
        f"{holder.path}"
    )


def _failures(output_dir: Path) -> dict[tuple[str, str], tuple[str, str]]:
    """``(stage, scan or 'all') -> (state, note)`` of the stages the last run did not
    finish: ``failed`` (with its error) or ``interrupted`` (by a signal)."""
    try:
        record = json.loads(OutputLayout(output_dir).last_run.read_text())
    except (OSError, ValueError):
        return {}
    out = {}
    signal = (record.get("interrupted") or {}).get("signal")
    for s in record.get("stages", []):
        stage = s["stage"]
        per_scan = s.get("scans") or s.get("particles")  # "particles": logs before the rename
        for name, state in (per_scan or {"all": s.get("status")}).items():
            if state == "failed":
                error = (s.get("errors") or {}).get(name) or "failed"
                out[(stage, name)] = ("failed", error)
            elif state == "interrupted":
                by = f" by {signal}" if signal else ""
                out[(stage, name)] = (
                    "interrupted",
                    f"the last run was interrupted{by} in this stage; `spndi run` resumes it",
                )
    return out


def _sources_changed(manifest: Manifest, name: str, raw: dict[str, Any]) -> str | None:
    recorded = list(raw.get("sources") or [])
    files = manifest.scan(name).frame_files(manifest.base_dir)
    if len(files) != len(recorded):
        return f"{len(files)} angles' frame files now, {len(recorded)} when ingested"
    for a, (paths, rec) in enumerate(zip(files, recorded, strict=True)):
        parts = source_parts(rec)
        if len(paths) != len(parts):
            return f"angle {a} has {len(paths)} frame files now, {len(parts)} when ingested"
        for p, part in zip(paths, parts, strict=True):
            if not p.exists():
                return f"{p} is missing"
            if not _cheap_same(p, part, manifest.base_dir):
                return (
                    f"{p} changed since ingest (size, modification time or place; `spndi run` "
                    "compares its content and keeps what is unchanged)"
                )
    return None


def _cheap_same(path: Path, rec: dict[str, Any] | None, base: Path) -> bool:
    """Same size and modification time at the recorded path or relative path (nothing read)."""
    if not rec:
        return False
    st = os.stat(path)
    return (
        rec.get("size") == st.st_size
        and rec.get("mtime_ns") == st.st_mtime_ns
        and (rec.get("path") == str(path) or rec.get("relpath") == relative_to(path, base))
    )


def _checkpoint_digest(node: dict[str, Any]) -> tuple[str | None, str | None]:
    info = node.get(_KEY["encode"]) or {}
    path = info.get("checkpoint")
    if not path or not Path(path).exists():
        return info.get("checkpoint_sha256"), None
    return info.get("checkpoint_sha256"), sha256_file(path)


def scan_status(manifest: Manifest) -> dict[str, dict[str, tuple[str, str]]]:
    """``{scan: {stage: (state, note)}}`` with state done/stale/failed/incomplete/not run.

    A stage is stale when something it was made from changed after it ran: the raw files since
    ingest, an upstream stage redone or stale, the model since encoding, the clustering since
    a scan's clusters or analysis.
    """
    out = manifest.layout
    root = read_attrs(out.results) or {}
    clusters = root.get("clusters") or {}
    analysis = read_attrs(out.analysis) or {}
    failures = _failures(out.root)
    digests: dict[str, tuple[str | None, str | None]] = {}
    table: dict[str, dict[str, tuple[str, str]]] = {}
    for p in manifest.scans:
        name = p.name
        raw = read_attrs(out.raw_node(name))
        node = read_attrs(out.node(name)) or {}
        st: dict[str, tuple[str, str]] = {}
        for stage in STATUS_STAGES:
            state, note = _state(manifest, name, stage, raw, node, clusters, analysis, digests)
            if state in ("done", "stale"):
                for need in _NEEDS.get(stage, ()):
                    if st[need][0] != "done" and state == "done":
                        state, note = "stale", f"{_LABEL[need]} is {st[need][0]}"
            if state != "done" and (stage, name) in failures:
                state, note = failures[(stage, name)]
            elif state == "not run" and (stage, "all") in failures:
                state, note = failures[(stage, "all")]
            st[stage] = (state, note)
        table[name] = st
    return table


def _state(
    manifest: Manifest,
    name: str,
    stage: str,
    raw: dict[str, Any] | None,
    node: dict[str, Any],
    clusters: dict[str, Any],
    analysis: dict[str, Any],
    digests: dict[str, tuple[str | None, str | None]],
) -> tuple[str, str]:
    if stage == "ingest":
        if raw is None:
            return "not run", ""
        if not (raw.get(_KEY["ingest"]) or {}).get("complete"):
            return "incomplete", "an ingest was interrupted: `spndi ingest` resumes it"
        changed = _sources_changed(manifest, name, raw)
        return ("stale", changed) if changed else ("done", "")
    if stage == "reduce":
        meta = node.get(_KEY["reduce"]) or {}
        if not meta:
            return "not run", ""
        if raw and [source_identity(r) for r in raw.get("sources") or []] != [
            source_identity(r) for r in node.get("raw_sources") or []
        ]:
            return "stale", "ingested again from other files after it was reduced"
        return "done", ""
    if stage == "stats":
        return ("done", "") if node.get(_KEY["stats"]) else ("not run", "")
    if stage == "encode":
        if not node.get(_KEY["encode"]):
            return "not run", ""
        ckpt = (node.get(_KEY["encode"]) or {}).get("checkpoint", "")
        if ckpt not in digests:
            digests[ckpt] = _checkpoint_digest(node)
        used, now = digests[ckpt]
        if now is not None and used is not None and used != now:
            return "stale", "the model was retrained after encoding"
        return "done", ""
    if stage == "cluster":
        info = node.get(_KEY["cluster"]) or {}
        if not info:
            return "not run", ""
        if info.get("fingerprint") != clusters.get("fingerprint"):
            return "stale", "the joint clustering changed (other scans or settings)"
        return "done", ""
    info = node.get(_KEY["analyze"]) or {}  # analyze
    if not info:
        return "not run", ""
    if info.get("fingerprint") and info.get("fingerprint") != analysis.get("fingerprint"):
        return "stale", "the analysis was redone for another clustering or set of scans"
    return "done", ""


def with_damage(
    table: dict[str, dict[str, tuple[str, str]]], damage: list[Any]
) -> dict[str, dict[str, tuple[str, str]]]:
    """``table`` with the stages that made damaged chunks (:func:`spndi_dask.io.integrity.verify`)
    read ``damaged``, the first damaged chunk as the note."""
    out = {name: dict(stages) for name, stages in table.items()}
    for d in damage:
        for name in [d.particle] if d.particle else list(out):
            stages = out.get(name)
            if stages is None or d.stage not in stages or stages[d.stage][0] == "damaged":
                continue
            stages[d.stage] = ("damaged", f"{d.where()}: {d.reason}; `spndi verify` marks it")
    return out
