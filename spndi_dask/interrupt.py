"""Stopping a run on SIGINT or SIGTERM: promptly, cleanly and never silently.

:func:`handle_signals` (entered by the command line around every command) turns SIGINT and
SIGTERM into :class:`Interrupted`, raised in the main thread wherever it is. The exception
unwinds the run: the compute helpers cancel their futures, the pipeline records the stage that
was running as interrupted, the cluster is closed and the output lock released; the command
exits with 128 + the signal's number (130, 143).

Python cannot raise everywhere. An exception raised inside a garbage-collection callback, a
``__del__`` or a weakref finalizer is printed as "Exception ignored in ..." and dropped, and the
run would go on (distributed's ``GCDiagnosis._gc_callback`` runs on every full collection of a
process that hosts a LocalCluster's scheduler, and is left in a broken state). So the handler
does not raise there: it records the signal and delivers it to the main thread again 50 ms
later. The stages also call :func:`check_interrupted` at safe points (each training batch, each
particle, each finished computation, between stages), which raises a recorded signal there
whatever happened to the exception; a dropped :class:`Interrupted` is not printed.
:func:`check_interrupted` also takes the handlers back from a library that replaced them
(``import dask_jobqueue`` sets SIGINT to ``sys.exit()``, which exits 0).

Writes that must not be cut in half (marking a result complete and moving it into place, a
checkpoint, the run log) run inside :func:`deferred`: a signal there is raised when the block
ends.

A second signal while the run is stopping exits at once with the same status: the callbacks
registered with :func:`at_forced_exit` run (the command line removes its lock), the child
processes (local dask workers) are killed, and nothing else is cleaned up.

Only the main thread raises: :func:`check_interrupted` and :func:`deferred` do nothing in other
threads (the tasks of a threaded LocalCluster stop when their futures are cancelled and the
cluster closes). This module imports nothing heavy, so the command line installs the handlers
first.

Examples
--------
>>> with handle_signals():
...     check_interrupted()  # nothing received: returns
...     _received(signal.SIGTERM)  # as if the handler's exception had been swallowed
...     try:
...         check_interrupted()
...     except Interrupted as exc:
...         print(exc.signame, exc.exit_code)
SIGTERM 143
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

__all__ = [
    "SIGNALS",
    "Interrupted",
    "at_forced_exit",
    "check_interrupted",
    "deferred",
    "handle_signals",
    "received",
]

logger = logging.getLogger(__name__)

#: The signals that stop a run: Ctrl-C, and what batch systems and ``kill`` send.
SIGNALS: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """The run was stopped by a signal.

    A ``KeyboardInterrupt``, so that ``except Exception`` (a stage's failure handling) lets it
    through.

    Parameters
    ----------
    signum : int
        The signal received.
    stage : str, optional
        The stage that was running (set by :func:`spndi_dask.pipeline.run`).
    """

    def __init__(self, signum: int, stage: str | None = None) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)
        self.stage = stage

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.signum, self.stage)

    @property
    def signame(self) -> str:
        """The signal's name (``SIGINT``)."""
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        """The exit status of a process stopped by this signal: 128 + its number."""
        return 128 + self.signum


@dataclass
class _State:
    installed: tuple[int, ...] = ()
    signum: int | None = None  # the first signal received
    raised: bool = False  # Interrupted was raised for it
    redelivery: threading.Timer | None = None  # sends it again, out of a place that cannot raise
    deferred: int = 0  # depth of deferred() blocks in the main thread
    callbacks: list[Callable[[], Any]] = field(default_factory=list)


_state = _State()


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _received(signum: int) -> None:
    """Record ``signum`` as received (what the handler does before it raises)."""
    if _state.signum is None:
        _state.signum = int(signum)


def received() -> int | None:
    """The signal received since :func:`handle_signals` was entered, or None."""
    return _state.signum


#: how long the handler waits to deliver a signal again that arrived where nothing can raise
REDELIVERY_S = 0.05


def _cannot_raise(frame: FrameType | None) -> bool:
    """Whether ``frame`` runs in a gc callback, a ``__del__`` or a weakref finalizer."""
    codes = {getattr(getattr(cb, "__func__", cb), "__code__", None) for cb in gc.callbacks}
    codes.add(weakref.finalize.__call__.__code__)
    while frame is not None:
        if frame.f_code in codes or frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


def _send_again(signum: int) -> None:
    if _state.installed and not _state.raised:  # else a check point raised it meanwhile
        signal.pthread_kill(threading.main_thread().ident, signum)  # type: ignore[arg-type]


def _redeliver(signum: int) -> None:
    """Deliver ``signum`` to the main thread again shortly (it wakes a blocking wait there)."""
    _state.redelivery = threading.Timer(REDELIVERY_S, _send_again, (signum,))
    _state.redelivery.daemon = True
    _state.redelivery.start()


def _handler(signum: int, frame: FrameType | None) -> None:
    if _state.redelivery is not None and signum == _state.signum:  # sent by _redeliver
        _state.redelivery = None
        if _state.raised:
            return
    elif _state.signum is not None:
        _force_exit(signum)
    _received(signum)
    if _state.deferred:
        return
    if _cannot_raise(frame):
        _redeliver(signum)
        return
    _state.raised = True
    raise Interrupted(signum)


def _force_exit(signum: int) -> None:
    """A second signal: run the forced-exit callbacks, kill the children, exit now."""
    for callback in reversed(_state.callbacks):
        try:
            callback()
        except BaseException:  # exiting anyway: nothing may stop it
            pass
    try:
        import psutil

        for child in psutil.Process().children(recursive=True):
            try:
                child.kill()
            except psutil.Error:
                pass
    except BaseException:  # psutil missing or failing: exit anyway
        pass
    os._exit(128 + signum)


def _reclaim() -> None:
    """Install the handler again where a library replaced it."""
    for signum in _state.installed:
        current = signal.getsignal(signum)
        if current is not _handler:
            logger.debug("the %s handler was replaced (%r); installed again", signum, current)
            signal.signal(signum, _handler)


def check_interrupted() -> None:
    """Raise :class:`Interrupted` if a signal was received (a safe point of a long loop).

    Cheap (a few attribute reads): call it per batch, per particle, per result. Does nothing
    outside :func:`handle_signals`, in threads other than the main one and inside
    :func:`deferred`.

    Raises
    ------
    Interrupted
        When SIGINT or SIGTERM was received, even if the exception the handler raised was
        swallowed where it happened.
    """
    if not _state.installed or not _main_thread():
        return
    _reclaim()
    if _state.signum is not None and not _state.deferred:
        _state.raised = True
        raise Interrupted(_state.signum)


@contextmanager
def deferred() -> Iterator[None]:
    """A block that a signal does not cut: it is raised when the block ends.

    For the few writes that must be whole (mark a result complete and move it in, write a
    checkpoint, the run log). A second signal still exits at once.
    """
    if not _main_thread():
        yield
        return
    before = _state.signum
    _state.deferred += 1
    try:
        yield
    finally:
        _state.deferred -= 1
    if before is None:  # one received before was raised already (or is at the next check)
        check_interrupted()


@contextmanager
def at_forced_exit(callback: Callable[[], Any]) -> Iterator[None]:
    """Call ``callback`` if a second signal forces the exit while the block runs."""
    _state.callbacks.append(callback)
    try:
        yield
    finally:
        _state.callbacks.remove(callback)


def _quiet_unraisable(previous: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def hook(unraisable: Any) -> None:
        if isinstance(unraisable.exc_value, Interrupted):
            logger.debug(
                "%s arrived in %r, which cannot raise; raised at the next check point",
                unraisable.exc_value.signame,
                unraisable.object,
            )
            return
        previous(unraisable)

    return hook


@contextmanager
def handle_signals(signals: tuple[int, ...] = SIGNALS) -> Iterator[None]:
    """SIGINT and SIGTERM raise :class:`Interrupted` in the main thread while the block runs.

    The previous handlers (and ``sys.unraisablehook``) are restored at the end. Outside the
    main thread (where Python allows no handlers) the block runs unchanged.
    """
    if not _main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in signals}
    old_hook = sys.unraisablehook
    _reset(tuple(signals))
    for s in signals:
        signal.signal(s, _handler)
    sys.unraisablehook = _quiet_unraisable(old_hook)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        sys.unraisablehook = old_hook
        _reset(())


def _reset(installed: tuple[int, ...]) -> None:
    if _state.redelivery is not None:
        _state.redelivery.cancel()
    _state.installed, _state.signum, _state.deferred = installed, None, 0
    _state.raised, _state.redelivery = False, None
