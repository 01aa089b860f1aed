"""Read input rows from JSONL, JSONL.gz and Parquet files, a folder or a glob, in batches.

Files are streamed: a JSONL file is read line by line and a Parquet file batch by
batch, so a ten-million-row input never sits in memory, and no line is held whole
past ``max_line_bytes``. Nothing in a file stops the run: a line that is not JSON,
too long, not valid Unicode, or the point where a gzip file is cut short comes out
as a row with ``error`` set, which the request stage turns into an ``invalid_input``
result naming the file and line.

Which files a folder or a glob names is decided by one rule (``skip_reason``):
hidden files and folders are skipped, and so is the results folder when it sits
inside an input folder; files that are not data are named once on stderr. Only
regular files are ever opened: a named pipe would block the reader forever and a
device would never end.
"""

from __future__ import annotations

import errno
import glob
import gzip
import json
import os
import re
import stat
import sys
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import UsageError

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson", ".ndjson.gz", ".json", ".json.gz")
PARQUET_SUFFIXES = (".parquet", ".pq")

# Longest JSONL line read, in bytes (``--max-line-bytes``). A row may carry images
# inline as data URLs, each up to 10 MB (13.4 MB in base64); 64 MiB holds four of
# them with room for text, while a line past it (a runaway export, one record with
# no newline) becomes one invalid row instead of gigabytes of memory. The reader
# holds at most this much of a line (about twice that while joining its pieces).
DEFAULT_MAX_LINE_BYTES = 64 * 1024 * 1024
_SKIP_CHUNK = 1 << 20  # bytes read at a time while skipping the rest of a long line


class RemoteFile:
    """An input named by a URL that pyarrow reads (``s3://``, ``gs://``, ``file://``...).

    It shows the little of ``Path`` that naming a row needs; a relative image path in
    such a file resolves against a local folder that does not exist, so it fails with
    "not found" unless ``--image-root`` names one.
    """

    __slots__ = ("url",)

    def __init__(self, url: str) -> None:
        self.url = url

    @property
    def name(self) -> str:
        return self.url.rstrip("/").rsplit("/", 1)[-1]

    @property
    def parent(self) -> Path:
        return Path("/nonexistent-remote-input-folder")

    def __str__(self) -> str:
        return self.url

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RemoteFile) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)


InputFile = Path | RemoteFile


@dataclass(slots=True)
class SourceRow:
    """One input row, or the reason it could not be read."""

    file: InputFile
    line: int  # line number in a JSONL file, row number in a Parquet file; from 1
    data: dict[str, Any] | None
    error: str | None = None

    @property
    def where(self) -> str:
        """``file:line``, as error messages name the row."""
        return f"{self.file}:{self.line}"


def is_input_name(name: str) -> bool:
    """A file name this tool reads: JSONL (maybe gzipped) or Parquet."""
    lower = name.lower()
    return lower.endswith(JSONL_SUFFIXES) or lower.endswith(PARQUET_SUFFIXES)


def is_hidden(parts: Sequence[str]) -> bool:
    """A path (as its parts below the folder or glob base the user named) is hidden
    when any part starts with a dot: ``.git/``, ``.cache/x.jsonl``, ``.~lock.jsonl``."""
    return any(part.startswith(".") for part in parts)


def file_kind(mode: int) -> str | None:
    """None for a regular file, else what it is: only regular files are read, since
    opening a named pipe blocks until a writer comes and a device never ends."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISDIR(mode):
        return "a folder"
    return "not a regular file"


def skip_reason(parts: Sequence[str], name: str, mode: int) -> str | None:
    """Why a file found by a folder walk or a glob is not read (None: it is read).

    The one rule for folders, globs and Ray's planning alike, so an input means the
    same thing however it is named. Hidden paths return ``"hidden"`` (skipped without
    a word: editors and version control keep their files there); other reasons are
    named to the user.
    """
    if is_hidden(parts):
        return "hidden"
    if not _utf8(name):
        return "name is not valid UTF-8"
    kind = file_kind(mode)
    if kind is not None:
        return kind
    if not is_input_name(name):
        return "not JSONL or Parquet"
    return None


class SkipNotes:
    """Files left out of a folder or glob, named once on stderr (not silently dropped)."""

    SHOWN = 5  # file names quoted per line; the rest are counted

    def __init__(self, say: Callable[[str], None] | None = None) -> None:
        self._say = say or _to_stderr
        self._skipped: dict[str, list[str]] = {}

    def add(self, reason: str, where: str) -> None:
        if reason != "hidden":
            self._skipped.setdefault(reason, []).append(where)

    def flush(self, spec: str) -> None:
        for reason, names in self._skipped.items():
            shown = ", ".join(names[: self.SHOWN])
            more = f" and {len(names) - self.SHOWN} more" if len(names) > self.SHOWN else ""
            self._say(f"{spec}: skipped {len(names)} file(s), {reason}: {shown}{more}")
        self._skipped.clear()


def _to_stderr(text: str) -> None:
    print(f"warning: {text}", file=sys.stderr)


def warn_on_stderr(log_format: str = "text") -> Callable[[str], None]:
    """Where notes on skipped files go: stderr, as a JSON line under --log-format json
    (so a log collector reading stderr sees one format)."""
    if log_format != "json":
        return _to_stderr

    def as_json(text: str) -> None:
        print(json.dumps({"event": "warning", "message": text}), file=sys.stderr)

    return as_json


def _utf8(text: str) -> bool:
    """A name from the disk can hold bytes that are not UTF-8 (Python keeps them as
    lone surrogates); such a name cannot be written to a results row, so it is refused."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _glob_base(pattern: str) -> Path:
    """The folder a glob starts from: its parts before the first wildcard."""
    parts: list[str] = []
    for part in Path(pattern).parts:
        if glob.has_magic(part):
            break
        parts.append(part)
    return Path(*parts) if parts else Path(".")


def is_results_folder(folder: Path) -> bool:
    """A folder this tool wrote as some run's ``--out`` (``results/`` and ``runs/``
    side by side): its manifests and parts are never inputs, whichever OUT this run
    writes to."""
    return (folder / "results").is_dir() and (folder / "runs").is_dir()


def _in_results_folder(path: Path, base: Path) -> bool:
    """``path`` (found by a glob under ``base``) sits inside some run's OUT below
    ``base``, as a folder walk from ``base`` would prune it."""
    for parent in path.parents:
        if parent == base or not parent.is_relative_to(base):
            return False
        if is_results_folder(parent):
            return True
    return False


def _walk(folder: Path, out: Path | None, notes: SkipNotes) -> list[Path]:
    """Input files under ``folder``, pruning hidden folders and ``out`` on the way down
    (a results folder can hold thousands of parts that are not inputs)."""
    found: list[Path] = []
    for top, dirs, files in os.walk(folder):
        here = Path(top)
        rel = here.relative_to(folder).parts
        kept = []
        for d in dirs:
            if is_hidden((*rel, d)) or (out is not None and (here / d).resolve() == out):
                continue
            if is_results_folder(here / d):
                notes.add("the results folder of a run (--out)", str(here / d))
                continue
            kept.append(d)
        dirs[:] = kept
        for name in files:
            path = here / name
            try:
                mode = path.stat().st_mode
            except OSError:
                notes.add("unreadable or a broken link", str(path))
                continue
            reason = skip_reason((*rel, name), name, mode)
            if reason is None:
                found.append(path)
            else:
                notes.add(reason, str(path))
    return sorted(found)


def _under(path: Path, out: Path | None) -> bool:
    return out is not None and path.resolve().is_relative_to(out)


def expand_sources(
    specs: Sequence[str | Path],
    *,
    out: Path | None = None,
    say: Callable[[str], None] | None = None,
) -> list[Path]:
    """Resolve files, folders and glob patterns to a sorted, de-duplicated file list.

    Folders and globs select by ``skip_reason``; ``out`` (the results folder) is left
    out when a folder or glob reaches into it, so ``pipeline run .`` never reads its
    own manifests and parts. A file named directly is read even if hidden, but must be
    a regular JSONL or Parquet file. Raises UsageError (exit 2, nothing sent) for
    anything that names no input at all, so a typo in a cron tab fails loudly
    instead of running on nothing. ``say`` receives the notes on skipped files
    (default: stderr).
    """
    out_dir = Path(out).resolve() if out is not None else None
    notes = SkipNotes(say)
    found: list[Path] = []
    for spec in specs:
        text = str(spec)
        path = Path(text)
        if glob.has_magic(text):
            base = _glob_base(text)
            files = []
            for match in sorted(Path(p) for p in glob.glob(text, recursive=True)):
                try:
                    mode = match.stat().st_mode
                except OSError:
                    continue
                if stat.S_ISDIR(mode) or _under(match, out_dir):
                    continue
                if _in_results_folder(match, base):
                    notes.add("inside the results folder of a run (--out)", str(match))
                    continue
                parts = match.relative_to(base).parts if match.is_relative_to(base) else ()
                reason = skip_reason(parts, match.name, mode)
                if reason is None:
                    files.append(match)
                else:
                    notes.add(reason, str(match))
            notes.flush(text)
            if not files:
                raise UsageError(f"{text}: no JSONL or Parquet file matches this pattern")
            found.extend(files)
            continue
        try:
            mode = path.stat().st_mode
        except OSError:
            raise UsageError(f"{text}: no such file or folder") from None
        if stat.S_ISDIR(mode):
            files = _walk(path, out_dir, notes)
            notes.flush(text)
            if not files:
                raise UsageError(f"{text}: folder holds no .jsonl, .jsonl.gz or .parquet file")
            found.extend(files)
            continue
        kind = file_kind(mode)
        if kind is not None:
            raise UsageError(f"{text}: {kind}, not a regular file; inputs must be regular files")
        if not is_input_name(path.name):
            raise UsageError(f"{text}: not a .jsonl, .jsonl.gz or .parquet file")
        found.append(path)
    unique: dict[Path, Path] = {}  # resolved path -> the path as the user wrote it
    for p in found:
        if not _utf8(str(p)):
            shown = str(p).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            raise UsageError(f"{shown}: the file's path is not valid UTF-8; rename it")
        unique.setdefault(p.resolve(), p)
    return list(unique.values())


def check_readable(path: Path) -> None:
    """Open the file once so an unreadable input is a usage error before anything is sent."""
    try:
        if path.name.lower().endswith(PARQUET_SUFFIXES):
            pq.ParquetFile(path)
        else:
            with open_bytes(path) as fh:
                fh.read(1)
    except (OSError, EOFError, ValueError) as exc:
        raise UsageError(f"{path}: cannot read input ({exc})") from None
    except Exception as exc:  # pyarrow raises its own types for a bad footer
        raise UsageError(f"{path}: not a readable Parquet file ({exc})") from None


def open_regular(path: Path) -> IO[bytes]:
    """Open ``path`` for reading only if it is a regular file, checked on the open file.

    A check by name before the open leaves a window: a file swapped for a named pipe
    after the folder was listed would block the open (and the run) for good. Opening
    without blocking and asking the open descriptor closes it.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        kind = file_kind(os.fstat(fd).st_mode)
        if kind is not None:
            raise OSError(errno.EINVAL, f"{kind}, not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def open_bytes(path: Path) -> IO[bytes]:
    """A local input as bytes; gzip is undone on the fly (``.gz`` names)."""
    raw = open_regular(path)
    if path.name.lower().endswith(".gz"):
        unzipped = gzip.GzipFile(fileobj=raw, mode="rb")
        unzipped.myfileobj = cast(Any, raw)  # closed with it, as when gzip opens the file
        return cast(IO[bytes], unzipped)
    return raw


class LineTooLong:
    """Stands in for a line longer than the cap; only its length was kept."""

    __slots__ = ("length",)

    def __init__(self, length: int) -> None:
        self.length = length


class ReadFailed:
    """Stands in for the rest of a file that could not be read (a gzip file cut short,
    corrupt data, an I/O error): the rows before it are kept."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


Line = bytes | LineTooLong | ReadFailed

# What reading a file can raise past its first byte: EOFError (gzip cut short),
# BadGzipFile/OSError (corrupt gzip, I/O error), zlib.error (corrupt deflate data).
READ_ERRORS = (EOFError, OSError, zlib.error)


def bounded_lines(fh: IO[bytes], max_bytes: int) -> Iterator[Line]:
    """The lines of ``fh``, each at most ``max_bytes`` (line break not counted).

    A longer line is never held whole: the first ``max_bytes + 1`` bytes show it is
    too long, the rest is read and dropped a chunk at a time up to the next line
    break, and a ``LineTooLong`` takes its place. A read error ends the file with a
    ``ReadFailed`` in place of the line it broke.
    """
    try:
        while raw := fh.readline(max_bytes + 1):
            if len(raw) <= max_bytes or raw.endswith(b"\n"):
                yield raw
                continue
            length = len(raw)
            while chunk := fh.readline(_SKIP_CHUNK):
                length += len(chunk)
                if chunk.endswith(b"\n"):
                    break
            yield LineTooLong(length)
    except READ_ERRORS as exc:
        yield ReadFailed(_read_error(exc))


def _read_error(exc: BaseException) -> str:
    if isinstance(exc, EOFError):
        return "file is cut short (the gzip stream ends early)"
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return f"file cannot be read past this point ({text})"


def _jsonl_rows(path: Path, max_line_bytes: int) -> Iterator[SourceRow]:
    try:
        fh = open_bytes(path)
    except OSError as exc:  # gone or unreadable since the pre-flight check
        yield SourceRow(path, 1, None, _read_error(exc))
        return
    with fh:
        yield from parse_lines(path, enumerate(bounded_lines(fh, max_line_bytes), start=1))


# A JSON escape of a UTF-16 surrogate: the only way JSON text can give a str that
# cannot be encoded back (a lone half of a pair). Lines without one skip the check.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _not_json_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


# Python's json accepts NaN and Infinity, which no JSON server does: refused here.
# One decoder for all lines: json.loads with any option builds a new one per call.
_DECODER = json.JSONDecoder(parse_constant=_not_json_constant)


def text_problem(value: Any) -> str | None:
    """Why ``value`` (a parsed JSON value) cannot be sent or stored, or None.

    JSON may spell a lone surrogate (``"\\ud800"``): Python parses it into a str that
    cannot be encoded as UTF-8, so the request hash, the HTTP body and Parquet would
    each fail on it later. Checked iteratively: a deep value cannot blow the stack.
    """
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if not item.isascii():
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError:
                    return "text is not valid Unicode (lone surrogate)"
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None


def parse_line(raw: bytes, first: bool = False) -> tuple[dict[str, Any] | None, str | None]:
    """One raw line to (object, None) or (None, why not). Never raises."""
    try:
        line = raw.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError as exc:
        return None, f"line is not valid UTF-8 ({exc.reason})"
    try:
        data = _DECODER.decode(line)
    except ValueError as exc:
        return None, f"line is not valid JSON ({exc.args[0] if exc.args else exc})"
    except RecursionError:
        return None, "line is not valid JSON (nested too deeply)"
    if not isinstance(data, dict):
        return None, "line is JSON but not an object"
    if _SURROGATE_ESCAPE.search(raw):
        problem = text_problem(data)
        if problem is not None:
            return None, problem
    return data, None


def parse_lines(file: InputFile, lines: Iterable[tuple[int, Line]]) -> Iterator[SourceRow]:
    """Numbered raw lines to rows. Lines are decoded one by one, so one bad byte costs
    one row, not the file."""
    for number, raw in lines:
        if isinstance(raw, LineTooLong):
            yield SourceRow(file, number, None, f"line is {raw.length:,} bytes, over the limit")
            continue
        if isinstance(raw, ReadFailed):
            yield SourceRow(file, number, None, raw.reason)
            return
        if not raw.strip():
            continue
        data, error = parse_line(raw, number == 1)
        yield SourceRow(file, number, data, error)


def open_parquet(source: str | Path | pa.NativeFile) -> pq.ParquetFile:
    """A Parquet file read page by page: pyarrow's default loads a whole row group
    (often hundreds of MB of prompts) to produce the first batch (bench/memory.py)."""
    return pq.ParquetFile(source, buffer_size=1 << 20, pre_buffer=False)


def parquet_rows(
    file: InputFile,
    parquet: pq.ParquetFile,
    batch_size: int,
    *,
    first_line: int = 1,
    row_groups: list[int] | None = None,
) -> Iterator[SourceRow]:
    """Rows of ``parquet`` (of ``row_groups`` only, if given), numbered from
    ``first_line``: the row number in the whole file."""
    number = first_line - 1
    batches = parquet.iter_batches(batch_size=batch_size, row_groups=row_groups)
    while True:
        try:
            batch = next(batches, None)
        except Exception as exc:  # pyarrow's own types: a corrupt page, a cut file
            yield SourceRow(file, number + 1, None, f"file cannot be read past this row ({exc})")
            return
        if batch is None:
            return
        try:
            rows = batch.to_pylist()
        except UnicodeDecodeError:  # a string column holding bytes that are not UTF-8
            rows = [_parquet_row(batch, i) for i in range(batch.num_rows)]
        for data in rows:
            number += 1
            if isinstance(data, str):
                yield SourceRow(file, number, None, data)
            else:
                yield SourceRow(file, number, data)


def _parquet_row(batch: pa.RecordBatch, index: int) -> dict[str, Any] | str:
    """One row of a batch whose strings are not all valid UTF-8: the row, or why not."""
    try:
        return cast(dict[str, Any], batch.slice(index, 1).to_pylist()[0])
    except UnicodeDecodeError as exc:
        return f"row is not valid UTF-8 text ({exc.reason})"


def read_rows(
    paths: list[Path], batch_size: int = 1000, *, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
) -> Iterator[list[SourceRow]]:
    """Yield rows of every file in order, ``batch_size`` at a time."""

    def rows() -> Iterator[SourceRow]:
        for path in paths:
            if path.name.lower().endswith(PARQUET_SUFFIXES):
                try:
                    parquet = open_parquet(path)
                except Exception as exc:  # gone or damaged since the pre-flight check
                    yield SourceRow(path, 1, None, f"file cannot be read ({exc})")
                    continue
                yield from parquet_rows(path, parquet, batch_size)
            else:
                yield from _jsonl_rows(path, max_line_bytes)

    return in_batches(rows(), batch_size)


def in_batches(rows: Iterable[SourceRow], size: int) -> Iterator[list[SourceRow]]:
    """Rows in lists of ``size`` (the last may be shorter), for the reader thread to
    hand over in one go."""
    batch: list[SourceRow] = []
    for row in rows:
        batch.append(row)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def count_rows(paths: list[Path]) -> int:
    """Rows in all inputs, cheaply: Parquet footers, and newlines in JSONL files.

    Used only for the progress bar's total and ETA, so a blank line counted as a
    row is harmless, and a file it cannot read (cut short, corrupt, gone) counts the
    rows it got to: the reader reports the damage as a row; this only guesses.
    """
    total = 0
    for path in paths:
        try:
            if path.name.lower().endswith(PARQUET_SUFFIXES):
                total += pq.ParquetFile(path).metadata.num_rows
                continue
            with open_bytes(path) as fh:
                last = b"\n"
                while chunk := fh.read(1 << 16):  # small: a cut gzip loses the last
                    total += chunk.count(b"\n")
                    last = chunk[-1:]
                if last != b"\n":
                    total += 1
        except Exception:  # an ETA is never worth a crash
            continue
    return total
