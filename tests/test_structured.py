"""Structured output that degrades: json_schema, then json_object, then a plain instruction.

A server that refuses ``json_schema`` (llama-cpp-python answers it with a 500) must not
cost one failed request per row: the refusal moves that endpoint to the next mode once,
the refused request is re-sent at once (not a failed attempt), and every answer is
still checked against the row's schema.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from pipeline.config import RunOptions
from pipeline.errors import ApiError, UsageError
from pipeline.execute import execute, summary_line
from pipeline.jsoncheck import check_answer, label_format
from pipeline.sim import SimConfig, Simulator
from pipeline.sim.parse import JSON_SCHEMA_REFUSAL
from pipeline.structured import StructuredOutput, refuses_structured, shape
from pipeline.wire import parse_error
from tests.conftest import FakeClock, read_results, run_with_sim, write_jsonl

LABELS = ["positive", "negative", "mixed"]
SIM_URL = "http://sim.invalid/v1"


def body(fmt: dict[str, Any] | None, system: str | None = "Be brief.") -> dict[str, Any]:
    messages: list[dict[str, Any]] = [{"role": "user", "content": "Great product"}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    out: dict[str, Any] = {"model": "m", "messages": messages}
    if fmt is not None:
        out["response_format"] = fmt
    return out


# -- shaping a request for each mode ----------------------------------------------------


def test_json_schema_mode_sends_the_request_as_the_row_asks() -> None:
    request = body(label_format(LABELS))
    assert shape(request, "json_schema") is request


def test_json_object_mode_passes_the_schema_in_response_format_and_the_system_message() -> None:
    request = body(label_format(LABELS))

    sent = shape(request, "json_object")

    schema = label_format(LABELS)["json_schema"]["schema"]
    assert sent["response_format"] == {"type": "json_object", "schema": schema}
    assert len(sent["messages"]) == 2  # one system message: some templates refuse two
    system = sent["messages"][0]["content"]
    assert system.startswith("Be brief.\n\n") and json.dumps(schema, sort_keys=True) in system
    assert request["response_format"]["type"] == "json_schema"  # the row's body is untouched


def test_prompt_mode_drops_response_format_and_states_the_schema_in_a_new_system_message() -> None:
    sent = shape(body(label_format(LABELS), system=None), "prompt")

    assert "response_format" not in sent
    assert sent["messages"][0]["role"] == "system"
    assert '"enum": ["positive", "negative", "mixed"]' in sent["messages"][0]["content"]
    assert sent["messages"][1] == {"role": "user", "content": "Great product"}


def test_a_json_object_row_keeps_its_format_until_the_prompt_mode() -> None:
    request = body({"type": "json_object"})
    assert shape(request, "json_schema") is request
    assert shape(request, "json_object") is request
    sent = shape(request, "prompt")
    assert "response_format" not in sent and "one JSON object" in sent["messages"][0]["content"]


def test_rows_without_json_are_never_reshaped() -> None:
    for fmt in (None, {"type": "text"}):
        request = body(fmt)
        assert shape(request, "prompt") is request


@pytest.mark.parametrize(
    ("status", "payload", "refusal"),
    [
        (500, json.loads(JSON_SCHEMA_REFUSAL), True),
        (400, {"error": {"message": "response_format json_schema is not supported"}}, True),
        (422, {"detail": [{"loc": ["body", "response_format"], "msg": "extra"}]}, True),
        (400, {"error": {"message": "x", "param": "response_format"}}, True),
        # llama.cpp's server, when it cannot build the grammar a schema asks for
        (
            400,
            {
                "error": {
                    "code": 400,
                    "message": "Failed to initialize samplers: std::exception",
                    "type": "invalid_request_error",
                }
            },
            True,
        ),
        (400, {"error": {"message": "failed to parse grammar"}}, True),
        # one row's own malformed schema (OpenAI's wording): the row's error, not the mode's
        (
            400,
            {
                "error": {
                    "message": "Invalid schema for response_format 'x': 'enum' must be a list",
                    "param": "response_format",
                    "type": "invalid_request_error",
                }
            },
            False,
        ),
        (400, {"error": {"message": "the request exceeds the available context size"}}, False),
        (503, {"error": {"message": "response_format queue full"}}, False),
        (429, {"error": {"message": "json_schema rate limit"}}, False),
    ],
)
def test_what_counts_as_a_refusal(status: int, payload: Any, refusal: bool) -> None:
    error = parse_error(status, json.dumps(payload).encode(), {})
    assert isinstance(error, ApiError)
    assert refuses_structured(error) is refusal


def test_a_refusal_moves_the_endpoint_on_once_whoever_sees_it_first() -> None:
    modes = StructuredOutput()
    assert modes.mode("a", "json_schema") == "json_schema"
    modes.refused("a", "json_schema", "json_schema")
    modes.refused("a", "json_schema", "json_schema")  # a request in flight meanwhile
    assert modes.mode("a", "json_schema") == "json_object"
    assert modes.mode("b", "json_schema") == "json_schema"  # another endpoint: its own
    assert modes.mode("a", "json_object") == "json_object"  # another kind: its own
    modes.refused("a", "json_schema", "json_object")
    assert modes.mode("a", "json_schema") == "prompt"


def test_the_profile_mode_is_where_every_endpoint_starts() -> None:
    modes = StructuredOutput("json_object")
    assert modes.mode("a", "json_schema") == "json_object"
    assert modes.mode("a", "json_object") == "json_object"
    with pytest.raises(ValueError, match="structured_output must be one of"):
        StructuredOutput("grammar")


def test_a_fenced_answer_passes_only_when_the_mode_did_not_enforce_json() -> None:
    fmt = label_format(LABELS)
    fenced = '```json\n{"label": "mixed"}\n```'
    assert check_answer(fmt, fenced)[1] is not None
    assert check_answer(fmt, fenced, fenced=True) == ({"label": "mixed"}, None)
    assert check_answer(fmt, '```\n{"label": "nope"}\n```', fenced=True)[1] is not None


# -- through a run ------------------------------------------------------------------------


def rows(tmp_path: Path, n: int) -> Path:
    return write_jsonl(
        tmp_path / "rows.jsonl", [{"id": f"r{i}", "prompt": f"Review {i}"} for i in range(n)]
    )


@pytest.mark.parametrize("concurrency", [1, 8])
def test_labels_against_a_server_that_refuses_json_schema_fall_back_once(
    tmp_path: Path, concurrency: int
) -> None:
    clock = FakeClock()
    sim = Simulator(SimConfig(refuse_json_schema=True), clock=clock, sleep=clock.sleep)

    run = run_with_sim(
        [rows(tmp_path, 40)], tmp_path / "out", sim=sim, clock=clock,
        labels=LABELS, concurrency=concurrency,
    )  # fmt: skip

    assert run.result.exit_code == 0
    results = run.rows()
    assert len(results) == 40
    assert all(r["status"] == "ok" and r["label"] in LABELS for r in results)
    assert all(r["attempts"] == 1 for r in results)  # a refusal is not a failed attempt
    assert 1 <= sim.stats["500"] <= concurrency  # once, plus whatever was in flight then
    assert sim.stats["billed"] == 40
    refused = sim.stats["500"]
    assert run.result.structured == {
        SIM_URL: {"json_schema": "json_object", "refused": {"json_schema": refused}}
    }
    manifest = json.loads(next((tmp_path / "out" / "runs").glob("*.json")).read_text())
    assert manifest["structured_output"] == run.result.structured
    assert [d["code"] for d in manifest["diagnostics"]] == ["structured_fallback"]
    note = summary_line(run.result).splitlines()[1]
    assert note.startswith(f"note: {SIM_URL} refused response_format json_schema")
    assert 'structured_output = "json_object"' in note


def test_a_profile_that_states_json_object_sends_no_refused_request(tmp_path: Path) -> None:
    profiles = tmp_path / "providers.toml"
    profiles.write_text(
        '[llama]\nbase_url = "http://llama.invalid/v1"\nstructured_output = "json_object"\n'
    )
    clock = FakeClock()
    sim = Simulator(SimConfig(refuse_json_schema=True), clock=clock, sleep=clock.sleep)

    run = run_with_sim(
        [rows(tmp_path, 10)], tmp_path / "out", sim=sim, clock=clock,
        labels=LABELS, provider="llama", providers_file=profiles,
    )  # fmt: skip

    assert run.result.exit_code == 0
    assert sim.stats["500"] == 0
    assert all(r["label"] in LABELS for r in run.rows())
    assert run.result.structured == {
        "http://llama.invalid/v1": {"json_schema": "json_object", "refused": {}}
    }
    assert "\n" not in summary_line(run.result)  # the profile's choice is no surprise


def test_a_profile_with_an_unknown_mode_is_a_usage_error(tmp_path: Path) -> None:
    profiles = tmp_path / "providers.toml"
    profiles.write_text('[x]\nbase_url = "http://x.invalid/v1"\nstructured_output = "grammar"\n')
    opts = RunOptions(
        sources=[str(rows(tmp_path, 1))], out=tmp_path / "out", provider="x",
        providers_file=profiles, model="m", quiet=True,
    )  # fmt: skip

    with pytest.raises(UsageError, match="structured_output must be one of"):
        execute(opts)


class NoResponseFormat(httpx.AsyncBaseTransport):
    """A server that takes no response_format at all (400 naming it) and, told the schema
    in the system message, answers in a code fence; row 'r1' answers outside the set."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        payload = json.loads(request.content)
        self.sent.append(payload)
        if "response_format" in payload:
            error = {"message": "Unrecognized request argument supplied: response_format"}
            return httpx.Response(400, json={"error": error})
        system = payload["messages"][0]
        assert system["role"] == "system" and '"enum": ["positive"' in system["content"]
        label = "unsure" if payload["messages"][-1]["content"] == "Review 1" else "positive"
        content = f'```json\n{{"label": "{label}"}}\n```'
        return httpx.Response(
            200,
            json={
                "id": "c",
                "model": "m",
                "choices": [{"message": {"content": content}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 50, "completion_tokens": 5, "total_tokens": 55},
            },
        )


def test_a_server_without_response_format_gets_the_schema_in_the_prompt_and_is_checked(
    tmp_path: Path,
) -> None:
    transport = NoResponseFormat()
    opts = RunOptions(
        sources=[str(rows(tmp_path, 6))], out=tmp_path / "out",
        base_url=["http://plain.invalid/v1"], model="m", quiet=True, labels=LABELS,
        concurrency=1, json_retries=1,
    )  # fmt: skip
    clock = FakeClock()

    result = execute(opts, transport=transport, sleep=clock.sleep, clock=clock)

    by_id: dict[str, list[dict[str, Any]]] = {}
    for row in read_results(tmp_path / "out"):
        by_id.setdefault(row["id"], []).append(row)
    assert result.exit_code == 1
    ok = {i: r[0] for i, r in by_id.items() if r[0]["status"] == "ok"}
    assert set(ok) == {"r0", "r2", "r3", "r4", "r5"}
    assert all(r["label"] == "positive" and r["attempts"] == 1 for r in ok.values())
    # the answer outside the label set is still refused, re-asked, and ends as invalid_json
    assert [r["error_type"] for r in by_id["r1"]] == ["invalid_json", "invalid_json"]
    refusals = [p for p in transport.sent if "response_format" in p]
    assert [p["response_format"]["type"] for p in refusals] == ["json_schema", "json_object"]
    assert result.structured == {
        "http://plain.invalid/v1": {
            "json_schema": "prompt",
            "refused": {"json_schema": 1, "json_object": 1},
        }
    }


def test_a_refusal_of_the_last_mode_is_the_rows_error_not_a_loop(tmp_path: Path) -> None:
    class Refuses(httpx.AsyncBaseTransport):
        calls = 0

        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            self.calls += 1
            error = {"message": "response_format: JSON output is not available for this model"}
            return httpx.Response(400, json={"error": error})

    transport = Refuses()
    opts = RunOptions(
        sources=[str(rows(tmp_path, 3))], out=tmp_path / "out",
        base_url=["http://no.invalid/v1"], model="m", quiet=True, labels=LABELS, concurrency=1,
    )  # fmt: skip
    clock = FakeClock()

    result = execute(opts, transport=transport, sleep=clock.sleep, clock=clock)

    assert result.exit_code == 1
    assert transport.calls == 2 + 3  # json_schema, json_object refused once; then per row
    assert {r["error_type"] for r in read_results(tmp_path / "out")} == {"invalid_request_error"}
