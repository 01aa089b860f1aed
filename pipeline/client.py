"""Send one chat-completion request with httpx and return a parsed Answer or raise.

The client knows the wire (JSON or SSE) and which base URL to use; it does not retry,
wait or count: the runner and the retry policy decide that. Transports plug in
(httpx's own, the in-process simulator, a mock in tests), so nothing here needs a
network to be tested.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from pipeline.errors import RequestError, TransportError
from pipeline.failover import Endpoints
from pipeline.wire import Answer, StreamAssembler, parse_completion, parse_error


def normalize_base_url(url: str) -> str:
    """``http://host:port`` and ``http://host:port/v1`` both mean ``.../v1``.

    A URL with any other path is taken as given (some gateways mount the API
    elsewhere); a pasted ``.../chat/completions`` is trimmed back to its base.
    """
    url = url.strip().rstrip("/")
    if url.endswith("/chat/completions"):
        url = url[: -len("/chat/completions")]
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"base URL {url!r} must look like http(s)://host[:port][/v1]")
    if parts.path in ("", "/"):
        url = url + "/v1"
    return url


@dataclass(slots=True)
class Reply:
    """A successful answer and where it came from."""

    answer: Answer
    base_url: str
    http_status: int
    headers: Mapping[str, str]
    latency_ms: float


class ChatClient:
    """POST ``{base}/chat/completions`` with a Bearer key, JSON or streamed."""

    def __init__(
        self,
        base_urls: list[str],
        api_key: str | None,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: float = 600.0,
        stream: bool = False,
        max_connections: int = 100,
        http_transport: str = "aiohttp",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        headers = {"content-type": "application/json", "accept": "application/json"}
        limits = httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections
        )
        if transport is None and http_transport == "aiohttp":
            transport = _aiohttp_transport(limits)
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
        self.endpoints = Endpoints([normalize_base_url(u) for u in base_urls], clock=clock)
        self.stream = stream
        self._clock = clock
        # Parsed once: httpx parses a URL given as text again on every request.
        self._urls = {u: httpx.URL(f"{u}/chat/completions") for u in self.endpoints.urls}
        self._http = httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 30.0)),
            limits=limits,
            transport=transport,
        )
        self._http._cookies = _Cookies()  # the setter would copy it into a plain Cookies

    async def aclose(self) -> None:
        await self._http.aclose()

    async def complete(self, body: dict[str, Any]) -> Reply:
        """Send one request to the best base URL now. Raises RequestError on failure.

        Connection trouble and 5xx answers count against the base URL so the next
        request moves to the fallback; any answer from it counts in its favour.
        """
        base = self.endpoints.pick()
        started = self._clock()
        try:
            if self.stream:
                reply = await self._send_stream(base, body)
            else:
                reply = await self._send_json(base, body)
        except RequestError as exc:
            if isinstance(exc, TransportError) or (exc.http_status or 0) >= 500:
                self.endpoints.failed(base)
            else:
                self.endpoints.succeeded(base)
            exc.base_url = base
            raise
        self.endpoints.succeeded(base)
        reply.latency_ms = (self._clock() - started) * 1000.0
        return reply

    async def _send_json(self, base: str, body: dict[str, Any]) -> Reply:
        content = json.dumps(body, ensure_ascii=False).encode("utf-8")
        try:
            response = await self._http.post(self._urls[base], content=content)
        except httpx.TimeoutException as exc:
            raise TransportError("timeout", f"request timed out ({type(exc).__name__})") from None
        except httpx.HTTPError as exc:
            raise TransportError("connection_error", _describe(exc)) from None
        _unbind(response)
        if response.status_code >= 400:
            raise parse_error(response.status_code, response.content, response.headers)
        answer = parse_completion(response.content)
        return Reply(answer, base, response.status_code, response.headers, 0.0)

    async def _send_stream(self, base: str, body: dict[str, Any]) -> Reply:
        payload = dict(body, stream=True, stream_options={"include_usage": True})
        content = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        assembler = StreamAssembler()
        try:
            async with self._http.stream("POST", self._urls[base], content=content) as response:
                if response.status_code >= 400:
                    raw = await response.aread()
                    raise parse_error(response.status_code, raw, response.headers)
                async for text in response.aiter_text():
                    assembler.feed_text(text)
                status, headers = response.status_code, response.headers
            _unbind(response)  # closed by now: the ``async with`` has exited
        except httpx.TimeoutException as exc:
            raise TransportError("timeout", f"stream timed out ({type(exc).__name__})") from None
        except httpx.HTTPError as exc:
            raise TransportError("stream_cut", _describe(exc)) from None
        return Reply(assembler.finish(), base, status, headers, 0.0)


def _aiohttp_transport(limits: httpx.Limits) -> httpx.AsyncBaseTransport:
    """httpx's API over aiohttp's connection handling: measured ~5x faster on 2 cores
    (bench/RESULTS.md), and it holds thousands of connections where httpx's own pool
    times out on connect."""
    from httpx_aiohttp import AiohttpTransport

    return AiohttpTransport(limits=limits)


class _Cookies(httpx.Cookies):
    """httpx's cookie handling, minus its cost on answers that set no cookie.

    httpx hands every response to ``http.cookiejar``, building urllib request and
    response stand-ins first: ~9% of the event loop's time at 1,500 in flight
    (bench/RESULTS.md). The jar only acts on ``Set-Cookie``/``Set-Cookie2`` headers,
    so a response without them is skipped; one with them is handled as before.
    """

    def extract_cookies(self, response: httpx.Response) -> None:
        headers = response.headers
        if "set-cookie" in headers or "set-cookie2" in headers:
            super().extract_cookies(response)


_DRAINED = httpx.ByteStream(b"")


def _unbind(response: httpx.Response) -> None:
    """Break the reference cycle httpx makes between a response and its stream.

    httpx wraps every response's stream in one that points back at the response, so
    each request leaves ~35 objects (request, URL, headers, aiohttp's response) that
    only the cyclic garbage collector can free: work for every young-generation pass,
    and, since ``pipeline run`` makes full passes rare (``pipeline.cli``), garbage
    that could otherwise pile up in the old generation between them. Call once the
    body is read and the stream closed: the bytes stay in ``response.content``.
    """
    response.stream = _DRAINED


def _describe(exc: httpx.HTTPError) -> str:
    """A one-line reason that never carries request headers (and so never the key)."""
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:300]
