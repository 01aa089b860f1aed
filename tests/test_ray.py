"""``--engine ray`` on a local 2-CPU Ray instance, against ``pipeline sim`` over HTTP.

These are the issue-9 checks: limits that hold for the whole job, results in the
usual ``OUT`` layout that resume and report read unchanged, and a worker killed
mid-run costing no more than its own in-flight requests. The server's ledger
(``GET /sim/stats``) is the invoice the results are checked against.

Ray is an optional extra; CI installs it (``pip install -e '.[dev,ray]'``).
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from pipeline.config import RunOptions
from pipeline.execute import execute
from pipeline.runner import RESULTS_WAITING, RunResult
from tests.realproc import (
    Processes,
    Server,
    assert_every_id_ok_once,
    finish,
    results,
    start_server,
    wait_for,
    write_rows,
)

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def ray_instance() -> Iterator[None]:
    """One local Ray instance with 2 CPUs for the whole module (it takes seconds)."""
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        namespace="pipeline",
        log_to_driver=False,
        logging_level="ERROR",
    )
    try:
        yield
    finally:
        ray.shutdown()


def run_ray(src: Path, out: Path, server: Server, **options: Any) -> RunResult:
    options.setdefault("model", "gpt-5.5")
    options.setdefault("quiet", True)
    opts = RunOptions(sources=[str(src)], out=out, base_url=[server.url], engine="ray", **options)
    return execute(opts)


def test_2000_rows_at_the_servers_limit_all_ok_tokens_match_few_429s(
    tmp_path: Path, procs: Processes, ray_instance: None
) -> None:
    server = start_server(procs, "--rpm-limit", "6000", "--latency-ms", "20")
    src = write_rows(tmp_path / "rows.jsonl", 2000, "r")
    out = tmp_path / "out"

    result = run_ray(src, out, server, rpm=6000, concurrency=64)

    assert result.exit_code == 0, result.fatal
    rows = assert_every_id_ok_once(out, 2000, "r")
    assert {r["run_id"] for r in rows} == {result.run_id}, "one job, one run id in the rows"
    stats = server.stats()
    chat = stats["stats"]["requests"] - server.probes
    limited = stats["stats"].get("429", 0)
    assert stats["billed"] == 2000
    assert limited / chat < 0.01, f"{limited} of {chat} requests were 429s"
    table = pq.read_table(sorted((out / "results").rglob("*.parquet")))
    ours = (
        sum(table.column("prompt_tokens").to_pylist()),
        sum(table.column("completion_tokens").to_pylist()),
    )
    assert ours == server.billed_tokens()
    assert result.tally.status["ok"] == 2000
    assert (result.tally.prompt_tokens, result.tally.completion_tokens) == ours
    # Several workers wrote, each under its own part folder.
    assert len(list((out / "results").iterdir())) >= 2


def test_a_rerun_sends_nothing_and_report_reads_the_ray_output(
    tmp_path: Path, procs: Processes, ray_instance: None
) -> None:
    server = start_server(procs)
    src = write_rows(tmp_path / "rows.jsonl", 600, "r")
    with src.open("a") as fh:
        fh.write("not json\n")
    out = tmp_path / "out"

    first = run_ray(src, out, server, split_rows=100)
    second = run_ray(src, out, server, split_rows=100)

    assert first.exit_code == 1  # the bad line
    assert server.billed() == 600, "the rerun sent rows that were already ok"
    assert second.tally.skipped == 601 and second.tally.finished == 0
    bad = [r for r in results(out) if r["status"] != "ok"]
    assert [r["id"] for r in bad] == ["rows.jsonl:601"], "a bad row is named by file and line"

    import json

    from pipeline.query.report import report

    lines = json.loads(report(out, ["model"], "json"))
    assert sum(g["requests"] for g in lines) == 601
    assert sum(g["ok"] for g in lines) == 600


def test_killing_a_worker_mid_run_loses_only_its_in_flight_requests(
    tmp_path: Path, procs: Processes, ray_instance: None
) -> None:
    server = start_server(procs, "--latency-ms", "100")
    rows, concurrency = 3000, 32
    src = write_rows(tmp_path / "rows.jsonl", rows, "k")
    out = tmp_path / "out"
    outcome: dict[str, Any] = {}

    def run() -> None:
        outcome["result"] = run_ray(src, out, server, concurrency=concurrency, split_rows=500)

    thread = threading.Thread(target=run)
    thread.start()
    wait_for(lambda: server.billed() >= rows // 3, 60, "a third billed")
    pids: set[int] = set()

    def a_worker_holds_a_journal() -> bool:
        # A lock file exists a moment before its pid is written, and a worker between
        # two splits holds none: look until one is seen.
        for lock in (out / "journal").glob("*.lock"):
            with contextlib.suppress(OSError):
                if (text := lock.read_text().strip()).isdigit():
                    pids.add(int(text))
        return bool(pids - {os.getpid()})

    wait_for(a_worker_holds_a_journal, 30, "a worker's journal lock")
    victim = sorted(pids - {os.getpid()})[0]
    os.kill(victim, signal.SIGKILL)
    thread.join(180)
    assert not thread.is_alive(), "the job did not finish after a worker was killed"

    result: RunResult = outcome["result"]
    assert result.exit_code == 0, result.fatal
    assert_every_id_ok_once(out, rows, "k")
    billed = server.settled_billed()
    # The killed worker had at most its share of the job's concurrency in flight, and
    # at most RESULTS_WAITING answers not yet handed to its journal.
    assert rows <= billed <= rows + concurrency // 2 + RESULTS_WAITING, (
        f"billed {billed} for {rows} rows"
    )
    assert result.tally.status["ok"] == rows


def test_max_cost_holds_for_the_whole_job(
    tmp_path: Path, procs: Processes, ray_instance: None
) -> None:
    server = start_server(procs, "--latency-ms", "20")
    src = write_rows(tmp_path / "rows.jsonl", 3000, "c")
    out = tmp_path / "out"
    cap = 0.02

    result = run_ray(src, out, server, max_cost=cap, split_rows=300)

    assert result.exit_code == 3 and result.fatal and "max-cost" in result.fatal
    prompt, completion = server.billed_tokens()
    from pipeline.pricing import find_price, load_prices

    price = find_price(load_prices(None), "gpt-5.5", "openai-compatible", None)
    assert price is not None
    spent = price.cost(prompt, 0, completion)
    assert 0.5 * cap <= spent <= cap, f"server billed ${spent:.4f} against a ${cap} cap"
    assert server.billed() < 3000


def test_a_wrong_key_stops_every_worker(
    tmp_path: Path, procs: Processes, ray_instance: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SIM_KEY", "right")
    server = start_server(procs, "--require-key-env", "SIM_KEY")
    monkeypatch.setenv("SIM_KEY", "sk-wrong-0123456789abcdef")
    src = write_rows(tmp_path / "rows.jsonl", 2000, "a")
    out = tmp_path / "out"

    result = run_ray(src, out, server, api_key_env="SIM_KEY", concurrency=16)

    assert result.exit_code == 3 and result.fatal and "401" in result.fatal
    assert server.stats()["stats"]["requests"] - server.probes <= 64
    everything = b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file())
    assert b"sk-wrong-0123456789abcdef" not in everything, "the key leaked into OUT"


def test_status_counts_by_id_are_exact(
    tmp_path: Path, procs: Processes, ray_instance: None
) -> None:
    server = start_server(procs, "--fail-5xx-rate", "0.05")
    src = write_rows(tmp_path / "rows.jsonl", 500, "f")
    out = tmp_path / "out"

    result = run_ray(src, out, server, split_rows=100)

    assert result.exit_code == 0
    ok = collections.Counter(r["id"] for r in results(out) if r["status"] == "ok")
    assert len(ok) == 500 and max(ok.values()) == 1
    assert result.tally.retries > 0


def test_ctrl_c_on_the_driver_keeps_every_billed_answer(
    tmp_path: Path, procs: Processes, ray_instance: None
) -> None:
    import sys

    server = start_server(procs, "--latency-ms", "300")
    src = write_rows(tmp_path / "rows.jsonl", 2000, "i")
    out = tmp_path / "out"
    address = ray.get_runtime_context().gcs_address
    driver = procs.start(
        [sys.executable, "-m", "pipeline", "run", str(src), "--engine", "ray"]
        + ["--ray-address", address, "--base-url", server.url, "--model", "gpt-5.5"]
        + ["--out", str(out), "--quiet", "--concurrency", "32"]
    )
    wait_for(lambda: server.billed() >= 200 or driver.poll() is not None, 60, "200 billed")
    driver.send_signal(signal.SIGINT)
    code, err = finish(driver, timeout=60)

    assert code == 130, err
    billed = server.settled_billed()
    assert billed < 2000, "the run went on after Ctrl-C"
    ok = [r for r in results(out) if r["status"] == "ok"]
    assert len(ok) == billed, f"{billed} answers billed, {len(ok)} kept"

    rerun = run_ray(src, out, server, concurrency=256)
    assert rerun.exit_code == 0
    assert server.settled_billed() == 2000, "the rerun sent rows that were already ok"


def test_an_empty_input_is_a_success_with_nothing_sent(
    tmp_path: Path, procs: Processes, ray_instance: None
) -> None:
    server = start_server(procs)
    src = tmp_path / "empty.jsonl"
    src.write_text("")
    result = run_ray(src, tmp_path / "out", server)
    assert result.exit_code == 0 and result.tally.finished == 0
    assert server.billed() == 0


def test_a_file_named_twice_is_sent_once(
    tmp_path: Path, procs: Processes, ray_instance: None
) -> None:
    server = start_server(procs)
    src = write_rows(tmp_path / "rows.jsonl", 300, "d")
    opts = RunOptions(
        sources=[str(tmp_path), str(src), f"file://{src}"],
        out=tmp_path / "out",
        base_url=[server.url],
        engine="ray",
        model="gpt-5.5",
        quiet=True,
    )
    result = execute(opts)
    assert result.exit_code == 0
    assert server.billed() == 300
