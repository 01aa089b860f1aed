"""Server-side rate limits: rpm/tpm token buckets and the headers that announce them.

The product's limiter has to learn a gateway's limits from its answers, so the
simulator enforces real ones and says so the way OpenAI does: ``x-ratelimit-*`` headers
(reset times as Go durations) on every admitted answer, and a 429 with ``Retry-After``
in one of the styles gateways use (seconds, ``retry-after-ms``, an HTTP date, or none).
Time is whatever clock the caller passes, so tests never wait for a bucket to refill.
"""

from __future__ import annotations

import email.utils
import math
from collections.abc import Callable


class Bucket:
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
        """``x-ratelimit-{limit,remaining,reset}-<kind>`` as of the last refill."""
        full_in = (self.capacity - self.level) / self.rate
        return {
            f"x-ratelimit-limit-{kind}": str(self.limit),
            f"x-ratelimit-remaining-{kind}": str(max(0, int(self.level))),
            f"x-ratelimit-reset-{kind}": go_duration(full_in),
        }


class RateLimits:
    """The rpm and tpm buckets of one server (either may be absent)."""

    def __init__(
        self,
        rpm_limit: int | None,
        tpm_limit: int | None,
        burst_seconds: float,
        now: float,
        *,
        send_headers: bool,
    ) -> None:
        self._rpm = Bucket(rpm_limit, burst_seconds, now) if rpm_limit else None
        self._tpm = Bucket(tpm_limit, burst_seconds, now) if tpm_limit else None
        self._send_headers = send_headers

    @property
    def active(self) -> bool:
        """Whether any limit is configured at all."""
        return self._rpm is not None or self._tpm is not None

    def admit(self, cost: int, now: float) -> float:
        """Take one request and ``cost`` tokens and return 0, or take nothing and return
        the seconds until both buckets could give them."""
        wait = 0.0
        if self._rpm is not None:
            wait = self._rpm.wait_for(1, now)
        if self._tpm is not None:
            wait = max(wait, self._tpm.wait_for(cost, now))
        if wait > 0:
            return wait
        if self._rpm is not None:
            self._rpm.level -= 1
        if self._tpm is not None:
            self._tpm.level -= cost
        return 0.0

    def headers(self) -> dict[str, str]:
        """The ``x-ratelimit-*`` headers, or none when they are switched off."""
        headers: dict[str, str] = {}
        if self._send_headers:
            if self._rpm is not None:
                headers.update(self._rpm.headers("requests"))
            if self._tpm is not None:
                headers.update(self._tpm.headers("tokens"))
        return headers


def retry_after_headers(style: str, wait: float, wall_clock: Callable[[], float]) -> dict[str, str]:
    """How a 429 says "come back in ``wait`` seconds", in the configured style."""
    if style == "seconds":
        return {"retry-after": str(max(1, math.ceil(wait)))}
    if style == "ms":
        return {"retry-after-ms": str(max(1, math.ceil(wait * 1000)))}
    if style == "date":
        return {"retry-after": email.utils.formatdate(math.ceil(wall_clock() + wait), usegmt=True)}
    return {}


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
