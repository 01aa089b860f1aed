"""Read input rows from JSONL, JSONL.gz and Parquet files, a folder or a glob, in batches.

Files are streamed: a JSONL file is read line by line and a Parquet file batch by
batch, so a ten-million-row input never sits in memory. A line that is not JSON does
not stop the run: it comes out as a row with ``error`` set, which the request stage
turns into an ``invalid_input`` result naming the file and line.
"""

from __future__ import annotations

import glob
import gzip
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import UsageError

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson", ".ndjson.gz", ".json", ".json.gz")
PARQUET_SUFFIXES = (".parquet", ".pq")


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


def _is_input(path: Path) -> bool:
    return is_input_name(path.name)


def expand_sources(specs: list[str | Path]) -> list[Path]:
    """Resolve files, folders and glob patterns to a sorted, de-duplicated file list.

    Raises UsageError (exit 2, nothing sent) for anything that names no input at all,
    so a typo in a cron tab fails loudly instead of running on nothing.
    """
    found: list[Path] = []
    for spec in specs:
        text = str(spec)
        path = Path(text)
        if glob.has_magic(text):
            matches = sorted(Path(p) for p in glob.glob(text, recursive=True))
            files = [p for p in matches if p.is_file() and _is_input(p)]
            if not files:
                raise UsageError(f"{text}: no JSONL or Parquet file matches this pattern")
            found.extend(files)
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and _is_input(p))
            if not files:
                raise UsageError(f"{text}: folder holds no .jsonl, .jsonl.gz or .parquet file")
            found.extend(files)
        elif path.is_file():
            if not _is_input(path):
                raise UsageError(f"{text}: not a .jsonl, .jsonl.gz or .parquet file")
            found.append(path)
        else:
            raise UsageError(f"{text}: no such file or folder")
    unique: dict[Path, Path] = {}  # resolved path -> the path as the user wrote it
    for p in found:
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


def open_bytes(path: Path) -> IO[bytes]:
    """A local input as bytes; gzip is undone on the fly (``.gz`` names)."""
    if path.name.lower().endswith(".gz"):
        return cast(IO[bytes], gzip.open(path, "rb"))
    return open(path, "rb")


def _jsonl_rows(path: Path) -> Iterator[SourceRow]:
    with open_bytes(path) as fh:
        yield from parse_lines(path, enumerate(fh, start=1))


def parse_lines(file: InputFile, lines: Iterable[tuple[int, bytes]]) -> Iterator[SourceRow]:
    """Numbered raw lines to rows. Lines are decoded one by one, so one bad byte costs
    one row, not the file."""
    for number, raw in lines:
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            yield SourceRow(file, number, None, f"line is not valid UTF-8 ({exc.reason})")
            continue
        try:
            data = json.loads(line)
        except ValueError as exc:
            yield SourceRow(file, number, None, f"line is not valid JSON ({exc.args[0]})")
            continue
        if not isinstance(data, dict):
            yield SourceRow(file, number, None, "line is JSON but not an object")
            continue
        yield SourceRow(file, number, data)


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
    for batch in parquet.iter_batches(batch_size=batch_size, row_groups=row_groups):
        for data in batch.to_pylist():
            number += 1
            yield SourceRow(file, number, data)


def read_rows(paths: list[Path], batch_size: int = 1000) -> Iterator[list[SourceRow]]:
    """Yield rows of every file in order, ``batch_size`` at a time."""

    def rows() -> Iterator[SourceRow]:
        for path in paths:
            if path.name.lower().endswith(PARQUET_SUFFIXES):
                yield from parquet_rows(path, open_parquet(path), batch_size)
            else:
                yield from _jsonl_rows(path)

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
    row is harmless.
    """
    total = 0
    for path in paths:
        if path.name.lower().endswith(PARQUET_SUFFIXES):
            total += pq.ParquetFile(path).metadata.num_rows
            continue
        opener = gzip.open if path.name.lower().endswith(".gz") else open
        with opener(path, "rb") as fh:
            last = b"\n"
            while chunk := fh.read(1 << 20):
                total += chunk.count(b"\n")
                last = chunk[-1:]
            if last != b"\n":
                total += 1
    return total
