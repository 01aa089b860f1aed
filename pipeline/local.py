"""The local engine: every row (or one ``--shard`` of them) in this process.

Also the one place where a run's collaborators are built from the options (client,
limiter, budget, dedupe, sink, row selection), each with its own settings and, for
one of several processes, its share of the job's limits. The Ray engine builds each
worker's runner with the same function, so a worker runs exactly what a local run
does.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import time
from collections.abc import Awaitable, Callable, Container, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import anyio
import httpx

from pipeline.budget import Budget
from pipeline.client import ChatClient, Connection
from pipeline.config import RunOptions, parse_shard
from pipeline.dedupe import Dedupe
from pipeline.engine import JobContext
from pipeline.errors import UsageError
from pipeline.limiter import Limits, RateLimiter
from pipeline.pricing import PricingError, load_prices
from pipeline.progress import Progress
from pipeline.resume import Outcomes, load_outcomes
from pipeline.runner import (
    Attempts,
    RowSource,
    Runner,
    RunnerSettings,
    RunParts,
    RunResult,
    StopSignal,
)
from pipeline.selection import RowSelector
from pipeline.sink import ResultSink, recover_journals
from pipeline.source import (
    SourceRow,
    check_readable,
    count_rows,
    expand_sources,
    read_rows,
    warn_on_stderr,
)


def sim_transport_for(opts: RunOptions) -> httpx.AsyncBaseTransport:
    """The in-process simulator, with the knobs of the job's [sim] table / --sim.
    Its Files/Batches state lives in ``OUT/batches/sim-server`` unless [sim] names a
    ``state_dir``: it lives as long as one run, and the next run collects its batches."""
    from pipeline.sim import SimConfig, Simulator, sim_transport

    knobs = dict(opts.sim)
    if "state_dir" in SimConfig.__dataclass_fields__ and (
        opts.mode == "batch" or (Path(opts.out) / "batches").is_dir()
    ):
        knobs.setdefault("state_dir", str(Path(opts.out) / "batches" / "sim-server"))
    try:
        config = SimConfig(**knobs)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"simulator settings: {exc}") from None
    return sim_transport(Simulator(config))


def connection_for(opts: RunOptions) -> Connection:
    """The client's settings from the options (the pool sized to the in-flight cap)."""
    return Connection(
        timeout=opts.timeout,
        deadline=opts.deadline,
        max_response_bytes=int(opts.max_response_mb * 2**20),
        stream=opts.stream,
        max_connections=opts.concurrency,
        http_transport=opts.http_transport,
    )


def limits_for(opts: RunOptions) -> Limits:
    """The whole job's traffic limits from the options."""
    return Limits(opts.concurrency, opts.rpm, opts.tpm)


def make_client(
    opts: RunOptions,
    base_urls: list[str],
    api_key: str | None,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    notice: Callable[[str], None] | None = None,
) -> ChatClient:
    """The run's client; ``notice`` hears what the client has to tell the user."""
    return ChatClient(base_urls, api_key, connection_for(opts), transport=transport, notice=notice)


def build_runner(
    opts: RunOptions,
    *,
    run_id: str,
    provider_name: str,
    client: ChatClient,
    outcomes: Outcomes,
    source: RowSource,
    progress: Progress | None = None,
    parts: int = 1,
    sink_name: str | None = None,
    sleep: Callable[[float], Awaitable[None]] | None = None,
    clock: Callable[[], float] | None = None,
    budget_topup: Callable[[Budget, float], Awaitable[bool | None]] | None = None,
    handle_signals: bool = True,
    held: Container[str] = frozenset(),
) -> Runner:
    """A runner with its collaborators built from ``opts``; ``parts`` > 1 gives this
    process its 1/``parts`` share of ``--rpm``, ``--tpm``, ``--concurrency`` and
    ``--max-cost``, which describe the whole job (N shards at the full ``--rpm`` would
    reach the gateway N times too fast). ``held``: ids inside open provider batches,
    never sent meanwhile."""
    stop = StopSignal()
    limiter = RateLimiter(
        limits_for(opts).share(parts),
        workers=parts,
        clock=clock or time.monotonic,
        sleep=sleep or stop.sleep,
    )
    budget = None
    if opts.max_cost is not None:
        try:
            budget = Budget(opts.max_cost, load_prices(opts.pricing), provider_name)
        except PricingError as exc:
            raise UsageError(str(exc)) from None
        budget.share(parts)
    collaborators = RunParts(
        client=client,
        limiter=limiter,
        selector=RowSelector(opts.row_selection(), outcomes, held),
        # Ray workers write under names of their own, with the job's run_id in the rows.
        sink=ResultSink(opts.out, sink_name or run_id, part_rows=opts.part_rows),
        stop=stop,
        budget=budget,
        dedupe=Dedupe() if opts.dedupe else None,
    )
    settings = RunnerSettings(
        run_id=run_id,
        provider=provider_name,
        out=Path(opts.out),
        workers=opts.concurrency,
        attempts=Attempts(
            opts.max_attempts, opts.max_retry_time, opts.json_retries, opts.flex_fallback
        ),
        handle_signals=handle_signals,
        structured_output=opts.resolved_provider().structured_output,
    )
    return Runner(
        settings,
        collaborators,
        source,
        progress=progress,
        sleep=sleep,
        budget_topup=budget_topup,
    )


def input_files(opts: RunOptions) -> list[Path]:
    """The run's input files, expanded (folders, globs; hidden files skipped) and each
    checked readable: a pre-flight step, so a missing file is exit 2 with nothing sent."""
    files = expand_sources(list(opts.sources), out=opts.out, say=warn_on_stderr(opts.log_format))
    for path in files:
        check_readable(path)
    return files


def file_source(files: list[Path], max_line_bytes: int) -> RowSource:
    """Rows of whole input files, counted in the background for the ETA."""

    def batches() -> Iterator[list[SourceRow]]:
        return read_rows(files, max_line_bytes=max_line_bytes)

    return RowSource(batches, lambda: count_rows(files))


EVENT_LOOP_ENV = "PIPELINE_EVENT_LOOP"


def event_loop_setting() -> str:
    """``PIPELINE_EVENT_LOOP``, checked: ``auto`` (unset), ``asyncio`` or ``uvloop``.
    Anything else is a usage error, found before anything is sent."""
    choice = os.environ.get(EVENT_LOOP_ENV, "").strip().lower() or "auto"
    if choice not in ("auto", "asyncio", "uvloop"):
        raise UsageError(f"{EVENT_LOOP_ENV}={choice!r}: choose auto, asyncio or uvloop")
    return choice


def event_loop_options(*, virtual_time: bool = False, choice: str | None = None) -> dict[str, Any]:
    """``anyio.run``'s options for the event loop a run uses (``choice``, or
    ``PIPELINE_EVENT_LOOP`` by ``event_loop_setting``).

    ``auto``: uvloop where it is installed (a dependency of the project wherever it
    builds: CPython off Windows and Cygwin), Python's own asyncio loop elsewhere.
    uvloop's loop, sockets and timers are written in C: a zero-latency run executed
    8-10% fewer instructions per request on it (bench/RESULTS.md); rows, limits and
    files are the same on either loop, and the test suite runs both. ``asyncio``: the
    standard library's loop, always. ``uvloop``: uvloop's, or a usage error if it is
    not installed.
    ``virtual_time``: the caller drives time itself (tests: a fake clock that looks
    into asyncio's ready queue, which uvloop does not have), so ``auto`` is asyncio.
    """
    if choice is None:
        choice = event_loop_setting()
    installed = importlib.util.find_spec("uvloop") is not None
    if choice == "uvloop" and not installed:
        raise UsageError(
            f"{EVENT_LOOP_ENV}=uvloop, but uvloop is not installed (pip install uvloop)"
        )
    if choice == "asyncio" or not installed or (choice == "auto" and virtual_time):
        return {}
    return {"backend_options": {"use_uvloop": True}}


class LocalEngine:
    """Every row in this process (or every row of one ``--shard``)."""

    def __init__(
        self,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Awaitable[None]] | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._transport = transport  # tests and benchmarks: a simulator or a mock
        self._sleep = sleep
        self._clock = clock
        self._files: list[Path] = []
        self._runner: Runner | None = None
        self._batches: dict[str, Any] | None = None  # what collecting OUT's batches did
        self._loop: dict[str, Any] = {}

    def inputs(self, opts: RunOptions) -> tuple[RunOptions, list[str]]:
        injected = self._sleep is not None or self._clock is not None
        self._loop = event_loop_options(virtual_time=injected)
        self._files = input_files(opts)
        return opts, [str(f) for f in self._files]

    def connect(self, opts: RunOptions) -> AbstractContextManager[None]:
        return contextlib.nullcontext()

    def prepare(self, job: JobContext) -> None:
        opts = job.opts
        out = Path(opts.out)
        recovered = recover_journals(out)
        if recovered:
            job.progress.message(f"recovered {recovered} results journaled by an interrupted run")
        transport = self._transport
        if transport is None and job.provider_name == "sim":
            transport = sim_transport_for(opts)
        from pipeline.batch.collect import collect_first  # rows of OUT's open batches: held

        held, self._batches = collect_first(job, transport)
        client = make_client(
            opts,
            job.base_urls,
            job.api_key,
            transport=transport,
            notice=lambda text: job.progress.message(text, "warning"),
        )
        self._runner = build_runner(
            opts,
            run_id=job.run_id,
            provider_name=job.provider_name,
            client=client,
            outcomes=load_outcomes(out),
            source=file_source(self._files, opts.max_line_bytes),
            progress=job.progress,
            parts=parse_shard(opts.shard)[1] if opts.shard is not None else 1,
            sleep=self._sleep,
            clock=self._clock,
            held=held,
        )

    def run(self) -> tuple[RunResult, dict[str, Any] | None]:
        assert self._runner is not None, "prepare() first"
        result = anyio.run(self._runner.run, **self._loop)
        result.unsaved = self._runner.sink.unsaved
        return result, None if self._batches is None else {"batches": self._batches}

    def so_far(self) -> RunResult | None:
        if self._runner is None:
            return None
        with contextlib.suppress(Exception):  # closed already unless it never got going
            self._runner.sink.close()
        return self._runner.result
