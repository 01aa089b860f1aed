"""Service tiers on synchronous calls: flex capacity refusals, their backoff, the fallback.

A request sent with ``service_tier = "flex"`` is billed at about half price, and the
server may refuse it with a 429 when flex capacity is short. That 429 is not the
gateway pacing this run, so it is handled apart from ordinary 429s:

- **Not hidden.** ``Runner._send_once`` turns a refusal into ``FlexRefused``, which
  is not a ``RequestError``: neither the first-attempt fast path nor the tenacity
  loop of ``pipeline.retry`` retries it. Every refusal reaches ``send_flex`` and is
  counted there, per row.
- **Not a rate limit.** The permit goes back to the limiter as unanswered: a
  refusal says nothing about how fast this run may send. Counted as a 429 it would
  slow every row, the default-tier ones included (fallbacks, other tiers), for a
  shortage of one tier; counted as a success it would let the limiter grow into more
  refusals. The limiter still learns from the answer's rate-limit headers.
- **A longer backoff** (``flex_wait``): 10 s after the first refusal, doubling to a
  5 minute cap, with equal jitter (half fixed, half random). Capacity comes back in
  minutes, not in the half second an ordinary retry waits; the fixed half keeps a
  retry from landing at once on a server that just said it has no room; the random
  half spreads the rows refused in the same moment. A longer Retry-After is honoured
  (up to the same cap).
- **The fallback** (``--flex-fallback N``): after a row's Nth refusal it is sent at
  the default tier at once (no wait: that tier is not the one out of capacity), and
  from then on it is an ordinary request. The answer's ``service_tier`` says which
  tier billed it, and that is what the row is recorded and priced at.
- **Bounded.** A row retries flex until its waits would pass ``--max-retry-time``,
  or it has been refused ``FLEX_REFUSALS_FACTOR`` times its ``--max-attempts``; then
  it falls back to the default tier when ``--flex-fallback`` is set (even before its
  Nth refusal), else it ends as an error with the server's 429, which
  ``--retry-failed`` picks up later.

A 429 whose ``code`` names a rate limit (``rate_limit_exceeded``) is an ordinary 429
even on a flex request; one that names the quota is fatal as always (errors.py).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from pipeline.errors import ApiError, RequestError
from pipeline.request import Job

FLEX = "flex"
FLEX_FIRST_WAIT = 10.0  # seconds after a row's first refusal
FLEX_MAX_WAIT = 300.0  # the longest wait between two flex attempts, Retry-After too
FLEX_REFUSALS_FACTOR = 10  # refusals per row without a fallback, times --max-attempts

R = TypeVar("R")


class FlexRefused(Exception):
    """A flex request refused for capacity (429). Deliberately not a RequestError:
    no retry layer below ``send_flex`` may take it for an ordinary retryable error."""

    def __init__(self, error: ApiError, attempts: int = 1) -> None:
        super().__init__(str(error))
        self.error = error
        self.attempts = attempts  # requests sent for the row in the send that ended so


class FlexExhausted(Exception):
    """A row's flex refusals ran out with no fallback: it ends as ``error``."""

    def __init__(self, error: RequestError, attempts: int) -> None:
        super().__init__(str(error))
        self.error = error
        self.attempts = attempts


def is_flex(body: Mapping[str, Any]) -> bool:
    return body.get("service_tier") == FLEX


def _names_rate_limit(error: ApiError) -> bool:
    """True when the 429's ``code`` says it is a rate limit (``rate_limit_exceeded``),
    not a capacity refusal (``resource_unavailable``). The ``type`` says nothing
    either way: both can come as ``rate_limit_error``."""
    return isinstance(error.code, str) and "rate_limit" in error.code.lower()


def is_capacity_refusal(body: Mapping[str, Any], error: RequestError) -> bool:
    """A 429 (not a quota error) answering a flex request, that names no rate limit."""
    return (
        is_flex(body)
        and isinstance(error, ApiError)
        and error.is_rate_limit
        and not _names_rate_limit(error)
    )


def at_default_tier(job: Job) -> Job:
    """The same row, asked at the default tier (its request_hash unchanged: the same
    row, sent again)."""
    return dataclasses.replace(job, body={**job.body, "service_tier": "default"})


def flex_wait(
    refusals: int,
    retry_after: float | None = None,
    *,
    uniform: Callable[[float, float], float] = random.uniform,
) -> float:
    """Seconds to wait after a row's ``refusals``-th flex refusal (see the module
    docstring for the figures and why)."""
    base = min(FLEX_MAX_WAIT, FLEX_FIRST_WAIT * 2.0 ** max(0, refusals - 1))
    wait = base / 2 + uniform(0.0, base / 2)
    if retry_after is not None and retry_after > wait:
        wait = retry_after
    return min(wait, FLEX_MAX_WAIT)


@dataclass(frozen=True, slots=True)
class FlexPolicy:
    """How long one row keeps asking for flex."""

    fallback: int | None  # refusals before the default tier; None: never fall back
    max_time: float  # seconds of flex waits a row may spend without a fallback
    max_refusals: int  # refusals a row may take without a fallback


async def send_flex(
    job: Job,
    send: Callable[[Job], Awaitable[tuple[R, int]]],
    wait: Callable[[float], Awaitable[None]],
    policy: FlexPolicy,
    *,
    on_retry: Callable[[], None] = lambda: None,
    on_refusal: Callable[[], None] = lambda: None,
    on_fallback: Callable[[], None] = lambda: None,
) -> tuple[R, int]:
    """Send a flex row through ``send`` (the runner's retrying send) until answered:
    (reply, requests sent). Refusals are counted here, never below (``on_refusal``
    hears each; ``on_retry`` each that is asked again); after ``policy.fallback`` of
    them the row goes at the default tier (``on_fallback`` hears it, once a row). Raises
    FlexExhausted when refusals run out without a fallback; whatever else ``send``
    raises passes through."""
    refusals = 0
    attempts = 0
    waited = 0.0
    current = job
    while True:
        try:
            reply, tries = await send(current)
        except FlexRefused as refused:
            attempts += refused.attempts
            refusals += 1
            on_refusal()  # every one, the last of a row that gives up included
            delay = flex_wait(refusals, refused.error.retry_after)
            out_of_time = refusals >= policy.max_refusals or waited + delay > policy.max_time
            if policy.fallback is not None and (refusals >= policy.fallback or out_of_time):
                if current is job:
                    on_fallback()
                current = at_default_tier(job)  # at once: that tier is not the one full
            elif out_of_time:
                raise FlexExhausted(refused.error, attempts) from None
            else:
                waited += delay
                await wait(delay)
            on_retry()
            continue
        return reply, attempts + tries
