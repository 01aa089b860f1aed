"""The batch ledger: what this OUT asked a provider's Batch API to do, journaled first.

Every step that talks to the provider is preceded by a line in
``OUT/batches/ledger.jsonl``, appended and fsynced before the call, and followed by
one saying what came back. Replaying the file tells each chunk's state, so a run
killed at any instant (after an upload, after a create, while collecting) resumes
without submitting a row twice or losing an answer the provider billed:

=============  ==========================================================================
``chunk``      the request file is whole on disk: its rows are held from here on
``upload``     about to upload it (an upload that never got recorded costs nothing)
``uploaded``   the provider's file id
``create``     about to create the batch: if nothing follows, the next run lists the
               provider's batches and looks for this OUT's token and this chunk's id in
               their metadata before it submits anything
``created``    the provider's batch id: open until collected
``status``     the last status seen (for ``pipeline batches``)
``collecting`` its files are downloaded and its rows are being written: a run killed
               now collects again, skipping rows already written for this batch
``collected``  every line is a result row or back to pending: the chunk is closed
``abandoned``  never created (the provider has no batch for it): its rows are free
=============  ==========================================================================

A line cut short by a crash is ignored (it was never acknowledged); a line that is
not a JSON object is skipped: the ledger is a file on disk like any other.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.lock import open_nofollow
from pipeline.manifest import fsync_dir, replace_durably

# States a chunk can be in, in order; ``closed`` ones no longer hold their rows.
WRITTEN, UPLOADING, UPLOADED, CREATING, OPEN, COLLECTING = (
    "written",
    "uploading",
    "uploaded",
    "creating",
    "open",
    "collecting",
)
COLLECTED, ABANDONED = "collected", "abandoned"
CLOSED = frozenset({COLLECTED, ABANDONED})
_STATE_OF_EVENT = {
    "chunk": WRITTEN,
    "upload": UPLOADING,
    "uploaded": UPLOADED,
    "create": CREATING,
    "created": OPEN,
    "collecting": COLLECTING,
    "collected": COLLECTED,
    "abandoned": ABANDONED,
}
MAX_LEDGER_LINE = 1 << 20  # a longer line is not one we wrote
CRASH_HOOK = "PIPELINE_TEST_KILL_AFTER"


def crash_point(step: str) -> None:
    """Test-only: when ``PIPELINE_TEST_KILL_AFTER`` names ``step``, the process kills
    itself with SIGKILL here. Steps: ``upload`` and ``create`` (right after the
    provider's answer, before it is journaled) and ``collected-rows`` (a batch's rows
    journaled, the batch not yet marked collected). Tests prove with it that a kill -9
    at those instants submits nothing twice and loses or repeats no row."""
    if os.environ.get(CRASH_HOOK) == step:
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class Chunk:
    """One request file and what became of it, replayed from the ledger."""

    chunk: str
    run: str = ""
    model: str = ""
    rows: int = 0
    bytes: int = 0
    written_at: float = 0.0
    state: str = WRITTEN
    file_id: str | None = None
    batch_id: str | None = None
    status: str | None = None  # the provider's batch status, last seen
    counts: dict[str, Any] = field(default_factory=dict)  # request_counts, last seen
    created_at: float | None = None
    result: dict[str, Any] = field(default_factory=dict)  # what collecting it gave

    @property
    def closed(self) -> bool:
        return self.state in CLOSED


class Ledger:
    """``OUT/batches``: the ledger, this OUT's token, the request and downloaded files."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.root = out / "batches"
        self.chunks_dir = self.root / "chunks"
        self.files_dir = self.root / "files"
        self.path = self.root / "ledger.jsonl"

    @property
    def exists(self) -> bool:
        return self.path.is_file()

    def ensure(self) -> None:
        """Create the folders (durably: a request file's name must survive a power cut)."""
        for folder in (self.root, self.chunks_dir, self.files_dir):
            if not folder.is_dir():
                folder.mkdir(parents=True, exist_ok=True)
                fsync_dir(folder.parent)

    def token(self) -> str:
        """A random token made once per OUT and kept in it: the ``pipeline_out`` metadata
        that tells this OUT's batches from any other's on the same account. Made with
        a hard link (which fails if the name exists), so two shards starting at once
        agree on one token."""
        path = self.root / "out_token"
        with contextlib.suppress(OSError, UnicodeDecodeError):
            return _token_text(path.read_bytes())
        self.ensure()
        text = secrets.token_hex(16)
        tmp = self.root / f".out_token.{os.getpid()}"
        replace_durably(tmp, lambda fh: fh.write(text.encode("ascii") + b"\n"))
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(self.root)
        return _token_text(path.read_bytes())

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """One process at a time reconciles or collects this OUT's batches (shards of
        one job share OUT: two collecting one batch would write its rows twice)."""
        self.ensure()
        with open_nofollow(self.root / ".lock") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            yield

    def append(self, event: str, chunk: str, **fields: Any) -> None:
        """Journal one step durably (fsync) before anything acts on it."""
        self.ensure()
        record = {"event": event, "chunk": chunk, "at": time.time(), **fields}
        line = json.dumps(record, ensure_ascii=True, sort_keys=True) + "\n"
        new = not self.path.exists()
        with open_nofollow(self.path) as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())
        if new:
            fsync_dir(self.root)

    def records(self) -> Iterator[dict[str, Any]]:
        """The ledger's whole lines that are JSON objects naming a chunk."""
        try:
            fh = open(self.path, "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            return
        with fh:
            while True:
                line = fh.readline(MAX_LEDGER_LINE + 1)
                if not line:
                    return
                if not line.endswith(b"\n"):
                    if len(line) > MAX_LEDGER_LINE:  # skip the rest of an absurd line
                        while line and not line.endswith(b"\n"):
                            line = fh.readline(MAX_LEDGER_LINE + 1)
                        continue
                    return  # cut by a crash: never acknowledged
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict) and isinstance(record.get("chunk"), str):
                    yield record

    def chunks(self) -> dict[str, Chunk]:
        """Every chunk's state, replayed in ledger order."""
        found: dict[str, Chunk] = {}
        for record in self.records():
            name = record["chunk"]
            if safe_id(name) is None:
                continue  # not a name this package writes: never a path to touch
            event = record.get("event")
            chunk = found.get(name)
            if chunk is None:
                if event != "chunk":
                    continue
                chunk = found[name] = Chunk(name)
            if event == "chunk":
                chunk.run = _text(record.get("run"))
                chunk.model = _text(record.get("model"))
                chunk.rows = _count(record.get("rows"))
                chunk.bytes = _count(record.get("bytes"))
                chunk.written_at = _number(record.get("at"))
            elif event == "uploaded":
                chunk.file_id = safe_id(record.get("file_id"))
            elif event == "created":
                chunk.batch_id = safe_id(record.get("batch_id"))
                chunk.created_at = _number(record.get("created_at")) or None
                chunk.status = _text(record.get("status")) or chunk.status
            elif event == "status":
                chunk.status = _text(record.get("status")) or chunk.status
                counts = record.get("counts")
                chunk.counts = counts if isinstance(counts, dict) else chunk.counts
            elif event == "collected":
                chunk.status = _text(record.get("status")) or chunk.status
                result = record.get("result")
                chunk.result = result if isinstance(result, dict) else {}
            state = _STATE_OF_EVENT.get(str(event))
            if state is not None and not chunk.closed:
                if state == OPEN and chunk.batch_id is None:
                    continue  # a "created" without a batch id is no batch
                chunk.state = state
        return found

    # -- the files of one chunk ---------------------------------------------------------

    def request_file(self, chunk: str) -> Path:
        return self.chunks_dir / f"{chunk}.jsonl"

    def rows_file(self, chunk: str) -> Path:
        return self.chunks_dir / f"{chunk}.rows.jsonl"

    def output_file(self, chunk: str, kind: str) -> Path:
        return self.files_dir / f"{chunk}.{kind}.jsonl"

    def remove_files(self, chunk: str) -> None:
        """A closed chunk's files: its rows are in OUT/results (or back to pending)."""
        for path in (
            self.request_file(chunk),
            self.rows_file(chunk),
            self.output_file(chunk, "output"),
            self.output_file(chunk, "error"),
        ):
            path.unlink(missing_ok=True)


_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,199}")


def safe_id(value: Any) -> str | None:
    """A provider's file or batch id fit to go into a URL path, a file name and the
    ledger: short, plain characters, no ``..``; None for anything else."""
    if isinstance(value, str) and _ID.fullmatch(value) and ".." not in value:
        return value
    return None


def run_alive(out: Path, run_id: str) -> bool:
    """Whether the run that wrote a chunk is still running (a shard of the same job):
    its liveness lock (``OUT/runs/.<run_id>.alive``) is held for the life of the run."""
    if not run_id or "/" in run_id or run_id.startswith("."):
        return False
    try:
        fd = os.open(out / "runs" / f".{run_id}.alive", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False  # gone: the run ended (or never got that far)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _token_text(raw: bytes) -> str:
    text = raw.decode("ascii").strip()
    if not (text.isalnum() and 16 <= len(text) <= 64):
        raise ValueError("not a token")
    return text


def _text(value: Any) -> str:
    return value if isinstance(value, str) and len(value) <= 512 else ""


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _number(value: Any) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    return float(value) if ok else 0.0
