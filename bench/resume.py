"""Resume at scale (issue 4): a 1M-row input of which 990k rows are already done.

    python -m bench.resume                       # 1M rows, 990k done, the last 10k pending
    python -m bench.resume --pending scattered   # every 100th row pending instead
    python -m bench.resume --workdir /tmp/rb     # keep (and reuse) the built dataset

The dataset is what a run that died at 99% leaves behind: the input file, and Parquet
parts (``OUT/results/<run_id>/part-*.parquet``, 100k rows each, every column of the
real schema filled) holding an ``ok`` row for each done id. Then ``pipeline run``
resumes it against ``pipeline sim`` in another process, and the benchmark reports:

- **first request**: seconds from starting the process until the server sees its first
  chat request (the target is under 10 s). With the pending rows at the end of the
  file (the usual case after a crash) this includes reading past the 990k done rows.
- **wall**: the whole command, sending the 10k pending rows included.
- **peak RSS** of the run process (the kernel's high-water mark, ``VmHWM``), and
  the same for a run of just the 10k pending rows on an empty folder: the difference
  is what resuming over 990k done rows costs in memory.
- **load_outcomes**: the resume index alone, built in this process (time, memory),
  next to a plain Python ``set`` of the same ids.

It also checks the outcome: the server billed exactly the pending rows and the
results hold every id ``ok`` exactly once.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
import pyarrow.parquet as pq

if not __package__:  # run as ``python bench/resume.py``: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Server, sim_server, verdict  # noqa: E402
from pipeline.schema import results_table  # noqa: E402

PART_ROWS = 100_000
RUN_ID = "20260101T000000Z-bench0"
FIRST_REQUEST_TARGET = 10.0  # seconds, from issue 4


def is_pending(i: int, rows: int, done: int, layout: str) -> bool:
    if layout == "tail":
        return i >= done
    step = rows // (rows - done)  # "scattered": every step-th row is pending
    return i % step == step - 1


def build(work: Path, rows: int, done: int, layout: str) -> tuple[Path, Path, int]:
    """Write the input and the results of the earlier run (reused when already built)."""
    src, out = work / "rows.jsonl", work / "out"
    marker = work / "built.json"
    spec = {"rows": rows, "done": done, "layout": layout, "part_rows": PART_ROWS}
    if marker.exists() and json.loads(marker.read_text()) == spec:
        pending = sum(1 for i in range(rows) if is_pending(i, rows, done, layout))
        return src, out, pending
    started = time.monotonic()
    work.mkdir(parents=True, exist_ok=True)
    filler = "lorem ipsum dolor sit amet " * 3
    with open(src, "w", encoding="utf-8") as fh:
        for i in range(rows):
            fh.write(json.dumps({"id": f"r{i}", "prompt": f"Row {i}: {filler}"}) + "\n")
    now = datetime.now(UTC)
    parts = out / "results" / RUN_ID
    parts.mkdir(parents=True, exist_ok=True)
    batch: list[dict[str, Any]] = []
    seq = pending = 0

    def flush() -> None:
        nonlocal seq, batch
        seq += 1
        pq.write_table(results_table(batch), parts / f"part-{seq:05d}.parquet", compression="zstd")
        batch = []

    for i in range(rows):
        if is_pending(i, rows, done, layout):
            pending += 1
            continue
        batch.append(_ok_row(i, now))
        if len(batch) >= PART_ROWS:
            flush()
    if batch:
        flush()
    marker.write_text(json.dumps(spec))
    print(
        f"built {rows:,} input rows and {rows - pending:,} ok results in "
        f"{time.monotonic() - started:.1f}s ({work})",
        file=sys.stderr,
    )
    return src, out, pending


def _ok_row(i: int, now: datetime) -> dict[str, Any]:
    """A result row as the runner writes it, so parts are as wide as real ones."""
    return {
        "run_id": RUN_ID,
        "id": f"r{i}",
        "status": "ok",
        "provider": "custom",
        "base_url": "http://127.0.0.1:8080/v1",
        "model": "gpt-5.5",
        "response_model": "gpt-5.5",
        "response_id": f"chatcmpl-bench{i:010d}",
        "finish_reason": "stop",
        "content": f"A short answer about row {i}.",
        "prompt_tokens": 30,
        "completion_tokens": 12,
        "total_tokens": 42,
        "cached_tokens": 0,
        "reasoning_tokens": 0,
        "attempts": 1,
        "http_status": 200,
        "latency_ms": 50.0,
        "started_at": now,
        "finished_at": now,
        "request_hash": f"{i:064x}",
        "source_file": "rows.jsonl",
        "source_line": i + 1,
    }


def measure_load(out: Path) -> None:
    """``load_outcomes`` alone, in this process, next to a plain ``set`` of the same ids."""
    from pipeline.resume import load_outcomes, result_parts

    gc.collect()
    before = _rss_mb()
    started = time.monotonic()
    outcomes = load_outcomes(out)
    seconds = time.monotonic() - started
    grown = _rss_mb() - before
    nbytes = getattr(outcomes.ok, "nbytes", None)  # an older resume.py kept a plain set
    size = "" if nbytes is None else f"index {nbytes / 2**20:.0f} MB for "
    print(
        f"load_outcomes alone: {seconds:.2f}s, +{grown:.0f} MB RSS "
        f"({size}{len(outcomes.ok):,} ok ids)"
    )
    del outcomes
    gc.collect()
    before = _rss_mb()
    started = time.monotonic()
    plain: set[str] = set()
    for part in result_parts(out):
        plain.update(pq.read_table(part, columns=["id"]).column("id").to_pylist())
    print(
        f"  for comparison, a Python set of the same ids: {time.monotonic() - started:.2f}s, "
        f"+{_rss_mb() - before:.0f} MB RSS"
    )
    del plain
    gc.collect()


def _rss_mb() -> float:
    rss: int = psutil.Process().memory_info().rss
    return rss / 2**20


def _peak_rss_mb(pid: int) -> float | None:
    """The kernel's high-water mark of a live process's RSS (``VmHWM``), in MB.

    Not ``ru_maxrss`` from ``wait4``: for a child started with (v)fork + exec, Linux
    folds the parent's own peak into it, which here would be the benchmark's.
    """
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class Probe:
    """Counts chat requests on the server; ``/sim/stats`` calls count as requests too."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.base = self._requests()
        self.calls = 0

    def _requests(self) -> int:
        return int(self.server.stats()["stats"].get("requests", 0))

    def chat_requests(self) -> int:
        self.calls += 1
        return self._requests() - self.base - self.calls


def timed_run(src: Path, out: Path, server: Server) -> dict[str, Any]:
    """Run ``pipeline run`` to the end: seconds to first request, wall, peak RSS, exit code.

    The peak is the last ``VmHWM`` read before the process exits (polled every 10 ms
    until the first request, then every 50 ms): a high-water mark, so only a peak in
    the very last poll interval could be missed.
    """
    cmd = [
        sys.executable, "-m", "pipeline", "run", str(src), "--base-url", server.url,
        "--model", "gpt-5.5", "--concurrency", "32", "--out", str(out), "--quiet",
    ]  # fmt: skip
    probe = Probe(server)
    # Output goes to files: a pipe nobody reads during the run could fill and block it.
    with tempfile.TemporaryFile() as out_log, tempfile.TemporaryFile() as err_log:
        started = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=out_log, stderr=err_log)
        first: float | None = None
        peak = peak_at_first = 0.0
        status = None
        try:
            while True:
                hwm = _peak_rss_mb(proc.pid)
                pid, status, _ = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                status = None
                if hwm is not None:
                    peak = max(peak, hwm)
                if time.monotonic() - started > 1800:
                    raise RuntimeError("run did not finish in 30 minutes")
                if first is None and probe.chat_requests() > 0:
                    first = time.monotonic() - started
                    peak_at_first = peak
                time.sleep(0.01 if first is None else 0.05)
        finally:
            if status is None:
                proc.kill()
                proc.wait()
        wall = time.monotonic() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        stdout, stderr = _read_back(out_log), _read_back(err_log)
    return {
        "exit_code": proc.returncode,
        "first_request": first,
        "wall": wall,
        "peak_rss_mb": peak,
        "peak_rss_at_first_request_mb": peak_at_first,
        "stdout": stdout.strip(),
        "stderr": stderr.strip()[-2000:],
    }


def _read_back(log: Any) -> str:
    log.seek(0)
    text: str = log.read().decode(errors="replace")
    return text


def check_results(out: Path, rows: int) -> tuple[int, int]:
    """(ids ok, ids with more than one ok row) over every part."""
    seen: set[str] = set()
    twice = 0
    for part in sorted((out / "results").rglob("*.parquet")):
        table = pq.read_table(part, columns=["id", "status"])
        for row_id, status in zip(
            table.column("id").to_pylist(), table.column("status").to_pylist(), strict=True
        ):
            if status != "ok":
                continue
            if row_id in seen:
                twice += 1
            seen.add(row_id)
    return len(seen), twice


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--done", type=int, default=990_000)
    parser.add_argument("--pending", choices=["tail", "scattered"], default="tail")
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--workdir", type=Path, help="build (or reuse) the dataset here")
    parser.add_argument("--no-baseline", action="store_true", help="skip the 10k-only run")
    parser.add_argument("--measure-load", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure_load:  # in a fresh process, so nothing built before skews its RSS
        measure_load(args.measure_load)
        return 0

    with tempfile.TemporaryDirectory(prefix="bench-resume-") as tmp:
        work = args.workdir or Path(tmp)
        src, done_out, pending = build(work, args.rows, args.done, args.pending)
        # Each run gets a fresh copy of the earlier results, so the dataset is reusable.
        out = work / "run-out"
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(done_out, out)

        root = Path(__file__).resolve().parent.parent
        loader = [sys.executable, "-m", "bench.resume", "--measure-load", str(out)]
        subprocess.run(loader, check=True, cwd=root)

        with sim_server("--latency-ms", str(args.latency_ms)) as server:
            billed_before = int(server.stats()["billed"])
            run = timed_run(src, out, server)
            billed = int(server.stats()["billed"]) - billed_before
        ok_ids, twice = check_results(out, args.rows)

        first = run["first_request"]
        first_txt = "never" if first is None else f"{first:.2f}s"
        passed = (
            run["exit_code"] == 0
            and first is not None
            and first < FIRST_REQUEST_TARGET
            and billed == pending
            and ok_ids == args.rows
            and twice == 0
        )
        print(
            f"[{verdict(passed)}] resume {args.rows:,} rows, {args.rows - pending:,} done, "
            f"{pending:,} pending ({args.pending}): first request after {first_txt} "
            f"(need < {FIRST_REQUEST_TARGET:.0f}s), wall {run['wall']:.1f}s, "
            f"peak RSS {run['peak_rss_mb']:.0f} MB "
            f"({run['peak_rss_at_first_request_mb']:.0f} MB by the first request); "
            f"exit {run['exit_code']}, billed {billed:,} (need {pending:,}), "
            f"{ok_ids:,} ids ok, {twice} twice"
        )
        if run["exit_code"] != 0:
            print(run["stderr"], file=sys.stderr)

        if not args.no_baseline:
            # The same pending rows alone, on an empty folder: what a run costs anyway.
            only = work / "pending.jsonl"
            with open(src, encoding="utf-8") as fh, open(only, "w", encoding="utf-8") as dst:
                for i, line in enumerate(fh):
                    if is_pending(i, args.rows, args.done, args.pending):
                        dst.write(line)
            base_out = work / "baseline-out"
            shutil.rmtree(base_out, ignore_errors=True)
            with sim_server("--latency-ms", str(args.latency_ms)) as server:
                base = timed_run(only, base_out, server)
            base_first = base["first_request"] or float("nan")
            print(
                f"baseline: the {pending:,} pending rows alone on an empty --out: first "
                f"request after {base_first:.2f}s, wall {base['wall']:.1f}s, "
                f"peak RSS {base['peak_rss_mb']:.0f} MB -> resuming over "
                f"{args.rows - pending:,} done rows costs "
                f"+{run['peak_rss_mb'] - base['peak_rss_mb']:.0f} MB"
            )
        return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
