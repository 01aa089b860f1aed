"""Traffic control end to end, on virtual time: rate limits, failover, progress output."""

from __future__ import annotations

import io
import json
from pathlib import Path

import httpx
import pytest

from pipeline.failover import Endpoints
from pipeline.progress import Progress, Tally
from pipeline.sim import SimConfig, Simulator, sim_transport
from tests.conftest import FakeClock, prompts, read_results, run_with_sim, write_jsonl


@pytest.mark.parametrize("with_rpm", [True, False])
def test_rate_limited_server_is_used_near_its_limit(tmp_path: Path, with_rpm: bool) -> None:
    src = write_jsonl(tmp_path / "rows.jsonl", prompts(400))  # type: ignore[arg-type]
    clock = FakeClock()
    sim = Simulator(SimConfig(rpm_limit=600, latency_ms=50), clock=clock, sleep=clock.sleep)
    start = clock.now
    run = run_with_sim(
        [src], tmp_path / "out", sim=sim, clock=clock, concurrency=32,
        rpm=600 if with_rpm else None,
    )  # fmt: skip
    assert run.result.exit_code == 0
    assert len(run.rows()) == 400
    virtual_seconds = clock.now - start
    per_minute = 400 / virtual_seconds * 60
    limited = sim.stats["429"] / sim.stats["requests"]
    assert per_minute >= 600 * (0.95 if with_rpm else 0.85)
    assert limited <= (0.01 if with_rpm else 0.10)


def test_random_429s_do_not_grind_the_run_down(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "rows.jsonl", prompts(400))  # type: ignore[arg-type]
    clock = FakeClock()
    sim = Simulator(SimConfig(fail_429_rate=0.08, latency_ms=100), clock=clock, sleep=clock.sleep)
    start = clock.now
    run = run_with_sim([src], tmp_path / "out", sim=sim, clock=clock, concurrency=32)
    assert run.result.exit_code == 0
    # 400 rows, 32 in flight, 0.1 s each: ~1.3 s of work; 1 s Retry-After waits on top
    assert clock.now - start < 10


class DeadPrimary(httpx.AsyncBaseTransport):
    """The primary host refuses connections; every other host is the simulator."""

    def __init__(self, sim: Simulator, dead_host: str) -> None:
        self.inner = sim_transport(sim)
        self.dead_host = dead_host
        self.refused = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.host == self.dead_host:
            self.refused += 1
            raise httpx.ConnectError("connection refused", request=request)
        return await self.inner.handle_async_request(request)


def test_unreachable_primary_moves_traffic_to_the_fallback(tmp_path: Path) -> None:
    from pipeline.config import RunOptions
    from pipeline.execute import execute

    src = write_jsonl(tmp_path / "rows.jsonl", prompts(200))  # type: ignore[arg-type]
    clock = FakeClock()
    sim = Simulator(SimConfig(), clock=clock, sleep=clock.sleep)
    transport = DeadPrimary(sim, "primary.invalid")
    opts = RunOptions(
        sources=[str(src)],
        out=tmp_path / "out",
        base_url=["http://primary.invalid/v1", "http://fallback.invalid/v1"],
        model="gpt-5.5",
        quiet=True,
    )
    result = execute(opts, transport=transport, sleep=clock.sleep, clock=clock)
    assert result.exit_code == 0
    rows = read_results(tmp_path / "out")
    assert len(rows) == 200 and all(r["status"] == "ok" for r in rows)
    assert {r["base_url"] for r in rows} == {"http://fallback.invalid/v1"}
    assert transport.refused < 40, "the dead primary kept getting traffic"


def test_primary_is_tried_again_after_it_recovers() -> None:
    clock = FakeClock()
    endpoints = Endpoints(["http://a/v1", "http://b/v1"], clock=clock, base_cooldown=5)
    assert endpoints.pick() == "http://a/v1"
    endpoints.failed("http://a/v1")
    assert endpoints.pick() == "http://a/v1", "one failure is noise"
    endpoints.failed("http://a/v1")
    assert endpoints.pick() == "http://b/v1"
    clock.now += 5.1
    assert endpoints.pick() == "http://a/v1"
    endpoints.succeeded("http://a/v1")
    endpoints.failed("http://a/v1")
    assert endpoints.pick() == "http://a/v1", "a success forgets earlier failures"


def test_everything_benched_still_picks_the_soonest_back() -> None:
    clock = FakeClock()
    endpoints = Endpoints(["http://a/v1", "http://b/v1"], clock=clock, base_cooldown=5)
    for _ in range(3):
        endpoints.failed("http://a/v1")  # benched 10 s
    for _ in range(2):
        endpoints.failed("http://b/v1")  # benched 5 s
    assert endpoints.pick() == "http://b/v1"


class FakeTty(io.StringIO):
    def isatty(self) -> bool:
        return True


def tally() -> Tally:
    t = Tally(total=1000)
    t.status["ok"] = 240
    t.status["error"] = 10
    t.rate_limited = 7
    t.prompt_tokens = 12345
    return t


def test_progress_plain_lines_when_not_a_terminal() -> None:
    clock = FakeClock()
    stream = io.StringIO()
    progress = Progress(tally(), stream=stream, every=10, clock=clock)
    clock.now += 5
    progress.tick()
    assert stream.getvalue() == ""
    clock.now += 5
    progress.tick()
    line = stream.getvalue()
    assert line.endswith("\n") and "\r" not in line
    assert "250/1,000 rows (25.0%)" in line and "ETA" in line and "429s 7" in line
    assert "tokens in 12,345" in line


def test_progress_live_line_on_a_terminal() -> None:
    clock = FakeClock()
    stream = FakeTty()
    progress = Progress(tally(), stream=stream, clock=clock)
    clock.now += 1
    progress.tick()
    assert stream.getvalue().startswith("\r\x1b[2K")


def test_quiet_prints_nothing_but_errors() -> None:
    stream = io.StringIO()
    progress = Progress(tally(), stream=stream, quiet=True, every=0)
    progress.tick(force=True)
    progress.message("routine notice")
    assert stream.getvalue() == ""
    progress.message("stopped", "error")
    assert "error: stopped" in stream.getvalue()


def test_json_log_format_for_log_shippers() -> None:
    stream = io.StringIO()
    Progress(tally(), stream=stream, log_format="json").tick(force=True)
    event = json.loads(stream.getvalue())
    assert event["event"] == "progress" and event["ok"] == 240 and event["rate_limited"] == 7


def test_two_shards_on_one_out_equal_one_run_and_bill_each_row_once(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "rows.jsonl", prompts(300))  # type: ignore[arg-type]
    clock = FakeClock()
    sim = Simulator(SimConfig(), clock=clock, sleep=clock.sleep)
    out = tmp_path / "out"
    first = run_with_sim([src], out, sim=sim, clock=clock, shard="0/2")
    second = run_with_sim([src], out, sim=sim, clock=clock, shard="1/2")
    n0, n1 = first.result.tally.status["ok"], second.result.tally.status["ok"]
    assert n0 + n1 == 300 and 100 < n0 < 200, "a shard split should be roughly even"
    rows = read_results(out)
    assert sorted(r["id"] for r in rows) == sorted(f"row-{i}" for i in range(300))
    assert sim.stats["requests"] == 300
    assert (out / ".lock-shard-0-of-2").exists() and (out / ".lock-shard-1-of-2").exists()
