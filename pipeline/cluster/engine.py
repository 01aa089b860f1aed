"""``--engine ray``: one job across the processes and machines of a Ray cluster.

Ray Data hands the job's splits (``pipeline.cluster.splits``: pieces of the input files, cut
on line breaks or row groups) to a pool of worker actors. Each worker runs the very
same ``Runner`` as a local run on its split (validation, limiter, retries,
streaming, journal), so a Ray job behaves like a local one, only wider:

- limits hold for the whole job: a ``Coordinator`` actor gives each worker its share
  of ``--concurrency``/``--rpm``/``--tpm`` and leases ``--max-cost`` (see
  ``pipeline.cluster.coordinator``);
- results land in the same ``OUT`` layout, in parts named after each split's writer,
  with the job's run id in every row, so ``report``, ``sql``, ``export`` and resume
  work unchanged;
- a worker that dies loses only its in-flight requests: Ray restarts the actor and
  retries the split; the new worker first compacts the dead one's journal and skips
  the ids it finished, so nothing answered is sent again;
- resume skips ``ok`` ids inside the workers: the driver never loads the ids.

Ray is an optional dependency (``pip install 'pipeline[ray]'``) and is imported only
here, only when asked for.
"""

from __future__ import annotations

import _thread
import contextlib
import dataclasses
import logging
import re
import secrets
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import anyio
import httpx

from pipeline.budget import Budget
from pipeline.cluster.coordinator import HEARTBEAT_SECONDS, Coordinator
from pipeline.cluster.splits import Split, check_location, expand_locations, plan_splits, read_split
from pipeline.config import RunOptions
from pipeline.engine import JobContext
from pipeline.errors import UsageError
from pipeline.gc_tuning import fewer_full_collections
from pipeline.limiter import Limits
from pipeline.local import (
    build_runner,
    event_loop_options,
    event_loop_setting,
    make_client,
    sim_transport_for,
)
from pipeline.progress import Progress, Tally
from pipeline.resume import Outcomes, load_outcomes
from pipeline.runner import GRACE_SECONDS, RowSource, Runner, RunResult
from pipeline.sink import recover_journals
from pipeline.source import warn_on_stderr

NAMESPACE = "pipeline"


def import_ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise UsageError(
            "--engine ray needs Ray: pip install 'pipeline[ray]' (or use --shard I/N)"
        ) from None
    return ray


@dataclasses.dataclass
class JobSpec:
    """What every worker needs to know; holds no secret (the key comes from the
    coordinator, in memory)."""

    opts: RunOptions
    run_id: str
    provider_name: str
    base_urls: list[str]
    coordinator: str  # the coordinator actor's name in NAMESPACE
    # The driver's PIPELINE_EVENT_LOOP: a worker's own environment is Ray's, not the
    # user's shell. A worker without uvloop installed runs on asyncio (``auto``).
    event_loop: str = "auto"


def worker_loop_options(setting: str) -> dict[str, Any]:
    """A worker's event loop from the driver's ``PIPELINE_EVENT_LOOP`` (``setting``).

    ``asyncio`` is kept. ``auto`` and ``uvloop`` both mean uvloop wherever this worker
    has it installed and asyncio where it has not: the driver cannot see the workers'
    machines, and a split is better run on asyncio than failed for want of uvloop.
    """
    return event_loop_options(choice="asyncio" if setting == "asyncio" else "auto")


def _counts(runner: Runner) -> dict[str, Any]:
    """What a worker reports for its split (cumulative), in COUNTS' names and more."""
    t = runner.tally
    counts: dict[str, Any] = dict(t.to_counts())
    counts["pending"] = runner.result.pending
    # Every request after a row's first try is a retry (429s included), so first
    # tries that ended a row, re-asks after bad JSON and retries are all answers.
    counts["answers"] = t.finished + t.superseded + t.retries
    counts["spent_usd"] = runner.budget.spent if runner.budget else 0.0
    counts["largest_completion"] = runner.budget.largest_completion if runner.budget else 0
    counts["structured"] = runner.structured.report()  # the modes this split used
    if runner.result.fatal and not runner.result.signal:
        counts["fatal"] = runner.result.fatal
    return counts


class SplitWorker:
    """A Ray Data actor: runs splits one after another with the local Runner."""

    spec: JobSpec  # set on a subclass made per job (see _run_dataset)

    def __init__(self) -> None:
        ray = import_ray()
        spec = self.spec
        self.coordinator = ray.get_actor(spec.coordinator, namespace=NAMESPACE)
        self.api_key: str | None = ray.get(self.coordinator.key.remote())
        out = Path(spec.opts.out)
        # A worker that died before us left a journal: make it Parquet, so the ids it
        # finished are skipped below instead of being sent (and billed) again.
        recover_journals(out)
        self.outcomes: Outcomes = load_outcomes(out)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        names, summaries = [], []
        for text in batch["split"]:
            split = Split.from_json(str(text))
            names.append(split.name)
            summaries.append(self.run_split(split))
        return {"split": names, "ok": [s["ok"] for s in summaries]}

    def run_split(self, split: Split) -> dict[str, Any]:
        spec = self.spec
        opts = dataclasses.replace(spec.opts, limit=None, shard=None)
        writer = f"{spec.run_id}-w{secrets.token_hex(4)}"
        transport: httpx.AsyncBaseTransport | None = None
        if spec.provider_name == "sim":
            transport = sim_transport_for(opts)
        client = make_client(opts, spec.base_urls, self.api_key, transport=transport)
        runner = build_runner(
            opts,
            run_id=spec.run_id,
            provider_name=spec.provider_name,
            client=client,
            outcomes=self.outcomes,
            source=RowSource(lambda: read_split(split)),
            sink_name=writer,
            budget_topup=lambda budget, amount: self._top_up(runner, writer, budget, amount),
            handle_signals=False,
        )
        if runner.budget is not None:  # everything this worker spends is leased first
            runner.budget.give_back(runner.budget.cap)
        share = _get(self.coordinator.register.remote(writer))
        self._apply(runner, share)
        runner.limiter.start_empty()
        if share["stop"]:
            runner.stop()  # the job is stopping: leave the split pending
        with fewer_full_collections():
            anyio.run(self._run, runner, writer, **worker_loop_options(self.spec.event_loop))
        counts = _counts(runner)
        _get(self.coordinator.finish.remote(writer, counts))
        return counts

    async def _run(self, runner: Runner, writer: str) -> None:
        async with anyio.create_task_group() as tg:

            async def heartbeat() -> None:
                while True:
                    await anyio.sleep(HEARTBEAT_SECONDS)
                    counts = _counts(runner)
                    share = await self.coordinator.heartbeat.remote(writer, counts)
                    self._apply(runner, share)
                    await self._trim_grant(runner, writer, share["budget_slice"])

            tg.start_soon(heartbeat)
            await runner.run()
            tg.cancel_scope.cancel()

    @staticmethod
    def _apply(runner: Runner, share: dict[str, Any]) -> None:
        runner.limiter.set_share(
            Limits(share["concurrency"], share["rpm"], share["tpm"]), workers=share["workers"]
        )
        if runner.budget is not None:
            runner.budget.learn_completion(share["largest_completion"])
        if share["stop"] and not runner.stopping:
            runner.stop()

    async def _top_up(
        self, runner: Runner, writer: str, budget: Budget, amount: float
    ) -> bool | None:
        """Lease enough of the job's --max-cost for a request of ``amount`` USD: True
        when leased, None to ask again later, False when the job has none left.

        Asked while our own requests are in flight too: waiting for all of them before
        each lease would hold a worker to a slice's worth of requests in flight.
        """
        had_holds = budget.holds > 0  # (they may settle while we ask)
        if not had_holds:
            # Nothing of ours in flight: what we were granted and did not spend goes
            # back first, for a worker that may need it more than our remainder.
            spare = budget.unspent()  # (nothing is reserved)
            if spare > 0:
                budget.give_back(spare)
                await self.coordinator.give_back.remote(writer, spare)
        want = amount - budget.unspent()
        granted = await self.coordinator.grant.remote(writer, max(want, 1e-9))
        if granted > 0:
            budget.lease(granted)
            return True
        if had_holds or budget.holds > 0:
            return None  # our own answers settle first; then the request is tried again
        if granted < 0:
            cap = self.spec.opts.max_cost
            message = (
                f"budget: the job's --max-cost ${cap:g} is spent or held by requests "
                f"in flight; the next request (up to ${amount:.4f}) would pass it"
            )
            runner.stop(message)
            await self.coordinator.stop.remote(message)
            return False
        # Other workers' answers are settling: look again in a moment (the request's
        # hold is worked out again too, with what the job has learned meanwhile).
        await anyio.sleep(HEARTBEAT_SECONDS)
        return None

    async def _trim_grant(self, runner: Runner, writer: str, keep: float) -> None:
        """Hand back lease beyond ``keep`` unspent, so no worker sits on budget that
        another one is refused."""
        budget = runner.budget
        if budget is None:
            return
        spare = budget.unspent(keep)
        if spare > keep:
            budget.give_back(spare)
            await self.coordinator.give_back.remote(writer, spare)


def _get(ref: Any) -> Any:
    import ray

    return ray.get(ref)


CONNECT_TIMEOUT = 10.0  # seconds to reach --ray-address before giving up (exit 2)


@contextlib.contextmanager
def ray_session(opts: RunOptions) -> Iterator[Any]:
    """Connect to the cluster at --ray-address, or start a local Ray instance; shut
    down on exit what we started.

    Entered after OUT's lock and before the manifest: a cluster that cannot be reached
    is a usage error (exit 2, nothing sent or written), not a traceback or a hang.
    """
    ray = import_ray()
    _quiet_ray()
    if ray.is_initialized():  # embedded (tests, notebooks): use the caller's
        yield ray
        return
    address = opts.ray_address
    _probe(address)
    try:
        ray.init(
            address=address,
            namespace=NAMESPACE,
            include_dashboard=False,
            logging_level=logging.WARNING,
            log_to_driver=False,
        )
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"--ray-address {address}: cannot connect" if address else "cannot start Ray"
        raise UsageError(f"{where} ({exc})") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def _probe(address: str | None) -> None:
    """Fail fast on a host:port nobody answers: Ray itself retries for minutes."""
    if not address or address in ("auto", "local"):
        return
    match = re.match(r"^(?:ray://)?\[?([^\]/]+?)\]?:(\d+)$", address)
    if match is None:
        return
    host, port = match.group(1), int(match.group(2))
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT).close()
    except OSError as exc:
        raise UsageError(f"--ray-address {address}: cannot connect ({exc})") from None


class _DropNotices(logging.Filter):
    """Ray's start-up notices are not the user's business on a cron job's stderr."""

    NOTICES = ("Token authentication is enabled", "Progress bars disabled")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(notice in message for notice in self.NOTICES)


def _quiet_ray() -> None:
    for name in ("ray", "ray.data"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.WARNING)
        if not any(isinstance(f, _DropNotices) for f in logger.filters):
            logger.addFilter(_DropNotices())
        for handler in logger.handlers:
            if not any(isinstance(f, _DropNotices) for f in handler.filters):
                handler.addFilter(_DropNotices())


def pool_size(ray: Any, opts: RunOptions) -> int:
    """--ray-workers, else one worker per CPU of the cluster."""
    if opts.ray_workers:
        return opts.ray_workers
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def run_on_ray(
    ray: Any,
    opts: RunOptions,
    *,
    run_id: str,
    locations: list[str],
    provider_name: str,
    base_urls: list[str],
    api_key: str | None,
    progress: Progress,
) -> tuple[RunResult, dict[str, Any]]:
    """Run every split on a Ray worker pool and wait; the caller holds OUT's lock.
    Returns the result and, for the manifest, how the job was spread."""
    started_at = time.monotonic()
    out = Path(opts.out)
    # Journals of a run that died become Parquet before any worker starts, so every
    # worker's done ids include them.
    recovered = recover_journals(out)
    if recovered:
        progress.message(f"recovered {recovered} results journaled by an interrupted run")
    # One worker per --concurrency slot at most: every worker has at least one.
    workers = min(pool_size(ray, opts), opts.concurrency)
    splits = plan_splits(locations, workers, opts.split_rows, max_line_bytes=opts.max_line_bytes)
    workers = max(1, min(workers, len(splits)))
    tally = Tally(total=sum(s.rows for s in splits) or None)
    progress.tally = tally
    result = RunResult(run_id, out, tally, started_at)
    if not splits:  # empty inputs: nothing to do is a success
        result.finished = time.monotonic()
        progress.close()
        return result, {"name": "ray", "workers": 0, "splits": 0}
    actor = ray.remote(num_cpus=0)(Coordinator)
    name = f"coordinator-{run_id}"
    coordinator = actor.options(name=name, namespace=NAMESPACE).remote(
        concurrency=opts.concurrency,
        rpm=opts.rpm,
        tpm=opts.tpm,
        max_cost=opts.max_cost,
        pool_size=workers,
        splits=len(splits),
    )
    try:
        ray.get(coordinator.set_key.remote(api_key))
        spec = JobSpec(opts, run_id, provider_name, base_urls, name, event_loop_setting())
        progress.message(f"ray: {len(splits)} splits on {workers} workers")
        failure = None
        try:
            _run_dataset(ray, coordinator, spec, splits, workers, tally, progress, result)
        except KeyboardInterrupt:
            if result.signal is None:  # not one of ours: Ray's own handling, pass it on
                raise
            progress.message("stopping now: journaled answers are kept", "warning")
        except Exception as exc:  # a worker raised: results so far are kept, say why
            failure = f"a Ray worker failed: {str(exc).strip().splitlines()[-1][:500]}"
        finished = ray.get(coordinator.finished.remote())
        stop = ray.get(coordinator.share.remote())["stop"]
    finally:
        ray.kill(coordinator)
    tally.cost_usd = finished["spent_usd"]
    result.structured = finished["structured"]
    result.pending = int(finished["counts"]["pending"])
    if failure is not None:
        result.internal = failure  # not a condition of the job's: exit 5, never 1 or 3
    elif stop and result.signal is None:
        result.fatal = stop
    _final_counts(out, run_id, tally, finished)
    result.finished = time.monotonic()
    progress.close()
    return result, {"name": "ray", "workers": workers, "splits": len(splits)}


def _run_dataset(
    ray: Any,
    coordinator: Any,
    spec: JobSpec,
    splits: list[Split],
    workers: int,
    tally: Tally,
    progress: Progress,
    result: RunResult,
) -> None:
    from ray.data import ActorPoolStrategy, DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    items = [{"split": s.to_json()} for s in splits]
    # The job travels inside the worker class, not as constructor arguments: Ray keeps
    # those in the object store, where a restart after a crash may no longer find them.
    worker_class = type("SplitWorker", (SplitWorker,), {"spec": spec})
    dataset = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        worker_class,
        batch_size=1,
        compute=ActorPoolStrategy(size=workers),
        num_cpus=1,
    )
    done = threading.Event()
    signals = _SignalRelay(result, progress)

    def watch() -> None:
        """The driver's progress line (from the coordinator's totals), and the stop a
        signal asked for: sent from here, not from inside the signal handler, which
        may have interrupted Ray's own code."""
        beat = 0
        while not done.wait(0.2):
            if signals.relay(coordinator):
                continue
            beat += 1
            if beat % 5:
                continue
            try:
                totals = ray.get(coordinator.totals.remote(), timeout=5)
            except Exception:  # noqa: BLE001 - progress must never fail the job
                continue
            tally.set_counts(totals)
            progress.tick()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        with signals:
            for _ in dataset.iter_rows():
                pass
    finally:
        done.set()
        watcher.join(5)


class _SignalRelay:
    """First SIGINT/SIGTERM: tell every worker to stop dispatch and finish what is in
    flight (as a local run does), for at most GRACE_SECONDS. A second one, or the end
    of the grace: stop now (KeyboardInterrupt in the driver; journaled answers stay)."""

    def __init__(self, result: RunResult, progress: Progress) -> None:
        self.result = result
        self.progress = progress
        self._saved: dict[int, Any] = {}
        self._unsent: int | None = None  # a signal whose stop is not sent yet
        self._deadline: float | None = None

    def __enter__(self) -> _SignalRelay:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._saved[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._saved.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.result.signal is not None:
            raise KeyboardInterrupt
        self.result.signal = signum
        self._unsent = signum
        self._deadline = time.monotonic() + GRACE_SECONDS
        self.progress.message(
            f"{signal.Signals(signum).name}: no new requests; workers finish those in "
            f"flight, for {GRACE_SECONDS:.0f}s at most (again to stop now)",
            "warning",
        )

    def relay(self, coordinator: Any) -> bool:
        """Called from the watcher thread: send a pending stop; past the grace, stop
        the driver now. True when it did something."""
        signum = self._unsent  # the handler sets it once; only this thread clears it
        if signum is not None:
            self._unsent = None
            coordinator.stop.remote(f"stopped by {signal.Signals(signum).name}", signum)
            return True
        if self._deadline is not None and time.monotonic() > self._deadline:
            self._deadline = None
            _thread.interrupt_main()
            return True
        return False


def _final_counts(out: Path, run_id: str, tally: Tally, finished: dict[str, Any]) -> None:
    """The job's counts: what finished splits reported, plus what writers that did not
    finish (a worker that died, or was stopped by a second Ctrl-C) left on disk.

    A dead worker took its report with it, but not its journal: its rows were
    recovered into Parquet and are counted here; its split's retry counted them as
    already done, so they are taken out of ``skipped``. Only those writers' parts
    are read, never the whole job's ids.
    """
    counts = finished["counts"]
    tally.set_counts(counts)
    recover_journals(out)
    done = set(finished["writers"])
    parts = [
        str(part)
        for folder in sorted((out / "results").glob(f"{run_id}-w*"))
        if folder.name not in done
        for part in sorted(folder.glob("*.parquet"))
    ]
    lost = 0
    if parts:
        import duckdb

        from pipeline.query import duckdb_file_list  # OUT may hold glob characters

        con = duckdb.connect()
        # Tokens over every row (all were billed); outcomes by the latest row per id,
        # past rejected answers that were asked again (``superseded``: no outcome).
        row = con.execute(
            """
            WITH rows AS (SELECT * FROM read_parquet(?, union_by_name = true)),
            latest AS (
                SELECT arg_max(status, finished_at) AS status,
                       arg_max(error_type, finished_at) AS error_type
                FROM rows WHERE superseded IS NOT TRUE GROUP BY id
            )
            SELECT
                (SELECT count(*) FILTER (status = 'ok') FROM latest),
                (SELECT count(*) FILTER (error_type = 'invalid_input') FROM latest),
                (SELECT count(*) FROM latest),
                (SELECT coalesce(sum(prompt_tokens), 0) FROM rows),
                (SELECT coalesce(sum(cached_tokens), 0) FROM rows),
                (SELECT coalesce(sum(completion_tokens), 0) FROM rows),
                (SELECT coalesce(sum(reasoning_tokens), 0) FROM rows)
            """,
            [duckdb_file_list(map(Path, parts))],
        ).fetchone()
        con.close()
        assert row is not None
        ok, invalid, lost, prompt, cached, completion, reasoning = (int(x) for x in row)
        tally.status["ok"] += ok
        tally.status["invalid_input"] += invalid
        tally.status["error"] += lost - ok - invalid
        tally.prompt_tokens += prompt
        tally.cached_tokens += cached
        tally.completion_tokens += completion
        tally.reasoning_tokens += reasoning
    tally.skipped = max(0, tally.skipped - lost)


class RayEngine:
    """Splits of the inputs on a Ray cluster's worker pool (``--engine ray``)."""

    def __init__(self, **hooks: Any) -> None:
        if any(v is not None for v in hooks.values()):
            raise UsageError("a transport, clock or sleep can only drive --engine local")
        self._ray: Any = None
        self._job: JobContext | None = None

    def inputs(self, opts: RunOptions) -> tuple[RunOptions, list[str]]:
        import_ray()  # not installed: exit 2 now, not after the lock and the manifest
        event_loop_setting()  # a PIPELINE_EVENT_LOOP that names no loop: exit 2 now too
        locations = expand_locations(
            list(opts.sources), out=opts.out, say=warn_on_stderr(opts.log_format)
        )
        for location in locations:
            check_location(location)
        return _absolute_paths(opts), locations  # workers run elsewhere, in other folders

    @contextlib.contextmanager
    def connect(self, opts: RunOptions) -> Iterator[None]:
        with ray_session(opts) as ray:
            self._ray = ray
            yield

    def prepare(self, job: JobContext) -> None:
        self._job = job

    def run(self) -> tuple[RunResult, dict[str, Any] | None]:
        job = self._job
        assert job is not None and self._ray is not None, "connect() and prepare() first"
        return run_on_ray(
            self._ray,
            job.opts,
            run_id=job.run_id,
            locations=job.locations,
            provider_name=job.provider_name,
            base_urls=job.base_urls,
            api_key=job.api_key,
            progress=job.progress,
        )

    def so_far(self) -> RunResult | None:
        return None  # the workers' journals hold what they got to; the next run compacts


def _absolute_paths(opts: RunOptions) -> RunOptions:
    """Paths as the driver sees them: workers may run in another folder or host."""

    def absolute(path: Path | None) -> Path | None:
        return None if path is None else Path(path).absolute()

    return dataclasses.replace(
        opts,
        out=Path(opts.out).absolute(),
        pricing=absolute(opts.pricing),
        image_root=absolute(opts.image_root),
        providers_file=absolute(opts.providers_file),
    )
