"""Guards for pipeline/httpx_shortcuts.py: each test fails when httpx stops having the
private part a shortcut relies on, so an httpx upgrade that breaks one is caught here,
not in a slow or leaky production run."""

from __future__ import annotations

import contextlib
import gc
import gzip
import json
import re
import tomllib
import weakref
import zlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.client import ChatClient, Connection
from pipeline.errors import TransportError
from pipeline.httpx_shortcuts import (
    MAX_COOKIE_BYTES,
    MAX_COOKIES,
    POST_ACCEPT_ENCODING,
    Sender,
    SkipEmptyCookies,
    inflate,
    lean_aiohttp_transport,
    read_capped,
    skip_empty_cookies,
    unbind,
)

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


def _cookie_client(answer: Callable[[httpx.Request], httpx.Response]) -> httpx.AsyncClient:
    client = httpx.AsyncClient(transport=httpx.MockTransport(answer))
    skip_empty_cookies(client)
    return client


@pytest.mark.parametrize("value_size", [10, 3000])
async def test_a_server_setting_cookie_after_cookie_cannot_grow_each_request(
    value_size: int,
) -> None:
    """A new cookie with every answer (or big ones): the jar keeps the newest within
    its bound, so the Cookie header sent stays bounded and the current one is sent."""
    sent: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        cookie = f"c{len(sent)}={'v' * value_size}; Path=/"
        return httpx.Response(200, headers={"set-cookie": cookie})

    client = _cookie_client(answer)
    notices: list[str] = []
    client.cookies.on_drop = notices.append  # type: ignore[attr-defined]
    for _ in range(300):
        await client.get("http://gw.test/v1/x")
    await client.aclose()
    sizes = [len(r.headers.get("cookie", "")) for r in sent]
    assert max(sizes) <= MAX_COOKIE_BYTES
    assert len(client.cookies.jar) <= MAX_COOKIES
    assert "c299=" in sent[-1].headers["cookie"]  # the newest is kept ...
    assert "c1=" not in sent[-1].headers["cookie"]  # ... the oldest went first
    assert len(notices) == 1 and "dropped" in notices[0]  # told once


async def test_one_gateway_filling_its_jar_leaves_anothers_sticky_cookie_alone() -> None:
    sent: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        if request.url.host == "a.test":
            cookies = [f"a{len(sent)}_{i}=x; Path=/" for i in range(5)]
            return httpx.Response(200, headers=[("set-cookie", c) for c in cookies])
        return httpx.Response(200, headers={"set-cookie": "AWSALB=node7; Path=/"})

    client = _cookie_client(answer)
    for _ in range(30):
        await client.get("http://a.test/v1/x")
    await client.get("http://b.test/v1/x")
    await client.get("http://b.test/v1/x")
    for _ in range(5):
        await client.get("http://a.test/v1/x")
    await client.get("http://b.test/v1/x")
    await client.aclose()
    assert sent[-1].headers["cookie"] == "AWSALB=node7"


async def test_a_sticky_cookie_set_again_with_the_same_value_stays_the_newest() -> None:
    """route=A re-sent with every answer beside a new cookie each time: it is set now
    every time, so the stale ones go first and route=A goes out with every request."""
    sent: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        cookies = ["route=A; Path=/", f"t{len(sent)}=v; Path=/"]
        return httpx.Response(200, headers=[("set-cookie", c) for c in cookies])

    client = _cookie_client(answer)
    for _ in range(150):
        await client.get("http://gw.test/v1/x")
    await client.aclose()
    assert all("route=A" in r.headers["cookie"] for r in sent[1:])


@pytest.mark.parametrize(
    ("host", "domain"),
    [
        ("127.0.0.1", ""),
        ("localhost", ""),
        ("[::1]", ""),
        ("gw.test", ""),
        ("vllm", "; Domain=local"),  # a k8s service name: stored as .local
        ("bücher.example", ""),  # IDNA: the jar keeps the ASCII form
        ("api.gw.example", "; Domain=gw.example"),
    ],
)
async def test_the_bound_holds_for_every_kind_of_host(host: str, domain: str) -> None:
    sent: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(200, headers={"set-cookie": f"c{len(sent)}=v; Path=/{domain}"})

    client = _cookie_client(answer)
    for _ in range(80):
        await client.get(f"http://{host}:8080/v1/x")
    await client.aclose()
    assert len(client.cookies.jar) == MAX_COOKIES
    last = sent[-1].headers["cookie"].split("; ")
    assert "c79=v" in last and "c1=v" not in last  # the newest kept, the oldest gone


async def test_one_gateway_flooding_leaves_a_failover_gateways_sticky_cookie_alone() -> None:
    """Two failover gateways under one parent (eastus/westus.example.net): each host
    is bounded by what it is sent, so the one flooding never evicts the other's."""
    sent: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        if request.url.host.startswith("west"):
            return httpx.Response(200, headers={"set-cookie": "ARRAffinity=sticky; Path=/"})
        return httpx.Response(200, headers={"set-cookie": f"e{len(sent)}=v; Path=/"})

    client = _cookie_client(answer)
    await client.get("http://westus-gw.example.net/v1/x")
    for _ in range(60):
        await client.get("http://eastus-gw.example.net/v1/x")
    await client.get("http://westus-gw.example.net/v1/x")
    await client.aclose()
    assert sent[-1].headers["cookie"] == "ARRAffinity=sticky"


async def test_a_parent_hosts_cookies_count_for_the_subdomain_they_are_sent_to() -> None:
    """The jar sends gw.example's host-only cookies to api.gw.example too: what a
    request to api.gw.example carries stays within the bound."""
    sent: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(200, headers={"set-cookie": f"c{len(sent)}={'v' * 100}; Path=/"})

    client = _cookie_client(answer)
    for _ in range(60):
        await client.get("http://gw.example/v1/x")
    for _ in range(60):
        await client.get("http://api.gw.example/v1/x")
    await client.aclose()
    assert max(len(r.headers.get("cookie", "")) for r in sent) <= MAX_COOKIE_BYTES


async def test_cookies_of_a_host_and_its_parent_domains_share_one_bound() -> None:
    """A request to a.b.c.gw.example is sent the host's cookies and those of every
    parent domain: what it sends stays within the bound, not one bound per domain."""
    sent: list[httpx.Request] = []
    domains = ["", "; Domain=c.gw.example", "; Domain=gw.example"]

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        n = len(sent)
        cookies = [f"c{n}_{i}={'v' * 200}; Path=/{d}" for i, d in enumerate(domains)]
        return httpx.Response(200, headers=[("set-cookie", c) for c in cookies])

    client = _cookie_client(answer)
    for _ in range(100):
        await client.get("http://a.b.c.gw.example/v1/x")
    await client.aclose()
    assert max(len(r.headers.get("cookie", "")) for r in sent) <= MAX_COOKIE_BYTES


async def test_a_kept_cookie_that_grows_past_the_bound_is_dropped_alone() -> None:
    sent: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        if len(sent) == 1:
            return httpx.Response(
                200, headers=[("set-cookie", "keep=1; Path=/"), ("set-cookie", "grow=v; Path=/")]
            )
        value = "v" * MAX_COOKIE_BYTES
        return httpx.Response(200, headers={"set-cookie": f"grow={value}; Path=/"})

    client = _cookie_client(answer)
    for _ in range(3):
        await client.get("http://gw.test/v1/x")
    await client.aclose()
    assert sorted(sent[1].headers["cookie"].split("; ")) == ["grow=v", "keep=1"]
    assert sent[2].headers["cookie"] == "keep=1"


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


def test_httpx_still_derives_proxy_routes_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """environment_proxy_mounts builds on httpx's own reading of the proxy variables."""
    from httpx._utils import get_environment_proxies

    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.test:3128")
    monkeypatch.setenv("NO_PROXY", "internal.test")
    routes = get_environment_proxies()
    assert routes["https://"] == "http://proxy.test:3128"
    assert routes["all://*internal.test"] is None


def test_httpx_is_capped_below_the_next_minor_version() -> None:
    """A new httpx minor release may move the private parts above: take it only on
    purpose, once these tests pass with it."""
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    spec = next(d for d in deps if re.match(r"httpx\s*[<>=!~]", d))
    cap = re.search(r"<\s*(\d+)\.(\d+)", spec)
    assert cap, f"httpx has no upper bound: {spec!r}"
    major, minor = (int(x) for x in httpx.__version__.split(".")[:2])
    assert (major, minor) < (int(cap[1]), int(cap[2]))


# -- Sender and the lean aiohttp transport -------------------------------------------

ANSWER = {
    "id": "c1",
    "model": "m",
    "choices": [{"message": {"content": "hi"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
}


@contextlib.asynccontextmanager
async def _server(
    seen: list[web.Request], headers: dict[str, str] | None = None, body: bytes | None = None
) -> AsyncIterator[str]:
    async def handle(request: web.Request) -> web.Response:
        await request.read()
        seen.append(request)
        if body is not None:
            return web.Response(body=body, content_type="application/json", headers=headers)
        return web.json_response(ANSWER, headers=headers)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handle)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        await runner.cleanup()


def test_the_client_keeps_what_sender_reads_where_it_reads_it() -> None:
    """Sender reads the client's transport, its proxy mounts and its default encoding."""
    transport = httpx.MockTransport(lambda request: httpx.Response(200))
    client = httpx.AsyncClient(transport=transport)
    assert client._transport is transport
    assert client._transport_for_url(httpx.URL("http://gw.test/v1")) is transport
    assert client._default_encoding == "utf-8"
    assert Sender(client, [httpx.URL("http://gw.test/v1")]).direct


@pytest.mark.parametrize("why", ["auth", "hook", "mount"])
def test_sender_takes_httpx_own_path_when_send_would_do_more(why: str) -> None:
    transport = httpx.MockTransport(lambda request: httpx.Response(200))
    kwargs: dict[str, Any] = {"transport": transport}
    if why == "auth":
        kwargs["auth"] = ("user", "pass")
    elif why == "hook":
        kwargs["event_hooks"] = {"request": [lambda request: None]}
    else:  # another transport for this host (as a proxy would be mounted)
        kwargs["mounts"] = {"http://gw.test": httpx.MockTransport(lambda r: httpx.Response(200))}
    client = httpx.AsyncClient(**kwargs)
    assert not Sender(client, [httpx.URL("http://gw.test/v1/chat/completions")]).direct


async def test_chat_requests_skip_async_client_send_and_keep_their_headers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The default transport's requests go straight to aiohttp, with the same headers
    httpx would send (the key, the content type, the length), and the answer is read."""

    async def no_send(*args: object, **kwargs: object) -> httpx.Response:
        raise AssertionError("AsyncClient.send was used")

    monkeypatch.setattr(httpx.AsyncClient, "send", no_send)
    seen: list[web.Request] = []
    async with _server(seen) as url:
        client = ChatClient([url], "sk-test-key", Connection())
        try:
            reply = await client.complete({"model": "m", "messages": []})
        finally:
            await client.aclose()
    assert reply.answer.content == "hi" and reply.answer.usage.total_tokens == 4
    headers = seen[0].headers
    assert headers["authorization"] == "Bearer sk-test-key"
    assert headers["content-type"] == "application/json"
    assert int(headers["content-length"]) == seen[0].content_length > 0
    assert headers["host"].startswith("127.0.0.1:")
    assert "user-agent" in headers and "accept-encoding" in headers


async def test_a_cookie_set_by_the_gateway_goes_back_on_the_lean_path() -> None:
    seen: list[web.Request] = []
    async with _server(seen, headers={"set-cookie": "affinity=node7; Path=/"}) as url:
        client = ChatClient([url], "sk-test-key", Connection())
        try:
            for _ in range(2):
                await client.complete({"model": "m", "messages": []})
        finally:
            await client.aclose()
    assert "cookie" not in seen[0].headers
    assert seen[1].headers["cookie"] == "affinity=node7"


async def test_read_capped_reads_the_lean_stream_whole_and_stops_past_the_cap() -> None:
    body = b'{"x": "' + b"a" * 100_000 + b'"}'
    seen: list[web.Request] = []
    async with _server(seen, body=body) as url:
        limits = httpx.Limits(max_connections=4)
        async with httpx.AsyncClient(transport=lean_aiohttp_transport(limits)) as client:
            sender = Sender(client, [httpx.URL(url)])
            for cap, expected in ((len(body), body), (len(body) - 1, None)):
                request = sender.build(httpx.URL(f"{url}/chat/completions"), b"{}")
                response = await sender.send(request)
                assert await read_capped(response, cap) == expected
                await response.aclose()
            plain = httpx.Response(200, content=b"{}")
            with pytest.raises(LookupError):
                await read_capped(plain, 10)


# -- Sender.post: answers read and decoded without httpx's model objects ---------------


def _deflate_raw(data: bytes) -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return packer.compress(data) + packer.flush()


@pytest.mark.parametrize(
    ("coding", "pack"),
    [
        ("identity", lambda b: b),
        ("gzip", gzip.compress),
        ("x-gzip", gzip.compress),
        ("deflate", zlib.compress),  # zlib-wrapped, as the standard says
        ("deflate", _deflate_raw),  # a raw deflate stream, as some servers send
        ("GZip ", gzip.compress),
    ],
)
async def test_a_compressed_answer_is_decoded_on_the_short_way(
    monkeypatch: pytest.MonkeyPatch, coding: str, pack: Any
) -> None:
    async def no_send(*args: object, **kwargs: object) -> httpx.Response:
        raise AssertionError("the request took httpx's path")

    monkeypatch.setattr(Sender, "send", no_send)
    seen: list[web.Request] = []
    body = pack(json.dumps(ANSWER).encode())
    async with _server(seen, headers={"content-encoding": coding}, body=body) as url:
        client = ChatClient([url], "sk-test-key", Connection())
        try:
            reply = await client.complete({"model": "m", "messages": []})
        finally:
            await client.aclose()
    assert reply.answer.content == "hi" and reply.answer.usage.total_tokens == 4
    assert seen[0].headers["accept-encoding"] == POST_ACCEPT_ENCODING


async def test_a_small_compressed_answer_that_inflates_past_the_cap_is_dropped() -> None:
    """1 MiB of zeros gzips to ~1 KB: the cap applies to what it inflates to, so a
    compressed bomb is refused without ever being held whole in memory."""
    bomb = gzip.compress(b"0" * 2**20)
    assert len(bomb) < 5_000
    seen: list[web.Request] = []
    async with _server(seen, headers={"content-encoding": "gzip"}, body=bomb) as url:
        client = ChatClient([url], None, Connection(max_response_bytes=2**19))
        try:
            with pytest.raises(TransportError) as caught:
                await client.complete({"model": "m", "messages": []})
        finally:
            await client.aclose()
    assert caught.value.error_type == "response_too_large"


@pytest.mark.parametrize(
    ("coding", "body"),
    [("br", b"\x1b\x00"), ("gzip", b"not gzip at all"), ("gzip, gzip", b"{}")],
)
async def test_an_answer_in_a_coding_not_asked_for_or_broken_is_a_protocol_error(
    coding: str, body: bytes
) -> None:
    seen: list[web.Request] = []
    async with _server(seen, headers={"content-encoding": coding}, body=body) as url:
        client = ChatClient([url], None, Connection())
        try:
            with pytest.raises(TransportError) as caught:
                await client.complete({"model": "m", "messages": []})
        finally:
            await client.aclose()
    assert caught.value.error_type == "protocol_error"
    assert "content-encoding" in str(caught.value) or "decode" in str(caught.value)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=2_000), cap=st.integers(0, 4_000))
def test_inflate_never_returns_more_than_the_cap_or_raises_anything_else(
    data: bytes, cap: int
) -> None:
    for coding in ("gzip", "deflate", "identity"):
        for body in (data, gzip.compress(data), zlib.compress(data)):
            try:
                out = inflate(body, coding, cap)
            except httpx.DecodingError:
                continue
            if coding == "identity":
                assert out is body
            elif out is not None:
                assert len(out) <= cap
                if body is not data:
                    assert out == data
