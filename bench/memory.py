"""Does memory stay flat on a big input? Issue 8's memory figure.

    python -m bench.memory                       # 200k rows x ~1.5 KB prompts, --limit 2000
    python -m bench.memory --row-group-rows 10000
    python -m bench.memory --rows 50000 --limit 500 --budget-mb 250
    python -m bench.memory --answer-kb 100 --limit 8000 --budget-mb 600  # long answers

Builds a Parquet file of ``--rows`` rows, each with an id, a ~1.5 KB prompt of
varied text and a small metadata column, written by ``pyarrow.parquet.write_table``
with its defaults (so 200k rows are one row group, as a file written by pandas or
DuckDB often is; ``--row-group-rows`` writes smaller ones). It then runs ``pipeline
run FILE --limit N`` against a ``pipeline sim`` server in another process and samples
the run's resident set with psutil, taking the kernel's high-water mark for the child
too (``wait4``'s ``ru_maxrss``), so a spike between two samples still counts.

For scale it also measures the floor: a process that only imports what a run
imports (pyarrow, aiohttp, httpx, duckdb, ...).
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from bench.common import verdict
from bench.throughput import (
    MODEL,
    machine,
    manifest_seconds,
    monitored_run,
    ok_rows,
    pipeline_args,
    sim_servers,
)

_VOCABULARY = (
    "label review product customer shipping quality price return battery screen "
    "fabric color size fit comfort delivery package broken excellent poor average "
    "recommend warranty support refund kitchen sports electronics office garden "
    "durable cheap expensive fast slow loud quiet bright dim heavy light soft hard"
)
WORDS = _VOCABULARY.split(" ")

# What ``pipeline run`` imports before it reads a row: the floor under any figure.
IMPORT_FLOOR = (
    "import pipeline.cli, pipeline.execute, pipeline.runner, pipeline.source, "
    "pipeline.sink, pipeline.client, pyarrow.parquet, aiohttp, httpx_aiohttp"
)


def build_input(
    path: Path, rows: int, prompt_bytes: int, row_group_rows: int | None, seed: int = 8
) -> Path:
    """``rows`` rows with distinct ~``prompt_bytes`` prompts, written in one call."""
    rng = random.Random(seed)
    text = " ".join(rng.choice(WORDS) for _ in range(600_000))  # ~4 MB to cut prompts from
    span = len(text) - prompt_bytes
    prompts = []
    for i in range(rows):
        start = rng.randrange(span)
        prompts.append(f"Row {i}: classify this review. {text[start : start + prompt_bytes]}")
    table = pa.table(
        {
            "id": [f"m{i:07d}" for i in range(rows)],
            "prompt": prompts,
            "metadata": [f'{{"batch": {i // 1000}}}' for i in range(rows)],
        }
    )
    pq.write_table(table, path, row_group_size=row_group_rows)
    return path


def timeline(samples: list[tuple[float, float]], points: int = 8) -> str:
    """The largest RSS in each of ``points`` equal slices of the run: flat, or growing
    with the rows done?"""
    if not samples:
        return "no samples"
    end = samples[-1][0]
    picked = []
    for k in range(1, points + 1):
        lo, hi = end * (k - 1) / points, end * k / points
        rss = max((mb for t, mb in samples if lo < t <= hi), default=0.0)
        picked.append(f"{rss:.0f}")
    return " ".join(picked) + f" MB (peak in each eighth of {end:.1f}s)"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--prompt-bytes", type=int, default=1_500)
    parser.add_argument("--limit", type=int, default=2_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--row-group-rows", type=int, help="[default: pyarrow's, one group]")
    parser.add_argument("--budget-mb", type=float, default=250.0)
    parser.add_argument(
        "--answer-kb",
        type=float,
        default=0.0,
        help="pad every answer to this many KB (a reasoning model's long answers)",
    )
    args = parser.parse_args(argv)
    knobs = [f"answer_chars={int(args.answer_kb * 1024)}"] if args.answer_kb > 0 else []

    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp_name:
        tmp = Path(tmp_name)
        started = time.perf_counter()
        source = build_input(tmp / "big.parquet", args.rows, args.prompt_bytes, args.row_group_rows)
        meta = pq.ParquetFile(source).metadata
        print(
            f"input: {args.rows:,} rows, ~{args.prompt_bytes:,} B prompts, "
            f"{meta.num_row_groups} row group(s), {source.stat().st_size / 2**20:.0f} MB on disk, "
            f"~{args.rows * args.prompt_bytes / 2**20:.0f} MB of prompt text "
            f"(built in {time.perf_counter() - started:.1f}s)"
        )
        floor = monitored_run([sys.executable, "-c", IMPORT_FLOOR], interval=0.01)
        print(f"floor: importing what a run imports peaks at {floor.peak_rss_mb:.0f} MB")

        out = tmp / "out"
        if knobs:
            print(f"answers: padded to {args.answer_kb:g} KB each")
        with sim_servers(0.0, knobs=knobs) as server:
            cmd = [sys.executable, "-m", "pipeline"]
            cmd += pipeline_args(source, server.url, out, args.concurrency)
            cmd += ["--limit", str(args.limit)]
            run = monitored_run(cmd, interval=0.01)
        ok = ok_rows(out)
        seconds = manifest_seconds(out)
        print(
            f"run:   pipeline run big.parquet --limit {args.limit:,} --model {MODEL}: "
            f"exit {run.exit_code}, {ok:,} rows ok, run {seconds or 0:.2f}s "
            f"(whole process {run.seconds:.2f}s)"
        )
        if run.exit_code != 0:
            print("       " + run.stderr.strip()[-500:])
        print(
            f"       peak RSS {run.peak_rss_mb:.0f} MB (sampled {run.sampled_rss_mb:.0f} MB, "
            f"kernel high-water mark {run.kernel_peak_mb:.0f} MB)"
        )
        print(f"       RSS over the run: {timeline(run.samples)}")
    passed = run.exit_code == 0 and ok == args.limit and run.peak_rss_mb <= args.budget_mb
    print(
        f"[{verdict(passed)}] peak RSS {run.peak_rss_mb:.0f} MB (need <= {args.budget_mb:.0f} MB)"
        f", {ok:,}/{args.limit:,} rows ok"
    )
    print(f"  machine: {machine()}")
    raise SystemExit(0 if passed else 1)


if __name__ == "__main__":
    main()
