"""--max-cost: the run stops before the cap is passed, never after."""

from __future__ import annotations

from pathlib import Path

from pipeline.pricing import load_prices, row_cost
from pipeline.simulator import Simulator
from tests.conftest import prompts, run_with_sim, write_jsonl


def billed_usd(sim: Simulator) -> float:
    prices = load_prices()
    total = 0.0
    for b in sim.ledger:
        u = b.usage
        cached = (u.get("prompt_tokens_details") or {}).get("cached_tokens")
        cost = row_cost(
            prices, b.model, "sim", u["prompt_tokens"], cached, u["completion_tokens"], None
        )
        assert cost is not None
        total += cost
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
