"""Traffic control against a rate-limited, faulty simulator (issue 3's acceptance figures).

    python -m bench.traffic            # all scenarios, about two minutes
    python -m bench.traffic --only rpm # one scenario

Each scenario starts ``pipeline sim`` in its own process on loopback, runs
``pipeline run`` as a user would, and reads the figures from the server's own
counters and from the results. The no-``--rpm`` case also runs a plain client loop
(httpx, a semaphore, sleep on Retry-After) on the same server, for comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

from bench.common import (
    Server,
    rate_limited,
    requests_seen,
    run_cli,
    sim_server,
    verdict,
    write_prompts,
)

LIMIT = 1200  # requests/min the server allows, with a 1 s burst
ROWS = 500
SERVER_LIMIT_ARGS = ["--rpm-limit", str(LIMIT), "--latency-ms", "50", "--set", "burst_seconds=1"]


def scenario_rate(tmp: Path, with_rpm: bool, headers: bool = True) -> bool:
    name = "with --rpm 1200" if with_rpm else "no --rpm (learned)"
    if not headers:
        name += ", server sends no x-ratelimit headers"
    rows = write_prompts(tmp / "rows.jsonl", ROWS)
    knobs = SERVER_LIMIT_ARGS + ([] if headers else ["--set", "rate_limit_headers=false"])
    with sim_server(*knobs) as server:
        extra = ["--rpm", str(LIMIT)] if with_rpm else []
        run = run_cli(
            [str(rows), "--base-url", server.url, "--model", "gpt-5.5", "--concurrency", "32"]
            + extra,
            tmp / f"out-{with_rpm}",
        )
        stats = server.stats()
    ok = sum(1 for r in run.rows() if r["status"] == "ok")
    seconds = run.run_seconds or run.seconds
    throughput = ok / seconds * 60
    share = throughput / LIMIT
    r429 = rate_limited(stats) / max(1, requests_seen(stats))
    # Issue 3's targets; the header-less server is our own extra case, held to 15%.
    need_share, max_429 = (0.95, 0.01) if with_rpm else (0.85, 0.10 if headers else 0.15)
    passed = run.exit_code == 0 and ok == ROWS and share >= need_share and r429 <= max_429
    print(
        f"[{verdict(passed)}] {name}: {ok}/{ROWS} ok in {seconds:.1f}s = {throughput:,.0f}/min "
        f"({share:.1%} of the {LIMIT}/min limit, need >= {need_share:.0%}); "
        f"429s {rate_limited(stats)}/{requests_seen(stats)} = {r429:.1%} (need <= {max_429:.0%})"
    )
    if not with_rpm and headers:
        naive_loop(tmp)
    return passed


def naive_loop(tmp: Path) -> None:
    """The usual hand-written loop on the same server: 32 in flight, sleep on Retry-After."""
    with sim_server(*SERVER_LIMIT_ARGS) as server:

        async def main() -> tuple[int, float]:
            sem = asyncio.Semaphore(32)
            done = 0
            async with httpx.AsyncClient(timeout=60) as client:

                async def one(i: int) -> None:
                    nonlocal done
                    body = {"model": "gpt-5.5", "messages": [{"role": "user", "content": f"{i}"}]}
                    async with sem:
                        while True:
                            resp = await client.post(f"{server.url}/chat/completions", json=body)
                            if resp.status_code != 429:
                                done += 1
                                return
                            await asyncio.sleep(float(resp.headers.get("retry-after", "1")))

                start = time.monotonic()
                await asyncio.gather(*(one(i) for i in range(ROWS)))
                return done, time.monotonic() - start

        done, seconds = asyncio.run(main())
        stats = server.stats()
    r429 = rate_limited(stats) / max(1, requests_seen(stats))
    print(
        f"       plain loop for comparison: {done}/{ROWS} in {seconds:.1f}s = "
        f"{done / seconds * 60:,.0f}/min; 429s {rate_limited(stats)}/{requests_seen(stats)} "
        f"= {r429:.1%}"
    )


def scenario_faults(tmp: Path) -> bool:
    rows = write_prompts(tmp / "rows.jsonl", ROWS)
    knobs = ["--fail-429-rate", "0.08", "--fail-5xx-rate", "0.10", "--set", "truncate_rate=0.03"]
    with sim_server(*knobs) as server:
        run = run_cli(
            [str(rows), "--base-url", server.url, "--model", "gpt-5.5", "--concurrency", "32"],
            tmp / "out-faults",
        )
        stats = server.stats()
    results = run.rows()
    ok_ids = Counter(r["id"] for r in results if r["status"] == "ok")
    billed = stats["usage_by_response_id"]
    assert isinstance(billed, dict)
    mismatched = [
        r["id"]
        for r in results
        if r["status"] == "ok"
        and (billed.get(r["response_id"]) or {}).get("total_tokens") != r["total_tokens"]
    ]
    counts = stats["stats"]
    assert isinstance(counts, dict)
    passed = (
        run.exit_code == 0 and len(ok_ids) == ROWS and max(ok_ids.values()) == 1 and not mismatched
    )
    print(
        f"[{verdict(passed)}] 8% 429 / 10% 5xx / 3% truncated: {len(ok_ids)}/{ROWS} ok, "
        f"max ok rows per id {max(ok_ids.values())}, token mismatches {len(mismatched)}; "
        f"server saw {counts.get('requests')} requests, injected 429 "
        f"{counts.get('injected_429', 0)}, 5xx {counts.get('5xx', 0)}, truncated "
        f"{counts.get('truncated', 0)} (truncated answers are billed by the server and retried)"
    )
    return passed


def scenario_wrong_key(tmp: Path) -> bool:
    rows = write_prompts(tmp / "rows.jsonl", 1000)
    secret = "sk-bench-wrong-key-4c1d"
    env = {"BENCH_KEY": secret, "RIGHT_KEY": "sk-right"}
    with sim_server("--require-key-env", "RIGHT_KEY", env=env) as server:
        run = run_cli(
            [str(rows), "--base-url", server.url, "--model", "gpt-5.5", "--concurrency", "32"]
            + ["--api-key-env", "BENCH_KEY"],
            tmp / "out-key",
            env=env,
        )
        stats = server.stats()
    leaked = secret in run.stdout + run.stderr or any(
        secret.encode() in p.read_bytes() for p in run.out.rglob("*") if p.is_file()
    )
    sent = requests_seen(stats)
    passed = run.exit_code == 3 and run.seconds < 5 and sent <= 32 and not leaked
    print(
        f"[{verdict(passed)}] wrong key, 1000 rows, 32 in flight: exit {run.exit_code} in "
        f"{run.seconds:.2f}s (need < 5 s), {sent} requests sent (need <= 32), "
        f"key in output: {'YES' if leaked else 'no'}"
    )
    return passed


def scenario_failover(tmp: Path) -> bool:
    rows = write_prompts(tmp / "rows.jsonl", ROWS)
    with sim_server() as server:
        dead = "http://127.0.0.1:9/v1"  # discard port: nothing listens
        run = run_cli(
            [str(rows), "--base-url", dead, "--base-url", server.url, "--model", "gpt-5.5"],
            tmp / "out-failover",
        )
        stats = server.stats()
    results = run.rows()
    ok = sum(1 for r in results if r["status"] == "ok")
    on_fallback = sum(1 for r in results if r["base_url"] == server.url)
    passed = run.exit_code == 0 and ok == ROWS
    print(
        f"[{verdict(passed)}] unreachable primary + healthy fallback: {ok}/{ROWS} ok in "
        f"{run.run_seconds or run.seconds:.1f}s, {on_fallback} answered by the fallback, "
        f"server saw {requests_seen(stats)} requests"
    )
    return passed


SCENARIOS = {
    "rpm": lambda tmp: scenario_rate(tmp, with_rpm=True),
    "learn": lambda tmp: scenario_rate(tmp, with_rpm=False),
    "learn-blind": lambda tmp: scenario_rate(tmp, with_rpm=False, headers=False),
    "faults": scenario_faults,
    "key": scenario_wrong_key,
    "failover": scenario_failover,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=sorted(SCENARIOS), action="append")
    args = parser.parse_args()
    results = {}
    for name in args.only or list(SCENARIOS):
        with tempfile.TemporaryDirectory() as tmp:
            results[name] = SCENARIOS[name](Path(tmp))
    print(json.dumps({k: verdict(v) for k, v in results.items()}))
    raise SystemExit(0 if all(results.values()) else 1)


__all__ = ["Server", "main"]

if __name__ == "__main__":
    main()
