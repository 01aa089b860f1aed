"""One limiter shared by every task: in-flight cap, requests/min, tokens/min, and back-off.

Why one object: when 429s pile up, the *gateway* is full, not one row unlucky, so
the whole run must slow down; retrying each row on its own burns every attempt on
429s while the others keep the gateway full. The limiter therefore keeps

- a cap on requests in flight, lowered when 429s pile up (multiplicative decrease)
  and raised again one step per clean round (additive increase);
- a requests/min token bucket, at the user's ``--rpm``, or at the rate the server
  states in ``x-ratelimit-limit-requests``, or, when neither is known, at a rate
  learned from the 429s themselves (start unlimited, cut to what actually got
  through, creep back up);
- a tokens/min bucket charged before the call with the prompt estimate plus the
  completion: the row's ``max_tokens`` when it sets one (what OpenAI counts), else
  the running mean of this run's completions (a whole bucket before the first
  answer); it is corrected with the reported usage after the call. Charging the prompt alone
  let the first full bucket go out at about twice the token rate: a burst of 429s
  at the start of every run;
- a pause for everyone for the server's ``Retry-After`` when the run is overloading
  it, and until ``x-ratelimit-reset-*`` when the server says nothing is left. A lone
  429 only makes its own row wait (the retry policy honours ``Retry-After``).

Waiters are served first come, first served: the head of the queue holds ``_gate``
while it waits, so a big request is not starved by small ones behind it. Time comes
from an injected clock and sleep, so tests drive it without sleeping.
"""

from __future__ import annotations

import math
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import anyio


class TokenBucket:
    """A bucket of ``rate`` per second, holding at most ``capacity``; it may go into debt."""

    __slots__ = ("rate", "capacity", "level", "_stamp")

    def __init__(self, rate: float, capacity: float, now: float) -> None:
        self.rate = rate  # refill, units per second
        self.capacity = capacity  # most that can be spent at once (the burst)
        self.level = capacity  # start full: one burst's worth, never more
        self._stamp = now  # clock time of the last refill

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self._stamp) * self.rate)
        self._stamp = now

    def wait_for(self, amount: float, now: float) -> float:
        """Seconds until ``amount`` can be spent (0 if now). Large amounts wait for a
        full bucket instead of forever."""
        self.refill(now)
        need = min(amount, self.capacity)
        if self.level >= need - 1e-9:  # float refills land a hair short of whole tokens
            return 0.0
        return (need - self.level) / self.rate

    def spend(self, amount: float) -> None:
        self.level -= amount

    def set_rate(self, rate: float, burst_seconds: float, now: float) -> None:
        self.refill(now)
        self.rate = rate
        self.capacity = max(1.0, rate * burst_seconds)
        self.level = min(self.level, self.capacity)


@dataclass(slots=True)
class Permit:
    """Proof of admission; hand it back to ``release``."""

    estimated_tokens: int


MAX_PAUSE = 300.0  # seconds: the longest run-wide pause a server's word can cause
OUTCOME_WINDOW = 5.0  # seconds of answers the overload share is measured over
OVERLOAD_SHARE = 0.10  # share of 429s among recent answers that means "we are too fast"
MIN_RATE = 0.2  # requests/s: the slowest a learned rate goes
MIN_EVIDENCE = 10  # answers in the window before their 429 share means anything
OVERLOAD_CUT = 0.7  # in-flight cap (and, job-wide, every share) times this on overload
COMPLETION_SMOOTHING = 0.1  # weight of each new answer in the running completion mean

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_reset(value: str | None) -> float | None:
    """Seconds in an ``x-ratelimit-reset-*`` value: ``1s``, ``6m0s``, ``12ms`` or a number."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if math.isfinite(seconds) else None
    parts = _DURATION.findall(value)
    if not parts:
        return None
    return sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)


def _header_int(headers: Mapping[str, str], name: str) -> int | None:
    value = headers.get(name)
    if value is None:
        return None
    try:
        number = int(float(value))
    except (ValueError, OverflowError):  # text, or inf / 1e400 from a hostile server
        return None
    return number if number >= 0 else None  # some deployments send -1 for "no limit"


@dataclass(frozen=True, slots=True)
class Limits:
    """The traffic a job may send, as the user set it.

    ``concurrency`` requests in flight at most (64 by default: enough to keep a
    gateway with one-second answers at about 60 req/s, few enough that a server
    with a small pool does not queue them all); ``rpm`` requests and ``tpm`` tokens
    per minute (None: no limit of ours, and the server's 429s and rate-limit
    headers still slow the run down). They describe the whole job: a process that
    runs one of ``N`` parts (a ``--shard``, a Ray worker) takes ``share(N)``, since
    N processes at the full rate would reach the gateway N times too fast.
    """

    concurrency: int = 64
    rpm: float | None = None
    tpm: float | None = None

    def share(self, parts: int) -> Limits:
        """One of ``parts`` equal shares (at least one request in flight)."""
        if parts <= 1:
            return self
        return Limits(
            max(1, self.concurrency // parts),
            self.rpm / parts if self.rpm else None,
            self.tpm / parts if self.tpm else None,
        )


class RateLimiter:
    """Admission control for the whole run. See the module docstring for the rules."""

    def __init__(
        self,
        limits: Limits = Limits(),
        *,
        workers: int = 1,
        adaptive: bool = True,
        burst_seconds: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
    ) -> None:
        concurrency, rpm, tpm = limits.concurrency, limits.rpm, limits.tpm
        now = clock()
        self.max_concurrency = max(1, concurrency)  # the user's cap; never exceeded
        self.limit = float(self.max_concurrency)  # the adaptive cap, <= max_concurrency
        self.in_flight = 0
        self.user_rpm = rpm  # what the user allowed; learned rates never go above it
        self.burst_seconds = burst_seconds
        self.adaptive = adaptive
        self._requests = self._bucket(rpm, now)
        self._tokens = self._bucket(tpm, now)
        self.paused_until = 0.0  # nobody is admitted before this clock time
        self.rate_limited = 0  # 429s seen, for progress and reports
        self._last_cut = -math.inf  # clock time of the last decrease, to cut once per burst
        self._clean_since_cut = 0  # successes since then, for the additive increase
        self._outcomes: deque[tuple[float, bool]] = deque()  # (time, was 429), last few seconds
        self._window_total = 0  # answers in _outcomes
        self._window_limited = 0  # 429s in _outcomes
        self._server_rpm_stated: float | None = None  # x-ratelimit-limit-requests as sent
        self._learned_rate: float | None = None  # req/s a 429 cut set, until back at ceiling
        self._learned_limit: float | None = None  # in-flight cap a cut set, until back at max
        self.workers = max(1, workers)  # processes sharing the server's stated limit
        self._last_growth = now  # clock time the learned rate last grew
        self._completion_mean: float | None = None  # tokens per answer, running mean
        self._clock = clock
        self._sleep = sleep
        # No yield when nobody holds it: with 1,500 workers starting at once, the forced
        # yield of a plain Lock made each acquire queue behind all the others
        # (~5% of the event loop while the first wave goes out; ~2% with this).
        self._gate = anyio.Lock(fast_acquire=True)
        self._freed = anyio.Event()

    def set_share(self, share: Limits, *, workers: int = 1) -> None:
        """Take this process's share of limits that hold for a whole job (a Ray worker
        whose share changes as workers come and go).

        The new caps apply at once; what was learned from 429s stays (a learned rate
        above the new ceiling is lowered to it). ``workers`` divides the limit a
        server states in its headers, which is the job's limit too, not ours alone.
        """
        concurrency, rpm, tpm = share.concurrency, share.rpm, share.tpm
        now = self._clock()
        self.workers = max(1, workers)
        self.max_concurrency = max(1, concurrency)
        learned = self._learned_limit
        self.limit = (
            float(self.max_concurrency)
            if learned is None
            else min(learned, float(self.max_concurrency))
        )
        self.user_rpm = rpm
        ceiling = self._ceiling
        # A rate learned from 429s stays as learned (capped by the new ceiling, and
        # remembered, so a later, bigger share does not undo it); else follow the share.
        target = ceiling if self._learned_rate is None else min(ceiling, self._learned_rate)
        if not math.isfinite(target):
            self._requests = None
        elif self._requests is None:
            self._requests = self._bucket(target * 60.0, now)
        elif target != self._requests.rate:
            self._requests.set_rate(target, self.burst_seconds, now)
        if tpm:
            if self._tokens is None:
                self._tokens = self._bucket(tpm, now)
            else:
                self._tokens.set_rate(tpm / 60.0, self.burst_seconds, now)
        else:
            self._tokens = None
        if self.in_flight < int(self.limit):
            self._freed.set()

    def start_empty(self) -> None:
        """No burst at the start: for a process that joins a job already running at the
        limit (a Ray worker taking its next split), a full bucket would be a burst on
        top of the others' steady pace."""
        for bucket in (self._requests, self._tokens):
            if bucket is not None:
                bucket.level = 0.0

    def _bucket(self, per_minute: float | None, now: float) -> TokenBucket | None:
        if not per_minute:
            return None
        rate = per_minute / 60.0
        return TokenBucket(rate, max(1.0, rate * self.burst_seconds), now)

    @property
    def rpm(self) -> float | None:
        """The requests/min now in force (None: no rate limit, only the in-flight cap)."""
        return self._requests.rate * 60.0 if self._requests else None

    def expected_tokens(self, prompt_tokens: int, ceiling: int | None) -> int:
        """What admission charges the tokens/min bucket for one request: its prompt
        plus its completion ceiling when the row sets one (servers such as OpenAI's
        count ``max_tokens`` against the limit when the request arrives), else the
        running mean of this run's completions. Before the first answer nothing is
        known: a whole bucket is charged, so the first requests go one bucket apart
        until an answer says what completions cost (a guess could be 10x short).
        The release corrects the charge with the reported usage."""
        tokens = self._tokens
        if tokens is None:
            return prompt_tokens  # no --tpm: the charge is never spent
        if ceiling is not None:
            return prompt_tokens + ceiling
        mean = self._completion_mean
        if mean is None:
            return prompt_tokens + math.ceil(tokens.capacity)
        return prompt_tokens + math.ceil(mean)

    async def acquire(self, estimated_tokens: int = 0) -> Permit:
        # The common case, decided without the gate: nobody queued (whoever waits holds
        # the gate), a free slot, no rate bucket to charge, no pause. Taking the gate
        # and its checkpoint for it was ~1% of the event loop at zero latency.
        if (
            self._requests is None
            and self._tokens is None
            and self.in_flight < int(self.limit)
            and not self._gate.locked()
            and (not self.paused_until or self.paused_until <= self._clock())
        ):
            self.in_flight += 1
            return Permit(estimated_tokens)
        async with self._gate:
            while True:
                now = self._clock()
                if self.in_flight >= int(self.limit):
                    self._freed = anyio.Event() if self._freed.is_set() else self._freed
                    await self._freed.wait()
                    continue
                wait = max(0.0, self.paused_until - now)
                if self._requests is not None:
                    wait = max(wait, self._requests.wait_for(1, now))
                if self._tokens is not None and estimated_tokens:
                    wait = max(wait, self._tokens.wait_for(estimated_tokens, now))
                if wait <= 0:
                    break
                await self._sleep(wait)
            if self._requests is not None:
                self._requests.spend(1)
            if self._tokens is not None:
                self._tokens.spend(estimated_tokens)
            self.in_flight += 1
            return Permit(estimated_tokens)

    def release(
        self,
        permit: Permit,
        *,
        used_tokens: int | None = None,
        completion_tokens: int | None = None,
        rate_limited: bool = False,
        retry_after: float | None = None,
        headers: Mapping[str, str] | None = None,
        answered: bool = True,
    ) -> None:
        """Hand back a permit, telling the limiter what the server said.

        ``answered=False`` means the request never got an answer that says anything
        about the server's load (it was cancelled, or the connection failed).
        """
        self.in_flight -= 1
        now = self._clock()
        if self._tokens is not None and used_tokens is not None:
            self._tokens.refill(now)
            self._tokens.level += permit.estimated_tokens - used_tokens
            if completion_tokens is not None:
                mean = self._completion_mean
                self._completion_mean = (
                    float(completion_tokens)
                    if mean is None
                    else mean + COMPLETION_SMOOTHING * (completion_tokens - mean)
                )
        if headers:
            self._learn_from_headers(headers, now)
        if answered:
            self._note_outcome(now, rate_limited)
            if rate_limited:
                self._on_rate_limited(now, retry_after)
            else:
                self._on_success(now)
        self._freed.set()

    def _note_outcome(self, now: float, rate_limited: bool) -> None:
        window = self._outcomes
        window.append((now, rate_limited))
        self._window_total += 1
        self._window_limited += rate_limited
        while window and window[0][0] < now - OUTCOME_WINDOW:
            _, was_limited = window.popleft()
            self._window_total -= 1
            self._window_limited -= was_limited

    def _on_rate_limited(self, now: float, retry_after: float | None) -> None:
        """Slow the whole run down, but only on evidence that the run itself is too fast.

        A 429 now and then (a shared gateway's hiccup, another client's burst) is
        retried by its row after the server's ``Retry-After``; cutting the whole run
        for each would let random 429s grind it to a halt. When at least
        ``OVERLOAD_SHARE`` of recent answers are 429s, the run is over the limit:
        cut concurrency and rate to what the server actually took, and hold everyone
        for the server's ``Retry-After``.
        """
        self.rate_limited += 1
        if not self.adaptive:
            return
        total, limited = self._window_total, self._window_limited
        if total < MIN_EVIDENCE or limited / total < OVERLOAD_SHARE:
            return
        if now - self._last_cut < 1.0:  # what is in flight was sent at the old pace
            return
        self._last_cut = now
        self._clean_since_cut = 0
        self.limit = max(1.0, self.limit * OVERLOAD_CUT)
        self._learned_limit = self.limit
        current = self._requests.rate if self._requests else math.inf
        accepted = total - limited
        if accepted >= 5:  # enough answers to measure what the server takes per second
            span = max(1.0, now - self._outcomes[0][0])
            self._set_rate(max(MIN_RATE, min(current * 0.8, accepted / span)), now)
        elif math.isfinite(current):
            self._set_rate(max(MIN_RATE, current * 0.5), now)
        # else: nothing measured yet; the in-flight cut slows us until the next look
        if self._requests is not None:
            self._learned_rate = self._requests.rate
        if retry_after:
            self.paused_until = max(self.paused_until, now + min(retry_after, MAX_PAUSE))

    def _on_success(self, now: float) -> None:
        if not self.adaptive:
            return
        self._clean_since_cut += 1
        if self.limit < self.max_concurrency and self._clean_since_cut >= int(self.limit):
            self.limit = min(float(self.max_concurrency), self.limit + 1.0)
            self._clean_since_cut = 0
            self._learned_limit = None if self.limit >= self.max_concurrency else self.limit
        # A cut rate grows back by 25% + 0.5 req/s per second without a cut, up to the
        # ceiling: fast enough to recover in seconds, slow enough to find the edge.
        if self._requests is not None and now - self._last_cut > 1.0:
            rate = self._requests.rate
            ceiling = self._ceiling
            dt = min(1.0, now - self._last_growth)
            if rate < ceiling and dt > 0:
                grown = min(ceiling, rate + (0.25 * rate + 0.5) * dt)
                self._set_rate(grown, now)
                self._learned_rate = None if grown >= ceiling else grown
        self._last_growth = now

    @property
    def _server_rpm(self) -> float | None:
        """Our pace under the limit the server states: a little under it (our sends
        reach it with jitter), and our share of it when workers share one key."""
        if self._server_rpm_stated is None:
            return None
        return self._server_rpm_stated * 0.98 / self.workers

    @property
    def _ceiling(self) -> float:
        """The fastest the run may go: the user's --rpm, else what the server stated."""
        ceilings = [c for c in (self.user_rpm, self._server_rpm) if c]
        return min(ceilings) / 60.0 if ceilings else math.inf

    def _set_rate(self, per_second: float, now: float) -> None:
        if self._requests is None:
            cap = max(1.0, per_second * self.burst_seconds)
            self._requests = TokenBucket(per_second, cap, now)
            self._requests.level = 0.0  # just got a 429: no burst on top of it
        else:
            self._requests.set_rate(per_second, self.burst_seconds, now)

    def _learn_from_headers(self, headers: Mapping[str, str], now: float) -> None:
        """Use ``x-ratelimit-*`` when the server sends them: the truth beats a guess."""
        limit = _header_int(headers, "x-ratelimit-limit-requests")
        if limit and self.adaptive:
            # Aim a little under the stated limit: our sends reach the server with jitter.
            if self._server_rpm_stated is None:
                # The first word from the server: what was sent before it was a guess,
                # so its 429s should not also cut the rate.
                self._last_cut = now
            self._server_rpm_stated = float(limit)
            target = self._ceiling
            if self._requests is None or self._requests.rate > target:
                self._set_rate(target, now)
        remaining = _header_int(headers, "x-ratelimit-remaining-requests")
        if remaining == 0:
            reset = parse_reset(headers.get("x-ratelimit-reset-requests"))
            if reset:
                self.paused_until = max(self.paused_until, now + min(reset, MAX_PAUSE))
        remaining_tokens = _header_int(headers, "x-ratelimit-remaining-tokens")
        if remaining_tokens == 0:
            reset = parse_reset(headers.get("x-ratelimit-reset-tokens"))
            if reset:
                self.paused_until = max(self.paused_until, now + min(reset, MAX_PAUSE))
