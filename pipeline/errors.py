"""What can go wrong, and what the run does about it.

Exception tree::

    PipelineError                 anything this package raises on purpose
    ├── UsageError                bad options or an unreadable input: exit 2, nothing sent
    ├── LockedError               another run holds the --out lock: exit 4, nothing sent
    └── RequestError              one request did not produce a usable answer
        ├── ApiError              the server answered with an error body
        │   (its ``kind`` says what to do: retry, give up on the row, or stop the run)
        ├── TransportError        no usable answer: timeout, dropped connection,
        │                         truncated, malformed or oversized body, stream cut short
        └── ConfigurationError    the base URL itself is wrong (a redirect, a certificate
                                  that fails verification): stop the run

Classification lives here, in one table, so the retry policy, the runner and the
tests agree on it (DESIGN.md, "Errors from the server").
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any


class PipelineError(Exception):
    """Base class for errors this package raises on purpose."""


class UsageError(PipelineError):
    """Bad options or unreadable input: the run must not start (exit 2)."""


class LockedError(PipelineError):
    """Another live run holds the lock on this output folder (exit 4)."""


class Kind(enum.Enum):
    """What the runner does with a failed request."""

    RETRY = "retry"  # try again after a backoff (429, 5xx, transport trouble)
    PERMANENT = "permanent"  # this row cannot succeed as sent (400, 404, 413, 422)
    FATAL = "fatal"  # nothing will succeed: stop the whole run (401, 403, 402, quota)


class RequestError(PipelineError):
    """One request failed. ``error_type`` is what lands in the results column."""

    kind: Kind = Kind.RETRY
    error_type: str = "request_error"
    http_status: int | None = None
    retry_after: float | None = None  # seconds the server asked us to wait, if it said
    fallback_suggestion: str | None = None
    base_url: str | None = None  # the base URL that failed, set by the client


class TransportError(RequestError):
    """No usable answer came back: timeouts, resets, truncated or malformed bodies."""

    def __init__(self, error_type: str, message: str, *, http_status: int | None = None) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.http_status = http_status


class ConfigurationError(RequestError):
    """The server cannot be used as configured: no retry can help, so the run stops.

    A redirect (the gateway wants another URL, e.g. ``https://`` for ``http://``) or
    a TLS certificate that fails verification is the same for every row; retrying each
    row to exhaustion would only turn a setup mistake into hours of failures.
    """

    kind = Kind.FATAL

    def __init__(self, error_type: str, message: str, *, http_status: int | None = None) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.http_status = http_status


# Error types that mean "your balance is gone", whatever status they arrive with:
# some gateways send insufficient_quota as a 429, which must not be retried.
_QUOTA_TYPES = frozenset({"insufficient_quota", "insufficient_quota_error", "billing_error"})


def classify_status(status: int, error_type: str | None) -> Kind:
    """Map an HTTP status (and the body's error type) to what the run should do."""
    if error_type in _QUOTA_TYPES or status in (401, 402, 403):
        return Kind.FATAL
    if status == 429 or status == 408 or status >= 500:
        return Kind.RETRY
    return Kind.PERMANENT


class ApiError(RequestError):
    """The server answered with a non-2xx status and (usually) the seeds' error body."""

    def __init__(
        self,
        status: int,
        error_type: str,
        message: str,
        *,
        param: str | None = None,
        code: Any = None,
        fallback_suggestion: str | None = None,
        retry_after: float | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.headers = dict(headers or {})  # the x-ratelimit-* headers that came with it
        self.http_status = status
        self.error_type = error_type
        self.message = message
        self.param = param
        self.code = code
        self.fallback_suggestion = fallback_suggestion
        self.retry_after = retry_after
        self.kind = classify_status(status, _quota_hint(error_type, code))

    @property
    def is_rate_limit(self) -> bool:
        return self.http_status == 429 and self.kind is Kind.RETRY

    def __str__(self) -> str:
        text = f"HTTP {self.http_status} {self.error_type}: {self.message}"
        if self.param:
            text += f" (param: {self.param})"
        return text


def _quota_hint(error_type: str, code: Any) -> str:
    """The error type, or ``insufficient_quota`` when only the code says so."""
    if isinstance(code, str) and code in _QUOTA_TYPES:
        return "insufficient_quota"
    return error_type


FATAL_ADVICE = {
    401: "The API key was refused: check the variable named by --api-key-env",
    403: "The key may not use this model or endpoint: check its permissions",
    402: "The account is out of balance or quota: top it up, then re-run the same command",
}


CONFIGURATION_ADVICE = {
    "redirect": "Use the URL the server redirected to as --base-url (a redirect is not followed: "
    "it would resend the key to a host you did not name)",
    "tls": "Check the base URL's host name, or trust the CA that signed its certificate "
    "(SSL_CERT_FILE=/path/to/ca-bundle.pem)",
}


def fatal_advice(error: RequestError) -> str:
    """A sentence a user can act on, for an error that stopped the run."""
    if isinstance(error, ConfigurationError):
        return CONFIGURATION_ADVICE.get(error.error_type, "Check --base-url")
    status = error.http_status or 0
    if error.error_type in _QUOTA_TYPES or status == 402:
        return FATAL_ADVICE[402]
    return FATAL_ADVICE.get(status, "The server refused the run; see the message above")
