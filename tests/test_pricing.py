"""The price table: the shipped rows, validation, and which row prices a result."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path

import pytest

from pipeline.pricing import (
    SHIPPED_PRICES,
    PriceTable,
    PricingError,
    find_price,
    load_prices,
    strip_snapshot,
)

HEADER = (
    "model,provider,input_per_mtok,cached_input_per_mtok,output_per_mtok,"
    "long_context_threshold,long_input_per_mtok,long_cached_input_per_mtok,"
    "long_output_per_mtok,valid_from,source"
)
DAY = date(2026, 6, 1)


def price_file(tmp_path: Path, *lines: str, header: str = HEADER) -> Path:
    path = tmp_path / "my-prices.csv"
    path.write_text("\n".join([header, *lines]) + "\n", encoding="utf-8")
    return path


def table(tmp_path: Path, *lines: str) -> PriceTable:
    return load_prices(price_file(tmp_path, *lines))


def source(
    prices: PriceTable,
    model: str | None,
    provider: str | None = None,
    when: date | datetime | None = DAY,
    response_model: str | None = None,
) -> str | None:
    """The ``source`` of the price row that would price this result, None if unpriced."""
    found = find_price(prices, model, provider, when, response_model=response_model)
    return None if found is None else found.source


# ------------------------------------------------------------------ shipped table


def test_shipped_table_has_the_list_prices() -> None:
    prices = load_prices()
    assert prices.path == SHIPPED_PRICES
    by_model = {p.model: p for p in prices.prices if p.service_tier is None}
    expected = {
        "gpt-5.5": (5.0, 0.5, 30.0),
        "gpt-5.1": (1.25, 0.125, 10.0),
        "gpt-5.1-chat": (1.25, 0.125, 10.0),
        "gpt-5.1-thinking": (1.25, 0.125, 10.0),
        "gpt-5": (1.25, 0.125, 10.0),
        "gpt-5-mini": (0.25, 0.025, 2.0),
        "gpt-5-nano": (0.05, 0.005, 0.40),
        "gpt-4.1": (2.0, 0.5, 8.0),
        "gpt-4.1-mini": (0.40, 0.10, 1.60),
        "gpt-4o": (2.50, 1.25, 10.0),
        "gpt-4o-mini": (0.15, 0.075, 0.60),
    }
    for model, (inp, cached, out) in expected.items():
        rates = by_model[model].rates
        assert (rates.input_per_mtok, rates.cached_input_per_mtok, rates.output_per_mtok) == (
            inp,
            cached,
            out,
        ), model
        assert by_model[model].source.startswith("OpenAI list price"), model
    gpt55 = by_model["gpt-5.5"]
    assert gpt55.long_context_threshold == 272_000
    assert gpt55.long_rates is not None
    assert (gpt55.long_rates.input_per_mtok, gpt55.long_rates.cached_input_per_mtok) == (10, 1)
    assert gpt55.long_rates.output_per_mtok == 45
    assert by_model["sim-1"].source == "simulator (not a real price)"
    assert all(p.valid_from is not None for p in prices.prices)


# --------------------------------------------------------------------- the formula


def cost_of(
    prices: PriceTable, model: str, provider: str | None, prompt: int, cached: int, out: int
) -> float | None:
    price = find_price(prices, model, provider, DAY)
    return None if price is None else price.cost(prompt, cached, out)


def test_cost_bills_cached_tokens_at_the_cached_rate(tmp_path: Path) -> None:
    prices = table(tmp_path, "m,,2.00,0.50,8.00,,,,,,")
    cost = cost_of(prices, "m", None, 10_000, 4_000, 1_000)
    assert cost == pytest.approx((6_000 * 2.0 + 4_000 * 0.5 + 1_000 * 8.0) / 1e6, abs=1e-12)


def test_long_context_tier_bills_the_whole_request_at_long_rates() -> None:
    prices = load_prices()
    at_threshold = cost_of(prices, "gpt-5.5", "openai", 272_000, 2_000, 1_000)
    above = cost_of(prices, "gpt-5.5", "openai", 272_001, 2_000, 1_000)
    assert at_threshold == pytest.approx((270_000 * 5 + 2_000 * 0.5 + 1_000 * 30) / 1e6)
    assert above == pytest.approx((270_001 * 10 + 2_000 * 1.0 + 1_000 * 45) / 1e6)


def test_unpriced_model_has_no_price() -> None:
    # (A row without tokens costs nothing even unpriced: the costs view's rule,
    # checked in tests/test_report.py.)
    assert cost_of(load_prices(), "no-such-model", None, 10, 0, 5) is None


def test_reasoning_tokens_are_billed_inside_completion_tokens() -> None:
    # There is no reasoning argument: completion_tokens already contains them.
    prices = load_prices()
    assert cost_of(prices, "gpt-5.1", None, 0, 0, 1_000_000) == pytest.approx(10.0)


# ------------------------------------------------------------------ which price row


def test_valid_from_picks_the_newest_price_on_or_before_the_day(tmp_path: Path) -> None:
    prices = table(
        tmp_path,
        "m,,1,0.1,10,,,,,2026-01-01,old",
        "m,,2,0.2,20,,,,,2026-03-01,new",
    )
    assert source(prices, "m", when=date(2025, 12, 31)) is None
    assert source(prices, "m", when=date(2026, 1, 1)) == "old"
    assert source(prices, "m", when=date(2026, 2, 28)) == "old"
    assert source(prices, "m", when=date(2026, 3, 1)) == "new"
    assert source(prices, "m", when=date(2027, 1, 1)) == "new"


def test_when_is_the_utc_day(tmp_path: Path) -> None:
    prices = table(tmp_path, "m,,1,0.1,10,,,,,2026-03-01,new", "m,,2,0.2,20,,,,,2026-01-01,old")
    # 2026-02-28 20:00 at UTC-05:00 is 2026-03-01 01:00 UTC.
    late = datetime(2026, 2, 28, 20, tzinfo=timezone(timedelta(hours=-5)))
    assert source(prices, "m", when=late) == "new"
    assert source(prices, "m", when=datetime(2026, 2, 28, 23, 59)) == "old"  # naive: UTC
    assert source(prices, "m", when=None) == "new"  # today


def test_provider_row_beats_blank_provider_row(tmp_path: Path) -> None:
    prices = table(
        tmp_path,
        "m,,1,0.1,10,,,,,2026-05-01,any provider (newer)",
        "m,evolink,2,0.2,20,,,,,2026-01-01,evolink",
    )
    assert source(prices, "m", "evolink") == "evolink"
    assert source(prices, "m", "sim") == "any provider (newer)"
    assert source(prices, "m", None) == "any provider (newer)"


def test_snapshot_dates_fall_back_to_the_base_model(tmp_path: Path) -> None:
    prices = table(
        tmp_path,
        "gpt-x,,1,0.1,10,,,,,,base",
        "gpt-x-2026-01-01,,2,0.2,20,,,,,,snapshot",
        "other,,3,0.3,30,,,,,,other",
    )
    assert strip_snapshot("gpt-5.5-2026-04-23") == "gpt-5.5"
    assert strip_snapshot("gpt-5.5") == "gpt-5.5"
    assert source(prices, "gpt-x-2026-02-02") == "base"
    assert source(prices, "gpt-x-2026-01-01") == "snapshot"  # a priced snapshot wins
    assert source(prices, "gpt-x", response_model="other") == "base"  # request model first
    assert source(prices, "unknown", response_model="gpt-x-2026-02-02") == "base"
    assert source(prices, None, response_model="other") == "other"
    assert source(prices, "unknown", response_model="unknown-2026-01-01") is None


def test_shipped_gpt55_snapshot_is_priced_as_gpt55() -> None:
    prices = load_prices()
    plain = cost_of(prices, "gpt-5.5", None, 1000, 0, 100)
    dated = cost_of(prices, "gpt-5.5-2026-04-23", None, 1000, 0, 100)
    assert plain == dated == pytest.approx((1000 * 5 + 100 * 30) / 1e6)


def test_only_the_required_columns_are_needed(tmp_path: Path) -> None:
    path = price_file(
        tmp_path,
        "m,1,0.5,4",
        header="model,input_per_mtok,cached_input_per_mtok,output_per_mtok",
    )
    prices = load_prices(path)
    price = find_price(prices, "m", "any", datetime(2020, 1, 1, tzinfo=UTC))
    assert price is not None and price.provider is None and price.valid_from is None


# ---------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("lines", "line", "fragment"),
    [
        (["ok,,1,0.1,1,,,,,,", "bad,,abc,0.1,1,,,,,,"], 3, "input_per_mtok"),
        (["bad,,1,-0.1,1,,,,,,"], 2, "cached_input_per_mtok"),
        (["bad,,1,0.1,nan,,,,,,"], 2, "output_per_mtok"),
        (["bad,,1,,1,,,,,,"], 2, "cached_input_per_mtok is empty"),
        (["bad,,1,0.1,1,1000,,,,,"], 2, "long-context tier"),
        (["bad,,1,0.1,1,,2,0.2,2,,"], 2, "long-context tier"),
        (["bad,,1,0.1,1,1000,2,,2,,"], 2, "long_cached_input_per_mtok"),
        (["bad,,1,0.1,1,-5,2,0.2,2,,"], 2, "long_context_threshold"),
        (["bad,,1,0.1,1,,,,,May 2026,"], 2, "valid_from"),
        ([",,1,0.1,1,,,,,,"], 2, "model is empty"),
        (["m,,1,0.1,1,,,,,2026-01-01,", "m,,2,0.1,1,,,,,2026-01-01,"], 3, "line 2"),
        (["bad,,1,0.1,1,,,,,,,extra"], 2, "more values than columns"),
    ],
)
def test_a_bad_value_names_the_file_and_line(
    tmp_path: Path, lines: list[str], line: int, fragment: str
) -> None:
    path = price_file(tmp_path, *lines)
    with pytest.raises(PricingError) as err:
        load_prices(path)
    message = str(err.value)
    assert str(path) in message
    assert f"line {line}" in message
    assert fragment in message


@pytest.mark.parametrize(
    ("header", "fragment"),
    [
        ("model,input_per_mtok,output_per_mtok", "cached_input_per_mtok"),
        ("model,input_per_mtok,cached_input_per_mtok,output_per_mtok,valid_form", "valid_form"),
        (
            "model,input_per_mtok,cached_input_per_mtok,output_per_mtok,long_context_threshold",
            "long-context tier",
        ),
    ],
)
def test_a_bad_header_names_the_file(tmp_path: Path, header: str, fragment: str) -> None:
    path = price_file(tmp_path, header=header)
    with pytest.raises(PricingError, match="line 1") as err:
        load_prices(path)
    assert str(path) in str(err.value) and fragment in str(err.value)


def test_missing_or_empty_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(PricingError, match="cannot read price table"):
        load_prices(tmp_path / "nope.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(PricingError, match="empty"):
        load_prices(tmp_path / "empty.csv")
    with pytest.raises(PricingError, match="no rows"):
        load_prices(price_file(tmp_path))
