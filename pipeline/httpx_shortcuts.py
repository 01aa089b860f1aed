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
