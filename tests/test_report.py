"""The DuckDB views, the cost report and `pipeline sql`, over small Parquet parts."""

from __future__ import annotations

import csv
import io
import json
import random
from collections.abc import Mapping, Sequence
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from pipeline.pricing import PriceTable, PricingError, find_price, load_prices
from pipeline.query import ReportError, open_views, sql
from pipeline.query.report import report
from pipeline.schema import results_table

WHEN = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
PRICES = """\
model,provider,input_per_mtok,cached_input_per_mtok,output_per_mtok,long_context_threshold,long_input_per_mtok,long_cached_input_per_mtok,long_output_per_mtok,valid_from,source
cheap,,1.00,0.10,4.00,,,,,,test
dear,,3.00,0.30,15.00,100000,6.00,0.60,22.50,,test
dated,,1.00,0.10,1.00,,,,,2026-01-01,january
dated,,2.00,0.20,2.00,,,,,2026-03-01,march
dated,evolink,5.00,0.50,5.00,,,,,2026-01-01,evolink
"""
# Independent of pipeline.pricing: (input, cached_input, output) per million tokens.
RATES = {"cheap": (1.00, 0.10, 4.00), "dear": (3.00, 0.30, 15.00)}
DEAR_LONG = (6.00, 0.60, 22.50)

_ids = iter(range(1_000_000))


def result(**fields: Any) -> dict[str, Any]:
    """One result row with sensible defaults; keyword arguments override them."""
    row: dict[str, Any] = {
        "run_id": "run-1",
        "id": f"row-{next(_ids)}",
        "status": "ok",
        "provider": "sim",
        "model": "cheap",
        "prompt_tokens": 1000,
        "cached_tokens": 0,
        "completion_tokens": 100,
        "reasoning_tokens": 0,
        "latency_ms": 50.0,
        "started_at": WHEN - timedelta(seconds=1),
        "finished_at": WHEN,
        "metadata": "{}",
    }
    row.update(fields)
    return row


def write_part(out: Path, rows: Sequence[Mapping[str, Any]], name: str = "run-1/part-0") -> None:
    path = out / "results" / f"{name}.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(results_table(rows), path)


@pytest.fixture
def prices(tmp_path: Path) -> Path:
    path = tmp_path / "prices.csv"
    path.write_text(PRICES)
    return path


def expected_cost(model: str, prompt: int, cached: int, completion: int) -> float:
    inp, cached_rate, out = RATES[model]
    if model == "dear" and prompt > 100_000:
        inp, cached_rate, out = DEAR_LONG
    return ((prompt - cached) * inp + cached * cached_rate + completion * out) / 1e6


def costs(out: Path, prices: Path | None, query: str) -> list[tuple[Any, ...]]:
    con = open_views(out, prices)
    try:
        return con.sql(query).fetchall()
    finally:
        con.close()


def json_report(out: Path, by: list[str], prices: Path | None = None, **kw: Any) -> Any:
    return json.loads(report(out, by, "json", pricing_file=prices, **kw))


# --------------------------------------------------------------------------- costs


def test_cost_per_model_matches_an_independent_computation(tmp_path: Path, prices: Path) -> None:
    rng = random.Random(7)
    rows = []
    for _ in range(200):
        model = rng.choice(["cheap", "dear"])
        prompt = rng.choice([rng.randint(0, 5000), rng.randint(90_000, 200_000)])
        cached = rng.randint(0, prompt)
        completion = rng.randint(0, 3000)
        rows.append(
            result(
                model=model,
                prompt_tokens=prompt,
                cached_tokens=cached,
                completion_tokens=completion,
                reasoning_tokens=completion // 2,
            )
        )
    write_part(tmp_path, rows[:120], "run-1/part-0")
    write_part(tmp_path, rows[120:], "run-2/part-0")

    got = {g["model"]: g for g in json_report(tmp_path, ["model"], prices)}
    for model in RATES:
        mine = [r for r in rows if r["model"] == model]
        want = sum(
            expected_cost(model, r["prompt_tokens"], r["cached_tokens"], r["completion_tokens"])
            for r in mine
        )
        assert got[model]["cost_usd"] == pytest.approx(want, abs=1e-9)
        assert got[model]["requests"] == len(mine)
        assert got[model]["prompt_tokens"] == sum(r["prompt_tokens"] for r in mine)
        assert got[model]["reasoning_tokens"] == sum(r["reasoning_tokens"] for r in mine)
        assert got[model]["unpriced"] is False


def recomputed_cost(table: PriceTable, r: dict[str, Any]) -> float | None:
    """The costs view's rule, recomputed here on its own: no tokens cost nothing (even
    unpriced); otherwise the matching price row's tier (long rates above the threshold,
    for the whole request), uncached prompt, cached prompt and completion tokens each at
    their rate per million; None when no price row matches."""
    prompt, cached = r["prompt_tokens"] or 0, r["cached_tokens"] or 0
    completion = r["completion_tokens"] or 0
    if prompt == 0 and completion == 0:
        return 0.0
    price = find_price(
        table, r["model"], r["provider"], r["finished_at"], response_model=r["response_model"]
    )
    if price is None:
        return None
    rates = price.rates
    if price.long_rates is not None and prompt > (price.long_context_threshold or 0):
        rates = price.long_rates
    return (
        (prompt - cached) * rates.input_per_mtok
        + cached * rates.cached_input_per_mtok
        + completion * rates.output_per_mtok
    ) / 1e6


def test_sql_costs_agree_with_a_python_recomputation(tmp_path: Path, prices: Path) -> None:
    """The costs view and an independent recomputation agree on mixed rows."""
    rng = random.Random(11)
    rows = []
    for _ in range(300):
        rows.append(
            result(
                model=rng.choice(["cheap", "dear", "dated", "dated-2026-05-05", "nope", None]),
                response_model=rng.choice([None, "cheap", "dear-2026-01-01", "zzz"]),
                provider=rng.choice(["sim", "evolink", None]),
                prompt_tokens=rng.choice([None, 0, rng.randint(1, 300_000)]),
                cached_tokens=rng.choice([None, rng.randint(0, 500)]),
                completion_tokens=rng.choice([None, 0, rng.randint(1, 5000)]),
                finished_at=datetime(2025, 12, 15, tzinfo=UTC)
                + timedelta(hours=rng.randint(0, 24 * 150)),
            )
        )
    write_part(tmp_path, rows)
    table = load_prices(prices)
    got = {
        row_id: (cost, unpriced, no_usage)
        for row_id, cost, unpriced, no_usage in costs(
            tmp_path, prices, "SELECT id, cost_usd, unpriced, no_usage FROM costs"
        )
    }
    assert len(got) == len(rows)
    for r in rows:
        # An ok answer without both token counts has no known cost (the recomputation
        # prices token counts; it cannot know the answer was billed).
        if r["prompt_tokens"] is None or r["completion_tokens"] is None:
            assert got[r["id"]][0] is None and got[r["id"]][2] is True, r
            continue
        assert got[r["id"]][2] is False, r
        want = recomputed_cost(table, r)
        cost, unpriced, _ = got[r["id"]]
        assert unpriced is (want is None), r
        if want is None:
            assert cost is None
        else:
            assert cost == pytest.approx(want, abs=1e-12), r


def test_cached_tokens_are_billed_at_the_cached_rate(tmp_path: Path, prices: Path) -> None:
    write_part(tmp_path, [result(prompt_tokens=10_000, cached_tokens=8_000, completion_tokens=0)])
    [(cost, rate)] = costs(tmp_path, prices, "SELECT cost_usd, cached_input_per_mtok FROM costs")
    assert rate == 0.10
    assert cost == pytest.approx((2_000 * 1.00 + 8_000 * 0.10) / 1e6, abs=1e-12)


def test_long_context_tier_bills_the_whole_request_at_long_rates(
    tmp_path: Path, prices: Path
) -> None:
    write_part(
        tmp_path,
        [
            result(id="at", model="dear", prompt_tokens=100_000, cached_tokens=0),
            result(id="above", model="dear", prompt_tokens=100_001, cached_tokens=1_000),
        ],
    )
    rows = costs(tmp_path, prices, "SELECT id, long_context, cost_usd FROM costs ORDER BY id")
    assert rows[0][:2] == ("above", True)
    assert rows[0][2] == pytest.approx((99_001 * 6.0 + 1_000 * 0.6 + 100 * 22.5) / 1e6, abs=1e-12)
    assert rows[1][:2] == ("at", False)
    assert rows[1][2] == pytest.approx((100_000 * 3.0 + 100 * 15.0) / 1e6, abs=1e-12)


def test_valid_from_prices_each_row_at_its_day(tmp_path: Path, prices: Path) -> None:
    write_part(
        tmp_path,
        [
            result(id="dec", model="dated", finished_at=datetime(2025, 12, 31, 23, tzinfo=UTC)),
            result(id="jan", model="dated", finished_at=datetime(2026, 2, 28, 23, tzinfo=UTC)),
            result(id="mar", model="dated", finished_at=datetime(2026, 3, 1, 0, 30, tzinfo=UTC)),
            result(id="evo", model="dated", provider="evolink"),
        ],
    )
    rows = costs(tmp_path, prices, "SELECT id, price_source, cost_usd FROM costs ORDER BY id")
    assert rows == [
        ("dec", None, None),  # before the first price: unpriced, not $0
        ("evo", "evolink", pytest.approx((1000 * 5.0 + 100 * 5.0) / 1e6)),
        ("jan", "january", pytest.approx((1000 * 1.0 + 100 * 1.0) / 1e6)),
        ("mar", "march", pytest.approx((1000 * 2.0 + 100 * 2.0) / 1e6)),
    ]


def test_snapshot_model_names_use_the_base_price(tmp_path: Path, prices: Path) -> None:
    write_part(
        tmp_path,
        [
            result(id="a", model="cheap-2026-04-23"),
            result(id="b", model="unknown-alias", response_model="dear-2026-04-23"),
        ],
    )
    rows = costs(tmp_path, prices, "SELECT id, price_model FROM costs ORDER BY id")
    assert rows == [("a", "cheap"), ("b", "dear")]


# ------------------------------------------------------------------------ unpriced


def test_unpriced_model_is_null_flagged_and_loud(tmp_path: Path, prices: Path) -> None:
    write_part(
        tmp_path,
        [
            result(model="cheap"),
            result(model="mystery-model", prompt_tokens=500, completion_tokens=50),
            # no tokens: costs nothing even without a price, so it is not unpriced
            result(model="typo-model", status="error", prompt_tokens=None, completion_tokens=None),
        ],
    )
    rows = costs(tmp_path, prices, "SELECT model, cost_usd, unpriced FROM costs ORDER BY model")
    assert rows == [
        ("cheap", pytest.approx(expected_cost("cheap", 1000, 0, 100)), False),
        ("mystery-model", None, True),
        ("typo-model", 0.0, False),
    ]

    groups = {g["model"]: g for g in json_report(tmp_path, ["model"], prices)}
    assert groups["mystery-model"]["cost_usd"] is None
    assert groups["mystery-model"]["unpriced"] is True
    assert groups["cheap"]["unpriced"] is False

    text = report(tmp_path, ["model"], "table", pricing_file=prices)
    assert "UNPRICED: model 'mystery-model'" in text
    assert "its cost is not included" in text
    mystery_line = next(line for line in text.splitlines() if line.startswith("mystery-model"))
    assert "UNPRICED" in mystery_line and "0.000000" not in mystery_line
    total_line = next(line for line in text.splitlines() if line.startswith("TOTAL"))
    assert "UNPRICED" in total_line  # the total is not a known number either
    assert "UNPRICED" in report(tmp_path, ["model"], "markdown", pricing_file=prices)

    by_day = json_report(tmp_path, ["day"], prices)
    assert by_day[0]["cost_usd"] is None and by_day[0]["unpriced"] is True
    assert by_day[0]["priced_cost_usd"] == pytest.approx(expected_cost("cheap", 1000, 0, 100))


# ------------------------------------------------------------------------- views


def test_latest_takes_the_newest_row_per_id(tmp_path: Path) -> None:
    write_part(
        tmp_path,
        [
            result(id="a", run_id="r1", status="error", finished_at=WHEN),
            result(id="b", run_id="r1", status="ok", finished_at=WHEN),
        ],
        "r1/part-0",
    )
    write_part(
        tmp_path,
        [result(id="a", run_id="r2", status="ok", finished_at=WHEN + timedelta(hours=1))],
        "r2/part-0",
    )
    rows = costs(tmp_path, None, "SELECT id, run_id, status FROM latest ORDER BY id")
    assert rows == [("a", "r2", "ok"), ("b", "r1", "ok")]
    assert costs(tmp_path, None, "SELECT count(*) FROM results") == [(3,)]


def test_parts_with_different_carried_columns_are_unioned(tmp_path: Path) -> None:
    write_part(tmp_path, [result(carried={"lang": "en"})], "r1/part-0")
    write_part(tmp_path, [result(carried={"score": 3})], "r2/nested/part-0")
    write_part(tmp_path, [result()], "top-level")  # directly under results/
    rows = costs(tmp_path, None, "SELECT lang, score FROM results ORDER BY lang, score")
    assert rows == [("en", None), (None, 3), (None, None)]


def test_views_exist_and_are_typed_before_any_run(tmp_path: Path) -> None:
    con = open_views(tmp_path / "never-run")
    try:
        for view in ("results", "latest", "costs"):
            assert con.sql(f"SELECT count(*) FROM {view}").fetchall() == [(0,)]
        types = dict(con.sql("SELECT column_name, column_type FROM (DESCRIBE costs)").fetchall())
        assert types["prompt_tokens"] == "BIGINT"
        assert types["finished_at"] == "TIMESTAMP WITH TIME ZONE"
        assert types["cost_usd"] == "DOUBLE"
        assert types["unpriced"] == "BOOLEAN"
        assert con.sql("SELECT count(*) FROM pricing").fetchall()[0][0] > 10
    finally:
        con.close()


# ------------------------------------------------------------------------ report


def test_json_output_shape_is_exact(tmp_path: Path, prices: Path) -> None:
    write_part(
        tmp_path,
        [
            result(model="cheap", cached_tokens=250, reasoning_tokens=40, latency_ms=10.0),
            result(model="cheap", status="error", prompt_tokens=None, completion_tokens=None),
        ],
    )
    [group] = json_report(tmp_path, ["model"], prices)
    assert list(group) == [
        "model",
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
    ]
    assert group["model"] == "cheap"
    assert group["no_usage"] == 0  # the error row reported no tokens and was not billed
    assert (group["requests"], group["ok"], group["errors"]) == (2, 1, 1)
    assert (group["prompt_tokens"], group["cached_tokens"]) == (1000, 250)
    assert (group["completion_tokens"], group["reasoning_tokens"]) == (100, 40)
    assert group["cost_usd"] == pytest.approx(expected_cost("cheap", 1000, 250, 100))
    assert group["unpriced"] is False
    assert group["error_rate"] == 0.5
    assert group["cache_hit_share"] == 0.25
    assert group["reasoning_share"] == 0.4
    assert group["latency_p50_ms"] == 30.0  # rows at 10 and 50 ms


def test_group_by_metadata_key_and_several_keys(tmp_path: Path, prices: Path) -> None:
    write_part(
        tmp_path,
        [
            result(metadata=json.dumps({"job": "labels", "model": "x"})),
            result(metadata=json.dumps({"job": "labels", "model": "y"})),
            result(metadata=json.dumps({"job": "audit"}), model="dear"),
            result(metadata="not json"),
            result(metadata=None),
        ],
    )
    by_job = json_report(tmp_path, ["job"], prices)
    assert [(g["job"], g["requests"]) for g in by_job] == [("audit", 1), ("labels", 2), (None, 2)]

    by_meta_model = json_report(tmp_path, ["metadata.model"], prices)
    assert [(g["metadata.model"], g["requests"]) for g in by_meta_model] == [
        ("x", 1),
        ("y", 1),
        (None, 3),
    ]
    both = json_report(tmp_path, ["job,model"], prices)
    assert [(g["job"], g["model"]) for g in both] == [
        ("audit", "dear"),
        ("labels", "cheap"),
        (None, "cheap"),
    ]
    table = report(tmp_path, ["job"], "table", pricing_file=prices)
    assert table.splitlines()[0].split()[:2] == ["job", "requests"]
    assert any(line.startswith("(none)") for line in table.splitlines())


def test_group_by_day_run_status_provider(tmp_path: Path, prices: Path) -> None:
    write_part(
        tmp_path,
        [
            result(run_id="r1", finished_at=datetime(2026, 5, 1, 23, 59, tzinfo=UTC)),
            result(run_id="r2", finished_at=datetime(2026, 5, 2, 0, 1, tzinfo=UTC)),
            result(run_id="r2", status="error", provider="evolink"),
        ],
    )
    assert [g["day"] for g in json_report(tmp_path, ["day"], prices)] == [
        "2026-05-01",
        "2026-05-02",
        WHEN.date().isoformat(),
    ]
    assert [(g["run"], g["requests"]) for g in json_report(tmp_path, ["run"], prices)] == [
        ("r1", 1),
        ("r2", 2),
    ]
    assert [g["status"] for g in json_report(tmp_path, ["status"], prices)] == ["error", "ok"]
    assert [g["provider"] for g in json_report(tmp_path, ["provider"], prices)] == [
        "evolink",
        "sim",
    ]


def test_since_and_until_filter_on_finished_at(tmp_path: Path, prices: Path) -> None:
    write_part(
        tmp_path,
        [result(finished_at=datetime(2026, 5, d, 12, tzinfo=UTC)) for d in (1, 15, 31)]
        + [result(finished_at=datetime(2026, 6, 1, 0, 0, tzinfo=UTC))],
    )

    def requests(**kw: Any) -> int:
        return sum(g["requests"] for g in json_report(tmp_path, ["model"], prices, **kw))

    assert requests() == 4
    assert requests(since="2026-05-01", until="2026-06-01") == 3  # exactly May
    assert requests(since=date(2026, 5, 15)) == 3
    assert requests(until="2026-05-15T12:00:00+00:00") == 1
    with pytest.raises(ReportError, match="--since"):
        requests(since="last tuesday")


def test_empty_out_gives_an_empty_report(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert json.loads(report(out, ["model"], "json")) == []
    table = report(out, ["model"], "table")
    assert "TOTAL" in table and "No results" in table
    assert "TOTAL" in report(out, ["day", "job"], "markdown")
    rows = list(csv.reader(io.StringIO(report(out, ["model"], "csv"))))
    assert rows[0][:2] == ["model", "requests"] and rows[1][:2] == ["TOTAL", "0"]
    (out / "results").mkdir(parents=True)
    assert json.loads(report(out, ["model"], "json")) == []


def test_table_csv_and_markdown_carry_a_total(tmp_path: Path, prices: Path) -> None:
    write_part(tmp_path, [result(model="cheap"), result(model="dear")])
    total = expected_cost("cheap", 1000, 0, 100) + expected_cost("dear", 1000, 0, 100)

    rows = list(csv.DictReader(io.StringIO(report(tmp_path, ["model"], "csv", prices))))
    assert [r["model"] for r in rows] == ["cheap", "dear", "TOTAL"]
    assert float(rows[-1]["cost_usd"]) == pytest.approx(total)
    assert rows[-1]["requests"] == "2" and rows[-1]["unpriced"] == "false"

    table = report(tmp_path, ["model"], "table", prices).splitlines()
    assert table[-1].startswith("TOTAL") and table[-1].endswith(f"{total:,.6f}")
    assert len({len(line) for line in table if not line.startswith("-")}) == 1  # aligned

    markdown = report(tmp_path, ["model"], "markdown", prices)
    assert markdown.splitlines()[1].startswith("|---|---:|")
    assert "**TOTAL**" in markdown


def test_bad_report_arguments_are_report_errors(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match="format"):
        report(tmp_path, ["model"], "xml")
    with pytest.raises(ReportError, match="twice"):
        report(tmp_path, ["model", "model"], "json")
    with pytest.raises(ReportError, match="metadata.ok"):
        report(tmp_path, ["ok"], "json")


# ----------------------------------------------------------------------- pricing


def test_pricing_override_replaces_the_shipped_table(tmp_path: Path, prices: Path) -> None:
    write_part(tmp_path, [result(model="gpt-5.1"), result(model="cheap")])
    shipped = {g["model"]: g for g in json_report(tmp_path, ["model"])}
    assert shipped["gpt-5.1"]["cost_usd"] == pytest.approx((1000 * 1.25 + 100 * 10) / 1e6)
    assert shipped["cheap"]["unpriced"] is True

    override = {g["model"]: g for g in json_report(tmp_path, ["model"], prices)}
    assert override["gpt-5.1"]["unpriced"] is True  # not merged with the shipped table
    assert override["cheap"]["cost_usd"] == pytest.approx(expected_cost("cheap", 1000, 0, 100))
    assert costs(tmp_path, prices, "SELECT count(*) FROM pricing") == [(5,)]


def test_bad_pricing_file_names_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad-prices.csv"
    bad.write_text(
        "model,input_per_mtok,cached_input_per_mtok,output_per_mtok\ngood,1,0.1,2\nbad,1,x,2\n"
    )
    with pytest.raises(PricingError, match=r"bad-prices\.csv, line 3 \(model 'bad'\)"):
        report(tmp_path, ["model"], "table", pricing_file=bad)
    with pytest.raises(PricingError, match=r"bad-prices\.csv, line 3"):
        sql(tmp_path, "SELECT 1", "table", pricing_file=bad)


# --------------------------------------------------------------------------- sql


def test_sql_formats(tmp_path: Path, prices: Path) -> None:
    write_part(tmp_path, [result(id="a", model="cheap"), result(id="b", model="dear")])
    query = "SELECT id, model, cost_usd, finished_at FROM costs ORDER BY id"

    as_json = json.loads(sql(tmp_path, query, "json", prices))
    assert as_json[0] == {
        "id": "a",
        "model": "cheap",
        "cost_usd": pytest.approx(expected_cost("cheap", 1000, 0, 100)),
        "finished_at": "2026-06-01T12:00:00+00:00",
    }
    rows = list(csv.reader(io.StringIO(sql(tmp_path, query, "csv", prices))))
    assert rows[0] == ["id", "model", "cost_usd", "finished_at"] and len(rows) == 3
    table = sql(tmp_path, query, "table", prices)
    assert table.splitlines()[0].split() == ["id", "model", "cost_usd", "finished_at"]
    assert table.endswith("(2 rows)")
    summed = json.loads(sql(tmp_path, "SELECT sum(prompt_tokens) AS n FROM results", "json"))
    assert summed == [{"n": 2000}]  # an int, not a float or a Decimal


def test_sql_error_is_a_report_error(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match="query failed"):
        sql(tmp_path, "SELECT nope FROM results", "table")


# ------------------------------------------------------------------ no usage block


def _no_usage_rows() -> list[dict[str, Any]]:
    nulls = {"prompt_tokens": None, "cached_tokens": None, "completion_tokens": None}
    return [
        result(id="priced", model="cheap"),
        # billed answers that came without a usage block (or half of one)
        result(id="bare", model="cheap", **nulls),
        result(id="half", model="cheap", completion_tokens=None),
        result(id="bad-json", model="cheap", status="error", error_type="invalid_json", **nulls),
        # not billed, or billed to another row: these cost nothing
        result(id="failed", model="cheap", status="error", error_type="server_error", **nulls),
        result(id="copy", model="cheap", shared_from="bare", **nulls),
    ]


def test_answers_without_usage_cost_null_not_zero(tmp_path: Path, prices: Path) -> None:
    write_part(tmp_path, _no_usage_rows())
    rows = costs(tmp_path, prices, "SELECT id, cost_usd, unpriced, no_usage FROM costs ORDER BY id")
    priced = expected_cost("cheap", 1000, 0, 100)
    assert rows == [
        ("bad-json", None, False, True),
        ("bare", None, False, True),
        ("copy", 0.0, False, False),
        ("failed", 0.0, False, False),
        ("half", None, False, True),
        ("priced", pytest.approx(priced), False, False),
    ]

    [group] = json_report(tmp_path, ["model"], prices)
    assert group["no_usage"] == 3
    assert group["cost_usd"] is None  # not complete, so not a number
    assert group["priced_cost_usd"] == pytest.approx(priced)
    assert group["unpriced"] is False  # the model has a price; the tokens are missing
    assert list(group)[-1] == "no_usage"  # after the keys scripts already read


def test_answers_without_usage_are_loud_in_every_format(tmp_path: Path, prices: Path) -> None:
    write_part(tmp_path, [*_no_usage_rows(), result(id="other", model="dear")])
    table = report(tmp_path, ["model"], "table", pricing_file=prices)
    lines = table.splitlines()
    cheap = next(line for line in lines if line.startswith("cheap"))
    dear = next(line for line in lines if line.startswith("dear"))
    total = next(line for line in lines if line.startswith("TOTAL"))
    priced = expected_cost("cheap", 1000, 0, 100)
    assert cheap.endswith(f"{priced:,.6f} + NO USAGE")
    assert "NO USAGE" not in dear
    assert total.endswith("+ NO USAGE")
    assert "NO USAGE: 3 answers from model 'cheap' (provider 'sim') came without token" in table
    assert "never counted as $0" in table

    markdown = report(tmp_path, ["model"], "markdown", pricing_file=prices)
    assert "NO USAGE" in markdown and "> **NO USAGE: 3 answers" in markdown

    rows = list(csv.DictReader(io.StringIO(report(tmp_path, ["model"], "csv", prices))))
    by_model = {r["model"]: r for r in rows}
    assert by_model["cheap"]["no_usage"] == "3" and by_model["cheap"]["cost_usd"] == ""
    assert by_model["TOTAL"]["no_usage"] == "3" and by_model["TOTAL"]["cost_usd"] == ""
    assert by_model["dear"]["no_usage"] == "0" and by_model["dear"]["cost_usd"] != ""


def test_cli_warns_on_stderr_for_data_formats(tmp_path: Path, prices: Path) -> None:
    from tests.conftest import invoke

    write_part(tmp_path, _no_usage_rows())
    for fmt in ("json", "csv"):
        code, stdout, stderr = invoke(
            "report", str(tmp_path), "--format", fmt, "--pricing", str(prices)
        )
        assert code == 0, stderr
        assert "NO USAGE: 3 answers" in stderr
        assert "NO USAGE" not in stdout  # stdout stays parseable data
    code, stdout, _ = invoke("report", str(tmp_path), "--format", "json", "--pricing", str(prices))
    assert json.loads(stdout)[0]["no_usage"] == 3


def test_hostile_metadata_keys_group_by_their_own_name(tmp_path: Path, prices: Path) -> None:
    keys = ['a"b', "it's", "x') AS y --", "back\\slash", "a.b", "$", "[0]", "*"]
    write_part(
        tmp_path,
        [result(metadata=json.dumps({k: f"value of {k}" for k in keys}))]
        + [result(metadata=json.dumps({"a.b": "other"}))],
    )
    for key in keys:
        groups = json_report(tmp_path, [f"metadata.{key}"], prices)
        values = {g[f"metadata.{key}"]: g["requests"] for g in groups}
        assert values[f"value of {key}"] == 1, key
        assert sum(values.values()) == 2
    with pytest.raises(ReportError, match="NUL"):
        report(tmp_path, ["job\x00x"], "json", pricing_file=prices)


@pytest.mark.parametrize(
    "name", ["cost_usd", "unpriced", "no_usage", "long_context", "Input_Per_Mtok", "price_model"]
)
def test_carried_columns_never_change_the_arithmetic(
    tmp_path: Path, prices: Path, name: str
) -> None:
    """An input column named like a column the costs view adds stays in results only."""
    write_part(tmp_path, [result(model="cheap", carried={name: "hostile"})])
    [group] = json_report(tmp_path, ["model"], prices)
    assert group["cost_usd"] == pytest.approx(expected_cost("cheap", 1000, 0, 100))
    assert group["unpriced"] is False and group["no_usage"] == 0
    assert costs(tmp_path, prices, f'SELECT "{name}" FROM results') == [("hostile",)]


def test_the_run_path_never_loads_the_read_side() -> None:
    """`pipeline run` must not pay for (or depend on) DuckDB: importing the run path
    leaves pipeline.query and duckdb unloaded. A fresh interpreter, since this test
    process has long imported both."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    code = (
        "import sys, pipeline.execute\n"
        "print(sorted(m for m in sys.modules\n"
        "             if m.split('.')[0] == 'duckdb' or m.startswith('pipeline.query')))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(root)}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert done.stdout.strip() == "[]"
    # The probe itself works: the read side does load both.
    code = code.replace("pipeline.execute", "pipeline.query")
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    loaded = done.stdout
    assert "'duckdb'" in loaded and "'pipeline.query.views'" in loaded
