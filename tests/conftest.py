"""Shared fixtures: a fake clock, the simulator in process and over HTTP, and a run helper.

No test touches the network or sleeps on the wall clock: time is a FakeClock that
the limiter, the retry policy and the simulator all share.
"""

from __future__ import annotations

import asyncio
import heapq
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import RunOptions
from pipeline.execute import execute
from pipeline.runner import RunResult
from pipeline.sim import SimConfig, Simulator, sim_transport
from tests.realproc import Processes


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark ``slow`` every test that starts real processes (the ``procs`` fixture) or a
    Ray instance: over half of the suite's time. ``pytest -m "not slow"`` is the quick
    loop; CI runs everything."""
    for item in items:
        real = "procs" in getattr(item, "fixturenames", ())
        if real or item.path.name in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)


SLOW_MODULES = frozenset({"test_ray.py"})  # every test there starts or joins Ray


class FakeClock:
    """Virtual time with an autojump, like trio's MockClock: sleepers wait on a heap of
    deadlines, and whenever every task is blocked the clock jumps to the earliest one.

    So 32 tasks each waiting 50 ms cost 50 ms of virtual time, as on a real clock, and
    rates measured in virtual time are real rates. Outside an event loop (plain unit
    tests) ``sleep`` simply advances the clock.
    """

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self._heap: list[tuple[float, int, asyncio.Event]] = []
        self._seq = 0
        self._driver: asyncio.Task[None] | None = None

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        event = asyncio.Event()
        heapq.heappush(self._heap, (self.now + seconds, self._seq, event))
        self._seq += 1
        if self._driver is None or self._driver.done():
            self._driver = asyncio.get_running_loop().create_task(self._drive())
        await event.wait()

    async def _drive(self) -> None:
        loop = asyncio.get_running_loop()
        idle_rounds = 0
        while self._heap:
            await asyncio.sleep(0)
            if loop._ready:  # type: ignore[attr-defined]  # someone else can still run
                idle_rounds = 0
                continue
            idle_rounds += 1
            if idle_rounds < 3:
                continue
            deadline = self._heap[0][0]
            self.now = max(self.now, deadline)
            while self._heap and self._heap[0][0] <= self.now:
                heapq.heappop(self._heap)[2].set()
            idle_rounds = 0


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(autouse=True)
def _no_keys_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never see a developer's real keys."""
    for var in ("OPENAI_API_KEY", "EVOLINK_API_KEY", "STARMAGIC_API_KEY", "MODELSTREAM_API_KEY"):
        monkeypatch.delenv(var, raising=False)


@dataclass
class SimRun:
    result: RunResult
    sim: Simulator
    out: Path

    def rows(self) -> list[dict[str, Any]]:
        return read_results(self.out)


def read_results(out: Path) -> list[dict[str, Any]]:
    parts = sorted((out / "results").rglob("*.parquet"))
    if not parts:
        return []
    tables = [pq.read_table(p) for p in parts]
    return pa.concat_tables(tables, promote_options="permissive").to_pylist()


def run_with_sim(
    sources: list[Path | str],
    out: Path,
    *,
    sim: Simulator | None = None,
    clock: FakeClock | None = None,
    **options: Any,
) -> SimRun:
    """Run the pipeline in process against a simulator, on virtual time when given a clock."""
    clock = clock or FakeClock()
    sim = sim or Simulator(SimConfig(), clock=clock, sleep=clock.sleep)
    options.setdefault("model", "gpt-5.5")
    options.setdefault("quiet", True)
    opts = RunOptions(sources=[str(s) for s in sources], out=out, **options)
    result = execute(opts, transport=sim_transport(sim), sleep=clock.sleep, clock=clock)
    return SimRun(result, sim, out)


def invoke(*args: str) -> tuple[int, str, str]:
    """Run the CLI in process: (exit code, stdout, stderr)."""
    from click.testing import CliRunner

    from pipeline.cli import cli

    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def write_jsonl(path: Path, rows: list[dict[str, Any] | str]) -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


def prompts(n: int, prefix: str = "row") -> list[dict[str, Any]]:
    return [
        {"id": f"{prefix}-{i}", "prompt": f"Say something about {prefix} {i}"} for i in range(n)
    ]


@pytest.fixture
def sim_server() -> Iterator[tuple[Simulator, str]]:
    """The simulator served over real HTTP on 127.0.0.1, from a background thread."""
    from pipeline.sim import start_server

    sim = Simulator(SimConfig())
    ready = threading.Event()
    state: dict[str, Any] = {}

    def serve() -> None:
        loop = asyncio.new_event_loop()
        state["loop"] = loop

        async def main() -> None:
            runner, url = await start_server(sim, "127.0.0.1", 0)
            state["url"], state["stop"] = url, asyncio.Event()
            ready.set()
            await state["stop"].wait()
            await runner.cleanup()

        loop.run_until_complete(main())
        loop.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert ready.wait(10), "simulator server did not start"
    yield sim, state["url"]
    state["loop"].call_soon_threadsafe(state["stop"].set)
    thread.join(10)


@pytest.fixture
def procs() -> Iterator[Processes]:
    """Processes a test starts; all killed and reaped when it ends."""
    started = Processes()
    try:
        yield started
    finally:
        started.close()
