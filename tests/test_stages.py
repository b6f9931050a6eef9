"""The stage table: the one contract that pipeline, status, report and the CLI read."""

from __future__ import annotations

import json

import pytest

from spndi_dask.analysis import AnalysisError
from spndi_dask.cli import _parser
from spndi_dask.cli.common import _run_options
from spndi_dask.cluster import ClusterError
from spndi_dask.features import CheckpointError, FeatureError
from spndi_dask.ingest import IngestError
from spndi_dask.io.raw_store import IncompleteError
from spndi_dask.io.sources import SourceError
from spndi_dask.particles import ParticleError
from spndi_dask.pipeline import STAGE_FUNCTIONS, StageResult
from spndi_dask.reduce import ReduceError
from spndi_dask.stages import STAGES, Outcome, StageError, parse_stages, stage
from spndi_dask.status import STATUS_STAGES


def test_every_stage_but_the_report_has_a_pipeline_function_and_needs_earlier_stages():
    assert set(STAGE_FUNCTIONS) == {s.name for s in STAGES} - {"report"}
    order = [s.name for s in STAGES]
    for s in STAGES:
        assert all(order.index(n) < order.index(s.name) for n in s.needs), s.name


def test_status_columns_are_the_stages_that_record_completion_per_scan():
    assert STATUS_STAGES == ("ingest", "reduce", "stats", "encode", "cluster", "analyze")
    assert stage("features").attrs_key == "features" and stage("analysis").attrs_key == "analysis"


def test_every_stage_has_a_subcommand_with_its_options():
    sub = next(a for a in _parser()._actions if a.dest == "command").choices
    for s in STAGES:
        p = sub[s.name]
        assert p.description == s.description
        flags = {f for a in p._actions for f in a.option_strings}
        if s.name != "report":
            assert {"--scans", "--force", "--cluster", "--workers"} <= flags
        assert ("--no-figures" in flags) == ("figures" in s.options)
        assert ("-k" in flags) == ("k" in s.options)
        assert ("--checkpoint" in flags) == ("checkpoint" in s.options)
        assert ("--device" in flags) == ("device" in s.options)
        assert ("--weights" in flags) == (s.name == "train")
    args = _parser().parse_args(["train", "beamtime.toml", "--weights", "study.pkl"])
    assert _run_options(args).weights == "study.pkl"


def test_stage_names_aliases_and_ranges():
    assert parse_stages("features-cluster") == ["encode", "decompose", "cluster"]
    assert parse_stages(["analysis", "segment"]) == ["stats", "analyze"]
    assert parse_stages(None) == [s.name for s in STAGES]
    with pytest.raises(ValueError, match=r"unknown stage 'reduction'.*aliases: particles=stats"):
        parse_stages("ingest-reduction")


def test_outcome_reads_and_serialises_as_its_value():
    assert json.loads(json.dumps({"p1": Outcome.UP_TO_DATE})) == {"p1": "up to date"}
    assert f"{Outcome.REDUCED:<9}|" == "reduced  |" and repr(Outcome.DONE) == "'done'"
    assert Outcome("clustered") is Outcome.CLUSTERED
    with pytest.raises(ValueError):
        Outcome("finished")
    r = StageResult("reduce", Outcome.DONE, scans={"p1": Outcome.FAILED, "p2": Outcome.REDUCED})
    assert r.failed and [row["status"] for row in r.rows()] == ["failed", "reduced"]


@pytest.mark.parametrize(
    "error",
    [
        IngestError,
        SourceError,
        IncompleteError,
        ReduceError,
        ParticleError,
        FeatureError,
        CheckpointError,
        ClusterError,
        AnalysisError,
    ],
)
def test_every_stage_error_is_a_stage_error(error):
    assert issubclass(error, StageError)
    assert error is not StageError and issubclass(error, (ValueError, RuntimeError))


def test_stage_table_is_cheap_to_import():
    import subprocess
    import sys

    code = "import sys, spndi_dask.stages; print(sorted({'numpy', 'dask'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_old_particles_flag_is_a_hidden_alias_of_scans(tmp_path, capsys):
    parser = _parser()
    for argv in (["run", "bt.toml"], ["reduce", "bt.toml"], ["verify", "bt.toml"],
                 ["export", "tiff", "bt.toml"]):  # fmt: skip
        new = parser.parse_args([*argv, "--scans", "p1", "p2"])
        old = parser.parse_args([*argv, "--particles", "p1", "p2"])
        assert new.scans == old.scans == ["p1", "p2"]
        assert not hasattr(new, "deprecated") and len(old.deprecated) == 1
        assert "--particles is deprecated: use --scans" in old.deprecated[0]
    assert parser.parse_args(["view", "out", "--particles", "p1,p2"]).scans == ["p1", "p2"]
    assert parser.parse_args(["simulate", "out", "--particles", "4"]).scans == 4
    sub = next(a for a in parser._actions if a.dest == "command").choices
    assert "--scans" in sub["reduce"].format_help()
    assert "--particles" not in sub["reduce"].format_help()  # hidden
    # main() logs the one line (here before the missing manifest stops the command)
    from spndi_dask.cli import main

    assert main(["verify", str(tmp_path / "none.toml"), "--particles", "p1"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if "deprecated" in line]
    assert lines == ["WARNING spndi_dask.cli: --particles is deprecated: use --scans (a manifest "
                     "entry is a scan)"]  # fmt: skip
