"""Scaling out (issue 9): ``--engine ray`` and ``--shard`` against a rate-limited server.

    pip install -e '.[bench,ray]'
    python -m bench.scale                 # all scenarios, about two minutes
    python -m bench.scale --only limit    # one of: limit, learned, kill

Each scenario starts ``pipeline sim`` in its own process and runs ``pipeline run`` as a
user would (the Ray cases start their own local Ray instance, one worker per CPU).
Figures come from the server's counters and from the results written. Throughput is
measured over the requests themselves (first start to last finish in the results),
because a Ray run also spends a few seconds starting Ray; that start-up is printed
separately.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import (
    CliRun,
    Server,
    rate_limited,
    requests_seen,
    run_cli,
    sim_server,
    verdict,
    write_prompts,
)

LIMIT = 6000  # requests/min the server allows (1 s burst)
ROWS = 2000


def _counts(server: Server) -> tuple[int, int, int]:
    stats = server.stats()
    return requests_seen(stats), rate_limited(stats), int(stats["billed"])


def _pace(run: CliRun) -> tuple[int, float]:
    rows = [r for r in run.rows() if r["status"] == "ok"]
    if not rows:
        return 0, 0.0
    first = min(r["started_at"] for r in rows)
    last = max(r["finished_at"] for r in rows)
    span = max(1e-6, (last - first).total_seconds())
    return len(rows), len(rows) / span * 60


def _tokens_match(run: CliRun, server: Server) -> bool:
    usage = server.stats()["usage_by_response_id"].values()
    rows = run.rows()
    ours = (
        sum(r["prompt_tokens"] or 0 for r in rows),
        sum(r["completion_tokens"] or 0 for r in rows),
    )
    theirs = sum(u["prompt_tokens"] for u in usage), sum(u["completion_tokens"] for u in usage)
    return ours == theirs


def _line(name: str, run: CliRun, server: Server, target_share: float, max_429: float) -> bool:
    sent, limited, billed = _counts(server)
    ok, per_min = _pace(run)
    share_429 = limited / max(1, sent)
    tokens_match = _tokens_match(run, server)
    good = (
        run.exit_code == 0
        and ok == ROWS
        and billed == ROWS
        and share_429 <= max_429
        and per_min >= target_share * LIMIT
        and tokens_match
    )
    startup = (run.run_seconds or run.seconds) - (ROWS / per_min * 60 if per_min else 0)
    print(
        f"{name:<44} exit {run.exit_code}  ok {ok:,}/{ROWS:,}  billed {billed:,}  "
        f"{per_min:,.0f}/min = {per_min / LIMIT:.1%} of limit  429s {limited}/{sent} = "
        f"{share_429:.2%}  tokens = server's: {tokens_match}  "
        f"run {run.run_seconds or run.seconds:.1f}s (start-up ~{max(0.0, startup):.1f}s)  "
        f"{verdict(good)}"
    )
    return good


def scenario_limit(tmp: Path) -> bool:
    """--rpm 6000 against a server that allows 6,000/min: ray vs local vs 2 shards."""
    rows = write_prompts(tmp / "rows.jsonl", ROWS)
    base = [str(rows), "--model", "gpt-5.5", "--rpm", str(LIMIT), "--concurrency", "64"]
    knobs = ["--rpm-limit", str(LIMIT), "--latency-ms", "20"]
    good = True
    with sim_server(*knobs) as server:
        run = run_cli([*base, "--base-url", server.url, "--engine", "ray"], tmp / "ray")
        good &= _line("--engine ray (2 workers), --rpm 6000", run, server, 0.9, 0.01)
    with sim_server(*knobs) as server:
        run = run_cli([*base, "--base-url", server.url], tmp / "local")
        good &= _line("local, one process, --rpm 6000", run, server, 0.9, 0.01)
    with sim_server(*knobs) as server:
        out = tmp / "shards"
        cmd = [sys.executable, "-m", "pipeline", "run", *base, "--base-url", server.url]
        cmd += ["--out", str(out), "--quiet"]
        start = time.monotonic()
        procs = [subprocess.Popen([*cmd, "--shard", f"{i}/2"]) for i in range(2)]
        codes = [p.wait(600) for p in procs]
        run = CliRun(max(codes), time.monotonic() - start, None, "", "", out)
        good &= _line("2 processes, --shard 0/2 and 1/2, --rpm 6000", run, server, 0.9, 0.01)
    return good


def scenario_learned(tmp: Path) -> bool:
    """No --rpm: the workers learn the pace from x-ratelimit headers, shared out."""
    rows = write_prompts(tmp / "rows.jsonl", ROWS)
    with sim_server("--rpm-limit", str(LIMIT), "--latency-ms", "20") as server:
        args = [str(rows), "--model", "gpt-5.5", "--base-url", server.url, "--engine", "ray"]
        run = run_cli(args, tmp / "learned")
        return _line("--engine ray, no --rpm (learned from headers)", run, server, 0.8, 0.10)


def scenario_kill(tmp: Path) -> bool:
    """kill -9 one Ray worker once a third is billed: exit 0, at most its in-flight twice."""
    n, concurrency = 3000, 32
    rows = write_prompts(tmp / "rows.jsonl", n)
    out = tmp / "kill"
    with sim_server("--latency-ms", "100") as server:
        cmd = [sys.executable, "-m", "pipeline", "run", str(rows), "--model", "gpt-5.5"]
        cmd += ["--base-url", server.url, "--engine", "ray", "--out", str(out), "--quiet"]
        cmd += ["--concurrency", str(concurrency)]
        driver = subprocess.Popen(cmd, env={**os.environ})
        deadline = time.monotonic() + 120
        while _counts(server)[2] < n // 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        pids = {
            int(t)
            for lock in (out / "journal").glob("*.lock")
            if (t := lock.read_text().strip()).isdigit()
        }
        victim = sorted(pids)[0]
        os.kill(victim, signal.SIGKILL)
        killed_at = _counts(server)[2]
        code = driver.wait(600)
        time.sleep(0.5)
        billed = _counts(server)[2]
    done = CliRun(code, 0, None, "", "", out)
    ok = len({r["id"] for r in done.rows() if r["status"] == "ok"})
    extra = billed - n
    good = code == 0 and ok == n and extra <= concurrency // 2
    print(
        f"{'kill -9 one of 2 Ray workers at ' + str(killed_at) + ' billed':<44} exit {code}  "
        f"ok ids {ok:,}/{n:,}  billed {billed:,} (+{extra}; its share of in-flight is "
        f"{concurrency // 2})  {verdict(good)}"
    )
    return good


SCENARIOS: dict[str, Any] = {
    "limit": scenario_limit,
    "learned": scenario_learned,
    "kill": scenario_kill,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=sorted(SCENARIOS))
    args = parser.parse_args()
    names = [args.only] if args.only else list(SCENARIOS)
    results = []
    for name in names:
        with tempfile.TemporaryDirectory() as tmp:
            results.append(SCENARIOS[name](Path(tmp)))
    sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    main()
