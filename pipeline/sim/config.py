"""The simulator's knobs, checked once when they are set.

A run's ``[sim]`` table, ``--sim key=value`` and ``pipeline sim --set key=value`` all end
up as keyword arguments here, so an impossible setting (a rate above 1, a zero limit, an
unknown Retry-After style) fails before any request is answered instead of misbehaving
halfway through a benchmark.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

RETRY_AFTER_STYLES = ("seconds", "ms", "date", "none")
SERVICE_TIERS = ("auto", "default", "flex", "priority")


@dataclass
class SimConfig:
    """The simulator's knobs. Rates are probabilities per request, drawn from ``seed``.

    Latency and fault rates are read on every request, so a test may change them on a
    running simulator; limits, quota, key and models are fixed when it is built.
    """

    latency_ms: float = 0.0
    # Pad every text answer to at least this many characters (its tokens counted as
    # usual): long answers, as a reasoning model writes, for memory benchmarks.
    answer_chars: int = 0
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
    # Service tiers on chat completions: which ``service_tier`` values are accepted (any
    # other is a 400 naming the parameter), the share of ``flex`` requests refused for
    # capacity (429 ``resource_unavailable``), and the seconds such a refusal asks to wait.
    tiers: tuple[str, ...] = SERVICE_TIERS
    flex_refusal_rate: float = 0.0
    flex_retry_after: float = 1.0
    # The Files and Batches APIs. A batch takes ``batch_seconds`` from create to its end
    # (validating the first 10%, finalizing the last 10%; 0 = ended at the first
    # retrieve). ``batch_expire_share`` of its lines (drawn from ``seed`` and the
    # custom_id; each custom_id at most once) never finish, so it ends ``expired``. A
    # create whose prompt tokens plus those of the open batches pass
    # ``batch_enqueued_token_limit`` ends ``failed`` (``token_limit_exceeded``). Request
    # files: at most ``batch_max_lines`` lines and ``batch_max_file_bytes`` bytes (a
    # bigger upload is a 413). ``state_dir`` keeps files, batches and the batch ledger on
    # disk so a later process sees them; None = in memory.
    batch_seconds: float = 2.0
    batch_expire_share: float = 0.0
    batch_enqueued_token_limit: int | None = None
    batch_max_lines: int = 50_000
    batch_max_file_bytes: int = 200 * 2**20
    state_dir: str | None = None

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
        # ``--set tiers=[...]`` arrives as a JSON list; keep the field a tuple of strings.
        if isinstance(self.tiers, str) or not all(isinstance(t, str) for t in self.tiers):
            raise ValueError("tiers must be a list of tier names")
        self.tiers = tuple(self.tiers)
        if not 0.0 <= self.flex_refusal_rate <= 1.0:
            raise ValueError(f"flex_refusal_rate must be within 0..1, got {self.flex_refusal_rate}")
        if self.flex_retry_after < 0:
            raise ValueError("flex_retry_after must not be negative")
        if self.batch_seconds < 0:
            raise ValueError("batch_seconds must not be negative")
        if not 0.0 <= self.batch_expire_share <= 1.0:
            raise ValueError("batch_expire_share must be within 0..1")
        limit = self.batch_enqueued_token_limit
        if limit is not None and limit <= 0:
            raise ValueError("batch_enqueued_token_limit must be positive")
        if self.batch_max_lines <= 0 or self.batch_max_file_bytes <= 0:
            raise ValueError("batch_max_lines and batch_max_file_bytes must be positive")
        if self.state_dir is not None and not isinstance(self.state_dir, str | os.PathLike):
            raise ValueError("state_dir must be a path")
