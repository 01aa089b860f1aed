"""``pipeline sql OUT QUERY``: one query of the user's own over the views.

The query runs on a fresh in-memory connection from ``views.open_views``, so it sees
``results``, ``latest``, ``pricing`` and ``costs`` and nothing else; the part files
are only read, so no query can change what OUT holds. A query DuckDB refuses comes
back as a ``ReportError`` with DuckDB's message.
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb

from pipeline.errors import ReportError
from pipeline.query.formats import (
    FORMATS,
    check_format,
    markdown_table,
    plain,
    text_table,
    to_csv,
    to_json,
)
from pipeline.query.views import open_views, run_query


def sql(out_dir: str | Path, query: str, fmt: str, pricing_file: str | Path | None = None) -> str:
    """Run one DuckDB query over the views and return its result as text."""
    check_format(fmt, FORMATS)
    con = open_views(out_dir, pricing_file)
    try:
        try:
            columns, rows = run_query(con, query)
        except duckdb.Error as exc:
            raise ReportError(f"query failed: {exc}") from exc
    finally:
        con.close()
    if not columns:
        return ""
    if fmt == "json":
        return to_json([dict(zip(columns, r, strict=True)) for r in rows])
    if fmt == "csv":
        return to_csv(columns, rows)
    cells = [["NULL" if v is None else plain(v) for v in r] for r in rows]
    right = [_is_numeric([r[i] for r in rows]) for i in range(len(columns))]
    if fmt == "markdown":
        return markdown_table(columns, cells, right)
    return text_table(columns, cells, right) + f"\n({len(rows)} row{'s' * (len(rows) != 1)})"


def _is_numeric(values: list[Any]) -> bool:
    present = [v for v in values if v is not None]
    return bool(present) and all(
        isinstance(v, int | float | Decimal) and not isinstance(v, bool) for v in present
    )


# ------------------------------------------------------------------------- helpers
