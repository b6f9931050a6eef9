"""Crash recovery: a worker killed mid-stage, the whole run killed mid-reduce, then re-run.

Both end with results bit-identical to an undisturbed run.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from spndi_dask.config import load_manifest
from spndi_dask.dask_clusters import open_cluster
from spndi_dask.io.lock import read_lock
from spndi_dask.pipeline import RunOptions, run
from spndi_dask.reduce import open_results
from spndi_dask.simulate import preset, simulate_beamtime

pytestmark = pytest.mark.slow
STAGES = "ingest-reduce"


def _manifest_copy(root: Path, tag: str):
    text = (root / "beamtime.toml").read_text()
    path = root / f"beamtime-{tag}.toml"
    path.write_text(text.replace('output = "results"', f'output = "results-{tag}"', 1))
    return load_manifest(path)


def _maps(m, names=("p1", "p2")) -> dict[str, np.ndarray]:
    out = {}
    for name in names:
        ds = open_results(m.output_dir, name)
        for var in ("d_spacing", "strain", "tilt_x", "rocking_curve", "pattern", "drift"):
            out[f"{name}/{var}"] = np.asarray(ds[var].values)
    return out


def _assert_identical(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert np.array_equal(a[key], b[key], equal_nan=True), key


@pytest.fixture(scope="module")
def beamtime(tmp_path_factory):
    root = tmp_path_factory.mktemp("recovery")
    simulate_beamtime(root, preset("small", n_particles=2), scheduler="sync")
    ref = _manifest_copy(root, "ref")
    with open_cluster(n_workers=2, dashboard_address="127.0.0.1:0") as s:
        results = run(ref, s.client, stages=STAGES, options=RunOptions(progress=False))
    assert not any(r.failed for r in results)
    return root, _maps(ref)


def _kill_a_busy_worker(client, killed: list[int], stop: threading.Event) -> None:
    """SIGKILL the process of the first worker seen running a task (of the reduce stage)."""
    pids = client.run(os.getpid)
    while not stop.is_set():
        busy = [w for w, tasks in client.processing().items() if tasks]
        if busy:
            worker = busy[0]
            os.kill(pids[worker], signal.SIGKILL)
            killed.append(pids[worker])
            return
        time.sleep(0.02)


def test_worker_killed_mid_reduce_the_run_completes_identically(beamtime):
    root, reference = beamtime
    m = _manifest_copy(root, "killed-worker")
    killed: list[int] = []
    with open_cluster(n_workers=2, dashboard_address="127.0.0.1:0") as s:
        run(m, s.client, stages="ingest", options=RunOptions(progress=False))
        stop = threading.Event()
        killer = threading.Thread(target=_kill_a_busy_worker, args=(s.client, killed, stop))
        killer.start()
        try:
            results = run(m, s.client, stages="reduce", options=RunOptions(progress=False))
        finally:
            stop.set()
            killer.join()
    assert killed, "no reduce task was seen running: the test did not kill anything"
    assert not any(r.failed for r in results), [(r.stage, r.errors) for r in results]
    _assert_identical(_maps(m), reference)


def test_run_killed_mid_reduce_resumes_and_ends_identical(beamtime):
    root, reference = beamtime
    m = _manifest_copy(root, "sigkill")
    cmd = [sys.executable, "-m", "spndi_dask.cli", "run", str(m.source), "--stages", STAGES]
    cmd += ["--workers", "2", "--no-performance-report"]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "] reduce" in line:
            time.sleep(1.5)  # into the reduce computation
            break
    os.killpg(proc.pid, signal.SIGKILL)  # the run, its LocalCluster and every worker
    proc.wait(timeout=30)
    assert any("] reduce" in line for line in seen), "".join(seen)
    assert read_lock(m.output_dir)["pid"] == proc.pid  # the dead run's lock is left behind
    # the re-run takes the stale lock over and finishes what was not complete
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "stale lock" in again.stderr + again.stdout
    assert re.search(r"ingest +up to date", again.stdout)
    _assert_identical(_maps(m), reference)
    assert read_lock(m.output_dir) is None


def test_corrupt_chunk_fails_that_particle_with_a_clear_message(beamtime):
    root, reference = beamtime
    m = _manifest_copy(root, "corrupt")
    with open_cluster(n_workers=2, dashboard_address="127.0.0.1:0") as s:
        run(m, s.client, stages="ingest", options=RunOptions(progress=False))
        frames = m.output_dir / "raw.zarr" / "p1" / "frames" / "c"
        chunks = sorted(c for c in frames.rglob("*") if c.is_file())
        chunk = chunks[len(chunks) // 3]
        data = bytearray(chunk.read_bytes())
        data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)  # a damaged sector
        chunk.write_bytes(bytes(data))
        results = run(m, s.client, stages="reduce-stats", options=RunOptions(progress=False))
    reduce = next(r for r in results if r.stage == "reduce")
    assert reduce.scans == {"p1": "failed", "p2": "reduced"}
    msg = reduce.errors["p1"]
    assert "is damaged" in msg and f"{m.output_dir / 'raw.zarr' / 'p1'}/frames, angle index" in msg
    assert f"spndi verify {m.source}" in msg
    stats = next(r for r in results if r.stage == "stats")
    assert stats.scans == {"p2": "done"}  # p1 skipped the later stage, p2 went on
    p2 = _maps(m, ["p2"])
    _assert_identical(p2, {k: v for k, v in reference.items() if k.startswith("p2/")})
