"""The run: read rows, send them under the limiter with retries, write every outcome.

Three kinds of task share two bounded channels (``pipeline.channel``), so memory
stays flat whatever the input size::

    reader (thread) ──jobs──► N workers ──results──► writer (journal, Parquet)

The reader validates rows and skips ids already done; workers hold the limiter
permit only while a request is on the wire; the writer journals each result as
soon as it arrives. Stopping (a fatal answer, a signal, the budget) stops dispatch
at once and lets in-flight requests finish: their answers are kept. Rows that were
never sent get no outcome row, so a plain re-run sends them.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread

from pipeline.budget import Budget, BudgetExceeded, Reservation
from pipeline.channel import Channel
from pipeline.client import ChatClient, Reply
from pipeline.dedupe import Dedupe
from pipeline.errors import (
    ApiError,
    Exit,
    Kind,
    RequestError,
    fatal_advice,
    signal_exit,
    worst_exit,
)
from pipeline.jsoncheck import check_answer, wants_json
from pipeline.limiter import RateLimiter
from pipeline.outcome import (
    RunContext,
    error_row,
    internal_row,
    invalid_json_row,
    invalid_row,
    json_text,
    label_of,
    ok_row,
    utcnow,
)
from pipeline.progress import Progress, Tally
from pipeline.request import Job, Rejected
from pipeline.retry import first_wait, gives_up_at_once, retrying
from pipeline.schema import storable
from pipeline.selection import RowSelector
from pipeline.sink import (
    ResultSink,
    SinkError,
    read_segment,
    reads_back_alike,
    write_part,
)
from pipeline.source import SourceRow
from pipeline.structured import StructuredOutput, wants_structured
from pipeline.tiers import (
    FLEX_REFUSALS_FACTOR,
    FlexExhausted,
    FlexPolicy,
    FlexRefused,
    is_capacity_refusal,
    is_flex,
    send_flex,
)

GRACE_SECONDS = 30.0  # after a first signal, how long in-flight requests may take
# Answers a worker may hand on before the writer has journaled them. A kill -9 loses
# these as well as the requests in flight (the server billed them; a re-run buys them
# again), so the buffer is small: a writer that falls behind (a loaded machine, a
# slow disk) holds the workers back instead of piling up answers only memory knows.
RESULTS_WAITING = 64


class _Stopped(Exception):
    """Raised inside a worker when the run is stopping: the row stays pending."""


class _Failed(Exception):
    """A request that ended in an error after ``attempts`` tries."""

    def __init__(self, error: RequestError, attempts: int) -> None:
        super().__init__(str(error))
        self.error = error
        self.attempts = attempts


@dataclass
class RunResult:
    """What the run did, for the summary line, the manifest and the exit code."""

    run_id: str
    out: Path
    tally: Tally
    started: float
    finished: float = 0.0
    fatal: str | None = None  # why the run stopped early, with advice
    signal: int | None = None
    pending: int = 0  # rows read but never sent (stopped early)
    internal: str | None = None  # "<Class>: <message>" of an unexpected error (exit 5)
    unsaved: int = 0  # answers maybe lost to a broken OUT (at most): sent again on re-run
    in_batches: int = 0  # rows inside open provider batches (--mode batch): a later run collects
    cpu_seconds: float | None = None  # this process's CPU while the engine ran (the manifest)
    # Per base URL asked for JSON: the structured-output mode used (StructuredOutput.report)
    structured: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        """One code for the run: every code that applies, the worst of them winning."""
        if self.signal is not None:
            return signal_exit(self.signal)
        t = self.tally
        applies = (
            Exit.INTERNAL if self.internal is not None else Exit.OK,
            Exit.FATAL if self.fatal is not None else Exit.OK,
            Exit.FAILED if t.status["error"] or t.status["invalid_input"] else Exit.OK,
        )
        return worst_exit(applies)

    @property
    def wall_seconds(self) -> float:
        return (self.finished or time.monotonic()) - self.started


class StopSignal:
    """The run's "stop dispatching now": set by a fatal answer, a signal or the budget.

    Built before the runner and handed to the limiter as its sleep, so a wait for a
    server's ``Retry-After`` (up to minutes) ends the moment the run stops.
    """

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event = anyio.Event()

    def set(self) -> None:
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    async def sleep(self, seconds: float) -> None:
        """Sleep that wakes early when the run stops."""
        if seconds <= 0:
            return
        with anyio.move_on_after(seconds):
            await self._event.wait()


@dataclass(frozen=True, slots=True)
class Attempts:
    """How hard the runner tries one row. Defaults are the ``run`` options' defaults."""

    max_attempts: int = 6  # per row, for errors other than 429 (429s are paced, not counted)
    max_retry_time: float = 900.0  # seconds a row may spend retrying before it gives up
    json_retries: int = 2  # re-asks when a JSON answer breaks the schema or label set
    flex_fallback: int | None = None  # flex refusals before the default tier (pipeline.tiers)


@dataclass(frozen=True, slots=True)
class RunnerSettings:
    """What the runner decides by itself (its collaborators hold their own settings)."""

    run_id: str
    provider: str  # recorded in every row
    out: Path  # for the result's summary; the sink owns the writing
    workers: int  # worker tasks; the limiter decides how many may send at once
    attempts: Attempts = Attempts()
    handle_signals: bool = True  # a Ray worker leaves signals to Ray (the driver relays)
    structured_output: str = "json_schema"  # the provider profile's first structured mode


@dataclass(slots=True)
class RunParts:
    """The runner's collaborators, built (and for a shard or a Ray worker, given their
    share of the job's limits) before the runner: it uses them, never patches them."""

    client: ChatClient
    limiter: RateLimiter
    selector: RowSelector
    sink: ResultSink
    stop: StopSignal
    budget: Budget | None = None
    dedupe: Dedupe | None = None


@dataclass(frozen=True, slots=True)
class RowSource:
    """Where the rows come from: input files, or a piece of them (a Ray split)."""

    batches: Callable[[], Iterator[list[SourceRow]]]
    count: Callable[[], int | None] = lambda: None  # rows in all, for the ETA; None: unknown


class Runner:
    """One run over a stream of rows. Build it, then ``await run()``."""

    def __init__(
        self,
        settings: RunnerSettings,
        parts: RunParts,
        source: RowSource,
        *,
        progress: Progress | None = None,
        sleep: Callable[[float], Awaitable[None]] | None = None,
        budget_topup: Callable[[Budget, float], Awaitable[bool | None]] | None = None,
    ) -> None:
        self.settings = settings
        self.client = parts.client
        self.limiter = parts.limiter
        self.selector = parts.selector
        self.sink = parts.sink
        self.budget = parts.budget
        self.dedupe = parts.dedupe
        self._stop = parts.stop
        self._source = source
        # Tests hand in a fake clock's sleep; a real run's retry waits end when it stops.
        self._wait = sleep or parts.stop.sleep
        # A job-wide budget (Ray) tops this process's allowance up instead of stopping:
        # it answers True (leased more), None (nothing now, ask again) or False (none left).
        self._budget_topup = budget_topup
        self.ctx = RunContext(run_id=settings.run_id, provider=settings.provider)
        self.tally = Tally()
        self.progress = progress or Progress(self.tally, quiet=True)
        self.progress.tally = self.tally
        self.result = RunResult(settings.run_id, settings.out, self.tally, time.monotonic())
        self.structured = StructuredOutput(settings.structured_output)
        self._budget_freed = anyio.Event()  # set (and replaced) whenever a hold is settled
        self._topping_up = anyio.Lock()
        self._compacting = anyio.Lock()
        self._parts_out = 0  # parts taken from the sink and not yet on disk

    # -- stopping -------------------------------------------------------------------

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def stop(self, reason: str | None = None) -> None:
        """Stop dispatch; in-flight requests finish. ``reason`` marks a fatal stop."""
        if reason and self.result.fatal is None:
            self.result.fatal = reason
        self._stop.set()

    # -- the run --------------------------------------------------------------------

    async def run(self) -> RunResult:
        jobs: Channel[Job] = Channel(max(64, self.settings.workers))
        results: Channel[dict[str, Any]] = Channel(RESULTS_WAITING)
        try:
            async with anyio.create_task_group() as tg:
                if self.settings.handle_signals:
                    tg.start_soon(self._watch_signals, tg.cancel_scope)
                tg.start_soon(self._count_total)
                async with anyio.create_task_group() as work:
                    work.start_soon(self._writer, results)
                    try:
                        async with anyio.create_task_group() as senders:
                            for _ in range(self.settings.workers):
                                senders.start_soon(self._worker, jobs, results)
                            try:
                                await self._reader(jobs, results)
                            finally:
                                jobs.close()  # the workers finish what is queued
                    finally:
                        results.close()  # the writer ends once it has every row
                tg.cancel_scope.cancel()  # stop the signal watcher and the counter
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self.sink.close)
                await self.client.aclose()
            self.result.finished = time.monotonic()
            self.result.structured = self.structured.report()
            self.progress.close()
        return self.result

    async def _watch_signals(self, scope: anyio.CancelScope) -> None:
        try:
            receiver = anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM)
            with receiver as signals:
                async for signum in signals:
                    if self.result.signal is not None:
                        self.progress.message("second signal: stopping now", "warning")
                        scope.cancel()
                        return
                    self.result.signal = int(signum)
                    self.progress.message(
                        f"{signal.Signals(signum).name}: no new requests; waiting up to "
                        f"{GRACE_SECONDS:.0f}s for those in flight (again to stop now)",
                        "warning",
                    )
                    self.stop()
                    scope.deadline = min(scope.deadline, anyio.current_time() + GRACE_SECONDS)
        except (ValueError, NotImplementedError, RuntimeError):
            return  # not the main thread (tests, embedding): no signal handling

    async def _count_total(self) -> None:
        """Count input rows in the background for the progress bar's ETA."""
        try:
            self.tally.total = await anyio.to_thread.run_sync(self._source.count)
        except Exception:  # it only feeds the ETA: the run goes on without one
            self.tally.total = None

    # -- reading --------------------------------------------------------------------

    def _batches(self) -> Iterator[list[Job | Rejected]]:
        for batch in self.selector.batches(self._source.batches(), lambda: self.stopping):
            self.tally.skipped = self.selector.counts.done
            yield batch
        self.tally.skipped = self.selector.counts.done

    async def _reader(self, jobs: Channel[Job], results: Channel[dict[str, Any]]) -> None:
        batches = self._batches()
        while not self.stopping:
            batch = await anyio.to_thread.run_sync(next, batches, None)
            if batch is None:
                break
            for item in batch:
                if self.stopping:
                    break
                if isinstance(item, Rejected):
                    await results.put(invalid_row(self.ctx, item))
                else:
                    await jobs.put(item)

    # -- sending --------------------------------------------------------------------

    async def _worker(self, jobs: Channel[Job], results: Channel[dict[str, Any]]) -> None:
        async for job in jobs:
            if self.stopping:
                self.result.pending += 1
                continue
            try:
                rows = await self._dispatch(job, results)
            except Exception as exc:  # a bug or an unforeseen input: this row's
                # outcome, not the run's (answers already paid for are in
                # _process's own guard). Cancellation is not an Exception.
                rows = [internal_row(self.ctx, job, exc, attempts=0, started_at=utcnow())]
                await results.put(rows[0])
            if rows is None:
                self.result.pending += 1

    async def _dispatch(
        self, job: Job, results: Channel[dict[str, Any]]
    ) -> list[dict[str, Any]] | None:
        """Send a job, or share the answer of an identical request already sent."""
        if self.dedupe is None:
            rows = await self._process(job, results)
        else:
            rows = await self.dedupe.run(job, lambda: self._process(job, results))
        if rows:
            await results.put(rows[-1])
        return rows

    async def _process(
        self, job: Job, results: Channel[dict[str, Any]]
    ) -> list[dict[str, Any]] | None:
        """Send one job with retries; returns its final row (last), or None if the run
        stopped first. Billed answers that broke the asked-for JSON are sent to the
        writer as they happen (their tokens were paid for) and the row is asked again."""
        started_at = utcnow()
        attempts = 0
        json_failures = 0
        while True:
            try:
                if is_flex(job.body):
                    reply, tries = await self._send_flex(job)
                else:
                    reply, tries = await self._send_retrying(job)
            except _Stopped:
                return None
            except _Failed as failed:
                attempts += failed.attempts
                return [
                    error_row(self.ctx, job, failed.error, attempts=attempts, started_at=started_at)
                ]
            attempts += tries
            try:
                row, problem = self._answered(job, reply, attempts, started_at)
            except Exception as exc:  # the answer is paid for: keep it, whatever broke
                return [
                    internal_row(
                        self.ctx,
                        job,
                        exc,
                        attempts=attempts,
                        started_at=started_at,
                        answer=reply.answer,
                    )
                ]
            if problem is None:
                return [row]
            json_failures += 1
            final = json_failures > self.settings.attempts.json_retries
            rejected = invalid_json_row(row, problem, final=final)
            if final:
                return [rejected]
            await results.put(rejected)
            if self.stopping:
                return None  # asked again by the next run: the rejection is not the outcome

    def _answered(
        self, job: Job, reply: Reply, attempts: int, started_at: datetime
    ) -> tuple[dict[str, Any], str | None]:
        """The answer's row as received, and what is wrong with its JSON (if JSON was
        asked for and it broke the request's schema or label set)."""
        row = ok_row(
            self.ctx,
            job,
            reply.answer,
            base_url=reply.base_url,
            http_status=reply.http_status,
            attempts=attempts,
            latency_ms=reply.latency_ms,
            started_at=started_at,
        )
        fmt = job.body.get("response_format")
        if not wants_json(fmt):
            return row, None
        enforced = self.structured.enforced(reply.base_url, fmt)
        parsed, problem = check_answer(fmt, reply.answer.content, fenced=not enforced)
        if problem is None:
            row.update(parsed=json_text(parsed), label=label_of(parsed))
        return row, problem

    async def _send_flex(self, job: Job) -> tuple[Reply, int]:
        """Send a flex row until answered: (reply, attempts). Raises _Stopped or _Failed.

        It goes through ``pipeline.tiers.send_flex``, which counts its capacity
        refusals (``FlexRefused``, raised past the retry loop of ``_send_retrying``)
        and falls back to the default tier after ``--flex-fallback`` of them.
        """
        limits = self.settings.attempts
        policy = FlexPolicy(
            fallback=limits.flex_fallback,
            max_time=limits.max_retry_time,
            max_refusals=limits.max_attempts * FLEX_REFUSALS_FACTOR,
        )
        try:
            return await send_flex(
                job,
                self._send_retrying,
                self._wait,
                policy,
                on_retry=self._count_retry,
                on_refusal=self._count_flex_refusal,
                on_fallback=self._count_flex_fallback,
            )
        except FlexExhausted as exhausted:
            raise _Failed(exhausted.error, exhausted.attempts) from None

    def _count_retry(self) -> None:
        self.tally.retries += 1

    def _count_flex_refusal(self) -> None:
        self.tally.flex_refusals += 1

    def _count_flex_fallback(self) -> None:
        self.tally.flex_fallbacks += 1

    async def _send_retrying(self, job: Job) -> tuple[Reply, int]:
        """Send until answered: (reply, attempts). Raises _Stopped, _Failed, or (for a
        flex request refused for capacity) FlexRefused with the attempts so far.

        The first attempt goes straight out: most rows succeed at once, and building a
        tenacity loop per row cost 12-14% of the run's CPU at zero latency
        (bench/RESULTS.md). The retry policy (pipeline.retry) takes over only after a
        retryable failure, with that failure counted.
        """
        try:
            return await self._send_once(job), 1
        except RequestError as exc:
            if gives_up_at_once(exc, self.settings.attempts.max_attempts):
                raise _Failed(exc, 1) from None
            first = exc
        attempts = 1
        reply: Reply | None = None
        await self._wait(first_wait(first))
        try:
            async for attempt in retrying(
                self.settings.attempts.max_attempts,
                self.settings.attempts.max_retry_time,
                sleep=self._wait,
                first_failure=first,
            ):
                with attempt:
                    attempts += 1
                    self.tally.retries += 1
                    reply = await self._send_once(job)
        except RequestError as exc:
            raise _Failed(exc, attempts) from None
        except FlexRefused as refused:
            refused.attempts = attempts
            raise
        assert reply is not None
        return reply, attempts

    async def _send_once(self, job: Job) -> Reply:
        if self.stopping:
            raise _Stopped
        permit = await self.limiter.acquire(
            self.limiter.expected_tokens(job.est_prompt_tokens, job.completion_ceiling)
        )
        if self.stopping:
            self.limiter.release(permit, answered=False)
            raise _Stopped
        reservation = None
        if self.budget is not None:
            try:
                reservation = await self._reserve(self.budget, job)
            except _Stopped:
                self.limiter.release(permit, answered=False)
                raise
        try:
            if wants_structured(job.body):
                reply = await self.structured.complete(self.client, job.body)
            else:  # nothing to shape: one coroutine less on every request
                reply = await self.client.complete(job.body)
        except RequestError as exc:
            if exc.error_type == "stream_cut":
                self.tally.stream_cuts += 1
            if reservation is not None and self.budget is not None:
                self.budget.settle(reservation, job.model, None)
                self._budget_settled()
            if is_capacity_refusal(job.body, exc):
                # Not a rate limit: the whole run is not slowed for it (pipeline.tiers).
                assert isinstance(exc, ApiError)
                self.limiter.release(permit, headers=exc.headers, answered=False)
                raise FlexRefused(exc) from None
            rate_limited = isinstance(exc, ApiError) and exc.is_rate_limit
            if rate_limited:
                self.tally.rate_limited += 1
            self.limiter.release(
                permit,
                rate_limited=rate_limited,
                retry_after=exc.retry_after,
                headers=exc.headers if isinstance(exc, ApiError) else None,
                answered=isinstance(exc, ApiError),
            )
            if exc.kind is Kind.FATAL:
                self.stop(f"{exc}. {fatal_advice(exc)}.")
                raise _Stopped from None
            raise
        usage = reply.answer.usage
        if self.client.stream:
            self.tally.streamed += 1
        if reservation is not None and self.budget is not None:
            self.tally.cost_usd += self.budget.settle(
                reservation, job.model, usage, service_tier=reply.answer.service_tier
            )
            self._budget_settled()
        used = None
        if usage.prompt_tokens is not None:
            # A server that counts max_tokens against the limit (OpenAI does) counts it
            # whole, however short the answer: refund no more than it does.
            completion = max(usage.completion_tokens or 0, job.completion_ceiling or 0)
            used = usage.prompt_tokens + completion
        self.limiter.release(
            permit,
            used_tokens=used,
            completion_tokens=usage.completion_tokens,
            headers=reply.headers,
        )
        return reply

    async def _reserve(self, budget: Budget, job: Job) -> Reservation:
        """Hold this request's worst-case cost under --max-cost, or raise _Stopped.

        A request that does not fit only because of what is in flight waits for those
        answers: they are held at their worst case (e.g. 512 completion tokens) and
        usually cost a fraction of it. The run stops when a request does not fit with
        nothing in flight, and (on Ray) no more budget can be leased for it.
        """
        while True:
            if self.stopping:
                raise _Stopped
            try:
                return budget.reserve(job)
            except BudgetExceeded as exc:
                refused = exc
            more: bool | None = False  # leased more / ask again later / no more to lease
            if self._budget_topup is not None:
                async with self._topping_up:  # one lease request at a time
                    try:  # another task may have leased meanwhile; and a fresh hold
                        return budget.reserve(job)  # reflects what was learned since
                    except BudgetExceeded as exc:
                        refused = exc
                    more = await self._budget_topup(budget, refused.amount)
                if more:
                    continue
            if budget.holds > 0:
                await self._budget_freed.wait()
                continue
            if more is None:
                continue
            if not self.stopping:
                self.stop(str(refused))
            raise _Stopped

    def _budget_settled(self) -> None:
        self._budget_freed.set()
        self._budget_freed = anyio.Event()

    # -- writing --------------------------------------------------------------------

    async def _writer(self, results: Channel[dict[str, Any]]) -> None:
        try:
            # Parts are compacted in a task of their own: journaling never waits on
            # Parquet, so a kill -9 during compaction loses no more than in flight.
            async with anyio.create_task_group() as compactions:
                await self._write_loop(results, compactions)
        finally:
            # Cancelled (second signal, grace over): keep every answer that arrived.
            for row in results.drain():
                self._write(row)
            self._flush()

    async def _write_loop(
        self, results: Channel[dict[str, Any]], compactions: anyio.abc.TaskGroup
    ) -> None:
        while True:
            # Rows journaled but not yet fsynced wait at most the sink's sync window,
            # even when no other answer comes to trigger the group commit.
            if not await results.wait(self.sink.sync_wait()):
                await self._sync()  # the window passed with nothing new: commit
                continue
            # Everything ready is written, then flushed once: a small group per flush.
            rows = results.drain()
            if not rows:
                break  # closed, and every row written
            for row in rows:
                self._write(row)
                # Checked row by row: one drain can bring thousands of answers, and the
                # rows a part holds are bounded in bytes as well as in number (sink).
                if self.sink.part_due:
                    taken = self._take_part()
                    if taken is not None:
                        self._hand_on_part(compactions, *taken)
            self._flush()
            if self.sink.sync_due:
                await self._sync()
            self.progress.tick()

    def _out_failed(self, error: SinkError) -> None:
        """OUT cannot be written: stop dispatch (exit 3). Answers still in flight are
        held in memory and written as one part at the end if OUT allows it then."""
        self.stop(str(error))

    def _flush(self) -> None:
        try:
            self.sink.flush()
        except SinkError as error:
            self._out_failed(error)

    async def _sync(self) -> None:
        try:
            await anyio.to_thread.run_sync(self.sink.sync)
        except SinkError as error:
            self._out_failed(error)

    def _take_part(self) -> tuple[list[dict[str, Any]], Path, Path] | None:
        try:
            return self.sink.take_part()
        except SinkError as error:
            self._out_failed(error)
            return None

    def _hand_on_part(
        self,
        compactions: anyio.abc.TaskGroup,
        rows: list[dict[str, Any]],
        part: Path,
        segment: Path,
    ) -> None:
        """Have a part written, its rows kept in memory only if it is written at once.

        A part's rows stay in memory until it is written, and parts are written one at
        a time. A part taken while another is still being written (a slow disk, long
        answers) lets go of its rows and is read back from its journal segment, which
        is closed and whole, when its turn comes: otherwise every waiting part held its
        rows (4,000 answers of 100 KB peaked at 1.35 GB, bench/RESULTS.md). The writer
        never waits here: journaling never waits on Parquet.
        """
        held: list[dict[str, Any]] | None = rows
        if self._parts_out and reads_back_alike(rows):
            held = None
        self._parts_out += 1
        compactions.start_soon(self._compact, held, part, segment)

    async def _compact(self, rows: list[dict[str, Any]] | None, part: Path, segment: Path) -> None:
        """Write one Parquet part from a closed journal segment, one part at a time
        (``rows``: the segment's rows, or None to read them back from it).

        The segment is fsynced (with its folder) first, outside the queue: group
        commit no longer covers a taken segment, and one waiting behind a slow part
        must be as safe from a power cut as the journal being written.
        """
        try:
            with anyio.CancelScope(shield=True):
                try:
                    await anyio.to_thread.run_sync(ResultSink.sync_segment, segment)
                except OSError as exc:
                    self._out_failed(self.sink.fail(exc))  # whole on disk or not: recovery
                    return
            async with self._compacting:
                with anyio.CancelScope(shield=True):  # a part is written whole or not at all
                    try:
                        await anyio.to_thread.run_sync(self._write_part, rows, part, segment)
                    except OSError as exc:
                        # The segment is whole on disk: the next run compacts it.
                        self._out_failed(self.sink.fail(exc))
                        return
                    self.sink.part_done(segment)
        finally:
            self._parts_out -= 1

    @staticmethod
    def _write_part(rows: list[dict[str, Any]] | None, part: Path, segment: Path) -> None:
        write_part(read_segment(segment) if rows is None else rows, part)

    def _write(self, row: dict[str, Any]) -> None:
        row = storable(row)
        try:
            self.sink.write(row)
        except SinkError as error:
            self._out_failed(error)
        t = self.tally
        t.prompt_tokens += row.get("prompt_tokens") or 0
        t.completion_tokens += row.get("completion_tokens") or 0
        t.cached_tokens += row.get("cached_tokens") or 0
        t.reasoning_tokens += row.get("reasoning_tokens") or 0
        answered = row["status"] == "ok" or row.get("error_type") == "invalid_json"
        if answered and (row.get("prompt_tokens") is None or row.get("completion_tokens") is None):
            t.no_usage += 1
        if row.get("superseded"):
            t.superseded += 1  # billed, kept, and asked again: not the row's outcome
            return
        status = row["status"]
        t.status["invalid_input" if row.get("error_type") == "invalid_input" else status] += 1
