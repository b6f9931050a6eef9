import subprocess
import sys

import numpy as np
import pytest

from spndi_dask.cli import main
from spndi_dask.io.raw_store import open_raw


def run(*args):
    return subprocess.run(
        [sys.executable, "-m", "spndi_dask.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_help_lists_subcommands():
    out = run("--help")
    assert out.returncode == 0
    for cmd in ("demo", "simulate", "ingest"):
        assert cmd in out.stdout


def test_bad_manifest_exit_code(tmp_path, capsys):
    path = tmp_path / "bt.toml"
    path.write_text('name = "x"\nbogus = 1\n')
    assert main(["ingest", str(path)]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'bogus'" in err and "particles is required" in err


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    out = run("demo", str(tmp_path / "demo"), "--preset", "tiny", "--workers", "2")
    assert out.returncode == 0, out.stderr
    assert "dask dashboard: http://127.0.0.1:" in out.stdout
    assert "demo done" in out.stdout
    ds = open_raw(tmp_path / "demo/results", "p2")
    assert ds.attrs["spndi_dask"]["complete"]
    assert int(ds.frames.sum()) > 0
    again = run("ingest", str(tmp_path / "demo/beamtime.toml"), "--workers", "1")
    assert again.returncode == 0 and again.stdout.count("up to date") == 2
    assert np.array_equal(open_raw(tmp_path / "demo/results", "p2").frames.values, ds.frames.values)
