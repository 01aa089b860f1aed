"""Serve the simulator core over real HTTP with aiohttp (``pipeline sim --port 8080``).

All behaviour lives in ``Simulator``; this module only moves bytes, and reads at most
what the largest request (a chat body with images, or a batch file upload) may take: a
bigger body is answered 413 without being read whole. It exists so
benchmarks, crash tests and other tools can hit a real socket in another process, and it
turns the core's two connection-level faults into what a client would really see:
``drop`` closes the connection without an answer, a ``cut`` stream closes it mid-body
(no final chunk). It is the only part of the simulator that needs aiohttp, so the package
imports it lazily and the in-process transport never pays for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys

from aiohttp import web

from pipeline.sim.config import SimConfig
from pipeline.sim.core import MULTIPART_SLACK, Simulator
from pipeline.sim.protocol import JSON_HEADERS, SimRequest, openai_error

# Room for 10 base64 images of 10 MB each; an upload may take up to the largest batch file.
MAX_BODY_BYTES = 128 * 1024 * 1024


def build_app(sim: Simulator) -> web.Application:
    """An aiohttp app that forwards every request, any method and path, to ``sim.handle``."""

    async def handle(request: web.Request) -> web.StreamResponse:
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            message = f"Request body is larger than this server accepts ({limit:,} bytes)."
            refused = openai_error(413, message, code="request_too_large")
            return web.Response(status=413, headers=JSON_HEADERS, body=refused.body)
        headers = {k.lower(): v for k, v in request.headers.items()}
        query = request.query_string
        answer = await sim.handle(SimRequest(request.method, request.path, headers, body, query))
        if answer.drop:
            return _hang_up(request, web.Response(status=500))
        if answer.stream is None:
            return web.Response(status=answer.status, headers=answer.headers, body=answer.body)
        response = web.StreamResponse(status=answer.status, headers=answer.headers)
        await response.prepare(request)
        async for chunk in answer.stream:
            await response.write(chunk)
        if answer.cut:
            return _hang_up(request, response)
        await response.write_eof()
        return response

    limit = max(MAX_BODY_BYTES, sim.config.batch_max_file_bytes + MULTIPART_SLACK)
    app = web.Application(client_max_size=limit)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def _hang_up(request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
    """Close the connection now, as a crashed or impatient gateway does.

    Bytes already written still go out; aiohttp then finds the transport closing when it
    finishes ``response`` and quietly treats it as a client disconnect, so nothing more
    is sent and nothing is logged.
    """
    transport = request.transport
    if transport is not None:
        transport.close()
    return response


async def start_server(
    sim: Simulator, host: str = "127.0.0.1", port: int = 8080
) -> tuple[web.AppRunner, str]:
    """Bind and start serving; returns the runner (``await runner.cleanup()`` stops it)
    and the base URL with the port actually bound, so ``port=0`` works in tests."""
    runner = web.AppRunner(build_app(sim), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=4096)
    await site.start()
    bound = runner.addresses[0][1] if runner.addresses else port
    return runner, f"http://{host}:{bound}/v1"


def run_server(config: SimConfig, host: str, port: int) -> None:
    """Serve a new simulator in the foreground until Ctrl-C; the listening line goes to stderr."""
    sim = Simulator(config)

    async def main() -> None:
        runner, url = await start_server(sim, host, port)
        print(f"simulator listening on {url}", file=sys.stderr, flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
    counts = ", ".join(f"{k}={v}" for k, v in sorted(sim.stats.items()))
    print(f"simulator stopped: {counts or 'no requests'}", file=sys.stderr, flush=True)
