"""Pending rows into Batch-API request files: one model per file, within the limits.

A request file line is ``{"custom_id", "method": "POST", "url":
"/v1/chat/completions", "body"}`` with the body a synchronous run would send (it
never streams). Next to each request file, ``<chunk>.rows.jsonl`` keeps, line for
line, what a result row needs that the provider never sees (the row's place, its
metadata, the columns carried through), so collecting needs no input file; it also
lists the rows that share an identical request's answer (dedupe), which are held and
answered with it.

Files are written under their final name and fsynced (the file and the folder)
before the chunk is entered in the ledger: a chunk the ledger names is whole on
disk. A file the ledger does not name was never submitted and is cleared away.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from pipeline.manifest import fsync_dir
from pipeline.request import Job

MAX_LINES = 50_000  # OpenAI's limit per batch input file
MAX_BYTES = 200 * 2**20  # and its size limit
ENDPOINT = "/v1/chat/completions"
# A batch line never streams, and it is billed at batch prices whatever tier the
# synchronous calls of the same job ask for (--service-tier applies to those only).
_NOT_IN_A_BATCH = frozenset({"stream", "stream_options", "service_tier"})


@dataclass(frozen=True, slots=True)
class ChunkLimits:
    max_lines: int = MAX_LINES
    max_bytes: int = MAX_BYTES


@dataclass(frozen=True, slots=True)
class ClosedChunk:
    """A request file whole on disk, ready to enter the ledger and be submitted."""

    chunk: str
    model: str
    rows: int
    bytes: int


def request_line(job: Job) -> bytes:
    """One request file line for ``job``: the synchronous body, never streamed."""
    body = {k: v for k, v in job.body.items() if k not in _NOT_IN_A_BATCH}
    line = {"custom_id": job.id, "method": "POST", "url": ENDPOINT, "body": body}
    return (json.dumps(line, ensure_ascii=False) + "\n").encode("utf-8")


def row_line(job: Job, shared_from: str | None = None) -> bytes:
    """What a result row needs of ``job`` besides the answer (see the module doc).
    ``shared_from``: the id whose identical request answers this row (dedupe)."""
    about: dict[str, Any] = {
        "id": job.id,
        "model": job.model,
        "request_hash": job.request_hash,
        "source_file": job.source_file,
        "source_line": job.source_line,
        "metadata": job.metadata,
        "carried": job.carried,
    }
    fmt = job.body.get("response_format")
    if fmt is not None:
        about["response_format"] = fmt
    if shared_from is not None:
        about["shared_from"] = shared_from
    return (json.dumps(about, ensure_ascii=False, default=str) + "\n").encode("utf-8")


def job_from_row_line(about: dict[str, Any]) -> Job:
    """The ``Job`` a result row is built from, as ``row_line`` kept it."""
    body: dict[str, Any] = {"model": about.get("model") or ""}
    if about.get("response_format") is not None:
        body["response_format"] = about["response_format"]
    carried = about.get("carried")
    line = about.get("source_line")
    return Job(
        id=str(about["id"]),
        body=body,
        request_hash=str(about.get("request_hash") or ""),
        source_file=str(about.get("source_file") or ""),
        source_line=line if isinstance(line, int) else 0,
        metadata=about.get("metadata"),
        carried=carried if isinstance(carried, dict) else {},
    )


class _Open:
    """The chunk being filled for one model."""

    def __init__(self, name: str, model: str, folder: Path) -> None:
        self.name = name
        self.model = model
        self.lines = 0
        self.bytes = 0
        self.requests: IO[bytes] = _create(folder / f"{name}.jsonl")
        self.rows: IO[bytes] = _create(folder / f"{name}.rows.jsonl")
        self.leaders: dict[str, str] = {}  # request hash -> the id sending it

    def close(self) -> None:
        for fh in (self.requests, self.rows):
            fh.flush()
            os.fsync(fh.fileno())
            fh.close()


def _create(path: Path) -> IO[bytes]:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    return os.fdopen(fd, "wb")


class ChunkWriter:
    """Split jobs by model into request files of at most ``limits``; ``ready`` is
    called with each file as soon as it is full (and at ``close`` for the rest)."""

    def __init__(
        self,
        folder: Path,
        prefix: str,
        ready: Callable[[ClosedChunk], None],
        limits: ChunkLimits = ChunkLimits(),
    ) -> None:
        self.folder = folder
        self.prefix = prefix
        self.limits = limits
        self._ready = ready
        self._open: dict[str, _Open] = {}
        self._seq = 0

    def fits(self, job: Job) -> bool:
        """Whether the job's request line fits in one file at all."""
        return len(request_line(job)) <= self.limits.max_bytes

    def add(self, job: Job) -> None:
        line = request_line(job)
        if len(line) > self.limits.max_bytes:
            raise ValueError("the request is larger than a batch input file may be")
        chunk = self._open.get(job.model)
        if chunk is not None and (
            chunk.lines >= self.limits.max_lines or chunk.bytes + len(line) > self.limits.max_bytes
        ):
            self._finish(chunk)
            chunk = None
        if chunk is None:
            self._seq += 1
            chunk = self._open[job.model] = _Open(
                f"{self.prefix}-{self._seq:04d}", job.model, self.folder
            )
        chunk.requests.write(line)
        chunk.rows.write(row_line(job))
        chunk.leaders.setdefault(job.request_hash, job.id)
        chunk.lines += 1
        chunk.bytes += len(line)

    def follow(self, job: Job) -> bool:
        """Dedupe, as a synchronous run does it: when the open chunk of the job's model
        already sends an identical request, record the job as sharing that answer (a
        copy with ``shared_from`` and zero tokens when collected) and send nothing."""
        chunk = self._open.get(job.model)
        leader = chunk.leaders.get(job.request_hash) if chunk is not None else None
        if chunk is None or leader is None or not job.request_hash:
            return False
        chunk.rows.write(row_line(job, shared_from=leader))
        return True

    def _finish(self, chunk: _Open) -> None:
        del self._open[chunk.model]
        chunk.close()
        fsync_dir(self.folder)
        self._ready(ClosedChunk(chunk.name, chunk.model, chunk.lines, chunk.bytes))

    def close(self) -> None:
        """Finish every chunk still open (each goes to ``ready``)."""
        for chunk in list(self._open.values()):
            self._finish(chunk)

    def discard(self) -> None:
        """Drop the chunks still open (the run stopped before they were whole)."""
        for chunk in list(self._open.values()):
            del self._open[chunk.model]
            for fh in (chunk.requests, chunk.rows):
                fh.close()
            for suffix in (".jsonl", ".rows.jsonl"):
                (self.folder / f"{chunk.name}{suffix}").unlink(missing_ok=True)
