"""Rows held for a Parquet part are bounded in bytes, not only in number.

Until its part is written, every result of a journal segment is held in memory: with
20,000 rows to a part, long answers (a reasoning model's, 100-250 KB each) would hold
gigabytes. A part is written once its rows' journal lines pass ``part_bytes``.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

import pipeline.runner
import pipeline.sink
from pipeline.sink import ResultSink
from tests.conftest import prompts, read_results, run_with_sim, write_jsonl


def _row(i: int, text: str) -> dict[str, object]:
    return {"run_id": "r", "id": f"row-{i}", "status": "ok", "content": text}


def test_a_part_is_due_once_its_rows_pass_part_bytes(tmp_path: Path) -> None:
    sink = ResultSink(tmp_path / "out", "r", part_rows=1_000, part_bytes=4_000)
    try:
        for i in range(3):
            sink.write(_row(i, "x" * 1_000))
            assert not sink.part_due, f"due after {i + 1} rows of ~1 KB"
        sink.write(_row(3, "x" * 1_000))  # past 4,000 bytes of journal lines
        assert sink.part_due
        taken = sink.take_part()
        assert taken is not None and len(taken[0]) == 4
        sink.write(_row(4, "x" * 1_000))
        assert not sink.part_due, "the count starts again with the next part"
        for i in range(5, 50):  # small rows: neither bound is reached
            sink.write(_row(i, "y"))
        assert not sink.part_due
    finally:
        sink.close()


def test_the_row_bound_still_holds_for_short_rows(tmp_path: Path) -> None:
    sink = ResultSink(tmp_path / "out", "r", part_rows=5)
    try:
        for i in range(5):
            assert not sink.part_due
            sink.write(_row(i, "short"))
        assert sink.part_due
    finally:
        sink.close()


def test_a_run_cuts_parts_by_bytes_and_keeps_every_row_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pipeline.sink, "PART_BYTES", 3_000)  # a few answers a part
    src = write_jsonl(tmp_path / "rows.jsonl", prompts(40))  # type: ignore[arg-type]
    out = tmp_path / "out"
    first = run_with_sim([src], out)  # the writer drains all 40 answers at once
    assert first.result.exit_code == 0
    parts = sorted((out / "results").rglob("*.parquet"))
    assert len(parts) >= 5, f"{len(parts)} parts for 40 answers at 3,000 bytes a part"
    sizes = [pq.read_metadata(p).num_rows for p in parts]
    assert sum(sizes) == 40 and max(sizes) < 40
    rows = read_results(out)
    assert sorted(r["id"] for r in rows) == sorted(f"row-{i}" for i in range(40))
    assert not list((out / "journal").glob("*.jsonl")), "every segment compacted"
    again = run_with_sim([src], out)
    assert again.sim.stats["requests"] == 0, "a re-run sends nothing already answered"


def test_the_writer_waits_for_a_part_before_taking_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slow disk holds the writer back rather than letting parts (and their rows)
    queue up in memory: at most the part being written and the one just taken."""
    import time

    monkeypatch.setattr(pipeline.sink, "PART_BYTES", 3_000)
    real_write_part = pipeline.runner.write_part
    real_take_part = ResultSink.take_part
    counts = {"taken": 0, "written": 0, "most_waiting": 0}

    def slow_write_part(rows: list[dict[str, object]], path: Path) -> None:
        time.sleep(0.02)  # a slow disk, in the compaction thread
        real_write_part(rows, path)
        counts["written"] += 1

    def take_part(self: ResultSink) -> object:
        taken = real_take_part(self)
        if taken is not None:
            counts["taken"] += 1
            waiting = counts["taken"] - counts["written"]
            counts["most_waiting"] = max(counts["most_waiting"], waiting)
        return taken

    monkeypatch.setattr(pipeline.runner, "write_part", slow_write_part)
    monkeypatch.setattr(ResultSink, "take_part", take_part)
    src = write_jsonl(tmp_path / "rows.jsonl", prompts(40))  # type: ignore[arg-type]
    run = run_with_sim([src], tmp_path / "out")
    assert run.result.exit_code == 0
    assert counts["taken"] >= 5 and counts["written"] == counts["taken"]
    assert counts["most_waiting"] <= 2, f"{counts['most_waiting']} parts held at once"
    assert len(read_results(tmp_path / "out")) == 40


def test_the_simulator_pads_answers_for_memory_benchmarks(tmp_path: Path) -> None:
    """``answer_chars`` (``pipeline sim --set answer_chars=N``) makes every text answer
    N characters, its tokens counted from that text like any other answer's."""
    from pipeline.sim import SimConfig, Simulator
    from tests.conftest import FakeClock

    clock = FakeClock()
    sim = Simulator(SimConfig(answer_chars=5_000), clock=clock, sleep=clock.sleep)
    src = write_jsonl(tmp_path / "rows.jsonl", prompts(3))  # type: ignore[arg-type]
    run = run_with_sim([src], tmp_path / "out", sim=sim, clock=clock)
    rows = read_results(tmp_path / "out")
    assert run.result.exit_code == 0 and len(rows) == 3
    for row in rows:
        assert len(row["content"]) == 5_000 and row["content"].startswith("sim answer")
        assert row["completion_tokens"] >= 1_000
