"""ChatClient's use of httpx: what it trims for speed must not change what is sent."""

from __future__ import annotations

import gc
import json
from typing import Any

import httpx
import pytest

from pipeline.client import ChatClient

pytestmark = pytest.mark.anyio

BODY = {"model": "gpt-5.5", "messages": [{"role": "user", "content": "hi"}]}
ANSWER = {
    "id": "c1",
    "model": "gpt-5.5",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
}


def _client(seen: list[httpx.Request] | None, headers: dict[str, str] | None = None) -> ChatClient:
    def handler(request: httpx.Request) -> httpx.Response:
        if seen is not None:
            seen.append(request)
        return httpx.Response(200, json=ANSWER, headers=headers)

    return ChatClient(["http://gw.test"], "sk-test", transport=httpx.MockTransport(handler))


async def test_requests_go_to_chat_completions_with_the_body_as_json() -> None:
    seen: list[httpx.Request] = []
    client = _client(seen)
    reply = await client.complete(BODY)
    await client.aclose()
    assert reply.answer.content == "ok" and reply.http_status == 200
    assert str(seen[0].url) == "http://gw.test/v1/chat/completions"
    assert json.loads(seen[0].content) == BODY
    assert seen[0].headers["authorization"] == "Bearer sk-test"


async def test_a_cookie_the_server_sets_is_sent_back_as_before() -> None:
    seen: list[httpx.Request] = []
    client = _client(seen, headers={"set-cookie": "affinity=node7; Path=/"})
    await client.complete(BODY)
    await client.complete(BODY)
    await client.aclose()
    assert "cookie" not in seen[0].headers
    assert seen[1].headers["cookie"] == "affinity=node7"


async def test_answers_without_cookies_skip_the_cookie_jar(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[Any] = []
    monkeypatch.setattr(
        httpx.Cookies, "extract_cookies", lambda self, response: calls.append(response)
    )
    client = _client(None)
    await client.complete(BODY)
    await client.aclose()
    assert calls == []  # httpx still keeps the client's jar where the client reads it


async def test_an_answered_request_leaves_no_cyclic_garbage() -> None:
    """httpx ties each response to its stream in a cycle; the client cuts it, so all of
    a request's objects go by reference counting, not by the cyclic collector."""
    client = _client(None)
    await client.complete(BODY)  # warm up: first-use caches are not garbage
    gc.collect()
    gc.disable()
    try:
        for _ in range(5):
            await client.complete(BODY)
        left = [o for o in gc.get_objects() if isinstance(o, httpx.Response | httpx.Request)]
    finally:
        gc.enable()
        await client.aclose()
    assert left == []
