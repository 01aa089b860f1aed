"""The Ray driver's own bookkeeping, without a Ray cluster: what it counts when a
worker died before reporting, and how it treats a --ray-address nobody answers."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from pipeline.errors import UsageError
from pipeline.progress import COUNTS, Tally
from pipeline.sink import ResultSink


def _row(row_id: str, status: str, second: int, **extra: object) -> dict[str, object]:
    when = datetime(2026, 11, 23, tzinfo=UTC) + timedelta(seconds=second)
    row: dict[str, object] = {
        "run_id": "job",
        "id": row_id,
        "status": status,
        "finished_at": when,
        "prompt_tokens": 10,
        "completion_tokens": 5,
    }
    row.update(extra)
    return row


def test_a_dead_writers_rows_count_once_per_id_and_leave_skipped(tmp_path: Path) -> None:
    from pipeline.cluster.engine import _final_counts

    dead = ResultSink(tmp_path, "job-wdead")
    dead.write(_row("x", "error", 1, error_type="invalid_json"))  # billed, asked again
    dead.write(_row("x", "ok", 2))
    dead.write(_row("y", "ok", 3))
    dead.close()  # compacted as the next worker would find it, recovered
    finished = {
        "counts": {**dict.fromkeys(COUNTS, 0), "ok": 5, "skipped": 2},  # the retry skipped x, y
        "writers": ["job-wlive"],
        "spent_usd": 0.0,
    }
    tally = Tally()
    _final_counts(tmp_path, "job", tally, finished)
    assert tally.status["ok"] == 7 and tally.status["error"] == 0
    assert tally.skipped == 0
    assert tally.prompt_tokens == 30, "every billed row's tokens count, the re-asked one too"


def test_a_port_nobody_answers_is_a_usage_error_at_once() -> None:
    import socket

    from pipeline.cluster.engine import _probe

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(UsageError, match="cannot connect"):
        _probe(f"127.0.0.1:{port}")
    _probe("auto")  # left to Ray: it knows where its own cluster is
    _probe(None)
