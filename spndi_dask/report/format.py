"""Plain data for the report's templates: cell text, tables, key/value lists, badges, links.

Values become text here (numbers to 4 significant digits, lists joined, missing as "—"); the
templates escape that text and lay it out (``macros.html``: ``table``, ``kv``, ``badge``...).
Nothing here is markup.

Examples
--------
>>> t = table([{"K": 2, "inertia": 12.3456}], row_class=lambda r: "chosen")
>>> [h["label"] for h in t["head"]], [c["value"] for c in t["rows"][0]["cells"]]
(['K', 'inertia'], ['2', '12.35'])
>>> t["rows"][0]["cls"]
'chosen'
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Badge",
    "Link",
    "anchor",
    "as_json",
    "code_spans",
    "fmt",
    "kv",
    "number",
    "table",
]

_CODE = re.compile(r"`([^`]+)`")


@dataclass(frozen=True)
class Badge:
    """A stage state shown as a coloured badge (``macros.badge``)."""

    status: str


@dataclass(frozen=True)
class Link:
    """A link to an anchor of the report (``macros.cell``)."""

    anchor: str
    label: str


def anchor(prefix: str, name: str) -> str:
    """The id of a section or heading of one scan: ``particle-p1``, ``clusters-p1``."""
    return f"{prefix}-{name}"


def number(value: Any) -> float | None:
    """``value`` as a float when it is a number or a numeric string, else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value.strip():
        try:
            return float(value)
        except ValueError:
            return None
    return None


def fmt(value: Any, *, numeric_strings: bool = False) -> str:
    """A cell's text: floats to 4 significant digits, lists joined, missing values as "—".

    With ``numeric_strings``, strings that read as floats (CSV cells) are formatted as floats.

    Examples
    --------
    >>> fmt(0.000123456), fmt("0.000123456", numeric_strings=True), fmt("3.10")
    ('0.0001235', '0.0001235', '3.10')
    >>> fmt(float("nan")), fmt(None), fmt(["a<b", 2]), fmt(True)
    ('—', '—', 'a<b, 2', 'yes')
    """
    if value is None or value == "":
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, (list, tuple)):
        return ", ".join(fmt(v) for v in value) or "—"
    if isinstance(value, dict):
        return json.dumps(value, default=str)
    if isinstance(value, str) and (not numeric_strings or value.lstrip("-").isdigit()):
        return value
    x = number(value)
    if x is None:
        return str(value)
    if not math.isfinite(x):
        return "—"
    return f"{x:.4g}"


def table(
    rows: Sequence[dict[str, Any]],
    columns: Sequence[str] | None = None,
    *,
    headers: dict[str, str] | None = None,
    row_class: Callable[[dict[str, Any]], str] | None = None,
    text: Iterable[str] = (),
) -> dict[str, Any]:
    """A table of ``rows`` (dicts) for ``macros.table``.

    ``columns`` default to every key, in first-seen order; ``text`` columns are left-aligned
    and their numeric strings kept as written; :class:`Badge` and :class:`Link` cells are
    passed through. Returns ``{"head": [{label, text}], "rows": [{cls, cells: [{value,
    text}]}]}``.
    """
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r))
    headers = headers or {}
    text = set(text)
    return {
        "head": [{"label": headers.get(c, c), "text": c in text} for c in columns],
        "rows": [
            {
                "cls": row_class(r) if row_class else "",
                "cells": [
                    {"value": _cell(r.get(c), c in text), "text": c in text} for c in columns
                ],
            }
            for r in rows
        ],
    }


def _cell(value: Any, text: bool) -> str | Badge | Link:
    if isinstance(value, (Badge, Link)):
        return value
    return fmt(value, numeric_strings=not text)


def kv(items: dict[str, Any]) -> list[tuple[str, str]]:
    """``(key, text)`` pairs for ``macros.kv``, a two-column key/value table."""
    return [(str(k), fmt(v)) for k, v in items.items()]


def code_spans(text: str) -> list[tuple[bool, str]]:
    """``text`` cut into ``(is_code, part)``: parts in `backquotes` are shown as code.

    Examples
    --------
    >>> code_spans("run `spndi stats` first")
    [(False, 'run '), (True, 'spndi stats'), (False, ' first')]
    """
    parts = _CODE.split(str(text))
    return [(i % 2 == 1, part) for i, part in enumerate(parts) if part]


def _compact(obj: Any, *, items: int = 8, chars: int = 400) -> Any:
    """``obj`` with long lists and strings shortened (for showing stage attrs)."""
    if isinstance(obj, dict):
        return {k: _compact(v, items=items, chars=chars) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        head = [_compact(v, items=items, chars=chars) for v in obj[:items]]
        return head + ([f"… {len(obj) - items} more"] if len(obj) > items else [])
    if isinstance(obj, str) and len(obj) > chars:
        return obj[:chars] + f"… ({len(obj)} characters)"
    return obj


def as_json(obj: Any) -> str:
    """Indented JSON of ``obj`` with long lists shortened.

    Examples
    --------
    >>> print(as_json({"a": list(range(10))}).replace("\\n", ""))
    { "a": [  0,  1,  2,  3,  4,  5,  6,  7,  "… 2 more" ]}
    """
    return json.dumps(_compact(obj), indent=1, default=str, ensure_ascii=False)
