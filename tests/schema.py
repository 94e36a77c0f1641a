"""Checking a JSON value against the typed records that produced it."""

from __future__ import annotations

import types
import typing
from typing import Annotated, Any


def problems(value: Any, tp: Any, path: str = "$") -> list[str]:
    """Where ``value`` departs from the type ``tp`` (a record, ``dict``, ``list``, a union, a
    JSON scalar): missing or unknown keys of a record, and values of another type."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:
        return problems(value, args[0], path)
    if origin in (typing.Union, types.UnionType):
        if any(not problems(value, a, path) for a in args):
            return []
        return [f"{path}: {value!r} is none of {args}"]
    if typing.is_typeddict(tp):
        if not isinstance(value, dict):
            return [f"{path}: {value!r} is not a {tp.__name__}"]
        hints = typing.get_type_hints(tp, include_extras=True)
        found = [f"{path}: {tp.__name__} lacks {k!r}" for k in tp.__required_keys__ - set(value)]
        found += [f"{path}: {tp.__name__} has no {k!r}" for k in set(value) - set(hints)]
        for k in set(value) & set(hints):
            found += problems(value[k], hints[k], f"{path}.{k}")
        return found
    if origin is dict:
        if not isinstance(value, dict):
            return [f"{path}: {value!r} is not a map"]
        found = []
        for k, v in value.items():
            found += problems(k, args[0], f"{path} key {k!r}") + problems(v, args[1], f"{path}.{k}")
        return found
    if origin is list:
        if not isinstance(value, list):
            return [f"{path}: {value!r} is not a list"]
        return [p for i, v in enumerate(value) for p in problems(v, args[0], f"{path}[{i}]")]
    if type(value) is not tp:
        return [f"{path}: {value!r} is not {getattr(tp, '__name__', tp)}"]
    return []
