"""--max-cost: the run stops before the cap is passed, never after."""

from __future__ import annotations

from pathlib import Path

from pipeline.pricing import find_price, load_prices
from pipeline.sim import Simulator
from tests.conftest import prompts, run_with_sim, write_jsonl


def billed_usd(sim: Simulator) -> float:
    prices = load_prices()
    total = 0.0
    for b in sim.ledger:
        u = b.usage
        cached = (u.get("prompt_tokens_details") or {}).get("cached_tokens")
        price = find_price(prices, b.model, "sim", None)
        assert price is not None
        total += price.cost(u["prompt_tokens"], cached or 0, u["completion_tokens"])
    return total


def test_max_cost_stops_between_half_and_all_of_the_cap(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "rows.jsonl", prompts(1000))  # type: ignore[arg-type]
    run = run_with_sim([src], tmp_path / "out", max_cost=0.05, concurrency=16)
    assert run.result.exit_code == 3
    assert "max-cost" in (run.result.fatal or "")
    billed = billed_usd(run.sim)
    assert 0.025 <= billed <= 0.05, billed
    assert abs(run.result.tally.cost_usd - billed) < 1e-9
    ok = [r for r in run.rows() if r["status"] == "ok"]
    assert len(ok) == len(run.sim.ledger), "every billed answer is kept"


def test_max_cost_with_an_unpriced_model_stops_before_sending(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "rows.jsonl", prompts(10))  # type: ignore[arg-type]
    run = run_with_sim([src], tmp_path / "out", max_cost=1.0, model="mystery-model")
    assert run.result.exit_code == 3
    assert "no price" in (run.result.fatal or "")
    assert run.sim.stats["requests"] == 0


def test_max_cost_large_enough_lets_the_run_finish(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "rows.jsonl", prompts(50))  # type: ignore[arg-type]
    run = run_with_sim([src], tmp_path / "out", max_cost=10.0)
    assert run.result.exit_code == 0
    assert abs(run.result.tally.cost_usd - billed_usd(run.sim)) < 1e-9


def test_holds_in_flight_make_a_request_wait_not_stop_the_run(tmp_path: Path) -> None:
    # 32 in flight, each held at its worst case (512 completion tokens, ~$0.015 for
    # gpt-5.5) against a $0.02 cap: the second request does not fit while the first is
    # in flight. It must wait for that answer (~$0.0003) instead of ending the run there.
    src = write_jsonl(tmp_path / "rows.jsonl", prompts(1000))  # type: ignore[arg-type]
    run = run_with_sim([src], tmp_path / "out", max_cost=0.02, concurrency=32)
    assert run.result.exit_code == 3
    billed = billed_usd(run.sim)
    assert 0.018 <= billed <= 0.02, f"stopped at ${billed:.4f} of a $0.02 cap"
    assert abs(run.result.tally.cost_usd - billed) < 1e-9


def test_a_leased_budget_is_topped_up_while_requests_are_in_flight(tmp_path: Path) -> None:
    """On Ray each worker leases --max-cost in small grants. Asking for more only once
    every request in flight had settled held a worker to a grant's worth of requests
    in flight; asking while they fly keeps --concurrency busy."""
    import anyio

    from pipeline.budget import Budget
    from pipeline.config import RunOptions
    from pipeline.local import build_runner, file_source, make_client
    from pipeline.resume import Outcomes
    from pipeline.sim import SimConfig, sim_transport
    from tests.conftest import FakeClock

    clock = FakeClock()
    sim = Simulator(SimConfig(latency_ms=100), clock=clock, sleep=clock.sleep)
    src = write_jsonl(tmp_path / "rows.jsonl", prompts(320))  # type: ignore[arg-type]
    opts = RunOptions(
        sources=[str(src)], out=tmp_path / "out", model="gpt-5.5", concurrency=32,
        max_cost=100.0, quiet=True,
    )  # fmt: skip
    leases: list[float] = []

    async def top_up(budget: Budget, amount: float) -> bool | None:
        grant = amount * 2  # two requests' worth, as a small slice of a big job would be
        budget.lease(grant)
        leases.append(grant)
        return True

    runner = build_runner(
        opts,
        run_id="r",
        provider_name="sim",
        client=make_client(opts, ["http://sim/v1"], None, transport=sim_transport(sim)),
        outcomes=Outcomes(),
        source=file_source([src], opts.max_line_bytes),
        sleep=clock.sleep,
        clock=clock,
        budget_topup=top_up,
    )
    assert runner.budget is not None
    runner.budget.give_back(runner.budget.cap)  # every dollar is leased, as on Ray
    start = clock()
    result = anyio.run(runner.run)
    assert result.exit_code == 0 and result.tally.status["ok"] == 320
    # 320 rows x 100 ms at 32 in flight is ~1 s; two in flight would be ~16 s.
    assert clock() - start < 3.0, f"{clock() - start:.1f}s: the leases throttled the run"
    assert len(leases) > 10
