"""A task on a chosen worker with its rows streamed back: worker choice, order, cancelling."""

from __future__ import annotations

import os
import threading
import time
from types import SimpleNamespace

import pytest
from distributed import Client, LocalCluster, get_worker

from spndi_dask.features.remote import TaskCancelled, choose_worker, run_on_worker, worker_cores
from spndi_dask.worker_plugins import PinToCore, set_affinity

GIB = 2**30
CPU_ONLY = {
    "tcp://10.0.0.1:1": {"nthreads": 4, "memory_limit": 8 * GIB, "resources": {}},
    "tcp://10.0.0.2:1": {"nthreads": 16, "memory_limit": 8 * GIB, "resources": {}},
    "tcp://10.0.0.3:1": {"nthreads": 16, "memory_limit": 32 * GIB},
    "tcp://10.0.0.4:1": {"nthreads": 1, "memory_limit": 64 * GIB},
}
WITH_GPU = {**CPU_ONLY, "tcp://10.0.0.9:1": {"nthreads": 2, "resources": {"GPU": 1.0}}}


def test_a_gpu_worker_is_chosen_when_any_declares_one():
    assert choose_worker(WITH_GPU) == {"resources": {"GPU": 1}}
    assert choose_worker(WITH_GPU, device="cuda") == {"resources": {"GPU": 1}}


def test_else_the_worker_with_most_threads_then_most_memory():
    most = {"workers": ["tcp://10.0.0.3:1"], "allow_other_workers": True}
    assert choose_worker(CPU_ONLY) == most
    assert choose_worker(WITH_GPU, device="cpu") == most  # a GPU worker is not needed for CPU
    # equal threads and memory: the first address, whatever the order of the mapping
    same = {a: {"nthreads": 2, "memory_limit": GIB} for a in ("tcp://b:1", "tcp://a:1")}
    assert choose_worker(same)["workers"] == ["tcp://a:1"]


def test_cuda_without_gpu_resources_goes_to_a_worker_that_sees_cuda():
    cuda = {"tcp://10.0.0.1:1", "tcp://10.0.0.4:1"}
    assert choose_worker(CPU_ONLY, device="cuda", cuda=cuda)["workers"] == ["tcp://10.0.0.1:1"]
    assert choose_worker(CPU_ONLY, device="cuda", cuda=set()) is None


@pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="needs CPU affinity and two cores",
)
def test_a_pinned_worker_trains_on_the_cores_it_was_pinned_from():
    before = os.sched_getaffinity(0)
    one = {min(before)}

    worker = SimpleNamespace(plugins={PinToCore.name: PinToCore(sorted(before))})
    try:
        set_affinity(one)  # as PinToCore pins a local worker
        with worker_cores(worker) as cores:
            assert cores == before == os.sched_getaffinity(0)
        assert os.sched_getaffinity(0) == one  # pinned again
    finally:
        set_affinity(before)


# -- a real (threaded) cluster: the worker runs in this process, so the test can gate it ---------
SEEN = threading.Event()
STOPPED = threading.Event()


def _emit(n: int, *, gate: bool = False, callback=None) -> tuple[bool, str]:
    waited = True
    for i in range(1, n + 1):
        callback({"epoch": i, "loss": 1.0 / i})
        if gate and i == 1:
            waited = SEEN.wait(30)  # set by the client's callback while this task still runs
    return waited, get_worker().address


def _forever(*, callback=None) -> None:
    try:
        for i in range(1, 10_000):
            callback({"epoch": i})
            time.sleep(0.05)
    except TaskCancelled:
        STOPPED.set()
        raise


@pytest.fixture(scope="module")
def client():
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=False, dashboard_address=":0"
        ) as cluster,
        Client(cluster) as c,
    ):
        yield c


def test_rows_reach_the_client_in_order_while_the_task_runs(client):
    SEEN.clear()
    rows, threads = [], []

    def on_row(row):
        rows.append(row)
        threads.append(threading.current_thread() is threading.main_thread())
        SEEN.set()

    addr = sorted(client.scheduler_info()["workers"])[1]
    target = choose_worker({addr: {"nthreads": 1}})
    (waited, ran_on), delivered = run_on_worker(
        client, _emit, 40, gate=True, target=target, callback=on_row
    )
    assert waited  # the first row arrived before the task finished
    assert ran_on == addr
    assert [r["epoch"] for r in rows] == list(range(1, 41)) and all(threads)
    assert rows == delivered and rows[1] == {"epoch": 2, "loss": 0.5}


def test_rows_the_events_did_not_bring_come_from_the_result(client):
    rows = []
    result, _ = run_on_worker(
        client,
        _emit,
        0,  # no event at all: every row comes from the result
        target={},
        callback=rows.append,
        final_rows=lambda r: [{"epoch": 1}, {"epoch": 2}],
    )
    assert result[0] is True and [r["epoch"] for r in rows] == [1, 2]


def test_an_error_in_the_client_cancels_the_task_on_the_worker(client):
    STOPPED.clear()

    def fail_at_three(row):
        if row["epoch"] == 3:
            raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here"):
        run_on_worker(client, _forever, target={}, callback=fail_at_three)
    assert STOPPED.wait(10)  # the worker's task stopped at its next row
