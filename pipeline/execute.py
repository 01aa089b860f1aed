"""``pipeline run`` as one function: pre-flight checks, lock, resume, run, manifest.

Everything that can fail without spending money (options, inputs, the key, the
lock) is checked before the first request, so exit codes 2 and 4 always mean
"nothing was sent". Once the run's manifest exists, every ending is recorded in it:
an error nobody expected (a bug) still leaves the results so far, a manifest
``failed`` with the error, and exit 5; OUT failing (disk full) is exit 3. A crash is
never reported as exit 1, "some rows failed".
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import httpx

from pipeline import __version__
from pipeline.client import ChatClient
from pipeline.config import RunOptions, parse_shard, validate
from pipeline.errors import Exit, UsageError
from pipeline.lock import OutLock
from pipeline.manifest import mark_dead_runs, new_run_id, run_alive, write_manifest
from pipeline.progress import Progress, Tally
from pipeline.redact import plain_http_warnings
from pipeline.resume import load_outcomes
from pipeline.runner import Runner, RunResult, make_client
from pipeline.sink import SinkError, recover_journals, sink_error
from pipeline.source import check_readable, expand_sources, warn_on_stderr


def _absolute_paths(opts: RunOptions) -> RunOptions:
    def absolute(path: Path | None) -> Path | None:
        return None if path is None else Path(path).absolute()

    return dataclasses.replace(
        opts,
        out=Path(opts.out).absolute(),
        pricing=absolute(opts.pricing),
        image_root=absolute(opts.image_root),
        providers_file=absolute(opts.providers_file),
    )


def share_limits(runner: Runner, opts: RunOptions, parts: int) -> None:
    """Give one of ``parts`` processes its share of limits meant for the whole job.

    ``--rpm``, ``--tpm``, ``--concurrency`` and ``--max-cost`` describe the job: N
    shards each at the full ``--rpm`` would hit the gateway N times too fast.
    """
    runner.limiter.set_share(
        max(1, opts.concurrency // parts),
        opts.rpm / parts if opts.rpm else None,
        opts.tpm / parts if opts.tpm else None,
        workers=parts,
    )
    if runner.budget is not None and opts.max_cost is not None:
        runner.budget.cap = opts.max_cost / parts


def sim_transport_for(opts: RunOptions) -> httpx.AsyncBaseTransport:
    """The in-process simulator, with the knobs of the job's [sim] table / --sim."""
    from pipeline.sim import SimConfig, Simulator, sim_transport

    try:
        config = SimConfig(**opts.sim)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"simulator settings: {exc}") from None
    return sim_transport(Simulator(config))


def execute(
    opts: RunOptions,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    sleep: Callable[[float], Awaitable[None]] | None = None,
    clock: Callable[[], float] | None = None,
    progress_stream: Any = None,
) -> RunResult:
    """Run a job to the end and return what happened. Raises UsageError / LockedError
    before anything is sent."""
    validate(opts)
    on_ray = opts.engine == "ray"
    engine = contextlib.ExitStack()
    if on_ray:
        from pipeline.ray_engine import import_ray
        from pipeline.splits import check_location, expand_locations

        import_ray()  # not installed: exit 2 now, not after the lock and the manifest
        locations = expand_locations(
            list(opts.sources), out=opts.out, say=warn_on_stderr(opts.log_format)
        )
        for location in locations:
            check_location(location)
        files: list[Path] = []
        opts = _absolute_paths(opts)  # workers may run in another folder or on another host
    else:
        files = expand_sources(
            list(opts.sources), out=opts.out, say=warn_on_stderr(opts.log_format)
        )
        for path in files:
            check_readable(path)
        locations = [str(f) for f in files]
    provider = opts.resolved_provider()
    base_urls = opts.base_urls(provider)
    api_key = opts.api_key(provider)
    if opts.model is None and provider.default_model and not opts.base_url:
        opts = dataclasses.replace(opts, model=provider.default_model)

    out = Path(opts.out)
    run_id = new_run_id()
    shard = parse_shard(opts.shard) if opts.shard is not None else None
    # The lock is let go last: after a hard stop, Ray's workers are gone (and their
    # journals with no live writer) before another run may take this OUT.
    try:
        with OutLock(out, shard) as lock, engine:
            lock.acquire(run_id)
            # After the lock (a second copy exits 4 at once), before anything is written
            # (a cluster that cannot be reached is exit 2 with nothing written).
            ray = engine.enter_context(ray_session_for(opts)) if on_ray else None
            with run_alive(out, run_id):
                mark_dead_runs(out, run_id)
                return _run_locked(
                    opts,
                    run_id,
                    ray=ray,
                    locations=locations,
                    files=files,
                    provider_name=provider.name,
                    base_urls=base_urls,
                    api_key=api_key,
                    transport=transport,
                    sleep=sleep,
                    clock=clock,
                    progress_stream=progress_stream,
                )
    except OSError as exc:  # OUT itself: cannot create, lock or mark (nothing sent yet)
        raise sink_error(exc) from exc


def _run_locked(
    opts: RunOptions,
    run_id: str,
    *,
    ray: Any,
    locations: list[str],
    files: list[Path],
    provider_name: str,
    base_urls: list[str],
    api_key: str | None,
    transport: httpx.AsyncBaseTransport | None,
    sleep: Callable[[float], Awaitable[None]] | None,
    clock: Callable[[], float] | None,
    progress_stream: Any,
) -> RunResult:
    """The run proper, OUT locked: from the first manifest on, every ending is recorded."""
    out = Path(opts.out)
    on_ray = ray is not None
    progress = Progress(
        Tally(),
        quiet=opts.quiet,
        log_format=opts.log_format,
        every=opts.progress_seconds,
        stream=progress_stream or sys.stderr,
    )
    for warning in plain_http_warnings(base_urls, api_key):
        progress.message(warning, "warning")
    manifest: dict[str, Any] = {
        "run_id": run_id,
        "version": __version__,
        "started_at": datetime.now(UTC).isoformat(),
        "pid": os.getpid(),
        "command": "run",
        "inputs": locations,
        "base_urls": base_urls,
        "options": opts.redacted(),
        "status": "running",
    }
    started = time.monotonic()
    runner: Runner | None = None
    if not on_ray:
        if transport is None and provider_name == "sim":
            transport = sim_transport_for(opts)
        client = make_client(opts, base_urls, api_key, transport=transport)
        runner = _local_runner(opts, run_id, files, client, provider_name, progress, sleep, clock)
    try:
        write_manifest(out, run_id, manifest)
    except BaseException:
        if runner is not None:
            with contextlib.suppress(Exception):
                runner.sink.close()
        raise
    try:
        if on_ray:
            from pipeline.ray_engine import run_on_ray

            result, manifest["engine"] = run_on_ray(
                ray,
                opts,
                run_id=run_id,
                locations=locations,
                provider_name=provider_name,
                base_urls=base_urls,
                api_key=api_key,
                progress=progress,
            )
        else:
            assert runner is not None
            result = anyio.run(runner.run)
    except BaseException as exc:  # noqa: BLE001 - every ending is recorded, then judged
        result = runner.result if runner is not None else RunResult(run_id, out, Tally(), started)
        result.finished = result.finished or time.monotonic()
        if runner is not None:  # closed already unless the run never got going
            with contextlib.suppress(Exception):
                runner.sink.close()
        _record_crash(result, exc, manifest, api_key)
        if not isinstance(exc, Exception | KeyboardInterrupt):
            _finish_manifest(out, manifest, result)
            raise  # SystemExit and the like: recorded, not swallowed
    if runner is not None:
        result.unsaved = runner.sink.unsaved
    _finish_manifest(out, manifest, result)
    return result


def ray_session_for(opts: RunOptions) -> contextlib.AbstractContextManager[Any]:
    from pipeline.ray_engine import ray_session

    return ray_session(opts)


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

    def redact(text: str) -> str:
        return text.replace(api_key, "[redacted]") if api_key else text

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
        exit_code=code,
        counts={
            "ok": t.status["ok"],
            "error": t.status["error"],
            "invalid_input": t.status["invalid_input"],
            "skipped_done": t.skipped,
            "pending": result.pending,
            "unsaved": result.unsaved,
        },
        tokens={
            "prompt": t.prompt_tokens,
            "cached": t.cached_tokens,
            "completion": t.completion_tokens,
            "reasoning": t.reasoning_tokens,
        },
        rate_limited=t.rate_limited,
        retries=t.retries,
        fatal=result.fatal,
        signal=result.signal,
        error=result.internal,
    )
    try:
        write_manifest(out, str(manifest["run_id"]), manifest)
    except OSError as exc:
        if result.fatal is None:
            result.fatal = f"{sink_error(exc)} (the run's manifest could not be written)"


def _local_runner(
    opts: RunOptions,
    run_id: str,
    files: list[Path],
    client: ChatClient,
    provider_name: str,
    progress: Progress,
    sleep: Callable[[float], Awaitable[None]] | None,
    clock: Callable[[], float] | None,
) -> Runner:
    """This process runs every row (or every row of one ``--shard``)."""
    out = Path(opts.out)
    recovered = recover_journals(out)
    if recovered:
        progress.message(f"recovered {recovered} results journaled by an interrupted run")
    runner = Runner(
        opts,
        run_id=run_id,
        files=files,
        outcomes=load_outcomes(out),
        client=client,
        provider_name=provider_name,
        progress=progress,
        sleep=sleep,
        clock=clock,
    )
    if opts.shard is not None:
        share_limits(runner, opts, parse_shard(opts.shard)[1])
    return runner


def summary_line(result: RunResult) -> str:
    """The one line a person (or a cron mail) reads after a run."""
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
    return (
        ", ".join(parts)
        + f" | tokens in {t.prompt_tokens:,} (cached {t.cached_tokens:,})"
        + f" out {t.completion_tokens:,} (reasoning {t.reasoning_tokens:,})"
        + (f" | ${t.cost_usd:,.4f}" if t.cost_usd else "")
        + f" | {secs:.1f}s, {rate:,.0f} rows/s | results in {result.out}/results"
    )
