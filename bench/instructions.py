"""CPU per request counted in instructions, which a slow or busy machine cannot change.

    python -m bench.instructions                # raw loop (asyncio, uvloop), pipeline: ~4 min
    python -m bench.instructions --rows 500,2500 --loops raw,raw-uvloop,pipeline,openai

``bench.throughput`` times CPU in seconds, and on a small shared machine those move by
a quarter between runs minutes apart: another tenant, the CPU's clock, and how hard
each loop drives the simulator (a raw loop that saturates it gets its answers in
bunches and pays less per answer) all change the figure. This bench counts the
instructions each client executes instead, under valgrind's cachegrind (no cache
simulation), for two run sizes, and reports the difference per extra request: the
marginal instructions per request. Start-up, imports, one-off costs (pyarrow's
import of pandas on the first Parquet part) and exit cancel out between the two
sizes, so what is left is what each request costs, everything on every thread
included (reader, Parquet, journal, fsync).

Under valgrind a client runs some 50 times slower, so the simulator (not under
valgrind, in its own process) is never the bottleneck, for either loop: both are
measured as what they are on a slow box, client-bound. Counts repeat whatever else
the machine does, to ~0.5% for the raw loop and ~2.5% for the pipeline (whose threads
interleave differently from run to run), so a change of a few percent shows, which the
seconds-based bench cannot separate from noise. An instruction is not a second
(cache misses and branches differ), and cachegrind counts only the process's own
instructions, not the kernel's work for its system calls (socket and file writes:
about a tenth of either loop's CPU, measured by ``/usr/bin/time``, slightly more for
the pipeline, which journals). So the seconds-based targets stay in
``bench.throughput``; this bench says whether a change did less work.

The loops are those of ``bench.throughput``: the raw aiohttp loop and the openai SDK
loop run in a child process (``--child``), the pipeline as ``python -m pipeline run``,
each against one ``pipeline sim`` on loopback with the same rows and in-flight cap.
The target (issue 17) is against the raw loop as a plain script runs it, on Python's
asyncio loop; ``pipeline run`` runs on uvloop where it is installed, so the same raw
loop on uvloop (``raw-uvloop``) is counted too and its ratio printed beside: it says
how much of the gap is the event loop and how much is the pipeline's own work.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.common import verdict, write_prompts
from bench.throughput import (
    IN_PROCESS,
    LOOPS,
    PROMPT_CHARS,
    bodies,
    machine,
    pipeline_args,
    sim_servers,
    warm_up,
)

TARGET = 1.5  # issue 17: CPU per request at most 1.5x the raw loop's
RAW = "raw aiohttp"
RAW_UVLOOP = "raw aiohttp on uvloop"
# The loops this bench counts: bench.throughput's, and its raw loop on uvloop.
COUNTED = {**LOOPS, "raw-uvloop": RAW_UVLOOP}
CONCURRENCY = 128  # bench.throughput's zero case
CHILD_TIMEOUT = 1800.0  # seconds one run under valgrind may take
_REFS = re.compile(r"I\s+refs:\s+([\d,]+)")


@dataclass(frozen=True)
class Count:
    loop: str
    rows: int
    instructions: int


def valgrind() -> str | None:
    return shutil.which("valgrind")


def counted(cmd: list[str], *, cwd: Path | None = None) -> int:
    """Instructions ``cmd`` executed (every thread), by cachegrind without cache simulation."""
    tool = valgrind() or "valgrind"
    full = [tool, "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null", *cmd]
    try:
        done = subprocess.run(
            full, capture_output=True, text=True, timeout=CHILD_TIMEOUT, cwd=cwd, check=False
        )
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{' '.join(cmd[:4])}... took over {CHILD_TIMEOUT:g} s") from None
    found = _REFS.search(done.stderr)
    if done.returncode != 0 or found is None:
        tail = "\n".join(done.stderr.strip().splitlines()[-5:])
        raise RuntimeError(f"{' '.join(cmd[:4])}... exited {done.returncode}:\n{tail}")
    return int(found.group(1).replace(",", ""))


def count_loop(name: str, url: str, rows: int, rows_file: Path, out: Path) -> Count:
    if name == "pipeline":
        shutil.rmtree(out, ignore_errors=True)
        args = pipeline_args(rows_file, url, out, CONCURRENCY)
        cmd = [sys.executable, "-m", "pipeline", *args]
    else:
        cmd = [sys.executable, "-m", "bench.instructions", "--child", name, url, str(rows)]
    return Count(name, rows, counted(cmd, cwd=Path(__file__).resolve().parents[1]))


def child(name: str, url: str, rows: int) -> None:
    """One in-process loop of ``bench.throughput`` over ``rows`` bodies (run under valgrind),
    on uvloop for ``RAW_UVLOOP``, on asyncio's own loop otherwise."""
    uvloop = name == RAW_UVLOOP
    client = IN_PROCESS[RAW if uvloop else name]

    async def loop() -> int:
        return await client(url, bodies(rows), CONCURRENCY)

    if uvloop:
        import uvloop as uv

        with asyncio.Runner(loop_factory=uv.new_event_loop) as runner:
            ok = runner.run(loop())
    else:
        ok = asyncio.run(loop())
    if ok != rows:
        raise SystemExit(f"{name}: {ok}/{rows} ok")


def marginal(small: Count, large: Count) -> float:
    """Instructions per request between two run sizes (start-up and one-off costs cancel)."""
    return (large.instructions - small.instructions) / (large.rows - small.rows)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        child(argv[1], argv[2], int(argv[3]))
        return
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--rows", default="500,2500", help="the two run sizes, small,large")
    parser.add_argument(
        "--loops",
        default="raw,raw-uvloop,pipeline",
        help="subset of raw,raw-uvloop,openai,pipeline",
    )
    args = parser.parse_args(argv)
    small_rows, large_rows = (int(n) for n in args.rows.split(","))
    if not 0 < small_rows < large_rows:
        parser.error("--rows: two sizes, the first smaller")
    try:
        loops = [COUNTED[n.strip()] for n in args.loops.split(",") if n.strip()]
    except KeyError as exc:
        parser.error(f"unknown loop {exc}; choose from {', '.join(COUNTED)}")
    if valgrind() is None:
        parser.error("valgrind is not installed (Debian: apt-get install valgrind)")
    if "openai SDK" in loops and importlib.util.find_spec("openai") is None:
        print("openai is not installed (pip install -e '.[bench]'): skipping that loop")
        loops.remove("openai SDK")
    per_request: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-instructions-") as tmp:
        rows_file = {
            n: write_prompts(Path(tmp) / f"rows-{n}.jsonl", n, prompt_chars=PROMPT_CHARS)
            for n in (small_rows, large_rows)
        }
        print(
            f"== instructions per request: {small_rows:,} and {large_rows:,} rows, "
            f"{CONCURRENCY} in flight, 0 ms latency, under cachegrind"
        )
        with sim_servers(0.0) as server:
            warm_up(server)
            for name in loops:
                small, large = (
                    count_loop(name, server.url, n, rows_file[n], Path(tmp) / "out")
                    for n in (small_rows, large_rows)
                )
                per_request[name] = marginal(small, large)
                print(
                    f"   {name:<21} {small.instructions / 1e9:7.3f} G at {small.rows:,} rows, "
                    f"{large.instructions / 1e9:7.3f} G at {large.rows:,}: "
                    f"{per_request[name] / 1e3:,.0f} k instructions per request",
                    flush=True,
                )
    raw = per_request.get(RAW)
    failed = False
    if raw:
        for name, value in per_request.items():
            if name == RAW:
                continue
            ratio = value / raw
            if name == "pipeline":
                ok = ratio <= TARGET
                failed |= not ok
                print(
                    f"[{verdict(ok)}] pipeline (its default loop) / raw aiohttp (asyncio) "
                    f"instructions per request = {ratio:.2f} (need <= {TARGET:.2f})"
                )
            else:
                print(f"[INFO] {name} / raw aiohttp instructions per request = {ratio:.2f}")
    if "pipeline" in per_request and RAW_UVLOOP in per_request:
        ratio = per_request["pipeline"] / per_request[RAW_UVLOOP]
        print(f"[INFO] pipeline / raw aiohttp, both on uvloop = {ratio:.2f}")
    print(f"  machine: {machine()}")
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
