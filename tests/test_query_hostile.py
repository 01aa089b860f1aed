"""Nothing from data or from a path becomes SQL: report, sql, export and the views.

Input column names, metadata keys and OUT / ``-o`` paths are all chosen by someone
else. Each test runs the simulator in process (as a user would, through the CLI),
then queries the results with names built to break out of a quoted identifier or a
string literal, and checks that nothing outside was read or written and that every
name comes back exactly as it went in.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pipeline.query import open_views
from pipeline.query.export import ANSWER_COLUMNS, export, output_names
from tests.conftest import invoke, write_jsonl

SECRET = "TOP-SECRET-8d1f"


def _read_export(target: Path, fmt: str) -> tuple[list[str], list[dict[str, Any]]]:
    """(column names in order, rows) of an export file."""
    if fmt == "parquet":
        table = pq.read_table(target)
        return table.column_names, table.to_pylist()
    if fmt == "csv":
        with open(target, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            rows = list(reader)
            return list(reader.fieldnames or []), rows
    lines = target.read_text(encoding="utf-8").split("\n")  # not splitlines: U+0085 is data
    rows = [json.loads(line) for line in lines if line]
    return list(rows[0]), rows


def _run(src: Path, out: Path) -> None:
    code, _, err = invoke("run", str(src), "--out", str(out), "--provider", "sim", "-q")
    assert code == 0, err


@pytest.fixture
def hostile(tmp_path: Path) -> dict[str, Any]:
    """A run whose input column names are SQL injections, and the files they aim at."""
    secret = tmp_path / "secret.txt"
    secret.write_text(SECRET)
    pwned = tmp_path / "pwned.csv"
    read_key = f'a" AS "b", (SELECT content FROM read_text(\'{secret}\')) AS "leak" --'
    write_key = f"x\") TO '{pwned}' (FORMAT csv); COPY (SELECT 1 AS \"y"
    keys = [
        "a",  # makes the read_key's `i."input.a"` bind: the file was read before the fix
        read_key,
        write_key,
        'he said "hi"',
        "it's",
        "nul\x00byte",
        "line\nbreak",
        "status",  # an answer column: comes out as input_status
        "Label",  # the same name as the answer column `label`, to DuckDB
    ]
    rows = [
        {"id": f"r{i}", "prompt": f"say {i}", **{k: f"{i}:{k}" for k in keys}} for i in range(4)
    ]
    src = write_jsonl(tmp_path / "rows.jsonl", rows)
    out = tmp_path / "out"
    _run(src, out)
    return {"out": out, "keys": keys, "pwned": pwned, "tmp": tmp_path}


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl"])
def test_export_keeps_hostile_column_names_as_data(hostile: dict[str, Any], fmt: str) -> None:
    out, keys = hostile["out"], hostile["keys"]
    target = hostile["tmp"] / f"export.{fmt}"
    code, stdout, err = invoke("export", str(out), "--format", fmt, "-o", str(target))
    assert code == 0, err
    assert "4 rows" in stdout
    names, rows = _read_export(target, fmt)
    assert names == ["id", *output_names(["prompt", *keys]), *ANSWER_COLUMNS]
    assert output_names(keys)[-2:] == ["input_status", "input_Label"]
    assert names[2:9] == keys[:7], "every other name comes back exactly"
    assert [r["id"] for r in rows] == ["r0", "r1", "r2", "r3"]
    for i, row in enumerate(rows):
        for key, name in zip(keys, output_names(keys), strict=True):
            assert row[name] == f"{i}:{key}"
        assert row["status"] == "ok"
    assert SECRET not in target.read_text(encoding="utf-8", errors="replace")
    assert "leak" not in names
    assert not hostile["pwned"].exists()


def test_sql_and_views_carry_hostile_names(hostile: dict[str, Any]) -> None:
    out, keys = hostile["out"], hostile["keys"]
    code, stdout, err = invoke(
        "sql", str(out), "SELECT * FROM latest ORDER BY id", "--format", "json"
    )
    assert code == 0, err
    rows = json.loads(stdout)
    assert len(rows) == 4
    assert rows[0][keys[0]] == f"0:{keys[0]}"  # carried under its own name
    assert SECRET not in stdout and not hostile["pwned"].exists()
    code, stdout, err = invoke("report", str(out), "--format", "json")
    assert code == 0, err
    assert json.loads(stdout)[0]["requests"] == 4


# OUT name -> a decoy OUT next to it that the name, read as a glob, would match
AWKWARD = {
    "it's": [],
    "sp ace": [],
    "a[x]": ["ax"],
    "st*r": ["stXr"],
    "q?": ["qQ"],
    "[!a]": ["b"],
    "w[*]**": ["w*"],
}


@pytest.mark.parametrize("name", list(AWKWARD))
def test_awkward_out_paths_work_everywhere(tmp_path: Path, name: str) -> None:
    """OUT names with quotes, spaces and glob characters; a decoy OUT that the name
    would match as a glob holds other results, which must never be read."""
    src = write_jsonl(tmp_path / "rows.jsonl", [{"id": f"r{i}", "prompt": "hi"} for i in range(3)])
    decoy_src = write_jsonl(
        tmp_path / "decoy.jsonl", [{"id": f"d{i}", "prompt": "yo"} for i in range(7)]
    )
    base = tmp_path / "outs"
    base.mkdir()
    for decoy in AWKWARD[name]:
        _run(decoy_src, base / decoy)
    out = base / name
    _run(src, out)

    code, stdout, err = invoke("report", str(out), "--format", "json")
    assert code == 0, err
    assert sum(g["requests"] for g in json.loads(stdout)) == 3

    html = out / "report [1]*.html"
    code, stdout, err = invoke("report", str(out), "--html", str(html))
    assert code == 0, err
    assert html.exists()

    code, stdout, err = invoke(
        "sql", str(out), "SELECT count(*) AS n, min(id) AS first FROM results", "--format", "json"
    )
    assert code == 0, err
    assert json.loads(stdout) == [{"n": 3, "first": "r0"}]

    con = open_views(out)
    try:
        assert con.sql("SELECT count(*) FROM latest").fetchall() == [(3,)]
        assert con.sql("SELECT count(*) FROM costs").fetchall() == [(3,)]
    finally:
        con.close()

    for fmt in ("parquet", "csv", "jsonl"):
        target = out / f"x'[{fmt}]* y.{fmt}"
        code, stdout, err = invoke("export", str(out), "--format", fmt, "-o", str(target))
        assert code == 0, err
        _, rows = _read_export(target, fmt)
        assert [r["id"] for r in rows] == ["r0", "r1", "r2"]
    code, stdout, err = invoke("export", str(out), "--format", "csv")  # default target
    assert code == 0, err
    assert (out / "export.csv").exists()


def test_backslash_and_glob_in_out_is_refused_not_misread(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "rows.jsonl", [{"id": "r0", "prompt": "hi"}])
    out = tmp_path / "a\\[b"
    _run(src, out)
    code, stdout, err = invoke("report", str(out))
    assert code == 2
    assert "backslash" in err and stdout == ""


@pytest.fixture(scope="module")
def one_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("roundtrip")
    src = write_jsonl(tmp / "rows.jsonl", [{"id": "r1", "prompt": "hi"}])
    out = tmp / "out"
    _run(src, out)
    return out


# Any text, and text around what quoting, comments and globbing care about.
NAMES = st.text(min_size=1, max_size=24) | st.builds(
    lambda before, special, after: before + special + after,
    st.text(max_size=8),
    st.sampled_from(['"', '""', '" AS "x', "'", "\x00", "\n", "--", ";", "[", "*", "?", "\\", "."]),
    st.text(max_size=8),
)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    name=NAMES,
    value=st.text(max_size=8) | st.integers(min_value=-(2**63), max_value=2**63 - 1),
)
def test_any_column_name_round_trips_through_export(one_run: Path, name: str, value: Any) -> None:
    """Export given a fresh input file: the rows join to the run's answer by id."""
    assume(name.lower() not in {"id", "prompt", *ANSWER_COLUMNS})
    folder = one_run.parent / "examples"
    folder.mkdir(exist_ok=True)
    src = write_jsonl(folder / "in.jsonl", [{"id": "r1", "prompt": "hi", name: value}])
    for fmt in ("parquet", "jsonl"):
        target = folder / f"export.{fmt}"
        assert export(one_run, target, fmt, [str(src)]) == 1
        names, rows = _read_export(target, fmt)
        assert names[:3] == ["id", "prompt", name]
        assert rows[0][name] == value and rows[0]["status"] == "ok"


def test_runs_lists_around_manifests_that_are_not_ours(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "rows.jsonl", [{"id": "r0", "prompt": "hi"}])
    out = tmp_path / "out"
    _run(src, out)
    (out / "runs" / "0-array.json").write_text("[1, 2]")
    (out / "runs" / "1-odd.json").write_text(
        json.dumps({"run_id": 7, "counts": {"ok": "many", "error": None}, "wall_seconds": [1]})
    )
    code, stdout, err = invoke("runs", str(out))
    assert code == 0, err
    lines = stdout.splitlines()
    assert len(lines) == 3  # header, the odd manifest, the real run
    assert lines[1].startswith("7 ") and "?" in lines[1]
    code, stdout, _ = invoke("runs", str(out), "--format", "json")
    assert code == 0 and len(json.loads(stdout)) == 2
