"""One coercion function per field type, for every route and both request forms.

A JSON body carries real booleans and numbers; a query string (``GET
/v1/engines/{e}/completions?echo=false&n=4``) carries only strings; clients
mix the two (``"stream": 1``, ``"temperature": "0.2"``). Every route --
completions POST and GET, the engine routes, chat, ``/ask`` -- reads each
field through the function for its type here, so a value means the same
thing wherever it is sent. Each raises :class:`fastpilot.errors.InvalidRequest`
naming ``param`` and returns ``default`` for a missing (``None``) value.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, TypeVar

from fastpilot.errors import InvalidRequest

T = TypeVar("T")

# Spellings of booleans in query strings and loosely typed JSON (case-insensitive).
TRUE_WORDS = frozenset({"true", "1", "yes", "on"})
FALSE_WORDS = frozenset({"false", "0", "no", "off", ""})


def _type_name(value: object) -> str:
    return type(value).__name__


def _number(value: Any, param: str, what: str, parse: Callable[[str], Any]) -> Any:
    """``value`` with a string parsed by ``parse``; a boolean is refused (it is not a number)."""
    if isinstance(value, bool):
        raise InvalidRequest(f"{param} must be {what}, not a boolean", param=param)
    if isinstance(value, str):
        try:
            return parse(value.strip())
        except ValueError:
            raise InvalidRequest(
                f"{param} must be {what}, got {value[:40]!r}", param=param
            ) from None
    return value


def coerce_int(value: Any, param: str, default: T, *, lo: int, hi: int) -> int | T:
    """An integer in ``[lo, hi]`` from an int, an integral float or a decimal string.

    Booleans are refused: ``"max_tokens": true`` is a client bug, not 1.
    """
    if value is None:
        return default
    value = _number(value, param, "an integer", int)
    if isinstance(value, float):
        if not math.isfinite(value) or value != int(value):
            raise InvalidRequest(f"{param} must be an integer, got {value!r}", param=param)
        value = int(value)
    if not isinstance(value, int):
        raise InvalidRequest(f"{param} must be an integer, got {_type_name(value)}", param=param)
    if not lo <= value <= hi:
        raise InvalidRequest(f"{param} must be between {lo} and {hi}, got {value}", param=param)
    return value


def coerce_float(value: Any, param: str, default: T, *, lo: float, hi: float) -> float | T:
    """A finite number in ``[lo, hi]`` from an int, a float or a numeric string."""
    if value is None:
        return default
    value = _number(value, param, "a number", float)
    if not isinstance(value, (int, float)):
        raise InvalidRequest(f"{param} must be a number, got {_type_name(value)}", param=param)
    value = float(value)
    if not math.isfinite(value) or not lo <= value <= hi:
        raise InvalidRequest(
            f"{param} must be between {lo:g} and {hi:g}, got {value!r}", param=param
        )
    return value


def coerce_bool(value: Any, param: str, default: T) -> bool | T:
    """A boolean from ``true``/``false``, 0/1, or their query-string spellings.

    ``"stream": 1`` is true and ``echo=false`` is false on every route; any
    other value (``2``, ``"maybe"``, a list) is a 400 naming ``param``.
    """
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        low = value.strip().lower()
        if low in TRUE_WORDS:
            return True
        if low in FALSE_WORDS:
            return False
    raise InvalidRequest(f"{param} must be a boolean, got {str(value)[:40]!r}", param=param)


def coerce_str(value: Any, param: str, default: T) -> str | T:
    """A string, taken as is (no trimming: whitespace can matter in a prompt)."""
    if value is None:
        return default
    if not isinstance(value, str):
        raise InvalidRequest(f"{param} must be a string, got {_type_name(value)}", param=param)
    return value
