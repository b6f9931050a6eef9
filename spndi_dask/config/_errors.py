"""pydantic validation errors as manifest messages: the key, the value, what is expected.

Every function takes ``models``, the manifest's tables by name: ``""`` is the whole manifest,
``"scans"``, ``"geometry"``, ``"ingest"``, ... the tables, ``"AngleRange"`` the
``{start, stop, num}`` form of ``angles_deg``.

pydantic's wording ("Input should be greater than 0") and its union tags (``constrained-int``,
``literal['auto']``) never reach the user: :func:`plain` says what a value must be in plain
words, and the errors of the members of a union (``k = 'auto'`` or a positive integer) are
merged into one line.

Examples
--------
>>> from pydantic import BaseModel, Field, PositiveInt
>>> class T(BaseModel):
...     k: int = Field(ge=2)
...     n: PositiveInt = 1
>>> try:
...     T(k=1, n=0)
... except ValueError as exc:
...     print(format_errors(exc, {"": T}))
['k = 1: must be ≥ 2', 'n = 0: must be ≥ 1']
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

__all__ = ["format_errors", "hint", "plain"]

Models = Mapping[str, type[BaseModel]]

#: Union member tags pydantic puts into an error's location that are not keys.
_TYPE_TAGS = {"str", "int", "float", "bool", "none", "dict", "list", "tuple"}


def _is_tag(part: Any) -> bool:
    """Whether a location part is a union member's tag (``constrained-int``, ``AngleRange``)."""
    return isinstance(part, str) and (
        part in _TYPE_TAGS or any(c in part for c in "[]-") or part[:1].isupper()
    )


def clean_loc(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """An error location without union tags: the keys and list indices only."""
    return tuple(p for p in loc if not _is_tag(p))


def loc_text(loc: tuple[Any, ...], data: dict[str, Any] | None) -> str:
    """``scans[0] ('p1').scan_shape`` for an error location (pydantic's union tags left out)."""
    loc = clean_loc(loc)
    out = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
            if loc[:i] == ("scans",) and data is not None:
                try:
                    out += f" ('{data['scans'][part]['name']}')"
                except (KeyError, IndexError, TypeError):
                    pass
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def field_info(loc: tuple[Any, ...], models: Models) -> FieldInfo | None:
    """The field an error location points at (its last key), or None."""
    names = [p for p in clean_loc(loc) if isinstance(p, str)]
    if not names:
        return None
    field = names[-1]
    table = names[0] if len(names) > 1 else ""
    model = models.get(table, models[""])
    info = model.model_fields.get(field) or models[""].model_fields.get(field)
    if info is None and table == "scans" and "geometry" in models:
        info = models["geometry"].model_fields.get(field)
    return info


def hint(loc: tuple[Any, ...], models: Models) -> str:
    """`` (expected: <the field's description>)``, or ``""`` where the field has none."""
    loc = clean_loc(loc)
    if not loc or isinstance(loc[-1], int):
        return ""
    info = field_info(loc, models)
    return f" (expected: {info.description})" if info is not None and info.description else ""


def _leaf_types(annotation: Any) -> set[Any]:
    """The plain types a field's annotation is made of (through unions, tuples, Annotated)."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _leaf_types(get_args(annotation)[0])
    if origin is Literal:
        return set()
    if origin in (Union, types.UnionType, tuple, list):
        return set().union(*(_leaf_types(a) for a in get_args(annotation) if a is not Ellipsis))
    return {annotation}


def _is_integer(loc: tuple[Any, ...], models: Models) -> bool:
    """Whether the value at ``loc`` is an integer (``> 0`` then reads ``≥ 1``)."""
    tags = [p for p in loc if _is_tag(p)]
    if any(t in ("int", "constrained-int") for t in tags):
        return True
    if any(t in ("float", "constrained-float") for t in tags):
        return False
    info = field_info(loc, models)
    leaves = _leaf_types(info.annotation) if info is not None else set()
    return int in leaves and float not in leaves


def _tuple_length(loc: tuple[Any, ...], models: Models) -> int | None:
    """The fixed number of values of a tuple field (``scan_shape``: 2), or None."""
    info = field_info(loc, models)
    members = [info.annotation] if info is not None else []
    while members:
        t = members.pop()
        origin = get_origin(t)
        if origin is tuple and Ellipsis not in get_args(t):
            return len(get_args(t))
        if origin in (Union, types.UnionType, Annotated):
            members.extend(get_args(t))
    return None


def _number(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def plain(err: Mapping[str, Any], *, integer: bool = False) -> str:
    """What a value must be, in plain words, for one pydantic error.

    ``integer``: the field takes whole numbers (``greater_than 0`` reads ``must be ≥ 1``).

    Examples
    --------
    >>> plain({"type": "greater_than", "ctx": {"gt": 0}, "msg": "..."}, integer=True)
    'must be ≥ 1'
    >>> plain({"type": "less_than", "ctx": {"lt": 0.5}, "msg": "..."})
    'must be < 0.5'
    """
    kind, ctx = err["type"], err.get("ctx") or {}
    if kind == "greater_than":
        gt = ctx["gt"]
        return (
            f"must be ≥ {gt + 1}" if integer and isinstance(gt, int) else f"must be > {_number(gt)}"
        )
    if kind == "greater_than_equal":
        return f"must be ≥ {_number(ctx['ge'])}"
    if kind == "less_than":
        lt = ctx["lt"]
        return (
            f"must be ≤ {lt - 1}" if integer and isinstance(lt, int) else f"must be < {_number(lt)}"
        )
    if kind == "less_than_equal":
        return f"must be ≤ {_number(ctx['le'])}"
    if kind == "literal_error":
        return f"must be {ctx['expected']}"
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return "must be a whole number"
    if kind in ("float_type", "float_parsing"):
        return "must be a number"
    if kind == "finite_number":
        return "must be a finite number (not nan or inf)"
    if kind in ("bool_type", "bool_parsing"):
        return "must be true or false"
    if kind == "string_type":
        return "must be text in quotes"
    if kind in ("tuple_type", "list_type"):
        return "must be a list in brackets, e.g. [1, 2]"
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return "must be a table"
    if kind == "too_short":
        return f"needs at least {ctx['min_length']} value(s), got {ctx['actual_length']}"
    if kind == "too_long":
        return f"takes at most {ctx['max_length']} value(s), got {ctx['actual_length']}"
    msg = str(err["msg"]).removeprefix("Value error, ")
    return "must be " + msg.removeprefix("Input should be ") if msg.startswith("Input") else msg


def _merged(phrases: list[str]) -> str:
    """``must be ≥ 1 or 'auto'`` from the phrases of a union's members."""
    if all(p.startswith("must be ") for p in phrases):
        return "must be " + " or ".join(p.removeprefix("must be ") for p in phrases)
    return "; or ".join(phrases)


def _is_table_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def format_errors(
    exc: ValidationError, models: Models, *, data: dict[str, Any] | None = None, prefix: str = ""
) -> list[str]:
    """One line per problem of ``exc`` (``data``: the validated dict, to name scans)."""
    errors = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        value = err.get("input")
        tags = [p for p in loc if isinstance(p, str)]
        if (any(t.startswith("list[") for t in tags) and isinstance(value, dict)) or (
            "AngleRange" in tags and isinstance(value, list)
        ):
            continue  # the other member of the angles_deg union applies
        errors.append(err)
    # a union member's literal ('auto') gives way to the other member's error on an item inside
    deeper = {clean_loc(tuple(e["loc"]))[:-1] for e in errors if len(clean_loc(tuple(e["loc"])))}
    errors = [
        e
        for e in errors
        if not (e["type"] == "literal_error" and clean_loc(tuple(e["loc"])) in deeper)
    ]
    # the errors of a union's members (same key) become one line, the literal alternative last
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for err in errors:
        groups.setdefault(clean_loc(tuple(err["loc"])), []).append(err)

    def wrap(where: str) -> str:
        if not prefix:
            return where
        return f"{prefix}.{where}" if where != "(top level)" else prefix

    lines = []
    for loc, group in groups.items():
        err = group[0]
        where = wrap(loc_text(loc, data))
        msg = str(err["msg"]).removeprefix("Value error, ")
        value = err.get("input")
        if not loc or (loc == ("geometry",) and msg.startswith("geometry")):
            lines.extend(msg.split("\n"))
        elif err["type"] == "value_error" and _is_table_array(value):
            lines.extend(msg.split("\n"))  # a check across entries names the entries itself
        elif err["type"] == "extra_forbidden":
            parent = loc[:-1]
            model = model_at(parent, models)
            allowed = ", ".join(model.model_fields) if model else ""
            lines.append(
                f"unknown key '{loc[-1]}' in {loc_text(parent, data)}; "
                f"allowed keys: {allowed} (check the spelling)"
            )
        elif err["type"] == "missing" and isinstance(loc[-1], int):  # a tuple too short
            parent = loc[:-1]
            n = _tuple_length(parent, models) or loc[-1] + 1
            got = f", got {len(value)}" if isinstance(value, (list, tuple)) else ""
            where = wrap(loc_text(parent, data))
            lines.append(f"{where} needs {n} values{got}{hint(parent, models)}")
        elif err["type"] == "missing":
            lines.append(f"{where} is required{hint(loc, models)}")
        else:
            group = sorted(group, key=lambda e: e["type"] == "literal_error")
            integer = _is_integer(tuple(err["loc"]), models)
            phrase = _merged(
                [plain(e, integer=integer or _is_integer(tuple(e["loc"]), models)) for e in group]
            )
            shown = "" if isinstance(value, dict) or _is_table_array(value) else f" = {value!r}"
            lines.append(f"{where}{shown}: {phrase}{hint(loc, models)}")
    return list(dict.fromkeys(lines))


def model_at(loc: tuple[Any, ...], models: Models) -> type[BaseModel] | None:
    """The table an error location points into (``None`` where unknown)."""
    names = [p for p in clean_loc(loc) if isinstance(p, str)]
    if not names:
        return models[""]
    if names[-1] == "angles_deg":
        return models["AngleRange"]
    return models.get(names[-1])
