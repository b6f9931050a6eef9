"""Operations scripts: the nightly wrapper (cron/systemd/sbatch call it) quotes everything."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from datetime import date
from pathlib import Path

import pytest

from spndi_dask.simulate import preset, simulate_beamtime

OPS = Path(__file__).parents[1] / "scripts" / "ops"


@pytest.mark.parametrize("script", ["spndi-nightly.sh", "spndi-nightly.sbatch"])
def test_scripts_parse(script):
    assert subprocess.run(["bash", "-n", str(OPS / script)]).returncode == 0


def test_nightly_wrapper_logs_to_a_dated_file_and_never_evaluates_paths(tmp_path):
    spndi = shutil.which("spndi")
    if spndi is None:
        pytest.skip("the spndi command is not installed")
    # a folder whose name would run a command if it ever reached a shell unquoted
    hostile = tmp_path / "beam time $(touch PWNED) `touch PWNED2`"
    simulate_beamtime(hostile, preset("tiny", n_particles=1), scheduler="sync")
    env = {**os.environ, "SPNDI": spndi, "SPNDI_LOG_DIR": str(tmp_path / "logs")}
    args = [str(OPS / "spndi-nightly.sh"), str(hostile / "beamtime.toml")]
    proc = subprocess.run(
        [*args, "--stages", "report", "--no-performance-report"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    log = tmp_path / "logs" / f"nightly-{date.today():%Y-%m-%d}.log"
    assert proc.returncode == 0, (proc.stderr, log.read_text() if log.exists() else "")
    text = log.read_text()
    assert re.search(r"report +written", text) and "exit 0" in text
    assert (hostile / "results" / "report" / "index.html").is_file()
    assert not list(tmp_path.rglob("PWNED*"))
    # a missing manifest: exit 2 with a message, nothing run
    bad = subprocess.run(
        [str(OPS / "spndi-nightly.sh"), str(tmp_path / "nope.toml")],
        env=env,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "not found" in bad.stderr
