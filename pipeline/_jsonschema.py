"""A small JSON Schema (draft 2020-12 subset) checker with JSON paths.

It understands exactly the keywords ``store.schema.json`` uses. The store reader
calls it on the small parts of a document, and on any embryo that the fast,
columnar checks found malformed, so every structural problem is reported with
its path. It never raises on bad input: it collects ``(path, message)`` pairs.
"""

from __future__ import annotations

import functools
import math
import re
from importlib import resources
from typing import Any

import orjson

__all__ = ["check", "json_path", "store_schema"]

_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,),
    "array": (list,),
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "null": (type(None),),
}


@functools.cache
def store_schema() -> dict[str, Any]:
    """Return the packaged copy of ``store.schema.json``."""
    text = resources.files("pipeline").joinpath("data/store.schema.json").read_bytes()
    return orjson.loads(text)


@functools.cache
def _pattern(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def json_path(*parts: str | int) -> str:
    """Format a JSON path, e.g. ``$.embryos["20240411_A01_e01"].death_frame``.

    Parameters
    ----------
    *parts : str or int
        Keys (identifiers are written with a dot, others quoted) and list indices.

    Returns
    -------
    str
        The path.

    Examples
    --------
    >>> json_path("embryos", "20240411_A01_e01", "flags", 0, "value")
    '$.embryos["20240411_A01_e01"].flags[0].value'
    """
    out = ["$"]
    for part in parts:
        if isinstance(part, int):
            out.append(f"[{part}]")
        elif part.isidentifier() and not part[:1].isdigit():
            out.append(f".{part}")
        else:
            out.append(f'["{part}"]')
    return "".join(out)


def _type_name(value: Any) -> str:
    for name, types in _TYPES.items():
        if isinstance(value, types) and not (name in ("integer", "number") and isinstance(value, bool)):
            return name
    return type(value).__name__


def _is_type(value: Any, name: str) -> bool:
    if isinstance(value, bool) and name in ("integer", "number"):
        return False
    return isinstance(value, _TYPES[name])


def check(
    value: Any,
    schema: dict[str, Any],
    path: tuple[str | int, ...],
    out: list[tuple[str, str]],
    root: dict[str, Any] | None = None,
) -> None:
    """Check *value* against *schema*, appending ``(json_path, message)`` to *out*.

    Parameters
    ----------
    value : object
        The JSON value.
    schema : dict
        A (sub)schema; ``$ref`` is resolved against *root*.
    path : tuple of str or int
        Where *value* sits in the document.
    out : list of (str, str)
        Problems found are appended here.
    root : dict, optional
        The whole schema, default the store schema.
    """
    root = root or store_schema()
    while "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        schema = root["$defs"][name]
    where = json_path(*path)
    if "oneOf" in schema:
        passing = []
        for option in schema["oneOf"]:
            trial: list[tuple[str, str]] = []
            check(value, option, path, trial, root)
            if not trial:
                passing.append(option)
        if len(passing) != 1:
            expected = " or ".join(_describe(o, root) for o in schema["oneOf"])
            if len(passing) == 0 and isinstance(value, dict):
                # Name the precise problems of the object alternative.
                for option in schema["oneOf"]:
                    trial = []
                    check(value, option, path, trial, root)
                    if _resolve(option, root).get("type") == "object":
                        out.extend(trial)
                        return
            out.append((where, f"expected {expected}, found {_short(value)}"))
        return
    expected_type = schema.get("type")
    if expected_type is not None:
        names = expected_type if isinstance(expected_type, list) else [expected_type]
        if not any(_is_type(value, n) for n in names):
            out.append((where, f"expected {' or '.join(names)}, found {_type_name(value)} {_short(value)}"))
            return
    if "const" in schema and value != schema["const"]:
        out.append((where, f"expected {schema['const']!r}, found {_short(value)}"))
    if "enum" in schema and value in schema["enum"]:
        pass
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0):
            out.append((where, "expected a non-empty string"))
        if "pattern" in schema and not _pattern(schema["pattern"]).search(value):
            out.append((where, f"{value!r} does not have the expected form ({_describe(schema, root)})"))
    if isinstance(value, int | float) and not isinstance(value, bool):
        if ("minimum" in schema or "maximum" in schema) and math.isnan(value):
            # NaN passes both comparisons, and JSON would turn it into null.
            out.append((where, "expected a number, found NaN"))
        if "minimum" in schema and value < schema["minimum"]:
            out.append((where, f"expected a number >= {schema['minimum']}, found {value!r}"))
        if "maximum" in schema and value > schema["maximum"]:
            out.append((where, f"expected a number <= {schema['maximum']}, found {value!r}"))
    if isinstance(value, list):
        if schema.get("uniqueItems") and len(set(map(repr, value))) != len(value):
            out.append((where, "expected unique items, found duplicates"))
        if "items" in schema:
            for i, item in enumerate(value):
                check(item, schema["items"], (*path, i), out, root)
    if isinstance(value, dict):
        _check_object(value, schema, path, out, root)


def _check_object(
    value: dict[str, Any],
    schema: dict[str, Any],
    path: tuple[str | int, ...],
    out: list[tuple[str, str]],
    root: dict[str, Any],
) -> None:
    where = json_path(*path)
    props = schema.get("properties", {})
    missing = [k for k in schema.get("required", []) if k not in value]
    if missing:
        out.append((where, f"missing required key(s) {', '.join(map(repr, missing))}"))
    names = schema.get("propertyNames")
    extra = schema.get("additionalProperties", True)
    for key, item in value.items():
        if names is not None:
            key_problems: list[tuple[str, str]] = []
            check(key, names, (*path, key), key_problems, root)
            forbidden = _resolve(names, root).get("not", {}).get("enum", [])
            if key in forbidden:
                key_problems.append((json_path(*path, key), f"key {key!r} is reserved (collides with a column or field name)"))
            if key_problems:
                out.extend((p, f"bad key: {m}") for p, m in key_problems)
                continue
        if key in props:
            check(item, props[key], (*path, key), out, root)
        elif extra is False:
            allowed = ", ".join(sorted(props)) or "none"
            out.append((json_path(*path, key), f"unexpected key {key!r}; allowed keys: {allowed}"))
        elif isinstance(extra, dict):
            check(item, extra, (*path, key), out, root)


def _resolve(schema: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = root["$defs"][schema["$ref"].rsplit("/", 1)[-1]]
    return schema


def _describe(schema: dict[str, Any], root: dict[str, Any]) -> str:
    if "$ref" in schema:
        return schema["$ref"].rsplit("/", 1)[-1].replace("_", " ")
    if "pattern" in schema:
        return f"pattern {schema['pattern']}"
    return str(schema.get("type", "value"))


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
