"""A hostile OpenAI-compatible gateway on loopback, for tests of what a server can do.

Usage::

    from tests.hostile_gateway import hostile_gateway  # the pytest fixture

    def test_x(hostile_gateway: HostileGateway) -> None:
        hostile_gateway.mode = "trickle"
        ... ChatClient([hostile_gateway.base_url], KEY) or ``pipeline run --base-url`` ...

The server (aiohttp) runs in a thread with its own event loop, so both an async test's
client and a ``CliRunner`` run (which starts its own loop) can talk to it. ``mode``
picks what every request gets; mode ``by_prompt`` lets one run mix cases: each
request's last message text is taken as its mode. ``tls_base_url`` serves the same
app over https with a self-signed certificate made at start (``openssl``), which no
client trusts.

Modes (see ``MODES``): ``ok`` answer with usage (JSON, or SSE when asked to stream);
``no_usage`` the same without a usage block; ``trickle`` one byte per
``trickle_interval``; ``endless_sse`` events that never reach ``[DONE]``;
``huge_body`` a JSON body that never ends; ``long_sse_line`` one SSE line that never
ends; ``bad_status_line`` / ``long_header`` not HTTP at all (written on the raw socket);
``echo_401`` / ``echo_400`` / ``echo_content`` / ``echo_escaped`` / ``echo_header``
the Authorization value put in a 401 body, a 400 body, the answer content, the answer
content as JSON ``\\u`` escapes, a 5xx with the key in a header and its text body;
``redirect`` a 307 to https; ``nested_json`` ~100k ``[``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import ssl
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

MODES = (
    "ok",
    "no_usage",
    "trickle",
    "endless_sse",
    "huge_body",
    "long_sse_line",
    "bad_status_line",
    "long_header",
    "echo_401",
    "echo_400",
    "echo_content",
    "echo_escaped",
    "echo_header",
    "echo_encoded",
    "echo_encoded_content",
    "cookie_flood",
    "redirect",
    "nested_json",
    "by_prompt",
)

# A hostile handler stops on its own after this long or this many bytes, so a client
# bug can never leave the test process writing forever.
_MAX_SECONDS = 20.0
_MAX_BYTES = 512 * 2**20


class HostileGateway:
    """A loopback gateway whose behaviour is set by ``mode`` (any of ``MODES``)."""

    def __init__(self, cert_dir: Path | None = None) -> None:
        self.mode = "ok"
        self.trickle_interval = 0.05  # seconds between bytes in mode "trickle"
        self.requests = 0  # requests received, any mode
        self.modes_seen: list[str] = []
        self._cert_dir = cert_dir
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self.port = 0
        self.tls_port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def tls_base_url(self) -> str:
        if not self.tls_port:
            raise RuntimeError("no TLS listener: start the gateway with a cert_dir")
        return f"https://127.0.0.1:{self.tls_port}/v1"

    def start(self) -> HostileGateway:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = _port(site)
        if self._cert_dir is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(*self_signed_certificate(self._cert_dir))
            tls_site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=context)
            await tls_site.start()
            self.tls_port = _port(tls_site)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        body = await request.json()
        mode = self.mode
        if mode == "by_prompt":
            mode = str(body["messages"][-1]["content"]).strip()
        self.modes_seen.append(mode)
        auth = request.headers.get("authorization", "")
        stream = bool(body.get("stream"))
        handler = getattr(self, f"_mode_{mode}", None)
        if handler is None:
            return web.json_response({"error": {"message": f"unknown mode {mode!r}"}}, status=418)
        response: web.StreamResponse = await handler(request, auth=auth, stream=stream)
        return response

    # -- well-behaved answers -------------------------------------------------------

    async def _mode_ok(
        self, request: web.Request, *, auth: str, stream: bool, content: str = "fine"
    ) -> web.StreamResponse:
        usage = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
        return await _answer(request, stream, content, usage)

    async def _mode_no_usage(
        self, request: web.Request, *, auth: str, stream: bool
    ) -> web.StreamResponse:
        return await _answer(request, stream, "fine", None)

    async def _mode_echo_content(
        self, request: web.Request, *, auth: str, stream: bool
    ) -> web.StreamResponse:
        return await self._mode_ok(request, auth=auth, stream=stream, content=f"you sent {auth}")

    async def _mode_echo_escaped(
        self, request: web.Request, *, auth: str, stream: bool
    ) -> web.StreamResponse:
        escaped = "".join(f"\\u{ord(c):04x}" for c in auth)
        raw = (
            '{"id":"x","model":"m","choices":[{"index":0,"finish_reason":"stop",'
            f'"message":{{"role":"assistant","content":"you sent {escaped}"}}}}],'
            '"usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7}}'
        )
        return web.Response(body=raw.encode(), content_type="application/json")

    # -- error answers that carry the key -------------------------------------------

    async def _mode_echo_401(
        self, request: web.Request, *, auth: str, stream: bool
    ) -> web.StreamResponse:
        error = {"message": f"Token {auth} is invalid", "type": "authentication_error"}
        return web.json_response({"error": error}, status=401)

    async def _mode_echo_400(
        self, request: web.Request, *, auth: str, stream: bool
    ) -> web.StreamResponse:
        error = {"message": f"bad request from {auth}", "type": "invalid_request_error"}
        return web.json_response({"error": error, "param": auth}, status=400)

    async def _mode_echo_header(
        self, request: web.Request, *, auth: str, stream: bool
    ) -> web.StreamResponse:
        return web.Response(
            status=502, text=f"upstream refused {auth}", headers={"x-ratelimit-echo": auth}
        )

    async def _mode_echo_encoded(
        self, request: web.Request, *, auth: str, stream: bool
    ) -> web.StreamResponse:
        """A 400 naming the key percent-encoded, and base64 of the Authorization
        value in its text and a header (a proxy that logs what it forwarded)."""
        key = auth.removeprefix("Bearer ")
        basic = base64.b64encode(auth.encode()).decode()
        error = {
            "message": f"bad key {urllib.parse.quote(key, safe='')} (forwarded as {basic})",
            "type": "invalid_request_error",
        }
        return web.json_response({"error": error}, status=400, headers={"x-forwarded-auth": basic})

    async def _mode_echo_encoded_content(
        self, request: web.Request, *, auth: str, stream: bool
    ) -> web.StreamResponse:
        key = auth.removeprefix("Bearer ")
        content = (
            f"key={urllib.parse.quote_plus(key)}; b64={base64.b64encode(key.encode()).decode()}"
        )
        return await self._mode_ok(request, auth=auth, stream=stream, content=content)

    async def _mode_cookie_flood(
        self, request: web.Request, *, auth: str, stream: bool
    ) -> web.StreamResponse:
        """A good answer that sets three new 1 KiB cookies, every time."""
        response = await self._mode_ok(request, auth=auth, stream=stream)
        for i in range(3):
            response.set_cookie(f"s{self.requests}_{i}", "v" * 1024)
        return response

    async def _mode_redirect(
        self, request: web.Request, *, auth: str, stream: bool
    ) -> web.StreamResponse:
        target = f"https://127.0.0.1:{self.port}/v1/chat/completions"
        return web.Response(status=307, headers={"location": target}, text="moved")

    async def _mode_nested_json(
        self, request: web.Request, *, auth: str, stream: bool
    ) -> web.StreamResponse:
        if stream:
            return await _sse(request, [b"data: " + b"[" * 100_000 + b"\n\n"])
        return web.Response(body=b"[" * 100_000, content_type="application/json")

    # -- answers that never end -----------------------------------------------------

    async def _mode_trickle(
        self, request: web.Request, *, auth: str, stream: bool
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "application/json"})
        await response.prepare(request)

        async def one_byte() -> bytes:
            await asyncio.sleep(self.trickle_interval)
            return b" "

        return await _forever(response, one_byte)

    async def _mode_endless_sse(
        self, request: web.Request, *, auth: str, stream: bool
    ) -> web.StreamResponse:
        event = b"data: " + json.dumps(_chunk("more ")).encode() + b"\n\n"
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        return await _forever(response, _constant(event * 64))

    async def _mode_huge_body(
        self, request: web.Request, *, auth: str, stream: bool
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "application/json"})
        await response.prepare(request)
        await response.write(b'{"choices":[{"message":{"content":"')
        return await _forever(response, _constant(b"x" * 65536))

    async def _mode_long_sse_line(
        self, request: web.Request, *, auth: str, stream: bool
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b'data: {"choices":[{"delta":{"content":"')
        return await _forever(response, _constant(b"x" * 65536))

    # -- not HTTP at all --------------------------------------------------------------

    async def _mode_bad_status_line(
        self, request: web.Request, *, auth: str, stream: bool
    ) -> web.StreamResponse:
        return await _raw(request, b"HTTP/1.1 banana split\r\n\r\n")

    async def _mode_long_header(
        self, request: web.Request, *, auth: str, stream: bool
    ) -> web.StreamResponse:
        head = b"HTTP/1.1 200 OK\r\nx-filler: " + b"a" * 70_000 + b"\r\n"
        return await _raw(request, head + b"content-length: 2\r\n\r\n{}")


def _port(site: web.TCPSite) -> int:
    server = site._server
    assert server is not None and server.sockets  # type: ignore[union-attr]
    return int(server.sockets[0].getsockname()[1])  # type: ignore[union-attr]


def _chunk(content: str) -> dict[str, Any]:
    return {
        "id": "x",
        "object": "chat.completion.chunk",
        "model": "m",
        "choices": [{"index": 0, "delta": {"content": content}}],
    }


async def _answer(
    request: web.Request, stream: bool, content: str, usage: dict[str, int] | None
) -> web.StreamResponse:
    if not stream:
        data: dict[str, Any] = {
            "id": "x",
            "object": "chat.completion",
            "model": "m",
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "stop",
                    "message": {"role": "assistant", "content": content},
                }
            ],
        }
        if usage is not None:
            data["usage"] = usage
        return web.json_response(data)
    last: dict[str, Any] = {**_chunk(""), "choices": [{"index": 0, "finish_reason": "stop"}]}
    if usage is not None:
        last["usage"] = usage
    events = [_chunk(content), last]
    lines = [b"data: " + json.dumps(e).encode() + b"\n\n" for e in events]
    return await _sse(request, [*lines, b"data: [DONE]\n\n"])


async def _sse(request: web.Request, lines: list[bytes]) -> web.StreamResponse:
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    for line in lines:
        await response.write(line)
    await response.write_eof()
    return response


def _constant(data: bytes) -> Any:
    async def produce() -> bytes:
        await asyncio.sleep(0)
        return data

    return produce


async def _forever(response: web.StreamResponse, produce: Any) -> web.StreamResponse:
    """Write ``produce()`` until the client hangs up (or the safety bounds)."""
    started, sent = time.monotonic(), 0
    try:
        while time.monotonic() - started < _MAX_SECONDS and sent < _MAX_BYTES:
            data = await produce()
            await response.write(data)
            sent += len(data)
    except (ConnectionError, RuntimeError, asyncio.CancelledError):
        pass
    return response


async def _raw(request: web.Request, data: bytes) -> web.StreamResponse:
    """Write bytes that are not a valid HTTP answer straight to the socket, then hang up."""
    transport = request.transport
    assert transport is not None
    transport.write(data)
    await asyncio.sleep(0.05)
    transport.close()
    raise asyncio.CancelledError  # aiohttp drops the request without writing anything


def self_signed_certificate(folder: Path) -> tuple[str, str]:
    """(cert, key) for 127.0.0.1, made by the ``openssl`` command line."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    if not cert.exists():
        openssl = shutil.which("openssl")
        if openssl is None:
            raise RuntimeError("the openssl command is needed to make a test certificate")
        subprocess.run(
            [
                openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                "-keyout", str(key), "-out", str(cert), "-days", "2",
                "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
            ],
            check=True,
            capture_output=True,
        )  # fmt: skip
    return str(cert), str(key)


@pytest.fixture
def hostile_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostileGateway]:
    """A fresh gateway per test (mode ``ok``), with its TLS listener, stopped afterwards."""
    cert_dir = tmp_path_factory.getbasetemp() / "hostile-gateway-tls"  # one per session
    cert_dir.mkdir(exist_ok=True)
    gateway = HostileGateway(cert_dir=cert_dir).start()
    try:
        yield gateway
    finally:
        gateway.stop()
