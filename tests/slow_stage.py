"""A dask worker preload that slows one function of a stage down, for tests/test_interrupt.py.

With ``SPNDI_TEST_SLOW="MODULE:FUNCTION:SECONDS"`` and this module as the workers' preload
(``DASK_DISTRIBUTED__WORKER__PRELOAD='["tests.slow_stage"]'``), every call of
``MODULE.FUNCTION`` in a worker process prints :data:`MARKER`, sleeps ``SECONDS`` and calls the
original, so a test knows the stage's tasks are running when it sends its signal. Tasks refer
to the function by name, so they call the slowed one in the worker; the run's own process is
unchanged.
"""

from __future__ import annotations

import importlib
import os
import time
from typing import Any

MARKER = "slow-stage: a slowed call is running"
VARIABLE = "SPNDI_TEST_SLOW"

_original: dict[str, Any] = {}


def slowed(*args: Any, **kwargs: Any) -> Any:
    """The slowed function: marker, sleep, the original."""
    print(MARKER, flush=True)
    time.sleep(_original["seconds"])
    return _original["function"](*args, **kwargs)


def dask_setup(worker: Any) -> None:
    """Called by the worker at its start: slow down the function ``$SPNDI_TEST_SLOW`` names."""
    spec = os.environ.get(VARIABLE)
    if not spec or _original:
        return
    module, name, seconds = spec.split(":")
    mod = importlib.import_module(module)
    _original.update(function=getattr(mod, name), seconds=float(seconds))
    setattr(mod, name, slowed)
