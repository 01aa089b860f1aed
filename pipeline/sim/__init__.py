"""The built-in OpenAI-compatible simulator that the demo, the tests and the benchmarks run against.

It speaks the wire format of the gateways the product targets (the full usage block,
``reasoning_content``, ``tool_calls``, SSE chunks, the ``{"error": {...}}`` body and its
status codes) and can misbehave on purpose: latency, server-side rate limits with
``Retry-After`` and ``x-ratelimit-*`` headers, injected 429/5xx, dropped connections,
truncated bodies, cut streams, quota exhaustion and bad keys. Every answer it would bill
goes into ``Simulator.ledger``, so tests can prove the pipeline never pays twice for one row.

It imports nothing from the rest of ``pipeline``: the product may use the simulator,
never the reverse, so a bug in the product cannot leak into the yardstick it is
measured against. Modules, in the order a request meets them:

- ``config``: ``SimConfig``, the knobs, validated when set;
- ``protocol``: ``SimRequest``/``SimResponse``, the error body, ``Reject``;
- ``parse``: request validation (400/413) and prompt token estimates;
- ``limits``: rpm/tpm buckets, ``x-ratelimit-*`` and ``Retry-After`` headers;
- ``faults``: seeded injected failures and latency;
- ``answers`` and ``schema``: the deterministic content, reasoning, tool calls and usage;
- ``render``: the answer as a ``chat.completion`` body or SSE chunks;
- ``files`` and ``batches``: OpenAI's Files and Batch APIs (uploads, request-file
  validation, the batch lifecycle by the clock, output and error files);
- ``ledger`` and ``state``: what was billed, and the state directory that keeps files,
  batches and the batch ledger across processes (``read_ledger`` reads it for tests);
- ``core``: ``Simulator``, which routes, bills and ties the above together;
- ``transport`` (in-process httpx) and ``server`` (aiohttp over a socket) carry it.

``server`` needs aiohttp; its names are imported on first use so that ``--provider sim``
and the tests that only use the in-process transport never load it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from pipeline.sim.config import SimConfig
from pipeline.sim.core import Simulator
from pipeline.sim.ledger import BilledAnswer
from pipeline.sim.limits import go_duration
from pipeline.sim.parse import request_key
from pipeline.sim.protocol import SimRequest, SimResponse, error_body
from pipeline.sim.state import read_ledger
from pipeline.sim.transport import sim_transport

if TYPE_CHECKING:
    from pipeline.sim.server import build_app, run_server, start_server

_LAZY = frozenset({"build_app", "run_server", "start_server"})


def __getattr__(name: str) -> Any:
    """Load the aiohttp server on first use of one of its names."""
    if name in _LAZY:
        return getattr(importlib.import_module("pipeline.sim.server"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BilledAnswer",
    "SimConfig",
    "SimRequest",
    "SimResponse",
    "Simulator",
    "build_app",
    "error_body",
    "go_duration",
    "read_ledger",
    "request_key",
    "run_server",
    "sim_transport",
    "start_server",
]
