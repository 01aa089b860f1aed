"""``pipeline run`` as one function: pre-flight checks, lock, resume, run, manifest.

Everything that can fail without spending money (options, inputs, the key, the
lock) is checked before the first request, so exit codes 2 and 4 always mean
"nothing was sent".
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import httpx

from pipeline import __version__
from pipeline.client import ChatClient
from pipeline.config import RunOptions, parse_shard, validate
from pipeline.errors import UsageError
from pipeline.lock import OutLock
from pipeline.manifest import new_run_id, write_manifest
from pipeline.progress import Progress, Tally
from pipeline.redact import plain_http_warnings
from pipeline.resume import load_outcomes
from pipeline.runner import Runner, RunResult, make_client
from pipeline.sink import recover_journals
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
        from pipeline.ray_engine import import_ray, ray_session
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
    out.mkdir(parents=True, exist_ok=True)
    run_id = new_run_id()
    lock_name = ".lock" if opts.shard is None else f".lock-shard-{opts.shard.replace('/', '-of-')}"
    # The lock is let go last: after a hard stop, Ray's workers are gone (and their
    # journals with no live writer) before another run may take this OUT.
    with OutLock(out, lock_name) as lock, engine:
        lock.acquire(run_id)
        # After the lock (a second copy exits 4 at once), before the manifest (a
        # cluster that cannot be reached is exit 2 with nothing written).
        ray = engine.enter_context(ray_session(opts)) if on_ray else None
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
        if on_ray:
            from pipeline.ray_engine import run_on_ray

            write_manifest(out, run_id, manifest)

            result, manifest["engine"] = run_on_ray(
                ray,
                opts,
                run_id=run_id,
                locations=locations,
                provider_name=provider.name,
                base_urls=base_urls,
                api_key=api_key,
                progress=progress,
            )
        else:
            if transport is None and provider.name == "sim":
                transport = sim_transport_for(opts)
            client = make_client(opts, base_urls, api_key, transport=transport)
            runner = _local_runner(
                opts, run_id, files, client, provider.name, progress, sleep, clock
            )
            write_manifest(out, run_id, manifest)
            result = anyio.run(runner.run)
        t = result.tally
        manifest.update(
            status="finished" if result.exit_code in (0, 1) else "stopped",
            finished_at=datetime.now(UTC).isoformat(),
            wall_seconds=round(result.wall_seconds, 3),
            exit_code=result.exit_code,
            counts={
                "ok": t.status["ok"],
                "error": t.status["error"],
                "invalid_input": t.status["invalid_input"],
                "skipped_done": t.skipped,
                "pending": result.pending,
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
        )
        write_manifest(out, run_id, manifest)
        return result


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
