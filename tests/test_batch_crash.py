"""kill -9 of a real ``pipeline run --mode batch`` at its worst instants.

The Files/Batches API is the fake of tests/test_batch.py served over loopback HTTP
from a thread of this process, so it outlives the killed run and keeps a ledger of
every batch created and every line billed. The run kills itself at the instant under
test through the test-only ``PIPELINE_TEST_KILL_AFTER`` hook (pipeline.batch.ledger).
"""

from __future__ import annotations

import collections
import http.server
import json
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from pipeline.batch.ledger import Ledger
from pipeline.execute import execute
from tests.realproc import Processes, _env, _repo_root
from tests.test_batch import FakeBatches, options, results, write_rows


@pytest.fixture
def served() -> Iterator[tuple[FakeBatches, str]]:
    """The fake Batches API on a free loopback port."""
    fake = FakeBatches()

    class Handler(http.server.BaseHTTPRequestHandler):
        def _serve(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(length) if length else b""
            request = httpx.Request(
                self.command,
                f"http://127.0.0.1{self.path}",
                headers=dict(self.headers.items()),
                content=body,
            )
            response = fake.handle(request)
            data = response.read()
            self.send_response(response.status_code)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _serve

        def log_message(self, *args: Any) -> None:
            return None

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield fake, f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def run_killed(
    procs: Processes, out: Path, source: Path, url: str, step: str
) -> subprocess.Popen[bytes]:
    env = {**_env(), "PIPELINE_TEST_KILL_AFTER": step}
    cmd = [sys.executable, "-m", "pipeline", "run", str(source), "--out", str(out)]
    cmd += ["--base-url", url, "--model", "gpt-5.5", "--mode", "batch", "--no-wait", "-q"]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=_repo_root()
    )
    procs._started.append(proc)
    proc.communicate(timeout=120)
    return proc


def test_kill_right_after_create_then_the_next_run_finds_the_batch_by_metadata(
    procs: Processes, served: tuple[FakeBatches, str], tmp_path: Path
) -> None:
    fake, url = served
    fake.finish = False
    source = write_rows(tmp_path / "rows.jsonl", 300)
    out = tmp_path / "out"
    proc = run_killed(procs, out, source, url, "create")
    assert proc.returncode == -signal.SIGKILL
    assert fake.creates == 1
    (chunk,) = Ledger(out).chunks().values()
    assert chunk.state == "creating" and chunk.batch_id is None  # the answer was never written

    fake.finish = True
    opts = options(tmp_path, source, base_url=[url], wait=True)
    result = execute(opts, transport=fake.transport())
    assert result.exit_code == 0
    assert fake.creates == 1, "a batch was submitted twice"
    assert fake.billed == {f"r{i}": 1 for i in range(300)}
    ok = collections.Counter(r["id"] for r in results(out) if r["status"] == "ok")
    assert ok == {f"r{i}": 1 for i in range(300)}
    manifest = json.loads((out / "runs" / f"{result.run_id}.json").read_text())
    assert manifest["engine"]["found_by_metadata"] == 1


def test_kill_while_collecting_writes_no_row_twice(
    procs: Processes, served: tuple[FakeBatches, str], tmp_path: Path
) -> None:
    fake, url = served
    source = write_rows(tmp_path / "rows.jsonl", 200)
    out = tmp_path / "out"
    fake.finish = False
    first = execute(options(tmp_path, source, base_url=[url], wait=False), transport=None)
    assert first.exit_code == 0 and fake.creates == 1
    fake.finish = True
    proc = run_killed(procs, out, source, url, "collected-rows")
    assert proc.returncode == -signal.SIGKILL
    (chunk,) = Ledger(out).chunks().values()
    assert chunk.state == "collecting"

    again = execute(options(tmp_path, source, base_url=[url]), transport=fake.transport())
    assert again.exit_code == 0
    ok = collections.Counter(r["id"] for r in results(out) if r["status"] == "ok")
    assert ok == {f"r{i}": 1 for i in range(200)}, "a collected row was written twice or lost"
    assert fake.creates == 1 and set(fake.billed.values()) == {1}


def test_kill_right_after_the_upload_abandons_the_chunk_and_submits_its_rows_once(
    procs: Processes, served: tuple[FakeBatches, str], tmp_path: Path
) -> None:
    fake, url = served
    source = write_rows(tmp_path / "rows.jsonl", 100)
    out = tmp_path / "out"
    proc = run_killed(procs, out, source, url, "upload")
    assert proc.returncode == -signal.SIGKILL
    assert len(fake.files) == 1 and fake.creates == 0  # uploaded, never created

    result = execute(options(tmp_path, source, base_url=[url]), transport=fake.transport())
    assert result.exit_code == 0 and result.tally.status["ok"] == 100
    assert fake.creates == 1 and fake.billed == {f"r{i}": 1 for i in range(100)}
    states = sorted(c.state for c in Ledger(out).chunks().values())
    assert states == ["abandoned", "collected"]
