"""Cut the inputs into splits that workers read on their own (``--engine ray``).

A split is a run of whole lines of one JSONL file (a byte range that starts and
ends on a line break) or a run of row groups of one Parquet file. The driver finds
the line breaks in one streaming pass, so each split knows the number of its first
line: a bad row in a Ray worker is named by file and line exactly as in one process.
Workers parse with the same code as ``pipeline.source``; nobody loads a whole file.

Inputs may be local paths, folders and globs, or URLs that pyarrow's filesystems
understand (``s3://``, ``gs://``, ``hdfs://``, ``file://``...). A gzip file cannot be
entered in the middle, so it is one split.
"""

from __future__ import annotations

import fnmatch
import glob
import io
import json
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.errors import UsageError
from pipeline.source import (
    DEFAULT_MAX_LINE_BYTES,
    PARQUET_SUFFIXES,
    InputFile,
    Line,
    LineTooLong,
    ReadFailed,
    RemoteFile,
    SkipNotes,
    SourceRow,
    bounded_lines,
    check_readable,
    expand_sources,
    in_batches,
    is_input_name,
    open_bytes,
    open_parquet,
    parquet_rows,
    parse_lines,
    skip_reason,
)

GRANULE = 100  # lines: splits of a JSONL file start on a multiple of this
MIN_SPLIT_ROWS = 200
MAX_SPLIT_ROWS = 50_000
SPLITS_PER_WORKER = 4  # enough pieces that a slow or restarted worker does not hold up the end

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(text: str) -> bool:
    return bool(_URL.match(text))


def _is_parquet(location: str) -> bool:
    return location.lower().endswith(PARQUET_SUFFIXES)


def _filesystem(url: str) -> tuple[pafs.FileSystem, str, str]:
    """(filesystem, path in it, ``scheme://`` to rebuild URLs of files found in it)."""
    try:
        fs, path = pafs.FileSystem.from_uri(url)
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ...
        raise UsageError(f"{url}: cannot open this URL ({exc})") from None
    scheme = url.split("://", 1)[0] + "://"
    return fs, path, scheme


def _glob_match(path: str, pattern: str) -> bool:
    """Glob rules, as for local paths: ``*`` and ``?`` stay within one folder, ``**``
    spans any number of folders (none included)."""
    return _match_parts(path.split("/"), pattern.split("/"))


def _match_parts(parts: list[str], patterns: list[str]) -> bool:
    if not patterns:
        return not parts
    head, rest = patterns[0], patterns[1:]
    if head == "**":
        return any(_match_parts(parts[i:], rest) for i in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], head) and _match_parts(parts[1:], rest)


def _expand_url(spec: str, say: Callable[[str], None] | None = None) -> list[str]:
    magic = glob.has_magic(spec)
    base = spec
    if magic:  # list from the last folder before the first wildcard, then match
        base = spec[: re.search(r"[*?\[]", spec).start()].rsplit("/", 1)[0]  # type: ignore[union-attr]
    fs, path, scheme = _filesystem(base)
    try:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File and not magic:
            if not is_input_name(path):
                raise UsageError(f"{spec}: not a .jsonl, .jsonl.gz or .parquet file")
            return [spec]
        if info.type != pafs.FileType.Directory:
            raise UsageError(f"{spec}: no such file or folder")
        listing = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    except OSError as exc:
        raise UsageError(f"{spec}: cannot list ({exc})") from None
    # The same rule as for local folders and globs: hidden parts below the folder or
    # glob base are skipped, files that are not data are named once.
    root = path.rstrip("/") + "/"
    urls = []
    notes = SkipNotes(say)
    for item in sorted(listing, key=lambda i: str(i.path)):
        if item.type != pafs.FileType.File:
            continue
        url = scheme + item.path
        if magic and not _glob_match(url, spec):
            continue
        parts = item.path[len(root) :].split("/") if item.path.startswith(root) else []
        reason = skip_reason(parts, item.base_name, 0o100644)  # listed as a file
        if reason is None:
            urls.append(url)
        else:
            notes.add(reason, url)
    notes.flush(spec)
    if not urls:
        raise UsageError(f"{spec}: no JSONL or Parquet file here")
    return urls


def expand_locations(
    specs: list[str], *, out: Path | None = None, say: Callable[[str], None] | None = None
) -> list[str]:
    """Like ``source.expand_sources``, for a mix of local paths and URLs (``out``, the
    results folder, is left out of local folders and globs as there).

    Local paths come back absolute: a Ray worker on another node (or in another
    folder) must read the same file. A file named twice, however it was named
    (``data/``, ``/abs/data/a.jsonl``, ``file:///abs/data/a.jsonl``), is read once.
    """
    found: dict[str, str] = {}  # identity -> location
    for spec in specs:
        if is_url(spec):
            if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/@]*:[^/@]*@", spec):
                raise UsageError(
                    f"{_redact(spec)}: credentials in a URL would end up in manifests and "
                    "results; give them to the filesystem through its environment "
                    "(e.g. AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)"
                )
            if "?" in spec:
                raise UsageError(
                    f"{spec.split('?', 1)[0]}?...: a URL's query can carry secrets (SAS "
                    "tokens, client secrets) that would end up in manifests and results; "
                    "give them to the filesystem through its environment"
                )
            for url in _expand_url(spec, say):
                key = (
                    str(Path(url[len("file://") :]).resolve()) if url.startswith("file://") else url
                )
                found.setdefault(key, url)
        else:
            for path in expand_sources([spec], out=out, say=say):
                # Workers get the path as seen here (a symlinked mount may resolve
                # elsewhere on another node); the resolved one only spots repeats.
                found.setdefault(str(path.resolve()), str(path.absolute()))
    return list(found.values())


def _redact(url: str) -> str:
    return re.sub(r"://[^/@]*@", "://***@", url)


def input_file(location: str) -> InputFile:
    return RemoteFile(location) if is_url(location) else Path(location)


def _open(location: str, *, seekable: bool = False) -> IO[bytes]:
    """A buffered binary file; gzip is undone on the fly (``.gz`` names)."""
    if not is_url(location):
        return open_bytes(Path(location))
    gz = location.lower().endswith(".gz")
    fs, path, _ = _filesystem(location)
    if seekable and not gz:
        return io.BufferedReader(fs.open_input_file(path), buffer_size=1 << 20)
    stream = fs.open_input_stream(path, compression="gzip" if gz else None)
    return io.BufferedReader(stream, buffer_size=1 << 20)


def _parquet(location: str) -> pq.ParquetFile:
    if not is_url(location):
        return open_parquet(location)
    fs, path, _ = _filesystem(location)
    return open_parquet(fs.open_input_file(path))


@dataclass(frozen=True, slots=True)
class Split:
    """A piece of one input file that one worker reads from start to stop."""

    location: str  # local path or URL
    first_line: int  # line (JSONL) or row (Parquet) number of the first row, from 1
    start: int  # JSONL: byte offset of the first line; Parquet: first row group
    stop: int  # JSONL: byte offset past the last line, -1 = end; Parquet: row group after
    rows: int  # lines or rows in it (0 when unknown: a gzip file)
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES  # a longer JSONL line is an invalid row

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Split:
        return cls(**json.loads(text))

    @property
    def name(self) -> str:
        return f"{self.location}:{self.first_line}"


@dataclass(slots=True)
class _Layout:
    location: str
    rows: int
    marks: list[int]  # JSONL: byte offset of every GRANULE-th line; Parquet: rows per group


def _layout(location: str, max_line_bytes: int) -> _Layout:
    if _is_parquet(location):
        meta = _parquet(location).metadata
        groups = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        return _Layout(location, sum(groups), groups)
    if location.lower().endswith(".gz"):
        return _Layout(location, 0, [0])
    marks = [0]
    lines = offset = 0
    with _open(location) as fh:
        # Bounded like the workers' reading: a huge line is skipped, not held.
        for raw in bounded_lines(fh, max_line_bytes):
            if isinstance(raw, ReadFailed):
                break  # the worker reading this part reports it as a row
            lines += 1
            offset += raw.length if isinstance(raw, LineTooLong) else len(raw)
            if lines % GRANULE == 0:
                marks.append(offset)
    if marks[-1] == offset:
        marks.pop()  # no line starts at the very end
    return _Layout(location, lines, marks)


def split_rows_for(total_rows: int, workers: int) -> int:
    """Rows per split: about SPLITS_PER_WORKER splits per worker, within bounds."""
    want = math.ceil(total_rows / max(1, workers * SPLITS_PER_WORKER))
    return max(MIN_SPLIT_ROWS, min(MAX_SPLIT_ROWS, want))


def plan_splits(
    locations: list[str],
    workers: int,
    split_rows: int | None = None,
    *,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
) -> list[Split]:
    """Cut every input into splits, in input order."""
    layouts = [_layout(loc, max_line_bytes) for loc in locations]
    size = split_rows or split_rows_for(sum(lay.rows for lay in layouts), workers)
    splits: list[Split] = []
    for lay in layouts:
        if _is_parquet(lay.location):
            first, group, rows = 1, 0, 0
            for index, count in enumerate(lay.marks):
                rows += count
                if rows >= size or index == len(lay.marks) - 1:
                    splits.append(
                        Split(lay.location, first, group, index + 1, rows, max_line_bytes)
                    )
                    first += rows
                    group, rows = index + 1, 0
            continue
        if lay.location.lower().endswith(".gz"):
            splits.append(Split(lay.location, 1, 0, -1, 0, max_line_bytes))
            continue
        step = max(1, size // GRANULE)
        for k in range(0, len(lay.marks), step):
            stop = lay.marks[k + step] if k + step < len(lay.marks) else -1
            first = 1 + k * GRANULE
            rows = min(step * GRANULE, lay.rows - k * GRANULE)
            splits.append(Split(lay.location, first, lay.marks[k], stop, rows, max_line_bytes))
    return splits


def _split_lines(split: Split) -> Iterator[SourceRow]:
    file = input_file(split.location)
    with _open(split.location, seekable=True) as fh:
        if split.start:
            fh.seek(split.start)
        offset = split.start

        def numbered() -> Iterator[tuple[int, Line]]:
            nonlocal offset
            lines = bounded_lines(fh, split.max_line_bytes)
            for number, raw in enumerate(lines, start=split.first_line):
                if split.stop >= 0 and offset >= split.stop:
                    return
                offset += len(raw) if isinstance(raw, bytes) else 0
                offset += raw.length if isinstance(raw, LineTooLong) else 0
                yield number, raw

        yield from parse_lines(file, numbered())


def read_split(split: Split, batch_size: int = 1000) -> Iterator[list[SourceRow]]:
    """The split's rows, ``batch_size`` at a time, numbered as in the whole file."""
    if _is_parquet(split.location):
        groups = list(range(split.start, split.stop))
        rows = parquet_rows(
            input_file(split.location),
            _parquet(split.location),
            batch_size,
            first_line=split.first_line,
            row_groups=groups,
        )
        return in_batches(rows, batch_size)
    return in_batches(_split_lines(split), batch_size)


def check_location(location: str) -> None:
    """Open an input once, so an unreadable one is exit 2 before anything is sent."""
    if not is_url(location):
        check_readable(Path(location))
        return
    try:
        if _is_parquet(location):
            _parquet(location)
        else:
            with _open(location) as fh:
                fh.read(1)
    except UsageError:
        raise
    except Exception as exc:
        raise UsageError(f"{location}: cannot read input ({exc})") from None
