"""SIGINT / SIGTERM stop a run promptly at any stage; the next run resumes.

The stage tests start the real command line in a subprocess on a tiny simulated beamtime (on
the default LocalCluster of processes), wait until the stage is running (an epoch line, or the
marker printed by a function of the stage that :mod:`tests.slow_stage` slows down in the
workers), send a real signal with ``os.kill`` and check the exit status, the time to exit, the
lock, the run log, the results left behind and that a second run completes. The last tests
check the mechanism (:mod:`spndi_dask.interrupt`) in this process.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import spndi_dask
from spndi_dask import interrupt
from spndi_dask.config import load_manifest
from spndi_dask.interrupt import Interrupted, check_interrupted, deferred, handle_signals, received
from spndi_dask.io.layout import OutputLayout, read_attrs
from spndi_dask.io.lock import read_lock
from spndi_dask.simulate import preset, simulate_beamtime

from .conftest import load
from .slow_stage import MARKER, VARIABLE

# patterns on a 16³ grid: an epoch of the tiny beamtime takes a fraction of a second
_SETTINGS = {"pattern_grid = 32": "pattern_grid = 16", "max_epochs = 3": "max_epochs = 2"}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """The tiny beamtime ingested, reduced, segmented and a model trained (for 2 epochs)."""
    from spndi_dask.features import train
    from spndi_dask.ingest import ingest
    from spndi_dask.particles import stats
    from spndi_dask.reduce import reduce

    root = tmp_path_factory.mktemp("interrupt")
    simulate_beamtime(root, preset("tiny"), scheduler="sync")
    path = root / "beamtime.toml"
    text = path.read_text()
    for old, new in _SETTINGS.items():
        assert old in text
        text = text.replace(old, new)
    path.write_text(text)
    m = load_manifest(path)
    ingest(m)
    reduce(m)
    stats(m, figures=False)
    train(m)
    return root


def _beamtime(root: Path, tag: str, *, copy: bool = True, **replace: str) -> Path:
    """A manifest writing to ``results-<tag>`` (a copy of the prepared results if ``copy``)."""
    text = (root / "beamtime.toml").read_text()
    text = text.replace('output = "results"', f'output = "results-{tag}"', 1)
    for old, new in replace.items():
        text = text.replace(old, new)
    path = root / f"beamtime-{tag}.toml"
    path.write_text(text)
    if copy:
        shutil.copytree(root / "results", root / f"results-{tag}", ignore=_no_logs)
    return path


def _no_logs(folder: str, names: list[str]) -> list[str]:
    return [n for n in names if n in ("logs", ".spndi.lock")]


ROOT = Path(spndi_dask.__file__).parents[1]  # the subprocesses run this copy of the package


def _env(slow: str | None = None) -> dict[str, str]:
    """The subprocess's environment; ``slow`` (``module:function:seconds``) slows the workers'."""
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env = {**os.environ, "PYTHONPATH": path}
    if slow:
        env.update({VARIABLE: slow, "DASK_DISTRIBUTED__WORKER__PRELOAD": '["tests.slow_stage"]'})
    return env


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "spndi_dask.cli", *args]


def _interrupt(
    cmd: list[str],
    marker: str,
    sig: int,
    *,
    slow: str | None = None,
    group: bool = False,
    settle: float = 0.3,
) -> tuple[int, float, str, str]:
    """Start ``cmd``, wait for ``marker`` on stdout and ``settle`` seconds, send ``sig``.

    Returns the exit code, the seconds from the signal to the exit, stdout and stderr.
    ``slow`` slows a function of the workers down (:mod:`tests.slow_stage`); ``group`` sends
    the signal to the whole process group, as Ctrl-C in a terminal does.
    """
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            start_new_session=True,
            env=_env(slow),
        )
        seen = []
        try:
            for line in proc.stdout:
                seen.append(line)
                if marker in line:
                    break
            else:
                pytest.fail(f"{marker!r} never printed:\n{''.join(seen)}")
            time.sleep(settle)  # into the stage's work
            t0 = time.monotonic()
            (os.killpg if group else os.kill)(proc.pid, sig)
            out, _ = proc.communicate(timeout=60)
            seconds = time.monotonic() - t0
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        err.seek(0)
        text = err.read()
    name = signal.Signals(sig).name
    print(f"\n{name} -> exit {proc.returncode} in {seconds:.2f} s: {' '.join(cmd[-6:])}")
    return proc.returncode, seconds, "".join(seen) + out, text


def _again(manifest: Path, stages: str) -> tuple[dict[str, str], str]:
    """A second run of ``stages``: its stages' statuses and its log (it must succeed)."""
    cmd = _cli("run", str(manifest), "--stages", stages, "--no-performance-report")
    again = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert read_lock(load_manifest(manifest).output_dir) is None
    return _last_run(manifest), again.stderr


def _last_run(manifest: Path) -> dict[str, str]:
    out = OutputLayout(load_manifest(manifest).output_dir)
    record = json.loads(out.last_run.read_text())
    return {s["stage"]: s["status"] for s in record["stages"]}


def _assert_stopped(
    manifest: Path, stopped: tuple[int, float, str, str], stage: str, sig: int = signal.SIGINT
) -> None:
    """The checks every interrupted run passes."""
    rc, seconds, out, err = stopped
    assert rc == 128 + sig, out + err
    assert seconds < 15, f"{seconds:.1f} s from the signal to the exit"
    assert "Exception ignored" not in err and "KeyboardInterrupt" not in err, err
    assert "Interrupted" not in err and f'File "{ROOT / "spndi_dask"}' not in err, err
    name = signal.Signals(sig).name
    assert f"interrupted by {name} during {stage}; the next `spndi run` resumes" in err, err
    output = load_manifest(manifest).output_dir
    assert read_lock(output) is None and not OutputLayout(output).lock.exists()
    record = json.loads(OutputLayout(output).last_run.read_text())
    assert record["interrupted"] == {"signal": name, "stage": stage}
    assert _last_run(manifest)[stage] == "interrupted"
    for path in output.rglob("*"):  # no temporary store that reads as complete
        if path.is_dir() and ".tmp" in path.name:
            assert not ((read_attrs(path) or {}).get("spndi_dask") or {}).get("complete"), path


@pytest.mark.slow
def test_sigint_during_train_stops_the_run_and_the_next_run_resumes(prepared):
    """Ctrl-C (SIGINT to the process group) mid-training, on the default LocalCluster of
    processes, with dask's performance report: the operator's case (it ended with exit 0)."""
    manifest = _beamtime(prepared, "train", **{"max_epochs = 2": "max_epochs = 40"})
    shutil.rmtree(load_manifest(manifest).output_dir / "features")
    cmd = _cli("run", str(manifest), "--stages", "train")
    stopped = _interrupt(cmd, "epoch   1/", signal.SIGINT, group=True)
    _assert_stopped(manifest, stopped, "train")
    checkpoint = load_manifest(manifest).checkpoint
    assert not checkpoint.exists() and not list(checkpoint.parent.glob(".*.tmp"))
    # the next run trains (for 2 epochs: the interrupted one would have taken a while)
    manifest = _beamtime(prepared, "train", copy=False)
    assert _again(manifest, "train")[0] == {"train": "trained"}
    assert checkpoint.exists()


@pytest.mark.slow
def test_sigterm_during_ingest_stops_the_run_and_the_next_run_resumes(prepared):
    """SIGTERM (as a batch system or ``kill`` sends) mid-ingest: the stores stay incomplete."""
    manifest = _beamtime(prepared, "ingest", copy=False)
    cmd = _cli("run", str(manifest), "--stages", "ingest-reduce", "--no-performance-report")
    slow = "spndi_dask.ingest.write:_write_tile:0.5"
    stopped = _interrupt(cmd, MARKER, signal.SIGTERM, slow=slow, settle=1.5)  # angles done
    _assert_stopped(manifest, stopped, "ingest", signal.SIGTERM)
    assert _last_run(manifest) == {"ingest": "interrupted", "reduce": "not run"}
    output = load_manifest(manifest).output_dir
    for name in ("p1", "p2"):  # nothing that reads as ingested
        attrs = read_attrs(OutputLayout(output).raw_node(name)) or {}
        assert not (attrs.get("spndi_dask") or {}).get("complete")
    statuses, log = _again(manifest, "ingest-reduce")
    assert statuses == {"ingest": "done", "reduce": "done"}
    # it resumed: the angles written before the signal were not written again
    written = re.findall(r"writing (\d+) of 9 angles", log)
    assert len(written) == 2 and sum(map(int, written)) < 18, log


@pytest.mark.slow
def test_sigint_during_reduce_stops_the_run_and_the_next_run_resumes(prepared):
    manifest = _beamtime(prepared, "reduce")
    output = load_manifest(manifest).output_dir
    shutil.rmtree(output / "results.zarr")
    cmd = _cli("run", str(manifest), "--stages", "reduce", "--no-performance-report")
    slow = "spndi_dask.reduce.graph:_block_task:1.0"
    _assert_stopped(manifest, _interrupt(cmd, MARKER, signal.SIGINT, slow=slow), "reduce")
    for name in ("p1", "p2"):  # nothing that reads as reduced
        attrs = read_attrs(OutputLayout(output).node(name)) or {}
        assert not (attrs.get("spndi_dask") or {}).get("complete")
    assert _again(manifest, "reduce")[0] == {"reduce": "done"}


@pytest.mark.slow
def test_sigint_during_encode_stops_the_run_and_the_next_run_resumes(prepared):
    manifest = _beamtime(prepared, "encode", **{"block = 16": "block = 4"})
    output = load_manifest(manifest).output_dir
    cmd = _cli("run", str(manifest), "--stages", "encode", "--no-performance-report")
    slow = "spndi_dask.features.inference:_encode_block:0.5"
    _assert_stopped(manifest, _interrupt(cmd, MARKER, signal.SIGINT, slow=slow), "encode")
    for name in ("p1", "p2"):  # latent arrays half written, not marked encoded
        assert "features" not in (read_attrs(OutputLayout(output).node(name)) or {})
    assert _again(manifest, "encode")[0] == {"encode": "done"}


# ---- the mechanism, in this process ------------------------------------------------------------


def _signal_self(sig: int) -> None:
    """Send ``sig`` to this process and wait here until the handler has run."""
    os.kill(os.getpid(), sig)
    deadline = time.monotonic() + 5
    while received() is None and time.monotonic() < deadline:
        time.sleep(0.01)


_IN_DEL_AND_GC = r"""
import gc, os, signal, threading, time
from spndi_dask.interrupt import Interrupted, handle_signals, received

def signal_self(sig):  # send sig to this process and wait here until the handler has run
    os.kill(os.getpid(), sig)
    deadline = time.monotonic() + 5
    while received() is None and time.monotonic() < deadline:
        time.sleep(0.01)

class SignalsItselfWhenCollected:  # SIGINT from __del__, where an exception would be dropped
    def __del__(self):
        signal_self(signal.SIGINT)

before = signal.getsignal(signal.SIGINT)
try:
    with handle_signals():
        obj = SignalsItselfWhenCollected()
        del obj  # not raised inside __del__ (it would be dropped): delivered again after
        time.sleep(5)
    print("del: not raised")
except Interrupted as exc:
    print("del: raised", exc.signame, exc.exit_code)
print("restored:", signal.getsignal(signal.SIGINT) is before)
sent = []

def callback(phase, info):  # as distributed's GCDiagnosis, which broke when raised into
    if phase == "start" and not sent and threading.current_thread() is threading.main_thread():
        sent.append(True)
        signal_self(signal.SIGTERM)

gc.callbacks.append(callback)
try:
    with handle_signals():
        gc.collect()
        time.sleep(5)
    print("gc: not raised")
except Interrupted as exc:
    print("gc: raised", exc.signame)
"""


def test_a_signal_in_del_or_a_gc_callback_is_raised_after_it():
    """In a fresh interpreter (the handlers are process-wide: no other test's state)."""
    env = {**os.environ, "PYTHONPATH": str(Path(spndi_dask.__file__).parents[1])}
    out = subprocess.run(
        [sys.executable, "-c", _IN_DEL_AND_GC], capture_output=True, text=True, env=env, timeout=60
    )
    assert out.stdout.splitlines() == [
        "del: raised SIGINT 130",
        "restored: True",
        "gc: raised SIGTERM",
    ], out.stdout + out.stderr
    assert "Exception ignored" not in out.stderr


def test_an_interrupt_swallowed_where_it_arrived_is_raised_at_the_next_check_point(capfd):
    with handle_signals():
        try:
            interrupt._handler(signal.SIGINT, None)
        except Interrupted:
            pass  # what Python does with an exception raised in a place it cannot propagate
        with pytest.raises(Interrupted):
            check_interrupted()
    check_interrupted()  # outside the block: nothing


def test_training_stops_at_the_next_batch_after_a_swallowed_interrupt():
    from spndi_dask.features.model import Conv3dAutoencoder
    from spndi_dask.features.train import fit

    x = np.random.default_rng(0).random((40, 8, 8, 8), dtype=np.float32)
    epochs = []

    def on_epoch(row):  # as if the handler's exception had been dropped in a gc callback
        epochs.append(row["epoch"])
        interrupt._received(signal.SIGTERM)

    with handle_signals(), pytest.raises(Interrupted) as info:
        fit(Conv3dAutoencoder(grid=8, latent_dim=4), x, max_epochs=20, callback=on_epoch)
    assert epochs == [1] and info.value.signum == signal.SIGTERM


def test_a_replaced_handler_is_taken_back_at_the_next_check_point():
    with handle_signals():
        signal.signal(signal.SIGINT, lambda *_: sys.exit())  # what `import dask_jobqueue` does
        check_interrupted()
        with pytest.raises(Interrupted):
            _signal_self(signal.SIGINT)


def test_a_signal_inside_deferred_is_raised_when_the_block_ends():
    steps = []
    with handle_signals(), pytest.raises(Interrupted):
        with deferred():
            _signal_self(signal.SIGTERM)
            steps.append("the block went on")
        steps.append("after the block")  # pragma: no cover - not reached
    assert steps == ["the block went on"]


def test_compute_cancels_its_futures_when_interrupted():
    import dask
    from distributed import Client

    from spndi_dask.compute import compute, compute_as_completed

    @dask.delayed
    def nap(i):
        time.sleep(0.5)
        return i

    with Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address=":0") as c:

        def tasks_left():
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                n = c.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks))
                if not n:
                    return 0
                time.sleep(0.05)
            return n

        with handle_signals():  # a real signal while compute() waits for its results
            timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
            timer.start()
            with pytest.raises(Interrupted):
                compute([nap(i) for i in range(20)])
            timer.join()
        assert tasks_left() == 0
        with handle_signals():  # swallowed somewhere: the next result raises it
            with pytest.raises(Interrupted):
                for _result in compute_as_completed((i, nap(i)) for i in range(20)):
                    interrupt._received(signal.SIGINT)
        assert tasks_left() == 0


def test_the_pipeline_records_the_interrupted_stage_and_those_not_run(handmade, monkeypatch):
    from spndi_dask import pipeline

    root, data, *_ = handmade
    m = load(root, data)

    def ingest(manifest, client, options, names):
        return {n: {"status": "ingested"} for n in names}

    def reduce(manifest, client, options, names):
        raise Interrupted(signal.SIGTERM)

    monkeypatch.setitem(pipeline.STAGE_FUNCTIONS, "ingest", ingest)
    monkeypatch.setitem(pipeline.STAGE_FUNCTIONS, "reduce", reduce)
    with pytest.raises(Interrupted) as info:
        pipeline.run(m, stages="ingest-stats", options=pipeline.RunOptions(progress=False))
    assert info.value.stage == "reduce"
    record = json.loads(m.layout.last_run.read_text())
    assert record["interrupted"] == {"signal": "SIGTERM", "stage": "reduce"}
    assert [(s["stage"], s["status"]) for s in record["stages"]] == [
        ("ingest", "done"),
        ("reduce", "interrupted"),
        ("stats", "not run"),
    ]


_FORCED = """
import subprocess, sys, time
from pathlib import Path
from spndi_dask.interrupt import at_forced_exit, deferred, handle_signals

child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
with handle_signals(), at_forced_exit(lambda: Path(sys.argv[1]).unlink()):
    with deferred():  # slow cleanup that the first signal waits for
        print(child.pid, flush=True)
        time.sleep(60)
"""


def test_a_second_signal_exits_at_once_and_runs_the_forced_exit_callbacks(tmp_path):
    import psutil

    lock = tmp_path / ".spndi.lock"
    lock.write_text("{}")
    proc = subprocess.Popen(
        [sys.executable, "-c", _FORCED, str(lock)], stdout=subprocess.PIPE, text=True, env=_env()
    )
    child = int(proc.stdout.readline())
    proc.send_signal(signal.SIGINT)
    time.sleep(0.2)
    assert proc.poll() is None  # the first waits for the deferred block
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=10) == 130 and time.monotonic() - t0 < 3
    assert not lock.exists()

    def gone() -> bool:  # killed: no such process, or a zombie not yet reaped
        try:
            return psutil.Process(child).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    deadline = time.monotonic() + 5  # a SIGKILL takes effect asynchronously (a loaded machine)
    while not gone() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gone()
