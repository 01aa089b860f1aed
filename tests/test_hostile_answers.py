"""Hostile answers and OUT folders found by a review: none may stop the run or lose a
paid answer. Each test fails on the code before the fix."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from pipeline.config import RunOptions
from pipeline.errors import UsageError
from pipeline.execute import execute
from pipeline.limiter import Limits, RateLimiter
from pipeline.sim import SimConfig, Simulator
from pipeline.source import expand_sources, open_regular
from tests.conftest import FakeClock, read_results, run_with_sim, write_jsonl


def answering(body: bytes, headers: dict[str, str] | None = None, status: int = 200) -> Any:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            status, content=body, headers={"content-type": "application/json", **(headers or {})}
        )

    return httpx.MockTransport(handler)


def completion(
    content: str = '"fine"', usage: str = '{"prompt_tokens": 5, "completion_tokens": 2}'
) -> bytes:
    return (
        '{"id": "c1", "model": "m", "choices": [{"index": 0, "finish_reason": "stop", '
        f'"message": {{"role": "assistant", "content": {content}}}}}], "usage": {usage}}}'
    ).encode()


def run(tmp_path: Path, transport: Any, n: int = 3) -> tuple[int, list[dict[str, Any]]]:
    src = write_jsonl(
        tmp_path / "rows.jsonl", [{"id": f"r{i}", "prompt": f"p{i}"} for i in range(n)]
    )  # type: ignore[arg-type]
    opts = RunOptions(
        sources=[str(src)], out=tmp_path / "out", base_url=["http://gw.invalid/v1"],
        model="m", quiet=True, max_attempts=2,
    )  # fmt: skip
    clock = FakeClock()
    result = execute(opts, transport=transport, sleep=clock.sleep, clock=clock)
    return result.exit_code, read_results(tmp_path / "out")


def test_a_lone_surrogate_in_an_answer_is_stored_repaired_not_a_crash(tmp_path: Path) -> None:
    code, rows = run(tmp_path, answering(completion('"a\\ud800b \\ud83d\\ude00"')))
    assert code == 0 and len(rows) == 3
    assert {r["content"] for r in rows} == {"a\ufffdb \U0001f600"}, "pairs kept, halves replaced"
    assert all(r["prompt_tokens"] == 5 for r in rows), "the paid answers are all kept"


def test_a_lone_surrogate_in_an_error_message_ends_the_row_not_the_run(tmp_path: Path) -> None:
    body = b'{"error": {"type": "invalid_request_error", "message": "bad \\ud800 thing"}}'
    code, rows = run(tmp_path, answering(body, status=400))
    assert code == 1 and len(rows) == 3
    assert all("bad \ufffd thing" in r["error_message"] for r in rows)


@pytest.mark.parametrize(
    "usage", ['{"prompt_tokens": 100000000000000000000000, "completion_tokens": 2}',
              '{"prompt_tokens": -5, "completion_tokens": 2}',
              '{"prompt_tokens": 5, "completion_tokens": 2, '
              '"completion_tokens_details": {"reasoning_tokens": 99999999999999999999999}}'],
)  # fmt: skip
def test_impossible_token_counts_are_unknown_not_a_broken_out(tmp_path: Path, usage: str) -> None:
    code, rows = run(tmp_path, answering(completion(usage=usage)))
    assert code == 0 and len(rows) == 3
    assert all(r["content"] == "fine" for r in rows)
    assert all(r["prompt_tokens"] is None or r["prompt_tokens"] == 5 for r in rows), (
        "a count that cannot be true is NULL (flagged as no usage), never stored"
    )
    assert all(r["reasoning_tokens"] is None for r in rows)
    code, _ = run(tmp_path, answering(completion(usage=usage)))  # OUT still opens
    assert code == 0


def test_an_absurd_rate_limit_header_does_not_throw_the_paid_answer_away(tmp_path: Path) -> None:
    headers = {"x-ratelimit-limit-requests": "1e400", "x-ratelimit-reset-requests": "inf"}
    code, rows = run(tmp_path, answering(completion(), headers))
    assert code == 0
    assert [r["status"] for r in rows] == ["ok"] * 3 and all(r["content"] == "fine" for r in rows)


def test_a_file_swapped_for_a_named_pipe_is_refused_at_open_not_waited_on(tmp_path: Path) -> None:
    fifo = tmp_path / "rows.jsonl"
    os.mkfifo(fifo)
    started = time.monotonic()
    with pytest.raises(OSError, match="named pipe"):
        open_regular(fifo)
    assert time.monotonic() - started < 2.0, "the open must not wait for a writer"


def test_another_runs_results_folder_inside_an_input_folder_is_not_read(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    src = write_jsonl(data / "rows.jsonl", [{"id": "a", "prompt": "x"}])
    run_with_sim([data], data / "first")  # an OUT inside the input folder
    (data / "first" / "export.jsonl").write_text('{"id": "a", "status": "ok"}\n')
    notes: list[str] = []
    files = expand_sources([str(data)], out=tmp_path / "second", say=notes.append)
    assert files == [src]
    assert any("results folder" in n for n in notes)
    assert expand_sources([f"{data}/**/*.jsonl"], out=tmp_path / "second", say=notes.append) == [
        src
    ]
    again = run_with_sim([data], tmp_path / "second")
    assert again.result.exit_code == 0 and [r["id"] for r in again.rows()] == ["a"]


def test_an_unreadable_part_in_out_is_a_usage_error_naming_it(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "rows.jsonl", [{"id": "a", "prompt": "x"}])
    junk = tmp_path / "out" / "results" / "junk.parquet"
    junk.parent.mkdir(parents=True)
    junk.write_bytes(b"")
    with pytest.raises(UsageError, match="junk.parquet"):
        run_with_sim([src], tmp_path / "out")


@pytest.mark.anyio
async def test_tpm_first_wave_waits_for_the_first_answer_when_rows_set_no_max(
    clock: FakeClock,
) -> None:
    limiter = RateLimiter(Limits(64, tpm=60_000), clock=clock, sleep=clock.sleep)  # 1,000 tokens/s
    first = await limiter.acquire(limiter.expected_tokens(10, None))
    start = clock.now
    await limiter.acquire(limiter.expected_tokens(10, None))
    assert clock.now - start >= 0.99, "the second unknown-size request waits a full bucket"
    limiter.release(first, used_tokens=40, completion_tokens=30)
    assert limiter.expected_tokens(10, None) == 40, "then the mean completion is charged"
    assert limiter.expected_tokens(10, 500) == 510, "a row's max_tokens is charged whole"


def test_simulated_run_with_3000_token_answers_stays_under_tpm(tmp_path: Path) -> None:
    rows = [{"id": f"r{i}", "prompt": f"row {i}"} for i in range(12)]
    src = write_jsonl(tmp_path / "rows.jsonl", rows)  # type: ignore[arg-type]
    clock = FakeClock()
    sim = Simulator(SimConfig(tpm_limit=60_000), clock=clock, sleep=clock.sleep)
    done = run_with_sim([src], tmp_path / "out", sim=sim, clock=clock, tpm=60_000)
    assert done.result.exit_code == 0
    billed = sum(b.usage["total_tokens"] for b in sim.ledger)
    assert billed / max(clock.now - 1000.0, 1.0) * 60 <= 60_000 * 1.3
    assert json.dumps(done.rows()[0]["content"])
