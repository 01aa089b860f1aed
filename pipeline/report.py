"""DuckDB views over a results folder, the cost report and ad-hoc SQL.

``open_views`` gives an in-memory DuckDB connection with these views:

- ``results``: every row of ``OUT/results/**/*.parquet``, one per job per run that
  reached an outcome. Always has every column of ``schema.RESULT_SCHEMA`` with its
  type (also before the first run, and for part files written before a column
  existed); carried input columns follow.
- ``latest``: the newest row per ``id`` (by ``finished_at``), i.e. where each input
  row stands now.
- ``pricing``: the price table in use (the shipped ``prices.csv`` or ``--pricing``).
- ``costs``: ``results`` with the matched price row and ``cost_usd`` / ``unpriced`` /
  ``no_usage``.

The SQL below is the arithmetic users are asked to trust, so it is written to be
read; ``pipeline sql OUT "SELECT ..."`` can query the same views. Timestamps are UTC:
the connection's time zone is set to UTC, so ``CAST(finished_at AS DATE)`` is the UTC
day, as pricing.py uses.

The report covers every row of ``results`` (not ``latest``): a row that failed and was
retried in a later run was sent, and possibly billed, twice.

Nothing that comes from data or from the command line becomes SQL text: values (dates,
metadata keys, file lists, target files) are bound as parameters, and the few
identifiers taken from outside (``--by`` names) go through ``sql_ident``. OUT may be
named with quotes, spaces or glob characters: its part files are listed here, in
Python, and handed to DuckDB as literal file names (``duckdb_file_list``).
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Iterable, Sequence
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

# A rejected answer that was asked again (``superseded``) is billed but is no outcome:
# an id whose re-ask never came back is pending, as resume sees it.
LATEST_VIEW = """
CREATE VIEW latest AS
SELECT *
FROM results
WHERE superseded IS NOT TRUE
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
WITH result_rows AS (
    -- Carried input columns are named by the data. One that shares a name (in any
    -- case) with a column this view adds is left out here, though it stays in
    -- `results`, so the arithmetic below always reads its own columns.
    SELECT COLUMNS(lambda c: lower(c) NOT IN (
        'price_model', 'price_provider', 'price_valid_from', 'price_source',
        'input_per_mtok', 'cached_input_per_mtok', 'output_per_mtok',
        'long_context_threshold', 'long_input_per_mtok', 'long_cached_input_per_mtok',
        'long_output_per_mtok', 'long_context', 'no_tokens', 'no_usage', 'cost_usd',
        'unpriced'))
    FROM results
),
price_keys AS (
    -- A price depends on these alone, so each distinct combination is matched once
    -- (a few hundred lookups rather than one per row).
    SELECT DISTINCT model, response_model, provider, CAST(finished_at AS DATE) AS day
    FROM result_rows
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
        coalesce(r.prompt_tokens, 0) = 0 AND coalesce(r.completion_tokens, 0) = 0 AS no_tokens,
        -- An answer the server billed (ok, or kept as invalid_json) but whose usage
        -- block was missing or incomplete: tokens unknown, so the cost is unknown.
        -- A copy shared from an identical request (shared_from) was not sent at all.
        (r.status = 'ok' OR r.error_type = 'invalid_json')
            AND r.shared_from IS NULL
            AND (r.prompt_tokens IS NULL OR r.completion_tokens IS NULL) AS no_usage
    FROM result_rows AS r
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
    * EXCLUDE (no_tokens, no_usage),
    CASE
        -- A billed answer without its token counts has no known cost: NULL, never $0.
        WHEN no_usage THEN NULL
        -- A row that reported no tokens (e.g. an error before any work) cost nothing.
        WHEN no_tokens THEN 0.0
        -- No price row leaves the rates NULL, so the cost is NULL: never $0.
        -- Reasoning tokens are part of completion_tokens, billed as output.
        ELSE ((coalesce(prompt_tokens, 0) - coalesce(cached_tokens, 0)) * input_per_mtok
              + coalesce(cached_tokens, 0) * cached_input_per_mtok
              + coalesce(completion_tokens, 0) * output_per_mtok) / 1e6
    END AS cost_usd,
    price_model IS NULL AND NOT no_tokens AS unpriced,
    no_usage
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
    -- A group with any unpriced row, or any billed answer without usage, has no known
    -- cost: NULL, never a partial sum.
    CASE WHEN bool_or(unpriced) OR bool_or(no_usage) THEN NULL
         ELSE coalesce(sum(cost_usd), 0) END AS cost_usd,
    coalesce(bool_or(unpriced), false) AS unpriced,
    coalesce(sum(cost_usd), 0) AS priced_cost_usd,
    count(*) FILTER (WHERE unpriced) AS unpriced_requests,
    count(*) FILTER (WHERE no_usage) AS no_usage,
    count(cost_usd) AS costed_requests,
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
    "no_usage",
)
# After REPORT_COLUMNS in CSV, so a spreadsheet can tell a NULL cost from a blank.
CSV_EXTRA_COLUMNS = ("unpriced", "priced_cost_usd", "unpriced_requests", "no_usage")

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

# The models behind the NO USAGE lines: billed answers that came without token counts.
NO_USAGE_MODELS = """
SELECT
    coalesce(model, response_model) AS model,
    provider,
    count(*) AS requests
FROM costs
{where} AND no_usage
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
    and over old parts that lack a newer column. The part files are listed when the
    connection opens (a part written later is seen by the next connection) and reach
    DuckDB as a bound value, never as SQL text: a view cannot hold a prepared
    parameter, so the list is put in a session variable the view reads.
    """
    con.register("result_schema_arrow", RESULT_SCHEMA.empty_table())
    con.execute("CREATE TABLE result_schema AS SELECT * FROM result_schema_arrow")
    con.unregister("result_schema_arrow")
    parts = sorted((out_dir / "results").rglob("*.parquet"))
    if parts:
        con.execute(f"SET VARIABLE {RESULT_PARTS_VARIABLE} = ?", [duckdb_file_list(parts)])
        con.execute(
            f"""
            CREATE VIEW results AS
            SELECT * FROM result_schema
            UNION ALL BY NAME
            SELECT * FROM read_parquet(getvariable('{RESULT_PARTS_VARIABLE}'),
                                       union_by_name = true, hive_partitioning = false)
            """
        )
    else:
        con.execute("CREATE VIEW results AS SELECT * FROM result_schema")


RESULT_PARTS_VARIABLE = "pipeline_result_parts"
_GLOB_CHARACTERS = re.compile(r"([*?\[])")


def duckdb_file_list(paths: Iterable[Path]) -> list[str]:
    """File names DuckDB's readers take literally, to be bound as a parameter.

    DuckDB's readers treat every name they are given as a glob pattern, even inside a
    list, so an OUT called ``a[x]`` would read the parts of ``ax``. Each glob character
    (``*``, ``?``, ``[``) is written as a one-character class (``[*]``), which DuckDB
    matches literally. Names are made absolute, so ``~`` or a relative base never
    changes their meaning. DuckDB's globber cannot match a backslash next to such a
    class, so a name with both is refused rather than read wrongly.
    """
    names = []
    for path in paths:
        name = str(Path(path).absolute())
        if _GLOB_CHARACTERS.search(name) is None:
            names.append(name)
            continue
        if "\\" in name:
            raise ReportError(
                f"{name!r}: DuckDB cannot read a path that holds both a backslash and one "
                "of * ? [; rename the folder"
            )
        names.append(_GLOB_CHARACTERS.sub(r"[\1]", name))
    return names


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
    return report_and_notes(out_dir, by, fmt, pricing_file, since, until)[0]


def report_and_notes(
    out_dir: str | Path,
    by: list[str],
    fmt: str,
    pricing_file: str | Path | None = None,
    since: str | date | datetime | None = None,
    until: str | date | datetime | None = None,
) -> tuple[str, list[str]]:
    """``report``'s text, and the warnings behind it (unpriced models, answers without
    usage) as lines. Table and markdown already print them; a caller asking for csv or
    json shows them on stderr, so a cost that is not complete is never silent."""
    _check_format(fmt, FORMATS)
    groups_by = _grouping(by)
    where, params = _time_filter(since, until)
    con = open_views(out_dir, pricing_file)
    try:
        # Metadata keys are bound as values: each key expression appears once, in the
        # select list, and the ORDER BY names its output column.
        keys = ", ".join(f"{expr} AS {sql_ident(name)}" for name, expr, _ in groups_by)
        key_params = [p for _, _, p in groups_by if p is not None]
        order = ", ".join(f"{sql_ident(name)} NULLS LAST" for name, _, _ in groups_by)
        groups = _fetch(
            con,
            f"SELECT {keys}, {AGGREGATES} FROM costs {where} GROUP BY ALL ORDER BY {order}",
            [*key_params, *params],
        )
        total = _fetch(con, f"SELECT {AGGREGATES} FROM costs {where}", params)[0]
        unpriced = _fetch(con, UNPRICED_MODELS.format(where=where or "WHERE true"), params)
        no_usage = _fetch(con, NO_USAGE_MODELS.format(where=where or "WHERE true"), params)
    finally:
        con.close()

    names = [name for name, _, _ in groups_by]
    notes = [*_unpriced_notes(unpriced, total), *_no_usage_notes(no_usage, total)]
    if fmt == "json":  # the groups only: a consumer sums them if it wants a total
        rows = [{**{n: g[n] for n in names}, **{k: g[k] for k in JSON_KEYS}} for g in groups]
        return _json(rows), notes
    if fmt == "csv":
        columns = [*names, *(c for c, _, _ in REPORT_COLUMNS), *CSV_EXTRA_COLUMNS]
        total_row = {**total, names[0]: "TOTAL"}
        rows_out = [[row.get(c) for c in columns] for row in [*groups, total_row]]
        return _csv(columns, rows_out), notes

    headers = [*names, *(h for _, h, _ in REPORT_COLUMNS)]
    right = [False] * len(names) + [True] * len(REPORT_COLUMNS)
    cells = [_report_cells(names, g) for g in groups]
    total_cells = ["TOTAL", *[""] * (len(names) - 1), *_report_cells([], total)]
    shown = list(notes)
    if not groups:
        shown.insert(0, f"No results in {Path(out_dir) / 'results'} yet.")
    if fmt == "markdown":
        bold_total = [f"**{c}**" if c else c for c in total_cells]
        table = _markdown(headers, [*cells, bold_total], right)
        return "\n\n".join([table, *(f"> **{n}**" for n in shown)]), notes
    return "\n".join([_text_table(headers, cells, right, total_cells), *shown]), notes


def _grouping(by: Sequence[str]) -> list[tuple[str, str, str | None]]:
    """(name as the user gave it, SQL expression over ``costs``, the value the
    expression binds or None) for each --by item."""
    names = [part.strip() for item in by for part in item.split(",") if part.strip()] or ["model"]
    if len(set(names)) != len(names):
        raise ReportError(f"--by names a group twice: {', '.join(names)}")
    clash = [n for n in names if n in JSON_KEYS]
    if clash:
        raise ReportError(
            f"--by {clash[0]} is a report column; for the metadata key, write metadata.{clash[0]}"
        )
    grouping: list[tuple[str, str, str | None]] = []
    for name in names:
        if name in DIMENSIONS:
            grouping.append((name, DIMENSIONS[name], None))
        else:
            grouping.append((name, METADATA_EXPR, _metadata_path(name)))
    return grouping


# try(): a row whose metadata is not JSON groups under NULL instead of failing.
METADATA_EXPR = "try(json_extract_string(metadata, CAST(? AS VARCHAR)))"


def _metadata_path(name: str) -> str:
    """The JSON path of one metadata key: the key quoted, so dots, brackets and ``$``
    in it are part of the name."""
    key = name.removeprefix("metadata.")
    if not key:
        raise ReportError(f"--by {name!r}: give a metadata key after 'metadata.'")
    return '$."' + key.replace("\\", "\\\\").replace('"', '\\"') + '"'


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


def cost_flags(row: dict[str, Any]) -> list[str]:
    """Why a group's cost is not known in full: UNPRICED (a model without a price),
    NO USAGE (billed answers that came without token counts)."""
    return [
        *(["UNPRICED"] if row["unpriced"] else []),
        *(["NO USAGE"] if row["no_usage"] else []),
    ]


def _cost_cell(row: dict[str, Any]) -> str:
    """Never $0 for what has no known cost: the flags, after the priced part if any."""
    flags = cost_flags(row)
    if not flags:
        return f"{row['cost_usd']:,.6f}"
    if row["costed_requests"] == 0:
        return " + ".join(flags)
    return " + ".join([f"{row['priced_cost_usd']:,.6f}", *flags])


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


def _no_usage_notes(missing: list[dict[str, Any]], total: dict[str, Any]) -> list[str]:
    """The answers that were billed but came without token counts, by model."""
    notes = [
        f"NO USAGE: {m['requests']:,} answer{'s' * (m['requests'] != 1)} from model "
        f"{m['model']!r}"
        + (f" (provider {m['provider']!r})" if m["provider"] else "")
        + " came without token counts (no usage block); their cost is unknown and not "
        "included, never counted as $0."
        for m in missing
    ]
    if notes:
        notes.append(
            f"NO USAGE: the rows with a known cost come to ${total['priced_cost_usd']:,.6f}; "
            "check the provider's invoice for the rest (they are the rows of the costs "
            "view WHERE no_usage)."
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


def sql_ident(name: str) -> str:
    """A name as a DuckDB identifier: double-quoted, inner quotes doubled.

    The one place an identifier from outside becomes SQL text. DuckDB reads the text
    up to the first NUL, so a name holding one is refused.
    """
    if "\x00" in name:
        raise ReportError(f"{name!r}: a name cannot hold a NUL character")
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
