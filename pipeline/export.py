"""``pipeline export``: the input rows with their answers joined back, one row per input row.

Results come back in completion order, and joining them to the wrong rows is the
most common bulk-labeling bug (USERS.md #1). Export re-reads the inputs, computes
each row's id exactly as the run did (same ``build_job``, same id column and
templates, taken from the run's manifest), and joins the newest outcome per id in
DuckDB, keeping input order. Rows never sent come out with ``status`` NULL.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import RunOptions
from pipeline.errors import UsageError
from pipeline.manifest import list_runs
from pipeline.report import open_views
from pipeline.request import IdClaims, RequestOptions, build_claimed_job
from pipeline.schema import carried_array
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
) -> int:
    """Write (row order, id, input columns) as one Parquet part per batch; returns rows.

    One part per batch lets each batch keep its own column types; DuckDB unifies them
    by name when it reads the folder back.
    """
    order = 0
    claims = IdClaims()  # a row repeating an id was recorded under its own place
    for number, rows in enumerate(read_rows(files, max_line_bytes=max_line_bytes)):
        names: dict[str, None] = {}
        for row in rows:
            for key in row.data or {}:
                if key != opts.id_column:
                    names.setdefault(key, None)
        columns = {
            f"input.{name}": carried_array([(r.data or {}).get(name) for r in rows])
            for name in names
        }
        table = pa.table(
            {
                "__order": pa.array(range(order, order + len(rows)), pa.int64()),
                "id": pa.array([build_claimed_job(r, opts, claims).id for r in rows], pa.string()),
                **columns,
            }
        )
        pq.write_table(table, folder / f"part-{number:06d}.parquet")
        order += len(rows)
    return order


def _output_name(column: str) -> str:
    name = column.removeprefix("input.")
    return f"input_{name}" if name in ANSWER_COLUMNS or name == "id" else name


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
            count = _stage_inputs(files, _request_options(options), staged, int(cap))
            if count == 0:
                raise UsageError("the inputs hold no rows")
            source = f"read_parquet('{_quote(staged)}/*.parquet', union_by_name = true)"
            names = [d[0] for d in con.execute(f"DESCRIBE SELECT * FROM {source}").fetchall()]
            input_columns = [
                f'i."{n}" AS "{_output_name(n)}"' for n in names if n.startswith("input.")
            ]
            answers = [f'l."{c}" AS "{c}"' for c in ANSWER_COLUMNS]
            query = f"""
                SELECT i.id AS id, {", ".join(input_columns + answers)}
                FROM {source} AS i
                LEFT JOIN latest AS l ON l.id = i.id
                ORDER BY i.__order
            """
            target.parent.mkdir(parents=True, exist_ok=True)
            con.execute(f"COPY ({query}) TO '{_quote(target)}' {FORMATS[fmt]}")
    finally:
        con.close()
    return count


def _quote(path: Path) -> str:
    return str(path).replace("'", "''")
