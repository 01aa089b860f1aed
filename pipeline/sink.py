"""Keep every result: a journal on disk first, then Parquet parts.

Each result is appended to a journal segment (``OUT/journal/<run_id>-<seq>.jsonl``)
and the file is flushed after every small group, so a ``kill -9`` loses only what
was still in flight: an answer the server billed is on disk the moment the writer
has it. Every ``part_rows`` results the segment is compacted into a Parquet part
(``OUT/results/<run_id>/part-<seq>.parquet``), written under a temporary name and
renamed, so a reader never sees half a part. The segment is deleted only after the
rename; a segment found at start-up is compacted again under the same part name,
which makes recovery idempotent.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import pyarrow.parquet as pq

from pipeline.schema import results_table

_TIMESTAMP_FIELDS = ("started_at", "finished_at")


def _encode(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


def _decode(row: dict[str, Any]) -> dict[str, Any]:
    for name in _TIMESTAMP_FIELDS:
        value = row.get(name)
        if isinstance(value, str):
            row[name] = datetime.fromisoformat(value)
    return row


def _journal_rows(path: Path) -> Iterator[dict[str, Any]]:
    """Rows of a journal segment; a last line cut by a crash is skipped, not fatal."""
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if not line.endswith("\n"):
                break  # the process died mid-write: that result was never complete
            try:
                yield _decode(json.loads(line))
            except ValueError:
                continue


def write_part(rows: list[dict[str, Any]], path: Path) -> None:
    """Write rows as one Parquet file, atomically (temp name, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    table = results_table(rows)
    pq.write_table(table, tmp, compression="zstd")
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


@contextmanager
def _dead_run(journal_dir: Path, run_id: str) -> Iterator[bool]:
    """Yield True, holding the run's journal lock, when the run that wrote these
    segments is gone; False while it (or another process recovering it) holds the lock.

    Shards and Ray workers share ``OUT``: one starting up must not compact the live
    journal of another, nor compact a dead one at the same time as a third process.
    """
    lock_path = journal_dir / f"{run_id}.lock"
    with open(lock_path, "a+") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            lock_path.unlink(missing_ok=True)
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def recover_journals(out: Path) -> int:
    """Compact journal segments left by runs that died. Returns the rows recovered."""
    journal_dir = out / "journal"
    if not journal_dir.is_dir():
        return 0
    runs: dict[str, list[tuple[str, Path]]] = {}
    for segment in sorted(journal_dir.glob("*.jsonl")):
        run_id, _, seq = segment.stem.rpartition("-")
        runs.setdefault(run_id, []).append((seq, segment))
    recovered = 0
    if not runs:
        return 0
    # One recovery at a time per OUT, waited for: a process that starts while another
    # is compacting a dead journal must not take "locked" for "alive", skip it, and
    # then load the done ids without those rows (it would send them again).
    with open(journal_dir / ".recovery.lock", "a+") as guard:
        fcntl.flock(guard.fileno(), fcntl.LOCK_EX)
        for run_id, segments in runs.items():
            with _dead_run(journal_dir, run_id) as dead:
                if not dead:
                    continue
                for seq, segment in segments:
                    if not segment.exists():
                        continue  # recovered by another process before we got the guard
                    rows = list(_journal_rows(segment))
                    if rows:
                        write_part(rows, out / "results" / run_id / f"part-{seq}.parquet")
                        recovered += len(rows)
                    segment.unlink()
    return recovered


class ResultSink:
    """Append-only writer of result rows for one run."""

    def __init__(self, out: Path, run_id: str, *, part_rows: int = 20_000) -> None:
        self.out = out
        self.run_id = run_id
        self.part_rows = part_rows  # results per Parquet part
        self.rows_written = 0
        self._seq = 0
        self._buffer: list[dict[str, Any]] = []
        self._journal: IO[str] | None = None
        self._journal_path: Path | None = None
        (out / "journal").mkdir(parents=True, exist_ok=True)
        (out / "results").mkdir(parents=True, exist_ok=True)
        # Held until the process ends (the kernel drops it even on kill -9): while it
        # is held, no other run on this OUT will compact our journal under us.
        self._live = open(out / "journal" / f"{run_id}.lock", "a+")  # noqa: SIM115
        fcntl.flock(self._live.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        # Who holds it, for a person (or a test) looking at a stuck or crashed job.
        self._live.truncate(0)
        self._live.write(f"{os.getpid()}\n")
        self._live.flush()

    def _open_segment(self) -> IO[str]:
        self._seq += 1
        self._journal_path = self.out / "journal" / f"{self.run_id}-{self._seq:05d}.jsonl"
        self._journal = open(self._journal_path, "a", encoding="utf-8")  # noqa: SIM115 - closed in take_part
        return self._journal

    def write(self, row: dict[str, Any]) -> None:
        """Journal one result (buffered until ``flush``)."""
        journal = self._journal or self._open_segment()
        journal.write(json.dumps(row, ensure_ascii=False, default=_encode) + "\n")
        self._buffer.append(row)
        self.rows_written += 1

    def flush(self) -> None:
        """Push journaled rows to the OS: from here on they survive a kill -9."""
        if self._journal is not None:
            self._journal.flush()

    @property
    def part_due(self) -> bool:
        return len(self._buffer) >= self.part_rows

    def take_part(self) -> tuple[list[dict[str, Any]], Path, Path] | None:
        """Close the current segment and hand back its rows, part path and segment path.

        The caller writes the part (maybe in a thread) and then calls ``part_done``,
        while new results go to a fresh segment.
        """
        if not self._buffer or self._journal is None or self._journal_path is None:
            return None
        self._journal.flush()
        self._journal.close()
        rows, self._buffer = self._buffer, []
        part = self.out / "results" / self.run_id / f"part-{self._seq:05d}.parquet"
        segment = self._journal_path
        self._journal = None
        self._journal_path = None
        return rows, part, segment

    @staticmethod
    def part_done(segment: Path) -> None:
        segment.unlink(missing_ok=True)

    def close(self) -> None:
        """Compact what is left into a last part, then let go of the journal lock."""
        taken = self.take_part()
        if taken is not None:
            rows, part, segment = taken
            write_part(rows, part)
            self.part_done(segment)
        if not self._live.closed:
            (self.out / "journal" / f"{self.run_id}.lock").unlink(missing_ok=True)
            self._live.close()
