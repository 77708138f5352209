"""One way to read a setting, whichever door it came through.

Settings reach the package from the command line (already typed by
``HfArgumentParser``), from YAML (``2.5``, ``"1e-3"``, ``[1, 2]`` as YAML
reads them), from Python, and from Flower's run config (TOML values). The
dataclasses of settings call :func:`coerce_fields` first in their
``__post_init__``, so every door gets the same conversion and the same error,
one that names the setting:

- ``int`` settings take whole numbers (``2``, ``2.0``, ``"2"``), never ``2.5``,
  ``True`` or a list;
- ``float`` settings take numbers and numeric text (``"1e-3"``);
- ``bool`` settings take booleans and the words ``true/false``, ``yes/no``,
  ``on/off``, ``1/0``;
- ``str`` settings take text (numbers are written as text), never a list or a
  mapping;
- choice settings (an ``Enum`` such as ``save_strategy``) whose choices include
  ``"no"`` read YAML's ``no``/``false`` (a boolean by then) as ``"no"``; ``yes``
  names no choice and is refused with the choices;
- ``resume_from_checkpoint`` reads the boolean words (:func:`parse_resume`).

Settings of other types (lists, mappings) are left to the checks of their own
class.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import math
import types
import typing
from collections.abc import Iterable
from typing import Any

__all__ = ["closest_name", "coerce_fields", "coerce_value", "parse_bool", "parse_resume"]

_TRUE = {"true", "yes", "y", "on", "1", "t"}
_FALSE = {"false", "no", "n", "off", "0", "f"}


def parse_bool(value: Any, name: str) -> bool:
    """``value`` as a boolean, or ``ValueError`` naming the setting."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"{name} must be true or false, got {value!r}")


def parse_resume(value: Any) -> str | None:
    """``resume_from_checkpoint`` read one way: the boolean words, or a checkpoint path.

    ``true``/``yes``/``on``/``1`` (or ``True``) mean the latest checkpoint and give
    ``"true"``; ``false``/``no``/``off``/``0``/``none``/empty (or ``False``, ``None``)
    give ``None``; anything else is a path, as text.
    """
    if value is None or isinstance(value, bool):
        return "true" if value else None
    if isinstance(value, int | float) and value in (0, 1):
        return "true" if value else None
    text = str(value).strip()
    if text.lower() in _TRUE:
        return "true"
    if text.lower() in _FALSE | {"", "none"}:
        return None
    return text


def _choice(value: Any, choices: type[enum.Enum], name: str) -> Any:
    """A choice setting given as YAML's ``no``/``yes`` (booleans by then)."""
    values = [str(member.value) for member in choices]
    if value is False and "no" in values:
        return "no"
    raise ValueError(f"{name} must be one of {values}, got {value!r}")


def _whole(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    if isinstance(value, str):
        text = value.strip()
        try:
            number = float(text)
        except ValueError:
            raise ValueError(f"{name} must be a whole number, got {value!r}") from None
    else:
        number = float(value)
    if not math.isfinite(number) or not number.is_integer():
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    return int(number)


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {value!r}") from None


def _text(value: Any, name: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise ValueError(f"{name} must be text, got {value!r}")


_CONVERTERS = {int: _whole, float: _number, bool: parse_bool, str: _text}


def _simple_type(annotation: Any) -> tuple[type | None, bool]:
    """``(int|float|bool|str or None, optional)`` for ``X`` and ``X | None`` annotations."""
    if annotation in _CONVERTERS:
        return annotation, False
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(annotation)) == 2 and args[0] in _CONVERTERS:
            return args[0], True
    return None, False


def coerce_value(value: Any, annotation: Any, name: str) -> Any:
    """``value`` converted to a simple ``annotation`` (see the module docstring).

    Values of other annotations are returned unchanged.
    """
    if isinstance(value, bool):
        choices = [a for a in typing.get_args(annotation) if isinstance(a, type)]
        enums = [a for a in choices if issubclass(a, enum.Enum)]
        if enums:
            return _choice(value, enums[0], name)
    kind, optional = _simple_type(annotation)
    if kind is None:
        return value
    if value is None:
        if optional:
            return None
        raise ValueError(f"{name} must be set (it has no 'unset' value), got None")
    return _CONVERTERS[kind](value, name)


_HINTS: dict[type, dict[str, Any]] = {}


def coerce_fields(obj: Any, names: Iterable[str] | None = None) -> None:
    """Convert the simple-typed fields of the dataclass ``obj`` in place.

    Parameters
    ----------
    obj:
        A dataclass instance (e.g. ``FedPACArguments`` in its ``__post_init__``).
    names:
        Only these fields (default: every ``init`` field).

    Raises
    ------
    ValueError
        Naming the first field whose value cannot be read as its type.
    """
    cls = type(obj)
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    hints = _HINTS[cls]
    wanted = set(names) if names is not None else None
    for f in dataclasses.fields(obj):
        if not f.init or (wanted is not None and f.name not in wanted):
            continue
        value = getattr(obj, f.name)
        converted = coerce_value(value, hints.get(f.name), f.name)
        if converted is not value:
            setattr(obj, f.name, converted)


def closest_name(key: str, names: Iterable[str]) -> str | None:
    """The valid name closest to a misspelt ``key`` (``None`` if nothing is close)."""
    found = difflib.get_close_matches(key, list(names), n=1, cutoff=0.6)
    return found[0] if found else None
