"""The HTTP vocabulary the simulator core shares with its two transports.

The core answers a ``SimRequest`` with a ``SimResponse`` and knows nothing of sockets;
the in-process httpx transport and the aiohttp server both translate these two types,
including the two faults that live below HTTP (a dropped connection, a cut stream).
Error answers use the body shape the imitated gateways send, built by ``error_body``;
``Reject`` carries one from wherever a request is refused up to ``Simulator.handle``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

JSON_HEADERS = {"content-type": "application/json"}
SSE_HEADERS = {"content-type": "text/event-stream", "cache-control": "no-cache"}

# status -> (type, message, fallback_suggestion), as the imitated gateways word them.
ERRORS: dict[int, tuple[str, str, str]] = {
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
OPENAI_QUOTA_BODY = json.dumps(
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
# OpenAI's refusal of a flex request when the tier has no capacity: a 429 the client
# should retry later (or send at the default tier); such a refusal is not billed.
FLEX_UNAVAILABLE_BODY = json.dumps(
    {
        "error": {
            "message": "Resource Unavailable: there is not enough capacity on the flex tier "
            "to process this request right now. Please retry later, or send it with "
            "service_tier 'default'.",
            "type": "rate_limit_error",
            "param": None,
            "code": "resource_unavailable",
        }
    }
).encode()


def openai_error(
    status: int,
    message: str,
    *,
    kind: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> Reject:
    """A refusal with OpenAI's own error body (message, type, param, code), which the
    Files and Batches routes use as OpenAI does."""
    error = {"message": message, "type": kind, "param": param, "code": code}
    return Reject(status, body=json.dumps({"error": error}).encode())


def error_body(
    status: int,
    message: str | None = None,
    *,
    param: str | None = None,
    fallback: str | None = None,
) -> bytes:
    """The gateway error body for ``status``: code, message, type, param?, fallback_suggestion."""
    kind, default_message, default_fallback = ERRORS[status]
    error: dict[str, Any] = {"code": status, "message": message or default_message, "type": kind}
    if param is not None:
        error["param"] = param
    error["fallback_suggestion"] = default_fallback if fallback is None else fallback
    return json.dumps({"error": error}).encode()


@dataclass
class SimRequest:
    """One HTTP request as the core sees it; header names are lower-case."""

    method: str
    path: str
    headers: Mapping[str, str]
    body: bytes
    query: str = ""  # the raw query string, without the "?"


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


class Reject(Exception):
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
