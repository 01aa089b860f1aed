"""JSON out on the hot path: orjson where it writes what the standard library means.

Every request encodes a body and journals a result row. With the standard library a
journal line alone (35 columns, two datetimes through a ``default`` callback) cost
more CPU than the rest of the writer; orjson writes the same in a twentieth of the
time (bench/RESULTS.md). orjson differs from ``json`` in a few corners, and each is
sent to ``json`` instead, so what is sent and stored means exactly what the standard
library would have written:

- a float that is not finite (``json`` writes ``NaN``, orjson ``null``) or an Enum
  is looked for first, and the value goes to ``json``; datetimes and dataclasses go
  to the caller's ``default``, as with ``json``;
- an int past 64 bits, a key that is not a string, a lone surrogate or nesting past
  orjson's limit make orjson raise, and ``json`` then does what it always did
  (raise, or write it);
- whitespace differs (orjson writes none); every JSON reader reads both the same.

Answers are decoded in ``wire._loads``: by orjson only when a cheap scan of the bytes
shows none of its silent corners (an integer past 64 bits becomes a float there), by
``json`` otherwise. Request fingerprints (``request.request_hash``) must never change
their bytes: orjson writes them only for bodies where its text is ``json``'s byte for
byte (floats only in the range both write alike, no subclass), ``json`` the rest.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from enum import Enum
from typing import Any

import orjson

_STDLIB = json.JSONEncoder(ensure_ascii=False)
_LINE = (
    orjson.OPT_APPEND_NEWLINE | orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS
)


def _finite(value: Any) -> bool:
    """False when a float that is not finite (or an Enum) is anywhere in ``value``
    (``_line_kind``'s walk, which runs on every body and journal line)."""
    return _line_kind(value) != _NOT_FINITE


def _finite_other(value: Any) -> bool:
    if isinstance(value, Enum):
        return False  # orjson writes its value, json its str(): let json do it
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, list | tuple):
        return all(_finite(v) for v in value)
    return True


def dumps(value: Any) -> bytes:
    """``json.dumps(value, ensure_ascii=False).encode("utf-8")``, but fast: a request body."""
    if _finite(value):
        try:
            return orjson.dumps(value)
        except TypeError:  # orjson.JSONEncodeError: see the module docstring
            pass
    return _STDLIB.encode(value).encode("utf-8")


# A journal line whose datetimes are all in UTC: orjson writes those itself.
_LINE_UTC = orjson.OPT_APPEND_NEWLINE | orjson.OPT_PASSTHROUGH_DATACLASS
_SCALARS = frozenset({str, int, bool, type(None)})
_NOT_FINITE, _FINITE, _UTC_ONLY = 0, 1, 2


def _line_kind(value: Any) -> int:
    """``_finite``, and whether every datetime in ``value`` is a plain ``datetime`` in
    UTC and every other value a JSON scalar, list, tuple or dict (``_UTC_ONLY``):
    then orjson may write the datetimes itself. ``_NOT_FINITE`` when ``_finite``
    says False; ``_FINITE`` when it says True for anything else."""
    kind = type(value)
    if kind is dict:
        items: Iterable[Any] = value.values()
    elif kind is list or kind is tuple:
        items = value
    elif kind in _SCALARS:
        return _UTC_ONLY
    elif kind is float:
        return _UTC_ONLY if value - value == 0.0 else _NOT_FINITE
    elif kind is datetime:
        return _UTC_ONLY if value.tzinfo is UTC else _FINITE
    else:
        return _FINITE if _finite_other(value) else _NOT_FINITE
    result = _UTC_ONLY
    for item in items:
        kind = type(item)
        if kind in _SCALARS:
            continue
        if kind is float:
            if item - item != 0.0:
                return _NOT_FINITE
        elif kind is datetime:
            if item.tzinfo is not UTC:
                result = _FINITE
        else:
            inner = _line_kind(item)
            if inner == _NOT_FINITE:
                return _NOT_FINITE
            if inner == _FINITE:
                result = _FINITE
    return result


def dumps_line_isoformat(value: Any, default: Callable[[Any], Any]) -> bytes:
    """``dumps_line`` for a ``default`` that writes a datetime as its ``isoformat()``
    (a journal line's two timestamps).

    Calling back into Python for each datetime was most of the cost of a journal
    line. orjson's own text for a ``datetime`` whose tzinfo is UTC is exactly its
    ``isoformat()`` (microseconds only when not zero, ``+00:00``), so when every
    datetime in ``value`` is one of those and nothing else would reach ``default``,
    orjson writes them itself: the same bytes, without the callbacks. Anything else
    is ``dumps_line``'s business.
    """
    kind = _line_kind(value)
    if kind == _UTC_ONLY:
        try:
            return orjson.dumps(value, option=_LINE_UTC)
        except TypeError:
            return _line(value, default, finite=False)
    return _line(value, default, finite=kind == _FINITE)


def dumps_line(value: Any, default: Callable[[Any], Any]) -> bytes:
    """``json.dumps(value, ensure_ascii=False, default=default)`` plus a newline, as UTF-8:
    a journal line. ``default`` is called for what JSON has no type for, datetimes and
    dataclasses included (orjson would write those its own way)."""
    return _line(value, default, finite=_finite(value))


def _line(value: Any, default: Callable[[Any], Any], *, finite: bool) -> bytes:
    """A journal line: orjson when ``finite`` (``_finite`` said so) and it can, json
    otherwise; the same bytes either way."""
    if finite:
        try:
            return orjson.dumps(value, default=default, option=_LINE)
        except TypeError:
            pass
    text = json.dumps(value, ensure_ascii=False, default=default)
    return (text + "\n").encode("utf-8")
