"""Where this package reaches into httpx's private parts, fenced in one module.

Each saves measurable time on the hot path (one request per row, thousands in
flight) or makes httpx do for a client with its own transport what it does for its
own, and each leans on httpx internals that a release may change:

- ``AsyncClient._cookies``: the client's cookie jar. It is replaced by a jar that
  skips answers carrying no ``Set-Cookie``; the public ``cookies`` setter would copy
  it into a plain ``httpx.Cookies`` and lose the shortcut.
- ``Response.stream``: replaced, once the body is read, by an empty stream, to cut
  the reference cycle httpx makes between a response and its stream.
- ``AsyncClient._transport``, ``_transport_for_url`` and ``_default_encoding``: what
  ``Sender`` reads to decide that ``AsyncClient.send`` would add nothing.
- ``httpx._utils.get_environment_proxies``: the proxy routes httpx derives from
  ``HTTP(S)_PROXY``/``ALL_PROXY``/``NO_PROXY``, for the aiohttp transport too.

tests/test_httpx_shortcuts.py fails when httpx stops having what these rely on, and
pyproject.toml caps httpx below its next minor version for the same reason: a new
minor release is taken only after those tests pass with it.
"""

from __future__ import annotations

import http.cookiejar
import urllib.request
import zlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx


class SkipEmptyCookies(httpx.Cookies):
    """httpx's cookie handling, minus its cost on answers that set no cookie.

    httpx hands every response to ``http.cookiejar``, building urllib request and
    response stand-ins first: ~9% of the event loop's time at 1,500 in flight
    (bench/RESULTS.md). The jar only acts on ``Set-Cookie``/``Set-Cookie2`` headers,
    so a response without them is skipped; one with them is handled as before.

    The jar is bounded by what one request is sent: every cookie of a gateway goes
    back with every request to it, so a server that sets a new one with each answer
    would otherwise grow each request (and the jar) without end. When an answer sets
    cookies, the ones its host is sent (its own and its parent domains') are kept to
    ``MAX_COOKIES`` and ``MAX_COOKIE_BYTES`` of names and values (about what a browser
    keeps for a site), the ones set longest ago going first, so the gateway's current
    sticky-session cookie is kept and stale ones leave (a cookie too big to send at
    all leaves first); cookies another host is sent, and it alone, are not touched.
    ``on_drop`` hears of the first cookie dropped (once per jar).
    """

    def __init__(self, on_drop: Callable[[str], None] | None = None) -> None:
        super().__init__()
        # The jar's rule for what a request is sent, kept here to ask it (_bound).
        self._policy = http.cookiejar.DefaultCookiePolicy()
        self.jar.set_policy(self._policy)
        # Every cookie's (domain, path, name), the one set longest ago first.
        self._order: dict[tuple[str, str, str], None] = {}
        self.dropped = 0
        self.on_drop = on_drop

    def extract_cookies(self, response: httpx.Response) -> None:
        headers = response.headers
        if "set-cookie" in headers or "set-cookie2" in headers:
            # The cookie objects before: the jar makes a new one for every Set-Cookie,
            # so one set again (even with the same value) counts as set now.
            before = {(c.domain, c.path, c.name): c for c in self.jar}
            super().extract_cookies(response)
            # A cookie past ASCII cannot be sent back (httpx encodes a Cookie header
            # as ASCII): kept, it would make every later request fail before it left.
            for cookie in list(self.jar):
                if not (cookie.name + (cookie.value or "")).isascii():
                    self.jar.clear(cookie.domain, cookie.path, cookie.name)
            self._bound(before, str(response.request.url))

    def _bound(self, before: dict[tuple[str, str, str], Any], url: str) -> None:
        now = {(c.domain, c.path, c.name): c for c in self.jar}
        for key in [k for k in self._order if k not in now]:
            del self._order[key]  # expired or deleted by the server
        for key, cookie in now.items():
            if before.get(key) is not cookie:  # set by this answer: the newest
                self._order.pop(key, None)
                self._order[key] = None
        # What a request to this host is sent, by the jar's own rule (parent domains,
        # a parent host's host-only cookies, "<host>.local" for a dotless host, IDNA).
        request = urllib.request.Request(url)
        policy = self._policy
        keys: list[tuple[str, str, str]] = []
        for key in list(self._order):
            cookie = now[key]
            if not (
                policy.domain_return_ok(cookie.domain, request)
                and policy.return_ok_domain(cookie, request)
            ):
                continue
            if _cookie_bytes(cookie) > MAX_COOKIE_BYTES:  # can never be sent: first out
                self._drop(key)
            else:
                keys.append(key)
        count = len(keys)
        size = sum(_cookie_bytes(now[k]) for k in keys)
        for key in keys:  # the one set longest ago first
            if count <= MAX_COOKIES and size <= MAX_COOKIE_BYTES:
                break
            self._drop(key)
            count -= 1
            size -= _cookie_bytes(now[key])

    def _drop(self, key: tuple[str, str, str]) -> None:
        self.jar.clear(*key)
        del self._order[key]
        self.dropped += 1
        if self.dropped == 1 and self.on_drop is not None:
            self.on_drop(  # (no server text in it: the domain is the server's to name)
                "a gateway sets more cookies than are kept for it (at most "
                f"{MAX_COOKIES} and {MAX_COOKIE_BYTES // 1024} KiB a host): "
                "the ones it set longest ago are dropped"
            )


def _cookie_bytes(cookie: Any) -> int:
    return len(cookie.name) + len(cookie.value or "") + 3  # as sent: "name=value; "


MAX_COOKIES = 50  # cookies one host is sent
MAX_COOKIE_BYTES = 8192  # of the names and values one host is sent


def skip_empty_cookies(
    client: httpx.AsyncClient, on_drop: Callable[[str], None] | None = None
) -> None:
    """Give ``client`` a fresh jar that skips answers without cookies (``on_drop``:
    told once when the jar first drops a cookie past its bound)."""
    client._cookies = SkipEmptyCookies(on_drop)  # the setter would copy it into a plain Cookies


def environment_proxy_mounts(
    limits: httpx.Limits,
) -> dict[str, httpx.AsyncBaseTransport | None]:
    """The mounts httpx itself makes for ``HTTP_PROXY``/``HTTPS_PROXY``/``ALL_PROXY``
    (and ``NO_PROXY``), for a client given its own transport.

    httpx reads the proxy variables only when it picks the transport itself; a client
    built with ``transport=`` (the aiohttp one) would send every request straight to
    the host, past a proxy the user set (one that may be the only way out, or the
    one their traffic must pass). Mounted, the proxied URLs take httpx's own path
    through httpx's proxy transport (``Sender`` sees another transport and steps
    aside); URLs the variables leave alone keep the client's transport.
    """
    from httpx._utils import get_environment_proxies

    return {
        pattern: None
        if url is None
        else httpx.AsyncHTTPTransport(limits=limits, proxy=httpx.Proxy(url))
        for pattern, url in get_environment_proxies().items()
    }


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
        self._post: Post | None = None
        if self._lean:
            from multidict import CIMultiDict, CIMultiDictProxy

            # The same headers as aiohttp takes them, so it does not convert them again.
            prepared = CIMultiDictProxy(CIMultiDict(self._headers.multi_items()))
            self._extensions[_AIOHTTP_HEADERS] = prepared
            assert isinstance(transport, _LeanTransport)
            if getattr(transport, "proxy", None) is None:
                self._post = transport.poster(self._headers, client.timeout.as_dict())

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

    @property
    def can_post(self) -> bool:
        """Whether ``post`` may be used now: the lean transport, no proxy, and no cookie
        to send (a jar that holds one sends it the httpx way, through ``build``)."""
        return self._post is not None and not self._cookies.jar

    async def post(self, url: str, content: bytes, cap: int) -> Posted:
        """POST ``content`` and read the answer whole (``Posted``), without httpx's
        request and response objects: see ``lean_aiohttp_transport``. A cookie the
        server sets still reaches the jar, and is sent back on later requests."""
        assert self._post is not None
        posted = await self._post(url, content, cap)
        headers = posted.headers
        if "set-cookie" in headers or "set-cookie2" in headers:
            response = httpx.Response(
                posted.status,
                headers=posted.raw_headers,
                request=httpx.Request("POST", url),
            )
            self._cookies.extract_cookies(response)
        return posted

    async def send(self, request: httpx.Request) -> httpx.Response:
        if not self.direct:
            return await self._client.send(request, stream=True)
        response = await self._transport.handle_async_request(request)
        response.request = request
        self._cookies.extract_cookies(response)
        response.default_encoding = self._default_encoding
        return response


_AIOHTTP_HEADERS = "pipeline.aiohttp_headers"  # a request extension only Sender sets


@dataclass(slots=True)
class Posted:
    """One answer as ``Sender.post`` reads it: status, headers (a case-insensitive
    mapping; the first value of a repeated header) and the decoded body, or None when
    the body passed the size cap (the rest is never read). ``raw_headers``: the
    headers as sent, bytes, for the cookie jar (a value past ASCII, which aiohttp
    decodes and httpx will not encode again, must not turn a billed answer into an
    error)."""

    status: int
    headers: Mapping[str, str]
    body: bytes | None
    raw_headers: tuple[tuple[bytes, bytes], ...] = ()


Post = Callable[[str, bytes, int], Awaitable[Posted]]

# What ``Sender.post`` asks for and decodes itself: the two codings the standard
# library inflates with a cap on the output, so a small compressed answer cannot
# expand into gigabytes. Any other coding in an answer was not asked for.
POST_ACCEPT_ENCODING = "gzip, deflate"


class _LeanTransport(httpx.AsyncBaseTransport):
    """Marks the transport ``lean_aiohttp_transport`` makes (its class is built there,
    where aiohttp is imported)."""

    def poster(self, headers: httpx.Headers, timeout: dict[str, Any]) -> Post:
        raise NotImplementedError


def inflate(body: bytes, coding: str, cap: int) -> bytes | None:
    """``body`` decoded from ``coding`` (identity, gzip or deflate), or None once the
    decoded bytes pass ``cap``. Raises ``httpx.DecodingError`` for a coding not asked
    for (``POST_ACCEPT_ENCODING``) or bytes that do not decode."""
    coding = coding.strip().lower()
    if coding in ("", "identity"):
        return body
    if coding in ("gzip", "x-gzip"):
        attempts = [zlib.MAX_WBITS | 16]
    elif coding == "deflate":
        # zlib-wrapped as the standard says; some servers send a raw deflate stream.
        attempts = [zlib.MAX_WBITS, -zlib.MAX_WBITS]
    else:
        raise httpx.DecodingError(
            f"the answer's content-encoding {coding[:40]!r} was not asked for"
        )
    problem = ""
    for wbits in attempts:
        inflater = zlib.decompressobj(wbits)
        try:
            out = inflater.decompress(body, cap + 1)
        except zlib.error as exc:
            problem = str(exc)
            continue
        if len(out) > cap or inflater.unconsumed_tail:
            return None
        return out
    # Raised here, not in the handler, so the zlib error is not chained as the cause.
    raise httpx.DecodingError(f"the {coding} answer does not decode ({problem})")


def lean_aiohttp_transport(limits: httpx.Limits) -> httpx.AsyncBaseTransport:
    """httpx-aiohttp's transport with its per-request constants made once, and answers
    that can be read whole in one loop (``read_capped``) instead of through httpx's
    nested async generators (a chunker, a decoder, the raw and byte iterators)."""
    from aiohttp import ClientSession, ClientTimeout
    from httpx_aiohttp import AiohttpTransport
    from httpx_aiohttp.transport import AiohttpResponseStream, map_aiohttp_exceptions

    async def _read_whole(content: Any, cap: int) -> bytes | None:
        """The whole body, or None once it passes ``cap`` bytes (the rest unread)."""
        chunks: list[bytes] = []
        size = 0
        while chunk := await content.readany():
            size += len(chunk)
            if size > cap:
                return None
            chunks.append(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    class CappedStream(AiohttpResponseStream):
        async def read_capped(self, cap: int) -> bytes | None:
            """The whole body, or None once it passes ``cap`` bytes (the rest unread)."""
            with map_aiohttp_exceptions():
                return await _read_whole(self._aiohttp_response.content, cap)

    timeouts: dict[tuple[Any, Any, Any], ClientTimeout] = {}

    def client_timeout(timeout: dict[str, Any]) -> ClientTimeout:
        key = (timeout.get("connect"), timeout.get("read"), timeout.get("pool"))
        made = timeouts.get(key)
        if made is None:
            made = timeouts[key] = ClientTimeout(
                sock_connect=key[0], sock_read=key[1], connect=key[2]
            )
        return made

    class LeanTransport(AiohttpTransport, _LeanTransport):
        def poster(self, headers: httpx.Headers, timeout: dict[str, Any]) -> Post:
            """``Sender.post``'s request: aiohttp's own, with no httpx model object.

            The headers are the client's, prepared once, asking only for the codings
            ``inflate`` reads under a cap. The answer is read in one loop against the
            cap and decoded here; aiohttp's exceptions are mapped as for any other
            request, so a failure is named the same way on both paths.
            """
            from multidict import CIMultiDict, CIMultiDictProxy

            prepared = CIMultiDict(headers.multi_items())
            prepared["accept-encoding"] = POST_ACCEPT_ENCODING
            fixed = CIMultiDictProxy(prepared)
            when = client_timeout(timeout)

            async def post(url: str, content: bytes, cap: int) -> Posted:
                if not isinstance(self.client, ClientSession):
                    self.client = self.get_client()
                try:
                    answer = await self.client.request(
                        "POST",
                        url,
                        headers=fixed,
                        data=content,
                        allow_redirects=False,
                        auto_decompress=False,
                        compress=False,
                        timeout=when,
                    )
                    try:
                        headers = answer.headers
                        declared = headers.get("content-length", "")
                        body = None
                        if not (declared.isdigit() and int(declared) > cap):
                            body = await _read_whole(answer.content, cap)
                    finally:
                        answer.release()  # back to the pool, or closed if not read whole
                except Exception as exc:
                    # Named as httpx-aiohttp names it on httpx's path (entered only on
                    # failure: a context manager per request was measurable CPU).
                    with map_aiohttp_exceptions():
                        raise exc
                if body is not None:
                    body = inflate(body, headers.get("content-encoding", ""), cap)
                return Posted(answer.status, headers, body, answer.raw_headers)

            return post

        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            # AiohttpTransport.handle_async_request for a request with a body in memory
            # and no proxy, the timeout object made once per timeout setting.
            stream = request.stream
            if self.proxy is not None or not isinstance(stream, httpx.ByteStream):
                response: httpx.Response = await super().handle_async_request(request)
                return response
            if not isinstance(self.client, ClientSession):
                self.client = self.get_client()
            when = client_timeout(request.extensions.get("timeout", {}))
            with map_aiohttp_exceptions():
                answer = await self.client.request(
                    method=request.method,
                    url=str(request.url),
                    headers=request.extensions.get(_AIOHTTP_HEADERS) or request.headers,
                    data=b"".join(stream) or None,
                    allow_redirects=False,
                    auto_decompress=False,
                    compress=False,
                    timeout=when,
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
