"""Reading inputs: which files a source names, and the rows in them, line numbers intact.

A typo in a cron tab must fail before anything is sent (UsageError, exit 2), and a bad
line must cost one row, never the run.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import UsageError
from pipeline.source import SourceRow, check_readable, count_rows, expand_sources, read_rows


def write_jsonl(path: Path, lines: Iterable[str | dict[str, Any]]) -> Path:
    """Write lines as given: dicts as JSON, strings verbatim (blank or broken lines too)."""
    text = "".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as fh:
            fh.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def write_parquet(path: Path, rows: list[dict[str, Any]], row_group_size: int = 1000) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)
    return path


def numbered(n: int, prefix: str = "r") -> list[dict[str, Any]]:
    return [{"id": f"{prefix}{i}", "prompt": f"prompt {i}"} for i in range(1, n + 1)]


def all_rows(paths: list[Path], batch_size: int = 1000) -> list[SourceRow]:
    return [row for batch in read_rows(paths, batch_size=batch_size) for row in batch]


@pytest.fixture
def inputs(tmp_path: Path) -> Path:
    """A folder with inputs at two depths, plus files that are not inputs."""
    folder = tmp_path / "in"
    write_jsonl(folder / "a.jsonl", numbered(2, "a"))
    write_jsonl(folder / "sub" / "c.jsonl.gz", numbered(2, "c"))
    write_parquet(folder / "sub" / "b.parquet", numbered(2, "b"))
    (folder / "notes.txt").write_text("not an input\n")
    (folder / "sub" / "table.csv").write_text("id,prompt\n")
    return folder


# ------------------------------------------------------------------ expand_sources


def test_files_are_kept_in_the_order_given(inputs: Path) -> None:
    a, b = inputs / "a.jsonl", inputs / "sub" / "b.parquet"

    assert expand_sources([b, str(a)]) == [b, a]


def test_folder_is_searched_recursively_for_inputs_only(inputs: Path) -> None:
    assert expand_sources([inputs]) == [
        inputs / "a.jsonl",
        inputs / "sub" / "b.parquet",
        inputs / "sub" / "c.jsonl.gz",
    ]


def test_glob_matches_inputs(inputs: Path) -> None:
    assert expand_sources([str(inputs / "*.jsonl")]) == [inputs / "a.jsonl"]
    assert expand_sources([str(inputs / "**" / "*.parquet")]) == [inputs / "sub" / "b.parquet"]


def test_duplicates_are_removed_keeping_first_position(inputs: Path) -> None:
    a = inputs / "a.jsonl"

    found = expand_sources([a, inputs, str(inputs / "**" / "*.jsonl*"), a])

    assert found == [a, inputs / "sub" / "b.parquet", inputs / "sub" / "c.jsonl.gz"]


def test_same_file_named_relatively_and_absolutely_is_read_once(
    inputs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(inputs.parent)

    found = expand_sources(["in/a.jsonl", inputs / "a.jsonl"])

    assert len(found) == 1


@pytest.mark.parametrize(
    ("make", "complaint"),
    [
        (lambda tmp: tmp / "missing.jsonl", "no such file"),
        (lambda tmp: tmp / "in" / "sub" / "table.csv", "not a .jsonl"),
        (lambda tmp: tmp / "empty", "holds no"),
        (lambda tmp: tmp / "in" / "*.parquet", "no JSONL or Parquet file matches"),
    ],
    ids=["missing-file", "wrong-suffix", "empty-folder", "glob-no-match"],
)
def test_source_naming_no_input_is_a_usage_error(inputs: Path, make: Any, complaint: str) -> None:
    tmp = inputs.parent
    (tmp / "empty").mkdir()
    spec = make(tmp)

    with pytest.raises(UsageError) as caught:
        expand_sources([inputs / "a.jsonl", spec])

    assert str(spec) in str(caught.value)
    assert complaint in str(caught.value)


# ------------------------------------------------------------------ read_rows


def test_jsonl_blank_lines_are_skipped_but_counted(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "rows.jsonl", [{"id": 1}, "", "   ", {"id": 2}, "", {"id": 3}])

    rows = all_rows([path])

    assert [(r.line, r.data) for r in rows] == [(1, {"id": 1}), (4, {"id": 2}), (6, {"id": 3})]
    assert all(r.file == path and r.error is None for r in rows)


def test_gzipped_jsonl_reads_like_plain(tmp_path: Path) -> None:
    lines: list[str | dict[str, Any]] = [{"id": "é"}, "", {"id": "ü", "n": [1, 2]}]
    plain = write_jsonl(tmp_path / "rows.jsonl", lines)
    packed = write_jsonl(tmp_path / "rows.jsonl.gz", lines)

    def seen(path: Path) -> list[tuple[int, Any]]:
        return [(r.line, r.data) for r in all_rows([path])]

    assert seen(packed) == seen(plain) == [(1, {"id": "é"}), (3, {"id": "ü", "n": [1, 2]})]


def test_parquet_rows_are_numbered_from_one_across_row_groups(tmp_path: Path) -> None:
    rows = numbered(10)
    path = write_parquet(tmp_path / "rows.parquet", rows, row_group_size=3)

    read = all_rows([path], batch_size=4)

    assert [r.line for r in read] == list(range(1, 11))
    assert [r.data for r in read] == rows
    assert read[0].where == f"{path}:1"


def test_batches_respect_the_size_and_keep_order_across_files(tmp_path: Path) -> None:
    first = write_jsonl(tmp_path / "a.jsonl", numbered(5, "a"))
    second = write_parquet(tmp_path / "b.parquet", numbered(4, "b"), row_group_size=2)
    third = write_jsonl(tmp_path / "c.jsonl.gz", numbered(2, "c"))

    batches = list(read_rows([first, second, third], batch_size=3))

    assert [len(b) for b in batches] == [3, 3, 3, 2]
    ids = [row.data["id"] for b in batches for row in b if row.data]
    assert ids == [f"a{i}" for i in range(1, 6)] + [f"b{i}" for i in range(1, 5)] + ["c1", "c2"]


def test_empty_input_yields_no_batches(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "empty.jsonl", [])

    assert list(read_rows([path])) == []


def test_malformed_lines_become_error_rows_and_reading_goes_on(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "rows.jsonl",
        [{"id": 1}, '{"id": 2, "prompt": "cut', "", "[1, 2]", '"just text"', {"id": 6}],
    )

    rows = all_rows([path])

    assert [(r.line, r.data is None) for r in rows] == [
        (1, False),
        (2, True),
        (4, True),
        (5, True),
        (6, False),
    ]
    broken, array, text = rows[1], rows[2], rows[3]
    assert broken.error is not None and "not valid JSON" in broken.error
    assert array.error == "line is JSON but not an object"
    assert text.error == "line is JSON but not an object"
    assert rows[-1].data == {"id": 6}


def test_line_with_invalid_utf8_is_an_error_row_not_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"id": 1}\n{"id": "\xff\xfe"}\n{"id": 3}\n')

    rows = all_rows([path])

    assert [r.line for r in rows] == [1, 2, 3]
    assert rows[1].data is None and rows[1].error
    assert rows[2].data == {"id": 3}


# ------------------------------------------------------------------ check_readable


def test_readable_inputs_pass(inputs: Path) -> None:
    for path in expand_sources([inputs]):
        check_readable(path)


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("corrupt.parquet", b"PAR1 this is not a parquet footer PAR1"),
        ("truncated.parquet", b"PAR1"),
        ("not-gzip.jsonl.gz", b'{"id": 1}\n'),
    ],
)
def test_unreadable_input_is_a_usage_error_naming_it(
    tmp_path: Path, name: str, content: bytes
) -> None:
    path = tmp_path / name
    path.write_bytes(content)

    with pytest.raises(UsageError) as caught:
        check_readable(path)

    assert str(path) in str(caught.value)


# ------------------------------------------------------------------ count_rows


def test_count_rows_over_every_kind_of_input(tmp_path: Path) -> None:
    plain = write_jsonl(tmp_path / "a.jsonl", numbered(3))
    packed = write_jsonl(tmp_path / "b.jsonl.gz", numbered(4))
    table = write_parquet(tmp_path / "c.parquet", numbered(5), row_group_size=2)
    unterminated = tmp_path / "d.jsonl"
    unterminated.write_text('{"id": 1}\n{"id": 2}', encoding="utf-8")
    empty = write_jsonl(tmp_path / "e.jsonl", [])

    assert count_rows([plain]) == 3
    assert count_rows([packed]) == 4
    assert count_rows([table]) == 5
    assert count_rows([unterminated]) == 2
    assert count_rows([empty]) == 0
    assert count_rows([plain, packed, table, unterminated, empty]) == 14
