"""The read side of pipeline: everything that turns a results folder (OUT) into answers.

A run writes Parquet part files under ``OUT/results``; this subpackage only ever reads
them, through DuckDB, and never writes a result. What it answers:

- ``views``: an in-memory DuckDB connection with the ``results``, ``latest``,
  ``pricing`` and ``costs`` views over OUT, the SQL that prices every row, and the
  helpers that keep paths and names from outside out of SQL text
  (``duckdb_file_list``, ``sql_ident``);
- ``report``: ``pipeline report``: groups (``--by``), time filters, totals, and the
  notes on what has no known cost (UNPRICED, NO USAGE);
- ``formats``: rows as a table, csv, json or markdown;
- ``adhoc``: ``pipeline sql``, a query of the user's own over the views;
- ``html`` and ``charts``: ``pipeline report --html``, one self-contained page;
- ``export``: ``pipeline export``, the input rows with their answers joined back.

The names below are what the CLI calls. ``export`` (the function) stays in
``pipeline.query.export`` and ``report`` in ``pipeline.query.report``: a package
attribute never hides a submodule of the same name.

The run path (``pipeline run``) never imports this package, so DuckDB is loaded only
by the commands that read results.
"""

from __future__ import annotations

from pipeline.errors import ReportError
from pipeline.query.adhoc import sql
from pipeline.query.formats import FORMATS
from pipeline.query.html import write_html_report
from pipeline.query.report import report_and_notes
from pipeline.query.views import duckdb_file_list, open_views, sql_ident

__all__ = [
    "FORMATS",
    "ReportError",
    "duckdb_file_list",
    "open_views",
    "report_and_notes",
    "sql",
    "sql_ident",
    "write_html_report",
]
