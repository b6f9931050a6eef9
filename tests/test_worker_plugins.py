"""Worker plugins: core pinning of local workers and the workers' log levels."""

from __future__ import annotations

import logging
import os
import threading
from types import SimpleNamespace

import pytest

from spndi_dask.worker_plugins import PinToCore, WorkerLogLevel, set_affinity

linux_affinity = pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity") or not os.path.isdir("/proc/self/task"),
    reason="thread affinity needs Linux",
)


@pytest.fixture
def cores():
    """The cores this process may use; every thread gets them back afterwards."""
    allowed = os.sched_getaffinity(0)
    yield sorted(allowed)
    set_affinity(allowed)


def _thread_cores(thread: threading.Thread) -> set[int]:
    return os.sched_getaffinity(thread.native_id)


@linux_affinity
def test_pin_to_core_pins_every_thread_of_the_worker(cores):
    release = threading.Event()
    before = threading.Thread(target=release.wait, daemon=True)  # started before the pinning
    before.start()
    try:
        index = len(cores) - 1  # the last usable core: not where an unpinned process starts
        PinToCore(cores).setup(SimpleNamespace(name=str(index)))
        assert os.sched_getaffinity(0) == {cores[index]}
        assert _thread_cores(before) == {cores[index]}
        after = threading.Thread(target=release.wait, daemon=True)  # started after: inherits
        after.start()
        assert _thread_cores(after) == {cores[index]}
    finally:
        release.set()
        before.join()


@linux_affinity
def test_pin_to_core_wraps_worker_numbers_around_the_cores(cores):
    plugin = PinToCore(cores)
    plugin.setup(SimpleNamespace(name=len(cores)))  # worker n on core n % len(cores)
    assert os.sched_getaffinity(0) == {cores[0]}
    plugin.setup(SimpleNamespace(name=2 * len(cores) - 1))
    assert os.sched_getaffinity(0) == {cores[-1]}


@linux_affinity
@pytest.mark.parametrize("name", ["tcp://127.0.0.1:40001", "worker-a", None])
def test_pin_to_core_leaves_workers_without_a_number_alone(cores, name):
    if len(cores) > 1:
        narrowed = set(cores[:-1])  # not all cores, so a stray pin to cores[0] would show
    else:
        narrowed = set(cores)
    set_affinity(narrowed)
    PinToCore([cores[-1]]).setup(SimpleNamespace(name=name))
    assert os.sched_getaffinity(0) == narrowed


def test_pin_to_core_is_a_named_worker_plugin():
    from distributed.diagnostics.plugin import WorkerPlugin

    plugin = PinToCore([3, 1])
    assert isinstance(plugin, WorkerPlugin)
    assert plugin.name == "spndi-pin-to-core"  # registering again replaces, not adds
    assert plugin.cores == [3, 1]


@pytest.fixture
def log_levels():
    """Levels of the loggers the plugin touches, restored afterwards."""
    names = ("spndi_dask", "distributed.sizeof")
    old = {n: logging.getLogger(n).level for n in names}
    yield
    for n, level in old.items():
        logging.getLogger(n).setLevel(level)


@pytest.mark.parametrize("level", [logging.DEBUG, logging.INFO, logging.WARNING])
def test_worker_log_level_sets_ours_and_quiets_sizeof(log_levels, level):
    logging.getLogger("spndi_dask").setLevel(logging.CRITICAL)
    logging.getLogger("distributed.sizeof").setLevel(logging.NOTSET)
    plugin = WorkerLogLevel(level)
    plugin.setup(SimpleNamespace(name="0"))
    assert logging.getLogger("spndi_dask").level == level
    assert logging.getLogger("spndi_dask.reduce").getEffectiveLevel() == level
    sizeof = logging.getLogger("distributed.sizeof")
    assert sizeof.level == logging.ERROR
    assert not sizeof.isEnabledFor(logging.WARNING)
    assert plugin.name == "spndi-log-level"
