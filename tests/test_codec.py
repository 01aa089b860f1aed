"""pipeline.codec: orjson's speed, and what the standard library would have written,
in meaning, for request bodies and journal lines."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from enum import Enum
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import codec

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text()
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


def _same(a: Any, b: Any) -> bool:
    """Equal, type for type, NaN equal to NaN (what json.loads made of the same text)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def _stdlib(value: Any) -> bytes | Exception:
    try:
        return json.dumps(value, ensure_ascii=False).encode("utf-8")
    except Exception as exc:  # noqa: BLE001 - compared with what codec raises
        return exc


@settings(max_examples=300, deadline=None)
@given(values)
def test_a_body_means_what_the_standard_library_would_send(value: Any) -> None:
    expected = _stdlib(value)
    if isinstance(expected, Exception):
        with pytest.raises(type(expected)):
            codec.dumps(value)
        return
    assert _same(json.loads(codec.dumps(value)), json.loads(expected))


def test_a_body_with_nan_is_sent_as_json_sends_it_not_as_null() -> None:
    body = {"model": "m", "temperature": math.nan, "x": [math.inf]}
    assert codec.dumps(body) == json.dumps(body, ensure_ascii=False).encode("utf-8")


class Color(Enum):
    RED = "red"


@dataclass
class Point:
    x: int
    y: int


def _encode(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


@pytest.mark.parametrize(
    "when",
    [
        datetime(2026, 11, 29, 7, 0, 1, 123456, tzinfo=UTC),
        datetime(2026, 11, 29, 7, 0, 1, tzinfo=UTC),  # no microseconds
        datetime(2026, 11, 29, 7, 0, 1, 5, tzinfo=timezone(timedelta(hours=-5))),
        datetime(2026, 11, 29, 7, 0, 1),  # naive
    ],
)
def test_a_journal_line_reads_back_as_the_standard_library_wrote_it(when: datetime) -> None:
    row: dict[str, Any] = {
        "id": "r1",
        "content": "é \u2028 \x00",
        "latency_ms": 1.5,
        "carried": {"score": 2.5, "tags": ["a", 1], "nested": {"n": None}},
        "started_at": when,
        "point": Point(1, 2),  # json hands it to default (str); orjson would write a dict
        "other": object.__new__(type("Odd", (), {"__str__": lambda self: "odd"})),
    }
    cases = [
        (row, True),  # orjson writes it
        ({**row, "carried": {"score": math.nan}}, False),  # NaN: json writes it
        ({**row, "kind": Color.RED}, False),  # an Enum: json writes it
    ]
    for value, fast in cases:
        line = codec.dumps_line(value, _encode)
        assert line.endswith(b"\n") and line.count(b"\n") == 1
        assert (b'": ' not in line) is fast  # orjson writes no blanks, json does
        expected = json.dumps(value, ensure_ascii=False, default=_encode)
        assert _same(json.loads(line), json.loads(expected))
