"""The injected misbehaviour: which requests fail, how, and how late answers come.

Retries, failover and resume are only tested if the gateway misbehaves, so each request
draws once from a generator seeded by ``SimConfig.seed``: answer, an injected 429, a
500/502/503, or a dropped connection; an answer then may be truncated (or its stream
cut). Latency and flex refusals have their own generators so changing them does not move
the fault sequence.
Rates are read from the config on every draw, so a test can change them mid-run.
"""

from __future__ import annotations

import random

from pipeline.sim.config import SimConfig

DROP = 0  # fault code: close the connection without answering
INJECTED_RETRY_AFTER = 1.0  # seconds an injected 429 asks the client to wait


class Faults:
    """The seeded draws of one simulator."""

    def __init__(self, seed: int) -> None:
        self._draws = random.Random(seed)
        self._latency = random.Random(f"{seed}:latency")
        self._flex = random.Random(f"{seed}:flex")  # own stream: flex never moves the faults

    def draw(self, cfg: SimConfig) -> int | None:
        """One draw per request: 429, a 5xx status, ``DROP`` or None (answer)."""
        if not (cfg.fail_429_rate or cfg.fail_5xx_rate or cfg.drop_rate):
            return None
        draw = self._draws.random()
        if draw < cfg.fail_429_rate:
            return 429
        if draw < cfg.fail_429_rate + cfg.fail_5xx_rate:
            return self._draws.choice((500, 502, 503))
        if draw < cfg.fail_429_rate + cfg.fail_5xx_rate + cfg.drop_rate:
            return DROP
        return None

    def flex_refused(self, rate: float) -> bool:
        """Whether this ``service_tier=flex`` request is refused for capacity, at ``rate``."""
        return rate > 0 and self._flex.random() < rate

    def breaks(self, rate: float) -> bool:
        """Whether this answer is truncated or cut, at ``rate``."""
        return rate > 0 and self._draws.random() < rate

    def delay_seconds(self, cfg: SimConfig) -> float:
        """The latency of this answer: ``latency_ms`` plus up to ``latency_jitter_ms``."""
        ms = cfg.latency_ms
        if cfg.latency_jitter_ms:
            ms += self._latency.uniform(0.0, cfg.latency_jitter_ms)
        return ms / 1000.0
