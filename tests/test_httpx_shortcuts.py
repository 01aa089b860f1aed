"""Guards for pipeline/httpx_shortcuts.py: each test fails when httpx stops having the
private part a shortcut relies on, so an httpx upgrade that breaks one is caught here,
not in a slow or leaky production run."""

from __future__ import annotations

import gc
import re
import tomllib
import weakref
from pathlib import Path
from typing import Any

import httpx
import pytest

from pipeline.httpx_shortcuts import SkipEmptyCookies, skip_empty_cookies, unbind

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.anyio


def _client(headers: dict[str, str]) -> httpx.AsyncClient:
    transport = httpx.MockTransport(lambda request: httpx.Response(200, headers=headers))
    client = httpx.AsyncClient(transport=transport)
    skip_empty_cookies(client)
    return client


def test_the_client_keeps_its_jar_in_the_private_cookies_attribute() -> None:
    client = httpx.AsyncClient()
    assert isinstance(vars(client).get("_cookies"), httpx.Cookies)
    skip_empty_cookies(client)
    assert type(client.cookies) is SkipEmptyCookies, "httpx reads its jar from elsewhere"


@pytest.mark.parametrize(("headers", "calls"), [({}, 0), ({"set-cookie": "a=1; Path=/"}, 1)])
async def test_httpx_hands_every_answer_to_the_jar_we_installed(
    monkeypatch: pytest.MonkeyPatch, headers: dict[str, str], calls: int
) -> None:
    seen: list[Any] = []
    monkeypatch.setattr(httpx.Cookies, "extract_cookies", lambda self, r: seen.append(r))
    client = _client(headers)
    await client.get("http://gw.test/v1/x")
    await client.aclose()
    assert len(seen) == calls


async def test_a_cookie_still_reaches_the_jar_and_goes_back() -> None:
    sent: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(200, headers={"set-cookie": "affinity=node7; Path=/"})

    client = httpx.AsyncClient(transport=httpx.MockTransport(answer))
    skip_empty_cookies(client)
    await client.get("http://gw.test/v1/x")
    await client.get("http://gw.test/v1/x")
    await client.aclose()
    assert sent[1].headers["cookie"] == "affinity=node7"


async def test_a_response_keeps_its_stream_in_a_plain_attribute_and_unbind_frees_it() -> None:
    client = httpx.AsyncClient(
        transport=httpx.MockTransport(lambda request: httpx.Response(200, content=b"body"))
    )
    response = await client.get("http://gw.test/v1/x")
    await client.aclose()
    assert "stream" in vars(response), "httpx no longer keeps the stream where unbind cuts it"
    unbind(response)
    assert response.content == b"body" and response.is_closed
    gone = weakref.ref(response)
    gc.disable()
    try:
        del response
        assert gone() is None, "the response was still in a reference cycle"
    finally:
        gc.enable()


def test_httpx_is_capped_below_the_next_minor_version() -> None:
    """A new httpx minor release may move the private parts above: take it only on
    purpose, once these tests pass with it."""
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    spec = next(d for d in deps if re.match(r"httpx\s*[<>=!~]", d))
    cap = re.search(r"<\s*(\d+)\.(\d+)", spec)
    assert cap, f"httpx has no upper bound: {spec!r}"
    major, minor = (int(x) for x in httpx.__version__.split(".")[:2])
    assert (major, minor) < (int(cap[1]), int(cap[2]))
