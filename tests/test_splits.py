"""Splits for the Ray engine: every row read exactly once, named exactly as in one process.

Workers read their splits on their own, so the one property that matters is that
reading every split in order gives the rows ``pipeline.source.read_rows`` gives for
the same files: same file, same line number, same data, same error. Bad lines,
blank lines, a BOM and a missing last newline must not move a split's edge.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.cluster.splits import (
    GRANULE,
    MAX_SPLIT_ROWS,
    MIN_SPLIT_ROWS,
    Split,
    expand_locations,
    plan_splits,
    read_split,
    split_rows_for,
)
from pipeline.errors import UsageError
from pipeline.source import RemoteFile, SourceRow, expand_sources, read_rows

BOM = b"\xef\xbb\xbf"


def line(i: int) -> bytes:
    """Line ``i`` (from 1) of a messy JSONL file: mostly rows, some of every kind of bad."""
    if i in (2, 101):  # blank, one of them first in a granule
        return b""
    if i == 7:
        return b"   \t"
    if i in (57, 200):
        return b'{"id": 57, "prompt": "cut'
    if i == 99:
        return b'{"id": "\xff\xfe"}'  # not UTF-8
    if i == 150:
        return b"[1, 2]"  # JSON, not an object
    return json.dumps({"id": f"r{i}", "prompt": f"prompt {i}", "n": i}).encode()


def messy_jsonl(path: Path, lines: int, *, newline_at_end: bool, bom: bool = True) -> Path:
    body = b"\n".join(line(i) for i in range(1, lines + 1))
    if bom:
        body = BOM + body
    if newline_at_end and lines:
        body += b"\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(body))
    else:
        path.write_bytes(body)
    return path


def write_parquet(path: Path, rows: int, row_group_size: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist([{"id": f"p{i}", "prompt": f"prompt {i}"} for i in range(rows)])
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


@pytest.fixture
def inputs(tmp_path: Path) -> dict[str, Path]:
    """Inputs of every kind and size that moves an edge; name -> path."""
    folder = tmp_path / "in"
    files = {
        "a": messy_jsonl(folder / "a.jsonl", 250, newline_at_end=False),
        "b": messy_jsonl(folder / "b.jsonl", 300, newline_at_end=True),  # 3 whole granules
        "c": messy_jsonl(folder / "c.jsonl", 100, newline_at_end=False),  # 1, no last newline
        "d": write_parquet(folder / "d.parquet", 57, row_group_size=5),  # 12 row groups
        "e": write_parquet(folder / "e.parquet", 30, row_group_size=1000),  # 1 row group
        "f": messy_jsonl(folder / "f.jsonl.gz", 120, newline_at_end=True),
        "g": messy_jsonl(folder / "g.jsonl", 1, newline_at_end=True, bom=False),
        "h": messy_jsonl(folder / "h.jsonl", 0, newline_at_end=False, bom=False),  # empty
        "i": messy_jsonl(folder / "sub" / "i.jsonl", 201, newline_at_end=True),
    }
    return files


def lines_in(path: Path) -> int:
    """Lines in a JSONL file as a reader counts them, blank ones included."""
    data = path.read_bytes()
    return data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)


def read_all(splits: list[Split], batch_size: int = 1000) -> list[SourceRow]:
    return [row for s in splits for batch in read_split(s, batch_size) for row in batch]


def in_one_process(paths: list[Path]) -> list[SourceRow]:
    return [row for batch in read_rows(paths) for row in batch]


def as_tuples(rows: list[SourceRow]) -> list[tuple[str, int, Any, str | None]]:
    return [(str(r.file), r.line, r.data, r.error) for r in rows]


@pytest.mark.parametrize("split_rows", [1, 100, 150, 250, 10_000, None])
def test_reading_every_split_gives_the_same_rows_as_one_process(
    inputs: dict[str, Path], split_rows: int | None
) -> None:
    paths = list(inputs.values())
    expected = in_one_process(paths)

    splits = plan_splits([str(p) for p in paths], workers=3, split_rows=split_rows)
    got = read_all(splits)

    assert got == expected
    # the messy lines really are in there, and named where one process names them
    errors = {(r.file.name, r.line) for r in got if r.error}
    assert {("a.jsonl", 57), ("a.jsonl", 99), ("a.jsonl", 150), ("b.jsonl", 200)} <= errors
    assert all(isinstance(r.file, Path) for r in got)


def test_a_bom_on_line_one_is_not_part_of_the_first_row(inputs: dict[str, Path]) -> None:
    splits = plan_splits([str(inputs["a"])], workers=1, split_rows=100)

    first = next(read_split(splits[0]))[0]

    assert (first.line, first.data, first.error) == (1, json.loads(line(1)), None)


@pytest.mark.parametrize("split_rows", [1, 100, 150, 250, 10_000])
def test_splits_tile_each_file_and_their_rows_add_up(
    inputs: dict[str, Path], split_rows: int
) -> None:
    paths = list(inputs.values())
    splits = plan_splits([str(p) for p in paths], workers=3, split_rows=split_rows)

    order = [[str(p) for p in paths].index(s.location) for s in splits]
    assert order == sorted(order)  # in input order
    for path in paths:
        mine = [s for s in splits if s.location == str(path)]
        if path.name.endswith(".gz"):  # cannot be entered in the middle: one split
            assert [(s.first_line, s.start, s.stop, s.rows) for s in mine] == [(1, 0, -1, 0)]
            continue
        if path.suffix == ".parquet":
            meta = pq.ParquetFile(path).metadata
            assert sum(s.rows for s in mine) == meta.num_rows
            assert mine[0].start == 0 and mine[-1].stop == meta.num_row_groups
            assert all(s.rows >= split_rows for s in mine[:-1])
        else:
            assert sum(s.rows for s in mine) == lines_in(path)
            assert not mine or (mine[0].start == 0 and mine[-1].stop == -1)
            step = max(1, split_rows // GRANULE) * GRANULE
            assert all(s.rows == step for s in mine[:-1])
            assert all((s.first_line - 1) % GRANULE == 0 for s in mine)
        for before, after in zip(mine, mine[1:], strict=False):
            assert after.start == before.stop  # no gap, no overlap
            assert after.first_line == before.first_line + before.rows
        for s in mine:  # each split's rows lie within its own lines
            lines = [r.line for r in read_all([s])]
            assert all(s.first_line <= n < s.first_line + s.rows for n in lines)


def test_files_of_whole_granules_have_no_empty_last_split(inputs: dict[str, Path]) -> None:
    """300 lines in splits of 100 are 3 splits, not 3 and an empty one at the end."""
    splits = plan_splits([str(inputs["b"]), str(inputs["c"])], workers=1, split_rows=100)

    assert [(s.location, s.first_line, s.rows) for s in splits] == [
        (str(inputs["b"]), 1, 100),
        (str(inputs["b"]), 101, 100),
        (str(inputs["b"]), 201, 100),
        (str(inputs["c"]), 1, 100),
    ]


def test_parquet_splits_are_runs_of_whole_row_groups(inputs: dict[str, Path]) -> None:
    """57 rows in groups of 5: splits of at least 12 rows are 3 groups (15 rows) each."""
    location = str(inputs["d"])

    splits = plan_splits([location], workers=1, split_rows=12)

    assert [(s.first_line, s.start, s.stop, s.rows) for s in splits] == [
        (1, 0, 3, 15),
        (16, 3, 6, 15),
        (31, 6, 9, 15),
        (46, 9, 12, 12),
    ]


def test_batches_of_a_split_respect_the_size(inputs: dict[str, Path]) -> None:
    paths = [inputs["a"], inputs["d"]]
    splits = plan_splits([str(p) for p in paths], workers=1, split_rows=200)

    for s in splits:
        sizes = [len(b) for b in read_split(s, batch_size=7)]
        assert sizes and all(n == 7 for n in sizes[:-1]) and 0 < sizes[-1] <= 7
    assert read_all(splits, batch_size=7) == in_one_process(paths)


def test_split_round_trips_through_json(inputs: dict[str, Path]) -> None:
    """Ray hands splits to workers as JSON text."""
    splits = plan_splits([str(p) for p in inputs.values()], workers=2, split_rows=100)

    for s in splits:
        text = s.to_json()
        assert isinstance(json.loads(text), dict)
        again = Split.from_json(text)
        assert again == s
        assert again.name == f"{s.location}:{s.first_line}"
    assert read_all([Split.from_json(s.to_json()) for s in splits]) == read_all(splits)


def test_unset_split_rows_aims_at_a_few_splits_per_worker(tmp_path: Path) -> None:
    path = messy_jsonl(tmp_path / "rows.jsonl", 1000, newline_at_end=True)

    splits = plan_splits([str(path)], workers=1)  # 1000 rows / 4 = 250, in whole granules

    assert [s.rows for s in splits] == [200] * 5


@pytest.mark.parametrize(
    ("total", "workers", "expected"),
    [
        (0, 4, MIN_SPLIT_ROWS),
        (1000, 8, MIN_SPLIT_ROWS),
        (100_000, 10, 2500),
        (10**9, 1, MAX_SPLIT_ROWS),
        (5000, 0, 5000),  # no workers known: one split, never a division by zero
    ],
)
def test_split_rows_for_stays_within_bounds(total: int, workers: int, expected: int) -> None:
    got = split_rows_for(total, workers)

    assert got == expected
    assert MIN_SPLIT_ROWS <= got <= MAX_SPLIT_ROWS


# ------------------------------------------------------------------ URLs (file://)


def url(path: Path) -> str:
    return f"file://{path}"


def test_a_folder_url_reads_like_the_local_folder(inputs: dict[str, Path]) -> None:
    folder = inputs["a"].parent
    local = expand_sources([folder])

    locations = expand_locations([url(folder)])
    assert locations == [url(p) for p in local]
    rows = read_all(plan_splits(locations, workers=2, split_rows=100))

    assert as_tuples(rows) == [
        ("file://" + f, n, data, error) for f, n, data, error in as_tuples(in_one_process(local))
    ]
    for r in rows:
        assert isinstance(r.file, RemoteFile)
        assert str(r.file).startswith("file:///") and str(r.file).endswith("/" + r.file.name)
    assert {r.file.name for r in rows} == {p.name for p in local if p.name != "h.jsonl"}


def test_a_file_url_is_kept_as_written_and_read_in_splits(inputs: dict[str, Path]) -> None:
    location = url(inputs["a"])

    assert expand_locations([location]) == [location]
    splits = plan_splits([location], workers=1, split_rows=100)
    rows = read_all(splits)

    assert len(splits) == 3
    assert {r.file for r in rows} == {RemoteFile(location)}
    assert next(iter({r.file.name for r in rows})) == "a.jsonl"
    assert [(r.line, r.data, r.error) for r in rows] == [
        (r.line, r.data, r.error) for r in in_one_process([inputs["a"]])
    ]


def test_a_glob_url_matches_files_in_its_folder(inputs: dict[str, Path]) -> None:
    folder = inputs["a"].parent

    locations = expand_locations([url(folder) + "/*.parquet"])

    assert locations == [url(inputs["d"]), url(inputs["e"])]
    rows = read_all(plan_splits(locations, workers=1, split_rows=10))
    assert [(r.file.name, r.line) for r in rows] == [("d.parquet", n) for n in range(1, 58)] + [
        ("e.parquet", n) for n in range(1, 31)
    ]


@pytest.mark.parametrize("pattern", ["*.parquet", "**/*.parquet"])
def test_a_glob_url_matches_what_the_same_local_glob_matches(
    inputs: dict[str, Path], pattern: str
) -> None:
    folder = inputs["a"].parent
    write_parquet(folder / "sub" / "x.parquet", 3, row_group_size=1000)

    local = expand_sources([str(folder / pattern)])

    assert expand_locations([f"{url(folder)}/{pattern}"]) == [url(p) for p in local]


def test_local_paths_and_urls_mix_in_order_without_repeats(inputs: dict[str, Path]) -> None:
    a, d = str(inputs["a"]), url(inputs["d"])

    assert expand_locations([d, a, d, a]) == [d, a]


@pytest.mark.parametrize(
    ("make", "complaint"),
    [
        (lambda tmp: str(tmp / "missing.jsonl"), "no such file"),
        (lambda tmp: str(tmp / "empty"), "holds no"),
        (lambda tmp: str(tmp / "in" / "*.pq"), "no JSONL or Parquet file"),
        (lambda tmp: url(tmp / "missing.jsonl"), "no such file"),
        (lambda tmp: url(tmp / "empty"), "no JSONL or Parquet file"),
        (lambda tmp: url(tmp / "in") + "/*.pq", "no JSONL or Parquet file"),
        (lambda tmp: url(tmp / "empty" / "notes.txt"), "not a .jsonl"),
        (lambda tmp: "nosuchscheme://bucket/rows.jsonl", "cannot open this URL"),
    ],
    ids=[
        "missing-path",
        "folder-without-inputs",
        "glob-no-match",
        "missing-url",
        "url-folder-without-inputs",
        "url-glob-no-match",
        "url-wrong-suffix",
        "unknown-scheme",
    ],
)
def test_locations_naming_no_input_are_a_usage_error(
    inputs: dict[str, Path], make: Any, complaint: str
) -> None:
    tmp = inputs["a"].parent.parent
    (tmp / "empty").mkdir()
    (tmp / "empty" / "notes.txt").write_text("not an input\n")
    spec = make(tmp)

    with pytest.raises(UsageError) as caught:
        expand_locations([str(inputs["a"]), spec])

    assert spec in str(caught.value)
    assert complaint in str(caught.value)


@pytest.mark.parametrize(
    "spec",
    [
        "s3://KEY:hunter2@bucket/rows.jsonl",
        "abfs://c@acct.dfs.core.windows.net/rows.jsonl?sig=hunter2",
    ],
)
def test_urls_carrying_secrets_are_refused_and_not_echoed(spec: str) -> None:
    with pytest.raises(UsageError) as info:
        expand_locations([spec])
    assert "hunter2" not in str(info.value)
    assert "environment" in str(info.value)
