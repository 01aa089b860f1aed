"""Collecting an OUT's batches: reconcile the ledger with the provider, then turn every
finished batch's lines into result rows.

Each run on an OUT with a ledger does this first, whatever its mode:

1. ``reconcile``: a chunk whose create was journaled but never answered is looked
   for among the provider's batches (``pipeline_out`` + ``pipeline_chunk`` in their
   metadata); found, it is recorded; not found, like a chunk never sent to create,
   it is abandoned and its rows are free again. Nothing is submitted before this.
2. ``collect``: each open batch is retrieved; one that has ended (completed,
   expired, cancelled, failed) has its output and error files downloaded to
   ``OUT/batches/files`` and every line written as a result row (``lines.py``)
   through a ``ResultSink``. Rows not answered go back to pending, with the reason
   counted. A batch whose collection was cut short is collected again, skipping
   the rows ``OUT/results`` already holds for it, so no row is written twice.
3. ``held``: the ids of every chunk still open, which no mode may send meanwhile.
"""

from __future__ import annotations

import shlex
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import httpx
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.batch.api import BatchApi, BatchFatal
from pipeline.batch.chunks import job_from_row_line
from pipeline.batch.ledger import (
    CLOSED,
    COLLECTING,
    CREATING,
    OPEN,
    UPLOADED,
    UPLOADING,
    WRITTEN,
    Chunk,
    Ledger,
    crash_point,
    run_alive,
)
from pipeline.batch.lines import (
    CUSTOM_ID_PREFIX_BYTES,
    MAX_LINE_BYTES,
    custom_id_in_prefix,
    custom_id_of,
    read_line,
    too_large_line,
)
from pipeline.dedupe import Dedupe
from pipeline.engine import JobContext
from pipeline.errors import RequestError
from pipeline.outcome import RunContext
from pipeline.progress import Progress, Tally
from pipeline.request import Job
from pipeline.resume import IdIndex, result_parts
from pipeline.schema import storable
from pipeline.sink import ResultSink

TERMINAL = frozenset({"completed", "expired", "cancelled", "failed"})
MISSING = "in neither the output nor the error file"


@dataclass
class Collected:
    """What collecting did in one run: for the summary, stderr and the manifest."""

    batches: int = 0  # batches collected
    rows: int = 0  # result rows written from them
    pending: Counter[str] = field(default_factory=Counter)  # reason -> rows back to pending
    skipped_lines: int = 0  # lines naming no row of their chunk, repeated, or unreadable
    still_open: int = 0  # batches not ended yet
    open_rows: int = 0  # rows inside them
    found: int = 0  # batches found by their metadata (a create whose answer was lost)
    abandoned: int = 0  # chunks never created: their rows are free again
    problems: list[str] = field(default_factory=list)

    def about(self) -> dict[str, Any]:
        return {
            "batches_collected": self.batches,
            "rows_collected": self.rows,
            "back_to_pending": dict(self.pending),
            "skipped_lines": self.skipped_lines,
            "batches_open": self.still_open,
            "rows_waiting": self.open_rows,
            "found_by_metadata": self.found,
            "chunks_abandoned": self.abandoned,
            "problems": self.problems[:20],
        }


class RowWriter:
    """Result rows into a ``ResultSink``, counted in a ``Tally`` the way the runner counts."""

    def __init__(self, out: Path, name: str, tally: Tally, part_rows: int) -> None:
        self.out, self.name, self.tally, self.part_rows = out, name, tally, part_rows
        self._sink: ResultSink | None = None
        self._opened = 0  # sinks so far: each has a name of its own, so parts never clash

    def write(self, row: dict[str, Any]) -> None:
        if self._sink is None:
            self._opened += 1
            name = f"{self.name}{self._opened}"
            self._sink = ResultSink(self.out, name, part_rows=self.part_rows)
        row = storable(row)
        self._sink.write(row)
        t = self.tally
        t.prompt_tokens += row.get("prompt_tokens") or 0
        t.completion_tokens += row.get("completion_tokens") or 0
        t.cached_tokens += row.get("cached_tokens") or 0
        t.reasoning_tokens += row.get("reasoning_tokens") or 0
        status = row["status"]
        t.status["invalid_input" if row.get("error_type") == "invalid_input" else status] += 1
        if self._sink.part_due:
            self.commit()
            taken = self._sink.take_part()
            if taken is not None:
                rows, part, segment = taken
                ResultSink.sync_segment(segment)
                from pipeline.sink import write_part

                write_part(rows, part)
                self._sink.part_done(segment)

    def commit(self) -> None:
        """Everything written so far survives a kill -9 and a power cut (journal fsync)."""
        if self._sink is not None:
            self._sink.flush()
            self._sink.sync()

    def close(self) -> None:
        if self._sink is not None:
            self._sink.close()
            self._sink = None


def share(row: dict[str, Any], job: Job) -> dict[str, Any]:
    """The row of ``job`` that shares ``row``'s answer: the synchronous dedupe's copy
    (``shared_from``, zero tokens: the answer was billed once, to ``row``)."""
    return Dedupe._copy(row, job)


def written_for(out: Path, batch_id: str) -> set[str]:
    """Ids ``OUT/results`` already holds a row for from ``batch_id`` (a collection cut short)."""
    found: set[str] = set()
    for part in result_parts(out):
        try:
            with pq.ParquetFile(part) as file:
                if "batch_id" not in file.schema_arrow.names:
                    continue
                table = file.read(columns=["id", "batch_id"])
        except (OSError, ValueError, pa.ArrowException):
            continue  # resume refuses an unreadable part before anything is sent
        mask = pc.fill_null(pc.equal(table["batch_id"], batch_id), False)
        found.update(x for x in table["id"].filter(mask).to_pylist() if isinstance(x, str))
    return found


def chunk_rows(ledger: Ledger, chunk: str) -> Iterator[dict[str, Any]]:
    """The rows file of a chunk: one object per request line, in order."""
    import json

    with open(ledger.rows_file(chunk), "rb") as fh:
        for line in fh:
            try:
                about = json.loads(line)
            except ValueError:
                continue
            if isinstance(about, dict) and isinstance(about.get("id"), str):
                yield about


def held_ids(ledger: Ledger, chunks: dict[str, Chunk] | None = None) -> IdIndex:
    """The ids inside every chunk not closed: none of them may be sent meanwhile."""
    arrays: list[pa.Array] = []
    for chunk in (chunks or ledger.chunks()).values():
        if chunk.closed:
            continue
        try:
            ids = [about["id"] for about in chunk_rows(ledger, chunk.chunk)]
        except FileNotFoundError:
            continue  # a chunk whose files are gone cannot be collected either
        arrays.append(pa.array(ids, pa.large_string()))
    return IdIndex(pa.chunked_array(arrays, pa.large_string()))


class Collector:
    """Reconciles and collects the batches of one OUT for one run."""

    def __init__(
        self,
        ledger: Ledger,
        api: BatchApi,
        ctx: RunContext,
        writer: RowWriter,
        progress: Progress,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.ledger = ledger
        self.api = api
        self.ctx = ctx
        self.writer = writer
        self.progress = progress
        self.clock = clock
        self.report = Collected()
        self._token: str | None = None

    @property
    def token(self) -> str:
        if self._token is None:
            self._token = self.ledger.token()
        return self._token

    # -- 1. reconcile -----------------------------------------------------------------

    async def reconcile(self) -> None:
        """Settle every chunk left between ``chunk`` and ``created`` by a dead run (a
        live shard's chunks are its own business)."""
        with self.ledger.locked():
            await self._reconcile()

    async def _reconcile(self) -> None:
        out = self.ledger.out
        chunks = {
            name: c
            for name, c in self.ledger.chunks().items()
            if c.state in (WRITTEN, UPLOADING, UPLOADED, CREATING) and not run_alive(out, c.run)
        }
        unsure = [c for c in chunks.values() if c.state == CREATING]
        for chunk in chunks.values():
            if chunk.state in (WRITTEN, UPLOADING, UPLOADED):
                self._abandon(chunk, "never submitted (the run that wrote it stopped first)")
        if not unsure:
            return
        wanted = {c.chunk: c for c in unsure}
        # The whole list (the API bounds it in pages), never stopping at an old batch:
        # OpenAI lists newest first, a proxy need not, and abandoning a chunk whose
        # batch exists would submit, and bill, its rows twice.
        async for batch in self.api.batches():
            match = self._match(batch, wanted)
            if match is not None:
                self._record_created(match, batch)
                self.report.found += 1
                del wanted[match.chunk]
                if not wanted:
                    break
        for chunk in wanted.values():
            self._abandon(chunk, "the provider has no batch for it (the create never arrived)")

    def _match(self, batch: dict[str, Any], wanted: dict[str, Chunk]) -> Chunk | None:
        metadata = batch.get("metadata")
        if not isinstance(metadata, dict) or metadata.get("pipeline_out") != self.token:
            return None
        name = metadata.get("pipeline_chunk")
        return wanted.get(name) if isinstance(name, str) else None

    def _record_created(self, chunk: Chunk, batch: dict[str, Any]) -> None:
        created = batch.get("created_at")
        self.ledger.append(
            "created",
            chunk.chunk,
            batch_id=batch["id"],
            status=str(batch.get("status") or ""),
            created_at=created if isinstance(created, int | float) else None,
        )

    def _abandon(self, chunk: Chunk, why: str) -> None:
        self.ledger.append("abandoned", chunk.chunk, reason=why)
        self.ledger.remove_files(chunk.chunk)
        self.report.abandoned += 1
        self.progress.message(f"batch chunk {chunk.chunk}: {why}; its rows are pending again")

    # -- 2. collect -------------------------------------------------------------------

    async def collect(self) -> list[Chunk]:
        """Collect every open batch that has ended; returns those still open."""
        with self.ledger.locked():
            return await self._collect_all()

    async def _collect_all(self) -> list[Chunk]:
        still: list[Chunk] = []
        self.report.still_open = self.report.open_rows = 0
        for chunk in self.ledger.chunks().values():
            if chunk.state not in (OPEN, COLLECTING) or chunk.batch_id is None:
                continue
            try:
                batch = await self.api.retrieve(chunk.batch_id)
            except BatchFatal:
                raise
            except RequestError as exc:
                lost = exc.http_status == 404
                out = shlex.quote(str(self.ledger.root.parent))
                hint = (
                    " (a 404 also comes from another key or base URL than the one that made "
                    f"it): if the provider lost it, `pipeline batches {out} --forget "
                    f"{chunk.batch_id}` sends its {chunk.rows:,} rows again"
                    if lost
                    else ""
                )
                self._problem(
                    f"batch {chunk.batch_id}: cannot retrieve it ({exc}); it stays open{hint}"
                )
                still.append(chunk)
                continue
            status = str(batch.get("status") or "")
            counts = batch.get("request_counts")
            counts = counts if isinstance(counts, dict) else {}
            if status != chunk.status or counts != chunk.counts:
                self.ledger.append(
                    "status", chunk.chunk, status=status[:40], counts=_counts(counts)
                )
                chunk.status, chunk.counts = status, counts
            if status not in TERMINAL:
                still.append(chunk)
                continue
            try:
                await self._collect(chunk, batch)
            except BatchFatal:
                raise
            except RequestError as exc:
                self._problem(f"batch {chunk.batch_id}: cannot download its files ({exc})")
                still.append(chunk)
        for chunk in still:
            self.report.still_open += 1
            self.report.open_rows += chunk.rows
        return still

    def _problem(self, text: str) -> None:
        self.report.problems.append(text)
        self.progress.message(text, "warning")

    async def _collect(self, chunk: Chunk, batch: dict[str, Any]) -> None:
        assert chunk.batch_id is not None
        batch_id = chunk.batch_id
        files: list[Path] = []
        for kind, key in (("output", "output_file_id"), ("error", "error_file_id")):
            file_id = batch.get(key)
            if isinstance(file_id, str) and file_id:
                target = self.ledger.output_file(chunk.chunk, kind)
                if chunk.state != COLLECTING or not target.exists():
                    await self.api.download(file_id, target)
                files.append(target)
        again = chunk.state == COLLECTING
        if not again:
            self.ledger.append("collecting", chunk.chunk, batch_id=batch_id)
        done = written_for(self.ledger.out, batch_id) if again else set()
        jobs: dict[str, dict[str, Any]] = {}
        followers: dict[str, list[dict[str, Any]]] = {}  # id -> rows sharing its answer
        for entry in chunk_rows(self.ledger, chunk.chunk):
            leader = entry.get("shared_from")
            if isinstance(leader, str):
                followers.setdefault(leader, []).append(entry)
            else:
                jobs[entry["id"]] = entry
        started = _when(batch.get("created_at")) or _when(chunk.written_at) or datetime.now(UTC)
        answered: set[str] = set()
        # Rows a line sent back to pending (a 5xx, an expiry): a later line for the same
        # id may still carry its billed answer, which must win over a resubmission.
        waiting: dict[str, str] = {}
        pending: Counter[str] = Counter()
        rows = 0

        def settle(custom_id: str, row: dict[str, Any]) -> int:
            """``row`` is the outcome of ``custom_id``: written (unless a collection cut
            short wrote it already), shared with its twins when ok (a twin that got no
            answer goes again on its own); returns the rows written."""
            answered.add(custom_id)
            waiting.pop(custom_id, None)
            shared = followers.pop(custom_id, [])
            written = 0
            if custom_id not in done:
                self.writer.write(row)
                written += 1
            if row["status"] == "ok":
                for twin in shared:
                    if twin["id"] not in done:
                        self.writer.write(share(row, job_from_row_line(twin)))
                        written += 1
            elif shared:
                pending["its identical request got no answer"] += len(shared)
            return written

        # Rows whose answer line (output file: billed) was too long to read: an error
        # at the end, unless a readable line for the same id answers it first.
        too_long: set[str] = set()
        for path in files:
            billed = path == self.ledger.output_file(chunk.chunk, "output")
            for raw in _lines(path):
                if isinstance(raw, _TooLong):
                    custom_id = custom_id_in_prefix(raw.prefix)
                    if custom_id in jobs and custom_id not in answered and billed:
                        too_long.add(custom_id)
                    else:  # unnamed, or an unbilled error line: as before, pending
                        self.report.skipped_lines += 1
                    continue
                custom_id, data = custom_id_of(raw)
                about = jobs.get(custom_id) if custom_id is not None else None
                if custom_id is None or about is None or custom_id in answered:
                    self.report.skipped_lines += 1
                    continue
                job: Job = job_from_row_line(about)
                outcome = read_line(
                    data,
                    job,
                    self.ctx,
                    batch_id=batch_id,
                    base_url=self.api.base,
                    started_at=started,
                    redactor=self.api.redactor,
                )
                if outcome.row is None:
                    if outcome.pending is not None:
                        waiting[custom_id] = outcome.pending
                    continue
                rows += settle(custom_id, outcome.row)
        for custom_id in sorted(too_long - answered):  # billed, and no readable line
            job = job_from_row_line(jobs[custom_id])
            outcome = too_large_line(
                job, self.ctx, batch_id=batch_id, base_url=self.api.base, started_at=started
            )
            assert outcome.row is not None
            rows += settle(custom_id, outcome.row)
        for custom_id, why in waiting.items():
            pending[why] += 1
            shared = followers.pop(custom_id, [])
            if shared:
                pending["its identical request got no answer"] += len(shared)
        missing = len(jobs) - len(answered) - len(waiting)
        missing += sum(len(f) for f in followers.values())
        if missing:
            failed = _batch_error(batch)
            pending[failed or MISSING] += missing
        # Every row in a Parquet part before the chunk is closed: once "collected" its
        # rows are no longer held, and another process (a sibling shard, this run's
        # own --finish-sync) reads only parts, not this process's open journal; rows
        # left there would be neither done nor held, and sent (billed) again.
        self.writer.close()
        crash_point("collected-rows")
        result = {"status": batch.get("status"), "rows": rows, "pending": dict(pending)}
        self.ledger.append(
            "collected",
            chunk.chunk,
            batch_id=batch_id,
            status=str(batch.get("status")),
            result=result,
        )
        self.ledger.remove_files(chunk.chunk)
        self.report.batches += 1
        self.report.rows += rows
        self.report.pending.update(pending)
        if pending:
            reasons = ", ".join(f"{n:,} {why}" for why, n in pending.most_common())
            self.progress.message(
                f"batch {batch_id} ({batch.get('status')}): {sum(pending.values()):,} rows back "
                f"to pending ({reasons}); the next run submits them again "
                "(or sends them now with --finish-sync)",
                "warning",
            )

    def open_chunks(self) -> list[Chunk]:
        return [c for c in self.ledger.chunks().values() if c.state not in CLOSED]


@dataclass(frozen=True, slots=True)
class _TooLong:
    """A line past ``MAX_LINE_BYTES``: only its start is kept, to name its row."""

    prefix: bytes


def _lines(path: Path) -> Iterator[bytes | _TooLong]:
    """A downloaded file's lines, each bounded; a longer one is read past (never held
    whole) and given as its start."""
    with open(path, "rb") as fh:
        while True:
            line = fh.readline(MAX_LINE_BYTES + 1)
            if not line:
                return
            if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
                prefix = line[:CUSTOM_ID_PREFIX_BYTES]
                while line and not line.endswith(b"\n"):
                    line = fh.readline(MAX_LINE_BYTES + 1)
                yield _TooLong(prefix)
                continue
            if line.strip():
                yield line


def _batch_error(batch: dict[str, Any]) -> str | None:
    """Why a batch failed as a whole (``errors.data[0].code``), for its pending rows."""
    errors = batch.get("errors")
    data = errors.get("data") if isinstance(errors, dict) else None
    if isinstance(data, list) and data and isinstance(data[0], dict):
        code = data[0].get("code")
        if isinstance(code, str) and code:
            return code[:100]
    status = batch.get("status")
    return f"batch {status}" if status in ("failed", "expired", "cancelled") else None


def _counts(counts: dict[str, Any]) -> dict[str, int]:
    return {
        k: v
        for k in ("total", "completed", "failed")
        if isinstance(v := counts.get(k), int) and not isinstance(v, bool)
    }


def _when(value: Any) -> datetime | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < 2**33:
        return datetime.fromtimestamp(value, UTC)
    return None


def make_api(
    job: JobContext,
    transport: httpx.AsyncBaseTransport | None,
    sleep: Callable[[float], Awaitable[None]] | None = None,
) -> BatchApi:
    opts = job.opts
    return BatchApi(
        job.base_urls[0],
        job.api_key,
        transport=transport,
        timeout=opts.timeout,
        max_attempts=opts.max_attempts,
        max_retry_time=opts.max_retry_time,
        sleep=sleep,
    )


def collect_first(
    job: JobContext, transport: httpx.AsyncBaseTransport | None
) -> tuple[Any, dict[str, Any] | None]:
    """For a synchronous run on an OUT with batches: collect what has ended, and
    return the ids still held by open batches (the run must not send them) and what
    collecting did (for the manifest). A provider that cannot be reached leaves every
    open batch's rows held, and says so. ``transport``: the run's own (the in-process
    simulator's for provider ``sim``)."""
    out = Path(job.opts.out)
    ledger = Ledger(out)
    if not ledger.exists:
        return frozenset(), None
    tally = Tally()
    writer = RowWriter(out, f"{job.run_id}-batch", tally, job.opts.part_rows)
    ctx = RunContext(run_id=job.run_id, provider=job.provider_name)
    api = make_api(job, transport)
    collector = Collector(ledger, api, ctx, writer, job.progress)

    async def go() -> None:
        try:
            await collector.reconcile()
            await collector.collect()
        finally:
            await api.aclose()

    try:
        anyio.run(go)
    except (BatchFatal, RequestError) as exc:
        collector._problem(f"cannot collect the open batches ({exc}); their rows stay held")
    finally:
        writer.close()
    held = held_ids(ledger)
    if len(held):
        job.progress.message(
            f"{len(held):,} rows are inside open batches of this OUT: this run skips them "
            "(the next run collects them)",
            "warning",
        )
    about = collector.report.about()
    about["rows_collected_ok"] = tally.status["ok"]
    return held, about
