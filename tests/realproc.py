"""Real processes for the tests that need them: ``pipeline sim`` on a free loopback
port, runs started as a user would, and the server's own ledger to check them by.

Every wait has a deadline and every process started is killed at the end (the
``procs`` fixture), so a hang fails a test instead of stalling the suite.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
import pyarrow.parquet as pq


@dataclass
class Server:
    """A ``pipeline sim`` process and its base URL (ending in /v1).

    The server's ``requests`` counter also counts our own /health and /sim/stats
    calls, so the server object counts those (``probes``) to tell chat requests apart.
    """

    url: str
    process: subprocess.Popen[bytes]
    probes: int = 0

    @property
    def root(self) -> str:
        return self.url.removesuffix("/v1")

    def healthy(self) -> bool:
        try:
            response = httpx.get(f"{self.root}/health", timeout=1)
        except httpx.HTTPError:
            return False
        self.probes += 1
        return response.status_code == 200

    def stats(self) -> dict[str, Any]:
        response = httpx.get(f"{self.root}/sim/stats", timeout=10)
        self.probes += 1
        response.raise_for_status()
        data: dict[str, Any] = response.json()
        return data

    def chat_requests(self) -> int:
        """Chat requests received so far, answered or not (the probes are not chat)."""
        return int(self.stats()["stats"].get("requests", 0)) - self.probes

    def billed(self) -> int:
        return int(self.stats()["billed"])

    def billed_tokens(self) -> tuple[int, int]:
        """(prompt, completion) tokens over every answer the server billed."""
        usage = self.stats()["usage_by_response_id"].values()
        return sum(u["prompt_tokens"] for u in usage), sum(u["completion_tokens"] for u in usage)

    def settled_billed(self, quiet_for: float = 0.3, timeout: float = 10.0) -> int:
        """The billed count once it stops moving.

        A killed client's requests are still being answered (and billed) by the server
        for one latency after the kill; counting before they land would undercount.
        """
        deadline = time.monotonic() + timeout
        last, since = self.billed(), time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.05)
            now = self.billed()
            if now != last:
                last, since = now, time.monotonic()
            elif time.monotonic() - since >= quiet_for:
                return now
        raise AssertionError("the server's billed count did not settle")


class Processes:
    """Every process a test starts, killed (and reaped) when the test ends, pass or fail."""

    def __init__(self) -> None:
        self._started: list[subprocess.Popen[bytes]] = []

    def start(self, cmd: list[str]) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(), cwd=_repo_root()
        )
        self._started.append(proc)
        return proc

    def close(self) -> None:
        for proc in self._started:
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.communicate(timeout=10)


def _repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def _env() -> dict[str, str]:
    """The child's environment: no proxies (loopback only) and no real keys."""
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    for var in ("OPENAI_API_KEY", "EVOLINK_API_KEY", "STARMAGIC_API_KEY", "MODELSTREAM_API_KEY"):
        env.pop(var, None)
    env["NO_PROXY"] = "127.0.0.1"
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(procs: Processes, *args: str) -> Server:
    """``pipeline sim`` on a free loopback port, once it answers /health (10 s at most)."""
    port = _free_port()
    proc = procs.start([sys.executable, "-m", "pipeline", "sim", "--port", str(port), *args])
    server = Server(f"http://127.0.0.1:{port}/v1", proc)
    wait_for(lambda: server.healthy() or proc.poll() is not None, 30, "simulator start")
    assert proc.poll() is None, "simulator exited at start-up"
    return server


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.02)


def finish(proc: subprocess.Popen[bytes], timeout: float = 60) -> tuple[int, str]:
    """Wait for a run to end; its exit code and stderr (for assertion messages)."""
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err.decode(errors="replace")


def write_rows(path: Path, n: int, prefix: str) -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            fh.write(json.dumps({"id": f"{prefix}-{i}", "prompt": f"Tell me about {prefix} {i}"}))
            fh.write("\n")
    return path


def results(out: Path) -> list[dict[str, Any]]:
    """``run_id, id, status`` of every result row written so far (Parquet parts only)."""
    parts = sorted(p for p in (out / "results").rglob("*.parquet") if not p.name.startswith("."))
    if not parts:
        return []
    tables = [pq.read_table(p, columns=["run_id", "id", "status"]) for p in parts]
    rows: list[dict[str, Any]] = pa.concat_tables(tables).to_pylist()
    return rows


def ok_counts(out: Path) -> collections.Counter[str]:
    return collections.Counter(r["id"] for r in results(out) if r["status"] == "ok")


def assert_every_id_ok_once(out: Path, n: int, prefix: str) -> list[dict[str, Any]]:
    rows = results(out)
    ok = collections.Counter(r["id"] for r in rows if r["status"] == "ok")
    twice = sorted(i for i, c in ok.items() if c > 1)
    assert not twice, f"{len(twice)} ids have two ok rows, e.g. {twice[:5]}"
    assert set(ok) == {f"{prefix}-{i}" for i in range(n)}, f"{n - len(ok)} ids not ok"
    assert all(r["status"] == "ok" for r in rows), "error rows on a fault-free server"
    return rows


def manifest_of(out: Path, pid: int) -> dict[str, Any]:
    for path in (out / "runs").glob("*.json"):
        data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        if data.get("pid") == pid:
            return data
    raise AssertionError(f"no run manifest for pid {pid}")
