"""The results table: one row per job per run that reached an outcome.

This module is the single definition of the columns that `OUT/results/**/*.parquet`
holds, so the sink, the DuckDB views and the tests agree on names and types. Input
columns that are not part of the request are carried through after these columns,
under their own names (prefixed with ``input_`` when a name collides with ours).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

import pyarrow as pa

UTC_TS = pa.timestamp("us", tz="UTC")

RESULT_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("id", pa.string()),
        ("status", pa.string()),  # 'ok' | 'error'
        ("provider", pa.string()),
        ("base_url", pa.string()),
        ("model", pa.string()),
        ("response_model", pa.string()),
        ("response_id", pa.string()),
        ("finish_reason", pa.string()),
        ("content", pa.string()),
        ("reasoning_content", pa.string()),
        ("tool_calls", pa.string()),  # JSON text
        ("parsed", pa.string()),  # JSON text, when response_format asks for JSON
        ("label", pa.string()),  # the validated label, for labeling jobs
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("total_tokens", pa.int64()),
        ("cached_tokens", pa.int64()),
        ("reasoning_tokens", pa.int64()),
        ("image_tokens", pa.int64()),
        ("audio_tokens", pa.int64()),
        ("attempts", pa.int32()),
        ("http_status", pa.int32()),
        ("error_type", pa.string()),
        ("error_message", pa.string()),
        ("fallback_suggestion", pa.string()),
        ("latency_ms", pa.float64()),
        ("started_at", UTC_TS),
        ("finished_at", UTC_TS),
        ("request_hash", pa.string()),
        ("shared_from", pa.string()),  # id whose identical request paid for this answer
        # A billed answer that broke the asked-for JSON and was asked again: kept for
        # the invoice, never the id's outcome (resume and `latest` look past it).
        ("superseded", pa.bool_()),
        ("metadata", pa.string()),  # JSON text
        ("source_file", pa.string()),
        ("source_line", pa.int64()),
        # The tier the answer was billed at: the one the server reported on a
        # synchronous call (NULL when it reported none), 'batch' for a Batch-API row.
        ("service_tier", pa.string()),
        ("batch_id", pa.string()),  # the provider's batch, for rows collected from one
    ]
)

RESULT_COLUMNS: tuple[str, ...] = tuple(RESULT_SCHEMA.names)
_RESULT_COLUMN_SET = frozenset(RESULT_COLUMNS)


_INT64 = 2**63  # Parquet's int64: a count outside it cannot be stored


def _storable_text(text: str) -> str:
    """``text`` as valid Unicode: surrogate halves a server sent as JSON escapes are
    paired where they pair and replaced (U+FFFD) where they do not."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text


def _storable(value: Any) -> Any:
    if isinstance(value, str):
        return _storable_text(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value if -_INT64 <= value < _INT64 else None
    if isinstance(value, dict):
        return {_storable_text(str(k)): _storable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_storable(v) for v in value]
    return value


# Values ``_storable`` never changes, by exact type (subclasses take the general path).
_KEPT = frozenset({type(None), bool, float, datetime})


def _valid_text(text: str) -> bool:
    """True when ``_storable_text`` would give ``text`` back unchanged."""
    if text.isascii():  # O(1): CPython keeps the flag
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _unchanged(value: Any) -> bool:
    """True when ``_storable(value)`` would equal ``value``: plain, valid text, counts
    inside int64, containers of such with text keys. Exact types only: anything
    unusual (a subclass, a key that is not text) answers False and takes the general
    path, so this can only say "nothing to fix" when that is certain."""
    kind = type(value)
    if kind is str:
        return _valid_text(value)
    if kind in _KEPT:
        return True
    if kind is int:
        return bool(-_INT64 <= value < _INT64)
    if kind is dict:
        for key, item in value.items():
            if type(key) is not str or not _valid_text(key) or not _unchanged(item):
                return False
        return True
    if kind is list:
        return all(_unchanged(item) for item in value)
    # Any other exact type that is none of str/int/dict/list is kept as is by
    # _storable; a subclass of one of those goes the general way.
    return not isinstance(value, str | int | dict | list)


def storable(row: dict[str, Any]) -> dict[str, Any]:
    """A result row that the journal and Parquet can hold, whatever the server sent.

    Text from a server can carry lone surrogates (``"\\ud800"`` is valid JSON, not
    valid UTF-8) and numbers past int64; either would fail the write of the whole
    batch, not just this row. Both are fixed here, at the one door every row passes
    on its way to disk: text is repaired, an impossible count becomes NULL.

    Almost every row needs nothing fixed, and copying it (a dict of ~35 columns,
    every value looked at twice) was measurable CPU per request: such a row is
    checked in one pass and handed back as is. A row with anything to fix comes back
    as a repaired copy; the row given is never changed.
    """
    for value in row.values():
        kind = type(value)
        if kind is str:
            if value.isascii() or _valid_text(value):
                continue
            break
        if kind in _KEPT:
            continue
        if kind is int:
            if -_INT64 <= value < _INT64:
                continue
            break
        if not _unchanged(value):
            break
    else:
        return row
    return {key: _storable(value) for key, value in row.items()}


def carried_name(column: str) -> str:
    """The results column name for an input column carried through untouched."""
    return f"input_{column}" if column in _RESULT_COLUMN_SET else column


def _json_text(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)


def carried_array(values: list[Any]) -> pa.Array:
    """Arrow array for one carried column; mixed or nested values fall back to JSON text.

    Input files are free-form, so one column can hold ints in one row and strings in
    the next. Rather than fail the whole batch, such a column is stored as text.
    """
    try:
        arr = pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        return pa.array([None if v is None else _as_text(v) for v in values], pa.string())
    if pa.types.is_null(arr.type):
        return pa.array(values, pa.string())
    if pa.types.is_nested(arr.type) or pa.types.is_struct(arr.type):
        return pa.array([None if v is None else _json_text(v) for v in values], pa.string())
    return arr


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else _json_text(value)


def results_table(rows: Iterable[Mapping[str, Any]]) -> pa.Table:
    """Build an Arrow table of result rows: our columns first, carried columns after."""
    rows = list(rows)
    # Arrow reads the rows itself (a missing key is NULL): ~3.5x faster than a Python
    # list per column, ~16 us a row on a 2-core machine (bench/RESULTS.md).
    table = pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)
    extra: dict[str, None] = {}
    for r in rows:
        for key in r.get("carried", {}) or {}:
            extra.setdefault(key, None)
    for key in extra:
        values = [(r.get("carried") or {}).get(key) for r in rows]
        table = table.append_column(carried_name(key), carried_array(values))
    return table
