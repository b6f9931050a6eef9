"""`spndi status` from hand-written stage records: done, stale, failed, incomplete, not run."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from spndi_dask.status import STATUS_STAGES, scan_status, write_last_run

from .conftest import load, manifest_dict


def _attrs(group, attrs):
    group.mkdir(parents=True, exist_ok=True)
    (group / "zarr.json").write_text(
        json.dumps({"zarr_format": 3, "node_type": "group", "attributes": attrs})
    )


@pytest.fixture
def beamtime(tmp_path):
    """Two scans whose every stage is recorded complete and current."""
    data = manifest_dict("p1", n_angles=2, scan_shape=(2, 2))
    data["scans"].append({**data["scans"][0], "name": "p2"})
    data["scans"][1]["frames"] = "raw/p2/angle_{index:03d}.h5"
    m = load(tmp_path, data)
    out = m.output_dir
    ckpt = out / "features" / "model.safetensors"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"weights v1")
    digest = hashlib.sha256(b"weights v1").hexdigest()
    _attrs(out / "results.zarr", {"clusters": {"fingerprint": "c1"}})
    _attrs(out / "analysis.zarr", {"fingerprint": "a1"})
    for p in m.scans:
        sources = []
        for path in p.frame_paths(m.base_dir):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"frames")
            st = os.stat(path)
            sources.append({"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
        raw = {"spndi_dask": {"complete": True}, "sources": sources, "ingested_at": "2026-01-01"}
        _attrs(out / "raw.zarr" / p.name, raw)
        _attrs(
            out / "results.zarr" / p.name,
            {
                "spndi_dask": {"complete": True},
                "reduced_at": "2026-01-02",
                "raw_sources": sources,
                "particles": {"n_labels": 1},
                "features": {"checkpoint": str(ckpt), "checkpoint_sha256": digest},
                "cluster": {"fingerprint": "c1"},
                "analysis": {"fingerprint": "a1"},
            },
        )
    return m


def _states(m, name):
    return {stage: state for stage, (state, _) in scan_status(m)[name].items()}


def test_columns_follow_the_stage_table_and_complete_records_read_done(beamtime):
    table = scan_status(beamtime)
    assert list(table) == ["p1", "p2"]
    assert all(tuple(st) == STATUS_STAGES for st in table.values())
    assert {s for st in table.values() for s, _ in st.values()} == {"done"}


def test_nothing_written_reads_not_run(tmp_path):
    m = load(tmp_path, manifest_dict("p1", n_angles=2, scan_shape=(2, 2)))
    assert set(_states(m, "p1").values()) == {"not run"}


def test_a_changed_frame_file_makes_ingest_and_everything_after_it_stale(beamtime):
    path = beamtime.scan("p1").frame_paths(beamtime.base_dir)[1]
    path.write_bytes(b"frames, measured again")
    st = scan_status(beamtime)
    assert st["p1"]["ingest"][0] == "stale"
    assert st["p1"]["ingest"][1].startswith(f"{path} changed since ingest")
    assert st["p1"]["reduce"] == ("stale", "ingest is stale")
    assert {s for s, _ in st["p1"].values()} == {"stale"}
    assert {s for s, _ in st["p2"].values()} == {"done"}
    path.unlink()
    assert scan_status(beamtime)["p1"]["ingest"] == ("stale", f"{path} is missing")


def test_reingest_after_reduce_and_a_retrained_model_are_stale(beamtime):
    raw = beamtime.output_dir / "raw.zarr" / "p2"
    attrs = json.loads((raw / "zarr.json").read_text())["attributes"]
    # ingested again (later) from the same files: reduce stays current
    _attrs(raw, {**attrs, "ingested_at": "2026-02-01"})
    assert scan_status(beamtime)["p2"]["reduce"] == ("done", "")
    # ingested again from files with other content (same place, size and time)
    sources = [{**s, "sha256": "other"} for s in attrs["sources"]]
    _attrs(raw, {**attrs, "sources": sources})
    st = scan_status(beamtime)["p2"]
    assert st["ingest"][0] == "done"
    assert st["reduce"] == ("stale", "ingested again from other files after it was reduced")
    (beamtime.output_dir / "features" / "model.safetensors").write_bytes(b"weights v2")
    st = scan_status(beamtime)["p1"]
    assert st["encode"] == ("stale", "the model was retrained after encoding")
    assert st["cluster"] == ("stale", "features is stale") and st["stats"][0] == "done"


def test_another_clustering_or_analysis_makes_those_stale(beamtime):
    _attrs(beamtime.output_dir / "analysis.zarr", {"fingerprint": "a2"})
    assert _states(beamtime, "p1")["analyze"] == "stale"
    _attrs(beamtime.output_dir / "results.zarr", {"clusters": {"fingerprint": "c2"}})
    st = scan_status(beamtime)["p1"]
    assert st["cluster"][0] == "stale" and "joint clustering changed" in st["cluster"][1]
    assert st["encode"][0] == "done"


def test_an_interrupted_ingest_reads_incomplete(beamtime):
    raw = beamtime.output_dir / "raw.zarr" / "p1"
    attrs = json.loads((raw / "zarr.json").read_text())["attributes"]
    _attrs(raw, {**attrs, "spndi_dask": {"complete": False}})
    state, note = scan_status(beamtime)["p1"]["ingest"]
    assert state == "incomplete" and "`spndi ingest` resumes it" in note


def test_failures_of_the_last_run_per_scan_and_for_the_beamtime(beamtime):
    results = beamtime.output_dir / "results.zarr"
    for name in ("p1", "p2"):
        attrs = json.loads((results / name / "zarr.json").read_text())["attributes"]
        _attrs(results / name, {k: v for k, v in attrs.items() if k != "cluster"})
    write_last_run(
        beamtime.output_dir,
        {
            "stages": [
                {"stage": "reduce", "status": "done", "particles": {"p1": "up to date"}},
                {
                    "stage": "encode",
                    "status": "done",
                    "particles": {"p1": "encoded", "p2": "failed"},
                    "errors": {"p2": "no patterns"},
                },
                {"stage": "cluster", "status": "failed", "errors": {"all": "K too large"}},
            ]
        },
    )
    st = scan_status(beamtime)
    # a done stage stays done; a failure shows where the stage is not done
    assert st["p2"]["encode"] == ("done", "")
    assert st["p1"]["cluster"] == ("failed", "K too large")
    assert st["p2"]["cluster"] == ("failed", "K too large")
    assert not list((beamtime.output_dir / "logs").glob("*.tmp"))


# -- the output lock ------------------------------------------------------------------------------
def _write_lock(out, **holder):
    import socket

    from spndi_dask.io.lock import LOCK_NAME

    holder = {"host": socket.gethostname(), "started": "2026-01-03T02:00:00+00:00", **holder}
    out.mkdir(parents=True, exist_ok=True)
    (out / LOCK_NAME).write_text(json.dumps({"command": "spndi run beamtime.toml", **holder}))


def _dead_pid():
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _lock_line(m, capsys):
    """The line `spndi status` prints on the lock (None: none printed)."""
    from spndi_dask import cli

    path = m.base_dir / "beamtime.toml"
    path.write_text(m.to_toml())
    assert cli.main(["status", str(path)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("lock:")]
    assert len(lines) <= 1
    return lines[0] if lines else None


def test_a_lock_left_by_a_killed_run_reads_stale(beamtime, capsys):
    import socket

    from spndi_dask.io.lock import lock_holder

    assert lock_holder(beamtime.output_dir) is None
    assert _lock_line(beamtime, capsys) is None
    pid = _dead_pid()
    _write_lock(beamtime.output_dir, pid=pid, created=0.0)
    holder = lock_holder(beamtime.output_dir)
    assert holder.state == "stale" and not holder.alive and holder.info["pid"] == pid
    out = _lock_line(beamtime, capsys)
    host = socket.gethostname()
    assert f"left by pid {pid} on {host}" in out
    assert "no longer running; the next run takes it over" in out
    assert "holds the output" not in out and "being written" not in out


def test_a_lock_of_a_live_run_reads_running_and_a_recycled_pid_stale(beamtime, capsys):
    import psutil

    from spndi_dask.io.lock import lock_holder

    me = os.getpid()
    _write_lock(beamtime.output_dir, pid=me, created=psutil.Process(me).create_time())
    holder = lock_holder(beamtime.output_dir)
    assert holder.state == "running" and holder.alive
    out = _lock_line(beamtime, capsys)
    assert f"being written by pid {me}" in out and "spndi run beamtime.toml" in out
    assert "stale" not in out
    # the same pid, but this process started long after the lock was written: a recycled pid
    _write_lock(beamtime.output_dir, pid=me, created=0.0)
    assert lock_holder(beamtime.output_dir).state == "stale"
    assert f"left by pid {me}" in _lock_line(beamtime, capsys)


def test_a_lock_of_another_host_or_an_unreadable_one_cannot_be_checked(beamtime, capsys):
    from spndi_dask.io.lock import LOCK_NAME, LockError, lock_holder, output_lock

    _write_lock(beamtime.output_dir, pid=_dead_pid(), host="node-that-is-not-here", created=0.0)
    holder = lock_holder(beamtime.output_dir)
    assert holder.state == "unknown" and holder.alive
    with pytest.raises(LockError, match="node-that-is-not-here"):  # a run does not take it over
        with output_lock(beamtime.output_dir):
            pass
    out = _lock_line(beamtime, capsys)
    assert "node-that-is-not-here" in out and "cannot be checked from this host" in out
    assert str(beamtime.output_dir / LOCK_NAME) in out  # where to delete it, if that run is over
    for text in ("{not json", "[]"):
        (beamtime.output_dir / LOCK_NAME).write_text(text)
        assert lock_holder(beamtime.output_dir).state == "unknown"
        out = _lock_line(beamtime, capsys)
        assert "cannot be read" in out and str(beamtime.output_dir / LOCK_NAME) in out


def test_a_stage_the_last_run_was_interrupted_in_reads_interrupted(beamtime):
    results = beamtime.output_dir / "results.zarr"
    attrs = json.loads((results / "p1" / "zarr.json").read_text())["attributes"]
    _attrs(results / "p1", {k: v for k, v in attrs.items() if k != "particles"})
    write_last_run(
        beamtime.output_dir,
        {
            "stages": [
                {"stage": "reduce", "status": "done", "particles": {"p1": "up to date"}},
                {"stage": "stats", "status": "interrupted", "particles": {}},
                {"stage": "train", "status": "not run", "particles": {}},
            ],
            "interrupted": {"signal": "SIGINT", "stage": "stats"},
        },
    )
    st = scan_status(beamtime)
    assert st["p1"]["stats"] == (
        "interrupted",
        "the last run was interrupted by SIGINT in this stage; `spndi run` resumes it",
    )
    assert st["p2"]["stats"][0] == "done"  # finished before: not affected
