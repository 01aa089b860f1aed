"""Service tiers: the tier asked for, flex refusals and the fallback, the tier recorded
per row, and every row priced at the tier it was billed at (costs view, report,
--max-cost, estimate)."""

from __future__ import annotations

import csv
import json
from collections import Counter, defaultdict
from collections.abc import Callable
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.budget import Budget, BudgetExceeded
from pipeline.config import RunOptions
from pipeline.errors import ApiError, PricingError, UsageError
from pipeline.execute import execute
from pipeline.pricing import SHIPPED_PRICES, find_price, load_prices
from pipeline.providers import BUILTIN, check_service_tier
from pipeline.query import open_views
from pipeline.query.views import fetch_dicts
from pipeline.request import RequestOptions, build_job
from pipeline.schema import RESULT_SCHEMA, results_table
from pipeline.sim import SimConfig, Simulator
from pipeline.source import SourceRow
from pipeline.tiers import FLEX_FIRST_WAIT, FLEX_MAX_WAIT, flex_wait, is_capacity_refusal
from pipeline.wire import UNRECOGNIZED_TIER, StreamAssembler, Usage, parse_completion, service_tier
from tests.conftest import FakeClock, invoke, prompts, read_results, run_with_sim, write_jsonl

# ------------------------------------------------------------------ the simulator


def test_flex_with_refusals_falls_back_after_n_and_records_each_rows_tier(
    tmp_path: Path,
) -> None:
    """30% of flex calls refused, --flex-fallback 3: every row ok, each row's tier is
    the one the server reported, and exactly the rows refused three times went out at
    the default tier, each after exactly three flex attempts."""
    clock = FakeClock()
    sim = Simulator(SimConfig(flex_refusal_rate=0.3, seed=7), clock=clock, sleep=clock.sleep)
    src = write_jsonl(tmp_path / "in.jsonl", prompts(300))
    run = run_with_sim(
        [src],
        tmp_path / "out",
        sim=sim,
        clock=clock,
        model="sim-1",
        service_tier="flex",
        flex_fallback=3,
    )
    rows = run.rows()
    assert run.result.exit_code == 0
    assert len(rows) == 300 and all(r["status"] == "ok" for r in rows)
    tiers = Counter(r["service_tier"] for r in rows)
    assert set(tiers) == {"flex", "default"} and tiers["default"] > 0
    for r in rows:
        if r["service_tier"] == "default":
            assert r["attempts"] == 4  # three flex refusals, then the default tier
        else:
            assert r["attempts"] <= 3
    refused = sim.stats["flex_refused"]
    assert refused == sum(r["attempts"] - 1 for r in rows)
    assert refused > 0.2 * 300  # about 30% of the first tries, and more on retries
    # Refusals are capacity, not a rate limit: the run was not slowed for them.
    assert run.result.tally.rate_limited == 0
    # What the server billed per tier is what the rows record.
    assert Counter(b.service_tier for b in sim.ledger) == tiers


def test_flex_without_fallback_keeps_asking_for_flex(tmp_path: Path) -> None:
    clock = FakeClock()
    sim = Simulator(SimConfig(flex_refusal_rate=0.3, seed=3), clock=clock, sleep=clock.sleep)
    src = write_jsonl(tmp_path / "in.jsonl", prompts(100))
    run = run_with_sim(
        [src], tmp_path / "out", sim=sim, clock=clock, model="sim-1", service_tier="flex"
    )
    rows = run.rows()
    assert all(r["status"] == "ok" and r["service_tier"] == "flex" for r in rows)
    assert max(r["attempts"] for r in rows) >= 2
    assert sim.stats["flex_refused"] == sum(r["attempts"] - 1 for r in rows)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("tier", ["default", "priority", "auto"])
def test_other_tiers_are_sent_and_recorded(tmp_path: Path, tier: str, stream: bool) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", prompts(5))
    run = run_with_sim([src], tmp_path / "out", model="sim-1", service_tier=tier, stream=stream)
    recorded = {r["service_tier"] for r in run.rows()}
    assert recorded == {"priority" if tier == "priority" else "default"}


def test_no_tier_asked_records_null(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", prompts(3))
    run = run_with_sim([src], tmp_path / "out", model="sim-1")
    assert [r["service_tier"] for r in run.rows()] == [None, None, None]
    assert [r["batch_id"] for r in run.rows()] == [None, None, None]


# ------------------------------------------------- flex 429s against a mock gateway


def _answer(body: dict[str, Any], tier: str | None) -> httpx.Response:
    data: dict[str, Any] = {
        "id": "chatcmpl-1",
        "model": body["model"],
        "choices": [{"message": {"content": "ok"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
    }
    if tier is not None:
        data["service_tier"] = tier
    return httpx.Response(200, json=data)


def _refusal(code: str = "resource_unavailable", retry_after: str | None = None) -> httpx.Response:
    headers = {"retry-after": retry_after} if retry_after else {}
    body = {"error": {"message": "Resource Unavailable", "type": "rate_limit_error", "code": code}}
    return httpx.Response(429, json=body, headers=headers)


def _gateway(
    decide: Callable[[dict[str, Any], int], httpx.Response],
) -> tuple[httpx.MockTransport, list[dict[str, Any]]]:
    """A gateway that answers each request by ``decide(body, nth request of its row)``."""
    seen: list[dict[str, Any]] = []
    per_row: Counter[str] = Counter()

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seen.append(body)
        key = json.dumps(body["messages"])
        per_row[key] += 1
        return decide(body, per_row[key])

    return httpx.MockTransport(handler), seen


def _run(
    tmp_path: Path, transport: httpx.MockTransport, rows: int = 2, **options: Any
) -> tuple[Any, list[dict[str, Any]], FakeClock]:
    clock = FakeClock()
    src = write_jsonl(tmp_path / "in.jsonl", prompts(rows))
    opts = RunOptions(
        sources=[str(src)],
        out=tmp_path / "out",
        base_url=["http://gw.test/v1"],
        model="gpt-5.5",
        quiet=True,
        **options,
    )
    result = execute(opts, transport=transport, sleep=clock.sleep, clock=clock)
    return result, read_results(tmp_path / "out"), clock


def test_every_flex_refusal_is_counted_none_hidden_by_the_retry_loop(tmp_path: Path) -> None:
    """A gateway that refuses every flex request: with --flex-fallback 2 each row is
    sent exactly twice at flex and once at default, whatever the inner retry policy
    (which retries 429s up to 60 times) would have done with them."""

    def decide(body: dict[str, Any], nth: int) -> httpx.Response:
        if body.get("service_tier") == "flex":
            return _refusal(retry_after="1")
        return _answer(body, "default")

    transport, seen = _gateway(decide)
    result, rows, _ = _run(tmp_path, transport, service_tier="flex", flex_fallback=2)
    assert result.exit_code == 0
    assert Counter(b["service_tier"] for b in seen) == {"flex": 4, "default": 2}
    assert all(r["service_tier"] == "default" and r["attempts"] == 3 for r in rows)
    assert result.tally.rate_limited == 0
    # Told at the end of the run and kept in its manifest, not only per row.
    assert (result.tally.flex_refusals, result.tally.flex_fallbacks) == (4, 2)
    manifest = json.loads((tmp_path / "out" / "runs" / f"{result.run_id}.json").read_text())
    assert manifest["flex_refusals"] == 4 and manifest["flex_fallbacks"] == 2
    (note,) = [n for n in manifest["diagnostics"] if n["code"] == "flex_refusals"]
    assert "refused 4 flex requests for capacity (429); 2 rows then" in note["message"]
    assert "2 rows then went at the default tier" in note["message"]


def test_flex_refusals_wait_longer_than_ordinary_retries(tmp_path: Path) -> None:
    """The wait after a refusal is at least half of FLEX_FIRST_WAIT (equal jitter), not
    the half second of an ordinary retry; a longer Retry-After is honoured."""
    times: list[float] = []
    clock_ref: list[FakeClock] = []

    def decide(body: dict[str, Any], nth: int) -> httpx.Response:
        times.append(clock_ref[0].now if clock_ref else 0.0)
        if nth == 1:
            return _refusal()  # no Retry-After
        if nth == 2:
            return _refusal(retry_after="120")
        return _answer(body, "flex")

    transport, _ = _gateway(decide)
    clock = FakeClock()
    clock_ref.append(clock)
    src = write_jsonl(tmp_path / "in.jsonl", prompts(1))
    opts = RunOptions(
        sources=[str(src)],
        out=tmp_path / "out",
        base_url=["http://gw.test/v1"],
        model="gpt-5.5",
        quiet=True,
        service_tier="flex",
    )
    execute(opts, transport=transport, sleep=clock.sleep, clock=clock)
    assert len(times) == 3
    assert times[1] - times[0] >= FLEX_FIRST_WAIT / 2
    assert times[2] - times[1] >= 120.0 - 1e-6


def test_flex_refusals_without_fallback_end_the_row_bounded(tmp_path: Path) -> None:
    def decide(body: dict[str, Any], nth: int) -> httpx.Response:
        return _refusal()

    transport, seen = _gateway(decide)
    result, rows, clock = _run(
        tmp_path, transport, rows=1, service_tier="flex", max_retry_time=100.0
    )
    assert result.exit_code == 1
    (row,) = rows
    assert row["status"] == "error" and row["http_status"] == 429
    assert row["attempts"] == len(seen) >= 2
    # Every refusal counted, the last (after which the row gave up) too.
    assert result.tally.flex_refusals == len(seen) and result.tally.flex_fallbacks == 0
    assert all(b["service_tier"] == "flex" for b in seen)


def test_a_rate_limit_429_on_a_flex_request_is_not_a_refusal(tmp_path: Path) -> None:
    """A 429 whose code names a rate limit paces the run as ever and does not count
    toward --flex-fallback: the row is still answered at flex."""

    def decide(body: dict[str, Any], nth: int) -> httpx.Response:
        if nth == 1:
            return _refusal(code="rate_limit_exceeded")
        return _answer(body, body.get("service_tier"))

    transport, seen = _gateway(decide)
    result, rows, _ = _run(tmp_path, transport, rows=1, service_tier="flex", flex_fallback=1)
    assert [r["service_tier"] for r in rows] == ["flex"]
    assert [b["service_tier"] for b in seen] == ["flex", "flex"]
    assert result.tally.rate_limited == 1


def test_a_quota_429_on_a_flex_request_still_stops_the_run(tmp_path: Path) -> None:
    def decide(body: dict[str, Any], nth: int) -> httpx.Response:
        return _refusal(code="insufficient_quota")

    transport, _ = _gateway(decide)
    result, _, _ = _run(tmp_path, transport, rows=1, service_tier="flex", flex_fallback=3)
    assert result.exit_code == 3


def test_flex_wait_figures() -> None:
    low = [flex_wait(n, uniform=lambda a, b: a) for n in range(1, 12)]
    high = [flex_wait(n, uniform=lambda a, b: b) for n in range(1, 12)]
    assert low[0] == FLEX_FIRST_WAIT / 2 and high[0] == FLEX_FIRST_WAIT
    assert high[1] == 2 * FLEX_FIRST_WAIT
    assert max(high) == FLEX_MAX_WAIT and high[-1] == FLEX_MAX_WAIT
    assert all(a <= b for a, b in zip(low, low[1:], strict=False))
    assert flex_wait(1, 60.0, uniform=lambda a, b: a) == 60.0  # a longer Retry-After
    assert flex_wait(1, 1e9, uniform=lambda a, b: a) == FLEX_MAX_WAIT  # capped


def test_capacity_refusal_needs_flex_and_a_429() -> None:
    refusal = ApiError(429, "rate_limit_error", "no room", code="resource_unavailable")
    assert is_capacity_refusal({"service_tier": "flex"}, refusal)
    assert not is_capacity_refusal({"service_tier": "default"}, refusal)
    assert not is_capacity_refusal({}, refusal)
    limit = ApiError(429, "requests", "slow down", code="rate_limit_exceeded")
    assert not is_capacity_refusal({"service_tier": "flex"}, limit)
    assert not is_capacity_refusal({"service_tier": "flex"}, ApiError(503, "x", "y"))


# ------------------------------------------------------------------ usage errors


@pytest.mark.parametrize("command", ["run", "estimate"])
def test_service_tier_against_a_gateway_without_tiers_is_exit_2(
    tmp_path: Path, command: str
) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", prompts(1))
    code, _, err = invoke(
        command,
        str(src),
        "--out",
        str(tmp_path / "out"),
        "--provider",
        "starmagic",
        "--service-tier",
        "flex",
    )
    assert code == 2
    assert "starmagic" in err and "no service tiers" in err
    assert not (tmp_path / "out" / "results").exists()


@pytest.mark.parametrize("command", ["run", "estimate"])
def test_flex_fallback_without_flex_is_exit_2(tmp_path: Path, command: str) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", prompts(1))
    code, _, err = invoke(command, str(src), "--out", str(tmp_path / "o"), "--flex-fallback", "3")
    assert code == 2 and "--service-tier flex" in err


def test_profiles_say_which_tiers_and_whether_a_batch_api() -> None:
    for name in ("openai", "sim"):
        assert BUILTIN[name].batch_api is True
        for tier in ("auto", "default", "flex", "priority"):
            check_service_tier(BUILTIN[name], tier)
    for name in ("starmagic", "evolink", "modelstream"):
        assert BUILTIN[name].batch_api is False and BUILTIN[name].service_tiers == ()
        with pytest.raises(UsageError, match="no service tiers"):
            check_service_tier(BUILTIN[name], "default")
        check_service_tier(BUILTIN[name], None)
    bare = RunOptions(base_url=["http://x.test/v1"], service_tier="flex").resolved_provider()
    assert bare.service_tiers is None  # unknown: the user vouches for it


# ----------------------------------------------------------------- wire and request


def test_service_tier_parsed_from_json_and_stream() -> None:
    body = {"choices": [{"message": {"content": "x"}}], "service_tier": "flex"}
    assert parse_completion(json.dumps(body)).service_tier == "flex"
    assert parse_completion(json.dumps({**body, "service_tier": None})).service_tier is None
    stream = StreamAssembler()
    chunk = {
        "id": "c",
        "service_tier": "priority",
        "choices": [{"delta": {"content": "a"}, "finish_reason": "stop"}],
    }
    stream.feed_text(f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n")
    assert stream.finish().service_tier == "priority"


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.none(), st.integers(), st.floats(), st.text(), st.booleans()))
def test_service_tier_from_hostile_values_is_a_short_name_or_marker(value: Any) -> None:
    tier = service_tier(value)
    if not isinstance(value, str):
        assert tier is None
    else:
        assert tier in (value, UNRECOGNIZED_TIER)
        assert len(tier) <= 32 and tier.isascii() and "\n" not in tier


def test_service_tier_never_stores_a_servers_free_text() -> None:
    assert service_tier("sk-" + "a" * 60) == UNRECOGNIZED_TIER
    assert service_tier("flex; DROP TABLE") == UNRECOGNIZED_TIER
    assert service_tier("scale") == "scale"


def _job(data: dict[str, Any], opts: RequestOptions) -> Any:
    return build_job(SourceRow(file=Path("in.jsonl"), line=1, data=data), opts)


def test_service_tier_option_goes_into_each_request_body() -> None:
    opts = RequestOptions(model="m", service_tier="flex")
    assert _job({"id": "a", "prompt": "hi"}, opts).body["service_tier"] == "flex"
    assert "service_tier" not in _job({"id": "a", "prompt": "hi"}, RequestOptions(model="m")).body
    own = {"custom_id": "b", "body": {"model": "m", "messages": [], "service_tier": "priority"}}
    own["body"]["messages"] = [{"role": "user", "content": "hi"}]
    assert _job(own, opts).body["service_tier"] == "priority"  # the row's own wins
    bad = {"custom_id": "c", "body": {**own["body"], "service_tier": "gold"}}
    assert "service_tier" in _job(bad, opts).message


# ----------------------------------------------------------------------- pricing

HEADER = (
    "model,provider,service_tier,input_per_mtok,cached_input_per_mtok,output_per_mtok,"
    "long_context_threshold,long_input_per_mtok,long_cached_input_per_mtok,"
    "long_output_per_mtok,valid_from,source"
)


def _table(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "prices.csv"
    path.write_text("\n".join([HEADER, *lines]) + "\n", encoding="utf-8")
    return path


def test_a_tier_without_a_price_row_is_unpriced_never_the_default(tmp_path: Path) -> None:
    prices = load_prices(_table(tmp_path, "m,,,1,0.1,4,,,,,,", "m,,batch,0.5,0.05,2,,,,,,"))
    day = date(2026, 1, 1)
    assert find_price(prices, "m", None, day).rates.input_per_mtok == 1  # type: ignore[union-attr]
    for tier in ("default", "auto", "DEFAULT"):
        assert find_price(prices, "m", None, day, service_tier=tier) is not None
    found = find_price(prices, "m", None, day, service_tier="batch")
    assert found is not None and found.rates.input_per_mtok == 0.5
    assert find_price(prices, "m", None, day, service_tier="flex") is None
    assert find_price(prices, "m", None, day, service_tier="scale") is None


def test_valid_from_is_chosen_within_the_tier(tmp_path: Path) -> None:
    prices = load_prices(
        _table(
            tmp_path,
            "m,,,1,0.1,4,,,,,2025-01-01,",
            "m,,flex,0.5,0.05,2,,,,,2025-06-01,",
            "m,,flex,0.4,0.04,1.6,,,,,2026-01-01,",
        )
    )

    def flex_input(day: date) -> float | None:
        found = find_price(prices, "m", None, day, service_tier="flex")
        return None if found is None else found.rates.input_per_mtok

    assert flex_input(date(2025, 3, 1)) is None  # before any flex row: unpriced
    assert flex_input(date(2025, 7, 1)) == 0.5
    assert flex_input(date(2026, 2, 1)) == 0.4
    default = find_price(prices, "m", None, date(2025, 3, 1), service_tier=None)
    assert default is not None and default.rates.input_per_mtok == 1


def test_long_context_rates_apply_within_the_tier(tmp_path: Path) -> None:
    prices = load_prices(
        _table(tmp_path, "m,,,2,0.2,8,100,4,0.4,12,,", "m,,batch,1,0.1,4,100,2,0.2,6,,")
    )
    batch = find_price(prices, "m", None, date(2026, 1, 1), service_tier="batch")
    assert batch is not None
    assert batch.cost(100, 0, 10) == pytest.approx((100 * 1 + 10 * 4) / 1e6)
    assert batch.cost(101, 0, 10) == pytest.approx((101 * 2 + 10 * 6) / 1e6)


def test_price_table_tier_column_is_checked(tmp_path: Path) -> None:
    with pytest.raises(PricingError, match="service_tier must be"):
        load_prices(_table(tmp_path, "m,,gold,1,0.1,4,,,,,,"))
    with pytest.raises(PricingError, match="service_tier as line"):
        load_prices(_table(tmp_path, "m,,flex,1,0.1,4,,,,,,", "m,,flex,1,0.1,4,,,,,,"))
    # The same model at several tiers (and 'default' spelled out) is fine.
    load_prices(_table(tmp_path, "m,,default,1,0.1,4,,,,,,", "m,,flex,1,0.1,4,,,,,,"))


def test_shipped_table_has_batch_and_flex_at_half_the_default() -> None:
    prices = load_prices()
    by_key = {(p.model, p.service_tier): p for p in prices.prices}
    for model in ("gpt-5.5", "gpt-5.1", "gpt-5", "gpt-5-mini", "gpt-5-nano"):
        default = by_key[(model, None)].rates
        for tier in ("batch", "flex"):
            rates = by_key[(model, tier)].rates
            assert rates.input_per_mtok == pytest.approx(default.input_per_mtok / 2)
            assert rates.output_per_mtok == pytest.approx(default.output_per_mtok / 2)
    for model in ("gpt-4.1", "gpt-4.1-mini", "gpt-4o", "gpt-4o-mini"):
        assert (model, "batch") in by_key and (model, "flex") not in by_key
    assert by_key[("gpt-5.5", "priority")].rates.input_per_mtok == 12.5


# ------------------------------------------- the costs view and report --by tier


def _row(
    tier: str | None, model: str, prompt: int, cached: int, completion: int, **kw: Any
) -> dict[str, Any]:
    when = kw.pop("finished_at", datetime(2026, 6, 1, 12, tzinfo=UTC))
    return {
        "run_id": "r1",
        "id": kw.pop("id"),
        "status": "ok",
        "provider": "openai",
        "model": model,
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "reasoning_tokens": 0,
        "service_tier": tier,
        "finished_at": when,
        "started_at": when,
        **kw,
    }


def _mixed_out(out: Path) -> None:
    """An OUT with synchronous default (NULL and 'default'), flex, priority and batch
    rows, one long-context batch row, and an old part written before the tier columns."""
    rows = [
        _row(None, "gpt-5.5", 1_000, 200, 300, id="a"),
        _row("default", "gpt-5.5", 2_000, 0, 100, id="b"),
        _row("flex", "gpt-5.5", 3_000, 1_000, 500, id="c"),
        _row("flex", "gpt-5-mini", 5_000, 0, 900, id="d"),
        _row("priority", "gpt-5.5", 700, 0, 70, id="e"),
        _row("batch", "gpt-5.5", 4_000, 0, 400, id="f", batch_id="batch_1"),
        _row("batch", "gpt-5.5", 300_000, 0, 1_000, id="g", batch_id="batch_1"),
        _row("batch", "gpt-4o-mini", 8_000, 0, 800, id="h", batch_id="batch_2"),
        _row("flex", "gpt-4o", 1_000, 0, 100, id="i"),  # no flex price: unpriced
    ]
    (out / "results").mkdir(parents=True)
    pq.write_table(results_table(rows), out / "results" / "new.parquet")
    old = results_table([_row(None, "gpt-5-mini", 600, 0, 60, id="j")])
    old = old.drop_columns(["service_tier", "batch_id"])
    pq.write_table(old, out / "results" / "old.parquet")


def _recompute(out: Path, prices_csv: Path) -> dict[str | None, dict[str, Any]]:
    """The report by service_tier, recomputed from the Parquet rows and the CSV alone."""
    with prices_csv.open(newline="", encoding="utf-8") as fh:
        table = list(csv.DictReader(fh))
    groups: dict[str | None, dict[str, Any]] = defaultdict(
        lambda: {"requests": 0, "cost": 0.0, "unpriced": False}
    )
    for part in sorted((out / "results").glob("*.parquet")):
        for r in pq.read_table(part).to_pylist():
            tier = r.get("service_tier")
            key = "" if tier in (None, "default", "auto") else tier
            day = r["finished_at"].date().isoformat()
            rows = [
                p
                for p in table
                if p["model"] == r["model"]
                and p["service_tier"] == key
                and (p["valid_from"] or "0000") <= day
            ]
            group = groups[tier]
            group["requests"] += 1
            if not rows:
                group["unpriced"] = True
                continue
            p = max(rows, key=lambda p: p["valid_from"])
            long = p["long_context_threshold"] and r["prompt_tokens"] > int(
                p["long_context_threshold"]
            )
            pre = "long_" if long else ""
            inp, cached, output = (
                float(p[f"{pre}{k}_per_mtok"]) for k in ("input", "cached_input", "output")
            )
            group["cost"] += (
                (r["prompt_tokens"] - r["cached_tokens"]) * inp
                + r["cached_tokens"] * cached
                + r["completion_tokens"] * output
            ) / 1e6
    return groups


def test_report_by_service_tier_equals_an_independent_recomputation(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _mixed_out(out)
    code, stdout, err = invoke("report", str(out), "--by", "service_tier", "--format", "json")
    assert code == 0
    got = {g["service_tier"]: g for g in json.loads(stdout)}
    expected = _recompute(out, SHIPPED_PRICES)
    assert set(got) == set(expected) == {None, "default", "flex", "priority", "batch"}
    for tier, want in expected.items():
        assert got[tier]["requests"] == want["requests"], tier
        assert got[tier]["unpriced"] is want["unpriced"], tier
        if want["unpriced"]:
            assert got[tier]["cost_usd"] is None
            assert got[tier]["priced_cost_usd"] == pytest.approx(want["cost"], abs=1e-9)
        else:
            assert got[tier]["cost_usd"] == pytest.approx(want["cost"], abs=1e-9), tier
    # The flex group is unpriced because gpt-4o has no flex price, and says so.
    assert "gpt-4o" in err and "'flex'" in err


def test_report_by_service_tier_and_model(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _mixed_out(out)
    code, stdout, _ = invoke("report", str(out), "--by", "service_tier,model", "--format", "json")
    assert code == 0
    got = {(g["service_tier"], g["model"]): g for g in json.loads(stdout)}
    batch = got[("batch", "gpt-5.5")]
    # One short row at batch rates, one long-context row at batch long rates.
    want = (4_000 * 2.5 + 400 * 15.0) / 1e6 + (300_000 * 5.0 + 1_000 * 22.5) / 1e6
    assert batch["cost_usd"] == pytest.approx(want, abs=1e-12)
    assert got[("flex", "gpt-4o")]["unpriced"] is True
    assert got[("flex", "gpt-5.5")]["unpriced"] is False


def test_old_parts_without_tier_columns_still_report_at_default_prices(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "results").mkdir(parents=True)
    old = results_table([_row(None, "gpt-5-mini", 1_000, 0, 100, id="x")])
    pq.write_table(old.drop_columns(["service_tier", "batch_id"]), out / "results" / "p.parquet")
    con = open_views(out)
    try:
        (row,) = fetch_dicts(con, "SELECT service_tier, batch_id, cost_usd FROM costs", [])
    finally:
        con.close()
    assert row["service_tier"] is None and row["batch_id"] is None
    assert row["cost_usd"] == pytest.approx((1_000 * 0.25 + 100 * 2.0) / 1e6)


def test_costs_view_and_find_price_agree_per_tier(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _mixed_out(out)
    prices = load_prices()
    con = open_views(out)
    try:
        rows = fetch_dicts(
            con,
            "SELECT model, provider, service_tier, finished_at, prompt_tokens, cached_tokens,"
            " completion_tokens, cost_usd, unpriced FROM costs",
            [],
        )
    finally:
        con.close()
    for r in rows:
        price = find_price(
            prices, r["model"], r["provider"], r["finished_at"], service_tier=r["service_tier"]
        )
        if price is None:
            assert r["unpriced"] and r["cost_usd"] is None
        else:
            cost = price.cost(r["prompt_tokens"], r["cached_tokens"], r["completion_tokens"])
            assert r["cost_usd"] == pytest.approx(cost, abs=1e-12)


def test_result_schema_ends_with_the_tier_columns() -> None:
    assert RESULT_SCHEMA.names[-2:] == ["service_tier", "batch_id"]
    assert RESULT_SCHEMA.field("service_tier").type == pa.string()
    assert RESULT_SCHEMA.field("batch_id").nullable


# ---------------------------------------------------------------- --max-cost


def _flex_job(model: str) -> Any:
    return _job(
        {"id": "a", "prompt": "hello", "max_tokens": 1000},
        RequestOptions(model=model, service_tier="flex"),
    )


def test_budget_holds_a_flex_request_at_flex_prices() -> None:
    prices = load_prices()
    flex = Budget(1.0, prices, "openai").reserve(_flex_job("gpt-5.5")).amount
    plain = _job(
        {"id": "a", "prompt": "hello", "max_tokens": 1000}, RequestOptions(model="gpt-5.5")
    )
    default = Budget(1.0, prices, "openai").reserve(plain).amount
    batch = Budget(1.0, prices, "openai").reserve(plain, tier="batch").amount
    assert flex == pytest.approx(default / 2) and batch == pytest.approx(default / 2)


def test_budget_refuses_a_tier_without_a_price() -> None:
    with pytest.raises(BudgetExceeded, match="service tier 'flex'"):
        Budget(1.0, load_prices(), "openai").reserve(_flex_job("gpt-4o"))


def test_budget_books_the_tier_the_answer_reports() -> None:
    budget = Budget(10.0, load_prices(), "openai")
    usage = Usage(prompt_tokens=100_000, completion_tokens=0, total_tokens=100_000)
    hold = budget.reserve(_flex_job("gpt-5.5"))
    assert budget.settle(hold, "gpt-5.5", usage, service_tier="default") == pytest.approx(0.5)
    hold = budget.reserve(_flex_job("gpt-5.5"))
    assert budget.settle(hold, "gpt-5.5", usage, service_tier="flex") == pytest.approx(0.25)
    hold = budget.reserve(_flex_job("gpt-5.5"))
    booked = budget.settle(hold, "gpt-5.5", usage, service_tier="scale")  # no price
    assert booked == pytest.approx(hold.amount)


# ---------------------------------------------------------------------- estimate


def test_estimate_shows_the_synchronous_and_the_batch_price(tmp_path: Path) -> None:
    src = write_jsonl(
        tmp_path / "in.jsonl",
        [{"id": "a", "prompt": "hello", "model": "gpt-5.5", "max_tokens": 100}],
    )
    args = [str(src), "--out", str(tmp_path / "out"), "--provider", "openai", "--format", "json"]
    code, stdout, _ = invoke("estimate", *args)
    assert code == 0
    total = json.loads(stdout)["total"]
    assert total["batch_cost_high_usd"] == pytest.approx(total["cost_high_usd"] / 2)
    code, stdout, _ = invoke("estimate", *args, "--service-tier", "priority")
    data = json.loads(stdout)
    assert data["service_tier"] == "priority"
    assert data["total"]["cost_high_usd"] == pytest.approx(total["cost_high_usd"] * 2.5)
    assert data["total"]["batch_cost_high_usd"] == pytest.approx(total["batch_cost_high_usd"])
    code, stdout, _ = invoke("estimate", *args[:-2])
    assert "batch cost" in stdout


def test_estimate_names_a_model_without_a_batch_price_never_zero(tmp_path: Path) -> None:
    src = write_jsonl(
        tmp_path / "in.jsonl",
        [
            {"id": "a", "prompt": "hello", "model": "gpt-5.5", "max_tokens": 100},
            {"id": "b", "prompt": "hello", "model": "gpt-5.1-thinking", "max_tokens": 100},
        ],
    )
    args = [str(src), "--out", str(tmp_path / "out"), "--provider", "openai"]
    code, stdout, _ = invoke("estimate", *args, "--format", "json")
    total = json.loads(stdout)["total"]
    assert code == 0 and total["batch_cost_high_usd"] is None
    assert total["batch_unpriced_models"] == ["gpt-5.1-thinking"]
    assert total["cost_high_usd"] is not None  # the synchronous price is complete
    _, table, _ = invoke("estimate", *args)
    assert "+ no batch price" in table and "No batch price: model 'gpt-5.1-thinking'" in table


def test_a_providers_file_may_say_which_tiers_a_gateway_takes(tmp_path: Path) -> None:
    from pipeline.providers import load_providers

    path = tmp_path / "gw.toml"
    path.write_text(
        '[plain]\nbase_url = "https://a.test/v1"\nservice_tiers = []\nbatch_api = false\n'
        '[flexy]\nbase_url = "https://b.test/v1"\nservice_tiers = ["default", "flex"]\n'
        '[unknown]\nbase_url = "https://c.test/v1"\n',
        encoding="utf-8",
    )
    gateways = load_providers(path)
    with pytest.raises(UsageError, match="no service tiers"):
        check_service_tier(gateways["plain"], "flex")
    check_service_tier(gateways["flexy"], "flex")
    with pytest.raises(UsageError, match="accepts only default, flex"):
        check_service_tier(gateways["flexy"], "priority")
    check_service_tier(gateways["unknown"], "priority")
    assert gateways["plain"].batch_api is False and gateways["unknown"].batch_api is None
    path.write_text('[bad]\nbase_url = "https://a.test/v1"\nservice_tiers = ["gold"]\n')
    with pytest.raises(UsageError, match="service_tiers must be"):
        load_providers(path)
