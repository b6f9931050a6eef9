"""One writer per output directory: ``<output>/.spndi.lock``.

A run takes the lock before it writes anything and removes it when it ends. A second run on the
same output stops with a message naming the holder (pid, host, start time, command). A lock left
by a process that no longer exists on this host (a run killed with SIGKILL, a crashed node) is
stale and is taken over with a warning. :func:`lock_holder` tells which (``spndi status``).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import psutil

from spndi_dask.io.layout import OutputLayout

__all__ = [
    "LOCK_NAME",
    "LockError",
    "LockHolder",
    "holder_state",
    "lock_holder",
    "output_lock",
    "read_lock",
]

logger = logging.getLogger(__name__)

LOCK_NAME = OutputLayout("").lock.name


class LockError(RuntimeError):
    """Another live process holds the output directory's lock."""


def read_lock(output_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The holder recorded in ``<output>/.spndi.lock``, or None when unlocked."""
    path = OutputLayout(output_dir).lock
    try:
        holder = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        holder = None
    if not isinstance(holder, dict):
        return {"pid": None, "host": None, "note": "unreadable lock file"}
    return holder


HolderState = Literal["running", "stale", "unknown"]


def holder_state(holder: dict[str, Any]) -> HolderState:
    """Whether the process a lock names still runs: ``running``, ``stale`` or ``unknown``.

    Only a holder on this host can be checked: ``stale`` when its pid no longer exists or now
    belongs to a process started after the lock was written (a recycled pid). A holder on
    another host, or a lock file without a host (unreadable), is ``unknown``.
    """
    host = holder.get("host")
    if host is None or host != socket.gethostname():
        return "unknown"
    pid = holder.get("pid")
    if not isinstance(pid, int) or not psutil.pid_exists(pid):
        return "stale"
    try:  # a recycled pid belongs to a process started after the lock was written
        started = psutil.Process(pid).create_time()
    except psutil.Error:
        return "stale"
    return "running" if started <= holder.get("created", float("inf")) + 1 else "stale"


@dataclass(frozen=True)
class LockHolder:
    """Who holds ``<output>/.spndi.lock`` (see :func:`lock_holder`).

    Attributes
    ----------
    info : dict
        The lock file's record: ``pid``, ``host``, ``created``, ``started``, ``command`` (or
        ``note`` for an unreadable file).
    state : {"running", "stale", "unknown"}
        See :func:`holder_state`.
    path : Path
        The lock file.
    """

    info: dict[str, Any]
    state: HolderState
    path: Path

    @property
    def alive(self) -> bool:
        """Whether the holder may still be running (``unknown`` counts as running)."""
        return self.state != "stale"


def lock_holder(output_dir: str | os.PathLike[str]) -> LockHolder | None:
    """The holder of ``<output>/.spndi.lock`` and whether it still runs; None when unlocked."""
    info = read_lock(output_dir)
    if info is None:
        return None
    return LockHolder(info, holder_state(info), OutputLayout(output_dir).lock)


@contextmanager
def output_lock(output_dir: str | os.PathLike[str], command: str | None = None) -> Iterator[Path]:
    """Hold ``<output>/.spndi.lock`` for the duration of the block.

    Raises
    ------
    LockError
        When a live process (or one on another host) holds it; the message names it and says
        how to proceed.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = OutputLayout(out).lock
    me = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "created": psutil.Process().create_time(),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command or " ".join(sys.argv),
    }
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = read_lock(out)
            if holder is None:  # released in the meantime
                continue
            if holder_state(holder) != "stale":
                raise LockError(
                    f"{out} is being written by another spndi run (pid {holder.get('pid')} on "
                    f"{holder.get('host')}, started {holder.get('started')}: "
                    f"{holder.get('command')}); wait for it to finish, or delete {path} if that "
                    "process is gone"
                ) from None
            logger.warning(
                "taking over a stale lock of %s (pid %s on %s, started %s, no longer running)",
                out,
                holder.get("pid"),
                holder.get("host"),
                holder.get("started"),
            )
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    else:  # pragma: no cover - three races in a row
        raise LockError(f"could not take the lock {path}; try again")
    try:
        yield path
    finally:
        if (read_lock(out) or {}).get("pid") == me["pid"]:
            path.unlink(missing_ok=True)
