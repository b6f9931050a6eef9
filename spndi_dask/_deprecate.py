"""Old names that still work for a while, with a :class:`DeprecationWarning`.

Examples
--------
>>> import warnings
>>> @renamed_keyword(particles="scans")
... def stats(manifest, *, scans=None):
...     return scans
>>> with warnings.catch_warnings(record=True) as seen:
...     warnings.simplefilter("always")
...     stats(None, particles=["p1"])
['p1']
>>> print(seen[0].message)
stats(particles=...) is deprecated; use scans=... (a manifest entry is a scan)
>>> class Beamtime:
...     scans = ["p1"]
...     particles = renamed_attribute("Beamtime", "particles", "scans")
>>> with warnings.catch_warnings(record=True) as seen:
...     warnings.simplefilter("always")
...     Beamtime().particles
['p1']
>>> print(seen[0].message)
Beamtime.particles is deprecated; use Beamtime.scans (a manifest entry is a scan)
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["renamed_attribute", "renamed_keyword"]

F = TypeVar("F", bound=Callable[..., Any])


def renamed_keyword(**renames: str) -> Callable[[F], F]:
    """Accept the old keyword ``old=`` of a function as ``new=``, warning once per call.

    Parameters
    ----------
    **renames
        ``old="new"`` keyword names. Giving both is a :class:`TypeError` naming both.
    """

    def wrap(func: F) -> F:
        @functools.wraps(func)
        def call(*args: Any, **kwargs: Any) -> Any:
            for old, new in renames.items():
                if old not in kwargs:
                    continue
                if new in kwargs:
                    raise TypeError(
                        f"{func.__name__}() got both {old}= and {new}=; {old}= is the old name "
                        f"of {new}=, pass only {new}="
                    )
                warnings.warn(
                    f"{func.__name__}({old}=...) is deprecated; use {new}=... "
                    "(a manifest entry is a scan)",
                    DeprecationWarning,
                    stacklevel=2,
                )
                kwargs[new] = kwargs.pop(old)
            return func(*args, **kwargs)

        return call  # type: ignore[return-value]

    return wrap


def renamed_attribute(owner: str, old: str, new: str) -> property:
    """A read-only property ``old`` that warns and returns attribute ``new`` (a method too).

    Parameters
    ----------
    owner : str
        The class name, for the message (``Manifest``).
    old, new : str
        The old attribute name and the one it now is.
    """

    def get(self: Any) -> Any:
        warnings.warn(
            f"{owner}.{old} is deprecated; use {owner}.{new} (a manifest entry is a scan)",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(self, new)

    return property(get, doc=f"Deprecated name of :attr:`{new}` (a manifest entry is a scan).")
