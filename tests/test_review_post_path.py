"""Sender.post (the lean JSON path) against a raw socket server: every way an answer
can stop short (cut by the deadline, past the size cap, a length that lies) must give
the connection back or close it, never leave it taken from the pool or hand a
half-read socket to the next request."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from pipeline.client import ChatClient, Connection
from pipeline.errors import TransportError

pytestmark = pytest.mark.anyio

ANSWER = json.dumps(
    {
        "id": "c1",
        "object": "chat.completion",
        "model": "m",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
    }
).encode()

Handler = Callable[[int, asyncio.StreamWriter], Awaitable[None]]


def _ok() -> bytes:
    head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
    return f"{head}Content-Length: {len(ANSWER)}\r\n\r\n".encode() + ANSWER


async def _read_request(reader: asyncio.StreamReader) -> bool:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    await reader.readexactly(length)
    return True


@contextlib.asynccontextmanager
async def _raw_server(first: Handler) -> AsyncIterator[str]:
    """The first request gets ``first``; every later one a good answer on the same
    connection (keep-alive), so a client that reuses a half-read socket reads junk."""
    count = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal count
        try:
            while True:
                try:
                    await _read_request(reader)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                count += 1
                if count == 1:
                    await first(count, writer)
                else:
                    writer.write(_ok())
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.close()


def _acquired(client: ChatClient) -> int:
    session: Any = client._http._transport.client  # type: ignore[attr-defined]
    return len(session.connector._acquired)


async def _then_a_good_answer(client: ChatClient) -> None:
    assert _acquired(client) == 0, "a connection was left taken from the pool"
    reply = await client.complete({"model": "m", "messages": []})
    assert reply.answer.content == "hi"
    assert _acquired(client) == 0


async def test_a_body_cut_by_the_deadline_gives_the_connection_back() -> None:
    async def stall(_: int, writer: asyncio.StreamWriter) -> None:
        head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 400\r\n\r\n"
        writer.write(head + ANSWER[:20])
        await writer.drain()
        await asyncio.sleep(30)

    async with _raw_server(stall) as url:
        client = ChatClient([url], "sk-test-key", Connection(deadline=0.5))
        try:
            with pytest.raises(TransportError) as caught:
                await client.complete({"model": "m", "messages": []})
            assert caught.value.error_type == "timeout"
            await _then_a_good_answer(client)
        finally:
            await client.aclose()


@pytest.mark.parametrize("declared", [True, False])
async def test_an_answer_past_the_cap_leaves_no_half_read_socket(declared: bool) -> None:
    big = b'{"x": "' + b"a" * 200_000 + b'"}'

    async def huge(_: int, writer: asyncio.StreamWriter) -> None:
        if declared:
            head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(big)}\r\n\r\n".encode()
            writer.write(head + big)
        else:
            chunk = f"{len(big):x}\r\n".encode() + big + b"\r\n0\r\n\r\n"
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk)

    async with _raw_server(huge) as url:
        client = ChatClient([url], None, Connection(max_response_bytes=1_000))
        try:
            with pytest.raises(TransportError) as caught:
                await client.complete({"model": "m", "messages": []})
            assert caught.value.error_type == "response_too_large"
            await _then_a_good_answer(client)
        finally:
            await client.aclose()


async def test_a_length_that_lies_short_is_not_read_as_the_next_answer() -> None:
    """Content-Length says 5 and 500 bytes come: the 495 extra must not become the
    start of the next answer on the reused connection."""

    async def lies(_: int, writer: asyncio.StreamWriter) -> None:
        head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 5\r\n\r\n"
        writer.write(head + b'{"a":' + b" " * 495)

    async with _raw_server(lies) as url:
        client = ChatClient([url], None, Connection())
        try:
            with pytest.raises(TransportError):
                await client.complete({"model": "m", "messages": []})
            reply = await client.complete({"model": "m", "messages": []})
            assert reply.answer.content == "hi"
        finally:
            await client.aclose()


@pytest.mark.parametrize(
    "extra",
    [
        b"Set-Cookie: affinity=n\xc5\x93ud; Path=/\r\n",  # UTF-8 in the cookie itself
        b"Set-Cookie: affinity=node7; Path=/\r\nX-Served-By: caf\xe9\r\n",  # Latin-1 elsewhere
    ],
)
async def test_an_answer_with_a_cookie_and_non_ascii_header_bytes_is_read(extra: bytes) -> None:
    """Header values may carry bytes past ASCII (obs-text). With a Set-Cookie among
    them the short way built an httpx.Response from aiohttp's decoded strings, which
    httpx encodes as ASCII: the answer (billed) became a malformed_response. And a
    cookie past ASCII kept in the jar made every later request fail the same way
    (httpx cannot write it in a Cookie header), on httpx's own path too."""

    async def cookie(_: int, writer: asyncio.StreamWriter) -> None:
        head = (
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            + extra
            + f"Content-Length: {len(ANSWER)}\r\n\r\n".encode()
        )
        writer.write(head + ANSWER)

    async with _raw_server(cookie) as url:
        client = ChatClient([url], None, Connection())
        try:
            reply = await client.complete({"model": "m", "messages": []})
            assert reply.answer.content == "hi"
            assert reply.answer.usage.total_tokens == 4
            # A cookie httpx cannot send back is dropped; an ASCII one is kept.
            assert ("affinity" in client._http.cookies) == (b"node7" in extra)
            again = await client.complete({"model": "m", "messages": []})
            assert again.answer.content == "hi"
        finally:
            await client.aclose()


@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
@pytest.mark.parametrize("case", ["proxied", "loopback", "localhost"])
async def test_the_proxy_the_environment_names_is_used_except_for_loopback(
    monkeypatch: pytest.MonkeyPatch, case: str, transport: str
) -> None:
    """HTTP_PROXY set: a request to a remote host goes to the proxy on either
    transport (httpx reads the variables only when it picks the transport itself, so
    the aiohttp one sent every request past the proxy). A loopback gateway is never
    proxied: the proxy's loopback is another machine, and the key (plain http, exempt
    from the warning because it "never crosses a network") would go to it in clear."""
    seen: list[bytes] = []

    async def proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await reader.readline())
        await _read_request_rest(reader)
        writer.write(_ok())
        await writer.drain()
        writer.close()

    async def direct(_: int, writer: asyncio.StreamWriter) -> None:
        writer.write(_ok())

    server = await asyncio.start_server(proxy, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with _raw_server(direct) as url:
            for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy", "https_proxy"):
                monkeypatch.delenv(name, raising=False)
            monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{port}")
            monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{port}")
            if case == "proxied":  # a name only the proxy knows: no DNS asked
                url = url.replace("127.0.0.1", "gateway.test")
            elif case == "localhost":
                url = url.replace("127.0.0.1", "localhost")
            client = ChatClient([url], "sk-test-key", Connection(http_transport=transport))
            try:
                reply = await client.complete({"model": "m", "messages": []})
            finally:
                await client.aclose()
    finally:
        server.close()
    assert reply.answer.content == "hi"
    if case == "proxied":
        assert seen == [f"POST {url}/chat/completions HTTP/1.1\r\n".encode()]
    else:
        assert seen == []


async def _read_request_rest(reader: asyncio.StreamReader) -> None:
    head = await reader.readuntil(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            await reader.readexactly(int(line.split(b":", 1)[1]))
