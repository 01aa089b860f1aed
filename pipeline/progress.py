"""Progress on stderr: a live line on a terminal, periodic lines in a log, none with --quiet.

stdout is for data, so nothing here ever writes to it. ``--log-format json`` turns
each progress line into one JSON object for log shippers.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TextIO

STATUSES = ("ok", "error", "invalid_input")  # how rows end: the keys of Tally.status
_FIELDS = (
    "skipped",
    "rate_limited",
    "retries",
    "prompt_tokens",
    "cached_tokens",
    "completion_tokens",
    "reasoning_tokens",
    "streamed",
    "stream_cuts",
    "no_usage",
    "flex_refusals",
    "flex_fallbacks",
)
# The counts one process reports for a job spread over many (Ray): a Tally's statuses
# and fields by these names, plus the rows it left pending.
COUNTS = (*STATUSES, "skipped", "pending", *_FIELDS[1:])


@dataclass
class Tally:
    """Live counts for one run; the runner updates them, progress and the summary read them."""

    total: int | None = None  # rows in the input, when known
    skipped: int = 0  # already done in an earlier run
    status: Counter[str] = field(default_factory=Counter)  # 'ok', 'error', 'invalid_input'
    rate_limited: int = 0
    retries: int = 0
    superseded: int = 0  # billed answers kept as error rows and asked again (bad JSON)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    cost_usd: float = 0.0
    # What the server did, for the end-of-run notes (pipeline.diagnostics):
    streamed: int = 0  # streamed answers that came whole
    stream_cuts: int = 0  # streamed attempts that ended cut (no [DONE], or no finish_reason)
    no_usage: int = 0  # answered rows (ok or bad JSON) that came without token counts
    flex_refusals: int = 0  # flex requests refused for capacity (429), each one
    flex_fallbacks: int = 0  # flex rows sent at the default tier after refusals

    @property
    def finished(self) -> int:
        return sum(self.status.values())

    def to_counts(self) -> dict[str, int]:
        """The tally by ``COUNTS`` names (``pending`` aside: the run's result has it)."""
        counts = {key: self.status[key] for key in STATUSES}
        counts.update((key, int(getattr(self, key))) for key in _FIELDS)
        return counts

    def set_counts(self, counts: Mapping[str, float]) -> None:
        """The inverse of ``to_counts``: job totals into this tally."""
        for key in STATUSES:
            self.status[key] = int(counts[key])
        for key in _FIELDS:
            setattr(self, key, int(counts[key]))


def _eta(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


class Progress:
    """Render a Tally now and then. Call ``tick()`` often; it decides when to print."""

    def __init__(
        self,
        tally: Tally,
        *,
        quiet: bool = False,
        log_format: str = "text",
        every: float = 10.0,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.tally = tally
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.json = log_format == "json"
        self.live = not self.json and self.stream.isatty()
        self.every = 0.5 if self.live else every
        self._clock = clock
        self._start = clock()
        self._last = self._start

    def line(self) -> str:
        t = self.tally
        elapsed = max(1e-9, self._clock() - self._start)
        rate = t.finished / elapsed
        done = t.finished + t.skipped
        if t.total:
            head = f"{done:,}/{t.total:,} rows ({100 * done / t.total:.1f}%)"
            left = max(0, t.total - done)
            eta = f" ETA {_eta(left / rate)}" if rate > 0 and left else ""
        else:
            head, eta = f"{done:,} rows", ""
        errors = t.status["error"] + t.status["invalid_input"]
        return (
            f"{head} {rate:,.1f} rows/s{eta} | ok {t.status['ok']:,} err {errors:,}"
            f" 429s {t.rate_limited:,} | tokens in {t.prompt_tokens:,} out {t.completion_tokens:,}"
        )

    def event(self) -> dict[str, object]:
        t = self.tally
        return {
            "event": "progress",
            "total": t.total,
            "skipped": t.skipped,
            "ok": t.status["ok"],
            "errors": t.status["error"] + t.status["invalid_input"],
            "rate_limited": t.rate_limited,
            "prompt_tokens": t.prompt_tokens,
            "completion_tokens": t.completion_tokens,
            "elapsed_s": round(self._clock() - self._start, 3),
        }

    def tick(self, force: bool = False) -> None:
        if self.quiet:
            return
        now = self._clock()
        if not force and now - self._last < self.every:
            return
        self._last = now
        if self.json:
            self.stream.write(json.dumps(self.event()) + "\n")
        elif self.live:
            self.stream.write("\r\x1b[2K" + self.line())
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.live and not self.quiet:
            self.tick(force=True)
            self.stream.write("\n")
            self.stream.flush()

    def notice(self, event: Mapping[str, object]) -> None:
        """A structured event for the JSON log (``--log-format json``), shown even with
        --quiet; text logs leave it to the end-of-run summary, which carries its message."""
        if self.json:
            self.stream.write(json.dumps(dict(event)) + "\n")
            self.stream.flush()

    def message(self, text: str, level: str = "info") -> None:
        """A warning or notice; shown even with --quiet when it is an error."""
        if self.quiet and level == "info":
            return
        if self.json:
            self.stream.write(json.dumps({"event": level, "message": text}) + "\n")
        else:
            prefix = "" if level == "info" else f"{level}: "
            self.stream.write(("\n" if self.live else "") + prefix + text + "\n")
        self.stream.flush()
