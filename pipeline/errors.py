"""Every exception this package raises on purpose, and the exit code each one means.

Exception tree::

    PipelineError                 anything this package raises on purpose
    ├── UsageError                bad options or an unreadable input: exit 2, nothing sent
    │   ├── PricingError          a price table that cannot be used (names file and line)
    │   └── ReportError           a report or query that cannot be made as asked
    │                             (bad --by, date, format or SQL)
    ├── LockedError               another run holds the --out lock: exit 4, nothing sent
    ├── StopError                 the run had to stop; what it wrote is kept: exit 3
    │   ├── BudgetExceeded        the next request would pass --max-cost
    │   └── SinkError             OUT cannot be written (disk full, quota, I/O error)
    ├── InvalidRow                one input row cannot be a request: that row's outcome
    │   └── ImageError            an image reference that cannot be sent
    └── RequestError              one request did not produce a usable answer
        ├── ApiError              the server answered with an error body
        │   (its ``kind`` says what to do: retry, give up on the row, or stop the run)
        ├── TransportError        no usable answer: timeout, dropped connection,
        │                         truncated, malformed or oversized body, stream cut short
        └── ConfigurationError    the base URL itself is wrong (a redirect, a certificate
                                  that fails verification): stop the run

Anything else that escapes a command is a bug: the command line reports it as an
internal error (exit 5), never as bad usage.

Classification lives here, in one table, so the retry policy, the runner and the
tests agree on it: an error answer is ``{"error": {"code", "message", "type",
"param"}}`` with an HTTP status; the status (and a quota type, whatever status it
came with) decides whether to retry, give up on the row or stop the run.
"""

from __future__ import annotations

import enum
import signal
from collections.abc import Iterable, Mapping
from typing import Any


class Exit(enum.IntEnum):
    """The process exit codes: the command line, the runner, the manifest and the
    ``run --help`` text all take them from here."""

    OK = 0  # every row ok
    FAILED = 1  # some rows failed
    USAGE = 2  # bad usage or input (nothing sent)
    FATAL = 3  # stopped on auth/quota/budget/disk full (results kept)
    LOCKED = 4  # --out in use by another run (nothing sent)
    INTERNAL = 5  # internal error, a bug (results kept)
    SIGINT = 130  # interrupted by Ctrl-C (results kept)
    SIGTERM = 143  # terminated (results kept)

    @property
    def meaning(self) -> str:
        """One line saying what this code means."""
        return EXIT_MEANINGS[self]


EXIT_MEANINGS = {
    Exit.OK: "all ok",
    Exit.FAILED: "some rows failed",
    Exit.USAGE: "bad usage or input (nothing sent)",
    Exit.FATAL: "stopped on auth/quota/budget/disk full (results kept)",
    Exit.LOCKED: "--out in use by another run (nothing sent)",
    Exit.INTERNAL: "internal error, a bug (results kept)",
    Exit.SIGINT: "interrupted by Ctrl-C (results kept)",
    Exit.SIGTERM: "terminated (results kept)",
}

# When several codes apply, the first in this order wins: a usage or lock problem
# means nothing ran; a signal is what the person asked for; a bug outranks the
# stop it may have caused; a stop outranks failed rows.
EXIT_PRECEDENCE = (
    Exit.USAGE,
    Exit.LOCKED,
    Exit.SIGINT,
    Exit.SIGTERM,
    Exit.INTERNAL,
    Exit.FATAL,
    Exit.FAILED,
    Exit.OK,
)


def worst_exit(codes: Iterable[Exit]) -> Exit:
    """The code that wins among ``codes`` (``Exit.OK`` when none apply)."""
    found = set(codes)
    return next((code for code in EXIT_PRECEDENCE if code in found), Exit.OK)


def signal_exit(signum: int) -> Exit | int:
    """The exit code for a run stopped by signal ``signum`` (the shell's 128 + n)."""
    if signum == signal.SIGINT:
        return Exit.SIGINT
    if signum == signal.SIGTERM:
        return Exit.SIGTERM
    return 128 + signum


def exit_help() -> str:
    """The exit-code paragraph of ``run --help``, drawn from ``Exit``."""
    parts = [f"{code.value} {code.meaning}" for code in Exit if code < Exit.SIGINT]
    parts.append(f"{Exit.SIGINT.value}/{Exit.SIGTERM.value} interrupted (results kept)")
    return "Exit codes: " + ", ".join(parts) + "."


class PipelineError(Exception):
    """Base class for errors this package raises on purpose."""


class UsageError(PipelineError):
    """Bad options or unreadable input: the run must not start (exit 2)."""


class PricingError(UsageError):
    """The price table cannot be used; the message names the file and line."""


class ReportError(UsageError):
    """A report or query cannot be made as asked (bad --by, date, format or SQL)."""


class LockedError(PipelineError):
    """Another live run holds the lock on this output folder (exit 4)."""


class StopError(PipelineError):
    """The run cannot go on; what it wrote so far is kept (exit 3)."""


class BudgetExceeded(StopError):
    """The next request would not fit under ``--max-cost``: the run stops before spend
    passes the cap (exit 3)."""

    def __init__(self, message: str, amount: float = 0.0) -> None:
        super().__init__(message)
        self.amount = amount  # USD the request would have held


class SinkError(StopError):
    """Results could not be written to OUT (disk full, quota, I/O error, read-only):
    the run stops sending (exit 3); what was journaled stays."""


class InvalidRow(PipelineError):
    """The row cannot be a valid request; the message says which field and why.

    It never ends a run: it becomes that row's ``invalid_input`` outcome."""


class ImageError(InvalidRow):
    """An image reference that cannot be sent; the message names it and why."""


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
    """The server answered with a non-2xx status and (usually) an error body
    ``{"error": {"code", "message", "type", "param"}}``."""

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
