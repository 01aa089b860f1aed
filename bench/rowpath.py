"""The per-row work around a request, timed alone: parse, build the row, make it storable,
journal it.

``pipeline run`` spends its CPU on the HTTP client, the runner's queues and this: for
every answer, ``wire.parse_completion`` -> ``outcome.ok_row`` -> ``schema.storable`` ->
``ResultSink.write`` (plus a ``flush`` every 8 rows, as the writer does when a few
results wait). This times that exact path in one process for a typical ~450-byte chat
answer, in microseconds of CPU per row, best of several repeats, with the collector
tuned as ``pipeline run`` tunes it; and then each part on its own.

Only public names that have not changed are used, so the same file times an older
checkout too. ``--against OLD`` runs it for OLD and for this tree alternately, in
fresh processes, and prints the best of each: before and after from the same machine
in the same minute::

    python -m bench.rowpath                       # this tree
    python -m bench.rowpath --tree /path/to/old   # another checkout's pipeline
    python -m bench.rowpath --against /path/to/old
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

if __name__ == "__main__" and "--tree" in sys.argv:
    # Time another checkout's pipeline (this file need not exist there).
    sys.path.insert(0, sys.argv[sys.argv.index("--tree") + 1])

import pipeline  # noqa: E402
from pipeline.outcome import RunContext, ok_row  # noqa: E402
from pipeline.redact import Redactor  # noqa: E402
from pipeline.request import Job  # noqa: E402
from pipeline.schema import storable  # noqa: E402
from pipeline.sink import ResultSink  # noqa: E402
from pipeline.wire import parse_completion  # noqa: E402

FLUSH_EVERY = 8

# A typical non-streamed answer from an OpenAI-compatible gateway: ~450 bytes, usage
# with both detail blocks, one short non-ASCII word in the content.
ANSWER: bytes = json.dumps(
    {
        "id": "chatcmpl-9f8e7d6c5b4a39281706f5e4d3c2b1a0",
        "object": "chat.completion",
        "created": 1764412345,
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "Positive: quick delivery, sturdy build; one caveat — the manual.",
                },
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": 58,
            "completion_tokens": 31,
            "total_tokens": 89,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
        },
        "service_tier": "default",
    },
    ensure_ascii=False,
    separators=(",", ":"),
).encode("utf-8")

CTX = RunContext(run_id="20261129T092600-bench", provider="openai")
REDACTOR = Redactor("sk-bench-0123456789abcdef0123456789abcdef")


def _job(i: int) -> Job:
    return Job(
        id=f"row-{i:07d}",
        body={
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": f"Classify review {i}."}],
        },
        request_hash=f"{i:064x}",
        source_file="input.jsonl",
        source_line=i + 1,
    )


def _clock() -> float:
    """CPU seconds of this process: what the issue counts, and what other work on a
    shared machine changes least (wall time would count the time we wait for a core)."""
    return time.process_time()


def _best(run: Callable[[], float], repeats: int) -> float:
    return min(run() for _ in range(repeats))


def _whole(jobs: list[Job], tmp: Path) -> float:
    """Seconds for the whole path over ``jobs``: one fresh sink per repeat."""
    started_at = datetime.now(UTC)
    redact = REDACTOR.text
    out = Path(tempfile.mkdtemp(dir=tmp))
    sink = ResultSink(out, CTX.run_id, part_rows=10**9)
    try:
        t0 = _clock()
        for n, job in enumerate(jobs, 1):
            answer = parse_completion(ANSWER, redact)
            row = ok_row(
                CTX,
                job,
                answer,
                base_url="http://127.0.0.1:8000/v1",
                http_status=200,
                attempts=1,
                latency_ms=12.5,
                started_at=started_at,
            )
            sink.write(storable(row))
            if n % FLUSH_EVERY == 0:
                sink.flush()
        sink.flush()
        return _clock() - t0
    finally:
        sink._buffer.clear()  # no Parquet part: only the journal is timed
        sink.close()


def _parts(jobs: list[Job], tmp: Path, repeats: int) -> dict[str, float]:
    """Seconds per part over ``jobs``, each part fed what the one before produced."""
    redact = REDACTOR.text
    started_at = datetime.now(UTC)
    answer = parse_completion(ANSWER, redact)

    def parse() -> float:
        t0 = _clock()
        for _ in jobs:
            parse_completion(ANSWER, redact)
        return _clock() - t0

    def build() -> float:
        t0 = _clock()
        for job in jobs:
            ok_row(
                CTX,
                job,
                answer,
                base_url="http://127.0.0.1:8000/v1",
                http_status=200,
                attempts=1,
                latency_ms=12.5,
                started_at=started_at,
            )
        return _clock() - t0

    rows = [
        ok_row(
            CTX,
            job,
            answer,
            base_url="http://127.0.0.1:8000/v1",
            http_status=200,
            attempts=1,
            latency_ms=12.5,
            started_at=started_at,
        )
        for job in jobs
    ]

    def door() -> float:
        t0 = _clock()
        for row in rows:
            storable(row)
        return _clock() - t0

    stored = [storable(row) for row in rows]

    def journal() -> float:
        out = Path(tempfile.mkdtemp(dir=tmp))
        sink = ResultSink(out, CTX.run_id, part_rows=10**9)
        try:
            t0 = _clock()
            for n, row in enumerate(stored, 1):
                sink.write(row)
                if n % FLUSH_EVERY == 0:
                    sink.flush()
            sink.flush()
            return _clock() - t0
        finally:
            sink._buffer.clear()
            sink.close()

    return {
        "parse_completion": _best(parse, repeats),
        "ok_row": _best(build, repeats),
        "storable": _best(door, repeats),
        "sink.write+flush": _best(journal, repeats),
    }


def measure(rows: int, repeats: int) -> dict[str, float]:
    """Microseconds of CPU per row: the whole path, then each part (best of ``repeats``)."""
    gc.set_threshold(10_000, 10, 100)  # as pipeline.gc_tuning sets it for a run
    jobs = [_job(i) for i in range(rows)]
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        _whole(jobs, tmp)  # warm up
        whole = _best(lambda: _whole(jobs, tmp), repeats)
        parts = _parts(jobs, tmp, repeats)
    per = 1e6 / rows
    result = {"whole path": whole * per}
    result.update((name, seconds * per) for name, seconds in parts.items())
    return result


def _print(where: str, figures: dict[str, float]) -> None:
    print(f"{where}  ({sys.version.split()[0]}, answer {len(ANSWER)} bytes)")
    for name, us in figures.items():
        indent = "" if name == "whole path" else "  "
        print(f"  {indent}{name:<20} {us:7.2f} us/row")


def _against(old: str, rounds: int, rows: int, repeats: int) -> None:
    """Run this benchmark for ``old`` and for this tree, alternately, in fresh processes:
    the best figure of each tree over the rounds, so a busy minute hurts both alike."""
    here = str(Path(__file__).resolve().parent.parent)
    best: dict[str, dict[str, float]] = {}
    for _ in range(rounds):
        for tree in (old, here):
            cmd = [sys.executable, __file__, "--tree", tree, "--json"]
            cmd += ["--rows", str(rows), "--repeats", str(repeats)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            figures = json.loads(out)
            mine = best.setdefault(tree, figures)
            for name, us in figures.items():
                mine[name] = min(mine[name], us)
    for tree, figures in best.items():
        _print(tree, figures)
    before, after = best[old], best[here]
    print("after/before: " + ", ".join(f"{k} {after[k] / before[k]:.2f}" for k in after))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000, help="rows per repeat")
    parser.add_argument("--repeats", type=int, default=15, help="best of this many")
    parser.add_argument("--tree", help="time the pipeline package of this checkout")
    parser.add_argument("--against", metavar="OLD", help="compare with this checkout")
    parser.add_argument("--rounds", type=int, default=3, help="with --against")
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.against:
        _against(args.against, args.rounds, args.rows, args.repeats)
        return
    figures = measure(args.rows, args.repeats)
    if args.json:
        print(json.dumps(figures))
        return
    _print(str(Path(pipeline.__file__).resolve().parent.parent), figures)


if __name__ == "__main__":
    main()
