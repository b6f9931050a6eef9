"""One display unit per quantity for every human-facing output (CSV, report, figures, explorer).

``results.zarr`` is the machine contract and keeps SI/CF units (:data:`~spndi_dask.io.
results_store.MAP_VARIABLES`: tilts in ``rad``, d-spacing in ``Å``, strain ``"1"``). Everything
people read converts with this registry, and only with it:

==============================  =========  ==========  ===========================
quantity                        stored     shown       CSV column suffix
==============================  =========  ==========  ===========================
``tilt_x``, ``tilt_y``          rad        mrad (×1e3) ``_mrad``
``d_spacing``                   Å          Å           ``_A``
``width_x/y/z`` (peak σ in q)   1/Å        1/Å         ``_per_A``
``intensity``                   counts     counts      ``_counts``
``strain``                      1          (a number)  none
==============================  =========  ==========  ===========================

Derived columns (``_mean``, ``_std``, ``_sigma``, ``_sem``, ``_sem_counting``, percentiles,
differences and their ``_se``) carry their quantity's unit; p-values (``_p``) and correlations
are plain numbers. Strain is a plain dimensionless number everywhere; a figure's colour bar or
the explorer's may show the plotting library's one scale factor (e.g. ``1e-4``) on its axis.

Examples
--------
>>> column("tilt_x", "mean"), column("strain", "std"), column("d_spacing", "p5")
('tilt_x_mean_mrad', 'strain_std', 'd_spacing_p5_A')
>>> label("tilt_y"), label("strain"), label("width_x")
('tilt_y (mrad)', 'strain', 'width_x (1/Å)')
>>> shown("tilt_x", 0.0025)
2.5
>>> shown_row({"particle": "p1", "tilt_x_mean": 0.001, "strain_mean": 2e-4})
{'particle': 'p1', 'tilt_x_mean_mrad': 1.0, 'strain_mean': 0.0002}
>>> list(shown_row({"diff_tilt_y_mean_se": 1e-3, "diff_tilt_y_mean_p": 0.03}, prefixes=["diff_"]))
['diff_tilt_y_mean_se_mrad', 'diff_tilt_y_mean_p']
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "QUANTITIES",
    "Unit",
    "column",
    "label",
    "shown",
    "shown_row",
    "stored_unit_table",
    "unit",
]


@dataclass(frozen=True)
class Unit:
    """How one quantity is shown.

    Attributes
    ----------
    stored : str
        The CF unit in ``results.zarr`` (``"1"`` dimensionless).
    shown : str
        The unit people read (empty for a plain number).
    factor : float
        ``shown value = factor × stored value``.
    suffix : str
        The CSV column suffix naming :attr:`shown` in ASCII (empty: no suffix).
    """

    stored: str
    shown: str
    factor: float
    suffix: str


_MRAD = Unit("rad", "mrad", 1e3, "mrad")
_PER_A = Unit("1/Å", "1/Å", 1.0, "per_A")
#: Quantity -> :class:`Unit`; the quantity's ``_sigma``/``_std``/... derive from it.
QUANTITIES: dict[str, Unit] = {
    "d_spacing": Unit("Å", "Å", 1.0, "A"),
    "strain": Unit("1", "", 1.0, ""),
    "tilt_x": _MRAD,
    "tilt_y": _MRAD,
    "width_x": _PER_A,
    "width_y": _PER_A,
    "width_z": _PER_A,
    "intensity": Unit("counts", "counts", 1.0, "counts"),
}
#: Derived-quantity suffixes of a map name that keep the map's unit (``tilt_x_sigma``).
_DERIVED = ("_sigma", "_std", "_sem")


def _base(name: str) -> str:
    for s in _DERIVED:
        if name.endswith(s) and name[: -len(s)] in QUANTITIES:
            return name[: -len(s)]
    return name


def unit(name: str) -> Unit | None:
    """The :class:`Unit` of a quantity or a derived one (``tilt_x_sigma``); None if unknown."""
    return QUANTITIES.get(_base(name))


def shown(name: str, value: Any) -> Any:
    """``value`` (stored unit; a number or an array) in quantity ``name``'s shown unit."""
    u = unit(name)
    return value if u is None or u.factor == 1.0 else value * u.factor


def label(name: str) -> str:
    """Axis / colour-bar / table label: ``"tilt_x (mrad)"``, ``"strain"``; unknown: ``name``."""
    u = unit(name)
    return f"{name} ({u.shown})" if u is not None and u.shown else name


def column(quantity: str, stat: str, prefix: str = "") -> str:
    """The CSV column of ``stat`` of ``quantity``: ``tilt_x_mean_mrad``, ``strain_std``.

    ``prefix`` as in regions.csv (``domain_``, ``diff_domain_minus_boundary_``).
    """
    u = QUANTITIES[quantity]
    name = f"{prefix}{quantity}_{stat}"
    return f"{name}_{u.suffix}" if u.suffix else name


def shown_row(row: Mapping[str, Any], *, prefixes: Iterable[str] = ("",)) -> dict[str, Any]:
    """A table row with stored-unit statistics renamed and converted to the shown units.

    Keys ``<prefix><quantity>_<stat>`` (``<quantity>`` in :data:`QUANTITIES`) become
    :func:`column` with the value × the factor, except p-values (``..._p``); other keys pass
    through unchanged, in order.
    """
    prefixes = tuple(prefixes)
    out: dict[str, Any] = {}
    for key, value in row.items():
        match = [
            (p, q)
            for p in prefixes
            for q in QUANTITIES
            if key.startswith(f"{p}{q}_") and not key.endswith("_p")
        ]
        if match:
            p, q = match[0]
            out[column(q, key[len(p) + len(q) + 1 :], p)] = shown(q, value)
        else:
            out[key] = value
    return out


def stored_unit_table(path: str | Path) -> bool:
    """Whether the CSV ``path`` has the old column names in stored units (``tilt_x_mean`` in rad).

    Tables written before one unit per quantity; the stages rewrite them instead of reading
    them as up to date.

    Examples
    --------
    >>> import tempfile
    >>> p = Path(tempfile.mkdtemp()) / "t.csv"
    >>> _ = p.write_text("particle,domain_tilt_x_mean\\np1,0.001\\n")
    >>> stored_unit_table(p), stored_unit_table(p.with_name("missing.csv"))
    (True, False)
    """
    try:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
    except FileNotFoundError:
        return False
    return any(c.endswith(f"{q}_mean") for c in header for q in ("tilt_x", "tilt_y", "d_spacing"))
