"""``pipeline report``: the cost and usage report, grouped and filtered, with its notes.

One query over the ``costs`` view (``views.py``) per report: the same aggregates
(``AGGREGATES``) for each group and for the total line, so a total is always the sum
its groups show. The report covers every row of ``results`` (not ``latest``): a row
that failed and was retried in a later run was sent, and possibly billed, twice.

A cost that is not known is never shown as $0: a group with a model that has no price
(UNPRICED) or with billed answers that came without token counts (NO USAGE) has a NULL
cost, its priced part is shown beside the flag, and notes name the models behind it.

``--by`` names either a column (model, provider, day, run, status, service_tier) or
a key of the metadata JSON; a key is bound as a value, and the output column takes the name the
user gave through ``sql_ident``. ``--since`` / ``--until`` are bound as parameters.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, date, datetime, time
from pathlib import Path
from typing import Any

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
from pipeline.query.views import fetch_dicts, open_views, sql_ident

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
    "service_tier": "service_tier",  # as recorded: NULL when the server reported none
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
    billed_tier,
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


def report(
    out_dir: str | Path,
    by: list[str],
    fmt: str,
    pricing_file: str | Path | None = None,
    since: str | date | datetime | None = None,
    until: str | date | datetime | None = None,
) -> str:
    """The cost and usage report, one line per group plus a total, as text.

    ``by``: any of model, provider, day, run, status, service_tier, or a metadata key
    (``metadata.KEY`` reaches a key that shares one of those names); items may be
    comma-separated; empty means ``model``. ``since`` (inclusive) and ``until``
    (exclusive) are dates or ISO times on ``finished_at``; without a time zone they
    are UTC.
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
    check_format(fmt, FORMATS)
    groups_by = _grouping(by)
    where, params = _time_filter(since, until)
    con = open_views(out_dir, pricing_file)
    try:
        # Metadata keys are bound as values: each key expression appears once, in the
        # select list, and the ORDER BY names its output column.
        keys = ", ".join(f"{expr} AS {sql_ident(name)}" for name, expr, _ in groups_by)
        key_params = [p for _, _, p in groups_by if p is not None]
        order = ", ".join(f"{sql_ident(name)} NULLS LAST" for name, _, _ in groups_by)
        groups = fetch_dicts(
            con,
            f"SELECT {keys}, {AGGREGATES} FROM costs {where} GROUP BY ALL ORDER BY {order}",
            [*key_params, *params],
        )
        total = fetch_dicts(con, f"SELECT {AGGREGATES} FROM costs {where}", params)[0]
        unpriced = fetch_dicts(con, UNPRICED_MODELS.format(where=where or "WHERE true"), params)
        no_usage = fetch_dicts(con, NO_USAGE_MODELS.format(where=where or "WHERE true"), params)
    finally:
        con.close()

    names = [name for name, _, _ in groups_by]
    notes = [*_unpriced_notes(unpriced, total), *_no_usage_notes(no_usage, total)]
    if fmt == "json":  # the groups only: a consumer sums them if it wants a total
        rows = [{**{n: g[n] for n in names}, **{k: g[k] for k in JSON_KEYS}} for g in groups]
        return to_json(rows), notes
    if fmt == "csv":
        columns = [*names, *(c for c, _, _ in REPORT_COLUMNS), *CSV_EXTRA_COLUMNS]
        total_row = {**total, names[0]: "TOTAL"}
        rows_out = [[row.get(c) for c in columns] for row in [*groups, total_row]]
        return to_csv(columns, rows_out), notes

    headers = [*names, *(h for _, h, _ in REPORT_COLUMNS)]
    right = [False] * len(names) + [True] * len(REPORT_COLUMNS)
    cells = [_report_cells(names, g) for g in groups]
    total_cells = ["TOTAL", *[""] * (len(names) - 1), *_report_cells([], total)]
    shown = list(notes)
    if not groups:
        shown.insert(0, f"No results in {Path(out_dir) / 'results'} yet.")
    if fmt == "markdown":
        bold_total = [f"**{c}**" if c else c for c in total_cells]
        table = markdown_table(headers, [*cells, bold_total], right)
        return "\n\n".join([table, *(f"> **{n}**" for n in shown)]), notes
    return "\n".join([text_table(headers, cells, right, total_cells), *shown]), notes


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
    cells = ["(none)" if row.get(n) is None else plain(row[n]) for n in names]
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
        + (f" at service tier {m['billed_tier']!r}" if m["billed_tier"] else "")
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
