"""Keep every result: a journal on disk first, then Parquet parts.

Each result is appended to a journal segment (``OUT/journal/<run_id>-<seq>.jsonl``)
and the file is flushed after every small group, so a ``kill -9`` loses only what
was still in flight: an answer the server billed is in the OS the moment the writer
has it. A power cut is another matter: the OS writes to the disk when it likes. So
the journal is also fsynced by group commit, once ``sync_rows`` results are waiting
or the oldest has waited ``sync_seconds`` (defaults below, chosen by measurement in
``bench/fsync.py``), which bounds what a power cut can take to that window plus the
fsync itself. Every ``part_rows`` results, or sooner once the segment holds
``part_bytes`` of journal lines, the segment is compacted into a Parquet part
(``OUT/results/<run_id>/part-<seq>.parquet``), written under a temporary name,
fsynced and renamed, and the folder fsynced, so a reader never sees half a part and
a power cut never loses a renamed one. The segment is deleted only after the
rename; a segment found at start-up is compacted again under the same part name,
which makes recovery idempotent.

When OUT cannot be written (disk full, quota, I/O error), the sink raises
``SinkError`` once and keeps later results in memory only; ``close`` then tries to
write everything it holds as one part, and if that fails too, the journal segment
is left for the next run to recover. What was journaled is never damaged.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import pyarrow.parquet as pq

from pipeline import codec
from pipeline.errors import SinkError as SinkError
from pipeline.lock import open_nofollow
from pipeline.manifest import fsync_dir, replace_durably
from pipeline.schema import results_table

# Group commit of the journal: fsync once this many results wait, or once the oldest
# has waited this long. Measured with bench/fsync.py (bench/RESULTS.md).
SYNC_ROWS = 256
SYNC_SECONDS = 0.05

# Errors that mean "OUT has no room" rather than "something else is wrong with it".
_NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def sink_error(exc: OSError) -> SinkError:
    """The message a person reads: what happened to OUT, and what to do."""
    what = "disk full on OUT" if exc.errno in _NO_ROOM else "cannot write to OUT"
    where = f" ({exc.filename})" if exc.filename else ""
    return SinkError(
        f"{what}{where}: {exc.strerror or exc}. Results journaled so far are kept; "
        "make room (or fix the disk) and re-run the same command to resume"
    )


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


def read_segment(path: Path) -> list[dict[str, Any]]:
    """The rows of a closed journal segment, as recovery reads them back."""
    return list(_journal_rows(path))


_JSON_SCALARS = frozenset({str, int, float, bool, type(None)})


def _journal_keeps(value: Any) -> bool:
    kind = type(value)
    if kind in _JSON_SCALARS:
        return True
    if kind is list:
        return all(_journal_keeps(v) for v in value)
    if kind is dict:
        return all(type(k) is str and _journal_keeps(v) for k, v in value.items())
    return False


def reads_back_alike(rows: list[dict[str, Any]]) -> bool:
    """True when ``read_segment`` gives these rows' Parquet back unchanged.

    Their result columns always come back alike (``schema.storable`` made them
    journal-safe; the two timestamps are decoded). Carried input columns do when
    every value is JSON's own type: a timestamp, date, decimal or bytes value from a
    Parquet input is journaled as text and would come back as text.
    """
    return all(_journal_keeps(row.get("carried") or {}) for row in rows)


def write_part(rows: list[dict[str, Any]], path: Path) -> None:
    """Write rows as one Parquet file, atomically and durably: a temp name (never a
    symlink followed), fsync, rename, fsync of the folder (and of its parent when the
    folder is new). On failure the temp file is removed and the error raised."""
    if not path.parent.is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)
        fsync_dir(path.parent.parent)
    table = results_table(rows)
    replace_durably(path, lambda fh: pq.write_table(table, fh, compression="zstd"))


@contextmanager
def _dead_run(journal_dir: Path, run_id: str) -> Iterator[bool]:
    """Yield True, holding the run's journal lock, when the run that wrote these
    segments is gone; False while it (or another process recovering it) holds the lock.

    Shards and Ray workers share ``OUT``: one starting up must not compact the live
    journal of another, nor compact a dead one at the same time as a third process.
    """
    lock_path = journal_dir / f"{run_id}.lock"
    with open_nofollow(lock_path) as fh:
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
    """Compact journal segments left by runs that died. Returns the rows recovered.
    Raises SinkError when OUT cannot be written."""
    try:
        return _recover(out)
    except OSError as exc:
        raise sink_error(exc) from exc


def _recover(out: Path) -> int:
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
    with open_nofollow(journal_dir / ".recovery.lock") as guard:
        fcntl.flock(guard.fileno(), fcntl.LOCK_EX)
        for run_id, segments in runs.items():
            with _dead_run(journal_dir, run_id) as dead:
                if not dead:
                    continue
                for seq, segment in segments:
                    if not segment.exists():
                        continue  # recovered by another process before we got the guard
                    rows = read_segment(segment)
                    if rows:
                        write_part(rows, out / "results" / run_id / f"part-{seq}.parquet")
                        recovered += len(rows)
                    segment.unlink()
    return recovered


# Journal bytes after which the rows held for the next Parquet part are written out,
# whatever their number. Those rows stay in memory until their part is written, and
# 20,000 answers of a reasoning model (100-250 KB each with their reasoning) would be
# gigabytes. At 16 MiB a part of short answers is still 20,000 rows (~0.7 KB each),
# and runs of 4,000-16,000 answers of 100 KB peaked at ~340 MB (bench/RESULTS.md).
PART_BYTES = 16 * 2**20


class ResultSink:
    """Append-only writer of result rows for one run.

    Not thread-safe: one writer task calls it; ``sync`` may run in a worker thread
    while that task awaits it.
    """

    def __init__(
        self,
        out: Path,
        run_id: str,
        *,
        part_rows: int = 20_000,
        part_bytes: int | None = None,
        sync_rows: int = SYNC_ROWS,
        sync_seconds: float = SYNC_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.out = out
        self.run_id = run_id
        self.part_rows = part_rows  # results per Parquet part
        self.part_bytes = PART_BYTES if part_bytes is None else part_bytes  # or sooner
        self._buffered_bytes = 0  # journal bytes of the rows held for the next part
        self.sync_rows = sync_rows
        self.sync_seconds = sync_seconds
        self._clock = clock
        self.broken: SinkError | None = None  # set once OUT could not be written
        self.unsaved = 0  # results received but lost to a broken OUT (sent again on re-run)
        self._after_break = 0  # results held only in memory since the break
        self._seq = 0
        self._buffer: list[dict[str, Any]] = []
        self._journal: IO[bytes] | None = None
        self._journal_path: Path | None = None
        self._unflushed = 0  # results given to the file object since its last flush
        self._unsynced = 0  # journaled results not yet fsynced
        self._oldest_unsynced = 0.0
        self._new_segment = False  # its name is not yet durable in the folder
        try:
            for folder in (out / "journal", out / "results"):
                if not folder.is_dir():
                    folder.mkdir(parents=True, exist_ok=True)
                    fsync_dir(out)
            # Held until the process ends (the kernel drops it even on kill -9): while it
            # is held, no other run on this OUT will compact our journal under us.
            self._live = open_nofollow(out / "journal" / f"{run_id}.lock")
            fcntl.flock(self._live.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            # Who holds it, for a person (or a test) looking at a stuck or crashed job.
            self._live.truncate(0)
            self._live.write(f"{os.getpid()}\n")
            self._live.flush()
        except OSError as exc:
            raise sink_error(exc) from exc

    def _break(self, exc: OSError) -> SinkError:
        """OUT failed us: from now on results are held in memory only (see close)."""
        error = sink_error(exc)
        if self.broken is None:
            self.broken = error
            self._after_break = self._unflushed  # maybe cut short on disk, or not there
            if self._journal is not None:
                # Drop what the file object still buffers: a later flush of it could
                # append after a line the disk cut short, and damage a whole line. The
                # descriptor is pointed at /dev/null rather than closed, so its number
                # is never reused under the file object (by a part being written).
                with contextlib.suppress(OSError, ValueError):
                    null = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
                    try:
                        os.dup2(null, self._journal.fileno(), inheritable=False)
                    finally:
                        os.close(null)
                with contextlib.suppress(OSError, ValueError):
                    self._journal.close()
        return error

    def fail(self, exc: OSError) -> SinkError:
        """Another write to OUT (a Parquet part) failed: treat it as the journal's own."""
        return self._break(exc)

    def _open_segment(self) -> IO[bytes]:
        self._seq += 1
        self._journal_path = self.out / "journal" / f"{self.run_id}-{self._seq:05d}.jsonl"
        fd = os.open(
            self._journal_path,
            os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o644,
        )
        self._journal = os.fdopen(fd, "ab")
        self._new_segment = True
        return self._journal

    def write(self, row: dict[str, Any]) -> None:
        """Journal one result (buffered until ``flush``). Raises SinkError once, when
        OUT fails; after that, results are kept in memory for ``close``."""
        self._buffer.append(row)
        if self.broken is not None:
            self._after_break += 1
            return
        self._unflushed += 1
        try:
            journal = self._journal or self._open_segment()
            line = codec.dumps_line_isoformat(row, _encode)
            journal.write(line)
        except OSError as exc:
            raise self._break(exc) from exc
        self._buffered_bytes += len(line)
        if not self._unsynced:
            self._oldest_unsynced = self._clock()
        self._unsynced += 1

    def flush(self) -> None:
        """Push journaled rows to the OS: from here on they survive a kill -9."""
        if self._journal is not None and self.broken is None:
            try:
                self._journal.flush()
            except OSError as exc:
                raise self._break(exc) from exc
            self._unflushed = 0

    def sync_wait(self) -> float | None:
        """Seconds until the journal is due an fsync; None when nothing waits."""
        if not self._unsynced or self.broken is not None:
            return None
        return max(0.0, self._oldest_unsynced + self.sync_seconds - self._clock())

    @property
    def sync_due(self) -> bool:
        wait = self.sync_wait()
        return wait is not None and (wait <= 0 or self._unsynced >= self.sync_rows)

    def sync(self) -> None:
        """fsync the flushed journal (and, for a new segment, its folder): from here on
        its rows survive a power cut. Call after ``flush``; may run in a thread."""
        if self._journal is None or self.broken is not None:
            self._unsynced = 0
            return
        try:
            os.fsync(self._journal.fileno())
            if self._new_segment:
                fsync_dir(self.out / "journal")
                self._new_segment = False
        except OSError as exc:
            raise self._break(exc) from exc
        self._unsynced = 0

    @property
    def part_due(self) -> bool:
        held = len(self._buffer) >= self.part_rows or self._buffered_bytes >= self.part_bytes
        return held and self.broken is None

    def take_part(self) -> tuple[list[dict[str, Any]], Path, Path] | None:
        """Close the current segment and hand back its rows, part path and segment path.

        The caller writes the part (maybe in a thread; ``sync_segment`` first) and then
        calls ``part_done``, while new results go to a fresh segment.
        """
        if (
            not self._buffer
            or self._journal is None
            or self._journal_path is None
            or self.broken is not None
        ):
            return None
        try:
            self._journal.flush()
            self._journal.close()
        except OSError as exc:
            raise self._break(exc) from exc
        rows, self._buffer = self._buffer, []
        self._buffered_bytes = 0
        part = self.out / "results" / self.run_id / f"part-{self._seq:05d}.parquet"
        segment = self._journal_path
        self._journal = None
        self._journal_path = None
        self._unflushed = self._unsynced = 0
        self._new_segment = False
        return rows, part, segment

    @staticmethod
    def sync_segment(segment: Path) -> None:
        """fsync a closed segment, and its folder: its rows stay safe while its part is
        being written (a segment opened and taken between two group commits has a name
        the folder never made durable)."""
        fd = os.open(segment, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(segment.parent)

    @staticmethod
    def part_done(segment: Path) -> None:
        segment.unlink(missing_ok=True)

    def close(self) -> None:
        """Compact what is left into a last part, then let go of the journal lock.

        After OUT failed, everything held (journaled or not) is tried as one part;
        if that fails too, the segment stays for the next run's recovery and the
        results that reached no disk are counted in ``unsaved``. Raises SinkError
        for a failure not reported before that left results out of Parquet.
        """
        reported = self.broken is not None
        try:
            if self.broken is None:
                try:
                    taken = self.take_part()
                except SinkError:
                    taken = None  # broken now; the rows are still in the buffer
                if taken is not None:
                    rows, part, segment = taken
                    try:
                        write_part(rows, part)
                    except OSError as exc:
                        # The segment is whole on disk: the next run compacts it.
                        raise self._break(exc) from exc
                    self.part_done(segment)
            if self.broken is not None and self._buffer:
                if self._journal_path is None:
                    # No segment of its own: a number no taken segment has, whose part
                    # is written (or recovered by the next run) under its own name.
                    self._seq += 1
                part = self.out / "results" / self.run_id / f"part-{self._seq:05d}.parquet"
                try:
                    write_part(self._buffer, part)
                except OSError:
                    self.unsaved = self._after_break
                    if not reported:
                        raise self.broken from None
                else:
                    if self._journal_path is not None:
                        self._journal_path.unlink(missing_ok=True)
                finally:
                    self._buffer = []
        finally:
            if not self._live.closed:
                (self.out / "journal" / f"{self.run_id}.lock").unlink(missing_ok=True)
                self._live.close()
