"""Issue 13: OUT that fails (disk full, I/O errors), runs that crash, runs that would
overlap, and what a power cut may take.

- Disk full on OUT is a clean stop (exit 3): what was journaled stays, a re-run
  completes and bills nothing twice; in process (a journal whose writes fail after N
  rows) and in a real process (RLIMIT_FSIZE, so writes past a size fail with EFBIG).
- An unexpected error outside a row is exit 5, never 1: the manifest says
  ``failed`` with the error, the results so far are kept.
- No manifest stays ``running`` once its process is gone.
- Runs that could send the same rows never run together on one OUT (exit 4); shards
  of one split do. Lock files are never followed through a symlink.
- The journal, parts and manifests are fsynced (group commit for the journal).
"""

from __future__ import annotations

import contextlib
import errno
import gc
import json
import os
import resource
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest

import pipeline.sink as sink_module
from pipeline.errors import Exit, LockedError, UsageError
from pipeline.lock import OutLock
from pipeline.manifest import run_alive, write_manifest
from pipeline.progress import Progress
from pipeline.sim import SimConfig, Simulator
from pipeline.sink import ResultSink, write_part
from tests.conftest import FakeClock, invoke, prompts, read_results, run_with_sim, write_jsonl
from tests.realproc import (
    Processes,
    Server,
    assert_every_id_ok_once,
    finish,
    manifest_of,
    start_server,
    write_rows,
)

# --- disk full / I/O errors on OUT -------------------------------------------------


class _FullDisk:
    """A journal file whose writes fail with ENOSPC once ``room`` lines were written."""

    def __init__(self, inner: IO[str], room: list[int]) -> None:
        self._inner = inner
        self._room = room

    def write(self, text: str) -> int:
        if self._room[0] <= 0:
            raise OSError(errno.ENOSPC, "No space left on device", "journal")
        self._room[0] -= 1
        return self._inner.write(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


@pytest.fixture
def disk_fills_after(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Journal lines that still fit; the test sets room[0]."""
    room = [10**9]
    original = ResultSink._open_segment

    def open_segment(self: ResultSink) -> IO[str]:
        self._journal = _FullDisk(original(self), room)  # type: ignore[assignment]
        return self._journal  # type: ignore[return-value]

    monkeypatch.setattr(ResultSink, "_open_segment", open_segment)
    yield room


def _manifests(out: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]


def test_disk_full_while_journaling_stops_cleanly_and_a_rerun_bills_nothing_twice(
    tmp_path: Path, disk_fills_after: list[int]
) -> None:
    n = 600
    src = write_jsonl(tmp_path / "rows.jsonl", prompts(n))  # type: ignore[arg-type]
    out = tmp_path / "out"
    clock = FakeClock()
    sim = Simulator(SimConfig(latency_ms=20), clock=clock, sleep=clock.sleep)
    disk_fills_after[0] = 150
    first = run_with_sim([src], out, sim=sim, clock=clock, concurrency=16)

    assert first.result.exit_code == 3, first.result.fatal
    assert (first.result.fatal or "").startswith("disk full on OUT")
    assert "No space left on device" in (first.result.fatal or "")
    kept = read_results(out)
    # Dispatch stopped: only answers already received or in flight came after the 150.
    assert 150 <= len(kept) < n - 100
    assert len(kept) == len(sim.ledger), "every answer the server billed was kept"
    (manifest,) = _manifests(out)
    assert manifest["status"] == "stopped" and manifest["exit_code"] == 3
    assert "disk full" in manifest["fatal"]

    disk_fills_after[0] = 10**9  # room again
    again = run_with_sim([src], out, sim=sim, clock=clock, concurrency=16)
    assert again.result.exit_code == 0, again.result.fatal
    ok = [r for r in read_results(out) if r["status"] == "ok"]
    assert sorted(r["id"] for r in ok) == sorted(f"row-{i}" for i in range(n))
    assert len(sim.ledger) == n, "a row was billed twice"


def test_when_parquet_fails_too_the_journal_is_left_whole_for_the_next_run(
    tmp_path: Path, disk_fills_after: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    n = 400
    src = write_jsonl(tmp_path / "rows.jsonl", prompts(n))  # type: ignore[arg-type]
    out = tmp_path / "out"
    clock = FakeClock()
    sim = Simulator(SimConfig(latency_ms=20), clock=clock, sleep=clock.sleep)
    disk_fills_after[0] = 100

    def no_room(rows: list[dict[str, Any]], path: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(sink_module, "write_part", no_room)
    first = run_with_sim([src], out, sim=sim, clock=clock, concurrency=8)
    assert first.result.exit_code == 3
    assert read_results(out) == []
    segments = list((out / "journal").glob("*.jsonl"))
    assert len(segments) == 1
    lines = segments[0].read_text().splitlines()
    # What reached the disk before it filled is whole; the rest is counted as unsaved
    # (at most: a buffered write may have reached the journal before the error).
    assert 0 < len(lines) <= 100 and all(json.loads(line)["status"] == "ok" for line in lines)
    billed_first = len(sim.ledger)
    assert len(lines) + first.result.unsaved >= billed_first

    monkeypatch.setattr(sink_module, "write_part", write_part)
    disk_fills_after[0] = 10**9
    again = run_with_sim([src], out, sim=sim, clock=clock, concurrency=8)
    assert again.result.exit_code == 0
    ok = [r for r in read_results(out) if r["status"] == "ok"]
    assert sorted(r["id"] for r in ok) == sorted(f"row-{i}" for i in range(n))
    # Only the answers that reached no disk were sent (and billed) again.
    assert len(sim.ledger) == n + billed_first - len(lines)


def _limit_file_size(limit: int) -> None:
    """preexec_fn: writes past ``limit`` bytes fail with EFBIG instead of killing us."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def _run_cmd(src: Path, out: Path, server: Server, *extra: str) -> list[str]:
    cmd = [sys.executable, "-m", "pipeline", "run", str(src), "--base-url", server.url]
    return [*cmd, "--model", "gpt-5.5", "--out", str(out), "--quiet", *extra]


def test_file_too_large_on_out_in_a_real_process_is_exit_3_and_resumable(
    tmp_path: Path, procs: Processes
) -> None:
    n = 2000
    src = write_rows(tmp_path / "rows.jsonl", n, "f")
    out = tmp_path / "out"
    server = start_server(procs, "--latency-ms", "10")
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    proc = subprocess.Popen(
        _run_cmd(src, out, server, "--concurrency", "16"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=Path(__file__).resolve().parent.parent,
        preexec_fn=lambda: _limit_file_size(256 * 1024),
    )
    try:
        _, err_bytes = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = err_bytes.decode(errors="replace")
    assert proc.returncode == 3, err
    assert "disk full on OUT" in err and "Traceback" not in err
    manifest = manifest_of(out, proc.pid)
    assert manifest["status"] == "stopped" and manifest["exit_code"] == 3
    billed_first = server.settled_billed()
    assert 0 < billed_first < n

    code, err = finish(procs.start(_run_cmd(src, out, server)))
    assert code == 0, err
    rows = assert_every_id_ok_once(out, n, "f")
    kept_first = sum(1 for r in rows if r["run_id"] == manifest["run_id"])
    assert billed_first - kept_first <= manifest["counts"]["unsaved"]
    # The re-run sent exactly the rows whose answers the first run could not keep.
    assert server.settled_billed() == n + billed_first - kept_first


# --- an unexpected error outside a row: exit 5 ---------------------------------------


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_an_internal_error_in_the_writer_is_exit_5_with_a_failed_manifest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    n = 500
    src = write_jsonl(tmp_path / "rows.jsonl", prompts(n))  # type: ignore[arg-type]
    out = tmp_path / "out"
    original = Progress.tick

    def tick(self: Progress) -> None:
        # Once some rows are written, whatever the writer's grouping (it drains all
        # answers that are ready at once, so a count of ticks varies with the load).
        if 40 <= self.tally.finished < n:
            raise RuntimeError("boom in the writer")
        original(self)

    monkeypatch.setattr(Progress, "tick", tick)
    clock = FakeClock()
    sim = Simulator(SimConfig(latency_ms=20), clock=clock, sleep=clock.sleep)
    first = run_with_sim([src], out, sim=sim, clock=clock, concurrency=8)

    assert first.result.exit_code == Exit.INTERNAL
    assert first.result.internal == "RuntimeError: boom in the writer"
    (manifest,) = _manifests(out)
    assert manifest["status"] == "failed" and manifest["exit_code"] == 5
    assert manifest["error"] == "RuntimeError: boom in the writer"
    assert "Traceback" in manifest["traceback"]
    kept = read_results(out)
    assert kept and len(kept) == first.result.tally.finished, "journaled rows were lost"
    assert not list((out / "journal").glob("*.jsonl"))

    gc.collect()  # streams of tasks cancelled before they started warn here, not later
    monkeypatch.setattr(Progress, "tick", original)
    again = run_with_sim([src], out, sim=sim, clock=clock, concurrency=8)
    assert again.result.exit_code == 0
    assert len(sim.ledger) <= n + 8, "the re-run sent rows the crashed run had kept"
    assert {r["id"] for r in read_results(out) if r["status"] == "ok"} == {
        f"row-{i}" for i in range(n)
    }


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_the_cli_reports_an_internal_error_as_exit_5_not_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = write_jsonl(tmp_path / "rows.jsonl", prompts(50))  # type: ignore[arg-type]

    async def broken_counter(self: object) -> None:
        raise ValueError("counter broke")

    monkeypatch.setattr("pipeline.runner.Runner._count_total", broken_counter)
    code, _, err = invoke("run", str(src), "--out", str(tmp_path / "out"), "--quiet")
    assert code == 5, err
    assert "internal error" in err and "ValueError: counter broke" in err
    assert "Traceback" not in err
    gc.collect()  # streams of tasks cancelled before they started warn here, not later


def test_ctrl_c_reaching_execute_is_130_and_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Ctrl-C before the run's own signal handling is in place (or one that gets
    past it) is exit 130 with a final manifest, not a traceback and exit 1."""
    src = write_jsonl(tmp_path / "rows.jsonl", prompts(20))  # type: ignore[arg-type]

    def interrupted(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("pipeline.local.anyio.run", interrupted)
    run = run_with_sim([src], tmp_path / "out")
    assert run.result.exit_code == 130
    (manifest,) = _manifests(tmp_path / "out")
    assert manifest["status"] == "stopped" and manifest["exit_code"] == 130
    assert not list((tmp_path / "out" / "journal").glob("*.lock")), "journal lock left held"


# --- no manifest stays "running" -----------------------------------------------------


def test_a_dead_runs_manifest_is_marked_killed_and_a_live_one_is_left_alone(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    src = write_jsonl(tmp_path / "rows.jsonl", prompts(5))  # type: ignore[arg-type]
    write_manifest(out, "20260101T000000Z-dead00", {"run_id": "x", "status": "running"})
    with contextlib.ExitStack() as alive:
        alive.enter_context(run_alive(out, "20260101T000000Z-live00"))
        write_manifest(out, "20260101T000000Z-live00", {"run_id": "y", "status": "running"})
        run = run_with_sim([src], out)
        assert run.result.exit_code == 0
        states = {m["run_id"]: m for m in _manifests(out)}
        assert states["x"]["status"] == "killed"
        assert run.result.run_id in states["x"]["error"]
        assert states["y"]["status"] == "running", "a live run was marked dead"
        assert states[run.result.run_id]["status"] == "finished"
        code, table, _ = invoke("runs", str(out))
        assert code == 0 and "killed" in table and "finished" in table


# --- who may share an OUT ----------------------------------------------------------


def _lock(out: Path, shard: tuple[int, int] | None) -> OutLock:
    lock = OutLock(out, shard)
    lock.acquire("r")
    return lock


@pytest.mark.parametrize(
    ("first", "second", "together"),
    [
        (None, None, False),
        (None, (0, 2), False),
        ((0, 2), None, False),
        ((0, 2), (1, 2), True),
        ((0, 2), (0, 2), False),
        ((0, 2), (0, 3), False),
        ((1, 3), (0, 2), False),
    ],
)
def test_runs_that_could_send_the_same_rows_exclude_each_other(
    tmp_path: Path,
    first: tuple[int, int] | None,
    second: tuple[int, int] | None,
    together: bool,
) -> None:
    held = _lock(tmp_path, first)
    try:
        if together:
            _lock(tmp_path, second).release()
        else:
            with pytest.raises(LockedError, match="in use|already running"):
                _lock(tmp_path, second)
    finally:
        held.release()
    _lock(tmp_path, second).release()  # free again once the first is gone


def test_a_symlink_planted_at_a_lock_path_is_not_followed(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (out / ".lock").symlink_to(victim)
    src = write_jsonl(tmp_path / "rows.jsonl", prompts(3))  # type: ignore[arg-type]
    code, _, err = invoke("run", str(src), "--out", str(out), "--quiet")
    assert code == 2, err
    assert "symbolic link" in err
    assert victim.read_text() == "precious\n"
    (out / ".lock").unlink()
    (out / ".lock-of-3").symlink_to(victim)  # a lock file of another split, too
    with pytest.raises(UsageError, match="symbolic link"):
        _lock(out, (0, 2))
    assert victim.read_text() == "precious\n"


@pytest.mark.parametrize(
    ("a", "b"), [([], ["--shard", "0/2"]), (["--shard", "0/2"], ["--shard", "1/3"])]
)
def test_overlapping_runs_started_together_bill_each_row_once(
    tmp_path: Path, procs: Processes, a: list[str], b: list[str]
) -> None:
    n = 400
    src = write_rows(tmp_path / "rows.jsonl", n, "o")
    out = tmp_path / "out"
    server = start_server(procs, "--latency-ms", "50")
    runs = [procs.start(_run_cmd(src, out, server, "--concurrency", "16", *x)) for x in (a, b)]
    results = [finish(p, timeout=120) for p in runs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 4], results
    refused = next(err for code, err in results if code == 4)
    assert "in use" in refused
    winner = runs[[code for code, _ in results].index(0)]
    manifest = manifest_of(out, winner.pid)
    assert server.settled_billed() == manifest["counts"]["ok"], "a row was billed twice"
    assert len(list((out / "runs").glob("*.json"))) == 1, "the refused run left a manifest"


# --- fsync: group commit, parts, manifests -----------------------------------------


@pytest.fixture
def fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, bool]]:
    """Every fsync: (the path of the descriptor, whether it is a folder)."""
    calls: list[tuple[str, bool]] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        calls.append((os.readlink(f"/proc/self/fd/{fd}"), stat.S_ISDIR(os.fstat(fd).st_mode)))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return calls


def test_the_journal_is_fsynced_by_group_commit(
    tmp_path: Path, fsyncs: list[tuple[str, bool]]
) -> None:
    clock = FakeClock()
    sink = ResultSink(tmp_path, "r", sync_rows=4, sync_seconds=0.05, clock=clock)
    row = {"run_id": "r", "id": "a", "status": "ok"}
    assert sink.sync_wait() is None
    sink.write(row)
    sink.flush()
    assert not sink.sync_due and sink.sync_wait() == pytest.approx(0.05)
    clock.now += 0.05
    assert sink.sync_due, "the oldest unsynced row waited the whole window"
    sink.sync()
    journal = tmp_path / "journal" / "r-00001.jsonl"
    assert (str(journal), False) in fsyncs
    assert (str(tmp_path / "journal"), True) in fsyncs, "a new segment's name made durable"
    fsyncs.clear()
    for _ in range(3):
        sink.write(row)
    assert not sink.sync_due
    sink.write(row)
    assert sink.sync_due, "sync_rows results waiting commit at once"
    sink.flush()
    sink.sync()
    assert fsyncs == [(str(journal), False)]
    sink.close()


def test_parts_and_manifests_are_fsynced_with_their_folders(
    tmp_path: Path, fsyncs: list[tuple[str, bool]]
) -> None:
    part = tmp_path / "results" / "r" / "part-00001.parquet"
    write_part([{"run_id": "r", "id": "a", "status": "ok"}], part)
    assert (str(tmp_path / "results"), True) in fsyncs, "the new run folder's name"
    assert (str(part.parent), True) in fsyncs, "the renamed part's name"
    assert any(path.endswith(".part-00001.parquet.tmp") for path, _ in fsyncs)
    fsyncs.clear()
    write_manifest(tmp_path, "r", {"status": "running"})
    assert (str(tmp_path / "runs"), True) in fsyncs
    assert any(path.endswith(".r.json.tmp") and not folder for path, folder in fsyncs)


def test_a_run_fsyncs_its_journal_while_it_runs(
    tmp_path: Path, fsyncs: list[tuple[str, bool]]
) -> None:
    src = write_jsonl(tmp_path / "rows.jsonl", prompts(600))  # type: ignore[arg-type]
    run = run_with_sim([src], tmp_path / "out", concurrency=16)
    assert run.result.exit_code == 0
    journal = [path for path, _ in fsyncs if "/journal/" in path and path.endswith(".jsonl")]
    assert journal, "no journal fsync in 600 rows: a power cut could take them all"
