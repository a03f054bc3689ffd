"""The spec's schema: typed conversion of TOML tables into data classes, and dotted keys.

The spec's sections are plain frozen data classes (release/spec.py); their annotations are the
schema, written once. ``convert`` checks a parsed TOML value against them and reports every
problem as one ``key: message`` line, so a maintainer fixes a broken spec in one pass;
``dotted`` reads a value back by the same dotted key the messages name. This module knows no
section of the spec and imports nothing of the package, so the spec (and anything else) may use it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Set
from typing import Any, Literal

__all__ = ["convert", "describe", "dotted"]


def describe(tp: Any) -> str:
    """What a value of type ``tp`` looks like in TOML, for a problem message ("a list of strings")."""
    origin = typing.get_origin(tp)
    if tp is str:
        return "a string"
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {describe(typing.get_args(tp)[0]).removeprefix('a ').removeprefix('an ')}s"
    if origin is dict:
        return f"a table of {describe(typing.get_args(tp)[1])}"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in typing.get_args(tp) if a is not type(None))
    if dataclasses.is_dataclass(tp):
        return f"a table [{tp.__name__.lower()}]"
    return str(tp)


def convert(tp: Any, value: Any, key: str, problems: list[str], skip: Set[str] = frozenset()) -> Any:
    """Check ``value`` against type ``tp``; append problems (``key: message``) and return the
    converted value (or None where it was wrong). ``skip`` names fields of a data class ``tp``
    that are not read from the file."""
    origin = typing.get_origin(tp)
    where = key or "(top level)"

    def bad() -> None:
        problems.append(f"{where}: expected {describe(tp)}, got {value!r}")

    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        if len(args) == 1:
            return convert(args[0], value, key, problems)
        for arg in args:
            trial: list[str] = []
            out = convert(arg, value, key, trial)
            if not trial:
                return out
        bad()
        return None
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            bad()
            return None
        hints = typing.get_type_hints(tp)
        fields = {f.name: f for f in dataclasses.fields(tp) if f.name not in skip}
        for extra in sorted(set(value) - set(fields)):
            problems.append(
                f"{_join(key, extra)}: unknown key (expected one of: {', '.join(fields)})")
        kwargs = {}
        for name, f in fields.items():
            if name in value:
                kwargs[name] = convert(hints[name], value[name], _join(key, name), problems)
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                problems.append(f"{_join(key, name)}: missing (expected {describe(hints[name])})")
                kwargs[name] = None
        return tp(**kwargs)
    if origin is Literal:
        if value not in typing.get_args(tp):
            bad()
        return value
    if origin is list:
        if not isinstance(value, list):
            bad()
            return []
        (item,) = typing.get_args(tp)
        return [convert(item, v, f"{where}[{i}]", problems) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            bad()
            return {}
        _, item = typing.get_args(tp)
        return {k: convert(item, v, _join(key, k), problems) for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            bad()
            return None
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            bad()
            return None
        return value
    if tp in (str, bool):
        if not isinstance(value, tp):
            bad()
            return None
        return value
    raise TypeError(f"spec schema uses an unsupported type {tp!r}")  # a bug here, not in the file


def dotted(table: Any, key: str) -> Any:
    """The value at dotted ``key`` ("chat.eos_token") in nested TOML tables, or None where a part
    is missing or the value above it is not a table. One walk, so the keys a problem message
    names, the keys ``[provenance.not_on_card]`` lists and the keys a stage hashes all mean the
    same value."""
    node = table
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _join(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name
