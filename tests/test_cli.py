import argparse
import re
import subprocess
import sys

import numpy as np
import pytest

from spndi_dask.cli import main
from spndi_dask.io.raw_store import open_raw
from spndi_dask.reduce import open_results

from .conftest import load, manifest_dict, write_angle_files


def run(*args):
    return subprocess.run(
        [sys.executable, "-m", "spndi_dask.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_help_lists_subcommands():
    out = run("--help")
    assert out.returncode == 0
    commands = "demo run simulate ingest reduce stats train encode cluster analyze report export"
    for cmd in commands.split():
        assert cmd in out.stdout


def test_bad_manifest_exit_code(tmp_path, capsys):
    path = tmp_path / "bt.toml"
    path.write_text('name = "x"\nbogus = 1\n')
    assert main(["ingest", str(path)]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'bogus'" in err and "scans is required" in err


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    out = run("demo", str(tmp_path / "demo"), "--preset", "tiny", "--workers", "2")
    assert out.returncode == 0, out.stderr
    assert "dask dashboard: http://127.0.0.1:" in out.stdout
    assert "demo done" in out.stdout
    # the demo is simulate + `spndi run`: every stage, the summary table, the report
    assert "[10/10] report" in out.stdout and re.search(r"report +written", out.stdout)
    assert (tmp_path / "demo/results/report/index.html").stat().st_size > 100_000
    ds = open_raw(tmp_path / "demo/results", "p2")
    assert ds.attrs["spndi_dask"]["complete"]
    assert int(ds.frames.sum()) > 0
    again = run("ingest", str(tmp_path / "demo/beamtime.toml"), "--workers", "1")
    assert again.returncode == 0 and again.stdout.count("up to date") == 2
    assert np.array_equal(open_raw(tmp_path / "demo/results", "p2").frames.values, ds.frames.values)
    # the demo trained a model and encoded every pixel with signal
    res = open_results(tmp_path / "demo/results", "p1")
    assert res["latent"].dims == ("y", "x", "feature")
    assert np.isfinite(res["latent"].values[res["valid"].values]).all()
    manifest = str(tmp_path / "demo/beamtime.toml")
    again = run("train", manifest, "--workers", "1")
    assert again.returncode == 0 and "model up to date" in again.stdout, again.stderr
    again = run("encode", manifest, "--workers", "1")
    assert again.returncode == 0 and again.stdout.count("up to date") == 2, again.stderr
    y, x = np.argwhere(res["valid"].values)[0]
    ply = run("export-ply", manifest, "p1", "--pixel", str(y), str(x), "--label", "1")
    assert ply.returncode == 0, ply.stderr
    assert ply.stdout.split() == [
        str(tmp_path / f"demo/results/ply/p1_y{y}_x{x}.ply"),
        str(tmp_path / "demo/results/ply/p1_label1.ply"),
    ]
    ply = run("export", "ply", manifest, "p1", "--label", "1")  # the new name of export-ply
    assert ply.returncode == 0 and ply.stdout.split() == [
        str(tmp_path / "demo/results/ply/p1_label1.ply")
    ], ply.stderr
    bad = run("encode", manifest, "--checkpoint", str(tmp_path / "nothing.pt"))
    assert bad.returncode == 2 and "nothing.pt does not exist" in bad.stderr


def test_a_particle_that_fails_a_stage_is_named_and_the_exit_code_is_1(tmp_path, capsys):
    rng = np.random.default_rng(0)
    frames = rng.poisson(2.0, size=(2, 3, 3, 6, 6)).astype(np.uint16)
    write_angle_files(tmp_path, frames, name="good")
    data = manifest_dict("good", n_angles=2, scan_shape=(3, 3))
    bad = manifest_dict("bad", n_angles=2, scan_shape=(3, 3))["scans"]
    data["scans"] += bad  # no frame files written for 'bad'
    path = tmp_path / "beamtime.toml"
    path.write_text(load(tmp_path, data).to_toml())
    assert main(["ingest", str(path), "--workers", "1"]) == 1
    out, err = capsys.readouterr()
    assert "good            ingested" in out and "bad             failed" in out
    assert "error: ingest failed for 1 of 2 scan(s): bad" in err
    # a stage that refuses its input as a whole: exit code 2 and the message, no traceback
    assert main(["cluster", str(path), "--workers", "1"]) == 2
    assert "run `spndi reduce" in capsys.readouterr().err


def test_a_folder_stands_for_its_manifest(tmp_path, capsys):
    # what a newcomer types after `spndi demo`: the folder, not the TOML file in it
    path = tmp_path / "beamtime.toml"
    path.write_text(load(tmp_path, manifest_dict(n_angles=2, scan_shape=(3, 3))).to_toml())
    assert main(["status", str(tmp_path)]) == 0
    assert f"test: {tmp_path / 'results'}" in capsys.readouterr().out
    empty = tmp_path / "empty"
    empty.mkdir()
    for command in ("run", "status", "ingest", "report"):
        assert main([command, str(empty)]) == 2
        err = capsys.readouterr().err
        assert f"error: {empty} is a folder without a beamtime manifest" in err
        assert str(empty / "beamtime.toml") in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "verbose", "quiet"),
    [
        (["status", "b.toml"], 0, False),
        (["-v", "status", "b.toml"], 1, False),
        (["status", "b.toml", "-vv"], 2, False),
        (["run", "b.toml", "--verbose"], 1, False),
        (["verify", "b.toml", "-q"], 0, True),
        (["-q", "reduce", "b.toml"], 0, True),
    ],
)
def test_verbosity_flags_are_accepted_before_and_after_the_subcommand(argv, verbose, quiet):
    from spndi_dask.cli import _parser

    args = _parser().parse_args(argv)
    assert (args.verbose, args.quiet) == (verbose, quiet)


def test_every_subcommand_lists_the_verbosity_flags_in_its_help(capsys):
    from spndi_dask.cli import _parser

    parser = _parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    for name in commands:
        with pytest.raises(SystemExit):
            parser.parse_args([name, "--help"])
        out = capsys.readouterr().out
        assert "-v, --verbose" in out and "-q, --quiet" in out, name


def test_progress_bars_only_on_a_terminal(monkeypatch, tmp_path, capfd):
    import io

    from spndi_dask.cli.common import _run_options
    from spndi_dask.simulate import preset, simulate_beamtime

    class Tty(io.StringIO):
        def isatty(self):
            return True

    args = argparse.Namespace()
    assert _run_options(args).progress is False  # pytest's captured stdout is not a terminal
    monkeypatch.setattr("sys.stdout", Tty())
    assert _run_options(args).progress is True
    monkeypatch.undo()
    cfg = preset("tiny", n_particles=1, n_angles=3)
    simulate_beamtime(tmp_path / "quiet", cfg, scheduler="sync")
    assert "%" not in capfd.readouterr().out
    simulate_beamtime(tmp_path / "bar", cfg, scheduler="sync", progress=True)
    assert "100% Completed" in capfd.readouterr().out
