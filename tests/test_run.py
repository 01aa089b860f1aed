"""End to end: rows in, Parquet out, against the simulator (in process and over HTTP)."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import local
from pipeline.config import RunOptions
from pipeline.errors import LockedError
from pipeline.execute import execute
from pipeline.local import EVENT_LOOP_ENV
from pipeline.lock import OutLock
from pipeline.sim import SimConfig, Simulator
from tests.conftest import FakeClock, prompts, read_results, run_with_sim, write_jsonl

TOKEN_COLUMNS = ("prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens")


def mixed_inputs(tmp_path: Path, n_each: int) -> tuple[list[Path], set[str]]:
    """Flat rows, messages rows and Batch-API lines in one JSONL, plus a Parquet file."""
    lines: list[dict[str, Any]] = []
    for i in range(n_each):
        lines.append({"id": f"flat-{i}", "prompt": f"Label item {i}", "system_prompt": "Be brief."})
        lines.append(
            {
                "id": f"msg-{i}",
                "messages": [
                    {"role": "developer", "content": "Answer in one word."},
                    {"role": "user", "content": [{"type": "text", "text": f"Item {i}?"}]},
                ],
                "temperature": 0.3,
                "metadata": {"batch": "b1", "n": i},
            }
        )
        lines.append(
            {
                "custom_id": f"batch-{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {
                    "model": "gpt-5.1-thinking",
                    "messages": [{"role": "user", "content": f"Think about {i}"}],
                    "max_completion_tokens": 4000,
                },
            }
        )
    jsonl = write_jsonl(tmp_path / "mixed.jsonl", lines)  # type: ignore[arg-type]
    parquet = tmp_path / "more.parquet"
    pq.write_table(
        pa.Table.from_pylist(
            [{"id": f"pq-{i}", "prompt": f"Parquet row {i}", "shop": "a"} for i in range(n_each)]
        ),
        parquet,
    )
    ids = {f"{kind}-{i}" for kind in ("flat", "msg", "batch", "pq") for i in range(n_each)}
    return [jsonl, parquet], ids


def assert_tokens_match_server(rows: list[dict[str, Any]], sim: Simulator) -> None:
    for row in rows:
        if row["status"] != "ok":
            continue
        billed = sim.billed_usage(row["response_id"])
        assert billed is not None, f"{row['id']}: response {row['response_id']} never billed"
        details = billed.get("prompt_tokens_details") or {}
        assert row["prompt_tokens"] == billed["prompt_tokens"]
        assert row["completion_tokens"] == billed["completion_tokens"]
        assert row["total_tokens"] == billed["total_tokens"]
        assert row["cached_tokens"] == details.get("cached_tokens")
        reasoning = (billed.get("completion_tokens_details") or {}).get("reasoning_tokens")
        assert row["reasoning_tokens"] == reasoning


@pytest.mark.parametrize("loop", ["auto", "asyncio"])
def test_mixed_350_rows_over_http(
    tmp_path: Path,
    sim_server: tuple[Simulator, str],
    monkeypatch: pytest.MonkeyPatch,
    loop: str,
) -> None:
    """Every input form over real HTTP, on uvloop (the default) and on asyncio alike."""
    sim, url = sim_server
    monkeypatch.setenv(EVENT_LOOP_ENV, loop)
    loops: list[str] = []
    real_run = anyio.run

    def run(func: Any, *args: Any, **options: Any) -> Any:
        def which() -> Any:
            loops.append(type(asyncio.get_running_loop()).__module__.split(".")[0])
            return func(*args)

        return real_run(which, **options)

    monkeypatch.setattr(local.anyio, "run", run)
    sources, ids = mixed_inputs(tmp_path, 88)  # 4 forms x 88 = 352 rows
    out = tmp_path / "out"
    opts = RunOptions(
        sources=[str(s) for s in sources],
        out=out,
        base_url=[url.removesuffix("/v1")],  # host:port without /v1 works too
        model="gpt-5.5",
        concurrency=16,
        quiet=True,
    )
    result = execute(opts)
    assert result.exit_code == 0
    uvloop = loop == "auto" and importlib.util.find_spec("uvloop") is not None
    assert loops == ["uvloop" if uvloop else "asyncio"]
    rows = read_results(out)
    ok = Counter(r["id"] for r in rows if r["status"] == "ok")
    assert set(ok) == ids
    assert max(ok.values()) == 1, "an id has two ok rows"
    assert_tokens_match_server(rows, sim)
    by_id = {r["id"]: r for r in rows}
    assert by_id["batch-3"]["model"] == "gpt-5.1-thinking"
    assert by_id["batch-3"]["reasoning_content"]
    assert by_id["batch-3"]["reasoning_tokens"] > 0
    assert json.loads(by_id["msg-5"]["metadata"]) == {"batch": "b1", "n": 5}
    assert by_id["pq-7"]["shop"] == "a", "carried Parquet column missing"
    assert by_id["pq-7"]["source_line"] == 8
    manifest = json.loads(next((out / "runs").glob("*.json")).read_text())
    assert manifest["counts"]["ok"] == len(ids) and manifest["exit_code"] == 0
    # The CPU the run cost (for CPU per request), never more than the process used.
    assert 0 < manifest["cpu_seconds"] <= time.process_time()


def test_rerun_sends_nothing_already_ok(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "rows.jsonl", prompts(50))  # type: ignore[arg-type]
    clock = FakeClock()
    sim = Simulator(SimConfig(), clock=clock, sleep=clock.sleep)
    first = run_with_sim([src], tmp_path / "out", sim=sim, clock=clock)
    assert first.result.exit_code == 0
    sent = sim.stats["requests"]
    assert sent == 50
    # cron pattern: new rows appended, only they are sent
    write_jsonl(src, prompts(50) + prompts(5, "new"))  # type: ignore[arg-type]
    second = run_with_sim([src], tmp_path / "out", sim=sim, clock=clock)
    assert second.result.exit_code == 0
    assert sim.stats["requests"] == sent + 5
    assert second.result.tally.skipped == 50
    ok_ids = Counter(r["id"] for r in read_results(tmp_path / "out") if r["status"] == "ok")
    assert len(ok_ids) == 55 and max(ok_ids.values()) == 1


def test_invalid_rows_are_recorded_not_sent(tmp_path: Path) -> None:
    src = write_jsonl(
        tmp_path / "rows.jsonl",
        [
            {"id": "good-1", "prompt": "hello"},
            "{not json",
            {"id": "empty"},
            {"id": "hot", "prompt": "x", "temperature": 7},
            {"id": "good-2", "prompt": "hello again"},
        ],
    )
    run = run_with_sim([src], tmp_path / "out")
    assert run.result.exit_code == 1
    assert run.sim.stats["requests"] == 2
    rows = {r["id"]: r for r in run.rows()}
    assert rows["good-1"]["status"] == rows["good-2"]["status"] == "ok"
    bad = rows["rows.jsonl:2"]
    assert bad["error_type"] == "invalid_input" and f"{src}:2" in bad["error_message"]
    assert "nothing to send" in rows["empty"]["error_message"]
    assert f"{src}:3" in rows["empty"]["error_message"]
    assert "temperature" in rows["hot"]["error_message"]
    # invalid rows are not re-sent (or re-reported) by a plain re-run
    again = run_with_sim([src], tmp_path / "out", sim=run.sim)
    assert again.result.exit_code == 0 and again.sim.stats["requests"] == 2


def test_wrong_key_stops_at_once_and_never_leaks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = "sk-wrong-0123456789abcdef"
    monkeypatch.setenv("MY_KEY", secret)
    src = write_jsonl(tmp_path / "rows.jsonl", prompts(1000))  # type: ignore[arg-type]
    clock = FakeClock()
    sim = Simulator(SimConfig(api_key="sk-right"), clock=clock, sleep=clock.sleep)
    run = run_with_sim(
        [src], tmp_path / "out", sim=sim, clock=clock, concurrency=32, api_key_env="MY_KEY"
    )
    assert run.result.exit_code == 3
    assert sim.stats["requests"] <= 32
    assert "API key" in (run.result.fatal or "")
    assert run.rows() == [], "rows cut off by a fatal stop stay pending, with no outcome row"
    for path in (tmp_path / "out").rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), f"key written to {path}"
    captured = capsys.readouterr()
    assert secret not in captured.out + captured.err


def test_quota_runs_out_then_top_up_sends_only_the_rest(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "rows.jsonl", prompts(400))  # type: ignore[arg-type]
    clock = FakeClock()
    sim = Simulator(SimConfig(quota_requests=120), clock=clock, sleep=clock.sleep)
    first = run_with_sim([src], tmp_path / "out", sim=sim, clock=clock, concurrency=8)
    assert first.result.exit_code == 3
    ok = [r for r in first.rows() if r["status"] == "ok"]
    assert len(ok) == 120 and all(r["status"] == "ok" for r in first.rows())
    topped_up = Simulator(SimConfig(), clock=clock, sleep=clock.sleep)
    second = run_with_sim([src], tmp_path / "out", sim=topped_up, clock=clock)
    assert second.result.exit_code == 0
    assert topped_up.stats["requests"] == 280


def test_quota_as_429_is_fatal_not_retried(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "rows.jsonl", prompts(100))  # type: ignore[arg-type]
    clock = FakeClock()
    config = SimConfig(quota_requests=10, quota_as_429=True)
    sim = Simulator(config, clock=clock, sleep=clock.sleep)
    run = run_with_sim([src], tmp_path / "out", sim=sim, clock=clock, concurrency=4)
    assert run.result.exit_code == 3
    assert sim.stats["requests"] <= 10 + 4


def test_transient_errors_are_retried_and_billed_once(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "rows.jsonl", prompts(300))  # type: ignore[arg-type]
    clock = FakeClock()
    config = SimConfig(fail_429_rate=0.08, fail_5xx_rate=0.10, truncate_rate=0.03, drop_rate=0.02)
    sim = Simulator(config, clock=clock, sleep=clock.sleep)
    # ~15% of answers fail for good reasons: with the default 6 attempts, 2 of 30
    # retry-jitter sequences left one row out of attempts. This test is about retrying
    # and billing, not about giving up, so it allows more attempts.
    run = run_with_sim(
        [src], tmp_path / "out", sim=sim, clock=clock, concurrency=16, max_attempts=10
    )
    assert run.result.exit_code == 0
    rows = run.rows()
    assert len(rows) == 300 and all(r["status"] == "ok" for r in rows)
    assert any(r["attempts"] > 1 for r in rows)
    assert_tokens_match_server(rows, sim)
    recorded = sum(r["total_tokens"] for r in rows)
    billed_whole = sum(b.usage["total_tokens"] for b in sim.ledger if not b.truncated)
    assert recorded == billed_whole, "recorded tokens differ from the server's complete answers"


def test_permanent_errors_are_not_retried(tmp_path: Path) -> None:
    src = write_jsonl(
        tmp_path / "rows.jsonl",
        [{"id": "a", "prompt": "hi", "model": "no-such-model"}, {"id": "b", "prompt": "hi"}],
    )
    clock = FakeClock()
    sim = Simulator(SimConfig(models=("gpt-5.5",)), clock=clock, sleep=clock.sleep)
    run = run_with_sim([src], tmp_path / "out", sim=sim, clock=clock)
    assert run.result.exit_code == 1
    rows = {r["id"]: r for r in run.rows()}
    assert rows["b"]["status"] == "ok"
    a = rows["a"]
    assert (a["status"], a["http_status"], a["attempts"]) == ("error", 404, 1)
    assert a["error_type"] == "not_found_error" and a["fallback_suggestion"]


def test_streamed_run_survives_cut_streams(tmp_path: Path) -> None:
    rows_in = [
        {"id": f"t-{i}", "prompt": f"Reason about {i}", "model": "gpt-5.1-thinking"}
        for i in range(150)
    ]
    src = write_jsonl(tmp_path / "rows.jsonl", rows_in)  # type: ignore[arg-type]
    clock = FakeClock()
    sim = Simulator(SimConfig(stream_cut_rate=0.05), clock=clock, sleep=clock.sleep)
    run = run_with_sim([src], tmp_path / "out", sim=sim, clock=clock, stream=True)
    assert run.result.exit_code == 0
    rows = run.rows()
    assert len(rows) == 150 and all(r["reasoning_content"] for r in rows)
    assert sim.stats["stream_cut"] > 0
    assert_tokens_match_server(rows, sim)


def test_second_run_on_same_out_is_refused(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "rows.jsonl", prompts(3))  # type: ignore[arg-type]
    out = tmp_path / "out"
    with OutLock(out) as held:
        held.acquire("someone-else")
        with pytest.raises(LockedError, match="in use"):
            execute(RunOptions(sources=[str(src)], out=out, quiet=True))
    assert not (out / "results").exists() or not any((out / "results").iterdir())


def test_journal_left_by_a_killed_run_is_recovered(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "rows.jsonl", prompts(10))  # type: ignore[arg-type]
    out = tmp_path / "out"
    first = run_with_sim([src], out)
    # Pretend the process died before compacting: move the part back into a journal.
    part = next((out / "results").rglob("*.parquet"))
    rows = pq.read_table(part).to_pylist()
    journal = out / "journal" / "20260101T000000Z-dead00-00001.jsonl"
    with open(journal, "w") as fh:
        for row in rows[:6]:
            fh.write(json.dumps(row, default=str) + "\n")
        fh.write('{"id": "half-writ')  # the line a kill -9 cut
    part.unlink()
    second = run_with_sim([src], out, sim=first.sim)
    assert second.result.exit_code == 0
    assert first.sim.stats["requests"] == 10 + 4, "recovered rows were sent again"
    assert not journal.exists()


def test_live_journal_of_another_shard_is_left_alone(tmp_path: Path) -> None:
    from pipeline.sink import ResultSink, recover_journals

    out = tmp_path / "out"
    live = ResultSink(out, "20260101T000000Z-live00")
    live.write({"id": "a", "status": "ok", "run_id": "20260101T000000Z-live00"})
    live.flush()
    assert recover_journals(out) == 0, "compacted a journal its run is still writing"
    live.close()
    assert len(read_results(out)) == 1


def test_failed_rows_are_resent_only_with_retry_failed(tmp_path: Path) -> None:
    src = write_jsonl(
        tmp_path / "rows.jsonl",
        [{"id": "good", "prompt": "hi"}, {"id": "bad", "prompt": "hi", "model": "gone-model"}],
    )
    clock = FakeClock()
    picky = Simulator(SimConfig(models=("gpt-5.5",)), clock=clock, sleep=clock.sleep)
    first = run_with_sim([src], tmp_path / "out", sim=picky, clock=clock)
    assert first.result.exit_code == 1
    again = run_with_sim([src], tmp_path / "out", sim=picky, clock=clock)
    assert again.result.exit_code == 0 and picky.stats["requests"] == 2, "error re-sent"
    lenient = Simulator(SimConfig(), clock=clock, sleep=clock.sleep)
    fixed = run_with_sim([src], tmp_path / "out", sim=lenient, clock=clock, retry_failed=True)
    assert fixed.result.exit_code == 0 and lenient.stats["requests"] == 1
    latest = {
        r["id"]: r for r in sorted(read_results(tmp_path / "out"), key=lambda r: r["finished_at"])
    }
    assert latest["bad"]["status"] == "ok"


def test_tools_pass_through_and_tool_calls_are_recorded(tmp_path: Path) -> None:
    tool = {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather for a city",
                     "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
    }  # fmt: skip
    src = write_jsonl(
        tmp_path / "rows.jsonl",
        [{"id": "t", "prompt": "Call get_weather for Paris", "tools": [tool],
          "tool_choice": "auto"}],
    )  # fmt: skip
    for stream in (False, True):
        out = tmp_path / f"out-{stream}"
        run = run_with_sim([src], out, stream=stream)
        (row,) = run.rows()
        calls = json.loads(row["tool_calls"])
        assert row["finish_reason"] == "tool_calls"
        assert calls[0]["function"]["name"] == "get_weather"
        assert isinstance(json.loads(calls[0]["function"]["arguments"]), dict)


@pytest.mark.parametrize("max_attempts", [1, 3])
def test_a_failing_row_makes_exactly_max_attempts(tmp_path: Path, max_attempts: int) -> None:
    src = write_jsonl(tmp_path / "rows.jsonl", prompts(1))  # type: ignore[arg-type]
    clock = FakeClock()
    sim = Simulator(SimConfig(fail_5xx_rate=1.0), clock=clock, sleep=clock.sleep)
    run = run_with_sim([src], tmp_path / "out", sim=sim, clock=clock, max_attempts=max_attempts)
    assert run.result.exit_code == 1
    (row,) = run.rows()
    assert row["attempts"] == max_attempts == sim.stats["requests"]
    assert row["http_status"] in (500, 502, 503)


def test_a_process_starting_during_recovery_waits_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ray workers (or shards) starting together all recover dead journals. One that
    finds a journal locked because another is compacting it must wait, not skip it
    and load the done ids without those rows (it would send them again)."""
    import threading

    import pipeline.sink
    from pipeline.resume import load_outcomes
    from pipeline.sink import ResultSink, recover_journals

    out = tmp_path / "out"
    dead = ResultSink(out, "dead-run")
    for i in range(50):
        dead.write({"run_id": "dead-run", "id": f"r{i}", "status": "ok"})
    dead.flush()
    assert dead._journal is not None
    dead._journal.close()
    dead._live.close()  # the process died: its lock is gone, its journal stays

    entered, release = threading.Event(), threading.Event()
    real_write_part = pipeline.sink.write_part

    def slow_write_part(rows: list[dict[str, object]], path: Path) -> None:
        entered.set()
        assert release.wait(10)
        real_write_part(rows, path)

    monkeypatch.setattr(pipeline.sink, "write_part", slow_write_part)
    first = threading.Thread(target=recover_journals, args=(out,))
    first.start()
    assert entered.wait(10)
    seen: dict[str, int] = {}

    def second() -> None:
        recover_journals(out)
        seen["ok"] = len(load_outcomes(out).ok)

    other = threading.Thread(target=second)
    other.start()
    other.join(0.3)
    assert other.is_alive(), "the second process went ahead during the first's recovery"
    release.set()
    first.join(10)
    other.join(10)
    assert seen["ok"] == 50
