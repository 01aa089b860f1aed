"""The simulated gateway itself: routing, auth, quota, limits, faults and billing.

``Simulator.handle`` maps a ``SimRequest`` to a ``SimResponse`` with no sockets, so the
same behaviour is served in-process to httpx and over HTTP by aiohttp. Time comes from
injected ``clock``/``sleep``/``wall_clock`` so tests never wait. Every answer it would
bill goes into ``ledger`` (whether or not the client received it whole), which is how
tests prove the pipeline never pays twice for one row and stores the usage billed.
Besides chat completions it serves OpenAI's Files and Batches APIs (``files``,
``batches``), whose lines are billed into the same ledger with their ``batch_id``.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import json
import math
import time
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import anyio

from pipeline.sim.answers import plan
from pipeline.sim.batches import Batches, BatchRecord
from pipeline.sim.config import SimConfig
from pipeline.sim.faults import DROP, INJECTED_RETRY_AFTER, Faults
from pipeline.sim.files import PURPOSES, FileStore, parse_multipart
from pipeline.sim.ledger import BilledAnswer
from pipeline.sim.limits import RateLimits, retry_after_headers
from pipeline.sim.parse import Parsed, parse, refuse_json_schema
from pipeline.sim.protocol import (
    FLEX_UNAVAILABLE_BODY,
    JSON_HEADERS,
    OPENAI_QUOTA_BODY,
    SSE_HEADERS,
    Reject,
    SimRequest,
    SimResponse,
    openai_error,
)
from pipeline.sim.render import Chunks, completion, stream_chunks
from pipeline.sim.state import StateDir

CHAT_PATHS = frozenset({"/v1/chat/completions", "/chat/completions"})
MODELS_PATHS = frozenset({"/v1/models", "/models"})
DEFAULT_MODELS = ("gpt-5.5", "gpt-5.1", "gpt-5.1-chat", "gpt-5.1-thinking")
MULTIPART_SLACK = 64 * 1024  # room for the form around an upload of the largest file
# The tier an answer reports for the tier requested, as OpenAI does ("auto" runs at default).
TIER_USED = {"auto": "default", "default": "default", "flex": "flex", "priority": "priority"}


class Simulator:
    """The simulated gateway. One instance is one server: its limits, quota and ledger.

    ``stats`` counts ``requests`` (all), ``ok`` (whole 200 answers), ``billed``, each error
    status by number (``"400"``, ``"429"``, ``"503"``...), ``5xx``, ``rate_limited``
    (bucket 429s), ``injected_429``, ``quota``, ``dropped``, ``truncated``, ``stream_cut``,
    ``streamed``, ``flex_refused``, and for the Batch API ``files_uploaded``,
    ``batches_created``, ``batches_<how it ended>`` and ``batch_lines_billed`` (this
    process only). ``ledger`` also holds the batch lines billed by earlier processes on
    the same ``state_dir``; ``files`` and ``batches`` are the Files/Batches state.
    """

    def __init__(
        self,
        config: SimConfig | None = None,
        *,
        clock: Callable[[], float] | None = None,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
        wall_clock: Callable[[], float] | None = None,
    ) -> None:
        self.config = cfg = config or SimConfig()
        self.ledger: list[BilledAnswer] = []
        self.stats: collections.Counter[str] = collections.Counter()
        self._clock = clock or time.monotonic
        self._sleep = sleep
        self._wall = wall_clock or time.time
        # Batches progress on epoch seconds (stored, so a later process agrees): the wall
        # clock, or a test's fake clock when only ``clock`` is given.
        self._now = wall_clock or clock or time.time
        self._faults = Faults(cfg.seed)
        self._by_id: dict[str, BilledAnswer] = {}
        self._count = 0
        self._tag = uuid.uuid4().hex[:8]  # ids stay unique across simulator restarts
        self._fingerprint = "fp_sim_" + hashlib.sha256(str(cfg.seed).encode()).hexdigest()[:10]
        self._limits = RateLimits(
            cfg.rpm_limit,
            cfg.tpm_limit,
            cfg.burst_seconds,
            self._clock(),
            send_headers=cfg.rate_limit_headers,
        )
        self._auth = f"Bearer {cfg.api_key}".encode() if cfg.api_key else None
        self._models = frozenset(cfg.models)
        listed = [
            {"id": m, "object": "model", "created": 0, "owned_by": "pipeline-sim"}
            for m in (cfg.models or DEFAULT_MODELS)
        ]
        self._models_body = json.dumps({"object": "list", "data": listed}).encode()
        self._state = None if cfg.state_dir is None else StateDir(cfg.state_dir)
        self.files = FileStore(None if self._state is None else self._state.files)
        self.batches = Batches(cfg, self.files, self._batch_line, self._persist)
        if self._state is not None:
            self._load(self._state)

    def _load(self, state: StateDir) -> None:
        """Files, batches and the billed batch lines a previous process left in ``state_dir``."""
        saved = state.load()
        self.files.load(saved.get("files"))
        self.batches.load(saved)
        ended = {r.id for r in self.batches.records.values() if r.final is not None}
        for billed in state.read_ledger(ended):
            self.ledger.append(billed)
            self._by_id[billed.response_id] = billed

    def billed_usage(self, response_id: str) -> dict[str, Any] | None:
        """The usage block billed for ``response_id``, or None if it was never billed."""
        billed = self._by_id.get(response_id)
        return None if billed is None else billed.usage

    def stats_json(self) -> bytes:
        """Counters and billing totals, for benchmarks that run the server in another process
        (``GET /sim/stats``): how many answers were billed, and the most any one request was,
        and how many at each service tier ("none" when the request named no tier)."""
        per_key = collections.Counter(b.request_key for b in self.ledger)
        per_row = collections.Counter(b.custom_id for b in self.ledger if b.batch_id)
        body = {
            "stats": dict(self.stats),
            "billed": len(self.ledger),
            "billed_total_tokens": sum(int(b.usage.get("total_tokens", 0)) for b in self.ledger),
            "most_billed_per_request": max(per_key.values(), default=0),
            "usage_by_response_id": {b.response_id: b.usage for b in self.ledger},
            "billed_by_tier": dict(
                collections.Counter(b.service_tier or "none" for b in self.ledger)
            ),
            "billed_by_batch": dict(
                collections.Counter(b.batch_id for b in self.ledger if b.batch_id)
            ),
            "most_billed_per_custom_id": max(per_row.values(), default=0),
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
        api = path.removeprefix("/v1")
        if api.split("/")[1:2] in (["files"], ["batches"]):
            self._check_auth(request.headers)
            return self._files_and_batches(method, api, request)
        if path not in CHAT_PATHS or method != "POST":
            raise Reject(404, f"Unknown route: {method} {request.path}")
        self._check_auth(request.headers)
        parsed = parse(request.body)
        if self.config.refuse_json_schema:
            refuse_json_schema(parsed.body)
        if self._models and parsed.model not in self._models:
            raise Reject(404, param="model", fallback=self.config.models[0])
        tier = self._service_tier(parsed)
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
        return self._answer(parsed, limit_headers, tier)

    def _service_tier(self, parsed: Parsed) -> str | None:
        """The tier the answer will report, or None when the request named none.

        A tier outside ``config.tiers`` is a 400 naming the parameter; a flex request is
        refused for capacity at ``flex_refusal_rate`` (a 429 that is never billed).
        """
        requested = parsed.body.get("service_tier")
        if requested is None:
            return None
        if not isinstance(requested, str) or requested not in self.config.tiers:
            allowed = ", ".join(self.config.tiers) or "none"
            raise Reject(400, f"service_tier must be one of: {allowed}", param="service_tier")
        if requested == "flex" and self._faults.flex_refused(self.config.flex_refusal_rate):
            self.stats["flex_refused"] += 1
            headers = retry_after_headers(
                self.config.retry_after, self.config.flex_retry_after, self._wall
            )
            raise Reject(429, headers=headers, body=FLEX_UNAVAILABLE_BODY)
        return TIER_USED.get(requested, requested)

    def _files_and_batches(self, method: str, path: str, request: SimRequest) -> SimResponse:
        """OpenAI's Files and Batches routes (``path`` without the ``/v1`` prefix)."""
        now = self._now()
        parts = path.split("/")[1:]
        answer: dict[str, Any] | None = None
        if parts == ["files"] and method == "POST":
            answer = self._upload(request, now)
        elif parts == ["files"] and method == "GET":
            purpose = urllib.parse.parse_qs(request.query).get("purpose", [None])[-1]
            answer = {"object": "list", "data": self.files.listing(purpose), "has_more": False}
        elif len(parts) == 2 and parts[0] == "files" and method == "GET":
            answer = self.files.get(parts[1]).public()
        elif len(parts) == 3 and parts[0] == "files" and parts[2] == "content" and method == "GET":
            content = self.files.read(self.files.get(parts[1]).id)
            return SimResponse(200, {"content-type": "application/octet-stream"}, content)
        elif len(parts) == 2 and parts[0] == "files" and method == "DELETE":
            file_id = self.files.get(parts[1]).id
            self.files.delete(file_id, in_use=self.batches.reads(file_id))
            self._persist(None, [])
            answer = {"id": file_id, "object": "file", "deleted": True}
        elif parts == ["batches"] and method == "POST":
            answer = self.batches.create(request.body, now)
            self.stats["batches_created"] += 1
        elif parts == ["batches"] and method == "GET":
            answer = self.batches.listing(request.query, now)
        elif len(parts) == 2 and parts[0] == "batches" and method == "GET":
            answer = self.batches.retrieve(parts[1], now)
        elif parts[0] == "batches" and parts[2:] == ["cancel"] and method == "POST":
            answer = self.batches.cancel(parts[1], now)
        if answer is None:
            raise Reject(404, f"Unknown route: {method} {request.path}")
        return SimResponse(200, dict(JSON_HEADERS), json.dumps(answer).encode())

    def _upload(self, request: SimRequest, now: float) -> dict[str, Any]:
        """``POST /v1/files``: a multipart form with ``file`` and ``purpose``; 413 past the cap."""
        cap = self.config.batch_max_file_bytes
        if len(request.body) > cap + MULTIPART_SLACK:
            raise self._too_large(len(request.body))
        form = parse_multipart(request.headers.get("content-type", ""), request.body)
        filename, data = form.get("file", (None, b""))
        if filename is None:
            raise openai_error(400, "Missing required parameter: 'file'.", param="file")
        if len(data) > cap:
            raise self._too_large(len(data))
        purpose = form.get("purpose", (None, b""))[1].decode("utf-8", "replace").strip()
        if purpose not in PURPOSES:
            message = f"Invalid 'purpose': expected one of {', '.join(sorted(PURPOSES))}."
            raise openai_error(400, message, param="purpose")
        meta = self.files.put(data, filename, purpose, now)
        self.stats["files_uploaded"] += 1
        self._persist(None, [])
        return meta.public()

    def _too_large(self, size: int) -> Reject:
        """OpenAI's answer to an upload over the size limit."""
        cap = self.config.batch_max_file_bytes
        message = f"File is too large ({size:,} bytes); the limit is {cap:,} bytes."
        return openai_error(413, message, param="file", code="file_too_large")

    def _batch_line(
        self, parsed: Parsed, batch_id: str, custom_id: str, at: float
    ) -> tuple[dict[str, Any], BilledAnswer]:
        """A batch line's answer, by the same logic as a synchronous call; reported at the
        default tier as OpenAI's batch output does, billed as "batch" with its ids."""
        answer = plan(parsed, self.config.answer_chars)
        head = self._head(parsed.model, "default")
        head["created"] = int(at)
        bill = BilledAnswer(
            str(head["id"]),
            parsed.model,
            answer.usage,
            False,
            False,
            parsed.key,
            "batch",
            batch_id,
            custom_id,
        )
        return completion(head, answer), bill

    def _persist(self, ended: BatchRecord | None, billed: list[BilledAnswer]) -> None:
        """After a Files/Batches change: bill an ended batch's lines (its ledger file first,
        then the state that marks it ended) and save the state."""
        if ended is not None:
            if self._state is not None:
                self._state.write_ledger(ended.id, billed)
            for entry in billed:
                self._bill(entry)
            self.stats["batch_lines_billed"] += len(billed)
            self.stats[f"batches_{ended.final['status'] if ended.final else 'open'}"] += 1
        if self._state is not None:
            self._state.save(self.files.dump(), self.batches.dump())

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

    def _head(self, model: str, tier: str | None) -> dict[str, Any]:
        """The fields every answer starts with: a fresh id, ``created``, model, fingerprint."""
        self._count += 1
        head: dict[str, Any] = {
            "id": f"chatcmpl-sim-{self._tag}{self._count:08x}",
            "object": "chat.completion",
            "created": int(self._wall()),
            "model": model,
        }
        if tier is not None:
            head["service_tier"] = tier
        head["system_fingerprint"] = self._fingerprint
        return head

    def _bill(self, billed: BilledAnswer) -> None:
        """Record one answer the server would charge for."""
        self.ledger.append(billed)
        self._by_id[billed.response_id] = billed
        self.stats["billed"] += 1

    def _answer(self, parsed: Parsed, headers: dict[str, str], tier: str | None) -> SimResponse:
        """Produce, bill and shape one 200 answer (JSON, truncated JSON, stream or cut stream)."""
        cfg = self.config
        answer = plan(parsed, cfg.answer_chars)
        head = self._head(parsed.model, tier)
        broken = self._faults.breaks(cfg.stream_cut_rate if parsed.stream else cfg.truncate_rate)
        billed = BilledAnswer(
            str(head["id"]), parsed.model, answer.usage, broken, parsed.stream, parsed.key, tier
        )
        self._bill(billed)
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
