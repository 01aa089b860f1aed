"""Crashes and signals on real processes: issue 4, "never lose a billed answer".

The rest of the suite runs in process on virtual time; these tests cannot. A
``kill -9`` has to hit a real process, a signal handler has to run in a real main
thread, and a lock has to be released by a real kernel. So each test starts
``pipeline sim`` on a free loopback port and ``python -m pipeline run`` as a user
would, kills or signals the run part-way, re-runs it, and checks the outcome against
the server's own ledger (``GET /sim/stats``): what the server billed is what a
gateway would charge, whatever the pipeline believes.

Every wait has a deadline and every process started here is killed at the end, so
a hang fails a test instead of stalling the suite. Only 127.0.0.1 is used.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa

from pipeline.resume import IdIndex, _drop_repeats, load_outcomes
from pipeline.runner import RESULTS_WAITING
from tests.realproc import (
    Processes,
    Server,
    assert_every_id_ok_once,
    finish,
    manifest_of,
    ok_counts,
    results,
    start_server,
    wait_for,
    write_rows,
)

ROWS = 3000
CONCURRENCY = 32
LATENCY_MS = 25  # ~900 rows/s at 32 in flight on 2 cores: a third of the rows in about 1 s


def run_cmd(src: Path, out: Path, server: Server) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pipeline",
        "run",
        str(src),
        "--base-url",
        server.url,
        "--model",
        "gpt-5.5",
        "--concurrency",
        str(CONCURRENCY),
        "--out",
        str(out),
        "--quiet",
    ]


def start_and_wait_for_a_third(
    procs: Processes, src: Path, out: Path, server: Server, cmd: list[str] | None = None
) -> subprocess.Popen[bytes]:
    run = procs.start(cmd or run_cmd(src, out, server))
    wait_for(lambda: server.billed() >= ROWS // 3 or run.poll() is not None, 30, "a third billed")
    assert run.poll() is None, f"the run ended before a third of its rows: {finish(run)}"
    return run


def test_kill_9_loses_at_most_what_was_in_flight_and_its_lock_is_taken_over(
    tmp_path: Path, procs: Processes
) -> None:
    src = write_rows(tmp_path / "rows.jsonl", ROWS, "k")
    out = tmp_path / "out"
    server = start_server(procs, "--latency-ms", str(LATENCY_MS))
    run = start_and_wait_for_a_third(procs, src, out, server)

    # While it runs, the folder is taken: a second run exits 4 before it starts a run.
    code, err = finish(procs.start(run_cmd(src, out, server)), timeout=30)
    assert code == 4, err
    assert "in use" in err
    assert len(list((out / "runs").glob("*.json"))) == 1, "the refused run left a manifest"

    run.send_signal(signal.SIGKILL)
    code, _ = finish(run, timeout=10)
    assert code == -signal.SIGKILL
    holder = json.loads((out / ".lock").read_text(encoding="utf-8"))
    assert holder["pid"] == run.pid, "the dead run's lock file is the one being taken over"
    first_run_id = manifest_of(out, run.pid)["run_id"]
    billed_before_rerun = server.settled_billed()

    assert manifest_of(out, run.pid)["status"] == "running"
    rerun = procs.start(run_cmd(src, out, server))
    code, err = finish(rerun)
    assert code == 0, f"the rerun did not take over the dead run's lock: exit {code}: {err}"
    killed = manifest_of(out, run.pid)
    assert killed["status"] == "killed", "a dead run's manifest still says running"
    assert manifest_of(out, rerun.pid)["run_id"] in killed["error"]
    rows = assert_every_id_ok_once(out, ROWS, "k")

    kept = sum(1 for r in rows if r["run_id"] == first_run_id)
    assert kept >= ROWS // 3 - CONCURRENCY, "answers journaled before the kill were lost"
    stats = server.stats()
    assert stats["billed"] - billed_before_rerun == ROWS - kept, (
        "the rerun sent rows the killed run had already answered"
    )
    assert stats["billed"] <= ROWS + CONCURRENCY + RESULTS_WAITING, (
        f"billed {stats['billed']} answers for {ROWS} rows: {stats['billed'] - ROWS} lost, "
        f"more than the {CONCURRENCY} in flight and {RESULTS_WAITING} waiting for the writer"
    )


def test_sigterm_keeps_every_answer_and_the_rerun_resends_none(
    tmp_path: Path, procs: Processes
) -> None:
    src = write_rows(tmp_path / "rows.jsonl", ROWS, "t")
    out = tmp_path / "out"
    server = start_server(procs, "--latency-ms", str(LATENCY_MS))
    run = start_and_wait_for_a_third(procs, src, out, server)

    run.send_signal(signal.SIGTERM)
    code, err = finish(run, timeout=30)
    assert code == 143, err
    assert manifest_of(out, run.pid)["exit_code"] == 143
    billed_first = server.settled_billed()
    kept = ok_counts(out)
    assert sum(kept.values()) == billed_first, (
        f"the server billed {billed_first} answers, the interrupted run kept "
        f"{sum(kept.values())}: in-flight answers were dropped"
    )
    assert ROWS // 3 <= billed_first < ROWS
    assert not list((out / "journal").glob("*.jsonl")), "a clean stop leaves no journal behind"

    code, err = finish(procs.start(run_cmd(src, out, server)))
    assert code == 0, err
    assert_every_id_ok_once(out, ROWS, "t")
    stats = server.stats()
    assert stats["billed"] == ROWS, "an answered row was sent again"
    assert stats["most_billed_per_request"] == 1
    assert server.chat_requests() == ROWS, "the rerun re-sent rows already answered"


def test_second_signal_stops_at_once(tmp_path: Path, procs: Processes) -> None:
    """With answers 5 s away, the first SIGTERM waits for them and the second does not."""
    n = 100
    src = write_rows(tmp_path / "rows.jsonl", n, "s")
    out = tmp_path / "out"
    slow = start_server(procs, "--latency-ms", "5000")
    run = procs.start(run_cmd(src, out, slow))
    wait_for(
        lambda: slow.chat_requests() >= CONCURRENCY or run.poll() is not None,
        15,
        "the first requests in flight",
    )
    run.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert run.poll() is None, "the first signal must let in-flight requests finish"
    second_at = time.monotonic()
    run.send_signal(signal.SIGTERM)
    code, err = finish(run, timeout=15)
    stopped_in = time.monotonic() - second_at
    assert code == 143, err
    assert stopped_in < 2.5, f"the second signal took {stopped_in:.1f}s to stop the run"
    assert slow.billed() == 0, "no answer could have arrived yet"
    assert manifest_of(out, run.pid)["exit_code"] == 143
    assert not ok_counts(out), "nothing was answered, so nothing may be recorded as ok"

    # The cut-off rows are still pending: a plain rerun (on a fast server) sends them all.
    fast = start_server(procs)
    code, err = finish(procs.start(run_cmd(src, out, fast)))
    assert code == 0, err
    assert_every_id_ok_once(out, n, "s")
    assert fast.stats()["billed"] == n


def test_quota_exhausted_then_topped_up_over_http(tmp_path: Path, procs: Processes) -> None:
    n, quota = 400, 120
    src = write_rows(tmp_path / "rows.jsonl", n, "q")
    out = tmp_path / "out"
    capped = start_server(procs, "--latency-ms", "20", "--quota-requests", str(quota))
    code, err = finish(procs.start(run_cmd(src, out, capped)))
    assert code == 3, err
    assert "quota" in err.lower()
    rows = results(out)
    assert len(rows) == quota and all(r["status"] == "ok" for r in rows), (
        "rows cut off by the fatal stop must stay pending, not become errors"
    )
    assert capped.billed() == quota

    topped_up = start_server(procs, "--latency-ms", "20")
    code, err = finish(procs.start(run_cmd(src, out, topped_up)))
    assert code == 0, err
    assert_every_id_ok_once(out, n, "q")
    assert topped_up.billed() == n - quota
    assert topped_up.chat_requests() == n - quota, "the rerun sent rows already answered"


# --- the resume index (pipeline/resume.py), which every test above leans on ----------


def _write_part(path: Path, rows: list[tuple[str, str]]) -> None:
    from pipeline.sink import write_part

    write_part([{"run_id": "r", "id": row_id, "status": status} for row_id, status in rows], path)


def test_resume_index_matches_a_plain_set_exactly(tmp_path: Path) -> None:
    """Every kind of id, repeated across parts and runs: done() agrees with sets."""
    rng = random.Random(7)
    alphabet = "abcxyz019-_:/ éü日本🙂"
    ids = sorted({"".join(rng.choices(alphabet, k=rng.randint(1, 12))) for _ in range(5000)})
    ids += ["", "0", "00", "id with spaces", "x" * 300]
    statuses: dict[str, list[str]] = {i: [] for i in ids}
    parts = tmp_path / "out" / "results"
    for run in range(3):
        rows = [(i, rng.choice(["ok", "error", "error"])) for i in ids if rng.random() < 0.6]
        for row_id, status in rows:
            statuses[row_id].append(status)
        _write_part(parts / f"run{run}" / "part-00001.parquet", rows[: len(rows) // 2])
        _write_part(parts / f"run{run}" / "part-00002.parquet", rows[len(rows) // 2 :])
    ok = {i for i, s in statuses.items() if "ok" in s}
    failed = {i for i, s in statuses.items() if s and "ok" not in s}
    assert ok and failed and set(ids) - ok - failed, "the sample must hold all three kinds"

    outcomes = load_outcomes(tmp_path / "out")
    assert (len(outcomes.ok), len(outcomes.failed)) == (len(ok), len(failed))
    for row_id in ids + ["never-seen", "日本🙂x", "x" * 299]:
        assert outcomes.done(row_id, False) == (row_id in ok or row_id in failed), row_id
        assert outcomes.done(row_id, True) == (row_id in ok), row_id


def test_resume_index_keeps_distinct_ids_that_share_a_hash() -> None:
    """Python's string hash is 64 bits, so ids can collide: both must stay, repeats go."""
    hashes = pa.array([5, 5, 5, 5, 7, 9, 9], pa.int64())
    ids = pa.array(["a", "b", "a", "c", "d", "e", "e"], pa.string())
    kept_hashes, kept_ids = _drop_repeats(hashes, ids)
    assert kept_ids.to_pylist() == ["a", "b", "c", "d", "e"]
    assert kept_hashes.to_pylist() == [5, 5, 5, 7, 9]


def test_resume_index_of_nothing_and_of_one() -> None:
    assert not load_outcomes(Path("/nonexistent")).done("a", False)
    one = IdIndex(pa.array(["only"], pa.string()))
    assert "only" in one and "onl" not in one and "" not in one and len(one) == 1
    empty = IdIndex(pa.array([], pa.string()))
    assert len(empty) == 0 and "x" not in empty and "x" not in IdIndex()


def test_kill_9_during_compaction_loses_at_most_what_was_in_flight(
    tmp_path: Path, procs: Processes
) -> None:
    """Parts of 100 rows: the kill lands while a part is being written, and journaling
    must not have waited on it."""
    src = write_rows(tmp_path / "rows.jsonl", ROWS, "c")
    job = tmp_path / "job.toml"
    job.write_text(f'source = ["{src.name}"]\npart_rows = 100\n', encoding="utf-8")
    out = tmp_path / "out"
    server = start_server(procs, "--latency-ms", str(LATENCY_MS))
    cmd = run_cmd(src, out, server)
    cmd[cmd.index(str(src))] = str(job)
    run = start_and_wait_for_a_third(procs, src, out, server, cmd)
    run.send_signal(signal.SIGKILL)
    assert finish(run, timeout=10)[0] == -signal.SIGKILL
    assert len(list((out / "results").rglob("part-*.parquet"))) > 1, "no part was compacted"
    code, err = finish(procs.start(run_cmd(src, out, server)))
    assert code == 0, err
    assert_every_id_ok_once(out, ROWS, "c")
    billed = server.stats()["billed"]
    assert billed <= ROWS + CONCURRENCY + RESULTS_WAITING, f"{billed - ROWS} answers lost"
