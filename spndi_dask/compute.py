"""Computing dask collections: on the active distributed client if any, else locally.

Every stage computes through these helpers, so that a stage runs unchanged under
``spndi run``'s client (see :mod:`spndi_dask.dask_clusters`), under a client the user started
(Jupyter) or without one (dask's local scheduler).

A signal that stops the run (:mod:`spndi_dask.interrupt`) cancels the futures of the computation
in progress before the exception goes on, so the workers drop the stage's tasks at once.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Hashable, Iterable, Iterator
from typing import Any

import dask
from dask.diagnostics import ProgressBar
from distributed import as_completed, get_client
from distributed import progress as show_progress
from distributed.utils import is_kernel

from spndi_dask.interrupt import check_interrupted

__all__ = ["active_client", "compute", "compute_as_completed", "compute_each"]

logger = logging.getLogger(__name__)


def active_client() -> Any:
    """The distributed ``Client`` this process works under, or None."""
    try:
        return get_client()
    except ValueError:
        return None


def _cancel(client: Any, futures: list[Any]) -> None:
    """Cancel ``futures`` (the run stops); a client already closing is left alone."""
    if not futures:
        return
    try:
        client.cancel(futures)
    except Exception as exc:  # the cluster may be going away already
        logger.debug("cancelling %d futures failed: %s", len(futures), exc)


def _gather(client: Any, collections: list[Any], progress: bool) -> list[Any]:
    """The results of ``collections`` on ``client``; their futures cancelled if interrupted."""
    futures = client.compute(collections)
    try:
        if progress:
            show_progress(futures)
        check_interrupted()
        return client.gather(futures)
    except BaseException:
        _cancel(client, futures)
        raise


def compute(collections: list[Any], progress: bool = False) -> list[Any]:
    """Compute dask collections on the active distributed client if any, else locally.

    With ``progress`` a progress bar is shown (distributed's, or dask's local one).

    Examples
    --------
    >>> import dask.array as da
    >>> [int(v) for v in compute([da.ones(4, chunks=2).sum(), da.arange(3, chunks=2).max()])]
    [4, 2]
    """
    check_interrupted()
    client = active_client()
    if client is not None:
        results = _gather(client, collections, progress)
        check_interrupted()
        return results
    if progress:
        with ProgressBar():
            return list(dask.compute(*collections))
    return list(dask.compute(*collections))


def compute_as_completed(
    items: Iterable[tuple[Hashable, Any]], progress: bool = False
) -> Iterator[tuple[Hashable, Any, BaseException | None]]:
    """Compute dask collections as they are made; one failing does not stop the others.

    On a distributed client each ``(tag, collection)`` is submitted as soon as ``items`` gives
    it (the workers start on the first while the next is still being built) and the results
    come back in the order they finish; locally they run one after another.

    Yields
    ------
    tag, result, error
        Per collection: its tag, its result and None, or None and the exception it raised.
    """
    client = active_client()
    if client is None:
        for tag, c in items:
            check_interrupted()
            try:
                yield tag, compute([c], progress)[0], None
            except Exception as exc:
                yield tag, None, exc
        return

    tags: dict[str, list[Hashable]] = {}  # equal collections share a key (and a future's result)
    futures: list[Any] = []
    bar = None
    try:  # interrupted (or closed by the caller): the futures are cancelled
        for tag, c in items:
            check_interrupted()
            try:
                future = client.compute(c)
            except Exception as exc:  # e.g. a graph that cannot be sent: this one only
                yield tag, None, exc
                continue
            tags.setdefault(future.key, []).append(tag)
            futures.append(future)
        if progress and futures:
            if is_kernel():  # a notebook widget, updated in the background
                show_progress(futures)
            else:  # the text bar blocks until every future is done: drawn aside, results stream
                bar = threading.Thread(target=show_progress, args=(futures,), daemon=True)
                bar.start()
        for future in as_completed(futures):
            check_interrupted()
            tag = tags[future.key].pop(0)
            try:
                result = future.result()
            except Exception as exc:
                yield tag, None, exc
                continue
            yield tag, result, None
    except BaseException:
        _cancel(client, futures)
        raise
    if bar is not None:
        bar.join(timeout=5)


def compute_each(
    collections: list[Any], progress: bool = False
) -> list[tuple[Any, BaseException | None]]:
    """Compute independent dask collections together; one failing does not stop the others.

    As :func:`compute_as_completed`, with the results in the order of ``collections``.

    Returns
    -------
    list of (result, error)
        Per collection, its result and None, or None and the exception it raised.

    Examples
    --------
    >>> import dask
    >>> @dask.delayed
    ... def inverse(x):
    ...     return 1 / x
    >>> [(r, type(e).__name__) for r, e in compute_each([inverse(2), inverse(0)])]
    [(0.5, 'NoneType'), (None, 'ZeroDivisionError')]
    """
    done = {i: (r, e) for i, r, e in compute_as_completed(enumerate(collections), progress)}
    return [done[i] for i in range(len(collections))]
