"""``--shard I/N`` for schedulers other than Ray: N processes, one ``OUT``, one job.

Two real processes started together (as a Kubernetes Job or a Slurm array would)
must give the same results as one run, the server must bill each row once, and the
job's limits must hold for all shards together: each shard takes 1/N of them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.config import RunOptions
from pipeline.local import build_runner, make_client
from pipeline.resume import Outcomes
from pipeline.runner import RowSource
from pipeline.sim import SimConfig, Simulator
from tests.conftest import FakeClock, prompts, run_with_sim, write_jsonl
from tests.realproc import (
    Processes,
    assert_every_id_ok_once,
    finish,
    start_server,
    write_rows,
)


def test_two_shard_processes_started_together_equal_one_run(
    tmp_path: Path, procs: Processes
) -> None:
    server = start_server(procs, "--latency-ms", "20")
    src = write_rows(tmp_path / "rows.jsonl", 1500, "s")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "pipeline", "run", str(src), "--base-url", server.url]
    cmd += ["--model", "gpt-5.5", "--out", str(out), "--quiet", "--concurrency", "32"]

    shards = [procs.start([*cmd, "--shard", f"{i}/2"]) for i in range(2)]
    codes = [finish(p, timeout=120) for p in shards]

    assert [code for code, _ in codes] == [0, 0], codes
    rows = assert_every_id_ok_once(out, 1500, "s")
    assert len({r["run_id"] for r in rows}) == 2, "each shard is a run of its own"
    assert server.settled_billed() == 1500, "a row was billed twice (or never)"
    table = pq.read_table(sorted((out / "results").rglob("*.parquet")))
    assert sum(table.column("prompt_tokens").to_pylist()) == server.billed_tokens()[0]
    # A re-run of either shard sends nothing.
    again = procs.start([*cmd, "--shard", "1/2"])
    assert finish(again)[0] == 0
    assert server.settled_billed() == 1500


def test_each_shard_takes_its_share_of_the_jobs_limits(tmp_path: Path) -> None:
    """--rpm 600 over 3 shards: each shard paces itself at 200/min, so the three
    together stay at the job's 600."""
    src = write_jsonl(tmp_path / "rows.jsonl", prompts(90))  # type: ignore[arg-type]
    clock = FakeClock()
    sim = Simulator(SimConfig(), clock=clock, sleep=clock.sleep)
    start = clock()
    run = run_with_sim([src], tmp_path / "out", sim=sim, clock=clock, shard="0/3", rpm=600)
    sent = run.result.tally.status["ok"]
    elapsed = clock() - start
    assert 20 <= sent <= 40
    # 200/min is 3.3/s after a burst of one second's worth.
    assert elapsed >= (sent - 4) / (200 / 60), f"{sent} rows in {elapsed:.1f}s: faster than 200/min"


def test_one_of_n_processes_takes_its_share_of_every_job_wide_limit(tmp_path: Path) -> None:
    opts = RunOptions(
        sources=["unused"], out=tmp_path, concurrency=64, rpm=6000, tpm=1e6, max_cost=9.0
    )
    runner = build_runner(
        opts,
        run_id="r",
        provider_name="sim",
        client=make_client(opts, ["http://127.0.0.1:9/v1"], None),
        outcomes=Outcomes(),
        source=RowSource(lambda: iter([])),
        parts=3,
    )
    runner.sink.close()
    assert runner.limiter.max_concurrency == 21
    assert runner.limiter.rpm == pytest.approx(2000)
    assert runner.budget is not None and runner.budget.cap == 3.0
