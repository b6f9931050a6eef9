"""dask.distributed clusters from ``cluster_configs/*.yaml``: local, SLURM, PBS, MPI or an address.

A cluster config is a YAML file with an ``spndi`` section (the cluster type and how to scale it),
an optional ``jobqueue`` section (dask-jobqueue settings of that type) and any other dask
configuration (``distributed: ...``) applied for the run. The built-in configs live in
``spndi_dask/cluster_configs/``; a name is looked up in ``$SPNDI_CLUSTER_CONFIGS`` (folders
separated by ``os.pathsep``), ``./cluster_configs``, ``~/.config/spndi/cluster_configs`` and
then the built-ins.

dask-jobqueue does not merge a named config with its defaults, so a config here only names the
type (``jobqueue: {slurm: ...}``) and is merged in this order, lowest first: dask-jobqueue's
defaults for that type < the file < ``DASK_JOBQUEUE__<TYPE>__<KEY>`` environment variables <
keyword overrides.

Both sections are checked when the file is read, every problem reported at once with the key, the
value and the fix: the ``spndi`` section against :data:`SPNDI_KEYS`, the ``jobqueue`` section
against what dask-jobqueue accepts for that scheduler type (the keys of its default config and of
its cluster and job classes; value types from those defaults, see :func:`jobqueue_keys`).

Computing on the cluster is :mod:`spndi_dask.compute`'s; the worker plugins are in
:mod:`spndi_dask.worker_plugins`.
"""

from __future__ import annotations

import copy
import difflib
import functools
import inspect
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask.config
import dask_jobqueue  # registers its defaults in dask.config
import psutil
import yaml
from dask.utils import parse_bytes, parse_timedelta
from distributed import Client, LocalCluster

from spndi_dask.worker_plugins import PinToCore

__all__ = [
    "SPNDI_KEYS",
    "WORKER_MALLOC_ENV",
    "ClusterConfigError",
    "ClusterStartError",
    "DaskClusterConfig",
    "Session",
    "available_configs",
    "config_dirs",
    "jobqueue_keys",
    "load_cluster_config",
    "local_cluster_size",
    "open_cluster",
    "start_client",
    "worker_environ",
]

logger = logging.getLogger(__name__)

BUILTIN_DIR = Path(__file__).parent / "cluster_configs"
JOBQUEUE_TYPES = ("slurm", "pbs")
TYPES = ("local", "mpi", *JOBQUEUE_TYPES)
_ADDRESS = re.compile(r"^(tcp|tls|ucx|inproc|ws|wss)://", re.IGNORECASE)


class ClusterConfigError(ValueError):
    """A cluster config that cannot be found or read."""


class ClusterStartError(RuntimeError):
    """Workers could not be started (a rejected job submission, no worker in time)."""


def local_cluster_size() -> tuple[int, int, int]:
    """``(n_workers, threads_per_worker, memory_limit_bytes)`` for this machine.

    One single-threaded worker process per usable core (h5py and the Blosc/HDF5 codecs hold
    the GIL, so processes scale and threads do not), sharing 90 % of the RAM.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    n = max(1, cores or 1)
    mem = int(psutil.virtual_memory().total * 0.9 / n)
    return n, 1, mem


#: glibc allocator settings for worker processes. dask's nannies set ``MALLOC_TRIM_THRESHOLD_``
#: to 64 KiB, which also freezes glibc's mmap threshold at 128 KiB: every decoded chunk is then a
#: fresh ``mmap`` whose pages fault in again, which doubled the time to decode raw frames through
#: zarr (0.48 s against 0.21 s for a 16 × 16 scan tile on one core). Buffers up to 4 MiB (chunks)
#: are reused from the heap instead; larger ones (reduce's 8-32 MB neighbour strips) are mapped
#: and returned whole: kept on the heap up to 32 MiB, they fragmented it, and a worker's peak
#: memory grew with the number of blocks (reduce on `large` 800-860 MB, 750-780 MB with 4 MiB).
#: Free memory above 16 MiB at the top of the heap is returned.
WORKER_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": 4 * 2**20, "MALLOC_TRIM_THRESHOLD_": 16 * 2**20}


def worker_environ() -> dict[str, Any]:
    """dask config that gives nanny-spawned workers :data:`WORKER_MALLOC_ENV`.

    Values already set in ``distributed.nanny.pre-spawn-environ`` (other than dask's own
    64 KiB trim threshold) are kept.

    Examples
    --------
    >>> import dask
    >>> with dask.config.set(worker_environ()):
    ...     dask.config.get("distributed.nanny.pre-spawn-environ.MALLOC_MMAP_THRESHOLD_")
    4194304
    """

    current = dask.config.get("distributed.nanny.pre-spawn-environ", default={}) or {}
    out = {}
    for key, value in WORKER_MALLOC_ENV.items():
        if key not in current or (key == "MALLOC_TRIM_THRESHOLD_" and current[key] == 65536):
            out[f"distributed.nanny.pre-spawn-environ.{key}"] = value
    return out


def config_dirs() -> list[Path]:
    """The folders searched for a cluster config name, in order."""
    dirs = [Path(p) for p in os.environ.get("SPNDI_CLUSTER_CONFIGS", "").split(os.pathsep) if p]
    dirs += [Path.cwd() / "cluster_configs", Path.home() / ".config" / "spndi" / "cluster_configs"]
    return [*dirs, BUILTIN_DIR]


def available_configs() -> dict[str, Path]:
    """Cluster config names and the file each resolves to (the first folder wins)."""
    found: dict[str, Path] = {}
    for d in config_dirs():
        for f in sorted(d.glob("*.y*ml")) if d.is_dir() else []:
            found.setdefault(f.stem, f)
    return found


@dataclass
class DaskClusterConfig:
    """A parsed dask cluster config (not the k-means ``[cluster]`` settings, ``ClusterSettings``).

    Attributes
    ----------
    name : str
        The config's name (file stem) or the scheduler address.
    type : str
        ``local``, ``slurm``, ``pbs``, ``mpi`` or ``address``.
    spndi : dict
        How to start and scale: ``local``/``mpi`` options, ``scale``, ``wait_for_workers``,
        ``wait_timeout``, ``lifetime_margin``.
    jobqueue : dict
        dask-jobqueue settings for ``type``, merged with its defaults and the environment.
    dask : dict
        Other dask configuration applied while the cluster runs.
    path : Path or None
        The file it came from.
    """

    name: str
    type: str
    spndi: dict[str, Any] = field(default_factory=dict)
    jobqueue: dict[str, Any] = field(default_factory=dict)
    dask: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dask settings as dotted keys, so ``dask.config.set`` changes only those leaves."""
    flat: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            flat.update(_flatten(v, key + "."))
        else:
            flat[key] = v
    return flat


def _hyphen_keys(d: dict[str, Any]) -> dict[str, Any]:
    return {str(k).replace("_", "-"): v for k, v in (d or {}).items()}


def _config_path(spec: str | os.PathLike[str]) -> Path:
    p = Path(spec).expanduser()
    if p.suffix in (".yaml", ".yml") or os.sep in str(spec):
        if not p.is_file():
            raise ClusterConfigError(f"cluster config file {p} does not exist")
        return p
    configs = available_configs()
    if str(spec) not in configs:
        raise ClusterConfigError(
            f"no cluster config named {spec!r}; available: {', '.join(sorted(configs))} "
            f"(searched {', '.join(str(d) for d in config_dirs())}); give one of these names, "
            "a path to a YAML file, or a scheduler address tcp://host:port"
        )
    return configs[str(spec)]


# -- validation ---------------------------------------------------------------------------------
_NONE = type(None)
_Types = tuple[type, ...]
_Table = dict[str, "_Types | _Table"]

#: The keys of a config's ``spndi:`` section and the types of their values (``dict``: a table of
#: its own keys). ``mpi`` holds the keywords of ``dask_mpi.initialize``.
SPNDI_KEYS: _Table = {
    "type": (str,),
    "local": {
        "n_workers": (int, _NONE),
        "threads_per_worker": (int, _NONE),
        "memory_limit": (str, int, _NONE),
        "processes": (bool,),
        "pin_cores": (bool,),
        "dashboard_address": (str, _NONE),
        "local_directory": (str, _NONE),
    },
    "mpi": {
        "interface": (str, _NONE),
        "nthreads": (int,),
        "local_directory": (str, _NONE),
        "memory_limit": (str, int, float, _NONE),
        "nanny": (bool,),
        "dashboard": (bool,),
        "dashboard_address": (str, _NONE),
        "protocol": (str, _NONE),
        "worker_class": (str,),
        "worker_options": (dict, _NONE),
        "exit": (bool,),
        "scheduler_port": (int,),
    },
    "scale": {
        "adapt": (bool,),
        "minimum_jobs": (int,),
        "maximum_jobs": (int, _NONE),
        "jobs": (int,),
    },
    "wait_for_workers": (int, _NONE),
    "wait_timeout": (int, float),
    "lifetime_margin": (str, int, float, _NONE),
}

# Value types of dask-jobqueue keys whose default is None or narrower than what it takes (the
# others take the type of their default). null is always allowed: dask-jobqueue's default.
_JOBQUEUE_VALUE_TYPES: dict[str, _Types] = {
    **dict.fromkeys(("cores", "processes", "job-cpu", "ncpus", "n-workers"), (int,)),
    **dict.fromkeys(("memory", "mem", "disk"), (str, int)),
    "death-timeout": (int, float, str),
    "silence-logs": (str, int, bool),
    **dict.fromkeys(("nanny", "use-stdin", "security"), (bool,)),  # security: true = temporary TLS
    **dict.fromkeys(("env-extra", "extra", "job-extra", "header-skip"), (list,)),
    **dict.fromkeys(
        (
            "walltime", "queue", "account", "project", "python", "interface", "local-directory",
            "shared-temp-directory", "log-directory", "resource-spec", "name", "job-name",
            "job-mem", "protocol", "host", "dashboard-address", "lsf-units",
            "memory-per-core-property-name",
        ),
        (str,),
    ),
}  # fmt: skip
# constructor keywords that are not settings (or not writable in YAML)
_NOT_SETTINGS = {
    "self", "args", "kwargs", "job-kwargs", "base-class-kwargs", "config-name", "scheduler",
    "loop", "job-cls", "scheduler-cls", "asynchronous",
}  # fmt: skip
_TYPE_NAMES = {
    bool: "true or false",
    int: "an integer",
    float: "a number",
    str: "a string",
    list: "a list",
    dict: "a mapping",
    _NONE: "null",
}


def _jobqueue_types() -> tuple[str, ...]:
    """The scheduler types dask-jobqueue has settings for (``slurm``, ``pbs``, ``sge``, ...)."""
    return tuple(sorted(k for k, v in dask.config.get("jobqueue").items() if isinstance(v, dict)))


def _jobqueue_class_keys(kind: str) -> set[str]:
    """Keywords dask-jobqueue's cluster and job classes for ``kind`` take, hyphenated."""
    todo, classes = [dask_jobqueue.core.JobQueueCluster], []
    while todo:
        cls = todo.pop()
        todo += cls.__subclasses__()
        if getattr(getattr(cls, "job_cls", None), "config_name", None) == kind:
            classes.append(cls)
    keys: set[str] = set()
    for cls in classes[:1]:  # up to dask-jobqueue's bases, not distributed's SpecCluster
        bases = [*cls.__mro__, *cls.job_cls.__mro__]
        for k in (b for b in bases if b.__module__.startswith("dask_jobqueue")):
            if "__init__" in vars(k):
                keys |= {p.replace("_", "-") for p in inspect.signature(k.__init__).parameters}
    return keys - _NOT_SETTINGS


@functools.cache
def jobqueue_keys(kind: str) -> dict[str, _Types | None]:
    """The settings dask-jobqueue accepts for scheduler type ``kind`` and their value types.

    The keys of its default config ``jobqueue.<kind>`` and the keywords of its cluster and job
    classes; a value's types are those of the default (None: not checked), widened where the
    default is narrower than what dask-jobqueue takes (``death-timeout`` 60 or ``"60s"``).

    Examples
    --------
    >>> jobqueue_keys("slurm")["cores"], jobqueue_keys("slurm")["job-extra-directives"]
    ((<class 'int'>,), (<class 'list'>,))
    """
    defaults = _hyphen_keys(dask.config.get(f"jobqueue.{kind}"))
    out: dict[str, _Types | None] = {}
    for key in sorted(set(defaults) | _jobqueue_class_keys(kind)):
        default = defaults.get(key)
        types = _JOBQUEUE_VALUE_TYPES.get(key)
        if types is None and default is not None:
            types = (type(default),)
        out[key] = types
    return out


def _describe(types: _Types) -> str:
    names = [_TYPE_NAMES.get(t, t.__name__) for t in types if not (t is int and float in types)]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def _type_ok(value: Any, types: _Types) -> bool:
    if isinstance(value, bool):  # a bool is an int to Python, not to a config
        return bool in types
    if isinstance(value, int) and float in types:
        return True
    return isinstance(value, tuple(t for t in types if t is not bool))


def _unknown(where: str, key: Any, valid: list[str], *, compare: str | None = None) -> str:
    near = difflib.get_close_matches(compare or str(key), valid, n=1, cutoff=0.6)
    hint = f"did you mean '{near[0]}'? " if near else ""
    return f"{where}: unknown key; {hint}valid keys: {', '.join(valid)}"


def _wrong_type(where: str, value: Any, types: _Types) -> str:
    got = _TYPE_NAMES.get(type(value), type(value).__name__)
    return f"{where} = {value!r}: expected {_describe(types)}, got {got}"


def _check_table(table: _Table, data: dict[str, Any], where: str, problems: list[str]) -> None:
    """Unknown keys and wrong value types of ``data`` (``where``: its key path) into problems."""
    for key, value in data.items():
        spec = table.get(key)
        path = f"{where}.{key}"
        if spec is None:
            problems.append(_unknown(path, key, list(table)))
        elif isinstance(spec, dict):
            if value is None:
                continue
            if not isinstance(value, dict):
                problems.append(_wrong_type(path, value, (dict, _NONE)))
            else:
                _check_table(spec, value, path, problems)
        elif not _type_ok(value, spec):
            problems.append(_wrong_type(path, value, spec))


def _check_values(where: str, key: str, value: Any, problems: list[str]) -> None:
    """Strings that must parse: byte sizes and durations."""
    if not isinstance(value, str) or value == "auto":
        return
    parse, example = {
        "memory": (parse_bytes, "32GiB"),
        "memory_limit": (parse_bytes, "4GiB"),
        "lifetime_margin": (parse_timedelta, "10m"),
    }.get(key, (None, ""))
    if parse is None:
        return
    try:
        parse(value)
    except (ValueError, TypeError, KeyError):
        kind = "a duration" if parse is parse_timedelta else "a size"
        problems.append(f"{where}.{key} = {value!r}: not {kind}; write e.g. {example!r}")


def _check_spndi(spndi: dict[str, Any], problems: list[str]) -> None:
    table = SPNDI_KEYS
    try:  # the keywords of the installed dask-mpi
        import dask_mpi
    except ImportError:
        pass
    else:
        params = inspect.signature(dask_mpi.initialize).parameters
        types: dict[str, Any] = dict(SPNDI_KEYS["mpi"])  # type: ignore[arg-type]
        table = {**SPNDI_KEYS, "mpi": {k: types.get(k, (bool, object)) for k in params}}
    kind = spndi.get("type")
    if kind not in TYPES:
        problems.append(f"spndi.type is {kind!r}; use one of {', '.join(TYPES)}")
    _check_table(table, {k: v for k, v in spndi.items() if k != "type"}, "spndi", problems)
    _check_values("spndi", "lifetime_margin", spndi.get("lifetime_margin"), problems)
    local = spndi.get("local")
    if isinstance(local, dict):
        _check_values("spndi.local", "memory_limit", local.get("memory_limit"), problems)


def _check_jobqueue(kind: Any, jobqueue: Any, path: Path, problems: list[str]) -> None:
    if not isinstance(jobqueue, dict):
        problems.append(
            f"jobqueue = {jobqueue!r}: expected a mapping of a scheduler type to its settings, "
            f"e.g. 'jobqueue: {{slurm: {{cores: 8}}}}'"
        )
        return
    known = list(_jobqueue_types())
    for section, settings in jobqueue.items():
        where = f"jobqueue.{section}"
        if section not in known:
            near = difflib.get_close_matches(str(section), known, n=1, cutoff=0.6)
            hint = f"did you mean '{near[0]}'? " if near else ""
            problems.append(
                f"{where}: unknown cluster type; {hint}dask-jobqueue knows: {', '.join(known)}"
            )
            continue
        if kind in JOBQUEUE_TYPES and section != kind:
            problems.append(
                f"the config is of type {kind!r} but has jobqueue settings for {section}; "
                f"put them under 'jobqueue: {kind}:'"
            )
            continue
        if kind not in JOBQUEUE_TYPES:
            logger.warning(
                "cluster config %s is of type %r: its jobqueue.%s settings are not used",
                path,
                kind,
                section,
            )
        if settings is None:
            continue
        if not isinstance(settings, dict):
            problems.append(_wrong_type(where, settings, (dict,)))
            continue
        accepted = jobqueue_keys(section)
        for key, value in settings.items():
            name = str(key).replace("_", "-")
            if name not in accepted:
                problems.append(_unknown(f"{where}.{key}", key, list(accepted), compare=name))
                continue
            types = accepted[name]
            if value is None or types is None or _type_ok(value, types):
                if name == "memory":
                    _check_values(where, "memory", value, problems)
                continue
            msg = _wrong_type(f"{where}.{key}", value, types)
            if name == "walltime" and isinstance(value, int):
                msg += (
                    '; quote it, e.g. walltime: "2:00:00" (YAML reads an unquoted 2:00:00 as '
                    "the number 7200)"
                )
            problems.append(msg)


def load_cluster_config(spec: str | os.PathLike[str] | None = None) -> DaskClusterConfig:
    """Read a cluster config by name or path (default ``local``); an address is type ``address``.

    Parameters
    ----------
    spec : str or path, optional
        A config name (``local``, ``slurm``, ``slurm-gpu``, ``pbs``, ``mpi`` or one of the
        user's), a YAML file, or a scheduler address such as ``tcp://10.0.0.1:8786``.

    Raises
    ------
    ClusterConfigError
        Unknown name (the message lists the available ones), unreadable file or bad content:
        unknown keys (with the nearest valid one), an unknown scheduler type under
        ``jobqueue``, values of the wrong type; every problem of the file is listed.
    """

    if spec is not None and _ADDRESS.match(str(spec)):
        return DaskClusterConfig(name=str(spec), type="address")
    path = _config_path(spec or "local")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ClusterConfigError(f"cannot read cluster config {path}: {exc}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("spndi"), dict):
        raise ClusterConfigError(f"cluster config {path} needs an 'spndi:' section with a 'type'")
    spndi = dict(raw.pop("spndi"))
    kind = spndi.get("type")
    jobqueue_raw = raw.pop("jobqueue", None) or {}
    problems: list[str] = []
    _check_spndi(spndi, problems)
    _check_jobqueue(kind, jobqueue_raw, path, problems)
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise ClusterConfigError(f"cluster config {path} is invalid:\n{lines}")
    jobqueue: dict[str, Any] = {}
    if kind in JOBQUEUE_TYPES:
        defaults = _hyphen_keys(copy.deepcopy(dask.config.get(f"jobqueue.{kind}")))
        env = _hyphen_keys(dask.config.collect_env().get("jobqueue", {}).get(kind, {}))
        file = _hyphen_keys(jobqueue_raw.get(kind) or {})
        jobqueue = dask.config.merge(defaults, file, env)
    return DaskClusterConfig(
        name=path.stem, type=kind, spndi=spndi, jobqueue=jobqueue, dask=raw, path=path
    )


def _walltime_seconds(walltime: str | None) -> float | None:
    """SLURM/PBS walltime (``[D-]HH:MM:SS``, ``MM:SS`` or minutes) in seconds."""
    if not walltime:
        return None
    days, _, rest = str(walltime).rpartition("-")
    parts = [float(p) for p in rest.split(":")]
    if len(parts) == 1:
        parts = [0.0, parts[0], 0.0]
    while len(parts) < 3:
        parts.insert(0, 0.0)
    h, m, s = parts
    return (float(days) if days else 0.0) * 86400 + h * 3600 + m * 60 + s


def _with_lifetime(jobqueue: dict[str, Any], margin: Any) -> dict[str, Any]:
    """Add ``--lifetime`` (walltime − margin, staggered ± margin/2) unless it is already set."""

    args = list(jobqueue.get("worker-extra-args") or [])
    wall = _walltime_seconds(jobqueue.get("walltime"))
    if margin is None or wall is None or "--lifetime" in args:
        return jobqueue
    margin_s = parse_timedelta(margin, default="s")
    if wall - 1.5 * margin_s <= 0:
        raise ClusterConfigError(
            f"walltime {jobqueue.get('walltime')} is shorter than 1.5 x lifetime_margin "
            f"({margin}); lengthen the walltime or shorten spndi.lifetime_margin"
        )
    life = int(wall - margin_s)
    args += ["--lifetime", f"{life}s", "--lifetime-stagger", f"{int(margin_s / 2)}s"]
    return {**jobqueue, "worker-extra-args": args}


def _jobqueue_cluster(config: DaskClusterConfig, overrides: dict[str, Any]) -> Any:
    settings = dask.config.merge(config.jobqueue, _hyphen_keys(overrides))
    settings = _with_lifetime(settings, config.spndi.get("lifetime_margin"))
    cls = {"slurm": dask_jobqueue.SLURMCluster, "pbs": dask_jobqueue.PBSCluster}[config.type]
    # explicit keywords: dask-jobqueue's jobs re-read dask.config later, outside any context
    kwargs = {k.replace("-", "_"): v for k, v in settings.items() if v is not None}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ClusterConfigError(f"cluster config {config.path}: {exc}") from None


class _SubmitErrors(logging.Handler):
    """Collects job-submission failures that dask logs from its event loop."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            text += "\n" + str(record.exc_info[1])
        if "non-zero exit code" in text:
            self.messages.append(text)


def _submit_error(messages: list[str]) -> str:
    """The scheduler's own words (the submit command's stderr) from a dask-jobqueue error."""
    text = messages[0]
    m = re.search(r"Command:\n(.*?)\n.*?stderr:\n(.*)", text, re.S)
    if not m:
        return text.strip()
    return f"{m.group(2).strip()} (command: {m.group(1).strip()})"


def _wait(
    client: Any, config: DaskClusterConfig, errors: _SubmitErrors, cluster: Any, n: int
) -> None:
    """Block until ``n`` workers joined; a rejected submission fails at once."""
    timeout = float(config.spndi.get("wait_timeout", 600))
    deadline = time.monotonic() + timeout
    while True:
        if errors.messages:
            raise ClusterStartError(
                f"the {config.type.upper()} scheduler refused the worker job of cluster config "
                f"{config.name!r}: {_submit_error(errors.messages)}"
            )
        if len(client.scheduler_info(n_workers=-1)["workers"]) >= n:
            return
        if time.monotonic() > deadline:
            script = getattr(cluster, "job_script", lambda: "")()
            raise ClusterStartError(
                f"no dask worker of cluster config {config.name!r} joined within {timeout:.0f} s "
                f"(wanted {n}); the jobs may still be queued (check squeue/qstat) or cannot "
                f"reach the scheduler at {client.scheduler.address} (set 'interface'). "
                f"Job script:\n{script}"
            )
        time.sleep(0.25)


def _test_submission(config: DaskClusterConfig, cluster: Any) -> None:
    """SLURM: ``sbatch --test-only`` the worker job script, so a refusal shows SLURM's words."""
    if config.type != "slurm" or shutil.which("sbatch") is None:
        return
    with tempfile.NamedTemporaryFile("w", suffix=".sh") as f:
        f.write(cluster.job_script())
        f.flush()
        try:
            proc = subprocess.run(
                ["sbatch", "--test-only", f.name], capture_output=True, text=True, timeout=120
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            logger.warning("could not test the SLURM job script: %s", exc)
            return
    if proc.returncode != 0:
        raise ClusterStartError(
            f"the SLURM scheduler refused the worker job of cluster config {config.name!r}: "
            f"{proc.stderr.strip() or proc.stdout.strip()} (check queue/partition, account, "
            "cores, memory, walltime and gres in the config or DASK_JOBQUEUE__SLURM__* "
            f"variables). Job script:\n{cluster.job_script()}"
        )


def _close_quietly(cluster: Any) -> None:
    """Close a job-queue cluster; one whose job was refused cannot close cleanly: log it only."""
    try:
        cluster.close()
    except Exception as exc:  # e.g. AssertionError: Status.created after a refused job
        logger.debug("closing %s: %r", type(cluster).__name__, exc)


@dataclass
class Session:
    """A running client and where it came from (see :func:`open_cluster`)."""

    client: Any
    config: DaskClusterConfig
    cluster: Any = None

    def info(self) -> dict[str, Any]:
        """Cluster type, config file, scheduler address, dashboard link and workers now."""
        workers = self.client.scheduler_info(n_workers=-1)["workers"].values()
        return {
            "cluster": self.config.name,
            "type": self.config.type,
            "config file": str(self.config.path) if self.config.path else "",
            "scheduler": self.client.scheduler.address,
            "dashboard": self.client.dashboard_link,
            "workers": len(workers),
            "threads": sum(w.get("nthreads", 0) for w in workers),
        }


def _pin_local_workers(client: Any, config: DaskClusterConfig, overrides: dict[str, Any]) -> None:
    """Pin one single-threaded local worker per core (``local.pin_cores``, default true)."""
    opts = {**(config.spndi.get("local") or {}), **overrides}
    if not opts.get("pin_cores", True) or not hasattr(os, "sched_setaffinity"):
        return
    cores = sorted(os.sched_getaffinity(0))
    workers = client.scheduler_info(n_workers=-1)["workers"].values()
    if len(workers) > len(cores) or any(w.get("nthreads", 1) != 1 for w in workers):
        return

    client.register_plugin(PinToCore(cores))


@contextmanager
def _dashboard_port_note() -> Iterator[None]:
    """distributed's three-line warning for a dashboard port in use, as one log line.

    The dashboard then listens on another port, which ``client.dashboard_link`` gives.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        text = str(w.message)
        if m := re.match(r"Port (\d+) is already in use.*on port (\d+) instead", text, re.S):
            logger.warning(
                "dashboard port %s is in use (another dask cluster?): the dashboard is on "
                "port %s instead (the link below)",
                *m.groups(),
            )
        elif not issubclass(w.category, ResourceWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def _local_cluster(config: DaskClusterConfig, overrides: dict[str, Any]) -> Any:

    opts = {**(config.spndi.get("local") or {}), **overrides}
    n, t, mem = local_cluster_size()
    n_workers = opts.get("n_workers") or n
    limit = opts.get("memory_limit", "auto")
    if limit in (None, "auto"):
        limit = int(mem * n / n_workers)
    elif isinstance(limit, str):
        limit = parse_bytes(limit)
    return LocalCluster(
        n_workers=n_workers,
        threads_per_worker=opts.get("threads_per_worker") or t,
        memory_limit=limit,
        processes=opts.get("processes", True),
        host="127.0.0.1",
        dashboard_address=opts.get("dashboard_address") or "127.0.0.1:0",
        local_directory=opts.get("local_directory"),
    )


def _mpi_client(config: DaskClusterConfig) -> Any:
    try:
        import dask_mpi
    except ImportError:
        raise ClusterStartError(
            "cluster config 'mpi' needs dask-mpi and mpi4py: pip install 'spndi_dask[mpi]' "
            "(with an MPI library such as Open MPI), then mpirun -np N spndi run ..."
        ) from None

    opts = dict(config.spndi.get("mpi") or {})
    dask_mpi.initialize(**{k: v for k, v in opts.items() if v is not None})
    return Client()


@contextmanager
def open_cluster(
    spec: str | os.PathLike[str] | None = None,
    *,
    n_workers: int | None = None,
    threads_per_worker: int | None = None,
    dashboard_address: str | None = None,
    jobqueue: dict[str, Any] | None = None,
) -> Iterator[Session]:
    """Start (or join) the cluster a config describes and yield a :class:`Session`.

    Parameters
    ----------
    spec : str or path, optional
        Config name, YAML path or scheduler address (default ``local``).
    n_workers, threads_per_worker, dashboard_address : optional
        LocalCluster overrides. For SLURM/PBS ``n_workers`` asks for that many worker jobs
        (fixed, not adaptive).
    jobqueue : dict, optional
        dask-jobqueue keyword overrides (e.g. ``{"queue": "short"}``).

    Raises
    ------
    ClusterConfigError
        Unknown config (lists the available ones) or bad content.
    ConnectionError
        An address that cannot be reached.
    ClusterStartError
        The batch scheduler refused the job (its message is included) or no worker joined.
    """

    config = load_cluster_config(spec)
    with ExitStack() as stack:
        stack.enter_context(dask.config.set(_flatten(config.dask)))
        if config.type == "address":
            try:
                client = Client(config.name, timeout="10s")
            except OSError as exc:
                raise ConnectionError(
                    f"cannot reach the dask scheduler at {config.name} ({exc}); check the "
                    "address and that the scheduler is running"
                ) from None
            stack.callback(client.close)
            yield Session(client, config)
            return
        if config.type == "mpi":
            client = _mpi_client(config)
            stack.callback(client.close)
            yield Session(client, config)
            return
        if config.type == "local":
            overrides = {
                k: v
                for k, v in (
                    ("n_workers", n_workers),
                    ("threads_per_worker", threads_per_worker),
                    ("dashboard_address", dashboard_address),
                )
                if v is not None
            }
            with dask.config.set(worker_environ()), _dashboard_port_note():
                cluster = stack.enter_context(_local_cluster(config, overrides))
            client = stack.enter_context(Client(cluster))
            _pin_local_workers(client, config, overrides)
            yield Session(client, config, cluster)
            return
        errors = _SubmitErrors()
        # dask-jobqueue submits from its event loop: a refused job is only logged (by tornado)
        for lg in (logging.getLogger(n) for n in ("distributed", "dask_jobqueue", "tornado")):
            lg.addHandler(errors)
            stack.callback(lg.removeHandler, errors)
        cluster = _jobqueue_cluster(config, jobqueue or {})
        stack.callback(_close_quietly, cluster)
        _test_submission(config, cluster)
        client = stack.enter_context(Client(cluster))
        scale = config.spndi.get("scale") or {}
        if n_workers:
            cluster.scale(jobs=n_workers)
        elif scale.get("adapt", True):
            cluster.adapt(
                minimum_jobs=scale.get("minimum_jobs", 1), maximum_jobs=scale.get("maximum_jobs")
            )
        else:
            cluster.scale(jobs=scale.get("jobs", 1))
        logger.debug("%s job script:\n%s", config.type, cluster.job_script())
        # a fixed number of jobs: wait for all their workers; adaptive: for wait_for_workers
        per_job = int({**config.jobqueue, **_hyphen_keys(jobqueue or {})}.get("processes") or 1)
        wanted = n_workers * per_job if n_workers else config.spndi.get("wait_for_workers", 1)
        _wait(client, config, errors, cluster, int(wanted or 0))
        yield Session(client, config, cluster)


@contextmanager
def start_client(
    cluster: str | os.PathLike[str] | None = None,
    *,
    n_workers: int | None = None,
    threads_per_worker: int | None = None,
    dashboard_address: str = "127.0.0.1:0",
) -> Iterator[Any]:
    """A ``distributed.Client`` on the cluster ``cluster`` names (see :func:`open_cluster`).

    The default is a LocalCluster bound to localhost, with a dashboard on a free port; the link
    is available as ``client.dashboard_link``.

    Examples
    --------
    >>> with start_client(n_workers=1) as client:  # doctest: +SKIP
    ...     print(client.dashboard_link)
    """
    with open_cluster(
        cluster,
        n_workers=n_workers,
        threads_per_worker=threads_per_worker,
        dashboard_address=dashboard_address,
    ) as session:
        yield session.client
