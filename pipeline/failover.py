"""Choose a base URL: the first healthy one in the order the user gave.

A base URL that fails (connection error, timeout, 5xx) is benched for a cool-down
that doubles with each consecutive failure, up to a cap; traffic moves to the next
one meanwhile, and the primary gets traffic again as soon as its cool-down ends.
When every URL is benched, the one whose bench ends first is used, so a run never
stalls on its own bookkeeping.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class Endpoints:
    """Ordered base URLs with per-URL health."""

    __slots__ = ("urls", "_bench_until", "_failures", "_clock", "base_cooldown", "max_cooldown")

    def __init__(
        self,
        urls: list[str],
        *,
        clock: Callable[[], float] = time.monotonic,
        base_cooldown: float = 5.0,
        max_cooldown: float = 120.0,
    ) -> None:
        if not urls:
            raise ValueError("at least one base URL is needed")
        self.urls = list(urls)
        self._bench_until = dict.fromkeys(self.urls, 0.0)  # clock time the URL is usable again
        self._failures = dict.fromkeys(self.urls, 0)  # consecutive failures, for the back-off
        self._clock = clock
        self.base_cooldown = base_cooldown
        self.max_cooldown = max_cooldown

    def pick(self) -> str:
        if len(self.urls) == 1:
            return self.urls[0]
        now = self._clock()
        for url in self.urls:
            if self._bench_until[url] <= now:
                return url
        return min(self.urls, key=self._bench_until.__getitem__)

    def failed(self, url: str) -> None:
        if len(self.urls) == 1 or url not in self._failures:
            return
        # One failure in a healthy stream is noise; two in a row bench the URL.
        self._failures[url] += 1
        if self._failures[url] >= 2:
            exponent = self._failures[url] - 2
            cooldown = min(self.max_cooldown, self.base_cooldown * 2**exponent)
            self._bench_until[url] = self._clock() + cooldown

    def succeeded(self, url: str) -> None:
        if url in self._failures:
            self._failures[url] = 0
            self._bench_until[url] = 0.0
