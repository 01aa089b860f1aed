"""The batch engine (``--mode batch``): a job's pending rows through a provider's Batch API.

A run, in order:

1. collect (``collect.py``): settle what a dead run left in the ledger, then write
   the rows of every batch of this OUT that has ended;
2. select the pending rows exactly as a synchronous run would (``RowSelector`` with
   the OUT's results and the ids held by batches still open); invalid rows become
   ``invalid_input`` results;
3. submit: request files by model within the limits (``chunks.py``), each journaled,
   uploaded and created under the ledger's write-ahead rule (``ledger.py``), with
   ``metadata`` naming this OUT (``pipeline_out``), the run and the chunk;
4. with ``--wait``, poll until every batch of this OUT has ended and collect it; with
   ``--no-wait``, leave them open (the next run, whatever its mode, collects);
5. with ``--finish-sync``, send the rows still pending synchronously (the local
   engine's runner), instead of submitting them in a batch.

Tests kill a run at the worst instants with ``ledger.crash_point`` (test-only).
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import httpx

from pipeline.batch.api import BatchApi, BatchFatal
from pipeline.batch.chunks import ChunkLimits, ChunkWriter, ClosedChunk
from pipeline.batch.collect import Collector, RowWriter, held_ids, make_api
from pipeline.batch.ledger import COLLECTING, CREATING, OPEN, Ledger, crash_point
from pipeline.budget import Budget
from pipeline.config import RunOptions, parse_shard
from pipeline.engine import JobContext
from pipeline.errors import BudgetExceeded, Kind, RequestError, UsageError
from pipeline.outcome import RunContext, invalid_row
from pipeline.pricing import load_prices
from pipeline.progress import Progress, Tally
from pipeline.request import Job, Rejected
from pipeline.resume import load_outcomes
from pipeline.runner import RunResult
from pipeline.selection import RowSelector
from pipeline.sink import recover_journals
from pipeline.source import read_rows

# Polling an open batch: every 5 s at first (a small or simulated batch ends in
# seconds), doubling to once a minute (a real one takes minutes to hours; polling
# faster would spend requests and rate limit without collecting any sooner).
POLL_FIRST = 5.0
POLL_MAX = 60.0


def check_batch_provider(opts: RunOptions) -> None:
    """``--mode batch`` needs a server with a Batch API: a profile that says it has
    none is a usage error naming the reason (exit 2, nothing sent)."""
    provider = opts.resolved_provider()
    if provider.batch_api is False and not opts.base_url:
        raise UsageError(
            f"--mode batch: provider '{provider.name}' documents no Batch API "
            "(OpenAI's /v1/files and /v1/batches); use --mode sync, or a provider that has "
            "one (e.g. openai)"
        )


def batch_transport(
    opts: RunOptions, provider_name: str, given: httpx.AsyncBaseTransport | None
) -> httpx.AsyncBaseTransport | None:
    """The transport for the Files/Batches calls: the test's, the in-process simulator
    for provider ``sim``, else httpx's own."""
    if given is not None or provider_name != "sim":
        return given
    from pipeline.local import sim_transport_for

    return sim_transport_for(opts)


class BatchEngine:
    """``--mode batch``: submit the pending rows as provider batches, collect them."""

    def __init__(
        self,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Awaitable[None]] | None = None,
        clock: Callable[[], float] | None = None,
        limits: ChunkLimits | None = None,
    ) -> None:
        self._transport = transport
        self._sleep = sleep
        self._clock = clock
        self._limits = limits or ChunkLimits()
        self._files: list[Path] = []
        self._job: JobContext | None = None
        self._result: RunResult | None = None
        self._writer: RowWriter | None = None
        self._about: dict[str, Any] = {"mode": "batch"}
        self._work_scope: anyio.CancelScope | None = None
        self._budget: Budget | None = None  # --max-cost: each submitted row's worst case

    # -- the engine seam --------------------------------------------------------------

    def inputs(self, opts: RunOptions) -> tuple[RunOptions, list[str]]:
        check_batch_provider(opts)
        from pipeline.local import input_files  # (local imports this engine's collector)

        self._files = input_files(opts)
        return opts, [str(f) for f in self._files]

    def connect(self, opts: RunOptions) -> AbstractContextManager[None]:
        return contextlib.nullcontext()

    def prepare(self, job: JobContext) -> None:
        recovered = recover_journals(Path(job.opts.out))
        if recovered:
            job.progress.message(f"recovered {recovered} results journaled by an interrupted run")
        self._job = job
        opts = job.opts
        if opts.max_cost is not None:  # a price table that cannot be used: exit 2 here
            self._budget = Budget(opts.max_cost, load_prices(opts.pricing), job.provider_name)
            if opts.shard is not None:
                self._budget.share(parse_shard(opts.shard)[1])
        self._transport = batch_transport(job.opts, job.provider_name, self._transport)
        self._result = RunResult(job.run_id, Path(job.opts.out), Tally(), time.monotonic())

    def run(self) -> tuple[RunResult, dict[str, Any] | None]:
        assert self._job is not None and self._result is not None, "prepare() first"
        try:
            anyio.run(self._run)
        except BaseException as exc:
            if not _interrupted(exc):
                raise
            # A Ctrl-C the signal watcher did not get to: the same ending as one it did.
            if self._result.signal is None:
                self._result.signal = int(signal.SIGINT)
                self._say_how_to_collect()
        finally:
            self._close()
        self._result.finished = time.monotonic()
        return self._result, self._about

    def so_far(self) -> RunResult | None:
        self._close()
        return self._result

    # -- the run ----------------------------------------------------------------------

    def _close(self) -> None:
        if self._writer is not None:
            with contextlib.suppress(Exception):
                self._writer.close()

    def _say_how_to_collect(self) -> None:
        assert self._job is not None
        out = self._job.opts.out
        self._job.progress.message(
            "interrupted: the submitted batches keep running at the provider; run the same "
            f"command again to collect them (`pipeline batches {out}` lists them)",
            "warning",
        )

    async def _run(self) -> None:
        """The run, with SIGINT/SIGTERM stopping it at the next step (exit 130/143):
        what was submitted keeps running at the provider, what was collected is kept."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._watch_signals, tg.cancel_scope)
            with anyio.CancelScope() as self._work_scope:
                await self._work()
            tg.cancel_scope.cancel()

    async def _watch_signals(self, scope: anyio.CancelScope) -> None:
        assert self._result is not None
        try:
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    self._result.signal = int(signum)
                    if self._work_scope is not None:
                        self._work_scope.cancel()
                    return
        except (ValueError, NotImplementedError, RuntimeError):
            return  # not the main thread (tests, embedding): no signal handling

    async def _work(self) -> None:
        job, result = self._job, self._result
        assert job is not None and result is not None
        opts = job.opts
        out = Path(opts.out)
        ledger = Ledger(out)
        writer = self._writer = RowWriter(out, f"{job.run_id}-batch", result.tally, opts.part_rows)
        ctx = RunContext(run_id=job.run_id, provider=job.provider_name)
        api = make_api(job, self._transport, self._sleep)
        collector = Collector(ledger, api, ctx, writer, job.progress)
        try:
            if ledger.exists:
                await collector.reconcile()
                await collector.collect()
            writer.close()
            if not opts.finish_sync or opts.wait:
                await self._submit(ledger, api, collector, ctx)
                writer.close()
            still = [c for c in collector.open_chunks() if c.batch_id is not None]
            if opts.wait and still:
                await self._wait(collector)
                writer.close()
            if opts.finish_sync and result.fatal is None:
                await self._finish_sync(ledger)
        except BatchFatal as exc:
            result.fatal = str(exc)
        finally:
            with anyio.CancelScope(shield=True):
                await api.aclose()
                self._wrap_up(collector, api)

    def _wrap_up(self, collector: Collector, api: BatchApi) -> None:
        """What the manifest and the person reading stderr learn, however the run ended."""
        job, result = self._job, self._result
        assert job is not None and result is not None
        out = job.opts.out
        if result.signal is not None:
            self._say_how_to_collect()
        self._about.update(collector.report.about())
        self._about["base_url"] = api.base
        waiting = [c for c in collector.open_chunks() if c.state in (OPEN, COLLECTING, CREATING)]
        if waiting:
            rows = sum(c.rows for c in waiting)
            self._about.update(batches_open=len(waiting), rows_waiting=rows)
            result.in_batches = rows
            batches = f"{len(waiting):,} batch" + ("es" if len(waiting) != 1 else "")
            job.progress.message(
                f"{rows:,} rows wait in {batches}; run again to collect "
                f"(`pipeline batches {out}` lists them)",
                "notice",
            )

    async def _submit(
        self, ledger: Ledger, api: BatchApi, collector: Collector, ctx: RunContext
    ) -> None:
        """Select the pending rows, write them as request files, submit each file."""
        job, result = self._job, self._result
        assert job is not None and result is not None and self._writer is not None
        opts = job.opts
        # Held first, results second: a batch another process (a sibling shard) closes
        # in between has its rows in a part before it is marked collected, so each row
        # is seen as held or as done, never as neither (which would send it again).
        held = held_ids(ledger)
        outcomes = load_outcomes(Path(opts.out))
        # Rows this run has just collected are done now, but they are this run's outcomes,
        # not rows "already done" before it: the summary counts each row once.
        collected = result.tally.status["ok"] + (
            0 if opts.retry_failed else result.tally.status["error"]
        )
        selector = RowSelector(opts.row_selection(), outcomes, held)
        ready: list[ClosedChunk] = []
        ledger.ensure()
        token = collector.token
        chunks = ChunkWriter(ledger.chunks_dir, job.run_id, ready.append, self._limits)
        taken: set[str] = set()  # custom_ids are unique within a file: one per id
        submitted = {"batches": 0, "rows": 0}
        over_budget: str | None = None
        try:
            rows = read_rows(self._files, max_line_bytes=opts.max_line_bytes)
            for batch in selector.batches(rows):
                await anyio.lowlevel.checkpoint()  # a signal is seen between input batches
                for item in batch:
                    if isinstance(item, Rejected):
                        self._writer.write(invalid_row(ctx, item))
                    elif item.id not in taken:
                        taken.add(item.id)
                        if opts.dedupe and chunks.follow(item):
                            continue
                        over_budget = self._hold(item)
                        if over_budget is not None:
                            break
                        self._add(chunks, item, ctx)
                while ready and result.fatal is None:
                    await self._submit_one(ledger, api, ready.pop(0), token, submitted)
                if result.fatal is not None or over_budget is not None:
                    break
            if result.fatal is None:
                chunks.close()
            while ready and result.fatal is None:
                await self._submit_one(ledger, api, ready.pop(0), token, submitted)
            if over_budget is not None:
                result.fatal = result.fatal or over_budget
        finally:
            chunks.discard()
            for left in ready:  # whole on disk, never entered in the ledger: not submitted
                ledger.remove_files(left.chunk)
        result.tally.skipped = max(0, selector.counts.done - collected)
        self._about.update(
            submitted_batches=submitted["batches"],
            submitted_rows=submitted["rows"],
            held_rows=selector.counts.held,
        )
        if selector.counts.held:
            job.progress.message(
                f"{selector.counts.held:,} rows are inside open batches already: not sent again"
            )

    def _hold(self, item: Job) -> str | None:
        """Hold the row's worst-case cost at Batch-API prices under ``--max-cost``; the
        reason to stop submitting when it does not fit (the rows before it still go)."""
        if self._budget is None:
            return None
        try:
            self._budget.reserve(item, tier="batch")
        except BudgetExceeded as exc:
            return f"{exc}; the rows past it were not submitted"
        return None

    def _add(self, chunks: ChunkWriter, item: Job, ctx: RunContext) -> None:
        assert self._writer is not None
        if chunks.fits(item):
            chunks.add(item)
            return
        too_big = Rejected(
            id=item.id,
            message=f"{item.source_file}:{item.source_line}: the request is larger than a "
            f"batch input file may be ({self._limits.max_bytes:,} bytes); send it with "
            "--mode sync",
            source_file=item.source_file,
            source_line=item.source_line,
            metadata=item.metadata,
            carried=item.carried,
            request_hash=item.request_hash,
        )
        self._writer.write(invalid_row(ctx, too_big))

    async def _submit_one(
        self,
        ledger: Ledger,
        api: BatchApi,
        chunk: ClosedChunk,
        token: str,
        submitted: dict[str, int],
    ) -> None:
        """One request file: journaled, uploaded, created: each step written down first."""
        job, result = self._job, self._result
        assert job is not None and result is not None
        name = chunk.chunk
        ledger.append(
            "chunk", name, run=job.run_id, model=chunk.model, rows=chunk.rows, bytes=chunk.bytes
        )
        try:
            ledger.append("upload", name)
            file_id = await api.upload(ledger.request_file(name))
            crash_point("upload")
            ledger.append("uploaded", name, file_id=file_id)
        except (RequestError, BatchFatal) as exc:
            ledger.append("abandoned", name, reason=f"upload failed: {exc}"[:500])
            ledger.remove_files(name)
            if isinstance(exc, BatchFatal):
                raise
            result.fatal = f"uploading a batch file failed: {exc}"
            return
        metadata = {"pipeline_out": token, "pipeline_run": job.run_id, "pipeline_chunk": name}
        ledger.append("create", name, file_id=file_id)

        async def find() -> Any:
            async for batch in api.batches():
                meta = batch.get("metadata")
                if not isinstance(meta, dict):
                    meta = {}
                if meta.get("pipeline_out") == token and meta.get("pipeline_chunk") == name:
                    return batch
            return None  # the whole list: a proxy may not list newest first

        try:
            batch = await api.create_batch(file_id, metadata, find)
        except BatchFatal:
            raise
        except RequestError as exc:
            if exc.kind is Kind.PERMANENT:
                ledger.append("abandoned", name, reason=f"create refused: {exc}"[:500])
                ledger.remove_files(name)
            # Otherwise it may exist all the same: left "creating", the next run looks
            # for it by its metadata before submitting anything.
            result.fatal = f"creating a batch failed: {exc}"
            return
        crash_point("create")
        created = batch.get("created_at")
        ledger.append(
            "created",
            name,
            batch_id=batch["id"],
            status=str(batch.get("status") or "")[:40],
            created_at=created if isinstance(created, int | float) else None,
        )
        submitted["batches"] += 1
        submitted["rows"] += chunk.rows
        job.progress.message(f"submitted batch {batch['id']}: {chunk.rows:,} rows of {chunk.model}")

    async def _wait(self, collector: Collector) -> None:
        """Poll every open batch of this OUT, with backoff, until all have ended."""
        job = self._job
        assert job is not None
        sleep = self._sleep or anyio.sleep
        delay = 0.0  # look once at once: a small batch may be done already
        while True:
            still = [c for c in collector.open_chunks() if c.batch_id is not None]
            if not still:
                return
            if delay:
                await sleep(delay)
            delay = min(POLL_MAX, delay * 2) if delay else POLL_FIRST
            left = await collector.collect()
            total = sum(_count(c.counts, "total") or c.rows for c in left)
            done = sum(_count(c.counts, "completed") + _count(c.counts, "failed") for c in left)
            if left:
                job.progress.message(
                    f"waiting for {len(left):,} batches: {done:,}/{total:,} lines done "
                    f"({collector.report.rows:,} rows collected so far)"
                )

    async def _finish_sync(self, ledger: Ledger) -> None:
        """The rows still pending, sent synchronously by the local engine's runner."""
        from pipeline.local import build_runner, file_source, make_client

        job, result = self._job, self._result
        assert job is not None and result is not None and result.fatal is None
        opts = job.opts
        client = make_client(opts, job.base_urls, job.api_key, transport=self._transport)
        held = held_ids(ledger)  # before the results: see _submit
        runner = build_runner(
            opts,
            run_id=job.run_id,
            provider_name=job.provider_name,
            client=client,
            outcomes=load_outcomes(Path(opts.out)),
            source=file_source(self._files, opts.max_line_bytes),
            progress=Progress(Tally(), quiet=True),
            sleep=self._sleep,
            clock=self._clock,
            held=held,
        )
        sync = await runner.run()
        t, s = result.tally, sync.tally
        t.status.update(s.status)
        for name in ("prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens"):
            setattr(t, name, getattr(t, name) + getattr(s, name))
        t.rate_limited += s.rate_limited
        t.retries += s.retries
        result.fatal = result.fatal or sync.fatal
        result.signal = result.signal or sync.signal
        result.pending += sync.pending
        self._about["finished_sync"] = s.finished


def _interrupted(exc: BaseException) -> bool:
    """Whether ``exc`` is a Ctrl-C, maybe wrapped in task groups' exception groups."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_interrupted(inner) for inner in exc.exceptions)
    return isinstance(exc, KeyboardInterrupt)


def _count(counts: dict[str, Any], key: str) -> int:
    value = counts.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0
