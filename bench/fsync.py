"""What fsyncing the journal costs, and which group-commit window to choose (issue 13).

    python -m bench.fsync                       # 20k rows, groups of 32, in ./.bench-fsync
    python -m bench.fsync --rows 50000 --group 8 --dir /mnt/data/tmp

Writes result rows (the size a zero-latency run writes) through ``ResultSink`` the
way the run's writer does: a group of rows, one flush, an fsync when the group
commit says so, a Parquet part every 20,000 rows. Each setting is run on the same
disk, in the same process, best of ``--repeat``:

- ``no fsync``: the journal is only flushed (what issue 4 shipped: safe against
  kill -9, not against a power cut);
- ``every group``: fsync after every flush (the strictest: nothing acknowledged
  unsynced);
- windows of N ms / M rows: group commit, what ``pipeline run`` does.

The figure that matters is rows/s next to what a zero-latency run sustains end to end
(about 2,000-3,000 rows/s on 2 cores): a setting whose sink rate sits far above it
costs the run nothing measurable. Use a folder on the disk OUT lives on; tmpfs
ignores fsync and measures nothing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.throughput import machine
from pipeline.sink import ResultSink, write_part

SETTINGS: list[tuple[str, int, float]] = [  # (name, sync_rows, sync_seconds)
    ("no fsync", 10**12, 1e12),
    ("every group", 1, 0.0),
    ("10 ms / 64 rows", 64, 0.010),
    ("50 ms / 256 rows (default)", 256, 0.050),
    ("200 ms / 1024 rows", 1024, 0.200),
]


def _row(i: int) -> dict[str, Any]:
    now = datetime.now(UTC)
    return {
        "run_id": "bench",
        "id": f"r{i}",
        "status": "ok",
        "provider": "sim",
        "model": "gpt-5.5",
        "content": "lorem ipsum dolor sit amet " * 4,
        "prompt_tokens": 31,
        "completion_tokens": 18,
        "total_tokens": 49,
        "attempts": 1,
        "http_status": 200,
        "latency_ms": 1.2,
        "started_at": now,
        "finished_at": now,
        "request_hash": "0" * 32,
    }


def one_run(folder: Path, rows: int, group: int, sync_rows: int, sync_seconds: float) -> float:
    """Rows per second through the sink with this group commit; fsyncs counted too."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    sink = ResultSink(folder, "bench", sync_rows=sync_rows, sync_seconds=sync_seconds)
    batch = [_row(i) for i in range(group)]
    start = time.perf_counter()
    written = 0
    while written < rows:
        for row in batch:
            sink.write(dict(row))
        written += len(batch)
        sink.flush()
        if sink.sync_due:
            sink.sync()
        if sink.part_due:
            taken = sink.take_part()
            if taken is not None:
                part_rows, part, segment = taken
                ResultSink.sync_segment(segment)
                write_part(part_rows, part)
                sink.part_done(segment)
    sink.close()
    return written / (time.perf_counter() - start)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--group", type=int, default=32, help="rows per writer flush")
    parser.add_argument("--repeat", type=int, default=3, help="runs per setting; best counts")
    parser.add_argument("--dir", type=Path, default=Path(".bench-fsync"), help="scratch folder")
    args = parser.parse_args(argv)
    folder = args.dir / f"fsync-{os.getpid()}"
    print(f"{args.rows:,} rows in groups of {args.group}, in {folder}")
    try:
        for name, sync_rows, sync_seconds in SETTINGS:
            rates = [
                one_run(folder, args.rows, args.group, sync_rows, sync_seconds)
                for _ in range(args.repeat)
            ]
            print(f"  {name:<28} {max(rates):>10,.0f} rows/s (best of {args.repeat})")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"  machine: {machine()}")


if __name__ == "__main__":
    main()
