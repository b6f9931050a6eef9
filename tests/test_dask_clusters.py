"""Cluster configs are validated when read: the ``spndi:`` section strictly, ``jobqueue:`` against
the keys and value types dask-jobqueue accepts for each scheduler type."""

from __future__ import annotations

import dask.config
import pytest
import yaml

from spndi_dask.dask_clusters import ClusterConfigError, available_configs, load_cluster_config


def _load(tmp_path, text: str):
    path = tmp_path / "site.yaml"
    path.write_text(text)
    return path, lambda: load_cluster_config(path)


def _problems(tmp_path, text: str) -> tuple[str, list[str]]:
    """The error's first line and its problems (one per ``  - `` line)."""
    path, load = _load(tmp_path, text)
    with pytest.raises(ClusterConfigError) as info:
        load()
    first, *rest = str(info.value).splitlines()
    assert str(path) in first  # the file is named
    return first, [line.removeprefix("  - ") for line in rest]


def test_a_misspelt_spndi_key_names_the_key_the_file_and_the_nearest_valid_key(tmp_path):
    _, problems = _problems(tmp_path, "spndi:\n  type: slurm\n  scael: 3\n")
    assert len(problems) == 1
    msg = problems[0]
    assert "spndi.scael" in msg and "did you mean 'scale'?" in msg
    for key in ("type", "local", "mpi", "scale", "wait_for_workers", "wait_timeout"):
        assert key in msg.split("valid keys:")[1]
    # one level down as well: the options of a local cluster and of the scaling
    _, problems = _problems(
        tmp_path, "spndi:\n  type: local\n  local:\n    n_worker: 4\n    pin_core: false\n"
    )
    assert [p.split(":")[0] for p in problems] == ["spndi.local.n_worker", "spndi.local.pin_core"]
    assert "did you mean 'n_workers'?" in problems[0]
    assert "did you mean 'pin_cores'?" in problems[1]
    _, problems = _problems(tmp_path, "spndi:\n  type: slurm\n  scale:\n    maximum-jobs: 4\n")
    assert "spndi.scale.maximum-jobs" in problems[0] and "'maximum_jobs'" in problems[0]


def test_a_wrong_type_in_the_spndi_section_names_key_value_and_expected_type(tmp_path):
    text = (
        "spndi:\n  type: slurm\n  wait_timeout: long\n  scale:\n    maximum_jobs: '8'\n"
        "    adapt: yes please\n  local:\n    pin_cores: 1\n"
    )
    _, problems = _problems(tmp_path, text)
    assert len(problems) == 4  # every problem at once
    by_key = {p.split(" = ")[0]: p for p in problems}
    assert "'long'" in by_key["spndi.wait_timeout"] and "a number" in by_key["spndi.wait_timeout"]
    assert "'8'" in by_key["spndi.scale.maximum_jobs"]
    assert "an integer" in by_key["spndi.scale.maximum_jobs"]
    assert "true or false" in by_key["spndi.scale.adapt"]
    assert "true or false" in by_key["spndi.local.pin_cores"]  # 1 is not a bool


def test_a_wrong_jobqueue_type_names_key_value_and_expected_type(tmp_path):
    _, problems = _problems(
        tmp_path, 'spndi:\n  type: slurm\njobqueue:\n  slurm:\n    cores: "eight"\n'
    )
    assert len(problems) == 1
    assert problems[0].startswith("jobqueue.slurm.cores = 'eight': expected an integer")
    # an unquoted walltime is a number of seconds to YAML (base 60): SLURM would read minutes
    _, problems = _problems(
        tmp_path, "spndi:\n  type: slurm\njobqueue:\n  slurm:\n    walltime: 2:00:00\n"
    )
    assert "jobqueue.slurm.walltime = 7200" in problems[0] and "quote it" in problems[0]
    _, problems = _problems(
        tmp_path, "spndi:\n  type: pbs\njobqueue:\n  pbs:\n    job-extra-directives: -l x\n"
    )
    assert "jobqueue.pbs.job-extra-directives = '-l x'" in problems[0] and "a list" in problems[0]


def test_an_unknown_jobqueue_key_is_refused_with_the_nearest_one(tmp_path):
    _, problems = _problems(tmp_path, "spndi:\n  type: slurm\njobqueue:\n  slurm:\n    coers: 8\n")
    assert "jobqueue.slurm.coers" in problems[0] and "did you mean 'cores'?" in problems[0]
    assert "job-extra-directives" in problems[0]  # the valid keys are listed
    # keys are per scheduler: PBS's resource-spec is not a SLURM setting
    _, problems = _problems(
        tmp_path, "spndi:\n  type: slurm\njobqueue:\n  slurm:\n    resource-spec: x\n"
    )
    assert "jobqueue.slurm.resource-spec" in problems[0]


def test_an_unknown_cluster_type_under_jobqueue_is_refused(tmp_path):
    _, problems = _problems(tmp_path, "spndi:\n  type: slurm\njobqueue:\n  slrum:\n    cores: 8\n")
    assert "jobqueue.slrum" in problems[0] and "did you mean 'slurm'?" in problems[0]
    assert "pbs" in problems[0] and "sge" in problems[0]  # dask-jobqueue's types are listed
    # also where the type does not use jobqueue settings at all
    _, problems = _problems(tmp_path, "spndi:\n  type: local\njobqueue:\n  slrum: {}\n")
    assert "jobqueue.slrum" in problems[0]


def test_every_key_of_dask_jobqueue_defaults_is_accepted_with_its_default_value(tmp_path):
    for kind in ("slurm", "pbs"):
        defaults = dask.config.get(f"jobqueue.{kind}")
        text = yaml.safe_dump({"spndi": {"type": kind}, "jobqueue": {kind: defaults}})
        c = load_cluster_config(_load(tmp_path, text)[0])
        assert set(defaults) <= set(c.jobqueue)


def test_configs_valid_before_stay_valid(tmp_path):
    for name, path in available_configs().items():
        assert load_cluster_config(name).path == path
    # underscores for hyphens, ints for byte sizes, null for "dask-jobqueue's default", and
    # keywords the cluster class takes besides its config keys
    text = (
        "spndi:\n  type: slurm\n  lifetime_margin: 300\n  scale: {adapt: false, jobs: 2}\n"
        "jobqueue:\n  slurm:\n    cores: 4\n    memory: 17179869184\n    processes: null\n"
        "    job_extra_directives: ['--qos=low']\n    death-timeout: 60s\n    protocol: tcp\n"
        "distributed:\n  scheduler:\n    allowed-failures: 3\n"
    )
    c = load_cluster_config(_load(tmp_path, text)[0])
    assert c.jobqueue["job-extra-directives"] == ["--qos=low"] and c.jobqueue["cores"] == 4
    assert c.jobqueue["shebang"] == "#!/usr/bin/env bash"  # still merged with the defaults
    assert c.dask == {"distributed": {"scheduler": {"allowed-failures": 3}}}


def test_sizes_and_durations_must_parse(tmp_path):
    text = (
        "spndi:\n  type: slurm\n  lifetime_margin: ten minutes\n  local:\n    memory_limit: lots\n"
        "jobqueue:\n  slurm:\n    memory: 32 gigs\n"
    )
    _, problems = _problems(tmp_path, text)
    assert problems == [
        "spndi.lifetime_margin = 'ten minutes': not a duration; write e.g. '10m'",
        "spndi.local.memory_limit = 'lots': not a size; write e.g. '4GiB'",
        "jobqueue.slurm.memory = '32 gigs': not a size; write e.g. '32GiB'",
    ]


def test_jobqueue_settings_of_a_local_config_are_checked_and_said_unused(tmp_path, caplog):
    _, problems = _problems(tmp_path, "spndi:\n  type: local\njobqueue:\n  slurm: {cores: x}\n")
    assert problems[0].startswith("jobqueue.slurm.cores = 'x'")
    path, load = _load(tmp_path, "spndi:\n  type: local\njobqueue:\n  slurm: {cores: 4}\n")
    with caplog.at_level("WARNING", logger="spndi_dask"):
        assert load().jobqueue == {}
    assert f"{path} is of type 'local': its jobqueue.slurm settings are not used" in caplog.text


def test_a_dashboard_port_in_use_is_one_line_and_the_link_is_the_real_one(caplog):
    import socket
    import warnings

    from spndi_dask.dask_clusters import open_cluster

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # distributed's warning would fail
            with open_cluster(n_workers=1, dashboard_address=f"127.0.0.1:{port}") as session:
                link = session.client.dashboard_link
    notes = [r.getMessage() for r in caplog.records if "dashboard port" in r.getMessage()]
    assert len(notes) == 1 and f"dashboard port {port} is in use" in notes[0]
    assert f":{port}/" not in link and link.startswith("http://127.0.0.1:")
