"""Training as one task on a dask worker, its progress streamed back to the client.

On HPC the client runs on a login node or in a one-core batch job, while the workers hold the
cores and the GPUs. :func:`run_on_worker` submits a function (the fit of
:func:`spndi_dask.features.train.train`) to the worker :func:`choose_worker` picks: a worker
declaring the dask resource ``GPU`` when any does (``--resources GPU=1``, see
``cluster_configs/slurm-gpu.yaml``), else the worker with the most threads. While it runs the
client only waits: each row the function passes to its ``callback`` goes to the scheduler as a
worker event (``Worker.log_event``) and the client's callback is called with it, in order, in
the client's own thread, as it arrives.

On the worker the task may use every core the worker process may run on: a worker that
:class:`~spndi_dask.worker_plugins.PinToCore` pinned to one core is given back the cores it was
pinned from for the task's duration (the other local workers idle while a stage trains), then
pinned again. Cancelling the future (Ctrl-C in the client) stops the function at its next
callback.
"""

from __future__ import annotations

import logging
import queue
import uuid
from collections.abc import Callable, Collection, Mapping
from typing import Any

from distributed import get_worker

from spndi_dask.interrupt import check_interrupted
from spndi_dask.worker_plugins import worker_cores

__all__ = ["TaskCancelled", "choose_worker", "run_on_worker", "worker_cores"]

logger = logging.getLogger(__name__)

#: seconds between the client's checks for a signal while it waits for the task
POLL = 0.2


class TaskCancelled(RuntimeError):
    """The client cancelled the task (raised on the worker at the task's next callback)."""


def choose_worker(
    workers: Mapping[str, Mapping[str, Any]],
    *,
    device: str = "auto",
    cuda: Collection[str] | None = None,
) -> dict[str, Any] | None:
    """Where a training task goes: keyword arguments of ``Client.submit``, or None.

    Parameters
    ----------
    workers : mapping
        ``client.scheduler_info(n_workers=-1)["workers"]``: address → ``nthreads``,
        ``memory_limit``, ``resources``.
    device : {'auto', 'cpu', 'cuda'}
        Unless ``'cpu'``, a worker declaring a ``GPU`` resource wins (the scheduler picks among
        them: ``resources={'GPU': 1}``).
    cuda : collection of str, optional
        With ``device='cuda'`` and no ``GPU`` resource: the addresses of the workers that see a
        CUDA GPU, the only candidates.

    Returns
    -------
    dict or None
        ``{'resources': {'GPU': 1}}``, or ``{'workers': [address], 'allow_other_workers':
        True}`` for the candidate with the most threads (then the most memory, then the first
        address): the task goes there, and to another worker only if that one leaves the
        cluster (a retired or lost job) before the task ends. None when there is no candidate.

    Examples
    --------
    >>> ws = {"tcp://a:1": {"nthreads": 2}, "tcp://b:1": {"nthreads": 8}}
    >>> choose_worker(ws)
    {'workers': ['tcp://b:1'], 'allow_other_workers': True}
    >>> choose_worker({**ws, "tcp://g:1": {"nthreads": 1, "resources": {"GPU": 1}}})
    {'resources': {'GPU': 1}}
    """
    if device != "cpu" and any(w.get("resources", {}).get("GPU") for w in workers.values()):
        return {"resources": {"GPU": 1}}
    candidates = [a for a in workers if device != "cuda" or a in (cuda or ())]
    if not candidates:
        return None
    best = min(
        candidates,
        key=lambda a: (
            -int(workers[a].get("nthreads", 1)),
            -int(workers[a].get("memory_limit") or 0),
            a,
        ),
    )
    # loose: a task restricted to a worker that has left would wait for it for ever
    return {"workers": [best], "allow_other_workers": True}


def _cancelled(worker: Any, key: Any) -> bool:
    """Whether the scheduler released this running task (its future was cancelled)."""
    try:
        ts = worker.state.tasks.get(key)
    except AttributeError:  # another worker implementation: never cancelled here
        return False
    return ts is None or ts.state in ("cancelled", "released", "forgotten")


def _task(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], topic: str) -> Any:
    """The task on the worker: ``fn(*args, callback=..., **kwargs)`` on all its cores."""
    worker = get_worker()
    key = worker.get_current_task()

    def publish(row: dict[str, Any]) -> None:
        if _cancelled(worker, key):
            raise TaskCancelled(f"task {key} was cancelled by the client")
        worker.log_event(topic, dict(row))

    with worker_cores(worker) as cores:
        logger.info(
            "worker %s runs %s on %s cores",
            worker.address,
            getattr(fn, "__name__", "a task"),
            len(cores) if cores else "all",
        )
        return fn(*args, callback=publish, **kwargs)


def run_on_worker(
    client: Any,
    fn: Callable[..., Any],
    *args: Any,
    target: Mapping[str, Any],
    callback: Callable[[dict[str, Any]], None] | None = None,
    order: str = "epoch",
    final_rows: Callable[[Any], list[dict[str, Any]]] | None = None,
    **kwargs: Any,
) -> tuple[Any, list[dict[str, Any]]]:
    """``fn(*args, callback=..., **kwargs)`` as one task on ``target``; wait for its result.

    ``args`` may hold futures (the data, read by the workers, moves to the chosen worker, never
    to the client). Each row ``fn`` passes to its callback reaches ``callback`` here, in this
    thread, while the task runs; rows are delivered once each in increasing ``row[order]``
    (one arriving late is dropped). A signal in this process (:mod:`spndi_dask.interrupt`)
    cancels the task, which stops at its next callback. ``final_rows(result)``, if given, are
    the rows the result carries: those whose events have not arrived by then are delivered last.

    Returns
    -------
    The task's result, and the rows delivered, as ``(result, rows)``.
    """
    topic = f"spndi-task-{uuid.uuid4().hex}"
    rows: queue.Queue[dict[str, Any]] = queue.Queue()
    client.subscribe_topic(topic, lambda event: rows.put(event[1]))
    delivered: list[dict[str, Any]] = []

    def deliver(row: dict[str, Any]) -> None:
        if delivered and row.get(order, 0) <= delivered[-1].get(order, 0):
            return
        row = {k: v for k, v in row.items() if k != "worker"}
        delivered.append(row)
        if callback is not None:
            callback(row)

    future = client.submit(_task, fn, args, kwargs, topic, pure=False, **target)
    try:
        while True:
            try:
                deliver(rows.get(timeout=POLL))
                continue
            except queue.Empty:
                pass
            check_interrupted()
            if future.done():
                break
        result = future.result()
        while not rows.empty():  # events that came with the result
            deliver(rows.get_nowait())
        for row in final_rows(result) if final_rows else ():  # events still on their way
            deliver(row)
        return result, delivered
    except BaseException:
        try:
            client.cancel([future])
        except Exception as exc:  # the cluster may be going away already
            logger.debug("cancelling the training task failed: %s", exc)
        raise
    finally:
        try:
            client.unsubscribe_topic(topic)
        except Exception:  # the client may be closing
            pass
