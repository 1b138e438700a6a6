"""Dataclasses from untrusted JSON: unknown, missing and mistyped fields are refused by name.

`from_json(BankEntry, obj, where)` is `BankEntry(**obj)` whose failures are ValueErrors such as
`bank.json: adapters[3]: missing field 'r'` instead of a TypeError about `__init__`.
The types understood are those of the bank's dataclasses: int, float (finite), bool, str,
dict, list[X] and X | None.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing


def from_json(cls, obj, where: str):
    """`cls(**obj)` for a dataclass, refusing unknown, missing and mistyped fields by name."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected an object, got {json_type(obj)}")
    fields = dataclasses.fields(cls)
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(obj) - {f.name for f in fields})
    if unknown:
        raise ValueError(f"{where}: unknown field {unknown[0]!r}; expected {', '.join(f.name for f in fields)}")
    for f in fields:
        if f.name not in obj:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ValueError(f"{where}: missing field {f.name!r}")
        elif not matches(obj[f.name], hints[f.name]):
            raise ValueError(f"{where}: {f.name} must be {describe(hints[f.name])}; got {short(obj[f.name])}")
    return cls(**obj)


def matches(value, hint) -> bool:
    """Whether a JSON value is of the annotated type (booleans are not integers)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union or origin is types.UnionType:
        return any(matches(value, a) for a in args)
    if hint is type(None):
        return value is None
    if origin is list:
        return isinstance(value, list) and all(matches(v, args[0]) for v in value)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, origin or hint)


_DESCRIPTIONS = {int: "an integer", float: "a finite number", bool: "true or false", str: "a string",
                 dict: "an object", list: "a list", type(None): "null"}


def describe(hint) -> str:
    """`list[int] | None` -> "a list of integers or null"."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union or origin is types.UnionType:
        return " or ".join(describe(a) for a in args)
    if origin is list:
        return f"a list of {describe(args[0]).removeprefix('an ').removeprefix('a ')}s"
    return _DESCRIPTIONS.get(hint, getattr(hint, "__name__", str(hint)))


def short(value) -> str:
    """The value as JSON, cut to 60 characters for an error message."""
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def json_type(value) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return names.get(type(value), "null")

