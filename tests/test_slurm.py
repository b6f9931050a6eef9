"""`spndi run --cluster slurm` on a real one-node SLURM cluster: workers are SLURM jobs.

The harness (tests/slurm_harness.py) installs Debian's slurm-wlm and munge when absent, starts
munged, slurmctld and slurmd with a private configuration and stops what it started.
"""

from __future__ import annotations

import os
import re
import time

import numpy as np
import pytest

from spndi_dask import cli
from spndi_dask.dask_clusters import ClusterStartError, open_cluster
from spndi_dask.pipeline import RunOptions, run
from spndi_dask.reduce import open_results
from spndi_dask.simulate import preset, simulate_beamtime
from tests.slurm_harness import one_node_slurm, skip_reason

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.slow,
    pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason())),
]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    with one_node_slurm(tmp_path_factory.mktemp("slurm"), gpus=1, cpus=2) as node:
        yield node


@pytest.fixture
def small_jobs(slurm, tmp_path, monkeypatch):
    """The built-in configs sized for this 2-core node through DASK_JOBQUEUE__SLURM__*."""
    logs = tmp_path / "job-logs"
    for key, value in {
        "QUEUE": slurm.partition,
        "CORES": "1",
        "PROCESSES": "1",
        "MEMORY": "4GiB",
        "WALLTIME": "00:30:00",
        "INTERFACE": "lo",
        "LOG_DIRECTORY": str(logs),
        "DEATH_TIMEOUT": "60",
    }.items():
        monkeypatch.setenv(f"DASK_JOBQUEUE__SLURM__{key}", value)
    return logs


def _assert_jobs_end(slurm, timeout: float = 60) -> None:
    """The worker jobs are cancelled when the run ends (SLURM drops them within seconds)."""
    deadline = time.monotonic() + timeout
    while slurm.job_ids() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not slurm.job_ids(), slurm.run("squeue", "-h").stdout


def test_run_on_slurm_workers(slurm, small_jobs, tmp_path, capsys):
    m = simulate_beamtime(tmp_path / "bt", preset("tiny", n_particles=2, train_epochs=3))
    manifest = str(tmp_path / "bt" / "beamtime.toml")
    assert cli.main(["run", manifest, "--cluster", "slurm", "--workers", "2", "-k", "2"]) == 0
    out = capsys.readouterr().out
    assert "dask cluster: slurm (slurm), 2 worker(s)" in out
    assert re.search(r"report +written", out)
    # the workers were SLURM jobs: one log file per job, each from a dask worker
    job_logs = sorted(small_jobs.glob("*.out")) + sorted(small_jobs.glob("*.err"))
    assert len({p.stem for p in job_logs}) >= 2, slurm.logs()
    assert any("distributed.worker" in p.read_text() for p in job_logs)
    assert "sched: Allocate JobId" in (slurm.log_dir / "slurmctld.log").read_text()
    for name in ("p1", "p2"):
        ds = open_results(m.output_dir, name)
        assert int((ds["cluster"] >= 0).sum()) > 0
    assert (m.output_dir / "report" / "index.html").is_file()
    _assert_jobs_end(slurm)  # every worker job ended with the run


def _visible_gpus() -> str | None:
    return os.environ.get("CUDA_VISIBLE_DEVICES")  # read in the worker process


def test_gpu_config_requests_gres_and_routes_encode_to_gpu_workers(slurm, small_jobs, tmp_path):
    m = simulate_beamtime(tmp_path / "bt", preset("tiny", n_particles=1, train_epochs=2))
    with open_cluster("slurm-gpu", n_workers=1) as session:
        client = session.client
        workers = client.scheduler_info(n_workers=-1)["workers"].values()
        assert [w["resources"] for w in workers] == [{"GPU": 1}]
        # SLURM gave the job the (fake) GPU: it set the job's visible devices
        assert list(client.run(_visible_gpus).values()) == ["0"]
        results = run(m, client, stages="ingest-encode", options=RunOptions(progress=False))
    status = {r.stage: r for r in results}
    assert not any(r.failed for r in results), [(r.stage, r.errors) for r in results]
    assert status["encode"].scans == {"p1": "encoded"}
    # no CUDA behind the fake GPU: the worker encoded on its CPU, the latents are finite
    latent = open_results(m.output_dir, "p1")["latent"].values
    assert np.isfinite(latent).all(axis=-1).sum() > 0


def test_refused_submission_shows_slurms_message(slurm, small_jobs, tmp_path, monkeypatch, capsys):
    with pytest.raises(ClusterStartError, match="invalid partition specified: nosuchpartition"):
        with open_cluster("slurm", n_workers=1, jobqueue={"queue": "nosuchpartition"}):
            pass
    simulate_beamtime(tmp_path, preset("tiny", n_particles=1), scheduler="sync")
    monkeypatch.setenv("DASK_JOBQUEUE__SLURM__MEMORY", "4000GiB")
    assert cli.main(["run", str(tmp_path / "beamtime.toml"), "--cluster", "slurm"]) == 2
    err = capsys.readouterr().err
    assert "SLURM scheduler refused" in err
    assert "Requested node configuration is not available" in err
    assert "#SBATCH --mem=4000G" in err  # the job script it refused
    _assert_jobs_end(slurm)
