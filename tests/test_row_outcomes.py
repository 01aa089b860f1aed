"""A row's trouble is the row's outcome: paid answers kept, the run goes on, re-asks resume.

Covers: an answer that cannot be checked (JSON nested past the recursion limit), a
bug while handling one row (``error_type = 'internal'``, the answer's tokens kept),
a run stopped while a rejected answer is asked again (the id stays pending), and
``--tpm`` charged for the completion at admission (no 429 burst at the start).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pipeline.runner
from pipeline.config import RunOptions
from pipeline.execute import execute
from pipeline.jsoncheck import check_answer, label_format
from pipeline.resume import load_outcomes
from pipeline.sim import SimConfig, Simulator
from tests.conftest import FakeClock, read_results, run_with_sim, write_jsonl

LABELS = ["positive", "negative", "mixed"]


def completion(content: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "gpt-5.5",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13},
    }  # fmt: skip


class Scripted(httpx.AsyncBaseTransport):
    """Answers each prompt with its next scripted reply: a content string, or a status."""

    def __init__(self, script: dict[str, list[str | int]]) -> None:
        self.script = script
        self.calls: dict[str, int] = {}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        prompt = json.loads(request.content)["messages"][-1]["content"]
        n = self.calls[prompt] = self.calls.get(prompt, 0) + 1
        answers = self.script[prompt]
        answer = answers[min(n, len(answers)) - 1]
        if isinstance(answer, int):
            body = {"error": {"type": "authentication_error", "message": "no"}}
            return httpx.Response(answer, json=body)
        return httpx.Response(200, json=completion(answer))


def run(
    tmp_path: Path, transport: httpx.AsyncBaseTransport, prompts: list[str], **options: Any
) -> tuple[int, list[dict[str, Any]]]:
    src = write_jsonl(tmp_path / "rows.jsonl", [{"id": p, "prompt": p} for p in prompts])  # type: ignore[arg-type]
    opts = RunOptions(
        sources=[str(src)], out=tmp_path / "out", base_url=["http://gw.invalid/v1"],
        model="gpt-5.5", quiet=True, **options,
    )  # fmt: skip
    clock = FakeClock()
    result = execute(opts, transport=transport, sleep=clock.sleep, clock=clock)
    return result.exit_code, read_results(tmp_path / "out")


# -- answers nobody can check ----------------------------------------------------------


def test_json_nested_past_the_recursion_limit_is_a_rejected_answer_not_a_crash(
    tmp_path: Path,
) -> None:
    bomb = "[" * 100_000 + "]" * 100_000
    script: dict[str, list[str | int]] = {"bomb": [bomb], "fine": ['{"label": "mixed"}']}
    transport = Scripted(script)
    code, rows = run(tmp_path, transport, ["bomb", "fine"], labels=LABELS, json_retries=1)
    assert code == 1, "finished, one row failed: not a crash"
    bombs = [r for r in rows if r["id"] == "bomb"]
    assert transport.calls["bomb"] == 2, "asked again once (json_retries=1), then given up"
    assert [r["error_type"] for r in bombs] == ["invalid_json", "invalid_json"]
    assert "nested too deeply" in bombs[-1]["error_message"]
    assert all(r["prompt_tokens"] == 10 for r in bombs), "both paid answers are journaled"
    assert [r["label"] for r in rows if r["id"] == "fine"] == ["mixed"]
    # the id has a final outcome: a plain re-run pays for nothing more
    again = Scripted(script)
    run(tmp_path, again, ["bomb", "fine"], labels=LABELS, json_retries=1)
    assert again.calls == {}


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200) | st.from_regex(r"[\[{\"\]},:0-9a-z ]{0,300}", fullmatch=True))
def test_check_answer_never_raises_on_any_text(content: str) -> None:
    parsed, problem = check_answer(label_format(LABELS), content)
    assert (parsed is None) != (problem is None)
    if problem is not None:
        assert len(problem) < 2000, "a problem text stays short whatever the answer"


def test_problem_text_quotes_a_huge_answer_value_only_in_part() -> None:
    _, problem = check_answer(label_format(LABELS), json.dumps({"label": "x" * 1_000_000}))
    assert problem is not None and len(problem) < 500


# -- a bug while handling one row ----------------------------------------------------------


def test_an_exception_while_handling_an_answer_ends_that_row_as_internal_with_its_tokens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = pipeline.runner.ok_row

    def broken(ctx: Any, job: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        if job.id == "unlucky":
            raise ZeroDivisionError("a bug")
        return real(ctx, job, *args, **kwargs)

    monkeypatch.setattr(pipeline.runner, "ok_row", broken)
    prompts = ["unlucky"] + [f"p{i}" for i in range(20)]
    transport = Scripted({p: ["fine"] for p in prompts})
    code, rows = run(tmp_path, transport, prompts)
    assert code == 1, "the run finished; one row failed"
    by_id = {r["id"]: r for r in rows}
    assert len(by_id) == 21 and sum(r["status"] == "ok" for r in rows) == 20
    bad = by_id["unlucky"]
    assert (bad["status"], bad["error_type"]) == ("error", "internal")
    assert bad["error_message"] == "ZeroDivisionError: a bug"
    assert (bad["prompt_tokens"], bad["completion_tokens"], bad["content"]) == (10, 3, "fine")
    again = Scripted({p: ["fine"] for p in prompts})
    run(tmp_path, again, prompts)
    assert again.calls == {}, "the paid answer is the row's outcome: never paid again"


def test_an_exception_before_sending_ends_that_row_as_internal_and_the_run_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = pipeline.runner.Runner._send_once

    async def broken(self: pipeline.runner.Runner, job: Any) -> Any:
        if job.id == "unlucky":
            raise KeyError("boom")
        return await real(self, job)

    monkeypatch.setattr(pipeline.runner.Runner, "_send_once", broken)
    prompts = ["unlucky", "a", "b"]
    code, rows = run(tmp_path, Scripted({p: ["fine"] for p in prompts}), prompts)
    assert code == 1
    by_id = {r["id"]: r for r in rows}
    assert by_id["unlucky"]["error_type"] == "internal"
    assert by_id["unlucky"]["error_message"] == "KeyError: 'boom'"
    assert by_id["unlucky"]["prompt_tokens"] is None, "nothing was billed"
    assert by_id["a"]["status"] == by_id["b"]["status"] == "ok"


# -- interrupted means pending ---------------------------------------------------------------


def test_a_run_stopped_during_a_re_ask_leaves_the_id_pending(tmp_path: Path) -> None:
    # The first answer breaks the label set; the re-ask meets a fatal 401 (run stops).
    stopped = Scripted({"r": ['{"label": "great"}', 401]})
    code, rows = run(tmp_path, stopped, ["r"], labels=LABELS, concurrency=1)
    assert code == 3
    assert [(r["error_type"], r["superseded"]) for r in rows] == [("invalid_json", True)]
    outcomes = load_outcomes(tmp_path / "out")
    assert "r" not in outcomes.failed and "r" not in outcomes.ok
    # A plain re-run (no --retry-failed) asks again and gets the label.
    again = Scripted({"r": ['{"label": "positive"}']})
    code, rows = run(tmp_path, again, ["r"], labels=LABELS)
    assert code == 0 and again.calls == {"r": 1}
    assert [r["label"] for r in rows if r["status"] == "ok"] == ["positive"]
    assert sum(r["prompt_tokens"] for r in rows) == 20, "both billed answers kept"


def test_the_last_rejected_answer_is_the_outcome_and_not_asked_again(tmp_path: Path) -> None:
    script: dict[str, list[str | int]] = {"r": ['{"label": "great"}', '{"label": "meh"}']}
    code, rows = run(tmp_path, Scripted(script), ["r"], labels=LABELS, json_retries=1)
    assert code == 1
    assert [r["superseded"] for r in rows] == [True, False]
    assert "r" in load_outcomes(tmp_path / "out").failed
    again = Scripted(script)
    run(tmp_path, again, ["r"], labels=LABELS, json_retries=1)
    assert again.calls == {}


# -- --tpm from the first second --------------------------------------------------------------


def test_tpm_charges_the_expected_completion_so_the_first_second_brings_no_429s(
    tmp_path: Path,
) -> None:
    # The server counts prompt + max_tokens against 6,000 tokens/min, as OpenAI does.
    rows = [{"id": f"r{i}", "prompt": f"row {i}", "max_tokens": 60} for i in range(40)]
    src = write_jsonl(tmp_path / "rows.jsonl", rows)  # type: ignore[arg-type]
    clock = FakeClock()
    sim = Simulator(SimConfig(tpm_limit=6000), clock=clock, sleep=clock.sleep)
    done = run_with_sim([src], tmp_path / "out", sim=sim, clock=clock, tpm=6000, concurrency=32)
    assert done.result.exit_code == 0
    # Charging the prompt alone drew 30 429s from 40 rows; the prompt itself is an
    # estimate (characters / 4), so one stray 429 is within what it can miss by.
    assert sim.stats["rate_limited"] <= 2, "admission charged the prompt only"
    billed = sum(b.usage["prompt_tokens"] + 60 for b in sim.ledger)
    elapsed = clock.now - 1000.0
    assert billed / elapsed * 60 <= 6000 * 1.15, "within the limit, burst included"


def test_max_cost_books_an_answer_without_usage_at_its_hold_not_at_zero() -> None:
    from pipeline.budget import Budget
    from pipeline.pricing import load_prices
    from pipeline.request import Job
    from pipeline.wire import Usage

    budget = Budget(1.0, load_prices(None), "sim")
    job = Job("r", {"model": "gpt-5.5", "max_tokens": 100}, "h", "f", 1, est_prompt_tokens=50)
    hold = budget.reserve(job)
    assert hold.amount > 0
    assert budget.settle(hold, "gpt-5.5", Usage()) == pytest.approx(hold.amount)
    assert budget.spent == pytest.approx(hold.amount), "an unknown is the most it could be"
    nothing = budget.reserve(job)
    assert budget.settle(nothing, "gpt-5.5", None) == 0.0, "no answer: nothing billed"


def test_latest_and_export_look_past_a_superseded_answer(tmp_path: Path) -> None:
    from pipeline.query import open_views

    stopped = Scripted({"r": ['{"label": "great"}', 401], "s": ['{"label": "mixed"}']})
    run(tmp_path, stopped, ["s", "r"], labels=LABELS, concurrency=1)  # s first, then r stops
    con = open_views(tmp_path / "out")
    try:
        latest = con.execute("SELECT id, status FROM latest ORDER BY id").fetchall()
        billed = con.execute("SELECT count(*) FROM results WHERE id = 'r'").fetchone()
    finally:
        con.close()
    assert latest == [("s", "ok")], "r is pending: its only row was asked again"
    assert billed == (1,), "the rejected answer stays in results (and in the costs)"
