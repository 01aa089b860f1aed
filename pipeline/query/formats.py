"""Rows as text: the table, csv, json and markdown that ``pipeline report`` and
``pipeline sql`` print.

Pure formatting, no DuckDB: values arrive as the Python values DuckDB gives (through
Arrow) and leave as text. Each format is meant for a reader: the table for a
terminal, markdown for a ticket or a pull request, csv for a spreadsheet, json for a
script. NULL is written so that it cannot be mistaken for a value (empty in csv,
``null`` in json, ``NULL`` or ``-`` in the tables), and NaN or infinities never reach
json, which has no spelling for them.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from datetime import date, datetime, time
from decimal import Decimal
from typing import Any

from pipeline.errors import ReportError

FORMATS = ("table", "csv", "json", "markdown")


def check_format(fmt: str, allowed: Sequence[str]) -> None:
    """Refuse a format name before any work is done, naming the ones there are."""
    if fmt not in allowed:
        raise ReportError(f"unknown format {fmt!r}; use one of {', '.join(allowed)}")


def plain(value: Any) -> str:
    """A value as one cell of text: ISO dates, JSON for lists and structs."""
    if isinstance(value, date | datetime | time):
        return value.isoformat()
    if isinstance(value, list | dict):
        return json.dumps(jsonable(value), ensure_ascii=False)
    return str(value)


def jsonable(value: Any) -> Any:
    """DuckDB's Python values as JSON values (NaN and infinities become null)."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float | Decimal):
        number = float(value)
        return number if math.isfinite(number) else None
    if isinstance(value, date | datetime | time):
        return value.isoformat()
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


def to_json(rows: list[dict[str, Any]]) -> str:
    """A JSON array of objects, one per row, keys in the rows' order."""
    return json.dumps([jsonable(r) for r in rows], indent=2, ensure_ascii=False)


def to_csv(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A header line and one line per row; NULL is an empty field, booleans are
    true/false, and floats are written with ``repr``, which loses no digit."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["" if v is None else _csv_value(v) for v in row])
    return buffer.getvalue().rstrip("\n")


def _csv_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return plain(value)


def text_table(
    headers: Sequence[str],
    rows: list[list[str]],
    right: Sequence[bool],
    total: list[str] | None = None,
) -> str:
    """Columns padded to their widest cell; a rule under the header and above the total."""
    all_rows = [*rows, *([total] if total else [])]
    widths = [max([len(h), *(len(r[i]) for r in all_rows)]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        padded = (
            c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right, strict=True)
        )
        return "  ".join(padded).rstrip()

    rule = "  ".join("-" * w for w in widths)
    out = [line(headers), rule, *(line(r) for r in rows)]
    if total:
        out += [rule, line(total)]
    return "\n".join(out)


def markdown_table(headers: Sequence[str], rows: list[list[str]], right: Sequence[bool]) -> str:
    """A GitHub-flavoured table; a ``|`` inside a cell is escaped so it cannot split it."""

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    align = ["---:" if r else "---" for r in right]
    return "\n".join([line(headers), "|" + "|".join(align) + "|", *(line(r) for r in rows)])
