"""``pipeline run`` as one function: pre-flight checks, lock, resume, run, manifest.

Everything that can fail without spending money (options, inputs, the key, the
lock) is checked before the first request, so exit codes 2 and 4 always mean
"nothing was sent". Once the run's manifest exists, every ending is recorded in it:
an error nobody expected (a bug) still leaves the results so far, a manifest
``failed`` with the error, and exit 5; OUT failing (disk full) is exit 3. A crash is
never reported as exit 1, "some rows failed".
"""

from __future__ import annotations

import os
import signal
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from pipeline import __version__
from pipeline.config import RunOptions, parse_shard, validate
from pipeline.diagnostics import diagnose
from pipeline.engine import Engine, JobContext, engine_for
from pipeline.errors import Exit
from pipeline.lock import OutLock
from pipeline.manifest import mark_dead_runs, new_run_id, run_alive, write_manifest
from pipeline.progress import Progress, Tally
from pipeline.redact import Redactor, plain_http_warnings
from pipeline.runner import RunResult
from pipeline.sink import SinkError, sink_error


def execute(
    opts: RunOptions,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    sleep: Callable[[float], Awaitable[None]] | None = None,
    clock: Callable[[], float] | None = None,
    progress_stream: Any = None,
) -> RunResult:
    """Run a job to the end and return what happened. Raises UsageError / LockedError
    before anything is sent. ``transport``, ``sleep`` and ``clock`` are for tests and
    benchmarks (a simulator, virtual time); the engine decides whether it takes them."""
    validate(opts)
    hooks = {k: v for k, v in (("transport", transport), ("sleep", sleep), ("clock", clock)) if v}
    engine = engine_for(opts, **hooks)
    opts, locations = engine.inputs(opts)
    provider = opts.resolved_provider()
    base_urls = opts.base_urls(provider)
    api_key = opts.api_key(provider)
    opts = opts.with_default_model(provider)

    out = Path(opts.out)
    run_id = new_run_id()
    shard = parse_shard(opts.shard) if opts.shard is not None else None
    # The lock is let go last: after a hard stop, a cluster's workers are gone (and
    # their journals with no live writer) before another run may take this OUT.
    try:
        with OutLock(out, shard) as lock:
            lock.acquire(run_id)
            # After the lock (a second copy exits 4 at once), before anything is written
            # (a cluster that cannot be reached is exit 2 with nothing written).
            with engine.connect(opts), run_alive(out, run_id):
                mark_dead_runs(out, run_id)
                progress = Progress(
                    Tally(),
                    quiet=opts.quiet,
                    log_format=opts.log_format,
                    every=opts.progress_seconds,
                    stream=progress_stream or sys.stderr,
                )
                job = JobContext(
                    opts, run_id, locations, provider.name, base_urls, api_key, progress
                )
                return _run_locked(engine, job)
    except OSError as exc:  # OUT itself: cannot create, lock or mark (nothing sent yet)
        raise sink_error(exc) from exc


def _run_locked(engine: Engine, job: JobContext) -> RunResult:
    """The run proper, OUT locked: from the first manifest on, every ending is recorded."""
    out = Path(job.opts.out)
    for warning in plain_http_warnings(job.base_urls, job.api_key):
        job.progress.message(warning, "warning")
    manifest: dict[str, Any] = {
        "run_id": job.run_id,
        "version": __version__,
        "started_at": datetime.now(UTC).isoformat(),
        "pid": os.getpid(),
        "command": "run",
        "inputs": job.locations,
        "base_urls": job.base_urls,
        "options": job.opts.redacted(),
        "status": "running",
    }
    started = time.monotonic()
    engine.prepare(job)
    try:
        write_manifest(out, job.run_id, manifest)
    except BaseException:
        engine.so_far()  # closes what prepare opened
        raise
    cpu_started = time.process_time()
    try:
        result, about_engine = engine.run()
        if about_engine is not None:
            manifest["engine"] = about_engine
    except BaseException as exc:  # noqa: BLE001 - every ending is recorded, then judged
        result = engine.so_far() or RunResult(job.run_id, out, Tally(), started)
        result.finished = result.finished or time.monotonic()
        result.cpu_seconds = time.process_time() - cpu_started
        _record_crash(result, exc, manifest, job.api_key)
        if not isinstance(exc, Exception | KeyboardInterrupt):
            _finish_manifest(out, manifest, result)
            raise  # SystemExit and the like: recorded, not swallowed
    result.cpu_seconds = time.process_time() - cpu_started
    _finish_manifest(out, manifest, result)
    for note in diagnose(result.tally, result.structured):
        job.progress.notice(note.event())
    return result


def _leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups: what actually went wrong."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def _record_crash(
    result: RunResult, exc: BaseException, manifest: dict[str, Any], api_key: str | None
) -> None:
    """Turn an exception that ended the run into the result's exit code and the
    manifest's error: Ctrl-C is 130, OUT failing is 3, anything else a bug (5)."""
    leaves = _leaves(exc)
    if all(isinstance(leaf, KeyboardInterrupt) for leaf in leaves):
        result.signal = result.signal or int(signal.SIGINT)
        return
    if all(isinstance(leaf, SinkError | OSError) for leaf in leaves) and any(
        isinstance(leaf, SinkError) for leaf in leaves
    ):
        error = next(leaf for leaf in leaves if isinstance(leaf, SinkError))
        result.fatal = result.fatal or str(error)
        return
    bug = next(
        (leaf for leaf in leaves if not isinstance(leaf, KeyboardInterrupt | SinkError)), exc
    )

    redact = Redactor(api_key).text  # the client's own rule, for text that left it
    result.internal = redact(f"{type(bug).__name__}: {bug}")[:2000]
    manifest["traceback"] = redact("".join(traceback.format_exception(bug)))[-20_000:]


def _finish_manifest(out: Path, manifest: dict[str, Any], result: RunResult) -> None:
    """The manifest's final state. If OUT cannot take even that, the run says so
    (exit 3 unless something worse happened); the next run marks it ``killed``."""
    t = result.tally
    code = result.exit_code
    status = "finished" if code in (Exit.OK, Exit.FAILED) else "stopped"
    if result.internal is not None and result.signal is None:
        status = "failed"
    manifest.update(
        status=status,
        finished_at=datetime.now(UTC).isoformat(),
        wall_seconds=round(result.wall_seconds, 3),
        # CPU (user + system, every thread) this process spent sending and writing:
        # with the row counts, the CPU each request cost, start-up left out. Under
        # Ray or in shards, each process counts its own; Ray workers are not counted.
        cpu_seconds=round(result.cpu_seconds, 3) if result.cpu_seconds is not None else None,
        exit_code=code,
        counts={
            "ok": t.status["ok"],
            "error": t.status["error"],
            "invalid_input": t.status["invalid_input"],
            "skipped_done": t.skipped,
            "pending": result.pending,
            "unsaved": result.unsaved,
            "in_batches": result.in_batches,
        },
        tokens={
            "prompt": t.prompt_tokens,
            "cached": t.cached_tokens,
            "completion": t.completion_tokens,
            "reasoning": t.reasoning_tokens,
        },
        rate_limited=t.rate_limited,
        retries=t.retries,
        flex_refusals=t.flex_refusals,  # flex requests refused for capacity (429)
        flex_fallbacks=t.flex_fallbacks,  # rows then sent at the default tier
        fatal=result.fatal,
        signal=result.signal,
        error=result.internal,
        structured_output=result.structured,
        diagnostics=[note.as_dict() for note in diagnose(t, result.structured)],
    )
    try:
        write_manifest(out, str(manifest["run_id"]), manifest)
    except OSError as exc:
        if result.fatal is None:
            result.fatal = f"{sink_error(exc)} (the run's manifest could not be written)"


def summary_line(result: RunResult) -> str:
    """The one line a person (or a cron mail) reads after a run, then one ``note:`` line
    for each thing the server did that explains it (``pipeline.diagnostics``)."""
    t = result.tally
    secs = result.wall_seconds
    finished = t.finished
    rate = finished / secs if secs > 0 else 0.0
    parts = [
        f"run {result.run_id}: {t.status['ok']:,} ok",
        f"{t.status['error']:,} failed",
        f"{t.status['invalid_input']:,} invalid",
    ]
    if t.skipped:
        parts.append(f"{t.skipped:,} already done")
    if result.pending:
        parts.append(f"{result.pending:,} not sent")
    if result.in_batches:
        parts.append(f"{result.in_batches:,} in open batches")
    return (
        ", ".join(parts)
        + f" | tokens in {t.prompt_tokens:,} (cached {t.cached_tokens:,})"
        + f" out {t.completion_tokens:,} (reasoning {t.reasoning_tokens:,})"
        + (f" | ${t.cost_usd:,.4f}" if t.cost_usd else "")
        + f" | {secs:.1f}s, {rate:,.0f} rows/s | results in {result.out}/results"
        + "".join(f"\nnote: {note.message}" for note in diagnose(t, result.structured))
    )
