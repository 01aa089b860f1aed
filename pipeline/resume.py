"""What earlier runs already finished, read back from the results themselves.

Resume needs no cache and no state file: a row whose id has an ``ok`` result is
done and never sent again; one whose results are all errors is re-sent only with
``--retry-failed``. Reading only the ``id`` and ``status`` columns keeps start-up
fast on millions of results.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq


@dataclass
class Outcomes:
    ok: set[str] = field(default_factory=set)
    failed: set[str] = field(default_factory=set)  # has errors and no ok result

    def done(self, row_id: str, retry_failed: bool) -> bool:
        """True when this id must not be sent again."""
        return row_id in self.ok or (not retry_failed and row_id in self.failed)


def result_parts(out: Path) -> list[Path]:
    results = out / "results"
    if not results.is_dir():
        return []
    return sorted(p for p in results.rglob("*.parquet") if not p.name.startswith("."))


def load_outcomes(out: Path) -> Outcomes:
    outcomes = Outcomes()
    for part in result_parts(out):
        table = pq.read_table(part, columns=["id", "status"])
        ids = table.column("id").to_pylist()
        statuses = table.column("status").to_pylist()
        for row_id, status in zip(ids, statuses, strict=True):
            if status == "ok":
                outcomes.ok.add(row_id)
            else:
                outcomes.failed.add(row_id)
    outcomes.failed -= outcomes.ok
    return outcomes
