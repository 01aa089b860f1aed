"""Limits that hold for a whole job spread over many processes (``--engine ray``).

One coordinator (a Ray actor in a real job; a plain object in tests) hands each
worker its share of ``--concurrency``, ``--rpm`` and ``--tpm`` and leases it slices
of ``--max-cost``. The split is explicit and rebalances: every worker reports on a
heartbeat and gets its current share back, so when one finishes or dies the others
take up its share within a heartbeat or two.

Why shares and not a permit per request: a round trip to an actor costs about a
millisecond, which at thousands of requests a second would make the coordinator the
bottleneck. Each worker keeps its own fast local limiter and only its *limits* come
from here.

429s still slow everyone down: workers report how many of their answers were 429s,
and when at least 10% of the job's answers over the last 5 s were, every share is
cut by 30% (once a second at most) and then grows back 10% a second. The budget is
leased: a worker may only spend what it was granted, and grants never add up past
the cap, so the job as a whole stops before spend passes ``--max-cost``.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipeline.limiter import MIN_EVIDENCE, OUTCOME_WINDOW, OVERLOAD_CUT, OVERLOAD_SHARE
from pipeline.progress import COUNTS
from pipeline.structured import merge_reports

HEARTBEAT_SECONDS = 0.5  # how often a worker reports and takes its share
DEAD_AFTER = 10.0  # seconds without a heartbeat after which a worker's share is freed
# The job-wide 429 rule is the one each process applies to itself: the same window,
# share of 429s and evidence (pipeline.limiter), measured over every worker's answers.
WINDOW = OUTCOME_WINDOW
CUT = OVERLOAD_CUT
MIN_FACTOR = 0.1
GROWTH_PER_SECOND = 0.1
BUDGET_SLICES = 8  # a grant is at most cap / (workers * BUDGET_SLICES) beyond what is asked


@dataclass
class _Worker:
    seen: float
    granted: float = 0.0  # USD this worker may spend in all
    counts: dict[str, float] = field(default_factory=dict)  # its latest cumulative report
    answers: int = 0  # cumulative answers, for the 429 window
    limited: int = 0


@dataclass
class Share:
    """What one worker may use now."""

    concurrency: int
    rpm: float | None
    tpm: float | None
    workers: int  # how many share the job's limits (divides a server's stated limit)
    stop: str | None = None  # stop dispatch: a fatal answer, the budget, or a signal
    signal: int | None = None
    budget_slice: float = 0.0  # USD a worker may keep unspent; it gives back the rest
    largest_completion: int = 0  # tokens, the most any answer of the job has written

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Coordinator:
    """The job's limits and stop flag. Every method is cheap and returns plain data."""

    def __init__(
        self,
        *,
        concurrency: int,
        rpm: float | None,
        tpm: float | None,
        max_cost: float | None,
        pool_size: int,
        splits: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.concurrency = concurrency
        self.rpm = rpm
        self.tpm = tpm
        self.max_cost = max_cost
        self.pool_size = max(1, pool_size)
        self.splits_left = splits  # not yet finished
        self._clock = clock
        self._workers: dict[str, _Worker] = {}
        self._finished = dict.fromkeys(COUNTS, 0.0)  # counts of finished splits
        self._spent_finished = 0.0  # USD finished splits reported spending
        self._window: deque[tuple[float, int, int]] = deque()  # (time, answers, 429s)
        self._factor = 1.0
        self._last_cut = -math.inf
        self._last_growth = clock()
        self._stop: str | None = None
        self._signal: int | None = None
        self._key: str | None = None
        self._largest_completion = 0
        self._dead: dict[str, _Worker] = {}  # presumed dead: their grants count as spent
        self._finished_writers: list[str] = []
        # Per base URL, the structured-output modes the finished splits used (merged).
        self._structured: dict[str, dict[str, Any]] = {}

    # -- the key: handed over in memory (one method call), never in the workers' creation
    # arguments, their environment or a log -------------------------------------------

    def set_key(self, key: str | None) -> None:
        self._key = key

    def key(self) -> str | None:
        return self._key

    # -- shares ---------------------------------------------------------------------

    def _live(self, now: float) -> int:
        for name in [n for n, w in self._workers.items() if now - w.seen > DEAD_AFTER]:
            # Its grant stays booked as spent: we cannot know what it spent before it died.
            self._dead[name] = self._workers.pop(name)
        return len(self._workers)

    @property
    def _booked(self) -> float:
        """USD that can no longer be granted: spent by finished splits, or granted to
        workers presumed dead."""
        return self._spent_finished + sum(w.granted for w in self._dead.values())

    def _worker(self, name: str, now: float) -> _Worker:
        """The worker's record; one presumed dead that speaks again gets its grant back
        (and it leaves the spent books, where it was put when the worker went quiet)."""
        worker = self._workers.get(name)
        if worker is None:
            dead = self._dead.pop(name, None)
            granted = dead.granted if dead is not None else 0.0
            worker = self._workers[name] = _Worker(seen=now, granted=granted)
        return worker

    def _divisor(self, now: float) -> int:
        # Divide by the pool while enough splits remain to keep it busy, so a worker that
        # starts a moment after another does not find the whole limit taken.
        return max(1, self._live(now), min(self.pool_size, self.splits_left))

    def share(self) -> dict[str, Any]:
        now = self._clock()
        self._grow(now)
        n = self._divisor(now)
        f = self._factor
        return Share(
            concurrency=max(1, int(self.concurrency * f / n)),
            rpm=self.rpm * f / n if self.rpm else None,
            tpm=self.tpm * f / n if self.tpm else None,
            workers=n,
            stop=self._stop,
            signal=self._signal,
            budget_slice=self._slice(n),
            largest_completion=self._largest_completion,
        ).as_dict()

    def _slice(self, workers: int) -> float:
        return self.max_cost / (workers * BUDGET_SLICES) if self.max_cost else 0.0

    def register(self, name: str) -> dict[str, Any]:
        self._workers[name] = _Worker(seen=self._clock())
        return self.share()

    def heartbeat(self, name: str, counts: dict[str, float]) -> dict[str, Any]:
        """A worker's cumulative counts for its split; returns its share now."""
        now = self._clock()
        worker = self._worker(name, now)
        worker.seen = now
        answers = int(counts.get("answers", 0))
        limited = int(counts.get("rate_limited", 0))
        self._note(now, answers - worker.answers, limited - worker.limited)
        worker.answers, worker.limited = answers, limited
        worker.counts = counts
        # A worker new to the job reserves for answers as long as the job has seen, not
        # for a blind guess that may be most of the budget on its own.
        self._largest_completion = max(
            self._largest_completion, int(counts.get("largest_completion", 0))
        )
        if counts.get("fatal") and self._stop is None:
            self._stop = str(counts["fatal"])
        return self.share()

    def finish(self, name: str, counts: dict[str, Any]) -> None:
        """A split is done: its counts become final, its ``spent_usd`` is booked and the
        rest of its grant goes back."""
        self.heartbeat(name, counts)
        self._workers.pop(name, None)
        for key in COUNTS:
            self._finished[key] += counts.get(key, 0)
        self._spent_finished += counts.get("spent_usd", 0.0)
        structured = counts.get("structured")
        if isinstance(structured, dict):
            merge_reports(self._structured, structured)
        self._finished_writers.append(name)
        self.splits_left = max(0, self.splits_left - 1)

    def _note(self, now: float, answers: int, limited: int) -> None:
        if answers <= 0:
            return
        window = self._window
        window.append((now, answers, limited))
        while window and window[0][0] < now - WINDOW:
            window.popleft()
        total = sum(a for _, a, _ in window)
        hits = sum(x for _, _, x in window)
        if total >= MIN_EVIDENCE and hits / total >= OVERLOAD_SHARE and now - self._last_cut >= 1:
            self._factor = max(MIN_FACTOR, self._factor * CUT)
            self._last_cut = now

    def _grow(self, now: float) -> None:
        if self._factor < 1.0 and now - self._last_cut > 1.0:
            dt = min(1.0, now - self._last_growth)
            self._factor = min(1.0, self._factor + GROWTH_PER_SECOND * dt)
        self._last_growth = now

    # -- stopping -------------------------------------------------------------------

    def stop(self, reason: str, signal: int | None = None) -> None:
        if self._stop is None:
            self._stop = reason
        if signal is not None and self._signal is None:
            self._signal = signal

    # -- budget ---------------------------------------------------------------------

    def grant(self, name: str, want: float) -> float:
        """Lease at least ``want`` USD more (a slice more when there is room, to save
        round trips). Returns the amount; ``0.0`` when it does not fit now but may once
        other workers' answers settle (ask again); ``-1.0`` when it cannot fit even if
        every other worker gave back all it has not spent: the job is out of budget.
        Grants never add up past --max-cost."""
        if self.max_cost is None:
            return math.inf
        now = self._clock()
        n = self._divisor(now)
        worker = self._worker(name, now)
        available = self.budget_left() or 0.0
        if available >= want:
            amount = min(available, max(want, self._slice(n)))
            worker.granted += amount
            return amount
        unspent_elsewhere = sum(
            max(0.0, w.granted - w.counts.get("spent_usd", 0.0))
            for other, w in self._workers.items()
            if other != name
        )
        return 0.0 if available + unspent_elsewhere >= want else -1.0

    def give_back(self, name: str, amount: float) -> None:
        """A worker hands back grant it does not need, for workers that do."""
        if amount > 0:
            worker = self._worker(name, self._clock())
            worker.granted = max(0.0, worker.granted - amount)

    def budget_left(self) -> float | None:
        """USD neither spent nor granted (None: no --max-cost)."""
        if self.max_cost is None:
            return None
        granted = sum(w.granted for w in self._workers.values())
        return self.max_cost - self._booked - granted

    def finished(self) -> dict[str, Any]:
        """What finished splits reported, and which writers they were: a writer not in
        the list died (or was stopped) and its rows are counted from disk."""
        return {
            "counts": dict(self._finished),
            "writers": list(self._finished_writers),
            "structured": self._structured,
            # What is known to be spent: finished splits, plus what writers that have
            # not finished (alive, dead or stopped) last reported.
            "spent_usd": self._spent_finished
            + sum(w.counts.get("spent_usd", 0.0) for w in self._dead.values())
            + sum(w.counts.get("spent_usd", 0.0) for w in self._workers.values()),
        }

    # -- progress -------------------------------------------------------------------

    def totals(self) -> dict[str, float]:
        """Counts so far over the whole job: finished splits plus the live ones."""
        totals = dict(self._finished)
        for worker in self._workers.values():
            for key in COUNTS:
                totals[key] += worker.counts.get(key, 0)
        totals["workers"] = len(self._workers)
        totals["spent_usd"] = self._booked + sum(
            w.counts.get("spent_usd", 0) for w in self._workers.values()
        )
        return totals
