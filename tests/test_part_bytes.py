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


def test_parts_waiting_for_a_slow_disk_do_not_hold_their_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Parts are written one at a time. A part taken while another is being written
    lets go of its rows and is read back from its closed journal segment: a slow disk
    (or long answers) made every waiting part hold its rows in memory. The writer
    never waits on Parquet, and every row still lands in a part once."""
    import time

    from pipeline.runner import Runner

    monkeypatch.setattr(pipeline.sink, "PART_BYTES", 3_000)
    real_write_part = pipeline.runner.write_part
    real_read_segment = pipeline.runner.read_segment
    real_compact = Runner._compact
    seen = {"in_memory": 0, "most_in_memory": 0, "read_back": 0}

    def slow_write_part(rows: list[dict[str, object]], path: Path) -> None:
        time.sleep(0.02)  # a slow disk, in the compaction thread
        real_write_part(rows, path)

    def read_segment(path: Path) -> list[dict[str, object]]:
        seen["read_back"] += 1
        return real_read_segment(path)

    async def compact(self: Runner, rows: object, part: Path, segment: Path) -> None:
        held = rows is not None
        seen["in_memory"] += held
        seen["most_in_memory"] = max(seen["most_in_memory"], seen["in_memory"])
        try:
            await real_compact(self, rows, part, segment)  # type: ignore[arg-type]
        finally:
            seen["in_memory"] -= held

    monkeypatch.setattr(pipeline.runner, "write_part", slow_write_part)
    monkeypatch.setattr(pipeline.runner, "read_segment", read_segment)
    monkeypatch.setattr(Runner, "_compact", compact)
    src = write_jsonl(tmp_path / "rows.jsonl", prompts(41))  # type: ignore[arg-type]
    run = run_with_sim([src], tmp_path / "out")
    assert run.result.exit_code == 0
    assert seen["read_back"] >= 3, "parts queued behind a slow write are read back"
    assert seen["most_in_memory"] == 1, f"{seen['most_in_memory']} parts held their rows"
    rows = read_results(tmp_path / "out")
    assert sorted(r["id"] for r in rows) == sorted(f"row-{i}" for i in range(41))
    assert [r["content"] for r in rows if r["id"] == "row-7"][0].startswith("sim answer")


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


def test_typed_input_columns_keep_their_types_when_parts_queue(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A part read back from its journal would turn a Parquet input's timestamps and
    bytes into text: such parts keep their rows in memory, and every part has the
    input's types whatever the disk's speed."""
    import datetime as dt
    import time

    import pyarrow as pa

    monkeypatch.setattr(pipeline.sink, "PART_BYTES", 3_000)
    real_write_part = pipeline.runner.write_part

    def slow_write_part(rows: list[dict[str, object]], path: Path) -> None:
        time.sleep(0.02)
        real_write_part(rows, path)

    monkeypatch.setattr(pipeline.runner, "write_part", slow_write_part)
    when = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    table = pa.table(
        {
            "id": [f"row-{i}" for i in range(30)],
            "prompt": [f"Say something about row {i}" for i in range(30)],
            "seen_at": pa.array([when] * 30, pa.timestamp("us", tz="UTC")),
            "blob": pa.array([b"\x00\x01"] * 30, pa.binary()),
        }
    )
    src = tmp_path / "rows.parquet"
    pq.write_table(table, src)
    run = run_with_sim([src], tmp_path / "out")
    assert run.result.exit_code == 0
    parts = sorted((tmp_path / "out" / "results").rglob("*.parquet"))
    assert len(parts) >= 5
    for part in parts:
        schema = pq.read_schema(part)
        assert schema.field("seen_at").type == pa.timestamp("us", tz="UTC"), part.name
        assert schema.field("blob").type == pa.binary(), part.name
    rows = read_results(tmp_path / "out")
    assert len(rows) == 30 and {r["blob"] for r in rows} == {b"\x00\x01"}
    assert {r["seen_at"] for r in rows} == {when}


def test_results_held_after_a_failed_part_get_a_part_name_of_their_own(tmp_path: Path) -> None:
    """OUT broke while a part was being written, after its segment was taken: the
    answers received since then are written at close under a new number, not over
    the name the next run's recovery gives that segment's part."""
    from pipeline.sink import recover_journals

    out = tmp_path / "out"
    sink = ResultSink(out, "r", part_rows=1)
    sink.write(_row(1, "first"))
    taken = sink.take_part()
    assert taken is not None
    sink.fail(OSError(28, "No space left on device"))  # writing part 1 failed
    sink.write(_row(2, "after the break"))  # held in memory only
    sink.close()
    names = sorted(p.name for p in (out / "results").rglob("*.parquet"))
    assert names == ["part-00002.parquet"], names
    sink._live.close()
    assert recover_journals(out) == 1  # segment 1, left by the failed part
    rows = read_results(out)
    assert sorted(r["id"] for r in rows) == ["row-1", "row-2"]


def test_a_failed_fsync_of_a_taken_segment_stops_the_run_and_loses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk refuses the fsync of a segment just taken (it is now synced as soon as
    it is taken, outside the compaction queue): OUT has failed, the run stops with
    exit 3, and a re-run on a healthy disk keeps every billed answer once."""
    import errno

    from pipeline.sim import SimConfig, Simulator
    from tests.conftest import FakeClock

    monkeypatch.setattr(pipeline.sink, "PART_BYTES", 3_000)
    real_sync = ResultSink.sync_segment
    broken = [True]

    def sync_segment(segment: Path) -> None:
        if broken[0]:
            raise OSError(errno.EIO, "Input/output error", str(segment))
        real_sync(segment)

    monkeypatch.setattr(ResultSink, "sync_segment", staticmethod(sync_segment))
    src = write_jsonl(tmp_path / "rows.jsonl", prompts(60))  # type: ignore[arg-type]
    out = tmp_path / "out"
    clock = FakeClock()
    sim = Simulator(SimConfig(latency_ms=20), clock=clock, sleep=clock.sleep)
    first = run_with_sim([src], out, sim=sim, clock=clock, concurrency=4)
    assert first.result.exit_code == 3, first.result.fatal
    assert "Input/output error" in (first.result.fatal or "")

    broken[0] = False
    again = run_with_sim([src], out, sim=sim, clock=clock, concurrency=4)
    assert again.result.exit_code == 0, again.result.fatal
    ok = [r for r in read_results(out) if r["status"] == "ok"]
    assert sorted(r["id"] for r in ok) == sorted(f"row-{i}" for i in range(60))
    assert len(sim.ledger) == 60, "a row was billed twice"
