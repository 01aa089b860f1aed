"""Serve the simulator in-process to httpx: no sockets, no ports (``--provider sim``).

The product's whole HTTP stack above the transport (client, retries, streaming parser)
runs unchanged against it, and the two connection-level faults become the exceptions a
real connection would raise: a dropped request and a cut stream both surface as
``httpx.RemoteProtocolError``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx

from pipeline.sim.core import Simulator
from pipeline.sim.protocol import SimRequest


class _SimStream(httpx.AsyncByteStream):
    """A streamed body; a cut stream ends with the protocol error a killed connection gives."""

    def __init__(self, chunks: AsyncIterator[bytes], cut: bool, request: httpx.Request) -> None:
        self._chunks, self._cut, self._request = chunks, cut, request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._chunks:
            yield chunk
        if self._cut:
            raise httpx.RemoteProtocolError(
                "peer closed connection without sending complete message body "
                "(simulated stream cut)",
                request=self._request,
            )


class _SimTransport(httpx.AsyncBaseTransport):
    """Hands each httpx request to ``Simulator.handle`` and its answer back as a Response."""

    def __init__(self, sim: Simulator) -> None:
        self._sim = sim

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = await request.aread()
        headers = {k.lower(): v for k, v in request.headers.items()}
        query = request.url.query.decode("ascii", "replace")
        answer = await self._sim.handle(
            SimRequest(request.method, request.url.path, headers, body, query)
        )
        if answer.drop:
            raise httpx.RemoteProtocolError(
                "Server disconnected without sending a response.", request=request
            )
        if answer.stream is not None:
            stream = _SimStream(answer.stream, answer.cut, request)
            return httpx.Response(
                answer.status, headers=answer.headers, stream=stream, request=request
            )
        return httpx.Response(
            answer.status, headers=answer.headers, content=answer.body or b"", request=request
        )


def sim_transport(sim: Simulator) -> httpx.AsyncBaseTransport:
    """An httpx transport that answers from ``sim`` in-process: no sockets, no ports."""
    return _SimTransport(sim)
