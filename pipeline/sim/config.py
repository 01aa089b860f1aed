"""The simulator's knobs, checked once when they are set.

A run's ``[sim]`` table, ``--sim key=value`` and ``pipeline sim --set key=value`` all end
up as keyword arguments here, so an impossible setting (a rate above 1, a zero limit, an
unknown Retry-After style) fails before any request is answered instead of misbehaving
halfway through a benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass

RETRY_AFTER_STYLES = ("seconds", "ms", "date", "none")


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
    # Refuse response_format json_schema with llama-cpp-python's 500 (it takes only
    # text / json_object, the latter with a "schema"), to exercise the fallback.
    refuse_json_schema: bool = False
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
        if self.retry_after not in RETRY_AFTER_STYLES:
            raise ValueError("retry_after must be one of seconds, ms, date, none")
