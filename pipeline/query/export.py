"""``pipeline export``: the input rows with their answers joined back, one row per input row.

Results come back in completion order, not input order, and joining them back to the
wrong rows is the easiest way to ruin a bulk-labeling job without noticing: every label
looks plausible, it just belongs to another row. Export re-reads the inputs, computes
each row's id exactly as the run did (same ``selection.name_row``, same id column and
templates, taken from the run's manifest), and joins the newest outcome per id in
DuckDB, keeping input order. Rows never sent come out with ``status`` NULL.

Input column names are data, so they never become SQL text: the staged Parquet names
each input column by its position (``c0``, ``c1``, ...), the join selects those, and
the output columns get the input's own names through DuckDB's expression API (an
alias set from Python, not parsed). The staged files and the target file are bound
as parameters, so any OUT or ``-o`` path works as given.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import RunOptions
from pipeline.errors import UsageError
from pipeline.manifest import list_runs
from pipeline.query.views import duckdb_file_list, open_views
from pipeline.request import RequestOptions
from pipeline.schema import carried_array
from pipeline.selection import IdClaims, name_row
from pipeline.source import DEFAULT_MAX_LINE_BYTES, expand_sources, read_rows

ANSWER_COLUMNS = (
    "status",
    "label",
    "content",
    "parsed",
    "reasoning_content",
    "tool_calls",
    "finish_reason",
    "error_type",
    "error_message",
    "model",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "reasoning_tokens",
    "run_id",
    "finished_at",
)
FORMATS = {"parquet": "(FORMAT parquet)", "csv": "(FORMAT csv, HEADER)", "jsonl": "(FORMAT json)"}
STAGED_PARTS_VARIABLE = "pipeline_export_parts"


def _last_run_options(out: Path) -> tuple[list[str], dict[str, Any]]:
    runs = [r for r in list_runs(out) if r.get("inputs")]
    if not runs:
        raise UsageError(f"{out}: no run recorded; give the input files to export")
    last = runs[-1]
    return list(last["inputs"]), dict(last.get("options") or {})


def _request_options(options: dict[str, Any]) -> RequestOptions:
    """The run's own request rule, rebuilt from its manifest: rows without an id are
    named by their request's hash, so every field that shapes the request matters."""
    known = {f.name for f in dataclasses.fields(RunOptions)}
    values = {k: v for k, v in options.items() if k in known}
    if values.get("image_root"):
        values["image_root"] = Path(values["image_root"])
    values.pop("out", None)
    return RunOptions(**values).request_options(values.get("model") or "export")


def _stage_inputs(
    files: list[Path], opts: RequestOptions, folder: Path, max_line_bytes: int
) -> tuple[int, list[str]]:
    """Write (row order, id, input columns) as one Parquet part per batch.

    Returns the row count and the input column names in first-seen order; column
    ``c{i}`` of the parts holds the i-th name. One part per batch lets each batch keep
    its own column types; DuckDB unifies them by name when it reads the folder back.
    """
    order = 0
    positions: dict[str, int] = {}
    claims = IdClaims()  # a row repeating an id was recorded under its own place
    for number, rows in enumerate(read_rows(files, max_line_bytes=max_line_bytes)):
        names: dict[str, None] = {}
        for row in rows:
            for key in row.data or {}:
                if key != opts.id_column:
                    names.setdefault(key, None)
        columns = {}
        for name in names:
            position = positions.setdefault(name, len(positions))
            columns[f"c{position}"] = carried_array([(r.data or {}).get(name) for r in rows])
        table = pa.table(
            {
                "__order": pa.array(range(order, order + len(rows)), pa.int64()),
                "id": pa.array([name_row(r, opts, claims).id for r in rows], pa.string()),
                **columns,
            }
        )
        pq.write_table(table, folder / f"part-{number:06d}.parquet")
        order += len(rows)
    return order, list(positions)


def output_names(names: Iterable[str]) -> list[str]:
    """The export's name for each input column: its own, unless that is taken.

    Taken means the name of an answer column or ``id``, or one already given, compared
    without case as DuckDB compares names; then ``input_`` goes in front until it is
    free (``status`` -> ``input_status``; a second ``Status`` -> ``input_input_Status``).
    """
    taken = {"id", *ANSWER_COLUMNS}
    out = []
    for name in names:
        given = name
        while given.lower() in taken:
            given = f"input_{given}"
        taken.add(given.lower())
        out.append(given)
    return out


def export(
    out: Path,
    target: Path,
    fmt: str = "parquet",
    sources: list[str] | None = None,
) -> int:
    """Write the joined export to ``target``; returns the number of rows written."""
    if fmt not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}")
    inputs, options = _last_run_options(out)
    files = expand_sources(list(sources or inputs), out=out)
    con = open_views(out)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            staged = Path(tmp)
            cap = options.get("max_line_bytes") or DEFAULT_MAX_LINE_BYTES  # as the run read
            count, names = _stage_inputs(files, _request_options(options), staged, int(cap))
            if count == 0:
                raise UsageError("the inputs hold no rows")
            parts = duckdb_file_list(sorted(staged.glob("*.parquet")))
            con.execute(f"SET VARIABLE {STAGED_PARTS_VARIABLE} = ?", [parts])
            # Only names this module made up reach the SQL text.
            staged_columns = "".join(f", i.c{k}" for k in range(len(names)))
            answers = ", ".join(f"l.{c} AS a_{c}" for c in ANSWER_COLUMNS)
            joined = con.sql(
                f"""
                SELECT i.id{staged_columns}, {answers}
                FROM read_parquet(getvariable('{STAGED_PARTS_VARIABLE}'),
                                  union_by_name = true) AS i
                LEFT JOIN latest AS l ON l.id = i.id
                ORDER BY i.__order
                """
            )
            columns = [
                duckdb.ColumnExpression("id"),
                *(
                    duckdb.ColumnExpression(f"c{k}").alias(name)
                    for k, name in enumerate(output_names(names))
                ),
                *(duckdb.ColumnExpression(f"a_{c}").alias(c) for c in ANSWER_COLUMNS),
            ]
            joined.select(*columns).create_view("export_rows")
            target.parent.mkdir(parents=True, exist_ok=True)
            con.execute(f"COPY export_rows TO ? {FORMATS[fmt]}", [str(target.absolute())])
    finally:
        con.close()
    return count
