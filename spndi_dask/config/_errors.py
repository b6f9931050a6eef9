"""pydantic validation errors as manifest messages: the key, the value, what is expected.

Every function takes ``models``, the manifest's tables by name: ``""`` is the whole manifest,
``"particles"``, ``"geometry"``, ``"ingest"``, ... the tables, ``"AngleRange"`` the
``{start, stop, num}`` form of ``angles_deg``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ValidationError

__all__ = ["format_errors", "hint"]

Models = Mapping[str, type[BaseModel]]


def loc_text(loc: tuple[Any, ...], data: dict[str, Any] | None) -> str:
    """``particles[0] ('p1').scan_shape`` for an error location (pydantic's union tags left out)."""
    out = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
            if loc[:i] == ("particles",) and data is not None:
                try:
                    out += f" ('{data['particles'][part]['name']}')"
                except (KeyError, IndexError, TypeError):
                    pass
        elif part in ("list[float]", "AngleRange", "str", "list[str]", "function-after"):
            continue
        elif part.startswith(("list[", "literal[", "tuple[")):
            continue
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def hint(loc: tuple[Any, ...], models: Models) -> str:
    """`` (expected: <the field's description>)``, or ``""`` where the field has none."""
    names = [p for p in loc if isinstance(p, str)]
    if not names or isinstance(loc[-1], int):
        return ""
    field = names[-1]
    table = names[0] if len(names) > 1 else ""
    model = models.get(table, models[""])
    info = model.model_fields.get(field) or models[""].model_fields.get(field)
    if info is None and table == "particles":
        info = models["geometry"].model_fields.get(field)
    return f" (expected: {info.description})" if info is not None and info.description else ""


def format_errors(
    exc: ValidationError, models: Models, *, data: dict[str, Any] | None = None, prefix: str = ""
) -> list[str]:
    """One line per problem of ``exc`` (``data``: the validated dict, to name particles)."""
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        where = loc_text(loc, data)
        if prefix:
            where = f"{prefix}.{where}" if where != "(top level)" else prefix
        msg = err["msg"].removeprefix("Value error, ")
        value = err.get("input")
        tags = [p for p in loc if isinstance(p, str)]
        if (any(t.startswith("list[") for t in tags) and isinstance(value, dict)) or (
            "AngleRange" in tags and isinstance(value, list)
        ):
            continue  # the other member of the angles_deg union applies
        if not loc or (loc == ("geometry",) and msg.startswith("geometry")):
            lines.extend(msg.split("\n"))
        elif err["type"] == "extra_forbidden":
            parent = loc[:-1]
            model = model_at(parent, models)
            allowed = ", ".join(model.model_fields) if model else ""
            lines.append(
                f"unknown key '{loc[-1]}' in {loc_text(parent, data)}; "
                f"allowed keys: {allowed} (check the spelling)"
            )
        elif err["type"] == "missing":
            lines.append(f"{where} is required{hint(loc, models)}")
        else:
            shown = "" if isinstance(value, dict) else f" = {value!r}"
            lines.append(f"{where}{shown}: {msg}{hint(loc, models)}")
    return lines


def model_at(loc: tuple[Any, ...], models: Models) -> type[BaseModel] | None:
    """The table an error location points into (``None`` where unknown)."""
    names = [p for p in loc if isinstance(p, str)]
    if not names:
        return models[""]
    if names[-1] == "angles_deg":
        return models["AngleRange"]
    return models.get(names[-1])
