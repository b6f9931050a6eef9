"""`spndi run`: cluster configs, the stage pipeline, failure isolation, logs and bad input."""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path

import pytest

from spndi_dask import cli
from spndi_dask.dask_clusters import (
    ClusterConfigError,
    ClusterStartError,
    available_configs,
    load_cluster_config,
    open_cluster,
)
from spndi_dask.pipeline import RunOptions, parse_stages, run, run_logging
from spndi_dask.simulate import preset, simulate_beamtime


# -- cluster configs ----------------------------------------------------------------------------
def test_builtin_configs_are_listed_and_typed():
    configs = available_configs()
    assert {"local", "slurm", "slurm-gpu", "pbs", "mpi"} <= set(configs)
    assert load_cluster_config(None).type == "local"
    assert load_cluster_config("slurm-gpu").type == "slurm"
    assert load_cluster_config("tcp://10.1.2.3:8786").type == "address"


def test_missing_config_lists_the_available_ones(capsys):
    with pytest.raises(ClusterConfigError, match=r"no cluster config named 'sulrm'.*slurm-gpu"):
        load_cluster_config("sulrm")
    with pytest.raises(ClusterConfigError, match="does not exist"):
        load_cluster_config("/no/such/cluster.yaml")
    # the CLI prints the same message and exits 2, before reading the manifest
    assert cli.main(["run", "x.toml", "--cluster", "sulrm"]) == 2
    assert "available: local, mpi, pbs, slurm, slurm-gpu" in capsys.readouterr().err


def test_jobqueue_settings_merge_defaults_file_environment(monkeypatch):
    c = load_cluster_config("slurm")
    # from dask-jobqueue's defaults (not in the file) and from the file
    assert c.jobqueue["shebang"] == "#!/usr/bin/env bash"
    assert c.jobqueue["name"] == "dask-worker"
    assert c.jobqueue["cores"] == 8 and c.jobqueue["walltime"] == "02:00:00"
    monkeypatch.setenv("DASK_JOBQUEUE__SLURM__CORES", "2")
    monkeypatch.setenv("DASK_JOBQUEUE__SLURM__JOB_EXTRA_DIRECTIVES", '["--qos=low"]')
    c = load_cluster_config("slurm")
    assert c.jobqueue["cores"] == 2 and c.jobqueue["job-extra-directives"] == ["--qos=low"]
    assert c.jobqueue["memory"] == "32GiB"  # the file's value where the environment is silent


def test_user_config_folder_and_bad_content(tmp_path, monkeypatch):
    (tmp_path / "mine.yaml").write_text("spndi:\n  type: slurm\njobqueue:\n  pbs:\n    cores: 2\n")
    (tmp_path / "odd.yaml").write_text("spndi:\n  type: kubernetes\n")
    monkeypatch.setenv("SPNDI_CLUSTER_CONFIGS", str(tmp_path))
    assert available_configs()["mine"] == tmp_path / "mine.yaml"
    with pytest.raises(ClusterConfigError, match=r"jobqueue settings for pbs.*jobqueue: slurm"):
        load_cluster_config("mine")
    with pytest.raises(ClusterConfigError, match=r"spndi.type is 'kubernetes'"):
        load_cluster_config("odd")


def _job_script(name: str, **overrides) -> str:
    from spndi_dask.dask_clusters import _jobqueue_cluster

    cluster = _jobqueue_cluster(load_cluster_config(name), overrides)
    try:
        return cluster.job_script()
    finally:
        cluster.close()


def test_job_scripts_request_gpus_resources_and_retire_before_walltime():
    gpu = _job_script("slurm-gpu", walltime="01:00:00")
    assert "#SBATCH --gres=gpu:1" in gpu and "--resources GPU=1" in gpu
    # lifetime = walltime − 10 min margin, staggered by ± 5 min: retired before SLURM kills it
    assert "--lifetime 3000s --lifetime-stagger 300s" in gpu
    assert "--local-directory ${TMPDIR:-/tmp}" in gpu
    pbs = _job_script("pbs", queue="short")
    assert "#PBS -q short" in pbs and "#PBS -l select=1:ncpus=8:mem=32GB" in pbs
    assert "#PBS -l walltime=02:00:00" in pbs
    with pytest.raises(ClusterConfigError, match=r"shorter than 1\.5 x lifetime_margin"):
        _job_script("slurm", walltime="00:12:00")


def test_unreachable_scheduler_is_a_clear_error(capsys):
    t0 = time.perf_counter()
    with pytest.raises(
        ConnectionError, match=r"cannot reach the dask scheduler at tcp://127\.0\.0\.1:9"
    ):
        with open_cluster("tcp://127.0.0.1:9"):
            pass
    assert time.perf_counter() - t0 < 30
    assert cli.main(["stats", "x.toml", "--cluster", "tcp://127.0.0.1:9"]) == 2


def test_mpi_without_dask_mpi_says_what_to_install():
    try:
        import dask_mpi  # noqa: F401

        pytest.skip("dask-mpi is installed")
    except ImportError:
        pass
    with pytest.raises(ClusterStartError, match=r"pip install 'spndi_dask\[mpi\]'"):
        with open_cluster("mpi"):
            pass


def test_parse_stages_rejects_unknown_names():
    assert parse_stages(None)[0] == "ingest" and parse_stages(None)[-1] == "report"
    assert parse_stages(["analyze-cluster"]) == ["cluster", "analyze"]
    with pytest.raises(ValueError, match="unknown stage 'reduction'"):
        parse_stages(["reduction"])


# -- logs ---------------------------------------------------------------------------------------
def _log_on_worker(text: str) -> str:
    logging.getLogger("spndi_dask.worker_check").info(text)
    return "logged"


def test_worker_log_records_reach_the_run_log(tmp_path):
    with open_cluster(n_workers=1, dashboard_address="127.0.0.1:0") as session:
        with run_logging(tmp_path, session.client) as paths:
            assert session.client.submit(_log_on_worker, "hello from a worker").result()
            time.sleep(1.0)  # forwarded records travel as scheduler events
        log = paths["log"].read_text()
        assert "hello from a worker" in log
        assert "MainProcess" not in log.split("hello from a worker")[0].splitlines()[-1]
        report = paths["dask_report"].read_text()
        assert "<html" in report.lower() and "Task Stream" in report
        # workers reuse buffers below 4 MiB (dask's 64 KiB trim alone doubled decode times)
        env = session.client.run(_malloc_env)
        assert set(env.values()) == {(str(4 * 2**20), str(16 * 2**20))}
        # the one single-threaded worker runs on the first usable core, its threads included
        cores = session.client.run(_affinities)
        assert list(cores.values()) == [{min(os.sched_getaffinity(0))}]


def test_collections_run_as_they_are_built_and_a_failure_stays_alone(tmp_path):
    import dask

    from spndi_dask.compute import compute_as_completed, compute_each

    marker = tmp_path / "first-ran"

    def items(wait_for_first: bool):
        yield "first", dask.delayed(_touch)(str(marker))
        if wait_for_first:  # the first must already run while this one is being built
            deadline = time.monotonic() + 20
            while not marker.exists():
                assert time.monotonic() < deadline, "the first collection was not submitted"
                time.sleep(0.05)
        yield "bad", dask.delayed(_fail)("no such frame")
        yield "last", dask.delayed(sum)([1, 2])

    released = tmp_path / "released"

    def slow_then_fast():
        yield "slow", dask.delayed(_wait_for)(str(released))
        yield "fast", dask.delayed(sum)([2, 3])

    with open_cluster(
        n_workers=1, threads_per_worker=2, dashboard_address="127.0.0.1:0"
    ) as session:
        # one queued root task per thread (reduce's blocks then run where their tile is)
        saturation = session.client.run_on_scheduler(_worker_saturation)
        assert saturation == 1.0
        out = {tag: (value, exc) for tag, value, exc in compute_as_completed(items(True))}
        assert out["first"] == (str(marker), None) and out["last"] == (3, None)
        assert out["bad"][0] is None and "no such frame" in str(out["bad"][1])
        # results stream in the order they finish, with the progress bar too
        got = []
        for tag, value, _ in compute_as_completed(slow_then_fast(), progress=True):
            got.append((tag, value))
            if tag == "fast":
                released.touch()
        assert got == [("fast", 5), ("slow", "released")]
        # in the order given; equal collections each get their result
        same = dask.delayed(sum)([1, 2])
        assert compute_each([same, dask.delayed(len)("ab"), same]) == [
            (3, None),
            (2, None),
            (3, None),
        ]
    # without a client: one after another, same results
    marker.unlink()
    out = {tag: (value, exc) for tag, value, exc in compute_as_completed(items(False))}
    assert out["first"] == (str(marker), None) and out["last"] == (3, None)
    assert isinstance(out["bad"][1], ValueError)


def _touch(path: str) -> str:
    Path(path).touch()
    return path


def _fail(message: str) -> None:
    raise ValueError(message)


def _wait_for(path: str) -> str:
    deadline = time.monotonic() + 20
    while not Path(path).exists():
        if time.monotonic() > deadline:
            return "timed out"
        time.sleep(0.05)
    return "released"


def _worker_saturation(dask_scheduler) -> float:
    return dask_scheduler.WORKER_SATURATION


def _affinities() -> set[int]:
    cpus = set()
    for tid in os.listdir("/proc/self/task"):
        cpus |= os.sched_getaffinity(int(tid))
    return cpus


def _malloc_env() -> tuple[str | None, str | None]:
    return os.environ.get("MALLOC_MMAP_THRESHOLD_"), os.environ.get("MALLOC_TRIM_THRESHOLD_")


# -- the pipeline on a small beamtime ------------------------------------------------------------
@pytest.fixture(scope="module")
def beamtime(tmp_path_factory):
    """Three tiny particles; p3's files for one angle are gone (ingest must fail for it only)."""
    out = tmp_path_factory.mktemp("pipeline")
    m = simulate_beamtime(out, preset("tiny", n_particles=3, train_epochs=3), scheduler="sync")
    (out / "raw" / "p3" / "angle_004.h5").unlink()
    return out, m


@pytest.mark.slow
def test_run_isolates_a_bad_particle_and_reruns_in_seconds(beamtime, capsys, monkeypatch):
    out, m = beamtime
    monkeypatch.chdir(out)
    args = ["run", str(out / "beamtime.toml"), "-k", "2", "--workers", "2"]
    assert cli.main(args) == 1  # p3 failed: non-zero exit, the others completed
    text = capsys.readouterr().out
    assert "[1/9] ingest" in text and "[9/9] report" in text
    summary = re.split(r"stage +status", text)[1]
    assert re.search(r"ingest +failed", summary) and "p3" in summary
    for stage in ("reduce", "stats", "encode"):
        assert any(line.startswith(stage) and "p1, p2" in line for line in summary.splitlines())
    assert re.search(r"cluster +clustered", summary) and re.search(r"report +written", summary)
    results = m.output_dir
    assert (results / "report" / "index.html").is_file()
    assert len(list((results / "logs").glob("run-*.log"))) == 1
    # the run log has the epochs as they went and ends with the summary table; no bar escapes
    log = next((results / "logs").glob("run-*.log")).read_text()
    assert re.search(r"epoch +1/3 +train .*at most", log) and "\r" not in log
    assert re.search(r"summary:\nstage +status", log) and log.rstrip().split("\n")[-1].startswith(
        "total"
    )
    assert len(list((results / "logs").glob("run-*-dask.html"))) == 1
    # spndi status: p3 failed at ingest (from the last run), the others are done
    assert cli.main(["status", str(out / "beamtime.toml")]) == 0
    table: dict[str, list[str]] = {}
    for line in capsys.readouterr().out.splitlines()[1:]:
        if line and not line.startswith(" "):  # the table, not the notes under it
            table.setdefault(line.split()[0], line.split()[1:])
    assert table["scan"] == ["ingest", "reduce", "stats", "features", "cluster", "analysis"]
    assert table["p1"] == ["done"] * 6 and table["p2"] == ["done"] * 6
    assert table["p3"][0] == "failed" and table["p3"][1] == "not"
    # a second run of the finished beamtime does no work again
    t0 = time.perf_counter()
    assert cli.main([*args, "--scans", "p1", "p2", "--no-performance-report"]) == 0
    rerun = capsys.readouterr().out
    assert time.perf_counter() - t0 < 30
    for stage in ("ingest", "reduce", "stats", "train", "encode", "cluster", "analyze"):
        assert any(
            line.startswith(stage) and "up to date" in line for line in rerun.splitlines()
        ), (stage, rerun)
    # the re-run keeps the timings of the run that did the work, and shows itself separately
    worked = json.loads((results / "logs" / "stage-timings.json").read_text())
    statuses = [r["status"] for r in worked["reduce"]["rows"]]
    assert "reduced" in statuses and "up to date" not in statuses, worked["reduce"]
    assert worked["reduce"]["rows"][0]["seconds"] > 0
    html = (results / "report" / "index.html").read_text()
    assert "This run" in html and "up to date" in html and "reduced" in html
    last = json.loads((results / "logs" / "last-run.json").read_text())
    assert all("errors" not in s for s in last["stages"]), last  # nothing failed
    report = next(s for s in last["stages"] if s["stage"] == "report")
    assert report["outputs"]["report"].endswith("index.html")
    # a raw file rewritten after ingest makes that particle's ingest and everything after stale
    raw = out / "raw" / "p1" / "angle_000.h5"
    os.utime(raw, ns=(raw.stat().st_atime_ns, raw.stat().st_mtime_ns + 10**9))
    from spndi_dask.status import scan_status

    status = scan_status(m)
    assert status["p1"]["ingest"][0] == "stale"
    assert status["p1"]["ingest"][1].startswith(f"{raw} changed since ingest")
    assert {s for s, _ in status["p1"].values()} == {"stale"}
    assert {s for s, _ in status["p2"].values()} == {"done"}


@pytest.mark.slow
def test_failed_stage_skips_what_needs_it_and_still_reports(beamtime):
    out, m = beamtime
    with open_cluster(n_workers=1, dashboard_address="127.0.0.1:0") as session:
        results = run(
            m,
            session.client,
            stages=["encode", "cluster", "analyze", "report"],
            options=RunOptions(
                scans=["p1", "p2"], checkpoint=str(out / "missing.safetensors"), force=True
            ),
        )
    status = {r.stage: r.status for r in results}
    assert status["cluster"] == "skipped" and status["analyze"] == "skipped"
    assert status["report"] == "written"
    encode = next(r for r in results if r.stage == "encode")
    assert encode.failed
    assert "missing.safetensors" in " ".join(encode.errors.values())


def test_unknown_particle_is_refused_before_any_work(tmp_path):
    m = simulate_beamtime(tmp_path, preset("tiny", n_particles=1), scheduler="sync")
    with pytest.raises(ValueError, match=r"\['nope'\] are not in the manifest"):
        run(m, stages=["reduce"], options=RunOptions(scans=["nope"]))
    assert not (Path(m.output_dir) / "results.zarr").exists()
    assert os.listdir(tmp_path)  # the beamtime itself is there


# -- one writer per output ----------------------------------------------------------------------
def test_second_run_on_the_same_output_stops_and_a_stale_lock_is_taken_over(tmp_path, caplog):
    import json
    import subprocess
    import sys

    from spndi_dask.io.lock import LOCK_NAME, LockError, output_lock, read_lock

    with output_lock(tmp_path, "spndi run first.toml"):
        assert read_lock(tmp_path)["command"] == "spndi run first.toml"
        with pytest.raises(LockError, match=rf"pid {os.getpid()} .*spndi run first\.toml"):
            with output_lock(tmp_path):
                pass
    assert read_lock(tmp_path) is None  # released
    # a run killed with SIGKILL leaves its lock behind: the next run takes it over
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = {"pid": dead.pid, "host": __import__("socket").gethostname(), "created": 0.0}
    (tmp_path / LOCK_NAME).write_text(json.dumps({**lock, "started": "yesterday"}))
    with caplog.at_level(logging.WARNING, logger="spndi_dask"):
        with output_lock(tmp_path):
            assert read_lock(tmp_path)["pid"] == os.getpid()
    assert "stale lock" in caplog.text and str(dead.pid) in caplog.text


def test_cli_run_refuses_an_output_another_process_writes(tmp_path, capsys):
    import json
    import socket
    import subprocess
    import sys

    import psutil

    from spndi_dask.io.lock import LOCK_NAME

    m = simulate_beamtime(tmp_path, preset("tiny", n_particles=1), scheduler="sync")
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        holder = {
            "pid": other.pid,
            "host": socket.gethostname(),
            "created": psutil.Process(other.pid).create_time(),
            "started": "now",
            "command": "spndi run beamtime.toml (nightly)",
        }
        m.output_dir.mkdir(parents=True, exist_ok=True)
        (m.output_dir / LOCK_NAME).write_text(json.dumps(holder))
        assert cli.main(["run", str(tmp_path / "beamtime.toml")]) == 2
        err = capsys.readouterr().err
        assert f"pid {other.pid}" in err and "(nightly)" in err and "wait for it" in err
        assert not (m.output_dir / "raw.zarr").exists()  # nothing was written
    finally:
        other.kill()


def test_every_builtin_dashboard_binds_to_localhost():
    for name in ("local", "mpi"):
        opts = load_cluster_config(name).spndi[name]
        assert opts["dashboard_address"].startswith("127.0.0.1:"), name
    for name in ("slurm", "slurm-gpu", "pbs"):
        sched = load_cluster_config(name).jobqueue["scheduler-options"]
        assert sched["dashboard_address"].startswith("127.0.0.1:"), name


def test_run_refuses_an_output_spndi_did_not_write_before_writing(tmp_path, capsys):
    from spndi_dask.io.layout import ForeignOutputError

    m = simulate_beamtime(tmp_path, preset("tiny", n_particles=1), scheduler="sync")
    m.output_dir.mkdir()
    m.layout.raw.write_text("an unrelated file")
    with pytest.raises(ForeignOutputError):
        run(m, stages=["ingest", "reduce"])
    capsys.readouterr()  # (what earlier tests' log handlers left)
    assert cli.main(["run", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"error: the output folder {m.output_dir} holds data spndi did not write" in err
    assert str(m.layout.raw) in err and "Traceback" not in err
    assert [p.name for p in m.output_dir.iterdir()] == ["raw.zarr"]  # no lock, no logs
