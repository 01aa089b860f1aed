"""The two places this package reaches into httpx's private parts, fenced in one module.

Both save measurable time on the hot path (one request per row, thousands in
flight) and both lean on httpx internals that a release may change:

- ``AsyncClient._cookies``: the client's cookie jar. It is replaced by a jar that
  skips answers carrying no ``Set-Cookie``; the public ``cookies`` setter would copy
  it into a plain ``httpx.Cookies`` and lose the shortcut.
- ``Response.stream``: replaced, once the body is read, by an empty stream, to cut
  the reference cycle httpx makes between a response and its stream.

tests/test_httpx_shortcuts.py fails when httpx stops having what these rely on, and
pyproject.toml caps httpx below its next minor version for the same reason: a new
minor release is taken only after those tests pass with it.
"""

from __future__ import annotations

from typing import Any

import httpx


class SkipEmptyCookies(httpx.Cookies):
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


def skip_empty_cookies(client: httpx.AsyncClient) -> None:
    """Give ``client`` a fresh jar that skips answers without cookies."""
    client._cookies = SkipEmptyCookies()  # the setter would copy it into a plain Cookies


_DRAINED = httpx.ByteStream(b"")


def unbind(response: httpx.Response) -> None:
    """Break the reference cycle httpx makes between a response and its stream.

    httpx wraps every response's stream in one that points back at the response, so
    each request leaves ~35 objects (request, URL, headers, aiohttp's response) that
    only the cyclic garbage collector can free: work for every young-generation pass,
    and, since ``pipeline run`` makes full passes rare (``pipeline.cli``), garbage
    that could otherwise pile up in the old generation between them. Call once the
    body is read and the stream closed: the bytes stay in ``response.content``.
    """
    response.stream = _DRAINED


class Sender:
    """How ``ChatClient`` builds and sends a request: ``client.build_request`` and
    ``client.send(stream=True)``, minus the layers a chat request never uses.

    ``AsyncClient.send`` runs every request through an auth-flow generator, a redirect
    loop, event hooks, a timing wrapper around the response stream and a log call,
    and ``build_request`` merges the client's headers, cookies and timeout into a new
    request and fills in its content headers one by one: together about a third of
    the client's CPU per request at zero latency (bench/RESULTS.md), none of it doing
    anything here (no auth object, redirects refused, no hooks). When that is all they
    would do (no auth, no hooks, and the client's own transport is the one it picks for
    every URL, not one a proxy from the environment mounts), ``send`` hands the request
    straight to the transport, attaches it to the response and gives the cookie jar
    its turn. With ``lean_aiohttp_transport`` and an empty cookie jar, ``build`` also
    copies one prepared set of headers instead of merging them again (aiohttp adds
    ``Host`` and ``Content-Length`` itself). Anything else takes httpx's own path.
    """

    def __init__(self, client: httpx.AsyncClient, urls: list[httpx.URL]) -> None:
        self._client = client
        hooks = client.event_hooks
        transport = client._transport
        self.direct = (
            client.auth is None
            and not hooks["request"]
            and not hooks["response"]
            and all(client._transport_for_url(url) is transport for url in urls)
        )
        self._transport = transport
        self._cookies = client.cookies
        self._default_encoding = client._default_encoding
        self._lean = self.direct and isinstance(transport, _LeanTransport)
        self._headers = httpx.Headers(client.headers)
        self._extensions: dict[str, Any] = {"timeout": client.timeout.as_dict()}
        if self._lean:
            from multidict import CIMultiDict, CIMultiDictProxy

            # The same headers as aiohttp takes them, so it does not convert them again.
            prepared = CIMultiDictProxy(CIMultiDict(self._headers.multi_items()))
            self._extensions[_AIOHTTP_HEADERS] = prepared

    def build(self, url: httpx.URL, content: bytes) -> httpx.Request:
        if not self._lean or self._cookies.jar:
            return self._client.build_request("POST", url, content=content)
        return httpx.Request(
            "POST",
            url,
            headers=self._headers,
            stream=httpx.ByteStream(content),
            extensions=self._extensions,
        )

    async def send(self, request: httpx.Request) -> httpx.Response:
        if not self.direct:
            return await self._client.send(request, stream=True)
        response = await self._transport.handle_async_request(request)
        response.request = request
        self._cookies.extract_cookies(response)
        response.default_encoding = self._default_encoding
        return response


_AIOHTTP_HEADERS = "pipeline.aiohttp_headers"  # a request extension only Sender sets


class _LeanTransport(httpx.AsyncBaseTransport):
    """Marks the transport ``lean_aiohttp_transport`` makes (its class is built there,
    where aiohttp is imported)."""


def lean_aiohttp_transport(limits: httpx.Limits) -> httpx.AsyncBaseTransport:
    """httpx-aiohttp's transport with its per-request constants made once, and answers
    that can be read whole in one loop (``read_capped``) instead of through httpx's
    nested async generators (a chunker, a decoder, the raw and byte iterators)."""
    from aiohttp import ClientSession, ClientTimeout
    from httpx_aiohttp import AiohttpTransport
    from httpx_aiohttp.transport import AiohttpResponseStream, map_aiohttp_exceptions

    class CappedStream(AiohttpResponseStream):
        async def read_capped(self, cap: int) -> bytes | None:
            """The whole body, or None once it passes ``cap`` bytes (the rest unread)."""
            content = self._aiohttp_response.content
            chunks: list[bytes] = []
            size = 0
            with map_aiohttp_exceptions():
                while chunk := await content.readany():
                    size += len(chunk)
                    if size > cap:
                        return None
                    chunks.append(chunk)
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    timeouts: dict[tuple[Any, Any, Any], ClientTimeout] = {}

    class LeanTransport(AiohttpTransport, _LeanTransport):
        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            # AiohttpTransport.handle_async_request for a request with a body in memory
            # and no proxy, the timeout object made once per timeout setting.
            stream = request.stream
            if self.proxy is not None or not isinstance(stream, httpx.ByteStream):
                response: httpx.Response = await super().handle_async_request(request)
                return response
            if not isinstance(self.client, ClientSession):
                self.client = self.get_client()
            timeout = request.extensions.get("timeout", {})
            key = (timeout.get("connect"), timeout.get("read"), timeout.get("pool"))
            client_timeout = timeouts.get(key)
            if client_timeout is None:
                client_timeout = timeouts[key] = ClientTimeout(
                    sock_connect=key[0], sock_read=key[1], connect=key[2]
                )
            with map_aiohttp_exceptions():
                answer = await self.client.request(
                    method=request.method,
                    url=str(request.url),
                    headers=request.extensions.get(_AIOHTTP_HEADERS) or request.headers,
                    data=b"".join(stream) or None,
                    allow_redirects=False,
                    auto_decompress=False,
                    compress=False,
                    timeout=client_timeout,
                    server_hostname=request.extensions.get("sni_hostname"),
                ).__aenter__()
            extensions = {"http_version": b"HTTP/1.1"}
            if answer.reason:
                extensions["reason_phrase"] = answer.reason.encode()
            return httpx.Response(
                status_code=answer.status,
                headers=answer.raw_headers,
                stream=CappedStream(answer),
                request=request,
                extensions=extensions,
            )

    transport: httpx.AsyncBaseTransport = LeanTransport(limits=limits)
    return transport


async def read_capped(response: httpx.Response, cap: int) -> bytes | None:
    """The body of a response from ``lean_aiohttp_transport`` read whole in one loop,
    or None once it passes ``cap``; raises LookupError for any other response (another
    transport, or a content-encoding httpx must decode): read it the usual way then."""
    reader = getattr(response.stream, "read_capped", None)
    if reader is None or response.headers.get("content-encoding", "identity") != "identity":
        raise LookupError("not a lean response")
    body: bytes | None = await reader(cap)
    return body
