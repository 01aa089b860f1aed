"""The built-in OpenAI-compatible simulator that the demo, the tests and the benchmarks run against.

It speaks the seeds' wire format (the full usage block, ``reasoning_content``,
``tool_calls``, SSE chunks, the ``{"error": {...}}`` body and its status codes) and can
misbehave on purpose: latency, server-side rate limits with ``Retry-After`` and
``x-ratelimit-*`` headers, injected 429/5xx, dropped connections, truncated bodies, cut
streams, quota exhaustion and bad keys. Every answer it would bill goes into ``ledger``,
so tests can prove the pipeline never pays twice for one row.

There are no sockets here: ``Simulator.handle`` maps a ``SimRequest`` to a
``SimResponse``; ``sim_transport`` serves it in-process to httpx and ``sim_server``
serves it over HTTP. Time comes from injected ``clock``/``sleep`` so tests never wait.

Deterministic choices, documented once:
- answers derive from ``request_key(model, messages)``: the same request always gets
  the same content, reasoning, tool call and usage (only id and ``created`` differ);
- prompt tokens are estimated as ``ceil(len(text) / 4) + 4`` per message, ``+ 3`` for
  the reply, plus ``IMAGE_TOKENS[detail]`` per image and the tools' JSON / 4;
- ``cached_tokens``: the messages before the last user message (system prompt, few-shot
  turns: what a labeling job repeats on every row) form the cacheable prefix; when it
  reaches 1024 tokens it counts as cached, rounded down to a multiple of 128 as OpenAI
  reports it, as if the prefix cache were always warm. Stateless, so retries and the
  streamed and plain forms of one request report the same usage;
- ``input_tokens``/``output_tokens`` are 0 and ``input_tokens_details`` null, exactly as
  the StarMagic/EvoLink seeds send them: clients must read ``prompt_tokens``.
"""

from __future__ import annotations

import collections
import email.utils
import hashlib
import hmac
import json
import math
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import anyio
import httpx

CHAT_PATHS = frozenset({"/v1/chat/completions", "/chat/completions"})
MODELS_PATHS = frozenset({"/v1/models", "/models"})
DEFAULT_MODELS = ("gpt-5.5", "gpt-5.1", "gpt-5.1-chat", "gpt-5.1-thinking")
IMAGE_TOKENS = {"low": 85, "high": 765, "auto": 765}
REASONING_TOKENS = {"none": 0, "minimal": 16, "low": 64, "medium": 192, "high": 512, "xhigh": 1024}
MAX_IMAGE_BYTES = 10 * 1024 * 1024  # the seeds' per-image limit
MAX_FLAT_IMAGES = 10  # ModelStream's image_urls range
INJECTED_RETRY_AFTER = 1.0  # seconds an injected 429 asks the client to wait

_JSON_HEADERS = {"content-type": "application/json"}
_SSE_HEADERS = {"content-type": "text/event-stream", "cache-control": "no-cache"}
_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
_DROP = 0  # fault code: close the connection without answering
_M64 = (1 << 64) - 1

# status -> (type, message, fallback_suggestion), after the seeds' examples.
_ERRORS: dict[int, tuple[str, str, str]] = {
    400: ("invalid_request_error", "Invalid request parameters", "fix the request and resend"),
    401: ("authentication_error", "Invalid or expired token", "check the API key"),
    402: ("insufficient_quota_error", "Insufficient quota", "recharge the account balance"),
    403: ("permission_error", "Access denied for this model", "use a model this key may call"),
    404: ("not_found_error", "Specified model not found", "POST /v1/chat/completions"),
    413: ("request_too_large_error", "Image file too large", "compress image to under 10MB"),
    429: ("rate_limit_error", "Rate limit exceeded", "retry after 60 seconds"),
    500: ("internal_server_error", "Internal server error", "try again later"),
    502: ("upstream_error", "Upstream AI service unavailable", "try different model"),
    503: ("service_unavailable_error", "Service temporarily unavailable", "retry after 30 seconds"),
}
# OpenAI's own quota answer: a 429 whose type and code say insufficient_quota.
_OPENAI_QUOTA_BODY = json.dumps(
    {
        "error": {
            "message": "You exceeded your current quota, please check your plan and billing "
            "details.",
            "type": "insufficient_quota",
            "param": None,
            "code": "insufficient_quota",
        }
    }
).encode()


def error_body(
    status: int,
    message: str | None = None,
    *,
    param: str | None = None,
    fallback: str | None = None,
) -> bytes:
    """The seeds' error body for ``status``: code, message, type, param?, fallback_suggestion."""
    kind, default_message, default_fallback = _ERRORS[status]
    error: dict[str, Any] = {"code": status, "message": message or default_message, "type": kind}
    if param is not None:
        error["param"] = param
    error["fallback_suggestion"] = default_fallback if fallback is None else fallback
    return json.dumps({"error": error}).encode()


def request_key(model: str, messages: Any) -> str:
    """sha256 hex of ``{"messages", "model"}`` as compact sort_keys JSON: one request's identity.

    The flat form (``prompt``/``system_prompt``/``image_urls``) is keyed by the messages it
    normalizes to, so both spellings of one request are the same request.
    """
    text = json.dumps(
        {"messages": messages, "model": model},
        sort_keys=True,
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class SimConfig:
    """The simulator's knobs. Rates are probabilities per request, drawn from ``seed``.

    Latency and fault rates are read on every request, so a test may change them on a
    running simulator; limits, quota, key and models are fixed when it is built.
    """

    latency_ms: float = 0.0
    latency_jitter_ms: float = 0.0
    rpm_limit: int | None = None
    tpm_limit: int | None = None
    burst_seconds: float = 1.0
    fail_429_rate: float = 0.0
    fail_5xx_rate: float = 0.0
    truncate_rate: float = 0.0
    drop_rate: float = 0.0
    stream_cut_rate: float = 0.0
    quota_requests: int | None = None
    quota_as_429: bool = False
    api_key: str | None = None
    retry_after: str = "seconds"
    rate_limit_headers: bool = True
    models: tuple[str, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        rates = (self.fail_429_rate, self.fail_5xx_rate, self.drop_rate)
        for rate in (*rates, self.truncate_rate, self.stream_cut_rate):
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"fault rates must be within 0..1, got {rate}")
        if sum(rates) > 1.0:
            raise ValueError("fail_429_rate + fail_5xx_rate + drop_rate must not exceed 1")
        for limit in (self.rpm_limit, self.tpm_limit):
            if limit is not None and limit <= 0:
                raise ValueError("rpm_limit and tpm_limit must be positive")
        if self.burst_seconds <= 0:
            raise ValueError("burst_seconds must be positive")
        if self.retry_after not in ("seconds", "ms", "date", "none"):
            raise ValueError("retry_after must be one of seconds, ms, date, none")


@dataclass
class SimRequest:
    """One HTTP request as the core sees it; header names are lower-case."""

    method: str
    path: str
    headers: Mapping[str, str]
    body: bytes


@dataclass
class SimResponse:
    """One answer.

    ``drop``: close the connection without answering (``status`` is 0 then).
    ``cut``: after the stream's last chunk, close the connection instead of ending the
    body cleanly, as a gateway that kills a long stream does (clients see a protocol
    error and no ``[DONE]``).
    """

    status: int
    headers: dict[str, str]
    body: bytes | None = None
    stream: AsyncIterator[bytes] | None = None
    drop: bool = False
    cut: bool = False


@dataclass
class BilledAnswer:
    """An answer the server produced and would bill, whether or not the client got it whole."""

    response_id: str
    model: str
    usage: dict[str, Any]
    truncated: bool
    streamed: bool
    request_key: str


class _Reject(Exception):
    """Raised inside the core to answer with an error body and stop there."""

    def __init__(
        self,
        status: int,
        message: str | None = None,
        *,
        param: str | None = None,
        fallback: str | None = None,
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
    ) -> None:
        super().__init__(status)
        self.status = status
        self.body = body or error_body(status, message, param=param, fallback=fallback)
        self.headers = headers or {}


@dataclass(slots=True)
class _Parsed:
    """A validated chat request, with the prompt-side numbers the answer needs."""

    body: dict[str, Any]
    model: str
    key: str
    prompt_tokens: int
    image_tokens: int
    cached_tokens: int
    user_text: str
    max_tokens: int | None
    stream: bool
    include_usage: bool


@dataclass(slots=True)
class _Answer:
    content: str | None
    reasoning: str | None
    tool_calls: list[dict[str, Any]] | None
    finish_reason: str
    usage: dict[str, Any]


class _Bucket:
    """A token bucket on the injected clock: ``capacity = rate * burst``, at least 1.

    A request bigger than the whole bucket is let through when the bucket is full and
    leaves it in debt, so an oversized request waits instead of failing forever.
    """

    __slots__ = ("limit", "rate", "capacity", "level", "stamp")

    def __init__(self, per_minute: int, burst_seconds: float, now: float) -> None:
        self.limit = per_minute
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate * burst_seconds)
        self.level = self.capacity
        self.stamp = now

    def wait_for(self, need: float, now: float) -> float:
        """Refill to ``now`` and return the seconds until ``need`` can be taken (0 = now)."""
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now
        return max(0.0, (min(need, self.capacity) - self.level) / self.rate)

    def headers(self, kind: str) -> dict[str, str]:
        full_in = (self.capacity - self.level) / self.rate
        return {
            f"x-ratelimit-limit-{kind}": str(self.limit),
            f"x-ratelimit-remaining-{kind}": str(max(0, int(self.level))),
            f"x-ratelimit-reset-{kind}": go_duration(full_in),
        }


def go_duration(seconds: float) -> str:
    """Format like OpenAI's reset headers (Go durations): ``12ms``, ``1.5s``, ``6m0s``."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{max(1, round(seconds * 1000))}ms"
    minutes, secs = divmod(round(seconds, 3), 60)
    hours, minutes = divmod(int(minutes), 60)
    head = f"{hours}h{minutes}m" if hours else (f"{minutes}m" if minutes else "")
    return f"{head}{secs:g}s"


class _Chunks:
    """Async iterator over prepared SSE chunks (a class, so an unfinished one leaves no
    async generator to finalize)."""

    def __init__(self, chunks: list[bytes]) -> None:
        self._chunks = iter(chunks)

    def __aiter__(self) -> _Chunks:
        return self

    async def __anext__(self) -> bytes:
        try:
            return next(self._chunks)
        except StopIteration:
            raise StopAsyncIteration from None


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
        self._faults = random.Random(cfg.seed)
        self._latency = random.Random(f"{cfg.seed}:latency")
        self._by_id: dict[str, BilledAnswer] = {}
        self._count = 0
        self._tag = uuid.uuid4().hex[:8]  # ids stay unique across simulator restarts
        self._fingerprint = "fp_sim_" + hashlib.sha256(str(cfg.seed).encode()).hexdigest()[:10]
        now = clock()
        self._rpm = _Bucket(cfg.rpm_limit, cfg.burst_seconds, now) if cfg.rpm_limit else None
        self._tpm = _Bucket(cfg.tpm_limit, cfg.burst_seconds, now) if cfg.tpm_limit else None
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
        except _Reject as rejected:
            status = rejected.status
            self.stats[str(status)] += 1
            if status >= 500:
                self.stats["5xx"] += 1
            return SimResponse(status, {**_JSON_HEADERS, **rejected.headers}, rejected.body)

    async def _route(self, request: SimRequest) -> SimResponse:
        path = request.path.rstrip("/") or "/"
        method = request.method.upper()
        if path == "/health" and method == "GET":
            return SimResponse(200, dict(_JSON_HEADERS), b'{"status":"ok"}')
        if path == "/sim/stats" and method == "GET":
            return SimResponse(200, dict(_JSON_HEADERS), self.stats_json())
        if path in MODELS_PATHS and method == "GET":
            self._check_auth(request.headers)
            return SimResponse(200, dict(_JSON_HEADERS), self._models_body)
        if path not in CHAT_PATHS or method != "POST":
            raise _Reject(404, f"Unknown route: {method} {request.path}")
        self._check_auth(request.headers)
        parsed = _parse(request.body)
        if self._models and parsed.model not in self._models:
            raise _Reject(404, param="model", fallback=self.config.models[0])
        self._check_quota()
        limit_headers = self._admit(parsed)
        fault = self._draw_fault()
        await self._delay()
        if fault == _DROP:
            self.stats["dropped"] += 1
            return SimResponse(0, {}, drop=True)
        if fault == 429:
            self.stats["injected_429"] += 1
            raise self._too_many(INJECTED_RETRY_AFTER)
        if fault is not None:
            raise _Reject(fault)
        self._check_quota()  # again: others may have used it up while this one waited
        return self._answer(parsed, limit_headers)

    def _check_auth(self, headers: Mapping[str, str]) -> None:
        """401 unless the exact Bearer key was sent; the message never echoes what was sent."""
        if self._auth is None:
            return
        sent = headers.get("authorization", "").strip().encode()
        if not hmac.compare_digest(sent, self._auth):
            raise _Reject(401)

    def _check_quota(self) -> None:
        quota = self.config.quota_requests
        if quota is None or len(self.ledger) < quota:
            return
        self.stats["quota"] += 1
        if self.config.quota_as_429:
            raise _Reject(429, body=_OPENAI_QUOTA_BODY)
        raise _Reject(402)

    def _admit(self, parsed: _Parsed) -> dict[str, str]:
        """Take from the rpm/tpm buckets or raise 429; returns the x-ratelimit-* headers."""
        if self._rpm is None and self._tpm is None:
            return {}
        now = self._clock()
        cost = parsed.prompt_tokens + (parsed.max_tokens or 0)
        wait = 0.0
        if self._rpm is not None:
            wait = self._rpm.wait_for(1, now)
        if self._tpm is not None:
            wait = max(wait, self._tpm.wait_for(cost, now))
        if wait > 0:
            self.stats["rate_limited"] += 1
            raise self._too_many(wait)
        if self._rpm is not None:
            self._rpm.level -= 1
        if self._tpm is not None:
            self._tpm.level -= cost
        return self._limit_headers()

    def _limit_headers(self) -> dict[str, str]:
        headers: dict[str, str] = {}
        if self.config.rate_limit_headers:
            if self._rpm is not None:
                headers.update(self._rpm.headers("requests"))
            if self._tpm is not None:
                headers.update(self._tpm.headers("tokens"))
        return headers

    def _too_many(self, wait: float) -> _Reject:
        """A 429 saying when to come back, in the configured ``retry_after`` style."""
        seconds = max(1, math.ceil(wait))
        style = self.config.retry_after
        headers = self._limit_headers()
        if style == "seconds":
            headers["retry-after"] = str(seconds)
        elif style == "ms":
            headers["retry-after-ms"] = str(max(1, math.ceil(wait * 1000)))
        elif style == "date":
            headers["retry-after"] = email.utils.formatdate(
                math.ceil(self._wall() + wait), usegmt=True
            )
        return _Reject(429, fallback=f"retry after {seconds} seconds", headers=headers)

    def _draw_fault(self) -> int | None:
        """One draw per request: 429, a 5xx status, ``_DROP`` or None (answer)."""
        cfg = self.config
        if not (cfg.fail_429_rate or cfg.fail_5xx_rate or cfg.drop_rate):
            return None
        draw = self._faults.random()
        if draw < cfg.fail_429_rate:
            return 429
        if draw < cfg.fail_429_rate + cfg.fail_5xx_rate:
            return self._faults.choice((500, 502, 503))
        if draw < cfg.fail_429_rate + cfg.fail_5xx_rate + cfg.drop_rate:
            return _DROP
        return None

    async def _delay(self) -> None:
        ms = self.config.latency_ms
        if self.config.latency_jitter_ms:
            ms += self._latency.uniform(0.0, self.config.latency_jitter_ms)
        if ms > 0:
            await self._sleep(ms / 1000.0)

    def _answer(self, parsed: _Parsed, headers: dict[str, str]) -> SimResponse:
        """Produce, bill and shape one 200 answer (JSON, truncated JSON, stream or cut stream)."""
        cfg = self.config
        answer = _plan(parsed)
        self._count += 1
        head = {
            "id": f"chatcmpl-sim-{self._tag}{self._count:08x}",
            "object": "chat.completion",
            "created": int(self._wall()),
            "model": parsed.model,
            "system_fingerprint": self._fingerprint,
        }
        rate = cfg.stream_cut_rate if parsed.stream else cfg.truncate_rate
        broken = rate > 0 and self._faults.random() < rate
        billed = BilledAnswer(
            str(head["id"]), parsed.model, answer.usage, broken, parsed.stream, parsed.key
        )
        self.ledger.append(billed)
        self._by_id[billed.response_id] = billed
        self.stats["billed"] += 1
        if parsed.stream:
            self.stats["streamed"] += 1
            self.stats["stream_cut" if broken else "ok"] += 1
            chunks = _stream_chunks(head, answer, parsed.include_usage, cut=broken)
            return SimResponse(200, {**_SSE_HEADERS, **headers}, stream=_Chunks(chunks), cut=broken)
        body = json.dumps(_completion(head, answer)).encode()
        if broken:
            self.stats["truncated"] += 1
            body = body[: len(body) // 2]
        else:
            self.stats["ok"] += 1
        return SimResponse(200, {**_JSON_HEADERS, **headers}, body)


# --- request parsing ---------------------------------------------------------------------


def _parse(raw: bytes) -> _Parsed:
    """Validate a chat body like a real gateway (400/413) and estimate its prompt."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise _Reject(400, "Request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise _Reject(400, "Request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _Reject(400, "model is required", param="model")
    messages = body.get("messages")
    if messages is None:
        messages = _flat_messages(body)
    per_message, image_tokens, user_text = _scan(messages)
    prompt_tokens = sum(per_message) + 3
    tools = body.get("tools")
    if tools:
        prompt_tokens += _tokens(json.dumps(tools))
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=0)
    prefix = sum(per_message[:last_user])
    max_tokens = _max_tokens(body)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _Reject(400, "stream must be a boolean", param="stream")
    options = body.get("stream_options")
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    return _Parsed(
        body=body,
        model=model,
        key=request_key(model, messages),
        prompt_tokens=prompt_tokens,
        image_tokens=image_tokens,
        cached_tokens=prefix // 128 * 128 if prefix >= 1024 else 0,
        user_text=user_text,
        max_tokens=max_tokens,
        stream=stream,
        include_usage=include_usage,
    )


def _flat_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """ModelStream's flat form (prompt, system_prompt, image_urls, image_detail) as messages."""
    prompt = body.get("prompt")
    if prompt is None:
        raise _Reject(400, "messages (or prompt) is required", param="messages")
    if not isinstance(prompt, str):
        raise _Reject(400, "prompt must be a string", param="prompt")
    messages: list[dict[str, Any]] = []
    system = body.get("system_prompt")
    if system is not None:
        if not isinstance(system, str):
            raise _Reject(400, "system_prompt must be a string", param="system_prompt")
        messages.append({"role": "system", "content": system})
    urls = body.get("image_urls")
    if not urls:
        messages.append({"role": "user", "content": prompt})
        return messages
    if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
        raise _Reject(400, "image_urls must be an array of strings", param="image_urls")
    if len(urls) > MAX_FLAT_IMAGES:
        raise _Reject(400, f"at most {MAX_FLAT_IMAGES} image_urls", param="image_urls")
    image: dict[str, Any] = {}
    if isinstance(body.get("image_detail"), str):
        image["detail"] = body["image_detail"]
    parts: list[dict[str, Any]] = [{"type": "text", "text": prompt}]
    parts += [{"type": "image_url", "image_url": {"url": u, **image}} for u in urls]
    messages.append({"role": "user", "content": parts})
    return messages


def _scan(messages: Any) -> tuple[list[int], int, str]:
    """Validate messages; return tokens per message, image tokens, and the last user text."""
    if not isinstance(messages, list) or not messages:
        raise _Reject(400, "messages must be a non-empty array", param="messages")
    per_message: list[int] = []
    image_tokens = 0
    user_text = ""
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _Reject(400, f"{where} must be an object", param=where)
        role = message.get("role")
        if role not in _ROLES:
            raise _Reject(400, f"{where}.role is not a valid role", param=f"{where}.role")
        content = message.get("content")
        images = 0
        if isinstance(content, str):
            text = content
        elif isinstance(content, list):
            texts: list[str] = []
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    texts.append(part["text"])
                elif kind == "image_url":
                    images += _image_tokens(part.get("image_url"), where)
                elif not isinstance(kind, str):
                    raise _Reject(400, f"{where}.content parts need a type", param=where)
            text = "\n".join(texts)
        elif content is None and role == "assistant":
            text = ""
        else:
            raise _Reject(400, f"{where}.content must be a string or an array", param=where)
        tokens = 4 + _tokens(text) + images
        if message.get("tool_calls"):
            tokens += _tokens(json.dumps(message["tool_calls"]))
        per_message.append(tokens)
        image_tokens += images
        if role == "user":
            user_text = text
    return per_message, image_tokens, user_text


def _image_tokens(image_url: Any, where: str) -> int:
    """Fixed tokens per image by detail; a data URL over 10 MB is a 413 as the seeds say."""
    url = image_url.get("url") if isinstance(image_url, dict) else image_url
    if not isinstance(url, str) or not url:
        raise _Reject(400, f"{where} has an image_url without a url", param=where)
    if url.startswith("data:") and len(url) * 3 // 4 > MAX_IMAGE_BYTES:
        raise _Reject(413, param="content")
    detail = image_url.get("detail") if isinstance(image_url, dict) else None
    return IMAGE_TOKENS.get(detail if isinstance(detail, str) else "auto", IMAGE_TOKENS["auto"])


def _max_tokens(body: dict[str, Any]) -> int | None:
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise _Reject(400, f"{name} must be a positive integer", param=name)
        return value
    return None


def _tokens(text: str) -> int:
    return (len(text) + 3) // 4


# --- answers -------------------------------------------------------------------------------


def _plan(parsed: _Parsed) -> _Answer:
    """The deterministic answer for a request, cut to its token budget."""
    body, key = parsed.body, parsed.key
    seed = int(key[:16], 16)
    gist = " ".join(parsed.user_text.split()[:8])
    text = f"sim answer {key[:8]}: {gist}" if gist else f"sim answer {key[:8]}"
    content: str | None = _content(body.get("response_format"), text, seed)
    call = _tool_call(body, parsed.user_text, key, gist, seed)
    tool_calls = None if call is None else [call]
    if call is None:
        out_tokens = max(1, _tokens(content or ""))
    else:
        content = None
        out_tokens = 8 + _tokens(call["function"]["name"] + call["function"]["arguments"])
    reasoning_tokens, reasoning = _reasoning(parsed.model, body.get("reasoning_effort"), key, gist)
    finish = "stop" if call is None else "tool_calls"
    limit = parsed.max_tokens
    if limit is not None and reasoning_tokens + out_tokens > limit:
        finish, tool_calls = "length", None
        reasoning_tokens = min(reasoning_tokens, limit)
        out_tokens = limit - reasoning_tokens
        content = (content or "")[: out_tokens * 4]
    completion = reasoning_tokens + out_tokens
    usage = {
        "prompt_tokens": parsed.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": parsed.prompt_tokens + completion,
        "prompt_tokens_details": {
            "cached_tokens": parsed.cached_tokens,
            "text_tokens": parsed.prompt_tokens - parsed.image_tokens,
            "audio_tokens": 0,
            "image_tokens": parsed.image_tokens,
        },
        "completion_tokens_details": {
            "text_tokens": out_tokens,
            "audio_tokens": 0,
            "reasoning_tokens": reasoning_tokens,
        },
        "input_tokens": 0,
        "output_tokens": 0,
        "input_tokens_details": None,
    }
    return _Answer(content, reasoning, tool_calls, finish, usage)


def _content(response_format: Any, text: str, seed: int) -> str:
    """Plain text, or a JSON object when response_format asks for json_object/json_schema."""
    kind = response_format.get("type") if isinstance(response_format, dict) else response_format
    if kind == "json_object":
        return json.dumps({"answer": text})
    if kind == "json_schema" and isinstance(response_format, dict):
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        value = _from_schema(schema, schema, text, seed, 0)
        return json.dumps(value if isinstance(value, dict) else {"answer": value})
    return text


def _from_schema(schema: Any, root: Any, text: str, seed: int, depth: int) -> Any:
    """A value matching a JSON schema, chosen by ``seed`` (enum members included)."""
    if not isinstance(schema, dict) or depth > 8:
        return text
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/") and isinstance(root, dict):
        target: Any = root
        for name in ref[2:].split("/"):
            target = target.get(name) if isinstance(target, dict) else None
        return _from_schema(target, root, text, seed, depth + 1)
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return enum[seed % len(enum)]
    if "const" in schema:
        return schema["const"]
    for combinator in ("anyOf", "oneOf", "allOf"):
        options = schema.get(combinator)
        if isinstance(options, list) and options:
            return _from_schema(options[0], root, text, seed, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object" or (kind is None and "properties" in schema):
        props = schema.get("properties")
        if not isinstance(props, dict):
            return {}
        return {
            name: _from_schema(sub, root, text, _mix(seed, i), depth + 1)
            for i, (name, sub) in enumerate(props.items())
        }
    if kind == "array":
        low = schema.get("minItems")
        count = min(3, low) if isinstance(low, int) and low > 1 else 1
        items = schema.get("items")
        return [_from_schema(items, root, text, _mix(seed, i), depth + 1) for i in range(count)]
    low = schema.get("minimum", 0)
    low = low if isinstance(low, int | float) and not isinstance(low, bool) else 0
    high = schema.get("maximum", low + 100)
    high = high if isinstance(high, int | float) and not isinstance(high, bool) else low + 100
    if kind == "integer":
        return int(low) + seed % (int(high) - int(low) + 1) if high >= low else int(low)
    if kind == "number":
        return low + (seed % 1000) / 1000 * (high - low)
    if kind == "boolean":
        return bool(seed & 1)
    if kind == "null":
        return None
    return text


def _mix(seed: int, i: int) -> int:
    """splitmix64: a different well-spread seed per property/item."""
    z = (seed + (i + 1) * 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def _tool_call(
    body: dict[str, Any], user_text: str, key: str, gist: str, seed: int
) -> dict[str, Any] | None:
    """Call a tool when the user text names it (or tool_choice forces it); else None."""
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if not isinstance(tools, list) or choice == "none":
        return None
    functions = [
        t["function"]
        for t in tools
        if isinstance(t, dict)
        and isinstance(t.get("function"), dict)
        and isinstance(t["function"].get("name"), str)
    ]
    chosen = None
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        forced = choice["function"].get("name")
        chosen = next((f for f in functions if f["name"] == forced), None)
    if chosen is None:
        lowered = user_text.lower()
        chosen = next(
            (
                f
                for f in functions
                if f["name"].lower() in lowered or f["name"].lower().replace("_", " ") in lowered
            ),
            None,
        )
    if chosen is None and choice == "required" and functions:
        chosen = functions[0]
    if chosen is None:
        return None
    params = chosen.get("parameters")
    args = _from_schema(params, params, gist, seed, 0)
    return {
        "id": f"call_{key[16:40]}",
        "type": "function",
        "function": {"name": chosen["name"], "arguments": json.dumps(args if args else {})},
    }


def _reasoning(model: str, effort: Any, key: str, gist: str) -> tuple[int, str | None]:
    """Reasoning tokens and a short summary for thinking models or a reasoning_effort."""
    if effort is None and "thinking" not in model.lower():
        return 0, None
    base = REASONING_TOKENS.get(effort, 192) if isinstance(effort, str) else 192
    if base == 0:
        return 0, None
    tokens = base + int(key[16:24], 16) % (base // 2 + 1)
    about = gist or "the request"
    return tokens, f"sim reasoning {key[8:16]}: the user asks about {about}; answer briefly."


def _completion(head: dict[str, Any], answer: _Answer) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": answer.content}
    if answer.reasoning is not None:
        message["reasoning_content"] = answer.reasoning
    if answer.tool_calls:
        message["tool_calls"] = answer.tool_calls
    choice = {"index": 0, "message": message, "finish_reason": answer.finish_reason}
    return {**head, "choices": [choice], "usage": answer.usage}


def _stream_chunks(
    head: dict[str, Any], answer: _Answer, include_usage: bool, *, cut: bool
) -> list[bytes]:
    """The SSE events of one answer; a cut stream stops midway: no finish, usage or [DONE]."""
    head = {**head, "object": "chat.completion.chunk"}

    def event(payload: dict[str, Any]) -> bytes:
        return b"data: " + json.dumps(payload).encode() + b"\n\n"

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        payload = {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        if include_usage:
            payload["usage"] = None  # as OpenAI: null on every chunk but the last
        return event(payload)

    out = [chunk({"role": "assistant", "content": ""})]
    out += [chunk({"reasoning_content": p}) for p in _pieces(answer.reasoning)]
    body = [chunk({"content": p}) for p in _pieces(answer.content)]
    for index, call in enumerate(answer.tool_calls or ()):
        fn = call["function"]
        first = {"id": call["id"], "type": "function", "function": {"name": fn["name"]}}
        first["function"]["arguments"] = ""
        body.append(chunk({"tool_calls": [{"index": index, **first}]}))
        for piece in _pieces(fn["arguments"]):
            body.append(chunk({"tool_calls": [{"index": index, "function": {"arguments": piece}}]}))
    if cut:
        return out + body[: max(1, len(body) // 2)]
    out += body
    out.append(chunk({}, answer.finish_reason))
    if include_usage:
        out.append(event({**head, "choices": [], "usage": answer.usage}))
    out.append(b"data: [DONE]\n\n")
    return out


def _pieces(text: str | None, parts: int = 4) -> list[str]:
    if not text:
        return []
    size = -(-len(text) // parts)
    return [text[i : i + size] for i in range(0, len(text), size)]


# --- in-process transport -------------------------------------------------------------------


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
    def __init__(self, sim: Simulator) -> None:
        self._sim = sim

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = await request.aread()
        headers = {k.lower(): v for k, v in request.headers.items()}
        answer = await self._sim.handle(SimRequest(request.method, request.url.path, headers, body))
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


__all__ = [
    "BilledAnswer",
    "SimConfig",
    "SimRequest",
    "SimResponse",
    "Simulator",
    "error_body",
    "go_duration",
    "request_key",
    "sim_transport",
]
