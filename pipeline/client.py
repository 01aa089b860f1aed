"""Send one chat-completion request with httpx and return a parsed Answer or raise.

The client knows the wire (JSON or SSE) and which base URL to use; it does not retry,
wait or count: the runner and the retry policy decide that. Transports plug in
(httpx's own, the in-process simulator, a mock in tests), so nothing here needs a
network to be tested.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import anyio
import httpx

from pipeline import codec
from pipeline.errors import (
    ApiError,
    ConfigurationError,
    RequestError,
    TransportError,
    UsageError,
)
from pipeline.failover import Endpoints
from pipeline.httpx_shortcuts import (
    Sender,
    environment_proxy_mounts,
    lean_aiohttp_transport,
    read_capped,
    skip_empty_cookies,
    unbind,
)
from pipeline.redact import Redactor, is_loopback, refuse_url_secrets
from pipeline.wire import (
    MAX_SSE_LINE_BYTES,
    Answer,
    StreamAssembler,
    parse_completion,
    parse_error,
)


def normalize_base_url(url: str) -> str:
    """``http://host:port`` and ``http://host:port/v1`` both mean ``.../v1``.

    A URL with any other path is taken as given (some gateways mount the API
    elsewhere); a pasted ``.../chat/completions`` is trimmed back to its base.
    """
    url = url.strip().rstrip("/")
    if url.endswith("/chat/completions"):
        url = url[: -len("/chat/completions")]
    try:
        refuse_url_secrets(url)
    except ValueError as exc:  # only its own refusal: the message names no secret
        raise UsageError(f"--base-url {exc}") from None
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UsageError(f"--base-url {url!r} must look like http(s)://host[:port][/v1]")
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


# Seconds one attempt may take in all, streams included (``--deadline``): a server
# trickling bytes never holds a request longer, while ``--timeout`` bounds each wait
# within it. Half an hour covers the longest reasoning streams.
DEFAULT_DEADLINE = 1800.0
# Largest answer read per attempt, body or whole stream, in MiB (``--max-response-mb``):
# a 200k-token answer streamed one token per event is ~60 MB of SSE, a non-streamed
# answer a few MB. Past it the attempt fails as ``response_too_large`` and is retried.
DEFAULT_MAX_RESPONSE_MB = 100.0


@dataclass(frozen=True, slots=True)
class Connection:
    """How the client talks to a gateway; every attempt is bounded by these.

    ``timeout``: seconds without a byte (connect is capped at 30 s: a host that does
    not accept a connection in that time is down, whatever the answers cost).
    ``deadline``: seconds an attempt may take in all, streams included, so a server
    trickling a byte a minute cannot hold a worker forever (the default leaves room
    for long reasoning answers). ``max_response_bytes``: the most of one answer read
    (more is a row error, not an out-of-memory). ``stream``: ask for SSE answers.
    ``max_connections``: the connection pool, sized to the in-flight cap so no
    admitted request waits for a socket. ``http_transport``: ``aiohttp`` (httpx over
    aiohttp's pool, several times faster under load) or ``httpx`` (httpx's own).
    """

    timeout: float = 600.0
    deadline: float = DEFAULT_DEADLINE
    max_response_bytes: int = int(DEFAULT_MAX_RESPONSE_MB * 2**20)
    stream: bool = False
    max_connections: int = 100
    http_transport: str = "aiohttp"


class ChatClient:
    """POST ``{base}/chat/completions`` with a Bearer key, JSON or streamed.

    Every attempt is bounded: ``deadline`` seconds in all (streams included),
    ``max_response_bytes`` of answer, ``MAX_SSE_LINE_BYTES`` per stream line. Every
    byte the server sends passes the key scrubber (``pipeline.redact``) before it is
    parsed, so no text that leaves the client can carry the key. Whatever goes wrong
    on the wire leaves as a RequestError with an ``error_type`` that names the cause.
    """

    def __init__(
        self,
        base_urls: list[str],
        api_key: str | None,
        connection: Connection = Connection(),
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.monotonic,
        notice: Callable[[str], None] | None = None,
    ) -> None:
        timeout, deadline = connection.timeout, connection.deadline
        max_connections, http_transport = connection.max_connections, connection.http_transport
        stream, max_response_bytes = connection.stream, connection.max_response_bytes
        headers = {"content-type": "application/json", "accept": "application/json"}
        limits = httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections
        )
        mounts: dict[str, httpx.AsyncBaseTransport | None] = {}
        if transport is None and http_transport == "aiohttp":
            transport = _aiohttp_transport(limits)
            mounts = environment_proxy_mounts(limits)  # as httpx's own transport has
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
        self.redactor = Redactor(api_key)
        self.endpoints = Endpoints([normalize_base_url(u) for u in base_urls], clock=clock)
        self.stream = stream
        self.deadline = deadline
        self.max_response_bytes = max_response_bytes
        self._clock = clock
        # Parsed once: httpx parses a URL given as text again on every request.
        self._urls = {u: httpx.URL(f"{u}/chat/completions") for u in self.endpoints.urls}
        self._url_texts = {u: str(url) for u, url in self._urls.items()}
        # A loopback gateway is never reached through a proxy from the environment
        # (either transport): the proxy's loopback is another machine's, and a key sent
        # over plain http "to this machine" would cross the network.
        for url in self._urls.values():
            if is_loopback(url.host):
                mounts[f"all://[{url.host}]" if ":" in url.host else f"all://{url.host}"] = None
        self._http = httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 30.0)),
            limits=limits,
            transport=transport,
            mounts=mounts,
        )
        skip_empty_cookies(self._http, on_drop=notice)
        self._sender = Sender(self._http, list(self._urls.values()))

    async def aclose(self) -> None:
        await self._http.aclose()

    async def complete(
        self,
        body: dict[str, Any],
        *,
        shape: Callable[[str, dict[str, Any]], dict[str, Any]] | None = None,
    ) -> Reply:
        """Send one request to the best base URL now. Raises RequestError on failure.

        Connection trouble and 5xx answers count against the base URL so the next
        request moves to the fallback; any answer from it counts in its favour.
        ``shape(base_url, body)`` adapts the body to the base URL picked (the structured
        output mode that endpoint takes).
        """
        base = self.endpoints.pick()
        if shape is not None:
            body = shape(base, body)
        started = self._clock()
        try:
            try:
                async with _deadline(self.deadline):
                    try:  # one attempt: whatever the transport or parser raises is named
                        if self.stream:
                            reply = await self._send_stream(base, body)
                        else:
                            reply = await self._send_json(base, body)
                    except RequestError:
                        raise
                    except Exception as exc:  # noqa: BLE001 - a server must never crash the run
                        raise _classify(exc, self.redactor, streaming=self.stream) from None
            except TimeoutError:
                raise TransportError(
                    "timeout",
                    f"no complete answer within the {self.deadline:g} s deadline (--deadline)",
                ) from None
        except RequestError as exc:
            if isinstance(exc, TransportError) or (exc.http_status or 0) >= 500:
                self.endpoints.failed(base)
            else:
                self.endpoints.succeeded(base)
            exc.base_url = base
            if self.redactor:
                scrub_error(exc, self.redactor)
            raise
        self.endpoints.succeeded(base)
        reply.latency_ms = (self._clock() - started) * 1000.0
        return reply

    async def _send_json(self, base: str, body: dict[str, Any]) -> Reply:
        content = codec.dumps(body)
        url = self._urls[base]
        if self._sender.can_post:
            # The default transport's short way: no httpx request or response objects.
            posted = await self._sender.post(
                self._url_texts[base], content, self.max_response_bytes
            )
            return self._reply(base, url, posted.status, posted.headers, posted.body)
        request = self._sender.build(url, content)
        response = await self._sender.send(request)
        try:
            _refuse_redirect(response.status_code, response.headers, url, self.redactor)
            raw = await self._read_body(response)
        finally:
            await response.aclose()
        unbind(response)
        return self._reply(base, url, response.status_code, response.headers, raw)

    def _reply(
        self,
        base: str,
        url: httpx.URL,
        status: int,
        headers: Mapping[str, str],
        body: bytes | None,
    ) -> Reply:
        """The answer to one JSON request, or the RequestError it amounts to.
        ``body`` None: it passed ``max_response_bytes`` and was not read."""
        _refuse_redirect(status, headers, url, self.redactor)
        if body is None:
            raise _too_large(self.max_response_bytes)
        raw = self.redactor.data(body)
        if status >= 400:
            raise parse_error(status, raw, headers, self.redactor.text)
        answer = parse_completion(raw, self.redactor.text if self.redactor else None)
        if self.redactor:
            scrub_answer(answer, self.redactor)
        return Reply(answer, base, status, headers, 0.0)

    async def _read_body(self, response: httpx.Response) -> bytes:
        """The whole (decoded) body, read in chunks against the size cap."""
        cap = self.max_response_bytes
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > cap:
            raise _too_large(cap)
        try:
            body = await read_capped(response, cap)
        except LookupError:  # not from the lean transport: httpx reads (and decodes) it
            pass
        else:
            if body is None:
                raise _too_large(cap)
            return body
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > cap:
                raise _too_large(cap)
            chunks.append(chunk)
        return b"".join(chunks)

    async def _send_stream(self, base: str, body: dict[str, Any]) -> Reply:
        payload = dict(body, stream=True, stream_options={"include_usage": True})
        content = codec.dumps(payload)
        cap = self.max_response_bytes
        assembler = StreamAssembler(
            redact=self.redactor.data if self.redactor else None,
            redact_text=self.redactor.text if self.redactor else None,
            max_line_bytes=min(MAX_SSE_LINE_BYTES, cap),
        )
        url = self._urls[base]
        async with self._http.stream("POST", url, content=content) as response:
            _refuse_redirect(response.status_code, response.headers, url, self.redactor)
            if response.status_code >= 400:
                raw = self.redactor.data(await self._read_body(response))
                raise parse_error(response.status_code, raw, response.headers, self.redactor.text)
            size = 0
            try:
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > cap:
                        raise _too_large(cap)
                    assembler.feed_bytes(chunk)
            except httpx.TimeoutException as exc:
                raise TransportError(
                    "timeout", f"stream timed out ({type(exc).__name__})"
                ) from None
            except httpx.HTTPError as exc:
                raise TransportError("stream_cut", _describe(exc, self.redactor)) from None
            status, headers = response.status_code, response.headers
        unbind(response)  # closed by now: the ``async with`` has exited
        answer = assembler.finish()
        if self.redactor:
            scrub_answer(answer, self.redactor)
        return Reply(answer, base, status, headers, 0.0)


def _deadline(seconds: float) -> AbstractAsyncContextManager[Any]:
    """Raise TimeoutError if the block is still running after ``seconds``.

    On asyncio this is ``asyncio.timeout``: one timer per attempt, about half the
    cost of an anyio cancel scope on the zero-latency hot path. Elsewhere (trio)
    anyio's own scope does the same job.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return _anyio_deadline(seconds)
    return asyncio.timeout(seconds)


@contextlib.asynccontextmanager
async def _anyio_deadline(seconds: float) -> AsyncIterator[None]:
    with anyio.fail_after(seconds):
        yield


def _too_large(cap: int) -> TransportError:
    return TransportError(
        "response_too_large",
        f"the answer passed {cap / 2**20:g} MiB (--max-response-mb) and was dropped",
    )


def _refuse_redirect(
    status: int, headers: Mapping[str, str], url: httpx.URL, redactor: Redactor
) -> None:
    """A 3xx is a configuration problem: the base URL is not where the API lives.

    It is never followed (the key would go to a host the user did not name) and never
    retried (every row would get the same answer): the run stops, naming the target.
    """
    if 300 <= status < 400:
        target = redactor.text(headers.get("location", "")[:500]) or "nowhere"
        raise ConfigurationError(
            "redirect",
            f"HTTP {status}: the server redirects {url} to {target}",
            http_status=status,
        )


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from, outermost first."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen and len(seen) < 10:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def _classify(exc: Exception, redactor: Redactor, *, streaming: bool) -> RequestError:
    """Name the cause of a failure from the transport or the parser.

    httpx-aiohttp maps every aiohttp connection error, a refused connection and a
    failed certificate check included, to ``ConnectTimeout``, and lets some (a bad
    status line, an over-long header) through unmapped; so the cause is read from
    the whole chain, the original aiohttp or ssl exception first.
    """
    chain = _chain(exc)
    root = chain[-1]
    reason = redactor.text(_describe(root))
    for item in chain:
        if isinstance(item, ssl.SSLCertVerificationError) or _is_aiohttp(
            item, "ClientConnectorCertificateError"
        ):
            detail = getattr(item, "verify_message", None) or getattr(
                getattr(item, "certificate_error", None), "verify_message", None
            )
            return ConfigurationError(
                "tls",
                f"TLS certificate verification failed: {detail or reason}"[:300],
            )
    for item in chain:
        if isinstance(item, ssl.SSLError) or _is_aiohttp(item, "ClientSSLError"):
            return TransportError("tls", f"TLS handshake failed: {reason}")
    if isinstance(root, RecursionError | ValueError):
        return TransportError("malformed_response", f"unreadable answer: {reason}")
    if any(_is_aiohttp(item, "ClientResponseError") for item in chain) or isinstance(
        exc, httpx.RemoteProtocolError | httpx.LocalProtocolError | httpx.DecodingError
    ):
        return TransportError("protocol_error", f"the answer is not valid HTTP: {reason}")
    from_aiohttp = any(_is_aiohttp(item, "ClientError") for item in chain)
    if isinstance(root, TimeoutError) or (
        isinstance(exc, httpx.TimeoutException) and not from_aiohttp
    ):
        return TransportError("timeout", f"request timed out ({type(root).__name__})")
    if from_aiohttp or any(isinstance(item, OSError | httpx.HTTPError) for item in chain):
        return TransportError("stream_cut" if streaming else "connection_error", reason)
    return TransportError("client_error", f"unexpected failure: {reason}")


def _is_aiohttp(exc: BaseException, name: str) -> bool:
    """``isinstance(exc, aiohttp.<name>)`` without importing aiohttp for the httpx path."""
    module = sys.modules.get("aiohttp")
    cls = getattr(module, name, None) if module is not None else None
    return cls is not None and isinstance(exc, cls)


def scrub_error(exc: RequestError, redactor: Redactor) -> None:
    """The key out of every text a failed request carries (error column, logs, manifest).

    The raw bytes were scrubbed before parsing; decoding (a JSON escape) could still
    rebuild the key, so the parsed strings are checked once more.
    """
    exc.args = tuple(redactor.text(a) if isinstance(a, str) else a for a in exc.args)
    exc.error_type = redactor.text(exc.error_type)
    if isinstance(exc, ApiError):
        exc.message = redactor.text(exc.message)
        exc.param = redactor.optional(exc.param)
        exc.fallback_suggestion = redactor.optional(exc.fallback_suggestion)
        if isinstance(exc.code, str):
            exc.code = redactor.text(exc.code)
        exc.headers = {k: redactor.text(v) for k, v in exc.headers.items()}
    else:
        exc.fallback_suggestion = redactor.optional(exc.fallback_suggestion)


def scrub_answer(answer: Answer, redactor: Redactor) -> None:
    """The parsed answer's texts, checked once more (see ``scrub_error``); also for
    answers that came in a Batch-API output file."""
    answer.content = redactor.optional(answer.content)
    answer.reasoning_content = redactor.optional(answer.reasoning_content)
    answer.response_id = redactor.optional(answer.response_id)
    answer.response_model = redactor.optional(answer.response_model)
    answer.finish_reason = redactor.optional(answer.finish_reason)
    answer.service_tier = redactor.optional(answer.service_tier)
    if answer.tool_calls:
        text = json.dumps(answer.tool_calls, ensure_ascii=False)
        if redactor.text(text) != text:
            answer.tool_calls = json.loads(redactor.text(text))


def _aiohttp_transport(limits: httpx.Limits) -> httpx.AsyncBaseTransport:
    """httpx's API over aiohttp's connection handling: measured ~5x faster on 2 cores
    (bench/RESULTS.md), and it holds thousands of connections where httpx's own pool
    times out on connect."""
    return lean_aiohttp_transport(limits)


def _describe(exc: BaseException, redactor: Redactor | None = None) -> str:
    """A one-line reason, without the key (a server or proxy may have put it there)."""
    text = str(exc) or type(exc).__name__
    line = " ".join(f"{type(exc).__name__}: {text}".split())[:300]
    return redactor.text(line) if redactor is not None else line
