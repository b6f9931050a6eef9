"""A minimal TOML writer for manifests (the standard library reads TOML but does not write it).

Examples
--------
>>> print(dump_toml({"name": "bt", "geometry": {"energy_kev": 9.0},
...                  "scans": [{"name": "p1", "scan_shape": [4, 5]}]}), end="")
name = "bt"
<BLANKLINE>
[geometry]
energy_kev = 9.0
<BLANKLINE>
[[scans]]
name = "p1"
scan_shape = [4, 5]
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["dump_toml"]


def toml_value(v: Any) -> str:
    """One TOML value: a scalar, an array or an inline table."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def dump_toml(d: dict[str, Any]) -> str:
    """Minimal TOML writer for manifests (scalars, arrays, tables, arrays of tables)."""
    lines: list[str] = []
    tables = {k: v for k, v in d.items() if isinstance(v, dict)}
    arrays = {k: v for k, v in d.items() if isinstance(v, list) and v and isinstance(v[0], dict)}
    for k, v in d.items():
        if k in tables or k in arrays or v is None:
            continue
        lines.append(f"{k} = {toml_value(v)}")
    for k, v in tables.items():
        lines += ["", f"[{k}]"]
        lines += [f"{kk} = {toml_value(vv)}" for kk, vv in v.items() if vv is not None]
    for k, items in arrays.items():
        for item in items:
            lines += ["", f"[[{k}]]"]
            sub = {kk: vv for kk, vv in item.items() if isinstance(vv, dict) and kk != "angles_deg"}
            for kk, vv in item.items():
                if vv is None or kk in sub:
                    continue
                lines.append(f"{kk} = {toml_value(vv)}")
            for kk, vv in sub.items():
                if vv:
                    lines += [f"[{k}.{kk}]"] + [f"{a} = {toml_value(b)}" for a, b in vv.items()]
    return "\n".join(lines) + "\n"
