"""The simulator must behave like the gateways it imitates, because every other test, the demo
and the benchmarks trust it: the usage block, error bodies, limits, faults and billing."""

from __future__ import annotations

import ast
import collections
import email.utils
import json
import os
import selectors
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

import pipeline.sim as sim_package
from pipeline.sim import (
    SimConfig,
    SimRequest,
    SimResponse,
    Simulator,
    go_duration,
    request_key,
    sim_transport,
    start_server,
)

CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "Classify this review: the blender is loud but works well"}]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class FakeTime:
    """A clock and sleep that only move when told, so rate limits and latency need no waiting."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def make(config: SimConfig | None = None, fake: FakeTime | None = None) -> Simulator:
    fake = fake or FakeTime()
    return Simulator(config, clock=fake.clock, sleep=fake.sleep, wall_clock=lambda: 1.7e9)


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": "gpt-5.5", "messages": USER, **extra}


async def post(
    sim: Simulator, body: Any, headers: dict[str, str] | None = None, path: str = CHAT
) -> SimResponse:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return await sim.handle(SimRequest("POST", path, headers or {}, raw))


def payload(response: SimResponse) -> Any:
    assert response.body is not None
    return json.loads(response.body)


async def events(response: SimResponse) -> list[bytes]:
    assert response.stream is not None
    return [chunk async for chunk in response.stream]


def assemble(chunks: list[bytes]) -> dict[str, Any]:
    """Put SSE chunks back together the way a client would."""
    out: dict[str, Any] = {"content": "", "reasoning": "", "tools": {}, "usage": None}
    out.update(finish=None, done=False, objects=set())
    for chunk in chunks:
        assert chunk.startswith(b"data: ") and chunk.endswith(b"\n\n")
        data = chunk[6:-2]
        if data == b"[DONE]":
            out["done"] = True
            continue
        event = json.loads(data)
        out["objects"].add(event["object"])
        if event.get("usage"):
            out["usage"] = event["usage"]
        for choice in event["choices"]:
            delta = choice["delta"]
            out["content"] += delta.get("content") or ""
            out["reasoning"] += delta.get("reasoning_content") or ""
            out["finish"] = choice["finish_reason"] or out["finish"]
            for call in delta.get("tool_calls") or []:
                slot = out["tools"].setdefault(call["index"], {"name": "", "arguments": ""})
                slot["id"] = call.get("id", slot.get("id"))
                slot["name"] += call["function"].get("name", "")
                slot["arguments"] += call["function"].get("arguments", "")
    return out


# --- answers and usage ---------------------------------------------------------------------


@pytest.mark.anyio
async def test_usage_block_has_the_gateway_shape_and_adds_up() -> None:
    response = await post(make(), chat())
    assert response.status == 200
    data = payload(response)
    assert data["object"] == "chat.completion"
    assert data["id"].startswith("chatcmpl-sim-")
    assert {"created", "model", "system_fingerprint"} <= data.keys()
    usage = data["usage"]
    assert set(usage) == {
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "prompt_tokens_details",
        "completion_tokens_details",
        "input_tokens",
        "output_tokens",
        "input_tokens_details",
    }
    assert set(usage["prompt_tokens_details"]) == {
        "cached_tokens",
        "text_tokens",
        "audio_tokens",
        "image_tokens",
    }
    assert set(usage["completion_tokens_details"]) == {
        "text_tokens",
        "audio_tokens",
        "reasoning_tokens",
    }
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    details = usage["completion_tokens_details"]
    assert details["text_tokens"] + details["reasoning_tokens"] == usage["completion_tokens"]
    assert usage["input_tokens_details"] is None
    assert data["choices"][0]["finish_reason"] == "stop"


@pytest.mark.anyio
async def test_same_request_same_answer_and_different_request_different_answer() -> None:
    first = payload(await post(make(), chat()))
    again = payload(await post(make(SimConfig(seed=7)), chat()))
    other = payload(await post(make(), chat(messages=[{"role": "user", "content": "hi"}])))
    assert first["choices"] == again["choices"]
    assert first["usage"] == again["usage"]
    assert first["id"] != again["id"]
    assert other["choices"][0]["message"]["content"] != first["choices"][0]["message"]["content"]
    content = first["choices"][0]["message"]["content"]
    assert content.startswith("sim answer ") and "Classify this review" in content


@pytest.mark.anyio
async def test_thinking_models_and_reasoning_effort_report_reasoning() -> None:
    sim = make()
    for body in (chat(model="gpt-5.1-thinking"), chat(reasoning_effort="high")):
        data = payload(await post(sim, body))
        usage = data["usage"]
        reasoning = usage["completion_tokens_details"]["reasoning_tokens"]
        assert data["choices"][0]["message"]["reasoning_content"]
        assert 0 < reasoning < usage["completion_tokens"]
    high = payload(await post(sim, chat(reasoning_effort="high")))["usage"]
    low = payload(await post(sim, chat(reasoning_effort="low")))["usage"]
    assert (
        high["completion_tokens_details"]["reasoning_tokens"]
        > low["completion_tokens_details"]["reasoning_tokens"]
    )
    plain = payload(await post(sim, chat(reasoning_effort="none")))
    assert "reasoning_content" not in plain["choices"][0]["message"]
    assert plain["usage"]["completion_tokens_details"]["reasoning_tokens"] == 0


@pytest.mark.anyio
async def test_max_tokens_cuts_the_answer_with_finish_reason_length() -> None:
    sim = make()
    data = payload(await post(sim, chat(max_tokens=3)))
    assert data["choices"][0]["finish_reason"] == "length"
    assert data["usage"]["completion_tokens"] == 3
    assert len(data["choices"][0]["message"]["content"]) <= 12
    thinking = payload(await post(sim, chat(model="x-thinking", max_completion_tokens=20)))
    usage = thinking["usage"]
    assert thinking["choices"][0]["finish_reason"] == "length"
    assert (
        usage["completion_tokens"] == usage["completion_tokens_details"]["reasoning_tokens"] == 20
    )
    assert thinking["choices"][0]["message"]["content"] == ""


@pytest.mark.anyio
async def test_json_response_formats_give_valid_json_and_pick_enum_values() -> None:
    sim = make()
    obj = payload(await post(sim, chat(response_format={"type": "json_object"})))
    assert isinstance(json.loads(obj["choices"][0]["message"]["content"]), dict)
    flat = payload(
        await post(sim, {"model": "m", "prompt": "hi", "response_format": "json_object"})
    )
    assert isinstance(json.loads(flat["choices"][0]["message"]["content"]), dict)
    schema = {
        "type": "object",
        "properties": {
            "label": {"type": "string", "enum": ["positive", "negative", "neutral"]},
            "score": {"type": "integer", "minimum": 1, "maximum": 5},
            "tags": {"type": "array", "items": {"$ref": "#/$defs/tag"}},
        },
        "$defs": {"tag": {"type": "string", "enum": ["price", "noise"]}},
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "label", "schema": schema}}
    answers = [payload(await post(sim, chat(response_format=fmt))) for _ in range(2)]
    parsed = [json.loads(a["choices"][0]["message"]["content"]) for a in answers]
    assert parsed[0] == parsed[1]
    assert parsed[0]["label"] in ("positive", "negative", "neutral")
    assert 1 <= parsed[0]["score"] <= 5
    assert parsed[0]["tags"][0] in ("price", "noise")


@pytest.mark.anyio
async def test_tools_are_called_when_the_prompt_names_them() -> None:
    tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
    sim = make()
    asks = [{"role": "user", "content": "Call get_weather for Paris"}]
    data = payload(await post(sim, chat(messages=asks, tools=[tool])))
    choice = data["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    call = choice["message"]["tool_calls"][0]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "get_weather"
    assert set(json.loads(call["function"]["arguments"])) == {"city"}
    unrelated = payload(await post(sim, chat(tools=[tool])))["choices"][0]
    assert unrelated["finish_reason"] == "stop" and "tool_calls" not in unrelated["message"]
    forced = payload(await post(sim, chat(tools=[tool], tool_choice="required")))["choices"][0]
    assert forced["finish_reason"] == "tool_calls"


@pytest.mark.anyio
async def test_flat_form_with_images_counts_image_tokens_and_matches_messages_form() -> None:
    sim = make()
    flat = {
        "model": "gpt-5.5",
        "system_prompt": "You label photos.",
        "prompt": "What is in the picture?",
        "image_urls": ["https://example.com/a.png", "https://example.com/b.png"],
        "image_detail": "low",
    }
    data = payload(await post(sim, flat))
    details = data["usage"]["prompt_tokens_details"]
    assert details["image_tokens"] == 2 * 85
    assert details["text_tokens"] + details["image_tokens"] == data["usage"]["prompt_tokens"]
    images = [
        {"type": "image_url", "image_url": {"url": u, "detail": "low"}} for u in flat["image_urls"]
    ]
    messages = [
        {"role": "system", "content": "You label photos."},
        {"role": "user", "content": [{"type": "text", "text": "What is in the picture?"}, *images]},
    ]
    same = payload(await post(sim, {"model": "gpt-5.5", "messages": messages}))
    assert same["choices"] == data["choices"] and same["usage"] == data["usage"]


@pytest.mark.anyio
async def test_cached_tokens_for_a_long_shared_prefix_only() -> None:
    sim = make()
    system = {"role": "system", "content": "You label product reviews carefully. " * 150}
    long_prefix = payload(await post(sim, chat(messages=[system, *USER])))["usage"]
    cached = long_prefix["prompt_tokens_details"]["cached_tokens"]
    assert cached >= 1024 and cached % 128 == 0 and cached <= long_prefix["prompt_tokens"]
    short = payload(await post(sim, chat()))["usage"]
    assert short["prompt_tokens_details"]["cached_tokens"] == 0
    long_user = [{"role": "user", "content": "word " * 2000}]
    alone = payload(await post(sim, chat(messages=long_user)))["usage"]
    assert alone["prompt_tokens"] >= 1024
    assert alone["prompt_tokens_details"]["cached_tokens"] == 0


# --- errors ------------------------------------------------------------------------------


def error_of(response: SimResponse, status: int, kind: str) -> dict[str, Any]:
    assert response.status == status
    assert response.headers["content-type"] == "application/json"
    error = payload(response)["error"]
    assert error["code"] == status and error["type"] == kind
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["fallback_suggestion"], str)
    return dict(error)


@pytest.mark.anyio
async def test_invalid_requests_get_400_with_param() -> None:
    sim = make()
    error_of(await post(sim, b"{not json"), 400, "invalid_request_error")
    missing = error_of(await post(sim, {"model": "gpt-5.5"}), 400, "invalid_request_error")
    assert missing["param"] == "messages"
    bad_role = chat(messages=[{"role": "wizard", "content": "x"}])
    assert error_of(await post(sim, bad_role), 400, "invalid_request_error")["param"] == (
        "messages[0].role"
    )
    assert error_of(await post(sim, chat(max_tokens=0)), 400, "invalid_request_error")["param"] == (
        "max_tokens"
    )
    no_model = {"messages": USER}
    assert error_of(await post(sim, no_model), 400, "invalid_request_error")["param"] == "model"
    assert sim.ledger == [] and sim.stats["400"] == 5


@pytest.mark.anyio
async def test_unknown_routes_models_and_oversized_images() -> None:
    sim = make(SimConfig(models=("gpt-5.5", "gpt-5.1")))
    error_of(await post(sim, chat(), path="/v1/embeddings"), 404, "not_found_error")
    get = await sim.handle(SimRequest("GET", CHAT, {}, b""))
    error_of(get, 404, "not_found_error")
    unknown = error_of(await post(sim, chat(model="gpt-4")), 404, "not_found_error")
    assert unknown["param"] == "model" and unknown["fallback_suggestion"] == "gpt-5.5"
    assert (await post(sim, chat(), path="/chat/completions")).status == 200
    huge = "data:image/png;base64," + "A" * (14 * 1024 * 1024)
    parts = [{"type": "image_url", "image_url": {"url": huge}}]
    too_big = chat(messages=[{"role": "user", "content": parts}])
    error_of(await post(sim, too_big), 413, "request_too_large_error")
    listed = await sim.handle(SimRequest("GET", "/v1/models", {}, b""))
    assert [m["id"] for m in payload(listed)["data"]] == ["gpt-5.5", "gpt-5.1"]
    health = await sim.handle(SimRequest("GET", "/health", {}, b""))
    assert health.status == 200


@pytest.mark.anyio
async def test_401_without_the_key_never_echoes_it() -> None:
    sim = make(SimConfig(api_key="sk-secret-123"))
    error_of(await post(sim, chat()), 401, "authentication_error")
    wrong = await post(sim, chat(), {"authorization": "Bearer sk-wrong-999"})
    error_of(wrong, 401, "authentication_error")
    assert wrong.body is not None
    assert b"sk-wrong-999" not in wrong.body and b"sk-secret" not in wrong.body
    models = await sim.handle(SimRequest("GET", "/v1/models", {}, b""))
    assert models.status == 401
    ok = await post(sim, chat(), {"authorization": "Bearer sk-secret-123"})
    assert ok.status == 200
    assert sim.stats["401"] == 3 and len(sim.ledger) == 1


@pytest.mark.anyio
async def test_injected_5xx_use_the_gateway_error_bodies_and_are_not_billed() -> None:
    sim = make(SimConfig(fail_5xx_rate=1.0))
    kinds = {500: "internal_server_error", 502: "upstream_error", 503: "service_unavailable_error"}
    seen = set()
    for _ in range(40):
        response = await post(sim, chat())
        error_of(response, response.status, kinds[response.status])
        seen.add(response.status)
    assert seen == {500, 502, 503}
    assert sim.ledger == [] and sim.stats["5xx"] == 40


@pytest.mark.anyio
async def test_injected_429_says_when_to_retry() -> None:
    sim = make(SimConfig(fail_429_rate=1.0))
    response = await post(sim, chat())
    error = error_of(response, 429, "rate_limit_error")
    assert response.headers["retry-after"] == "1"
    assert error["fallback_suggestion"] == "retry after 1 seconds"
    assert sim.stats["injected_429"] == 1 and sim.ledger == []


@pytest.mark.anyio
async def test_fault_draws_are_seeded() -> None:
    async def statuses(seed: int) -> list[int]:
        sim = make(SimConfig(fail_429_rate=0.2, fail_5xx_rate=0.2, drop_rate=0.2, seed=seed))
        return [(await post(sim, chat())).status for _ in range(60)]

    first = await statuses(1)
    assert first == await statuses(1)
    assert first != await statuses(2)
    assert {0, 200, 429} <= set(first)


@pytest.mark.anyio
async def test_quota_gives_402_after_n_billed_answers() -> None:
    sim = make(SimConfig(quota_requests=2))
    assert [(await post(sim, chat())).status for _ in range(2)] == [200, 200]
    error_of(await post(sim, chat()), 402, "insufficient_quota_error")
    assert len(sim.ledger) == 2 and sim.stats["402"] == 1


@pytest.mark.anyio
async def test_quota_as_429_says_insufficient_quota_like_openai() -> None:
    sim = make(SimConfig(quota_requests=0, quota_as_429=True))
    response = await post(sim, chat())
    assert response.status == 429
    error = payload(response)["error"]
    assert error["type"] == error["code"] == "insufficient_quota"
    assert "retry-after" not in response.headers


@pytest.mark.anyio
async def test_quota_holds_for_requests_already_in_flight() -> None:
    gate = anyio.Event()

    async def wait_at_gate(_: float) -> None:
        await gate.wait()

    sim = Simulator(SimConfig(quota_requests=1, latency_ms=10), sleep=wait_at_gate)
    statuses: list[int] = []

    async def one() -> None:
        statuses.append((await post(sim, chat())).status)

    async with anyio.create_task_group() as tg:
        tg.start_soon(one)
        tg.start_soon(one)
        await anyio.wait_all_tasks_blocked()
        gate.set()
    assert sorted(statuses) == [200, 402] and len(sim.ledger) == 1


# --- rate limits and latency ---------------------------------------------------------------


@pytest.mark.anyio
async def test_rpm_bucket_bursts_then_429_with_retry_after_then_refills() -> None:
    fake = FakeTime()
    sim = make(SimConfig(rpm_limit=120, burst_seconds=1.0), fake)  # 2/s, bucket of 2
    ok = [await post(sim, chat()) for _ in range(2)]
    assert [r.status for r in ok] == [200, 200]
    assert ok[0].headers["x-ratelimit-limit-requests"] == "120"
    assert ok[0].headers["x-ratelimit-remaining-requests"] == "1"
    assert ok[1].headers["x-ratelimit-remaining-requests"] == "0"
    assert ok[1].headers["x-ratelimit-reset-requests"] == "1s"
    limited = await post(sim, chat())
    error_of(limited, 429, "rate_limit_error")
    assert limited.headers["retry-after"] == "1"
    assert limited.headers["x-ratelimit-remaining-requests"] == "0"
    fake.now += 0.5
    assert (await post(sim, chat())).status == 200
    assert sim.stats["rate_limited"] == 1 and len(sim.ledger) == 3


@pytest.mark.anyio
async def test_tpm_bucket_counts_prompt_and_max_tokens() -> None:
    fake = FakeTime()
    sim = make(SimConfig(tpm_limit=6000), fake)  # 100 tokens/s, bucket of 100
    assert (await post(sim, chat(max_tokens=60))).status == 200
    limited = await post(sim, chat(max_tokens=60))
    assert limited.status == 429
    assert int(limited.headers["x-ratelimit-remaining-tokens"]) < 60
    fake.now += 1.0
    assert (await post(sim, chat(max_tokens=60))).status == 200
    big = await post(sim, chat(max_tokens=5000))  # bigger than the bucket: waits for a full one
    assert big.status == 429
    fake.now += 10.0
    assert (await post(sim, chat(max_tokens=5000))).status == 200


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("style", "header", "value"),
    [
        ("seconds", "retry-after", "3"),
        ("ms", "retry-after-ms", "2500"),
        ("date", "retry-after", email.utils.formatdate(1.7e9 + 3, usegmt=True)),
        ("none", None, None),
    ],
)
async def test_retry_after_styles(style: str, header: str | None, value: str | None) -> None:
    sim = make(SimConfig(rpm_limit=24, retry_after=style))  # one every 2.5 s
    assert (await post(sim, chat())).status == 200
    limited = await post(sim, chat())
    assert limited.status == 429
    retry = {k: v for k, v in limited.headers.items() if k.startswith("retry-after")}
    assert retry == ({} if header is None else {header: value})


@pytest.mark.anyio
async def test_rate_limit_headers_can_be_turned_off() -> None:
    sim = make(SimConfig(rpm_limit=600, rate_limit_headers=False))
    response = await post(sim, chat())
    assert not [k for k in response.headers if k.startswith("x-ratelimit")]
    unlimited = await post(make(), chat())
    assert not [k for k in unlimited.headers if k.startswith("x-ratelimit")]


def test_go_durations_match_openai_reset_headers() -> None:
    assert go_duration(0.012) == "12ms"
    assert go_duration(1) == "1s"
    assert go_duration(1.5) == "1.5s"
    assert go_duration(360) == "6m0s"
    assert go_duration(3725) == "1h2m5s"
    assert go_duration(0) == "0s"


@pytest.mark.anyio
async def test_latency_uses_the_injected_sleep() -> None:
    fake = FakeTime()
    sim = make(SimConfig(latency_ms=250, latency_jitter_ms=100, rpm_limit=60), fake)
    assert (await post(sim, chat())).status == 200
    assert (await post(sim, chat())).status == 429  # refused at once: no latency
    assert len(fake.sleeps) == 1
    fake.now += 1.0
    assert (await post(sim, chat())).status == 200
    assert len(fake.sleeps) == 2 and all(0.25 <= s <= 0.35 for s in fake.sleeps)
    assert fake.sleeps[0] != fake.sleeps[1]  # jitter drawn per request


# --- streaming -------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_stream_assembles_to_the_plain_answer_with_usage_last() -> None:
    sim = make()
    body = chat(model="gpt-5.1-thinking")
    plain = payload(await post(sim, body))
    streamed = await post(sim, {**body, "stream": True, "stream_options": {"include_usage": True}})
    assert streamed.headers["content-type"] == "text/event-stream"
    chunks = await events(streamed)
    got = assemble(chunks)
    message = plain["choices"][0]["message"]
    assert got["content"] == message["content"]
    assert got["reasoning"] == message["reasoning_content"]
    assert got["finish"] == "stop" and got["done"]
    assert got["usage"] == plain["usage"]
    assert got["objects"] == {"chat.completion.chunk"}
    assert chunks[-1] == b"data: [DONE]\n\n"
    assert json.loads(chunks[-2][6:])["choices"] == []
    no_usage = assemble(await events(await post(sim, {**body, "stream": True})))
    assert no_usage["usage"] is None and no_usage["content"] == message["content"]
    assert [b.streamed for b in sim.ledger] == [False, True, True]


@pytest.mark.anyio
async def test_stream_tool_call_deltas_assemble_to_the_plain_tool_call() -> None:
    tool = {"type": "function", "function": {"name": "lookup", "parameters": {}}}
    body = chat(messages=[{"role": "user", "content": "please lookup order 12"}], tools=[tool])
    sim = make()
    plain = payload(await post(sim, body))["choices"][0]["message"]["tool_calls"][0]
    got = assemble(await events(await post(sim, {**body, "stream": True})))
    assert got["finish"] == "tool_calls"
    assert got["tools"][0] == {
        "id": plain["id"],
        "name": "lookup",
        "arguments": plain["function"]["arguments"],
    }


@pytest.mark.anyio
async def test_stream_cut_has_no_usage_and_no_done_but_is_billed() -> None:
    sim = make(SimConfig(stream_cut_rate=1.0))
    body = chat(stream=True, stream_options={"include_usage": True})
    response = await post(sim, body)
    assert response.status == 200 and response.cut
    got = assemble(await events(response))
    assert not got["done"] and got["usage"] is None and got["finish"] is None
    assert got["content"]  # some content did arrive
    [billed] = sim.ledger
    assert billed.truncated and billed.streamed
    assert sim.stats["stream_cut"] == 1 and sim.stats["ok"] == 0


# --- faults through the httpx transport, and the ledger ------------------------------------


@pytest.mark.anyio
async def test_transport_turns_drops_and_cuts_into_protocol_errors() -> None:
    dropper = make(SimConfig(drop_rate=1.0))
    async with httpx.AsyncClient(transport=sim_transport(dropper), base_url="http://sim") as c:
        with pytest.raises(httpx.RemoteProtocolError):
            await c.post(CHAT, json=chat())
    assert dropper.ledger == [] and dropper.stats["dropped"] == 1

    cutter = make(SimConfig(stream_cut_rate=1.0))
    received: list[str] = []
    async with httpx.AsyncClient(transport=sim_transport(cutter), base_url="http://sim") as c:
        with pytest.raises(httpx.RemoteProtocolError):
            async with c.stream("POST", CHAT, json=chat(stream=True)) as response:
                assert response.status_code == 200
                async for line in response.aiter_lines():
                    received.append(line)
    assert received and "data: [DONE]" not in received


@pytest.mark.anyio
async def test_transport_serves_json_streams_and_headers() -> None:
    sim = make(SimConfig(api_key="k", rpm_limit=60))
    headers = {"Authorization": "Bearer k"}
    async with httpx.AsyncClient(
        transport=sim_transport(sim), base_url="http://sim/v1", headers=headers
    ) as client:
        response = await client.post("/chat/completions", json=chat())
        assert response.status_code == 200
        assert response.headers["x-ratelimit-limit-requests"] == "60"
        assert sim.billed_usage(response.json()["id"]) == response.json()["usage"]
        limited = await client.post("/chat/completions", json=chat())
        assert limited.status_code == 429 and limited.headers["retry-after"] == "1"


@pytest.mark.anyio
async def test_truncated_body_is_malformed_json_but_billed() -> None:
    sim = make(SimConfig(truncate_rate=1.0))
    response = await post(sim, chat())
    assert response.status == 200 and response.body
    with pytest.raises(ValueError):
        json.loads(response.body)
    [billed] = sim.ledger
    assert billed.truncated and not billed.streamed
    assert sim.billed_usage(billed.response_id) == billed.usage
    assert sim.stats["truncated"] == 1


@pytest.mark.anyio
async def test_ledger_counts_each_billed_request() -> None:
    sim = make()
    other = [{"role": "user", "content": "something else"}]
    ids = [payload(await post(sim, chat()))["id"] for _ in range(3)]
    ids.append(payload(await post(sim, chat(messages=other)))["id"])
    assert len(set(ids)) == 4
    counts = collections.Counter(b.request_key for b in sim.ledger)
    assert counts == {request_key("gpt-5.5", USER): 3, request_key("gpt-5.5", other): 1}
    assert sim.stats["billed"] == sim.stats["ok"] == 4 and sim.stats["requests"] == 4
    assert sim.billed_usage("chatcmpl-unknown") is None


def test_config_rejects_impossible_knobs() -> None:
    with pytest.raises(ValueError):
        SimConfig(fail_429_rate=0.6, fail_5xx_rate=0.6)
    with pytest.raises(ValueError):
        SimConfig(retry_after="minutes")
    with pytest.raises(ValueError):
        SimConfig(rpm_limit=0)


# --- service tiers ------------------------------------------------------------------------


@pytest.mark.anyio
async def test_service_tier_is_echoed_as_the_tier_used_and_recorded_in_the_ledger() -> None:
    sim = make()
    reported = {}
    for asked in ("auto", "default", "flex", "priority"):
        answer = payload(await post(sim, chat(service_tier=asked)))
        reported[asked] = answer["service_tier"]
    assert reported == {"auto": "default", "default": "default", "flex": "flex"} | {
        "priority": "priority"
    }
    plain = payload(await post(sim, chat()))
    assert "service_tier" not in plain  # a request naming no tier gets none reported
    assert [b.service_tier for b in sim.ledger] == ["default", "default", "flex", "priority", None]
    stats = json.loads(sim.stats_json())
    assert stats["billed_by_tier"] == {"default": 2, "flex": 1, "priority": 1, "none": 1}
    chunks = await events(await post(sim, chat(service_tier="flex", stream=True)))
    assert all(json.loads(c[6:])["service_tier"] == "flex" for c in chunks[:-1])


@pytest.mark.anyio
async def test_unknown_or_unaccepted_tiers_are_a_400_naming_the_parameter() -> None:
    sim = make(SimConfig(tiers=["auto", "default"]))  # as --set tiers=[...] passes them
    assert sim.config.tiers == ("auto", "default")
    for bad in ("flex", "scale", 3):
        error = error_of(await post(sim, chat(service_tier=bad)), 400, "invalid_request_error")
        assert error["param"] == "service_tier"
    assert sim.ledger == []
    with pytest.raises(ValueError):
        SimConfig(flex_refusal_rate=1.5)
    with pytest.raises(ValueError):
        SimConfig(tiers="flex")  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_flex_refusals_are_429_resource_unavailable_with_retry_after_and_unbilled() -> None:
    sim = make(SimConfig(flex_refusal_rate=0.3, flex_retry_after=7, fail_5xx_rate=0.0))
    statuses = []
    for _ in range(200):
        response = await post(sim, chat(service_tier="flex"))
        statuses.append(response.status)
        if response.status == 429:
            assert response.headers["retry-after"] == "7"
            error = payload(response)["error"]
            assert error["code"] == "resource_unavailable" and error["type"] == "rate_limit_error"
            assert error["message"].startswith("Resource Unavailable")
    refused = statuses.count(429)
    assert 40 <= refused <= 80 and statuses.count(200) == 200 - refused
    assert sim.stats["flex_refused"] == refused and len(sim.ledger) == 200 - refused
    assert all(b.service_tier == "flex" for b in sim.ledger)
    # Only flex is refused, and the draws are seeded.
    default = [(await post(sim, chat(service_tier="default"))).status for _ in range(50)]
    assert set(default) == {200}
    again = make(SimConfig(flex_refusal_rate=0.3, flex_retry_after=7))
    assert [(await post(again, chat(service_tier="flex"))).status for _ in range(200)] == statuses


# --- the real HTTP server ------------------------------------------------------------------


@pytest.mark.anyio
async def test_http_server_answers_streams_and_drops() -> None:
    with anyio.fail_after(20):
        sim = Simulator(SimConfig(api_key="k"))
        runner, url = await start_server(sim, "127.0.0.1", 0)
        try:
            async with httpx.AsyncClient(base_url=url, timeout=5) as client:
                auth = {"authorization": "Bearer k"}
                denied = await client.post("/chat/completions", json=chat())
                assert denied.status_code == 401
                response = await client.post("/chat/completions", json=chat(), headers=auth)
                assert response.status_code == 200
                in_process = payload(await post(make(), chat()))
                assert response.json()["choices"] == in_process["choices"]
                lines: list[str] = []
                body = chat(stream=True, stream_options={"include_usage": True})
                async with client.stream(
                    "POST", "/chat/completions", json=body, headers=auth
                ) as streamed:
                    lines = [line async for line in streamed.aiter_lines()]
                assert [line for line in lines if line][-1] == "data: [DONE]"
                assert '"usage": {' in [line for line in lines if line][-2]
                health = await client.get(url.removesuffix("/v1") + "/health")
                assert health.status_code == 200
                sim.config.drop_rate = 1.0
                with pytest.raises(httpx.RemoteProtocolError):
                    await client.post("/chat/completions", json=chat(), headers=auth)
                sim.config.drop_rate = 0.0
                sim.config.stream_cut_rate = 1.0
                with pytest.raises(httpx.RemoteProtocolError):
                    async with client.stream(
                        "POST", "/chat/completions", json=body, headers=auth
                    ) as streamed:
                        await streamed.aread()
        finally:
            await runner.cleanup()
    assert sim.stats["dropped"] == 1 and sim.stats["stream_cut"] == 1


def test_run_server_prints_its_url_and_stops_on_ctrl_c() -> None:
    root = Path(__file__).resolve().parents[1]
    code = "from pipeline.sim import SimConfig, run_server; "
    code += "run_server(SimConfig(), '127.0.0.1', 0)"
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=root, env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stderr is not None
        with selectors.DefaultSelector() as selector:
            selector.register(proc.stderr, selectors.EVENT_READ)
            assert selector.select(timeout=20), "the simulator did not start"
        line = proc.stderr.readline()
        assert line.startswith("simulator listening on http://127.0.0.1:")
        url = line.split()[-1]
        assert url.endswith("/v1")
        response = httpx.post(f"{url}/chat/completions", json=chat(), timeout=5)
        assert response.status_code == 200
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0
        assert "simulator stopped" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


# --- the package's boundary ---------------------------------------------------------------


def test_simulator_package_imports_nothing_else_from_pipeline() -> None:
    """The product may use the simulator, never the reverse: the yardstick must not share
    code (a tokenizer, a constant) with what it measures."""
    package = Path(__file__).resolve().parents[1] / "pipeline" / "sim"
    sources = sorted(package.glob("*.py"))
    assert len(sources) > 5
    outside: list[str] = []
    for source in sources:
        for node in ast.walk(ast.parse(source.read_text(), str(source))):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] if node.level == 0 else ["<relative>"]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                inside = name == "pipeline.sim" or name.startswith("pipeline.sim.")
                if name == "<relative>" or (name.split(".")[0] == "pipeline" and not inside):
                    outside.append(f"{source.name}: {name}")
    assert outside == []


def test_in_process_simulator_loads_no_server_and_no_product_code() -> None:
    """``--provider sim`` pays for neither aiohttp nor any product module; the server's
    names still resolve on first use."""
    root = Path(__file__).resolve().parents[1]
    code = (
        "import sys, pipeline.sim as s; "
        "print(sorted(m for m in sys.modules if m == 'aiohttp' or "
        "(m.startswith('pipeline.') and not m.startswith('pipeline.sim')))); "
        "print(callable(s.run_server), 'aiohttp' in sys.modules)"
    )
    env = {**os.environ, "PYTHONPATH": str(root)}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["[]", "True True"]
    with pytest.raises(AttributeError):
        _ = sim_package.no_such_name
