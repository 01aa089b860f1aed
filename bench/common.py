"""Helpers the benchmarks share: a simulator server in its own process, inputs, runs.

The server runs in a separate process (as a real gateway would be), on loopback, and
stops when the benchmark ends. Every figure a benchmark prints comes from the server's
own counters (``GET /sim/stats``) or from the results the pipeline wrote.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
import pyarrow.parquet as pq


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    url: str  # base URL, ending in /v1
    process: subprocess.Popen[bytes]

    def stats(self) -> dict[str, Any]:
        root = self.url.removesuffix("/v1")
        response = httpx.get(f"{root}/sim/stats", timeout=30)
        response.raise_for_status()
        data: dict[str, Any] = response.json()
        return data


@contextlib.contextmanager
def sim_server(*args: str, env: dict[str, str] | None = None) -> Iterator[Server]:
    """``pipeline sim`` on a free loopback port, stopped (SIGINT) on exit."""
    port = free_port()
    cmd = [sys.executable, "-m", "pipeline", "sim", "--port", str(port), *args]
    proc = subprocess.Popen(
        cmd, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env={**os.environ, **(env or {})}
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, [proc], timeout=20)
        yield Server(f"{url}/v1", proc)
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        if proc.poll() is None:
            proc.kill()


def rate_limited(stats: dict[str, object]) -> int:
    counts = stats["stats"]
    assert isinstance(counts, dict)
    return int(counts.get("429", 0))


def requests_seen(stats: dict[str, object]) -> int:
    counts = stats["stats"]
    assert isinstance(counts, dict)
    return int(counts.get("requests", 0))


def wait_healthy(root: str, procs: list[subprocess.Popen[bytes]], timeout: float) -> None:
    """Wait until the simulator at ``root`` answers /health; fail if it died or hung."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{root}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            raise RuntimeError("simulator did not start")
        time.sleep(0.05)


def write_prompts(path: Path, n: int, *, prompt_chars: int = 80, model: str | None = None) -> Path:
    filler = ("lorem ipsum dolor sit amet " * (prompt_chars // 27 + 1))[:prompt_chars]
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            row: dict[str, Any] = {"id": f"r{i}", "prompt": f"Row {i}: {filler}"}
            if model:
                row["model"] = model
            fh.write(json.dumps(row) + "\n")
    return path


@dataclass
class CliRun:
    exit_code: int
    seconds: float  # wall time of the whole command
    run_seconds: float | None  # the run itself, from its manifest
    stdout: str
    stderr: str
    out: Path

    def rows(self) -> list[dict[str, Any]]:
        parts = sorted((self.out / "results").rglob("*.parquet"))
        if not parts:
            return []
        tables = [pq.read_table(p) for p in parts]
        return pa.concat_tables(tables, promote_options="permissive").to_pylist()


def run_cli(args: list[str], out: Path, env: dict[str, str] | None = None) -> CliRun:
    cmd = [sys.executable, "-m", "pipeline", "run", *args, "--out", str(out), "--quiet"]
    start = time.monotonic()
    done = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=1800
    )
    seconds = time.monotonic() - start
    manifests = sorted((out / "runs").glob("*.json"))
    run_seconds = json.loads(manifests[-1].read_text()).get("wall_seconds") if manifests else None
    return CliRun(done.returncode, seconds, run_seconds, done.stdout, done.stderr, out)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"
