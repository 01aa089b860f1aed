"""The retry policy with zero real sleeps: what is retried, how often, how long it waits."""

from __future__ import annotations

import pytest

from pipeline.errors import ApiError, ConfigurationError, RequestError, TransportError
from pipeline.retry import gives_up_at_once, retrying

pytestmark = pytest.mark.anyio


class Recorder:
    def __init__(self) -> None:
        self.waits: list[float] = []

    async def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)


async def attempts_until(failures: list[RequestError], max_attempts: int = 3) -> tuple[int, str]:
    """Run a call that raises the given errors in turn, then succeeds."""
    rec = Recorder()
    calls = 0
    async for attempt in retrying(max_attempts, 900, sleep=rec.sleep):
        with attempt:
            calls += 1
            if calls <= len(failures):
                raise failures[calls - 1]
    return calls, "ok"


def rate_limit(retry_after: float | None = None) -> ApiError:
    return ApiError(429, "rate_limit_error", "Rate limit exceeded", retry_after=retry_after)


async def test_429s_do_not_spend_the_rows_attempts() -> None:
    calls, outcome = await attempts_until([rate_limit()] * 10, max_attempts=3)
    assert (calls, outcome) == (11, "ok")


async def test_5xx_gives_up_after_max_attempts() -> None:
    error = ApiError(503, "service_unavailable_error", "busy")
    with pytest.raises(ApiError) as raised:
        await attempts_until([error] * 5, max_attempts=3)
    assert raised.value is error


async def test_transport_errors_are_retried() -> None:
    cut = TransportError("stream_cut", "the stream ended before [DONE]")
    assert await attempts_until([cut, cut]) == (3, "ok")


@pytest.mark.parametrize("status", [400, 404, 413, 422, 401, 402, 403])
async def test_permanent_and_fatal_answers_are_not_retried(status: int) -> None:
    error = ApiError(status, "some_error", "no")
    with pytest.raises(ApiError):
        await attempts_until([error], max_attempts=5)


async def test_quota_as_429_is_not_retried() -> None:
    error = ApiError(429, "insufficient_quota", "You exceeded your current quota")
    with pytest.raises(ApiError):
        await attempts_until([error], max_attempts=5)


async def test_server_retry_after_beats_backoff() -> None:
    rec = Recorder()
    calls = 0
    async for attempt in retrying(3, 900, sleep=rec.sleep):
        with attempt:
            calls += 1
            if calls == 1:
                raise rate_limit(retry_after=12.5)
    assert rec.waits == [12.5]


async def test_backoff_grows_and_is_bounded() -> None:
    rec = Recorder()
    error = ApiError(500, "internal_server_error", "oops")
    with pytest.raises(ApiError):
        async for attempt in retrying(8, 900, sleep=rec.sleep, initial_wait=0.5, max_wait=10):
            with attempt:
                raise error
    assert len(rec.waits) == 7
    assert all(0 <= w <= 10 for w in rec.waits)


@pytest.mark.parametrize(
    "error_type", ["timeout", "response_too_large", "protocol_error", "malformed_response", "tls"]
)
async def test_a_bounded_or_broken_answer_is_retried_like_a_timeout(error_type: str) -> None:
    calls, result = await attempts_until([TransportError(error_type, "x")] * 2)
    assert (calls, result) == (3, "ok")


@pytest.mark.parametrize("error_type", ["redirect", "tls"])
async def test_a_configuration_error_is_never_retried(error_type: str) -> None:
    error = ConfigurationError(error_type, "x")
    with pytest.raises(ConfigurationError):
        await attempts_until([error])
    assert gives_up_at_once(error, 6)
