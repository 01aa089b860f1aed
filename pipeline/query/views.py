"""The DuckDB views over a results folder: where every read of OUT starts.

``open_views`` gives an in-memory DuckDB connection with these views:

- ``results``: every row of ``OUT/results/**/*.parquet``, one per job per run that
  reached an outcome. Always has every column of ``schema.RESULT_SCHEMA`` with its
  type (also before the first run, and for part files written before a column
  existed); carried input columns follow.
- ``latest``: the newest row per ``id`` (by ``finished_at``), i.e. where each input
  row stands now.
- ``pricing``: the price table in use (the shipped ``prices.csv`` or ``--pricing``).
- ``costs``: ``results`` with the matched price row and ``cost_usd`` / ``unpriced`` /
  ``no_usage``, plus ``billed_tier``: the price-table tier the row is billed at (NULL
  for the default tier). Parts written before ``service_tier`` existed read it as
  NULL, so their rows stay priced at the default tier as they always were.

The SQL below is the arithmetic users are asked to trust, so it is written to be
read; ``pipeline sql OUT "SELECT ..."`` can query the same views. Timestamps are UTC:
the connection's time zone is set to UTC, so ``CAST(finished_at AS DATE)`` is the UTC
day, as pricing.py uses.

Nothing that comes from data or from the command line becomes SQL text: values are
bound as parameters, and an identifier taken from outside goes through ``sql_ident``.
OUT may be named with quotes, spaces or glob characters: its part files are listed
here, in Python, and handed to DuckDB as literal file names (``duckdb_file_list``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from pipeline.errors import ReportError as ReportError
from pipeline.pricing import DEFAULT_TIER_NAMES, SNAPSHOT_SUFFIX, PriceTable, load_prices
from pipeline.schema import RESULT_SCHEMA

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
        ("service_tier", pa.string()),  # NULL: the default tier
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

# The price-table tier of a recorded service_tier (pricing.billed_tier): NULL (the
# blank-tier rows) for no tier, 'default' and 'auto'; else the tier in lower case.
BILLED_TIER_MACRO = f"""
CREATE MACRO billed_tier(tier) AS
    CASE WHEN tier IS NULL OR lower(tier) IN ({", ".join(repr(t) for t in DEFAULT_TIER_NAMES)})
         THEN NULL ELSE lower(tier) END
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
        'price_service_tier', 'billed_tier',
        'input_per_mtok', 'cached_input_per_mtok', 'output_per_mtok',
        'long_context_threshold', 'long_input_per_mtok', 'long_cached_input_per_mtok',
        'long_output_per_mtok', 'long_context', 'no_tokens', 'no_usage', 'cost_usd',
        'unpriced')),
        -- The tier the row was billed at, as the price table names it.
        billed_tier(service_tier) AS billed_tier
    FROM results
),
price_keys AS (
    -- A price depends on these alone, so each distinct combination is matched once
    -- (a few hundred lookups rather than one per row).
    SELECT DISTINCT model, response_model, provider, CAST(finished_at AS DATE) AS day,
                    billed_tier
    FROM result_rows
),
matched AS (
    SELECT k.*, price.*
    FROM price_keys AS k
    LEFT JOIN LATERAL (
        -- The one price row: a row of the tier the result was billed at, never
        -- another tier's (no row of that tier: unpriced); the first model name that
        -- has a price (the request model, then without its snapshot date, then the
        -- response model, then without its date); a row for this provider before a
        -- blank-provider row; the newest valid_from on or before the day the result
        -- finished.
        SELECT
            p.model AS price_model,
            p.provider AS price_provider,
            p.valid_from AS price_valid_from,
            p.service_tier AS price_service_tier,
            p.source AS price_source,
            p.* EXCLUDE (model, provider, valid_from, service_tier, source)
        FROM pricing AS p
        WHERE p.service_tier IS NOT DISTINCT FROM k.billed_tier
          AND p.model IN (k.model, without_snapshot(k.model),
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
        m.* EXCLUDE (model, response_model, provider, day, billed_tier),
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
        AND m.billed_tier IS NOT DISTINCT FROM r.billed_tier
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


def open_views(
    out_dir: str | Path, pricing_file: str | Path | None = None
) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with results / latest / pricing / costs views.

    The caller closes it. Nothing is written to OUT: the views read the part files.

    Raises PricingError (a UsageError) when the price table is bad.
    """
    prices = load_prices(pricing_file)
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    _create_results_view(con, Path(out_dir))
    con.execute(LATEST_VIEW)
    _create_pricing_table(con, prices)
    con.execute(SNAPSHOT_MACRO)
    con.execute(BILLED_TIER_MACRO)
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
            "service_tier": p.service_tier,
            "source": p.source,
        }
        for p in prices.prices
    ]
    con.register("pricing_arrow", pa.Table.from_pylist(rows, schema=PRICING_SCHEMA))
    con.execute("CREATE TABLE pricing AS SELECT * FROM pricing_arrow")
    con.unregister("pricing_arrow")


def sql_ident(name: str) -> str:
    """A name as a DuckDB identifier: double-quoted, inner quotes doubled.

    The one place an identifier from outside becomes SQL text. DuckDB reads the text
    up to the first NUL, so a name holding one is refused.
    """
    if "\x00" in name:
        raise ReportError(f"{name!r}: a name cannot hold a NUL character")
    return '"' + name.replace('"', '""') + '"'


def fetch_dicts(
    con: duckdb.DuckDBPyConnection, query: str, params: list[Any]
) -> list[dict[str, Any]]:
    """Rows as dicts, for our own queries, whose column names are unique."""
    columns, rows = run_query(con, query, params)
    return [dict(zip(columns, row, strict=True)) for row in rows]


def run_query(
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
