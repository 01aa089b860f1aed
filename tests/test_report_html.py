"""`pipeline report --html`: one self-contained page whose numbers are report()'s."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from pipeline.query import write_html_report
from pipeline.query.report import report
from pipeline.schema import results_table

DAY = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
PRICES = """\
model,provider,input_per_mtok,cached_input_per_mtok,output_per_mtok,valid_from,source
cheap,,1.00,0.10,4.00,,test
dear,,3.00,0.30,15.00,,test
"""


def _row(i: int, model: str, day: int, **fields: Any) -> dict[str, Any]:
    when = DAY + timedelta(days=day)
    row: dict[str, Any] = {
        "run_id": f"run-{day}",
        "id": f"{model}-{i}",
        "status": "ok",
        "provider": "sim",
        "model": model,
        "prompt_tokens": 1000 + i,
        "cached_tokens": 200,
        "completion_tokens": 300,
        "reasoning_tokens": 100,
        "latency_ms": 40.0,
        "started_at": when,
        "finished_at": when,
        "metadata": "{}",
    }
    row.update(fields)
    return row


def _results(out: Path, rows: list[dict[str, Any]]) -> Path:
    path = out / "results" / "part-0.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(results_table(rows), path)
    return out


@pytest.fixture
def prices(tmp_path: Path) -> Path:
    path = tmp_path / "prices.csv"
    path.write_text(PRICES)
    return path


@pytest.fixture
def out(tmp_path: Path) -> Path:
    rows = [_row(i, "cheap", day=0) for i in range(5)]
    rows += [_row(i, "dear", day=3) for i in range(3)]  # days 1 and 2 cost nothing
    rows += [
        _row(9, "dear", day=3, status="error", error_type="server_error", prompt_tokens=None,
             cached_tokens=None, completion_tokens=None, reasoning_tokens=None),
    ]  # fmt: skip
    return _results(tmp_path / "out", rows)


def _page(out: Path, prices: Path | None, tmp_path: Path) -> str:
    target = tmp_path / "site" / "report.html"
    write_html_report(out, target, pricing_file=prices)
    return target.read_text(encoding="utf-8")


def _data_value(page: str, element_id: str) -> str | None:
    match = re.search(rf'id="{element_id}"(?: data-value="([^"]*)")?', page)
    assert match, element_id
    return match.group(1)


def _svg(page: str, chart: str) -> str:
    match = re.search(rf'<svg[^>]*aria-labelledby="{chart}-title".*?</svg>', page, re.S)
    assert match, chart
    return match.group(0)


class _Tags(HTMLParser):
    """Collects every URL-bearing attribute, to prove nothing is loaded from anywhere."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.refs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.refs += [v or "" for k, v in attrs if k in ("src", "href", "xlink:href", "action")]


def test_page_is_self_contained(out: Path, prices: Path, tmp_path: Path) -> None:
    page = _page(out, prices, tmp_path)
    assert page.startswith("<!DOCTYPE html>")
    assert not re.search(r"https?:", page, re.I)
    parser = _Tags()
    parser.feed(page)
    assert parser.refs == []
    assert {"script", "link", "img", "iframe", "object"}.isdisjoint(parser.tags)
    assert "@import" not in page and "@font-face" not in page
    # url() only for the hatch patterns defined in the page's own SVGs
    assert all(u.startswith("#") for u in re.findall(r"url\(([^)]*)\)", page))
    assert page.count("<svg") == page.count("</svg>") >= 4


def test_totals_match_report(out: Path, prices: Path, tmp_path: Path) -> None:
    page = _page(out, prices, tmp_path)
    groups = json.loads(report(out, ["model"], "json", pricing_file=prices))
    cost = sum(g["cost_usd"] for g in groups)
    assert float(_data_value(page, "total-cost") or "nan") == pytest.approx(cost, rel=1e-12)
    assert int(_data_value(page, "total-requests") or 0) == sum(g["requests"] for g in groups)
    assert int(_data_value(page, "total-prompt-tokens") or 0) == sum(
        g["prompt_tokens"] for g in groups
    )
    assert int(_data_value(page, "total-completion-tokens") or 0) == sum(
        g["completion_tokens"] for g in groups
    )
    assert float(_data_value(page, "error-rate") or 0) == pytest.approx(1 / 9)
    for g in groups:  # each model, with its cost as report() prints it
        assert f">{g['model']}<" in page
        assert f"${g['cost_usd']:.6f}".rstrip("0") in page
    assert "server_error" in page


def test_cost_by_day_has_a_bar_for_every_day_in_the_span(
    out: Path, prices: Path, tmp_path: Path
) -> None:
    chart = _svg(_page(out, prices, tmp_path), "cost-by-day")
    bars = re.findall(r"<rect [^>]*><title>([^<]*)</title>", chart)
    assert [b.split(":")[0] for b in bars] == [
        "2026-06-01",
        "2026-06-02",
        "2026-06-03",
        "2026-06-04",
    ]
    assert "$0 (0 requests)" in bars[1]


def test_cost_by_model_orders_by_cost(out: Path, prices: Path, tmp_path: Path) -> None:
    chart = _svg(_page(out, prices, tmp_path), "cost-by-model")
    labels = re.findall(r'class="label" text-anchor="end">([^<]*)<', chart)
    assert labels == ["dear", "cheap"]


def test_unpriced_models_are_flagged_never_zero(tmp_path: Path, prices: Path) -> None:
    out = _results(
        tmp_path / "out",
        [_row(0, "cheap", day=0), _row(1, "mystery-model", day=1)],
    )
    page = _page(out, prices, tmp_path)
    assert 'id="unpriced"' in page and "mystery-model" in page
    assert _data_value(page, "total-cost") is None  # no total when part has no price
    assert "≥ $" in page
    model_chart = _svg(page, "cost-by-model")
    assert re.search(r"mystery-model: UNPRICED", model_chart)
    assert "url(#cost-by-model-hatch)" in model_chart
    row = re.search(r"<tr><td[^>]*>mystery-model</td>.*?</tr>", page)
    assert row and row.group(0).endswith('bad">UNPRICED</td></tr>')
    assert "$0<" not in row.group(0)


def test_long_spans_are_shown_by_month(tmp_path: Path, prices: Path) -> None:
    out = _results(tmp_path / "out", [_row(0, "cheap", day=0), _row(1, "cheap", day=200)])
    page = _page(out, prices, tmp_path)
    assert "Cost by month" in page
    bars = re.findall(r"<rect [^>]*><title>([^<]*)</title>", _svg(page, "cost-by-month"))
    assert bars[0].startswith("2026-06:") and bars[-1].startswith("2026-12:") and len(bars) == 7


def test_text_from_the_data_is_escaped(tmp_path: Path, prices: Path) -> None:
    out = _results(tmp_path / "out", [_row(0, "<b>evil</b>", day=0)])
    page = _page(out, prices, tmp_path)
    assert "<b>evil</b>" not in page and "&lt;b&gt;evil&lt;/b&gt;" in page


def test_no_results_yet(tmp_path: Path) -> None:
    page = _page(tmp_path / "nothing", None, tmp_path)
    assert "No results in" in page and "<svg" not in page


def test_answers_without_usage_are_flagged_on_the_page(
    out: Path, prices: Path, tmp_path: Path
) -> None:
    nulls = {"prompt_tokens": None, "cached_tokens": None, "completion_tokens": None}
    rows = [_row(i, "cheap", day=0) for i in range(2)] + [_row(7, "cheap", day=0, **nulls)]
    target = _results(tmp_path / "bare", rows)
    page = _page(target, prices, tmp_path)
    assert 'id="no-usage"' in page and "NO USAGE: 1 answers were billed" in page
    assert _data_value(page, "total-cost") is None  # no complete total to state
    assert "1 answers without usage (not included)" in page
    assert "+ NO USAGE</td>" in page  # the cheap row and the TOTAL row of the table
    assert 'class="value flag"' in _svg(page, "cost-by-model")
    # a page without such rows has no banner
    assert 'id="no-usage"' not in _page(out, prices, tmp_path)
