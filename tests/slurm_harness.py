"""A real one-node SLURM cluster on this machine, for tests of dask-jobqueue ``SLURMCluster``.

Debian's ``slurm-wlm`` (22.05) and ``munge`` are installed with apt-get when missing
(:func:`ensure_slurm_installed`), then :func:`one_node_slurm` writes a private ``slurm.conf``
under a work directory, starts ``munged`` (only if none answers), ``slurmctld`` and ``slurmd``
in the foreground as child processes, waits for the node to be idle and yields a
:class:`SlurmNode`.  On exit every job is cancelled and only the daemons it started are stopped.

Typical use in a test::

    from tests.slurm_harness import one_node_slurm, skip_reason

    @pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason()))
    def test_on_slurm(tmp_path):
        with one_node_slurm(tmp_path, gpus=1) as slurm:
            cluster = SLURMCluster(queue=slurm.partition, ...)

Design notes:

* ``ProctrackType=proctrack/linuxproc`` and ``TaskPlugin=task/none``: no cgroups needed (they
  are not usable inside the sandboxed container this project runs in).
* ``SlurmdParameters=config_overrides``: the node takes its CPUs / memory from slurm.conf, so a
  test may ask for more CPUs than the machine has (e.g. four 1-core workers on 2 cores).
* ``NodeAddr=127.0.0.1`` and ``SlurmctldHost=<host>(127.0.0.1)``: no name resolution needed.
* Fake GPUs: gres/gpu drops file-less GPUs and rejects files that are not devices, so each
  fake GPU is a symlink to ``/dev/null`` (a character device) listed in ``gres.conf``.
* Ports are picked free for every cluster, so two clusters in a row never collide.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

APT_PACKAGES = ("slurm-wlm", "munge")
REQUIRED_BINARIES = (
    "slurmctld",
    "slurmd",
    "munged",
    "munge",
    "sbatch",
    "squeue",
    "scancel",
    "sinfo",
    "scontrol",
)
_EXTRA_BIN_DIRS = ("/usr/sbin", "/usr/bin", "/sbin", "/bin", "/usr/local/sbin", "/usr/local/bin")

MUNGE_KEY = Path("/etc/munge/munge.key")
MUNGE_SOCKET = Path("/run/munge/munge.socket.2")
PARTITION = "debug"

__all__ = [
    "PARTITION",
    "SlurmError",
    "SlurmNode",
    "ensure_slurm_installed",
    "find_binary",
    "one_node_slurm",
    "skip_reason",
]


class SlurmError(RuntimeError):
    """SLURM could not be installed, started or used."""


# --------------------------------------------------------------------------- helpers
def find_binary(name: str) -> str | None:
    """``shutil.which`` that also looks in the sbin directories (often missing from PATH)."""
    found = shutil.which(name)
    if found:
        return found
    for d in _EXTRA_BIN_DIRS:
        p = Path(d) / name
        if p.is_file() and os.access(p, os.X_OK):
            return str(p)
    return None


def _bin(name: str) -> str:
    path = find_binary(name)
    if path is None:
        raise SlurmError(f"{name} not found; call ensure_slurm_installed() first")
    return path


def _tail(path: Path, n: int = 40) -> str:
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"
    return "\n".join(lines[-n:])


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _short_hostname() -> str:
    # slurmd identifies itself by the short hostname (gethostname up to the first dot)
    return socket.gethostname().split(".")[0]


def _total_memory_mb() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    raise SlurmError("cannot read MemTotal from /proc/meminfo")


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


# --------------------------------------------------------------------------- install / skip
def skip_reason() -> str | None:
    """None when a SLURM cluster can be made to work here, else why not.

    Only truly impossible situations skip (CI runs as root on Debian and must run the tests):
    not Linux, not root, or the SLURM binaries are missing and there is no apt-get to install
    them.
    """
    if not sys.platform.startswith("linux"):
        return f"SLURM harness needs Linux (this is {sys.platform})"
    if os.geteuid() != 0:
        return "SLURM harness needs root (to start munged/slurmctld/slurmd and install packages)"
    missing = [b for b in REQUIRED_BINARIES if find_binary(b) is None]
    if missing and find_binary("apt-get") is None:
        return f"SLURM binaries missing ({', '.join(missing)}) and no apt-get to install them"
    return None


def ensure_slurm_installed(timeout: float = 900) -> None:
    """Install Debian's slurm-wlm and munge with apt-get if any SLURM/munge binary is missing."""
    missing = [b for b in REQUIRED_BINARIES if find_binary(b) is None]
    if not missing:
        return
    reason = skip_reason()
    if reason is not None:
        raise SlurmError(f"cannot install SLURM: {reason}")
    apt = find_binary("apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (
        [apt, "update"],
        [apt, "install", "-y", "--no-install-recommends", *APT_PACKAGES],
    ):
        try:
            proc = subprocess.run(
                cmd,
                env=env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired as exc:
            raise SlurmError(f"{' '.join(cmd)} timed out after {timeout} s") from exc
        if proc.returncode != 0:
            out = (proc.stdout + proc.stderr).splitlines()[-30:]
            raise SlurmError(
                f"{' '.join(cmd)} failed with exit code {proc.returncode}:\n" + "\n".join(out)
            )
    still = [b for b in REQUIRED_BINARIES if find_binary(b) is None]
    if still:
        raise SlurmError(f"apt-get installed {APT_PACKAGES} but {still} are still missing")


# --------------------------------------------------------------------------- munge
def _munge_answers() -> bool:
    munge = find_binary("munge")
    if munge is None or not MUNGE_SOCKET.exists():
        return False
    try:
        proc = subprocess.run(
            [munge, "-n", "-S", str(MUNGE_SOCKET)],
            capture_output=True,
            stdin=subprocess.DEVNULL,
            timeout=10,
        )
    except subprocess.TimeoutExpired:
        return False
    return proc.returncode == 0


def _ensure_munge_key() -> None:
    try:
        pw = pwd.getpwnam("munge")
    except KeyError as exc:
        raise SlurmError("no 'munge' user; is the munge package installed?") from exc
    MUNGE_KEY.parent.mkdir(parents=True, exist_ok=True)
    os.chown(MUNGE_KEY.parent, pw.pw_uid, pw.pw_gid)
    os.chmod(MUNGE_KEY.parent, 0o700)
    if not MUNGE_KEY.exists() or MUNGE_KEY.stat().st_size == 0:
        mungekey = find_binary("mungekey")
        made = False
        if mungekey is not None:
            made = (
                subprocess.run(
                    [mungekey, "--create", "--force", f"--keyfile={MUNGE_KEY}"],
                    capture_output=True,
                    stdin=subprocess.DEVNULL,
                ).returncode
                == 0
            )
        if not made:
            MUNGE_KEY.write_bytes(os.urandom(1024))
    os.chown(MUNGE_KEY, pw.pw_uid, pw.pw_gid)
    os.chmod(MUNGE_KEY, 0o600)


def _start_munged(logdir: Path) -> subprocess.Popen | None:
    """Start munged in the foreground as user munge unless one already answers."""
    if _munge_answers():
        return None
    _ensure_munge_key()
    pw = pwd.getpwnam("munge")
    for d, mode in (("/run/munge", 0o755), ("/var/lib/munge", 0o711), ("/var/log/munge", 0o700)):
        Path(d).mkdir(parents=True, exist_ok=True)
        os.chown(d, pw.pw_uid, pw.pw_gid)
        os.chmod(d, mode)
    log = logdir / "munged.log"
    out = open(logdir / "munged.stdout", "wb")
    proc = subprocess.Popen(
        [
            _bin("munged"),
            "-F",
            "--force",
            f"--log-file={log}",
            f"--socket={MUNGE_SOCKET}",
            f"--key-file={MUNGE_KEY}",
        ],
        user=pw.pw_uid,
        group=pw.pw_gid,
        extra_groups=[],
        stdin=subprocess.DEVNULL,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    out.close()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SlurmError(
                f"munged exited with {proc.returncode}:\n{_tail(log)}\n"
                f"{_tail(logdir / 'munged.stdout')}"
            )
        if _munge_answers():
            return proc
        time.sleep(0.1)
    _stop_process(proc)
    raise SlurmError(f"munged did not answer within 20 s:\n{_tail(log)}")


def _stop_process(proc: subprocess.Popen | None, timeout: float = 15) -> None:
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(10)


# --------------------------------------------------------------------------- cluster
@dataclasses.dataclass
class SlurmNode:
    """A running one-node SLURM cluster (yielded by :func:`one_node_slurm`)."""

    root: Path  #: private directory with the config, state, spool and logs
    conf: Path  #: slurm.conf
    host: str  #: the node name (= short hostname)
    partition: str
    cpus: int
    memory_mb: int
    gpus: int
    env: dict[str, str]  #: os.environ plus SLURM_CONF, for subprocesses
    log_dir: Path
    started_munged: bool = False
    _procs: dict[str, subprocess.Popen] = dataclasses.field(default_factory=dict, repr=False)
    _spool_tmp: Path | None = dataclasses.field(default=None, repr=False)

    # -- diagnostics
    def logs(self, n: int = 40) -> str:
        """Tails of the slurmctld/slurmd (and munged, if ours) logs, for error messages."""
        parts = []
        for name in ("slurmctld", "slurmd", "munged"):
            for suffix in (".log", ".stdout"):
                p = self.log_dir / f"{name}{suffix}"
                if p.exists() and p.stat().st_size:
                    parts.append(f"----- {p.name} (last {n} lines)\n{_tail(p, n)}")
        return "\n".join(parts) or "<no logs>"

    # -- client commands
    def run(
        self, *args: str, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess:
        """Run a SLURM client command (``sbatch``, ``squeue``, ...) against this cluster."""
        cmd = [_bin(args[0]), *args[1:]]
        proc = subprocess.run(
            cmd,
            env=self.env,
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise SlurmError(
                f"{' '.join(cmd)} failed ({proc.returncode}): "
                f"{proc.stdout}{proc.stderr}\n{self.logs(15)}"
            )
        return proc

    def sbatch(self, *args: str) -> int:
        """``sbatch --parsable ARGS``; returns the job id."""
        out = self.run("sbatch", "--parsable", *args).stdout.strip()
        return int(out.split(";")[0])

    def job_ids(self) -> list[int]:
        out = self.run("squeue", "-h", "-o", "%A", check=False).stdout
        return [int(x) for x in out.split() if x.isdigit()]

    def job_state(self, job_id: int) -> str | None:
        """State of a job (PENDING, RUNNING, COMPLETED, FAILED, ...), None once forgotten."""
        out = self.run("scontrol", "-o", "show", "job", str(job_id), check=False).stdout
        for tok in out.split():
            if tok.startswith("JobState="):
                return tok.split("=", 1)[1]
        return None

    def wait_job(self, job_id: int, timeout: float = 60) -> str:
        """Wait until a job left the queue; returns its final state."""
        deadline = time.monotonic() + timeout
        state = None
        while time.monotonic() < deadline:
            state = self.job_state(job_id)
            if state not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED"):
                return state or "UNKNOWN"
            time.sleep(0.2)
        raise SlurmError(f"job {job_id} still {state} after {timeout} s\n{self.logs()}")

    def cancel_all(self, timeout: float = 20) -> None:
        """scancel every job and wait (up to ``timeout``) until the queue is empty."""
        ids = self.job_ids()
        if not ids:
            return
        self.run("scancel", *map(str, ids), check=False)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.job_ids():
            time.sleep(0.2)

    def node_state(self) -> str:
        return self.run(
            "sinfo", "-h", "-N", "-n", self.host, "-o", "%T", check=False
        ).stdout.strip()

    # -- lifecycle (used by one_node_slurm)
    def _start_daemon(self, name: str, *args: str) -> None:
        out = open(self.log_dir / f"{name}.stdout", "wb")
        self._procs[name] = subprocess.Popen(
            [_bin(name), "-D", "-f", str(self.conf), *args],
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=self.root,
        )
        out.close()

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            for name, proc in self._procs.items():
                if proc.poll() is not None:
                    raise SlurmError(
                        f"{name} exited with code {proc.returncode} during startup\n{self.logs()}"
                    )
            state = self.node_state()
            # "idle", possibly with a suffix flag; "mixed"/"allocated" if a job already runs
            if state.rstrip("*~#!%$@^-") in ("idle", "mixed", "allocated"):
                return
            time.sleep(0.2)
        raise SlurmError(
            f"node {self.host} not idle after {timeout} s (state {state!r})\n{self.logs()}"
        )

    def _stop(self) -> None:
        try:
            if self._procs.get("slurmctld") and self._procs["slurmctld"].poll() is None:
                self.cancel_all()
        finally:
            for name in ("slurmd", "slurmctld", "munged"):
                _stop_process(self._procs.get(name))
            if self._spool_tmp is not None:
                shutil.rmtree(self._spool_tmp, ignore_errors=True)


def _write_config(
    root: Path, *, host: str, cpus: int, memory_mb: int, gpus: int, spool: Path, log_dir: Path
) -> Path:
    state = root / "state"
    state.mkdir(parents=True, exist_ok=True)
    spool.mkdir(parents=True, exist_ok=True)
    node = f"NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb}"
    lines = [
        "# written by tests/slurm_harness.py",
        f"ClusterName=spndi{os.getpid() % 100000}",
        f"SlurmctldHost={host}(127.0.0.1)",
        f"SlurmctldPort={_free_port()}",
        f"SlurmdPort={_free_port()}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        "MpiDefault=none",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/none",
        "SchedulerType=sched/backfill",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core_Memory",
        f"DefMemPerCPU={max(100, min(1024, memory_mb // max(cpus, 1)))}",
        "SlurmdParameters=config_overrides",
        "ReturnToService=2",
        "MailProg=/bin/true",
        "KillWait=5",
        "MinJobAge=60",
        "InactiveLimit=0",
        "SlurmdTimeout=300",
        f"StateSaveLocation={state}",
        f"SlurmdSpoolDir={spool}",
        f"SlurmctldPidFile={root / 'slurmctld.pid'}",
        f"SlurmdPidFile={root / 'slurmd.pid'}",
        f"SlurmctldLogFile={log_dir / 'slurmctld.log'}",
        f"SlurmdLogFile={log_dir / 'slurmd.log'}",
        "SlurmctldDebug=info",
        "SlurmdDebug=info",
    ]
    if gpus > 0:
        # gres/gpu drops GPUs without File= and rejects files that are not character/block
        # devices; a symlink to /dev/null passes (no CAP_MKNOD needed).
        for i in range(gpus):
            dev = root / f"fakegpu{i}"
            if not dev.is_symlink():
                dev.symlink_to("/dev/null")
        files = f"{root}/fakegpu[0-{gpus - 1}]" if gpus > 1 else f"{root}/fakegpu0"
        (root / "gres.conf").write_text(f"NodeName={host} Name=gpu File={files}\n")
        lines.append("GresTypes=gpu")
        node += f" Gres=gpu:{gpus}"
    lines += [
        f"{node} State=UNKNOWN",
        f"PartitionName={PARTITION} Nodes={host} Default=YES MaxTime=INFINITE State=UP",
    ]
    conf = root / "slurm.conf"
    conf.write_text("\n".join(lines) + "\n")
    # a gres.conf is looked for beside slurm.conf; a stale one would break a gpus=0 run
    if gpus == 0:
        (root / "gres.conf").unlink(missing_ok=True)
    return conf


@contextlib.contextmanager
def one_node_slurm(
    workdir: Path,
    *,
    gpus: int = 0,
    cpus: int | None = None,
    memory_mb: int | None = None,
    install: bool = True,
    startup_timeout: float = 60,
) -> Iterator[SlurmNode]:
    """Start a one-node SLURM cluster (partition ``debug``) for the duration of the block.

    ``cpus`` defaults to the usable core count and ``memory_mb`` to the machine's memory less
    10 % (at most 2 GiB less); both may exceed the real machine (``config_overrides``).
    ``gpus`` fake GPUs make ``--gres=gpu:N`` jobs schedulable.  ``os.environ["SLURM_CONF"]``
    points at the private config inside the block and is restored afterwards.
    """
    if install:
        ensure_slurm_installed()
    reason = skip_reason()
    if reason is not None:
        raise SlurmError(reason)

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="slurm-", dir=workdir)).resolve()
    log_dir = root / "log"
    log_dir.mkdir()
    # slurmd puts unix sockets (<host>_<job>.<step>) in its spool dir: keep that path short
    spool_tmp = None
    spool = root / "spool"
    if len(str(spool)) > 60:
        spool_tmp = Path(tempfile.mkdtemp(prefix="slurmd-", dir="/tmp"))
        spool = spool_tmp

    host = _short_hostname()
    ncpu = int(cpus) if cpus else _cpu_count()
    total = _total_memory_mb()
    mem = int(memory_mb) if memory_mb else max(512, total - min(2048, total // 10))
    conf = _write_config(
        root, host=host, cpus=ncpu, memory_mb=mem, gpus=gpus, spool=spool, log_dir=log_dir
    )

    old_conf = os.environ.get("SLURM_CONF")
    env = {**os.environ, "SLURM_CONF": str(conf)}
    node = SlurmNode(
        root=root,
        conf=conf,
        host=host,
        partition=PARTITION,
        cpus=ncpu,
        memory_mb=mem,
        gpus=gpus,
        env=env,
        log_dir=log_dir,
        _spool_tmp=spool_tmp,
    )
    os.environ["SLURM_CONF"] = str(conf)
    try:
        munged = _start_munged(log_dir)
        if munged is not None:
            node._procs["munged"] = munged
            node.started_munged = True
        node._start_daemon("slurmctld")
        node._start_daemon("slurmd")
        node._wait_idle(startup_timeout)
        yield node
    finally:
        try:
            node._stop()
        finally:
            if old_conf is None:
                os.environ.pop("SLURM_CONF", None)
            else:
                os.environ["SLURM_CONF"] = old_conf


if __name__ == "__main__":  # smoke test: python tests/slurm_harness.py [WORKDIR]
    _work = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="slurm-smoke-"))
    _t0 = time.monotonic()
    with one_node_slurm(_work, gpus=1) as _s:
        print(f"up in {time.monotonic() - _t0:.1f} s: {_s.conf}")
        _out = _s.root / "hostname.out"
        _job = _s.sbatch("--gres=gpu:1", "-o", str(_out), "--wrap", "hostname")
        print(f"job {_job}: {_s.wait_job(_job)}; output {_out.read_text().strip()!r}")
    print(f"done in {time.monotonic() - _t0:.1f} s")
