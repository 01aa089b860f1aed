"""``pipeline report OUT --html FILE``: the cost report as a page people would rather look at.

One self-contained HTML file: inline CSS and inline SVG charts, no JavaScript, no
fonts or images from anywhere, so it opens from a mail attachment, a CI artifact or
an air-gapped laptop and shows the same thing. Tooltips are SVG ``<title>`` elements,
which every browser shows on hover without a script. The charts themselves are drawn
in ``charts.py``; this module fetches the numbers and lays out the page around them.

The numbers come from the same DuckDB views and the same aggregate SQL as
``pipeline report`` (``views.open_views``, ``report.AGGREGATES``), so the page and
the table can never disagree. Like the table report it covers every result row
(retries included: they were sent, and possibly billed). A model without a price is
never drawn as $0: its bars show the priced part and say UNPRICED, and a banner lists
what is missing. Answers that were billed but came without token counts are treated the
same way: NO USAGE on their bars and cells, and a banner that counts them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb

from pipeline.query.charts import (
    COLORS,
    TOKEN_SERIES,
    Bar,
    bar_chart,
    column_chart,
    compact,
    legend,
    stacked_chart,
    usd_axis,
)
from pipeline.query.charts import escape as _e
from pipeline.query.report import (
    AGGREGATES,
    DIMENSIONS,
    NO_USAGE_MODELS,
    UNPRICED_MODELS,
    cost_flags,
)
from pipeline.query.views import open_views

# Above this many days the cost-over-time chart shows months: 400 bars are unreadable.
MAX_DAY_BARS = 120


def write_html_report(
    out_dir: str | Path, path: str | Path, pricing_file: str | Path | None = None
) -> None:
    """Write the HTML cost report for the results in ``out_dir`` to ``path``.

    Raises PricingError (a UsageError) when the price table is bad, as ``report`` does.
    """
    data = _load(Path(out_dir), pricing_file)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(render(data), encoding="utf-8")


# ------------------------------------------------------------------------ the data


@dataclass
class ReportData:
    """Everything the page shows, fetched in one DuckDB session."""

    out_dir: str
    price_table: str
    total: dict[str, Any]
    by_model: list[dict[str, Any]]
    by_day: list[dict[str, Any]]
    error_types: list[dict[str, Any]]
    unpriced: list[dict[str, Any]]
    no_usage: list[dict[str, Any]]
    first: datetime | None
    last: datetime | None


def _load(out_dir: Path, pricing_file: str | Path | None) -> ReportData:
    con = open_views(out_dir, pricing_file)
    try:
        total = _rows(con, f"SELECT {AGGREGATES} FROM costs")[0]
        by_model = _rows(
            con,
            f"SELECT {DIMENSIONS['model']} AS model, {AGGREGATES} FROM costs "
            "GROUP BY ALL ORDER BY priced_cost_usd DESC, requests DESC, model NULLS LAST",
        )
        by_day = _rows(
            con,
            f"SELECT {DIMENSIONS['day']} AS day, {AGGREGATES} FROM costs "
            "GROUP BY ALL ORDER BY day NULLS LAST",
        )
        error_types = _rows(
            con,
            """
            SELECT coalesce(error_type, 'unknown') AS error_type, count(*) AS requests
            FROM costs WHERE status = 'error'
            GROUP BY ALL ORDER BY requests DESC, error_type LIMIT 12
            """,
        )
        unpriced = _rows(con, UNPRICED_MODELS.format(where="WHERE true"))
        no_usage = _rows(con, NO_USAGE_MODELS.format(where="WHERE true"))
        span = _rows(con, "SELECT min(finished_at) AS first, max(finished_at) AS last FROM costs")
        price_table = _rows(con, "SELECT count(*) AS n FROM pricing")[0]["n"]
    finally:
        con.close()
    from pipeline.pricing import SHIPPED_PRICES

    return ReportData(
        out_dir=str(out_dir),
        price_table=f"{pricing_file or SHIPPED_PRICES} ({price_table} prices)",
        total=total,
        by_model=by_model,
        by_day=by_day,
        error_types=error_types,
        unpriced=unpriced,
        no_usage=no_usage,
        first=span[0]["first"],
        last=span[0]["last"],
    )


def _rows(con: duckdb.DuckDBPyConnection, query: str) -> list[dict[str, Any]]:
    """Rows as dicts through Arrow (DuckDB's fetchall would need pytz for timestamps);
    integral DECIMAL sums become ints and the rest floats."""
    table = con.sql(query).to_arrow_table()
    return [{k: _plain(v) for k, v in row.items()} for row in table.to_pylist()]


def _plain(value: Any) -> Any:
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    return value


# ------------------------------------------------------------------------- numbers


def _usd(value: float | None) -> str:
    if value is None:
        return "UNPRICED"
    if value >= 100:
        return f"${value:,.2f}"
    if value >= 1:
        return f"${value:,.3f}"
    if value == 0:
        return "$0"
    return f"${value:.6f}".rstrip("0")


def _cost_text(row: dict[str, Any]) -> str:
    """Never $0 for what has no known cost: the priced part, then UNPRICED / NO USAGE."""
    flags = cost_flags(row)
    if not flags:
        return _usd(row["cost_usd"])
    if row["costed_requests"] == 0 or not row["priced_cost_usd"]:
        return " + ".join(flags)
    return " + ".join([_usd(row["priced_cost_usd"]), *flags])


def _incomplete(row: dict[str, Any]) -> bool:
    """True when some of the row's cost is not known (unpriced, or without usage)."""
    return bool(cost_flags(row))


def _count(value: int | float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


# --------------------------------------------------------------------------- page


def _time_bars(by_day: list[dict[str, Any]]) -> tuple[str, list[Bar]]:
    """Cost per day from the first day to the last, quiet days as zero bars; per month
    when the span is too long for day bars to be read."""
    dated = [r for r in by_day if r["day"] is not None]
    if not dated:
        return "day", []
    first, last = dated[0]["day"], dated[-1]["day"]
    per_month = (last - first).days + 1 > MAX_DAY_BARS
    buckets: dict[str, dict[str, Any]] = {}
    if per_month:
        month = date(first.year, first.month, 1)
        while month <= last:
            buckets[month.strftime("%Y-%m")] = {}
            month = date(month.year + month.month // 12, month.month % 12 + 1, 1)
    else:
        day = first
        while day <= last:
            buckets[day.isoformat()] = {}
            day += timedelta(days=1)
    for r in dated:
        key = r["day"].strftime("%Y-%m") if per_month else r["day"].isoformat()
        b = buckets[key]
        b["cost"] = b.get("cost", 0.0) + r["priced_cost_usd"]
        b["requests"] = b.get("requests", 0) + r["requests"]
        b["unpriced"] = b.get("unpriced", False) or _incomplete(r)
        b["flags"] = sorted({*b.get("flags", ()), *cost_flags(r)}, reverse=True)
    bars = []
    for key, b in buckets.items():
        cost = b.get("cost", 0.0)
        text = f"{key}: {_usd(cost)}" + "".join(f" + {f}" for f in b.get("flags", ()))
        bars.append(
            Bar(
                label=key if per_month else key[5:],
                value=cost,
                tooltip=f"{text} ({b.get('requests', 0):,} requests)",
                flagged=bool(b.get("unpriced")),
            )
        )
    return ("month" if per_month else "day"), bars


def _model_name(row: dict[str, Any]) -> str:
    return "(no model)" if row["model"] is None else str(row["model"])


def _card(
    label: str, value: str, card_id: str, data_value: Any, sub: str = "", *, bad: bool = False
) -> str:
    """A headline number; ``data-value`` holds it unrounded for scripts and tests."""
    data = "" if data_value is None else f' data-value="{_e(data_value)}"'
    flag = " bad" if bad else ""
    return (
        f'<div class="card{flag}" id="{card_id}"{data}><div class="k">{_e(label)}</div>'
        f'<div class="v">{_e(value)}</div><div class="s">{_e(sub)}</div></div>'
    )


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], numeric_from: int = 1) -> str:
    head = "".join(
        f'<th class="{"num" if i >= numeric_from else ""}">{_e(h)}</th>'
        for i, h in enumerate(headers)
    )
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="{"num" if i >= numeric_from else ""}'
            f'{" bad" if str(c).endswith(("UNPRICED", "NO USAGE")) else ""}">{_e(c)}</td>'
            for i, c in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


CSS = """
*{box-sizing:border-box}
body{margin:0;background:#f3f4f6;color:#111827;
font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
main{max-width:1080px;margin:0 auto;padding:28px 24px 48px}
h1{font-size:26px;margin:0 0 4px}h2{font-size:18px;margin:0 0 12px}
.meta{color:#6b7280;margin-bottom:20px}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(160px,1fr));gap:12px;
margin-bottom:20px}
.card{background:#fff;border-radius:10px;padding:14px 16px;box-shadow:0 1px 2px #0000001a}
.card .k{color:#6b7280;font-size:13px}.card .v{font-size:24px;font-weight:650;margin-top:2px}
.card .s{color:#6b7280;font-size:12px;min-height:16px}.card.bad .v,.card.bad .s{color:#dc2626}
section{background:#fff;border-radius:10px;padding:18px 20px;margin-bottom:18px;
box-shadow:0 1px 2px #0000001a}
.banner{background:#fef2f2;border:1px solid #fecaca;color:#991b1b;border-radius:10px;
padding:14px 18px;margin-bottom:18px}
.banner b{display:block;margin-bottom:4px}.banner ul{margin:4px 0 0 18px;padding:0}
svg.chart{width:100%;height:auto;display:block}
svg text{font:12px system-ui,-apple-system,"Segoe UI",Roboto,Arial,sans-serif;fill:#374151}
svg text.tick{fill:#6b7280;font-size:11px}svg text.label{font-size:13px}
svg text.value{font-size:12px;fill:#111827}svg text.flag{fill:#dc2626;font-weight:700}
.legend{display:flex;gap:18px;flex-wrap:wrap;margin:0 0 8px;font-size:13px;color:#374151}
.legend i{display:inline-block;width:12px;height:12px;border-radius:3px;margin-right:6px;
vertical-align:-1px}
.legend i.hatch{background:repeating-linear-gradient(45deg,#dc2626 0 2px,#fee2e2 2px 5px)}
table{border-collapse:collapse;width:100%;font-size:13px}
th,td{padding:6px 8px;border-bottom:1px solid #e5e7eb;text-align:left;white-space:nowrap}
th{color:#6b7280;font-weight:600}td.num,th.num{text-align:right;
font-variant-numeric:tabular-nums}td.bad{color:#dc2626;font-weight:600}
.two{display:grid;grid-template-columns:1fr 1fr;gap:18px}
.note{color:#6b7280;font-size:12px;margin-top:8px}
.empty{color:#6b7280;padding:24px 0;text-align:center}
"""


def render(data: ReportData) -> str:
    """The whole page as one HTML string."""
    t = data.total
    generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    span = ""
    if data.first and data.last:
        span = f" · results from {data.first:%Y-%m-%d} to {data.last:%Y-%m-%d} (UTC)"
    head = (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>pipeline cost report · {_e(data.out_dir)}</title><style>{CSS}</style></head>"
        f'<body><main><h1>Cost report</h1><div class="meta">{_e(data.out_dir)}{_e(span)}'
        f" · prices: {_e(data.price_table)} · generated {generated}</div>"
    )
    if not t["requests"]:
        empty = f'<section><div class="empty">No results in {_e(data.out_dir)}/results yet.'
        return head + empty + "</div></section></main></body></html>"

    incomplete = _incomplete(t)
    cost_value = t["cost_usd"] if not incomplete else None
    missing = [
        *(["UNPRICED models"] if t["unpriced"] else []),
        *([f"{t['no_usage']:,} answers without usage"] if t["no_usage"] else []),
    ]
    cards = "".join(
        [
            _card(
                "total cost",
                f"≥ {_usd(t['priced_cost_usd'])}" if incomplete else _usd(t["cost_usd"]),
                "total-cost",
                cost_value,
                f"+ {' + '.join(missing)} (not included)" if missing else "",
                bad=incomplete,
            ),
            _card(
                "requests",
                _count(t["requests"]),
                "total-requests",
                t["requests"],
                f"{t['ok']:,} ok · {t['errors']:,} errors",
            ),
            _card(
                "error rate",
                _share(t["error_rate"]),
                "error-rate",
                t["error_rate"],
                f"{t['errors']:,} of {t['requests']:,}",
            ),
            _card(
                "prompt tokens",
                compact(t["prompt_tokens"]),
                "total-prompt-tokens",
                t["prompt_tokens"],
                f"{_share(t['cache_hit_share'])} cached",
            ),
            _card(
                "completion tokens",
                compact(t["completion_tokens"]),
                "total-completion-tokens",
                t["completion_tokens"],
                f"{_share(t['reasoning_share'])} reasoning",
            ),
        ]
    )
    sections = [f'<div class="cards">{cards}</div>']
    if data.unpriced:
        items = "".join(
            f'<li><b style="display:inline">{_e(u["model"])}</b>'
            + (f" (provider {_e(u['provider'])})" if u["provider"] else "")
            + (f" at service tier {_e(u['billed_tier'])}" if u.get("billed_tier") else "")
            + f": {u['requests']:,} requests, {u['prompt_tokens']:,} prompt + "
            f"{u['completion_tokens']:,} completion tokens</li>"
            for u in data.unpriced
        )
        sections.append(
            '<div class="banner" id="unpriced"><b>UNPRICED: these models have no price, so '
            "their cost is not in any total below (never counted as $0).</b>"
            f"<ul>{items}</ul>Add them to a price file and pass it with --pricing FILE.</div>"
        )
    if data.no_usage:
        items = "".join(
            f'<li><b style="display:inline">{_e(u["model"])}</b>'
            + (f" (provider {_e(u['provider'])})" if u["provider"] else "")
            + f": {u['requests']:,} answers</li>"
            for u in data.no_usage
        )
        sections.append(
            f'<div class="banner" id="no-usage"><b>NO USAGE: {t["no_usage"]:,} answers were '
            "billed but came without token counts, so their cost is not in any total below "
            f"(never counted as $0).</b><ul>{items}</ul>Check the provider's invoice for "
            "them: they are the rows of the costs view WHERE no_usage.</div>"
        )

    unit, time_bars = _time_bars(data.by_day)
    hatch_legend = (
        [("hatch", "has rows without a known cost (priced part shown)")] if incomplete else []
    )
    sections.append(
        f"<section><h2>Cost by {unit}</h2>"
        + legend([(COLORS["cost"], "cost (USD)"), *hatch_legend])
        + column_chart(time_bars, usd_axis, f"cost-by-{unit}")
        + "</section>"
    )
    model_bars = [
        Bar(
            label=_model_name(r),
            value=r["priced_cost_usd"],
            tooltip=f"{_model_name(r)}: {_cost_text(r)} ({r['requests']:,} requests)",
            flagged=_incomplete(r),
            note=_cost_text(r),
        )
        for r in data.by_model
    ]
    sections.append(
        "<section><h2>Cost by model</h2>" + bar_chart(model_bars, "cost-by-model") + "</section>"
    )

    def mix(r: dict[str, Any]) -> dict[str, float]:
        return {
            "uncached": float(r["prompt_tokens"] - r["cached_tokens"]),
            "cached": float(r["cached_tokens"]),
            "output": float(r["completion_tokens"] - r["reasoning_tokens"]),
            "reasoning": float(r["reasoning_tokens"]),
        }

    token_rows = [(_model_name(r), mix(r)) for r in data.by_model]
    if len(token_rows) > 1:
        token_rows.append(("TOTAL", mix(t)))
    sections.append(
        "<section><h2>Tokens by type</h2>"
        + legend([(COLORS[k], name) for k, name in TOKEN_SERIES])
        + stacked_chart(token_rows, "tokens-by-type")
        + '<div class="note">Each bar is 100% of that model\'s tokens. Reasoning tokens are '
        "part of completion tokens and billed as output.</div></section>"
    )

    error_bars = [
        Bar(
            label=_model_name(r),
            value=r["error_rate"] or 0.0,
            tooltip=f"{_model_name(r)}: {r['errors']:,} errors of {r['requests']:,}",
            note=f"{_share(r['error_rate'])} ({r['errors']:,} of {r['requests']:,})",
        )
        for r in data.by_model
    ]
    error_table = (
        _table(
            ["error type", "requests"],
            [[e["error_type"], f"{e['requests']:,}"] for e in data.error_types],
        )
        if data.error_types
        else '<div class="empty">No errors.</div>'
    )
    sections.append(
        f"<section><h2>Errors · {_share(t['error_rate'])} of requests</h2>"
        + bar_chart(error_bars, "error-rate-by-model", color=COLORS["error"])
        + f'<h2 style="margin-top:16px">By type</h2>{error_table}</section>'
    )

    model_rows = [
        [
            _model_name(r),
            f"{r['requests']:,}",
            f"{r['ok']:,}",
            f"{r['errors']:,}",
            _share(r["error_rate"]),
            f"{r['prompt_tokens']:,}",
            f"{r['cached_tokens']:,}",
            f"{r['completion_tokens']:,}",
            f"{r['reasoning_tokens']:,}",
            _cost_text(r),
        ]
        for r in [*data.by_model, {**t, "model": "TOTAL"}]
    ]
    sections.append(
        "<section><h2>By model</h2>"
        + _table(
            [
                "model",
                "requests",
                "ok",
                "errors",
                "err%",
                "prompt",
                "cached",
                "completion",
                "reasoning",
                "cost",
            ],
            model_rows,
        )
        + '<div class="note">Every result row counts, retries included: a row that failed '
        "and was sent again was billed twice. Same numbers as <code>pipeline report</code>."
        "</div></section>"
    )
    return head + "".join(sections) + "</main></body></html>"
