"""The retry policy, built in one place from tenacity's small strategies.

- Retry on what: only errors whose kind is RETRY (429, 5xx, timeouts, dropped or
  truncated answers). 400/404/413/422 end the row; 401/403/402 end the run.
- How long: ``max_attempts`` failures that are not rate limits, *and* a total
  ``max_retry_time`` per row. A 429 is the gateway pacing the whole run, so it does
  not spend the row's attempts (curator #205 burned all five on 429s); a generous
  separate cap still bounds it.
- How long to wait: the server's ``Retry-After`` when it gave one, else exponential
  backoff with full jitter.
- Not here: a 429 refusing a ``flex`` request for capacity never reaches this loop
  (the runner raises it as ``pipeline.tiers.FlexRefused``, not a RequestError), so
  ``--flex-fallback`` counts every one; pipeline.tiers has its own, longer backoff.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception
from tenacity.wait import wait_base, wait_random_exponential

from pipeline.errors import ApiError, Kind, RequestError

RATE_LIMIT_ATTEMPTS_FACTOR = 10  # 429s allowed per row, as a multiple of max_attempts


def is_retryable(exc: BaseException) -> bool:
    return isinstance(exc, RequestError) and exc.kind is Kind.RETRY


def _is_rate_limit(exc: BaseException | None) -> bool:
    return isinstance(exc, ApiError) and exc.is_rate_limit


class wait_server_or(wait_base):
    """Wait what the server asked for; otherwise fall back to the given strategy."""

    def __init__(self, fallback: wait_base, cap: float = 300.0) -> None:
        self.fallback = fallback
        self.cap = cap

    def __call__(self, retry_state: RetryCallState) -> float:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        asked = getattr(exc, "retry_after", None)
        if isinstance(asked, (int, float)) and asked > 0:
            return float(min(asked, self.cap))
        return float(self.fallback(retry_state))


class stop_after_failures:
    """Stop after ``max_attempts`` non-429 failures, many 429s, or ``max_time`` seconds."""

    def __init__(
        self, max_attempts: int, max_time: float, first_failure: BaseException | None = None
    ) -> None:
        self.max_attempts = max_attempts
        self.max_time = max_time
        self.first = {"other": 0, "429": 0}  # a failure seen before the loop began
        if first_failure is not None:
            self.first["429" if _is_rate_limit(first_failure) else "other"] += 1

    def __call__(self, retry_state: RetryCallState) -> bool:
        counts = retry_state.__dict__.setdefault("_failures", dict(self.first))
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        counts["429" if _is_rate_limit(exc) else "other"] += 1
        if counts["other"] >= self.max_attempts:
            return True
        if counts["429"] >= self.max_attempts * RATE_LIMIT_ATTEMPTS_FACTOR:
            return True
        elapsed = retry_state.seconds_since_start or 0.0
        return elapsed >= self.max_time


def retrying(
    max_attempts: int,
    max_time: float,
    *,
    sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
    initial_wait: float = 0.5,
    max_wait: float = 60.0,
    first_failure: RequestError | None = None,
) -> AsyncRetrying:
    """A fresh AsyncRetrying for one row. ``sleep`` is injectable so tests never wait.

    ``first_failure``: the row's first attempt was made outside this loop (the fast
    path) and failed with it; the loop counts it (wait ``first_wait`` before entering).
    """
    sleeper: Any = sleep
    wait = wait_server_or(wait_random_exponential(multiplier=initial_wait, max=max_wait))
    return AsyncRetrying(
        retry=retry_if_exception(is_retryable),
        stop=stop_after_failures(max_attempts, max_time, first_failure),
        wait=wait,
        sleep=sleeper,
        reraise=True,
    )


def first_wait(error: RequestError, initial_wait: float = 0.5, cap: float = 300.0) -> float:
    """The wait after a row's first failure, by the same rule as the loop's waits:
    the server's Retry-After, else full jitter on ``initial_wait``."""
    if error.retry_after:
        return float(min(error.retry_after, cap))
    return random.uniform(0, initial_wait)


def gives_up_at_once(error: RequestError, max_attempts: int) -> bool:
    """True when the first failure already ends the row (not retryable, or no retries)."""
    return not is_retryable(error) or (max_attempts <= 1 and not _is_rate_limit(error))
