"""``--mode batch`` end to end against the built-in simulator's Files and Batches APIs.

``--provider sim`` runs the simulator in process with its state in
``OUT/batches/sim-server``, so batches outlive the run that submitted them, and the
simulator's own ledger (``read_ledger``) is the invoice the results must match.
"""

from __future__ import annotations

import collections
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.batch.ledger import Ledger
from pipeline.config import RunOptions
from pipeline.execute import execute
from pipeline.sim import read_ledger
from tests.realproc import Processes, _env, _repo_root, write_rows


def sim_options(out: Path, source: Path, **kw: Any) -> RunOptions:
    sim = {"batch_seconds": 0, **kw.pop("sim", {})}
    values: dict[str, Any] = {
        "sources": [str(source)],
        "out": out,
        "provider": "sim",
        "model": "gpt-5.5",
        "mode": "batch",
        "quiet": True,
        "sim": sim,
    }
    values.update(kw)
    return RunOptions(**values)


async def no_sleep(_: float) -> None:
    return None


def rows_of(out: Path) -> list[dict[str, Any]]:
    parts = sorted(p for p in (out / "results").rglob("*.parquet") if not p.name.startswith("."))
    return pa.concat_tables([pq.read_table(p) for p in parts]).to_pylist() if parts else []


def state_dir(out: Path) -> Path:
    return out / "batches" / "sim-server"


def test_5000_rows_no_wait_then_collected_every_id_ok_once_tokens_as_billed(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    source = write_rows(tmp_path / "rows.jsonl", 5000, "row")
    first = execute(sim_options(out, source, wait=False))
    assert first.exit_code == 0
    assert rows_of(out) == []
    open_chunks = [c for c in Ledger(out).chunks().values() if not c.closed]
    assert open_chunks and sum(c.rows for c in open_chunks) == 5000

    second = execute(sim_options(out, source, wait=False))
    assert second.exit_code == 0
    rows = rows_of(out)
    ok = collections.Counter(r["id"] for r in rows if r["status"] == "ok")
    assert ok == {f"row-{i}": 1 for i in range(5000)}
    assert {r["service_tier"] for r in rows} == {"batch"}
    billed = read_ledger(state_dir(out))
    per_row = collections.Counter(b.custom_id for b in billed)
    assert per_row == {f"row-{i}": 1 for i in range(5000)}, "a row billed twice or never"
    assert sum(r["prompt_tokens"] for r in rows) == sum(b.usage["prompt_tokens"] for b in billed)
    assert sum(r["completion_tokens"] for r in rows) == sum(
        b.usage["completion_tokens"] for b in billed
    )
    assert {r["batch_id"] for r in rows} == {b.batch_id for b in billed}
    assert not any(not c.closed for c in Ledger(out).chunks().values())


def test_expired_lines_go_back_and_the_next_run_submits_exactly_those(tmp_path: Path) -> None:
    out = tmp_path / "out"
    source = write_rows(tmp_path / "rows.jsonl", 400, "row")
    first = execute(sim_options(out, source, sim={"batch_expire_share": 0.1}), sleep=no_sleep)
    assert first.exit_code == 0
    answered = {r["id"] for r in rows_of(out)}
    expired = {f"row-{i}" for i in range(400)} - answered
    assert 10 < len(expired) < 80  # about 10%
    first_batches = {b.batch_id for b in read_ledger(state_dir(out))}

    second = execute(sim_options(out, source, sim={"batch_expire_share": 0.1}), sleep=no_sleep)
    assert second.exit_code == 0
    billed = read_ledger(state_dir(out))
    again = {b.custom_id for b in billed if b.batch_id not in first_batches}
    assert again == expired, "the second batch held other rows than the expired ones"
    ok = collections.Counter(r["id"] for r in rows_of(out) if r["status"] == "ok")
    assert ok == {f"row-{i}": 1 for i in range(400)}
    assert max(collections.Counter(b.custom_id for b in billed).values()) == 1


def test_kill_right_after_create_submits_nothing_twice_and_bills_each_row_once(
    procs: Processes, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    source = write_rows(tmp_path / "rows.jsonl", 300, "row")
    cmd = [sys.executable, "-m", "pipeline", "run", str(source), "--out", str(out), "-q"]
    cmd += ["--provider", "sim", "--model", "gpt-5.5", "--mode", "batch", "--no-wait"]
    cmd += ["--sim", "batch_seconds=0"]
    env = {**_env(), "PIPELINE_TEST_KILL_AFTER": "create"}
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=_repo_root()
    )
    procs._started.append(proc)
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    (chunk,) = Ledger(out).chunks().values()
    assert chunk.state == "creating"

    result = execute(sim_options(out, source), sleep=no_sleep)
    assert result.exit_code == 0
    assert result.tally.status["ok"] == 300
    (chunk,) = Ledger(out).chunks().values()  # no second chunk: nothing submitted again
    assert chunk.state == "collected"
    billed = read_ledger(state_dir(out))
    assert collections.Counter(b.custom_id for b in billed) == {f"row-{i}": 1 for i in range(300)}
    assert len({b.batch_id for b in billed}) == 1


def test_finish_sync_sends_the_expired_rows_synchronously(tmp_path: Path) -> None:
    out = tmp_path / "out"
    source = write_rows(tmp_path / "rows.jsonl", 200, "row")
    opts = sim_options(out, source, finish_sync=True, sim={"batch_expire_share": 0.2})
    result = execute(opts, sleep=no_sleep)
    assert result.exit_code == 0
    rows = rows_of(out)
    ok = collections.Counter(r["id"] for r in rows if r["status"] == "ok")
    assert ok == {f"row-{i}": 1 for i in range(200)}
    in_batch = {r["id"] for r in rows if r["service_tier"] == "batch"}
    assert 10 < len(in_batch) < 190
    billed = read_ledger(state_dir(out))
    assert {b.custom_id for b in billed} == in_batch  # the rest were sent one by one


def test_a_batch_failed_for_the_enqueued_token_limit_sends_its_rows_back(tmp_path: Path) -> None:
    import json

    out = tmp_path / "out"
    source = write_rows(tmp_path / "rows.jsonl", 50, "row")
    limited = sim_options(out, source, sim={"batch_enqueued_token_limit": 10})
    result = execute(limited, sleep=no_sleep)
    assert result.exit_code == 0 and rows_of(out) == []
    manifest = json.loads((out / "runs" / f"{result.run_id}.json").read_text())
    assert manifest["engine"]["back_to_pending"] == {"token_limit_exceeded": 50}
    assert read_ledger(state_dir(out)) == []  # a failed batch bills nothing
    again = execute(sim_options(out, source), sleep=no_sleep)  # the limit lifted
    assert again.tally.status["ok"] == 50


def test_sigterm_while_waiting_exits_143_and_leaves_the_batch_to_collect(
    procs: Processes, tmp_path: Path
) -> None:
    import json
    import time

    out = tmp_path / "out"
    source = write_rows(tmp_path / "rows.jsonl", 50, "row")
    cmd = [sys.executable, "-m", "pipeline", "run", str(source), "--out", str(out)]
    cmd += ["--provider", "sim", "--model", "gpt-5.5", "--mode", "batch", "--wait"]
    cmd += ["--sim", "batch_seconds=3600"]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(), cwd=_repo_root()
    )
    procs._started.append(proc)
    deadline = time.monotonic() + 60
    while not any(c.state == "open" for c in Ledger(out).chunks().values()):
        assert proc.poll() is None and time.monotonic() < deadline, "no batch was created"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert b"run the same command again to collect" in err
    (manifest,) = [json.loads(p.read_text()) for p in (out / "runs").glob("*.json")]
    assert manifest["status"] == "stopped" and manifest["engine"]["batches_open"] == 1
    (chunk,) = Ledger(out).chunks().values()
    assert chunk.state == "open"  # still running at the provider, collected by the next run


def test_batch_rows_are_priced_at_batch_prices_in_the_costs_view(tmp_path: Path) -> None:
    import csv
    import json

    from pipeline import query

    out = tmp_path / "out"
    source = write_rows(tmp_path / "rows.jsonl", 300, "row")
    assert execute(sim_options(out, source), sleep=no_sleep).exit_code == 0
    with open(_repo_root() / "pipeline" / "prices.csv", encoding="utf-8") as fh:
        prices = list(csv.DictReader(fh))
    (batch,) = [p for p in prices if p["model"] == "gpt-5.5" and p["service_tier"] == "batch"]
    expected = 0.0
    for r in rows_of(out):
        cached = r["cached_tokens"] or 0
        assert r["prompt_tokens"] < int(batch["long_context_threshold"])
        expected += (
            (r["prompt_tokens"] - cached) * float(batch["input_per_mtok"])
            + cached * float(batch["cached_input_per_mtok"])
            + r["completion_tokens"] * float(batch["output_per_mtok"])
        ) / 1e6
    data = json.loads(query.sql(out, "SELECT sum(cost_usd) AS usd FROM costs", "json"))
    assert abs(data[0]["usd"] - expected) < 1e-6
    assert expected > 0
    # `pipeline batches` shows the same, per batch.
    from pipeline.batch.listing import batch_options, list_batches

    text, _ = list_batches(batch_options(out), fmt="json")
    listed = json.loads(text)
    assert abs(sum(b["cost_usd"] for b in listed) - expected) < 1e-6
    assert [b["status"] for b in listed] == ["collected (completed)"]


def test_report_by_service_tier_on_an_out_mixing_sync_flex_and_batch_rows(tmp_path: Path) -> None:
    """Real runs on one OUT (a batch, then synchronous default and flex calls with
    refusals), and ``report --by service_tier`` against a recomputation from the
    Parquet rows and the shipped price table alone."""
    import csv
    import json
    from collections import defaultdict

    from click.testing import CliRunner

    from pipeline.cli import cli

    out = tmp_path / "out"
    batch_rows = write_rows(tmp_path / "b.jsonl", 60, "b")
    assert execute(sim_options(out, batch_rows), sleep=no_sleep).exit_code == 0
    sync_rows = write_rows(tmp_path / "s.jsonl", 60, "s")
    assert execute(sim_options(out, sync_rows, mode="sync")).exit_code == 0
    flex_rows = write_rows(tmp_path / "f.jsonl", 60, "f")
    flex = sim_options(
        out, flex_rows, mode="sync", service_tier="flex", flex_fallback=2,
        sim={"flex_refusal_rate": 0.3, "flex_retry_after": 0.0},
    )  # fmt: skip
    assert execute(flex, sleep=no_sleep).exit_code == 0

    with open(_repo_root() / "pipeline" / "prices.csv", encoding="utf-8") as fh:
        prices = {(p["model"], p["service_tier"]): p for p in csv.DictReader(fh)}
    want: dict[Any, dict[str, float]] = defaultdict(lambda: {"requests": 0, "cost": 0.0})
    for r in rows_of(out):
        tier = r["service_tier"]
        p = prices[(r["model"], "" if tier in (None, "default", "auto") else tier)]
        cached = r["cached_tokens"] or 0
        want[tier]["requests"] += 1
        want[tier]["cost"] += (
            (r["prompt_tokens"] - cached) * float(p["input_per_mtok"])
            + cached * float(p["cached_input_per_mtok"])
            + r["completion_tokens"] * float(p["output_per_mtok"])
        ) / 1e6
    assert {"batch", "flex"} <= set(want) and want["batch"]["requests"] == 60
    result = CliRunner().invoke(
        cli, ["report", str(out), "--by", "service_tier", "--format", "json"]
    )
    assert result.exit_code == 0, result.output
    got = {g["service_tier"]: g for g in json.loads(result.stdout)}
    assert set(got) == set(want)
    for tier, expected in want.items():
        assert got[tier]["requests"] == expected["requests"], tier
        assert abs(got[tier]["cost_usd"] - expected["cost"]) < 1e-6, tier


def test_the_summary_counts_each_row_once_waiting_then_collected(tmp_path: Path) -> None:
    """A --no-wait run says how many rows wait in batches (summary and manifest); the run
    that collects them counts them ok, not also "already done"."""
    from pipeline.execute import summary_line

    out = tmp_path / "out"
    source = write_rows(tmp_path / "rows.jsonl", 30, "row")
    first = execute(sim_options(out, source, wait=False))
    assert first.in_batches == 30
    assert "30 in open batches" in summary_line(first)
    second = execute(sim_options(out, source, wait=False))
    assert second.tally.status["ok"] == 30
    assert second.tally.skipped == 0, "collected rows counted twice"
    assert "already done" not in summary_line(second)
    third = execute(sim_options(out, source, wait=False))
    assert third.tally.skipped == 30 and third.in_batches == 0


def test_batches_forget_from_the_command_line_refuses_a_batch_the_provider_has(
    tmp_path: Path,
) -> None:
    """`pipeline batches OUT --forget ID`: the simulator still knows the batch, so it is
    not forgotten (exit 2, nothing changed); with --cancel too it is a usage error."""
    from click.testing import CliRunner

    from pipeline.batch.ledger import Ledger
    from pipeline.cli import cli

    out = tmp_path / "out"
    source = write_rows(tmp_path / "rows.jsonl", 5, "r")
    execute(sim_options(out, source, wait=False, sim={"batch_seconds": 3600}))
    (chunk,) = [c for c in Ledger(out).chunks().values() if c.batch_id]
    before = Ledger(out).path.read_bytes()
    result = CliRunner().invoke(cli, ["batches", str(out), "--forget", str(chunk.batch_id)])
    assert result.exit_code == 2, result.output
    assert "still has it" in result.output and "Nothing was forgotten" in result.output
    both = ["batches", str(out), "--forget", str(chunk.batch_id), "--cancel"]
    result = CliRunner().invoke(cli, both)
    assert result.exit_code == 2 and "give one" in result.output
    assert Ledger(out).path.read_bytes() == before
