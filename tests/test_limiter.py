"""The shared limiter, on virtual time: caps, buckets, 429 back-off, headers."""

from __future__ import annotations

import anyio
import pytest
from anyio.lowlevel import checkpoint

from pipeline.limiter import MAX_PAUSE, Limits, Permit, RateLimiter, TokenBucket, parse_reset
from tests.conftest import FakeClock

pytestmark = pytest.mark.anyio


async def wait_all_tasks_blocked() -> None:
    """Let every started task run until it blocks (anyio's own helper is trio-only)."""
    for _ in range(200):
        await checkpoint()


async def admit_times(limiter: RateLimiter, clock: FakeClock, n: int) -> list[float]:
    """Acquire and immediately release n permits in sequence; return admission times."""
    times = []
    for _ in range(n):
        permit = await limiter.acquire()
        times.append(clock.now)
        limiter.release(permit)
    return times


async def test_rpm_has_no_burst_above_one_second_at_start(clock: FakeClock) -> None:
    limiter = RateLimiter(Limits(100, rpm=600), clock=clock, sleep=clock.sleep)  # 10/s
    times = await admit_times(limiter, clock, 40)
    assert sum(1 for t in times if t < clock.now - 0 and t <= times[0]) == 10  # one burst
    for start in times:  # no window of one second holds more than a burst + 10/s
        assert sum(1 for t in times if start <= t < start + 1.0) <= 20
    assert times[-1] - times[0] == pytest.approx(3.0, abs=0.05)


async def test_in_flight_cap_is_never_exceeded(clock: FakeClock) -> None:
    limiter = RateLimiter(Limits(4), clock=clock, sleep=clock.sleep)
    peak = 0
    answered = anyio.Event()

    async def one() -> None:
        nonlocal peak
        permit = await limiter.acquire()
        peak = max(peak, limiter.in_flight)
        await answered.wait()
        limiter.release(permit)

    async with anyio.create_task_group() as tg:
        for _ in range(50):
            tg.start_soon(one)
        await wait_all_tasks_blocked()
        assert limiter.in_flight == 4
        answered.set()
    assert peak == 4 and limiter.in_flight == 0


async def overload(limiter: RateLimiter, retry_after: float | None = None) -> None:
    """Ten answers, then ten 429s, within a second: the run is over the server's limit."""
    permits = [await limiter.acquire() for _ in range(20)]
    for p in permits[:10]:
        limiter.release(p)
    for p in permits[10:]:
        limiter.release(p, rate_limited=True, retry_after=retry_after)


async def test_429_storm_cuts_concurrency_once_per_burst_then_recovers(clock: FakeClock) -> None:
    limiter = RateLimiter(Limits(32), clock=clock, sleep=clock.sleep)
    await overload(limiter)  # ten 429s from one burst cut once
    assert limiter.rate_limited == 10
    assert limiter.limit == pytest.approx(32 * 0.7)
    clock.now += 5
    await admit_times(limiter, clock, 2000)
    assert limiter.limit == 32


async def test_429_storm_without_rpm_learns_the_rate_that_got_through(clock: FakeClock) -> None:
    limiter = RateLimiter(Limits(64), clock=clock, sleep=clock.sleep)
    assert limiter.rpm is None
    await overload(limiter)  # 10 answers got through within the first second
    assert limiter.rpm == pytest.approx(10 * 60)


async def test_429s_before_any_answer_cut_only_the_in_flight_cap(clock: FakeClock) -> None:
    limiter = RateLimiter(Limits(64), clock=clock, sleep=clock.sleep)
    permits = [await limiter.acquire() for _ in range(12)]
    for p in permits:
        limiter.release(p, rate_limited=True)
    assert limiter.rpm is None and limiter.limit == pytest.approx(64 * 0.7)


async def test_a_lone_429_slows_only_its_row(clock: FakeClock) -> None:
    limiter = RateLimiter(Limits(64), clock=clock, sleep=clock.sleep)
    await admit_times(limiter, clock, 40)
    permit = await limiter.acquire()
    limiter.release(permit, rate_limited=True, retry_after=30.0)
    assert limiter.rate_limited == 1
    assert (limiter.limit, limiter.rpm, limiter.paused_until) == (64, None, 0.0)


async def test_retry_after_pauses_everyone(clock: FakeClock) -> None:
    limiter = RateLimiter(Limits(32, rpm=6000), clock=clock, sleep=clock.sleep)
    start = clock.now
    await overload(limiter, retry_after=7.0)
    await limiter.acquire()
    assert clock.now - start >= 7.0


async def test_absurd_retry_after_is_capped(clock: FakeClock) -> None:
    limiter = RateLimiter(Limits(32), clock=clock, sleep=clock.sleep)
    start = clock.now
    await overload(limiter, retry_after=10**8)
    await limiter.acquire()
    assert clock.now - start <= MAX_PAUSE + 1


async def test_ratelimit_headers_set_the_pace_and_pause(clock: FakeClock) -> None:
    limiter = RateLimiter(Limits(64), clock=clock, sleep=clock.sleep)
    permit = await limiter.acquire()
    limiter.release(permit, headers={"x-ratelimit-limit-requests": "1200"})
    assert 1200 * 0.97 <= (limiter.rpm or 0) <= 1200
    permit = await limiter.acquire()
    start = clock.now
    limiter.release(
        permit,
        headers={"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "6m0s"},
    )
    await limiter.acquire()
    assert clock.now - start == pytest.approx(360.0 if MAX_PAUSE >= 360 else MAX_PAUSE)


async def test_user_rpm_is_a_ceiling_for_learned_rates(clock: FakeClock) -> None:
    limiter = RateLimiter(Limits(64, rpm=300), clock=clock, sleep=clock.sleep)
    permit = await limiter.acquire()
    limiter.release(permit, headers={"x-ratelimit-limit-requests": "100000"})
    assert limiter.rpm == pytest.approx(300)


async def test_tokens_per_minute_reconciles_with_usage(clock: FakeClock) -> None:
    limiter = RateLimiter(Limits(64, tpm=6000), clock=clock, sleep=clock.sleep)  # 100 tokens/s
    permit = await limiter.acquire(100)
    limiter.release(permit, used_tokens=10)  # the estimate was 10x too high: refund 90
    start = clock.now
    await limiter.acquire(90)
    assert clock.now == start, "refunded tokens should be spendable at once"


def test_token_bucket_large_request_waits_for_full_bucket_not_forever() -> None:
    bucket = TokenBucket(rate=10, capacity=10, now=0)
    bucket.spend(10)
    assert bucket.wait_for(1000, now=0) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("1s", 1.0), ("6m0s", 360.0), ("12ms", 0.012), ("1h2m3s", 3723.0), ("2.5", 2.5)],
)
def test_parse_reset(text: str, seconds: float) -> None:
    assert parse_reset(text) == pytest.approx(seconds)


def test_parse_reset_garbage() -> None:
    assert parse_reset("soon") is None and parse_reset(None) is None


# ------------------------------------------------------------------ set_share / start_empty
# A Ray worker's limiter takes its share of the job's limits from the coordinator on
# every heartbeat; the share changes while requests are in flight and waiting.


async def admitted_within(limiter: RateLimiter, clock: FakeClock, seconds: float) -> int:
    """Acquire and release back to back for ``seconds`` of virtual time; count admissions."""
    start, count = clock.now, 0
    while True:
        permit = await limiter.acquire()
        if clock.now >= start + seconds:
            limiter.release(permit)
            return count
        count += 1
        limiter.release(permit)


async def test_share_lowering_concurrency_caps_in_flight_at_the_new_value(
    clock: FakeClock,
) -> None:
    limiter = RateLimiter(Limits(8), clock=clock, sleep=clock.sleep)
    held = [await limiter.acquire() for _ in range(8)]
    limiter.set_share(Limits(3, None, None), workers=3)
    admitted, peak = 0, 0
    answered = anyio.Event()

    async def one() -> None:
        nonlocal admitted, peak
        permit = await limiter.acquire()
        admitted += 1
        peak = max(peak, limiter.in_flight)
        await answered.wait()
        limiter.release(permit)

    async with anyio.create_task_group() as tg:
        for _ in range(10):
            tg.start_soon(one)
        await wait_all_tasks_blocked()
        assert admitted == 0
        for permit in held[:5]:  # 3 still in flight: at the new cap, nobody gets in
            limiter.release(permit)
        await wait_all_tasks_blocked()
        assert admitted == 0
        for permit in held[5:]:
            limiter.release(permit)
        await wait_all_tasks_blocked()
        assert (admitted, limiter.in_flight) == (3, 3)
        answered.set()
    assert (admitted, peak, limiter.in_flight) == (10, 3, 0)


async def test_share_raising_concurrency_lets_waiting_acquirers_in(clock: FakeClock) -> None:
    limiter = RateLimiter(Limits(2), clock=clock, sleep=clock.sleep)
    for _ in range(2):
        await limiter.acquire()  # held for the whole test
    admitted: list[Permit] = []

    async def one() -> None:
        admitted.append(await limiter.acquire())

    async with anyio.create_task_group() as tg:
        for _ in range(5):
            tg.start_soon(one)
        await wait_all_tasks_blocked()
        assert limiter.in_flight == 2
        limiter.set_share(Limits(5, None, None))  # the other worker finished: the whole limit
        await wait_all_tasks_blocked()
        tg.cancel_scope.cancel()  # nothing is released: the rest would wait forever
    assert (len(admitted), limiter.in_flight) == (3, 5)


async def test_share_of_rpm_halves_the_admitted_rate(clock: FakeClock) -> None:
    limiter = RateLimiter(Limits(100, rpm=600), clock=clock, sleep=clock.sleep)

    limiter.set_share(Limits(100, 300, None), workers=2)

    assert limiter.rpm == pytest.approx(300)
    admitted = await admitted_within(limiter, clock, 60.0)
    assert 300 <= admitted <= 300 + 5  # 5/s for a minute, and at most one 1 s burst


async def test_share_of_tpm_paces_tokens_and_none_lifts_it(clock: FakeClock) -> None:
    limiter = RateLimiter(Limits(100, tpm=6000), clock=clock, sleep=clock.sleep)
    limiter.set_share(Limits(100, None, 3000), workers=2)  # 50 tokens/s
    start = clock.now
    for _ in range(11):  # the first one is the bucket's burst
        limiter.release(await limiter.acquire(50), used_tokens=50)
    assert clock.now - start == pytest.approx(10.0)

    limiter.set_share(Limits(100, None, None))
    start = clock.now
    for _ in range(100):
        limiter.release(await limiter.acquire(50), used_tokens=50)
    assert clock.now == start


async def test_share_keeps_a_rate_learned_from_429s_under_the_new_ceiling(
    clock: FakeClock,
) -> None:
    limiter = RateLimiter(Limits(64, rpm=600), clock=clock, sleep=clock.sleep)
    await overload(limiter)
    cut = limiter.rpm
    assert cut is not None and cut < 600

    limiter.set_share(Limits(64, 1200, None), workers=2)  # a bigger share is no reason to speed up
    assert limiter.rpm == pytest.approx(cut)
    limiter.set_share(Limits(64, cut / 2, None), workers=2)  # a smaller share caps what was learned
    assert limiter.rpm == pytest.approx(cut / 2)

    clock.now += 5
    await admit_times(limiter, clock, 500)  # clean answers grow a cut rate...
    assert limiter.rpm == pytest.approx(cut / 2)  # ...up to the share, not past it


async def test_share_going_down_and_up_again_does_not_undo_a_429_cut(clock: FakeClock) -> None:
    limiter = RateLimiter(Limits(64, rpm=600), clock=clock, sleep=clock.sleep)
    await overload(limiter)
    cut = limiter.rpm
    assert cut is not None and cut < 600

    limiter.set_share(Limits(64, cut * 0.7, None), workers=2)  # the coordinator cuts every share
    limiter.set_share(Limits(64, 600, None), workers=2)  # and gives it back, 429s or not

    assert (limiter.rpm or 0) <= cut + 1e-6


async def test_share_going_down_and_up_again_keeps_a_429_cut_of_concurrency(
    clock: FakeClock,
) -> None:
    limiter = RateLimiter(Limits(64, rpm=600), clock=clock, sleep=clock.sleep)
    await overload(limiter)
    cut = limiter.limit
    assert cut < 64

    limiter.set_share(Limits(int(cut) // 2, 600, None), workers=2)
    assert limiter.limit == int(cut) // 2
    limiter.set_share(Limits(64, 600, None), workers=2)

    assert limiter.limit == cut, "a bigger share must not undo what the 429s taught"


@pytest.mark.parametrize("header_first", [False, True])
async def test_server_stated_rpm_is_divided_among_workers(
    clock: FakeClock, header_first: bool
) -> None:
    """x-ratelimit-limit-requests is the job's limit (one key), not this worker's."""
    limiter = RateLimiter(Limits(64), clock=clock, sleep=clock.sleep)
    if not header_first:
        limiter.set_share(Limits(64, None, None), workers=2)
    permit = await limiter.acquire()
    limiter.release(permit, headers={"x-ratelimit-limit-requests": "600"})
    if header_first:
        assert limiter.rpm == pytest.approx(600 * 0.98)
        limiter.set_share(Limits(64, None, None), workers=2)

    assert limiter.rpm == pytest.approx(600 * 0.98 / 2)
    admitted = await admitted_within(limiter, clock, 60.0)
    assert admitted == pytest.approx(294, abs=3)  # 4.9/s for a minute


async def test_start_empty_means_no_burst_at_start(clock: FakeClock) -> None:
    """A worker taking its next split joins others already at the limit."""
    full = RateLimiter(Limits(4, rpm=60), clock=clock, sleep=clock.sleep)
    start = clock.now
    full.release(await full.acquire())
    assert clock.now == start  # a fresh limiter spends its one-second burst at once

    empty = RateLimiter(Limits(4, rpm=60), clock=clock, sleep=clock.sleep)
    empty.start_empty()
    start = clock.now
    empty.release(await empty.acquire())
    assert clock.now - start == pytest.approx(1.0)  # one request a second, from nothing

    tokens = RateLimiter(Limits(4, tpm=600), clock=clock, sleep=clock.sleep)
    tokens.start_empty()
    start = clock.now
    tokens.release(await tokens.acquire(5), used_tokens=5)
    assert clock.now - start == pytest.approx(0.5)  # 5 tokens at 10/s, from nothing


async def test_start_empty_without_rates_changes_nothing(clock: FakeClock) -> None:
    limiter = RateLimiter(Limits(4), clock=clock, sleep=clock.sleep)
    limiter.start_empty()
    start = clock.now

    times = await admit_times(limiter, clock, 100)

    assert times[-1] == start and limiter.rpm is None


async def test_a_free_slot_with_no_bucket_is_taken_without_the_gate(
    clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only --concurrency, a slot free, nobody queued: admitted on the spot (the gate
    and its checkpoint cost ~1% of the event loop per request); a full cap, a pause or
    a bucket still go through the gate, first come, first served."""
    limiter = RateLimiter(Limits(2), clock=clock, sleep=clock.sleep)
    gate_used: list[bool] = []
    real = type(limiter._gate).__aenter__

    async def spy(self: object) -> None:
        gate_used.append(True)
        await real(self)  # type: ignore[arg-type]

    monkeypatch.setattr(type(limiter._gate), "__aenter__", spy)
    first, second = await limiter.acquire(), await limiter.acquire()
    assert limiter.in_flight == 2 and not gate_used
    async with anyio.create_task_group() as tg:
        tg.start_soon(limiter.acquire)  # the cap is reached: it queues at the gate
        await wait_all_tasks_blocked()
        assert gate_used and limiter.in_flight == 2
        limiter.release(first)
    assert limiter.in_flight == 2
    limiter.release(second)
    limiter.paused_until = clock.now + 5.0  # a pause: the gate again, and the wait
    gate_used.clear()
    permit = await limiter.acquire()
    assert gate_used and clock.now >= limiter.paused_until
    limiter.release(permit)
