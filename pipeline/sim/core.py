"""The simulated gateway itself: routing, auth, quota, limits, faults and billing.

``Simulator.handle`` maps a ``SimRequest`` to a ``SimResponse`` with no sockets, so the
same behaviour is served in-process to httpx and over HTTP by aiohttp. Time comes from
injected ``clock``/``sleep``/``wall_clock`` so tests never wait. Every answer it would
bill goes into ``ledger`` (whether or not the client received it whole), which is how
tests prove the pipeline never pays twice for one row and stores the usage billed.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import json
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import anyio

from pipeline.sim.answers import plan
from pipeline.sim.config import SimConfig
from pipeline.sim.faults import DROP, INJECTED_RETRY_AFTER, Faults
from pipeline.sim.limits import RateLimits, retry_after_headers
from pipeline.sim.parse import Parsed, parse, refuse_json_schema
from pipeline.sim.protocol import (
    JSON_HEADERS,
    OPENAI_QUOTA_BODY,
    SSE_HEADERS,
    Reject,
    SimRequest,
    SimResponse,
)
from pipeline.sim.render import Chunks, completion, stream_chunks

CHAT_PATHS = frozenset({"/v1/chat/completions", "/chat/completions"})
MODELS_PATHS = frozenset({"/v1/models", "/models"})
DEFAULT_MODELS = ("gpt-5.5", "gpt-5.1", "gpt-5.1-chat", "gpt-5.1-thinking")


@dataclass
class BilledAnswer:
    """An answer the server produced and would bill, whether or not the client got it whole."""

    response_id: str
    model: str
    usage: dict[str, Any]
    truncated: bool
    streamed: bool
    request_key: str


class Simulator:
    """The simulated gateway. One instance is one server: its limits, quota and ledger.

    ``stats`` counts ``requests`` (all), ``ok`` (whole 200 answers), ``billed``, each error
    status by number (``"400"``, ``"429"``, ``"503"``...), ``5xx``, ``rate_limited``
    (bucket 429s), ``injected_429``, ``quota``, ``dropped``, ``truncated``, ``stream_cut``
    and ``streamed``.
    """

    def __init__(
        self,
        config: SimConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = cfg = config or SimConfig()
        self.ledger: list[BilledAnswer] = []
        self.stats: collections.Counter[str] = collections.Counter()
        self._clock, self._sleep, self._wall = clock, sleep, wall_clock
        self._faults = Faults(cfg.seed)
        self._by_id: dict[str, BilledAnswer] = {}
        self._count = 0
        self._tag = uuid.uuid4().hex[:8]  # ids stay unique across simulator restarts
        self._fingerprint = "fp_sim_" + hashlib.sha256(str(cfg.seed).encode()).hexdigest()[:10]
        self._limits = RateLimits(
            cfg.rpm_limit,
            cfg.tpm_limit,
            cfg.burst_seconds,
            clock(),
            send_headers=cfg.rate_limit_headers,
        )
        self._auth = f"Bearer {cfg.api_key}".encode() if cfg.api_key else None
        self._models = frozenset(cfg.models)
        listed = [
            {"id": m, "object": "model", "created": 0, "owned_by": "pipeline-sim"}
            for m in (cfg.models or DEFAULT_MODELS)
        ]
        self._models_body = json.dumps({"object": "list", "data": listed}).encode()

    def billed_usage(self, response_id: str) -> dict[str, Any] | None:
        """The usage block billed for ``response_id``, or None if it was never billed."""
        billed = self._by_id.get(response_id)
        return None if billed is None else billed.usage

    def stats_json(self) -> bytes:
        """Counters and billing totals, for benchmarks that run the server in another process
        (``GET /sim/stats``): how many answers were billed, and the most any one request was."""
        per_key = collections.Counter(b.request_key for b in self.ledger)
        body = {
            "stats": dict(self.stats),
            "billed": len(self.ledger),
            "billed_total_tokens": sum(int(b.usage.get("total_tokens", 0)) for b in self.ledger),
            "most_billed_per_request": max(per_key.values(), default=0),
            "usage_by_response_id": {b.response_id: b.usage for b in self.ledger},
        }
        return json.dumps(body).encode()

    async def handle(self, request: SimRequest) -> SimResponse:
        """Answer one request as a gateway would, faults and all."""
        self.stats["requests"] += 1
        try:
            return await self._route(request)
        except Reject as rejected:
            status = rejected.status
            self.stats[str(status)] += 1
            if status >= 500:
                self.stats["5xx"] += 1
            return SimResponse(status, {**JSON_HEADERS, **rejected.headers}, rejected.body)

    async def _route(self, request: SimRequest) -> SimResponse:
        path = request.path.rstrip("/") or "/"
        method = request.method.upper()
        if path == "/health" and method == "GET":
            return SimResponse(200, dict(JSON_HEADERS), b'{"status":"ok"}')
        if path == "/sim/stats" and method == "GET":
            return SimResponse(200, dict(JSON_HEADERS), self.stats_json())
        if path in MODELS_PATHS and method == "GET":
            self._check_auth(request.headers)
            return SimResponse(200, dict(JSON_HEADERS), self._models_body)
        if path not in CHAT_PATHS or method != "POST":
            raise Reject(404, f"Unknown route: {method} {request.path}")
        self._check_auth(request.headers)
        parsed = parse(request.body)
        if self.config.refuse_json_schema:
            refuse_json_schema(parsed.body)
        if self._models and parsed.model not in self._models:
            raise Reject(404, param="model", fallback=self.config.models[0])
        self._check_quota()
        limit_headers = self._admit(parsed)
        fault = self._faults.draw(self.config)
        delay = self._faults.delay_seconds(self.config)
        if delay > 0:
            await self._sleep(delay)
        if fault == DROP:
            self.stats["dropped"] += 1
            return SimResponse(0, {}, drop=True)
        if fault == 429:
            self.stats["injected_429"] += 1
            raise self._too_many(INJECTED_RETRY_AFTER)
        if fault is not None:
            raise Reject(fault)
        self._check_quota()  # again: others may have used it up while this one waited
        return self._answer(parsed, limit_headers)

    def _check_auth(self, headers: Mapping[str, str]) -> None:
        """401 unless the exact Bearer key was sent; the message never echoes what was sent."""
        if self._auth is None:
            return
        sent = headers.get("authorization", "").strip().encode()
        if not hmac.compare_digest(sent, self._auth):
            raise Reject(401)

    def _check_quota(self) -> None:
        """402 (or OpenAI's quota 429) once ``quota_requests`` answers have been billed."""
        quota = self.config.quota_requests
        if quota is None or len(self.ledger) < quota:
            return
        self.stats["quota"] += 1
        if self.config.quota_as_429:
            raise Reject(429, body=OPENAI_QUOTA_BODY)
        raise Reject(402)

    def _admit(self, parsed: Parsed) -> dict[str, str]:
        """Take from the rpm/tpm buckets or raise 429; returns the x-ratelimit-* headers."""
        if not self._limits.active:
            return {}
        wait = self._limits.admit(parsed.prompt_tokens + (parsed.max_tokens or 0), self._clock())
        if wait > 0:
            self.stats["rate_limited"] += 1
            raise self._too_many(wait)
        return self._limits.headers()

    def _too_many(self, wait: float) -> Reject:
        """A 429 saying when to come back, in the configured ``retry_after`` style."""
        headers = self._limits.headers()
        headers.update(retry_after_headers(self.config.retry_after, wait, self._wall))
        seconds = max(1, math.ceil(wait))
        return Reject(429, fallback=f"retry after {seconds} seconds", headers=headers)

    def _answer(self, parsed: Parsed, headers: dict[str, str]) -> SimResponse:
        """Produce, bill and shape one 200 answer (JSON, truncated JSON, stream or cut stream)."""
        cfg = self.config
        answer = plan(parsed)
        self._count += 1
        head = {
            "id": f"chatcmpl-sim-{self._tag}{self._count:08x}",
            "object": "chat.completion",
            "created": int(self._wall()),
            "model": parsed.model,
            "system_fingerprint": self._fingerprint,
        }
        broken = self._faults.breaks(cfg.stream_cut_rate if parsed.stream else cfg.truncate_rate)
        billed = BilledAnswer(
            str(head["id"]), parsed.model, answer.usage, broken, parsed.stream, parsed.key
        )
        self.ledger.append(billed)
        self._by_id[billed.response_id] = billed
        self.stats["billed"] += 1
        if parsed.stream:
            self.stats["streamed"] += 1
            self.stats["stream_cut" if broken else "ok"] += 1
            chunks = stream_chunks(head, answer, parsed.include_usage, cut=broken)
            return SimResponse(200, {**SSE_HEADERS, **headers}, stream=Chunks(chunks), cut=broken)
        body = json.dumps(completion(head, answer)).encode()
        if broken:
            self.stats["truncated"] += 1
            body = body[: len(body) // 2]
        else:
            self.stats["ok"] += 1
        return SimResponse(200, {**JSON_HEADERS, **headers}, body)
