"""Say what the server did: streams cut short, usage missing, a structured fallback.

Each is a line in the end-of-run summary with the likely cause and the fix, a
``diagnostic`` event in the JSON log, and an entry in the manifest; counts come from
the run's tally.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from pipeline.config import RunOptions
from pipeline.diagnostics import diagnose
from pipeline.execute import execute, summary_line
from pipeline.progress import Tally
from pipeline.runner import RunResult
from tests.conftest import FakeClock, invoke, read_results, write_jsonl


def sse(payload: dict[str, Any] | str) -> bytes:
    text = payload if isinstance(payload, str) else json.dumps(payload)
    return f"data: {text}\n\n".encode()


class Streams(httpx.AsyncBaseTransport):
    """An SSE server: ``cut_first`` attempts per row end with [DONE] and no finish_reason
    (llama-cpp-python cutting a stream when another request waits); usage is sent only
    when ``usage`` and the request asked for it."""

    def __init__(self, *, usage: bool = True, cut_first: int = 0) -> None:
        self.usage = usage
        self.cut_first = cut_first
        self.calls: dict[str, int] = {}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        payload = json.loads(request.content)
        prompt = payload["messages"][-1]["content"]
        n = self.calls[prompt] = self.calls.get(prompt, 0) + 1
        head = {"id": f"c-{prompt}-{n}", "object": "chat.completion.chunk", "model": "m"}

        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            return sse({**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

        events = [chunk({"role": "assistant", "content": ""}), chunk({"content": "hello "})]
        if n > self.cut_first:
            events += [chunk({"content": "world"}), chunk({}, "stop")]
            if self.usage and payload.get("stream_options", {}).get("include_usage"):
                usage = {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}
                events.append(sse({**head, "choices": [], "usage": usage}))
        events.append(sse("[DONE]"))
        return httpx.Response(
            200, headers={"content-type": "text/event-stream"}, content=b"".join(events)
        )


def run(
    tmp_path: Path, transport: httpx.AsyncBaseTransport, n: int, **options: Any
) -> tuple[RunResult, list[dict[str, Any]], list[dict[str, Any]]]:
    src = write_jsonl(
        tmp_path / "rows.jsonl", [{"id": f"r{i}", "prompt": f"p{i}"} for i in range(n)]
    )
    opts = RunOptions(
        sources=[str(src)], out=tmp_path / "out", base_url=["http://self.invalid/v1"],
        model="m", quiet=True, log_format="json", concurrency=4, **options,
    )  # fmt: skip
    log = io.StringIO()
    clock = FakeClock()
    result = execute(opts, transport=transport, sleep=clock.sleep, clock=clock, progress_stream=log)
    events = [json.loads(line) for line in log.getvalue().splitlines() if line.strip()]
    return result, read_results(tmp_path / "out"), events


def manifest(tmp_path: Path) -> dict[str, Any]:
    return dict(json.loads(next((tmp_path / "out" / "runs").glob("*.json")).read_text()))


def test_a_stream_server_that_ignores_include_usage_is_named_with_the_fix(tmp_path: Path) -> None:
    result, rows, events = run(tmp_path, Streams(usage=False), 12, stream=True)

    assert result.exit_code == 0
    assert all(r["status"] == "ok" and r["prompt_tokens"] is None for r in rows)
    expected = (
        "server ignored stream_options.include_usage: tokens unknown (NULL, unpriced) for "
        "12 rows; run without --stream to get usage"
    )
    assert summary_line(result).splitlines()[1:] == [f"note: {expected}"]
    assert {"event": "diagnostic", "code": "no_usage", "count": 12, "message": expected} in events
    assert manifest(tmp_path)["diagnostics"] == [
        {"code": "no_usage", "count": 12, "message": expected}
    ]


def test_streams_cut_before_finish_reason_are_retried_never_stored_and_named(
    tmp_path: Path,
) -> None:
    transport = Streams(cut_first=2)

    result, rows, events = run(tmp_path, transport, 10, stream=True)

    assert result.exit_code == 0
    assert len(rows) == 10
    assert all(r["content"] == "hello world" and r["finish_reason"] == "stop" for r in rows)
    assert all(r["attempts"] == 3 for r in rows)
    assert result.tally.stream_cuts == 20 and result.tally.streamed == 10
    note = summary_line(result).splitlines()[1]
    assert note.startswith("note: 20 of 30 streamed answers were cut before their end")
    assert "raise --parallel" in note and "run without --stream" in note
    assert [e["code"] for e in events if e["event"] == "diagnostic"] == ["stream_cuts"]


def test_a_few_cut_streams_among_many_are_no_note(tmp_path: Path) -> None:
    result, rows, _ = run(tmp_path, Streams(cut_first=1), 1, stream=True)
    tally = Tally(streamed=9, stream_cuts=1)

    assert diagnose(tally, {}) == []
    assert result.tally.stream_cuts == 1  # one cut of two: half is not most
    assert "\n" not in summary_line(result)


def test_a_server_that_sends_no_usage_without_streaming_is_named(tmp_path: Path) -> None:
    class NoUsage(httpx.AsyncBaseTransport):
        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            choice = {"message": {"content": "hi"}, "finish_reason": "stop"}
            return httpx.Response(200, json={"id": "c", "choices": [choice]})

    result, rows, _ = run(tmp_path, NoUsage(), 3)

    assert all(r["prompt_tokens"] is None for r in rows)
    note = summary_line(result).splitlines()[1]
    assert note == (
        "note: server returned no usage: tokens unknown (NULL, unpriced) for 3 rows; check "
        "that the server (or a proxy in front of it) sends the usage block"
    )


def test_a_clean_run_has_no_notes(tmp_path: Path) -> None:
    result, rows, events = run(tmp_path, Streams(), 5, stream=True)

    assert result.exit_code == 0 and all(r["prompt_tokens"] == 9 for r in rows)
    assert "\n" not in summary_line(result)
    assert not [e for e in events if e["event"] == "diagnostic"]
    assert manifest(tmp_path)["diagnostics"] == []


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_the_cli_prints_the_structured_fallback_note(tmp_path: Path, log_format: str) -> None:
    src = write_jsonl(
        tmp_path / "rows.jsonl", [{"id": f"r{i}", "prompt": f"p{i}"} for i in range(4)]
    )
    code, stdout, stderr = invoke(
        "run", str(src), "--out", str(tmp_path / "out"), "--labels", "yes,no",
        "--sim", "refuse_json_schema=true", "--concurrency", "1", "--quiet",
        "--log-format", log_format,
    )  # fmt: skip

    assert code == 0
    lines = stdout.splitlines()
    assert lines[0].startswith("run ") and lines[1].startswith(
        "note: http://sim.invalid/v1 refused response_format json_schema "
        "(1 refused request re-sent)"
    )
    if log_format == "json":
        event = json.loads(stderr.strip().splitlines()[-1])
        assert event["event"] == "diagnostic" and event["code"] == "structured_fallback"
