"""DuckDB views over a results folder, the cost report and ad-hoc SQL.

``open_views`` gives an in-memory DuckDB connection with these views:

- ``results``: every row of ``OUT/results/**/*.parquet``, one per job per run that
  reached an outcome. Always has every column of ``schema.RESULT_SCHEMA`` with its
  type (also before the first run, and for part files written before a column
  existed); carried input columns follow.
- ``latest``: the newest row per ``id`` (by ``finished_at``), i.e. where each input
  row stands now.
- ``pricing``: the price table in use (the shipped ``prices.csv`` or ``--pricing``).
- ``costs``: ``results`` with the matched price row and ``cost_usd`` / ``unpriced``.

The SQL below is the arithmetic users are asked to trust, so it is written to be
read; ``pipeline sql OUT "SELECT ..."`` can query the same views. Timestamps are UTC:
the connection's time zone is set to UTC, so ``CAST(finished_at AS DATE)`` is the UTC
day, as pricing.py uses.

The report covers every row of ``results`` (not ``latest``): a row that failed and was
retried in a later run was sent, and possibly billed, twice.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from datetime import UTC, date, datetime, time
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from pipeline.pricing import SNAPSHOT_SUFFIX, PriceTable, load_prices
from pipeline.schema import RESULT_SCHEMA

FORMATS = ("table", "csv", "json", "markdown")


class ReportError(ValueError):
    """A report or query cannot be made as asked (bad --by, date, format or SQL)."""


PRICING_SCHEMA = pa.schema(
    [
        ("model", pa.string()),
        ("provider", pa.string()),
        ("input_per_mtok", pa.float64()),
        ("cached_input_per_mtok", pa.float64()),
        ("output_per_mtok", pa.float64()),
        ("long_context_threshold", pa.int64()),
        ("long_input_per_mtok", pa.float64()),
        ("long_cached_input_per_mtok", pa.float64()),
        ("long_output_per_mtok", pa.float64()),
        ("valid_from", pa.date32()),
        ("source", pa.string()),
    ]
)

LATEST_VIEW = """
CREATE VIEW latest AS
SELECT *
FROM results
QUALIFY row_number() OVER (PARTITION BY id ORDER BY finished_at DESC NULLS LAST, run_id DESC) = 1
"""

# `gpt-5.5-2026-04-23` -> `gpt-5.5` (pricing.strip_snapshot, the same pattern).
SNAPSHOT_MACRO = f"""
CREATE MACRO without_snapshot(name) AS regexp_replace(name, '{SNAPSHOT_SUFFIX}', '')
"""

# The price-matching rule of pricing.find_price and the cost formula of
# pricing.Price.cost, in SQL. Tests check that both give the same numbers.
COSTS_VIEW = """
CREATE VIEW costs AS
WITH price_keys AS (
    -- A price depends on these alone, so each distinct combination is matched once
    -- (a few hundred lookups rather than one per row).
    SELECT DISTINCT model, response_model, provider, CAST(finished_at AS DATE) AS day
    FROM results
),
matched AS (
    SELECT k.*, price.*
    FROM price_keys AS k
    LEFT JOIN LATERAL (
        -- The one price row: the first model name that has a price (the request
        -- model, then without its snapshot date, then the response model, then
        -- without its date); a row for this provider before a blank-provider row;
        -- the newest valid_from on or before the day the result finished.
        SELECT
            p.model AS price_model,
            p.provider AS price_provider,
            p.valid_from AS price_valid_from,
            p.source AS price_source,
            p.* EXCLUDE (model, provider, valid_from, source)
        FROM pricing AS p
        WHERE p.model IN (k.model, without_snapshot(k.model),
                          k.response_model, without_snapshot(k.response_model))
          AND (p.provider IS NULL OR p.provider = k.provider)
          AND (p.valid_from IS NULL OR p.valid_from <= coalesce(k.day, current_date))
        ORDER BY
            list_position([k.model, without_snapshot(k.model),
                           k.response_model, without_snapshot(k.response_model)], p.model),
            p.provider IS NULL,
            p.valid_from DESC NULLS LAST
        LIMIT 1
    ) AS price ON true
),
priced AS (
    SELECT
        r.*,
        m.* EXCLUDE (model, response_model, provider, day),
        -- Above the threshold the whole request is billed at the long rates.
        coalesce(r.prompt_tokens > m.long_context_threshold, false) AS long_context,
        coalesce(r.prompt_tokens, 0) = 0 AND coalesce(r.completion_tokens, 0) = 0 AS no_usage
    FROM results AS r
    LEFT JOIN matched AS m
        ON  m.model IS NOT DISTINCT FROM r.model
        AND m.response_model IS NOT DISTINCT FROM r.response_model
        AND m.provider IS NOT DISTINCT FROM r.provider
        AND m.day IS NOT DISTINCT FROM CAST(r.finished_at AS DATE)
),
billed AS (
    -- The rates this row is billed at.
    SELECT
        * EXCLUDE (input_per_mtok, cached_input_per_mtok, output_per_mtok,
                   long_input_per_mtok, long_cached_input_per_mtok, long_output_per_mtok),
        CASE WHEN long_context THEN long_input_per_mtok ELSE input_per_mtok END
            AS input_per_mtok,
        CASE WHEN long_context THEN long_cached_input_per_mtok ELSE cached_input_per_mtok END
            AS cached_input_per_mtok,
        CASE WHEN long_context THEN long_output_per_mtok ELSE output_per_mtok END
            AS output_per_mtok
    FROM priced
)
SELECT
    * EXCLUDE (no_usage),
    CASE
        -- A row that reported no tokens (e.g. an error before any work) cost nothing.
        WHEN no_usage THEN 0.0
        -- No price row leaves the rates NULL, so the cost is NULL: never $0.
        -- Reasoning tokens are part of completion_tokens, billed as output.
        ELSE ((coalesce(prompt_tokens, 0) - coalesce(cached_tokens, 0)) * input_per_mtok
              + coalesce(cached_tokens, 0) * cached_input_per_mtok
              + coalesce(completion_tokens, 0) * output_per_mtok) / 1e6
    END AS cost_usd,
    price_model IS NULL AND NOT no_usage AS unpriced
FROM billed
"""

# One row of the report: the same aggregates for each group and for the total line.
AGGREGATES = """
    count(*) AS requests,
    count(*) FILTER (WHERE status = 'ok') AS ok,
    count(*) FILTER (WHERE status = 'error') AS errors,
    coalesce(sum(prompt_tokens), 0) AS prompt_tokens,
    coalesce(sum(cached_tokens), 0) AS cached_tokens,
    coalesce(sum(completion_tokens), 0) AS completion_tokens,
    coalesce(sum(reasoning_tokens), 0) AS reasoning_tokens,
    -- A group with any unpriced row has no known cost: NULL, never a partial sum.
    CASE WHEN bool_or(unpriced) THEN NULL ELSE coalesce(sum(cost_usd), 0) END AS cost_usd,
    coalesce(bool_or(unpriced), false) AS unpriced,
    coalesce(sum(cost_usd), 0) AS priced_cost_usd,
    count(*) FILTER (WHERE unpriced) AS unpriced_requests,
    count(*) FILTER (WHERE status = 'error') / nullif(count(*), 0) AS error_rate,
    sum(cached_tokens) / nullif(sum(prompt_tokens), 0) AS cache_hit_share,
    sum(reasoning_tokens) / nullif(sum(completion_tokens), 0) AS reasoning_share,
    quantile_cont(latency_ms, 0.5) AS latency_p50_ms,
    quantile_cont(latency_ms, 0.95) AS latency_p95_ms
"""

# What each --by name groups on; anything else is a key of the metadata JSON.
DIMENSIONS = {
    "model": "model",
    "provider": "provider",
    "day": "CAST(finished_at AS DATE)",
    "run": "run_id",
    "status": "status",
}

# (column, header in table/markdown, how a table cell is written)
_COUNT, _SHARE, _MS, _COST = "count", "share", "ms", "cost"
REPORT_COLUMNS = (
    ("requests", "requests", _COUNT),
    ("ok", "ok", _COUNT),
    ("errors", "errors", _COUNT),
    ("error_rate", "err%", _SHARE),
    ("prompt_tokens", "prompt", _COUNT),
    ("cached_tokens", "cached", _COUNT),
    ("cache_hit_share", "cache%", _SHARE),
    ("completion_tokens", "completion", _COUNT),
    ("reasoning_tokens", "reasoning", _COUNT),
    ("reasoning_share", "reason%", _SHARE),
    ("latency_p50_ms", "p50 ms", _MS),
    ("latency_p95_ms", "p95 ms", _MS),
    ("cost_usd", "cost_usd", _COST),
)
# Exact key order of a JSON group object after the group keys; extras follow.
JSON_KEYS = (
    "requests",
    "ok",
    "errors",
    "prompt_tokens",
    "cached_tokens",
    "completion_tokens",
    "reasoning_tokens",
    "cost_usd",
    "unpriced",
    "priced_cost_usd",
    "unpriced_requests",
    "error_rate",
    "cache_hit_share",
    "reasoning_share",
    "latency_p50_ms",
    "latency_p95_ms",
)
# After REPORT_COLUMNS in CSV, so a spreadsheet can tell a NULL cost from a blank.
CSV_EXTRA_COLUMNS = ("unpriced", "priced_cost_usd", "unpriced_requests")

# The models behind the UNPRICED lines of a table report.
UNPRICED_MODELS = """
SELECT
    coalesce(model, response_model) AS model,
    provider,
    count(*) AS requests,
    coalesce(sum(prompt_tokens), 0) AS prompt_tokens,
    coalesce(sum(completion_tokens), 0) AS completion_tokens
FROM costs
{where} AND unpriced
GROUP BY ALL
ORDER BY ALL
"""


# --------------------------------------------------------------------------- views


def open_views(
    out_dir: str | Path, pricing_file: str | Path | None = None
) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with results / latest / pricing / costs views.

    The caller closes it. Nothing is written to OUT: the views read the part files.

    Raises PricingError (a ValueError) when the price table is bad.
    """
    prices = load_prices(pricing_file)
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    _create_results_view(con, Path(out_dir))
    con.execute(LATEST_VIEW)
    _create_pricing_table(con, prices)
    con.execute(SNAPSHOT_MACRO)
    con.execute(COSTS_VIEW)
    return con


def _create_results_view(con: duckdb.DuckDBPyConnection, out_dir: Path) -> None:
    """``results``: an empty table with our schema, unioned by name with the part files.

    The empty table pins every column and type, so queries work before the first run
    and over old parts that lack a newer column. Part files are globbed at query
    time, so a long-lived connection sees parts written after it opened.
    """
    con.register("result_schema_arrow", RESULT_SCHEMA.empty_table())
    con.execute("CREATE TABLE result_schema AS SELECT * FROM result_schema_arrow")
    con.unregister("result_schema_arrow")
    results_dir = out_dir / "results"
    if any(results_dir.rglob("*.parquet")):
        pattern = _sql_string(f"{results_dir}/**/*.parquet")
        con.execute(
            f"""
            CREATE VIEW results AS
            SELECT * FROM result_schema
            UNION ALL BY NAME
            SELECT * FROM read_parquet({pattern}, union_by_name = true, hive_partitioning = false)
            """
        )
    else:
        con.execute("CREATE VIEW results AS SELECT * FROM result_schema")


def _create_pricing_table(con: duckdb.DuckDBPyConnection, prices: PriceTable) -> None:
    rows = [
        {
            "model": p.model,
            "provider": p.provider,
            "input_per_mtok": p.rates.input_per_mtok,
            "cached_input_per_mtok": p.rates.cached_input_per_mtok,
            "output_per_mtok": p.rates.output_per_mtok,
            "long_context_threshold": p.long_context_threshold,
            "long_input_per_mtok": p.long_rates.input_per_mtok if p.long_rates else None,
            "long_cached_input_per_mtok": (
                p.long_rates.cached_input_per_mtok if p.long_rates else None
            ),
            "long_output_per_mtok": p.long_rates.output_per_mtok if p.long_rates else None,
            "valid_from": p.valid_from,
            "source": p.source,
        }
        for p in prices.prices
    ]
    con.register("pricing_arrow", pa.Table.from_pylist(rows, schema=PRICING_SCHEMA))
    con.execute("CREATE TABLE pricing AS SELECT * FROM pricing_arrow")
    con.unregister("pricing_arrow")


# -------------------------------------------------------------------------- report


def report(
    out_dir: str | Path,
    by: list[str],
    fmt: str,
    pricing_file: str | Path | None = None,
    since: str | date | datetime | None = None,
    until: str | date | datetime | None = None,
) -> str:
    """The cost and usage report, one line per group plus a total, as text.

    ``by``: any of model, provider, day, run, status, or a metadata key (``metadata.KEY``
    reaches a key that shares one of those names); items may be comma-separated; empty
    means ``model``. ``since`` (inclusive) and ``until`` (exclusive) are dates or ISO
    times on ``finished_at``; without a time zone they are UTC.
    """
    _check_format(fmt, FORMATS)
    groups_by = _grouping(by)
    where, params = _time_filter(since, until)
    con = open_views(out_dir, pricing_file)
    try:
        keys = ", ".join(f"{expr} AS {_sql_ident(name)}" for name, expr in groups_by)
        order = ", ".join(f"{expr} NULLS LAST" for _, expr in groups_by)
        groups = _fetch(
            con,
            f"SELECT {keys}, {AGGREGATES} FROM costs {where} GROUP BY ALL ORDER BY {order}",
            params,
        )
        total = _fetch(con, f"SELECT {AGGREGATES} FROM costs {where}", params)[0]
        unpriced = _fetch(con, UNPRICED_MODELS.format(where=where or "WHERE true"), params)
    finally:
        con.close()

    names = [name for name, _ in groups_by]
    if fmt == "json":  # the groups only: a consumer sums them if it wants a total
        return _json([{**{n: g[n] for n in names}, **{k: g[k] for k in JSON_KEYS}} for g in groups])
    if fmt == "csv":
        columns = [*names, *(c for c, _, _ in REPORT_COLUMNS), *CSV_EXTRA_COLUMNS]
        total_row = {**total, names[0]: "TOTAL"}
        return _csv(columns, [[row.get(c) for c in columns] for row in [*groups, total_row]])

    headers = [*names, *(h for _, h, _ in REPORT_COLUMNS)]
    right = [False] * len(names) + [True] * len(REPORT_COLUMNS)
    cells = [_report_cells(names, g) for g in groups]
    total_cells = ["TOTAL", *[""] * (len(names) - 1), *_report_cells([], total)]
    notes = _unpriced_notes(unpriced, total)
    if not groups:
        notes.insert(0, f"No results in {Path(out_dir) / 'results'} yet.")
    if fmt == "markdown":
        bold_total = [f"**{c}**" if c else c for c in total_cells]
        table = _markdown(headers, [*cells, bold_total], right)
        return "\n\n".join([table, *(f"> **{n}**" for n in notes)])
    return "\n".join([_text_table(headers, cells, right, total_cells), *notes])


def _grouping(by: Sequence[str]) -> list[tuple[str, str]]:
    """(name as the user gave it, SQL expression over ``costs``) for each --by item."""
    names = [part.strip() for item in by for part in item.split(",") if part.strip()] or ["model"]
    if len(set(names)) != len(names):
        raise ReportError(f"--by names a group twice: {', '.join(names)}")
    clash = [n for n in names if n in JSON_KEYS]
    if clash:
        raise ReportError(
            f"--by {clash[0]} is a report column; for the metadata key, write metadata.{clash[0]}"
        )
    return [(name, DIMENSIONS.get(name) or _metadata_expr(name)) for name in names]


def _metadata_expr(name: str) -> str:
    key = name.removeprefix("metadata.")
    if not key:
        raise ReportError(f"--by {name!r}: give a metadata key after 'metadata.'")
    path = '$."' + key.replace("\\", "\\\\").replace('"', '\\"') + '"'
    # try(): a row whose metadata is not JSON groups under NULL instead of failing.
    return f"try(json_extract_string(metadata, {_sql_string(path)}))"


def _time_filter(
    since: str | date | datetime | None, until: str | date | datetime | None
) -> tuple[str, list[datetime]]:
    """A WHERE clause on finished_at, ``since <= finished_at < until``, and its parameters.

    Half-open, so ``--since 2026-05-01 --until 2026-06-01`` is exactly May.
    """
    conditions, params = [], []
    if since is not None:
        conditions.append("finished_at >= ?")
        params.append(_as_utc(_parse_when("since", since)))
    if until is not None:
        conditions.append("finished_at < ?")
        params.append(_as_utc(_parse_when("until", until)))
    return ("WHERE " + " AND ".join(conditions) if conditions else ""), params


def _parse_when(option: str, value: str | date | datetime) -> date | datetime:
    if not isinstance(value, str):
        return value
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise ReportError(
            f"--{option} {value!r}: give a date like 2026-05-01 or a time like 2026-05-01T12:00"
        ) from None


def _as_utc(when: date | datetime) -> datetime:
    """A naive time or a date is taken as UTC, like every timestamp in the results."""
    if not isinstance(when, datetime):
        when = datetime.combine(when, time())
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def _report_cells(names: list[str], row: dict[str, Any]) -> list[str]:
    cells = ["(none)" if row.get(n) is None else _plain(row[n]) for n in names]
    for column, _, kind in REPORT_COLUMNS:
        value = row[column]
        if kind == _COST:
            cells.append(_cost_cell(row))
        elif value is None:
            cells.append("-")
        elif kind == _COUNT:
            cells.append(f"{value:,}")
        elif kind == _SHARE:
            cells.append(f"{value:.1%}")
        else:
            cells.append(f"{value:,.0f}")
    return cells


def _cost_cell(row: dict[str, Any]) -> str:
    """Never $0 for what has no price: say UNPRICED, with the priced part if any."""
    if not row["unpriced"]:
        return f"{row['cost_usd']:,.6f}"
    if row["unpriced_requests"] == row["requests"]:
        return "UNPRICED"
    return f"{row['priced_cost_usd']:,.6f} + UNPRICED"


def _unpriced_notes(missing: list[dict[str, Any]], total: dict[str, Any]) -> list[str]:
    notes = [
        f"UNPRICED: model {m['model']!r}"
        + (f" (provider {m['provider']!r})" if m["provider"] else "")
        + f" has no price; its cost is not included ({m['requests']:,} requests, "
        f"{m['prompt_tokens']:,} prompt + {m['completion_tokens']:,} completion tokens)."
        for m in missing
    ]
    if notes:
        notes.append(
            f"UNPRICED: the priced rows cost ${total['priced_cost_usd']:,.6f}; add the models "
            "above to a price file and pass it with --pricing FILE (columns as in the shipped "
            "pipeline/prices.csv)."
        )
    return notes


# ----------------------------------------------------------------------------- sql


def sql(out_dir: str | Path, query: str, fmt: str, pricing_file: str | Path | None = None) -> str:
    """Run one DuckDB query over the views and return its result as text."""
    _check_format(fmt, FORMATS)
    con = open_views(out_dir, pricing_file)
    try:
        try:
            columns, rows = _query(con, query)
        except duckdb.Error as exc:
            raise ReportError(f"query failed: {exc}") from exc
    finally:
        con.close()
    if not columns:
        return ""
    if fmt == "json":
        return _json([dict(zip(columns, r, strict=True)) for r in rows])
    if fmt == "csv":
        return _csv(columns, rows)
    cells = [["NULL" if v is None else _plain(v) for v in r] for r in rows]
    right = [_is_numeric([r[i] for r in rows]) for i in range(len(columns))]
    if fmt == "markdown":
        return _markdown(columns, cells, right)
    return _text_table(columns, cells, right) + f"\n({len(rows)} row{'s' * (len(rows) != 1)})"


def _is_numeric(values: list[Any]) -> bool:
    present = [v for v in values if v is not None]
    return bool(present) and all(
        isinstance(v, int | float | Decimal) and not isinstance(v, bool) for v in present
    )


# ------------------------------------------------------------------------- helpers


def _check_format(fmt: str, allowed: Sequence[str]) -> None:
    if fmt not in allowed:
        raise ReportError(f"unknown format {fmt!r}; use one of {', '.join(allowed)}")


def _fetch(con: duckdb.DuckDBPyConnection, query: str, params: list[Any]) -> list[dict[str, Any]]:
    """Rows as dicts, for our own queries, whose column names are unique."""
    columns, rows = _query(con, query, params)
    return [dict(zip(columns, row, strict=True)) for row in rows]


def _query(
    con: duckdb.DuckDBPyConnection, query: str, params: list[Any] | None = None
) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Column names and rows (tuples, since a user's join may repeat a column name).

    Rows come through Arrow: DuckDB's own fetchall needs pytz for TIMESTAMPTZ values,
    which is not a dependency. Arrow gives integral DECIMALs (e.g. HUGEINT sums of
    token counts) as Decimal; they are made ints again.
    """
    relation = con.sql(query, params=params)
    if relation is None:  # a statement without a result, e.g. CREATE TABLE
        return [], []
    table = relation.to_arrow_table()
    values = [[_integral(v) for v in column.to_pylist()] for column in table.columns]
    return list(table.column_names), list(zip(*values, strict=True))


def _integral(value: Any) -> Any:
    if isinstance(value, Decimal) and value.is_finite() and value.as_tuple().exponent == 0:
        return int(value)
    return value


def _sql_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _sql_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _plain(value: Any) -> str:
    """A value as one cell of text: ISO dates, JSON for lists and structs."""
    if isinstance(value, date | datetime | time):
        return value.isoformat()
    if isinstance(value, list | dict):
        return json.dumps(_jsonable(value), ensure_ascii=False)
    return str(value)


def _jsonable(value: Any) -> Any:
    """DuckDB's Python values as JSON values (NaN and infinities become null)."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float | Decimal):
        number = float(value)
        return number if math.isfinite(number) else None
    if isinstance(value, date | datetime | time):
        return value.isoformat()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


def _json(rows: list[dict[str, Any]]) -> str:
    return json.dumps([_jsonable(r) for r in rows], indent=2, ensure_ascii=False)


def _csv(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
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
    return _plain(value)


def _text_table(
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


def _markdown(headers: Sequence[str], rows: list[list[str]], right: Sequence[bool]) -> str:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    align = ["---:" if r else "---" for r in right]
    return "\n".join([line(headers), "|" + "|".join(align) + "|", *(line(r) for r in rows)])
