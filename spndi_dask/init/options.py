"""What ``spndi init`` is told (:class:`InitOptions`), its error, and its argument parsers."""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from spndi_dask.init.names import NAMES


class InitError(ValueError):
    """``spndi init`` cannot write a manifest; the message lists every problem with its fix."""


@dataclass(frozen=True)
class InitOptions:
    """What ``spndi init`` is told instead of guessing (each field is the flag of that name).

    ``None`` means: find it in the files. ``"none"`` for ``monitor``, ``xrf``, ``mask_dataset``
    and ``positions`` means: do not use one.
    """

    name: str | None = None
    results: str = "results"
    group: str | None = None
    exclude: tuple[str, ...] = ()
    split: bool = True
    sort: Literal["auto", "id", "angle"] = "auto"
    dataset: str | None = None
    monitor: str | None = None
    xrf: str | None = None
    mask_dataset: str | None = None
    positions: tuple[str, str] | Literal["none"] | None = None
    positions_units: Literal["um", "nm", "mm"] | None = None
    names: tuple[tuple[str, tuple[str, ...], bool], ...] = ()
    angle_path: str | None = None
    angles: tuple[float, float, int] | None = None
    scan_shape: tuple[int, int] | None = None
    step_um: tuple[float, float] | None = None
    scan_order: Literal["raster", "snake"] | None = None
    allow_incomplete: bool = False
    xrf_window_kev: tuple[float, float] | None = None
    xrf_calibration: tuple[float, float] | None = None
    xrf_energy: str | None = None
    energy_kev: float | None = None
    distance_m: float | None = None
    pixel_size_m: float | None = None
    beam_center: tuple[float, float] | None = None
    gamma_deg: float | None = None
    delta_deg: float | None = None
    rocking_axis: str | None = None
    saturation: float | None = None


# -- command-line value parsers (argparse ``type=``; they raise ArgumentTypeError) ----------------
def parse_angles(text: str) -> tuple[float, float, int]:
    """``"START:STOP:NUM"`` -> ``(start, stop, num)``, e.g. ``"-0.5:0.5:21"``."""
    parts = text.split(":")
    try:
        start, stop, num = float(parts[0]), float(parts[1]), int(parts[2])
        if len(parts) != 3 or num < 2 or not np.isfinite([start, stop]).all():
            raise ValueError
    except (ValueError, IndexError):
        raise argparse.ArgumentTypeError(
            f"{text!r}: give START:STOP:NUM with NUM >= 2, e.g. -0.5:0.5:21"
        ) from None
    return start, stop, num


def parse_window(text: str) -> tuple[float, float]:
    """``"LOW:HIGH"`` -> ``(low, high)`` (two numbers), e.g. ``"6.8:7.1"``."""
    try:
        low, high = (float(v) for v in text.split(":"))
        if not np.isfinite([low, high]).all():
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give two numbers A:B, e.g. 6.8:7.1") from None
    return low, high


def parse_pair(text: str, kind: type = float, *, positive: bool = False) -> tuple[Any, Any]:
    """``"A,B"`` -> ``(A, B)`` of ``kind``, e.g. ``"140,200"``; ``positive``: both > 0."""
    try:
        a, b = (kind(v) for v in text.split(","))
        if not np.isfinite([a, b]).all() or (positive and min(a, b) <= 0):
            raise ValueError
    except ValueError:
        example = "140,200" if kind is int else "0.05,0.05"
        sign = " > 0" if positive else ""
        raise argparse.ArgumentTypeError(
            f"{text!r}: give two {kind.__name__} values{sign} A,B, e.g. {example}"
        ) from None
    return a, b


def parse_shape(text: str) -> tuple[int, int]:
    """``"R,C"``: a scan shape, two positive integers."""
    return parse_pair(text, int, positive=True)


def parse_step(text: str) -> tuple[float, float]:
    """``"Y,X"``: a scan step in µm, two positive numbers."""
    return parse_pair(text, float, positive=True)


def parse_positive(text: str) -> float:
    """A positive finite number."""
    try:
        v = float(text)
        if not (np.isfinite(v) and v > 0):
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give a positive number") from None
    return v


def parse_positions(text: str) -> tuple[str, str] | Literal["none"]:
    """``"Y_PATH,X_PATH"`` (slow then fast axis) or ``"none"``."""
    if text.lower() == "none":
        return "none"
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 2 or not all(parts):
        raise argparse.ArgumentTypeError(
            f"{text!r}: give Y_PATH,X_PATH, e.g. /entry/measurement/samy,/entry/measurement/samx,"
            " or none"
        )
    return parts[0], parts[1]


def parse_names(text: str) -> tuple[str, tuple[str, ...], bool]:
    """``"KEY=a,b"`` (replace the list) or ``"KEY+=a,b"`` (extend it): ``(key, names, extend)``."""
    m = re.fullmatch(r"\s*([a-z_]+)\s*(\+?=)\s*(.*)", text)
    keys = [*NAMES, "positions"]
    if not m or m.group(1) not in keys:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give KEY=a,b or KEY+=a,b with KEY one of {', '.join(keys)}"
        )
    values = tuple(v.strip().lower() for v in m.group(3).split(",") if v.strip())
    if m.group(1) == "positions" and not all(v.count(":") == 1 for v in values):
        raise argparse.ArgumentTypeError(
            f"{text!r}: positions names are Y:X pairs, e.g. positions=samy:samx"
        )
    return m.group(1), values, m.group(2) == "+="
