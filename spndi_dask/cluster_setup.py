"""dask.distributed clients: a LocalCluster sized to the machine, or an existing scheduler."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psutil

__all__ = ["active_client", "compute", "local_cluster_size", "start_client"]

logger = logging.getLogger(__name__)


def local_cluster_size() -> tuple[int, int, int]:
    """``(n_workers, threads_per_worker, memory_limit_bytes)`` for this machine.

    One single-threaded worker process per usable core (h5py and the Blosc/HDF5 codecs hold
    the GIL, so processes scale and threads do not), sharing 90 % of the RAM.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    n = max(1, cores or 1)
    mem = int(psutil.virtual_memory().total * 0.9 / n)
    return n, 1, mem


@contextmanager
def start_client(
    address: str | None = None,
    *,
    n_workers: int | None = None,
    threads_per_worker: int | None = None,
    dashboard_address: str = "127.0.0.1:0",
) -> Iterator[object]:
    """A ``distributed.Client``: connected to ``address``, or on a new LocalCluster.

    The LocalCluster binds the scheduler and dashboard to localhost; the dashboard link is
    logged and available as ``client.dashboard_link``.

    Examples
    --------
    >>> with start_client(n_workers=1) as client:  # doctest: +SKIP
    ...     print(client.dashboard_link)
    """
    from distributed import Client, LocalCluster

    if address:
        try:
            client = Client(address, timeout="10s")
        except OSError as exc:
            raise ConnectionError(
                f"cannot reach the dask scheduler at {address} ({exc}); check the address and "
                "that the scheduler is running"
            ) from None
        try:
            yield client
        finally:
            client.close()
        return
    n, t, mem = local_cluster_size()
    cluster = LocalCluster(
        n_workers=n_workers or n,
        threads_per_worker=threads_per_worker or t,
        memory_limit=mem if n_workers is None else int(mem * n / n_workers),
        processes=True,
        host="127.0.0.1",
        dashboard_address=dashboard_address,
    )
    client = Client(cluster)
    logger.debug("dask dashboard: %s", client.dashboard_link)
    try:
        yield client
    finally:
        client.close()
        cluster.close()


def active_client() -> Any:
    """The distributed ``Client`` this process works under, or None."""
    try:
        from distributed import get_client

        return get_client()
    except (ImportError, ValueError):
        return None


def compute(collections: list[Any], progress: bool = False) -> list[Any]:
    """Compute dask collections on the active distributed client if any, else locally.

    With ``progress`` a progress bar is shown (distributed's, or dask's local one).
    """
    import dask

    client = active_client()
    if client is not None:
        futures = client.compute(collections)
        if progress:
            from distributed import progress as show_progress

            show_progress(futures)
        return client.gather(futures)
    if progress:
        from dask.diagnostics import ProgressBar

        with ProgressBar():
            return list(dask.compute(*collections))
    return list(dask.compute(*collections))
