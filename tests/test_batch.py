"""The Batch-API engine (``--mode batch``) against a fake Files/Batches API.

The fake (``FakeBatches``) is an ``httpx.MockTransport`` handler with OpenAI's shapes:
uploads, batches that end when told (completed, expired lines, cancelled, failed),
output and error files, the batch list with metadata, and a ledger of every line it
billed, so a test can prove each row was billed once.
"""

from __future__ import annotations

import collections
import email.parser
import functools
import io
import json
import time
from pathlib import Path
from typing import Any

import httpx
import pyarrow.parquet as pq
import pytest

from pipeline.batch.chunks import ChunkLimits, ChunkWriter, ClosedChunk, request_line
from pipeline.batch.ledger import Ledger
from pipeline.config import RunOptions
from pipeline.errors import Exit, UsageError
from pipeline.execute import execute
from pipeline.request import Job

BASE = "http://batches.test/v1"


class FakeBatches:
    """OpenAI's Files and Batches APIs in memory, for one test."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self.billed: dict[str, int] = {}  # custom_id -> times billed
        self.expire: set[str] = set()  # custom_ids whose lines expire
        self.finish = True  # batches end at the next retrieve
        self.creates = 0
        self.sync_prompts: list[str] = []  # prompts answered by /v1/chat/completions
        self.calls: list[str] = []
        self.retried_line = False  # a 500 line for the first row before its answer
        self._n = 0

    def _id(self, prefix: str) -> str:
        self._n += 1
        return f"{prefix}-{self._n:05d}"

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def handle(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        self.calls.append(f"{request.method} {path}")
        if request.method == "POST" and path == "/v1/files":
            return self._upload(request)
        if request.method == "GET" and path.startswith("/v1/files/") and path.endswith("/content"):
            file_id = path.split("/")[3]
            return httpx.Response(200, content=self.files[file_id])
        if request.method == "GET" and path.startswith("/v1/files/"):
            file_id = path.split("/")[3]
            if file_id not in self.files:
                return httpx.Response(404, json={"error": {"message": "no such file"}})
            return httpx.Response(200, json={"id": file_id, "object": "file"})
        if request.method == "POST" and path == "/v1/batches":
            return self._create(json.loads(request.content))
        if request.method == "GET" and path == "/v1/batches":
            data = sorted(self.batches.values(), key=lambda b: b["id"], reverse=True)
            return httpx.Response(
                200, json={"object": "list", "data": data, "has_more": False, "last_id": None}
            )
        if request.method == "GET" and path.startswith("/v1/batches/"):
            batch = self.batches.get(path.split("/")[3])
            if batch is None:
                return httpx.Response(404, json={"error": {"message": "no such batch"}})
            if self.finish and batch["status"] not in ("completed", "expired", "cancelled"):
                self._run(batch, "completed")
            return httpx.Response(200, json=batch)
        if request.method == "POST" and path.endswith("/cancel"):
            batch = self.batches[path.split("/")[3]]
            self._run(batch, "cancelled", answer_share=0.5)
            return httpx.Response(200, json=batch)
        if request.method == "POST" and path == "/v1/chat/completions":
            body = json.loads(request.content)
            self.sync_prompts.append(body["messages"][-1]["content"])
            return httpx.Response(200, json=self._answer("sync", body["model"]))
        return httpx.Response(404, json={"error": {"message": f"no route {path}"}})

    def _upload(self, request: httpx.Request) -> httpx.Response:
        head = f"content-type: {request.headers['content-type']}\r\n\r\n".encode()
        message = email.parser.BytesParser().parsebytes(head + request.content)
        content = b""
        for part in message.get_payload():  # type: ignore[union-attr]
            if part.get_param("name", header="content-disposition") == "file":
                content = part.get_payload(decode=True)
        file_id = self._id("file")
        self.files[file_id] = content
        return httpx.Response(200, json={"id": file_id, "object": "file", "purpose": "batch"})

    def _create(self, body: dict[str, Any]) -> httpx.Response:
        self.creates += 1
        batch_id = self._id("batch")
        lines = self.files[body["input_file_id"]].decode().splitlines()
        self.batches[batch_id] = {
            "id": batch_id,
            "object": "batch",
            "status": "validating",
            "input_file_id": body["input_file_id"],
            "metadata": body["metadata"],
            "created_at": int(time.time()),
            "request_counts": {"total": len(lines), "completed": 0, "failed": 0},
            "output_file_id": None,
            "error_file_id": None,
            "errors": None,
        }
        return httpx.Response(200, json=self.batches[batch_id])

    @staticmethod
    def _answer(cid: str, model: str, content: str | None = None) -> dict[str, Any]:
        return {
            "id": f"chatcmpl-{cid}",
            "object": "chat.completion",
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content or f"answer {cid}"},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13},
            "service_tier": "default",
        }

    def _run(self, batch: dict[str, Any], status: str, answer_share: float = 1.0) -> None:
        """End the batch: answer its lines (those in ``expire`` expire)."""
        out, err = [], []
        raws = self.files[batch["input_file_id"]].decode().splitlines()
        for n, raw in enumerate(raws):
            line = json.loads(raw)
            cid = line["custom_id"]
            if cid in self.expire or n >= answer_share * len(raws):
                code = "batch_cancelled" if status == "cancelled" else "batch_expired"
                err.append({"id": "r", "custom_id": cid, "response": None, "error": {"code": code}})
                continue
            if line["body"].get("user") == "reject":
                body = {"error": {"message": "temperature too high", "type": "invalid_request"}}
                response = {"status_code": 400, "body": body}
                err.append({"custom_id": cid, "response": response, "error": None})
                continue
            if self.retried_line and n == 0:
                failed = {"status_code": 500, "body": {"error": {"message": "try again"}}}
                out.append({"custom_id": cid, "response": failed, "error": None})
            self.billed[cid] = self.billed.get(cid, 0) + 1
            labeled = '{"label": "positive"}' if "response_format" in line["body"] else None
            if line["body"].get("user") == "huge":
                labeled = "x" * 200_000  # an answer line past the (test's) line bound
            if line["body"].get("user") == "huge_then_ok":  # a retried line, read whole
                big = self._answer(cid, line["body"]["model"], "x" * 200_000)
                out.append({"custom_id": cid, "response": {"status_code": 200, "body": big}})
            if line["body"].get("user") == "huge_error":  # unbilled: an error-file line
                body = {"error": {"message": "x" * 200_000, "type": "server_error"}}
                err.append({"custom_id": cid, "response": {"status_code": 500, "body": body}})
                continue
            answer = self._answer(cid, line["body"]["model"], labeled)
            out.append(
                {"custom_id": cid, "response": {"status_code": 200, "body": answer}, "error": None}
            )
        if err and status == "completed":
            status = "expired"
        for kind, lines in (("output_file_id", out), ("error_file_id", err)):
            if lines:
                file_id = self._id("file")
                self.files[file_id] = "".join(json.dumps(x) + "\n" for x in lines).encode()
                batch[kind] = file_id
        batch["status"] = status
        batch["request_counts"] = {
            "total": len(out) + len(err),
            "completed": len(out),
            "failed": len(err),
        }


def write_rows(path: Path, n: int, **extra: Any) -> Path:
    with open(path, "w") as fh:
        for i in range(n):
            fh.write(json.dumps({"id": f"r{i}", "prompt": f"question {i}", **extra}) + "\n")
    return path


def options(tmp_path: Path, source: Path, **kw: Any) -> RunOptions:
    values: dict[str, Any] = {
        "sources": [str(source)],
        "out": tmp_path / "out",
        "base_url": [BASE],
        "model": "gpt-5.5",
        "mode": "batch",
        "quiet": True,
    }
    values.update(kw)
    return RunOptions(**values)


def one_open_batch(tmp_path: Path, n: int) -> tuple[FakeBatches, Path, Path, str]:
    """``n`` rows submitted as one provider batch that does not finish: (the fake
    provider, the rows' file, OUT, the batch's id)."""
    fake = FakeBatches()
    fake.finish = False
    source = write_rows(tmp_path / "rows.jsonl", n)
    execute(options(tmp_path, source, wait=False), transport=fake.transport())
    (batch_id,) = fake.batches
    return fake, source, tmp_path / "out", batch_id


def results(out: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for part in sorted((out / "results").rglob("*.parquet")):
        rows.extend(pq.read_table(part).to_pylist())
    return rows


async def no_sleep(_: float) -> None:
    return None


def test_no_wait_submits_then_next_run_collects_every_row_once(tmp_path: Path) -> None:
    fake = FakeBatches()
    fake.finish = False
    source = write_rows(tmp_path / "rows.jsonl", 120)
    first = execute(options(tmp_path, source, wait=False), transport=fake.transport())
    assert first.exit_code == 0
    assert fake.creates == 1 and not results(tmp_path / "out")
    ledger = Ledger(tmp_path / "out")
    (chunk,) = ledger.chunks().values()
    assert chunk.state == "open" and chunk.rows == 120
    request = json.loads(ledger.request_file(chunk.chunk).read_text().splitlines()[0])
    assert request["url"] == "/v1/chat/completions" and "stream" not in request["body"]
    batch = next(iter(fake.batches.values()))
    assert batch["metadata"]["pipeline_out"] == ledger.token()
    assert batch["metadata"]["pipeline_chunk"] == chunk.chunk

    # A synchronous run meanwhile sends none of the held rows.
    sync = execute(options(tmp_path, source, mode="sync"), transport=fake.transport())
    assert sync.exit_code == 0 and sync.tally.finished == 0
    assert not any(c.startswith("POST /v1/chat") for c in fake.calls)

    fake.finish = True
    second = execute(options(tmp_path, source, wait=False), transport=fake.transport())
    assert second.exit_code == 0
    rows = results(tmp_path / "out")
    assert sorted(r["id"] for r in rows) == sorted(f"r{i}" for i in range(120))
    assert {r["status"] for r in rows} == {"ok"}
    assert {r["service_tier"] for r in rows} == {"batch"}
    assert {r["batch_id"] for r in rows} == {batch["id"]}
    assert sum(r["prompt_tokens"] for r in rows) == 10 * 120
    assert fake.billed == {f"r{i}": 1 for i in range(120)}
    assert fake.creates == 1  # nothing submitted again
    assert not list(ledger.chunks_dir.iterdir())  # collected: request files gone


def test_expired_lines_are_submitted_again_exactly(tmp_path: Path) -> None:
    fake = FakeBatches()
    source = write_rows(tmp_path / "rows.jsonl", 50)
    fake.expire = {f"r{i}" for i in range(0, 50, 10)}
    first = execute(options(tmp_path, source), transport=fake.transport(), sleep=no_sleep)
    assert first.exit_code == 0
    assert len(results(tmp_path / "out")) == 45
    fake.expire = set()
    execute(options(tmp_path, source), transport=fake.transport(), sleep=no_sleep)
    second_batch = sorted(fake.batches)[-1]
    input_file = fake.files[fake.batches[second_batch]["input_file_id"]].decode()
    again = {json.loads(line)["custom_id"] for line in input_file.splitlines()}
    assert again == {f"r{i}" for i in range(0, 50, 10)}
    assert sorted(r["id"] for r in results(tmp_path / "out")) == sorted(f"r{i}" for i in range(50))
    assert set(fake.billed.values()) == {1}


def test_a_4xx_line_ends_its_row_as_error(tmp_path: Path) -> None:
    fake = FakeBatches()
    source = tmp_path / "rows.jsonl"
    source.write_text(
        json.dumps({"id": "a", "prompt": "x"})
        + "\n"
        + json.dumps({"id": "b", "prompt": "y", "user": "reject"})
        + "\n"
        + "not json\n"
    )
    result = execute(options(tmp_path, source), transport=fake.transport(), sleep=no_sleep)
    rows = {r["id"]: r for r in results(tmp_path / "out")}
    assert rows["a"]["status"] == "ok"
    assert rows["b"]["status"] == "error" and rows["b"]["http_status"] == 400
    assert rows["b"]["batch_id"] is not None
    invalid = [r for r in rows.values() if r["error_type"] == "invalid_input"]
    assert len(invalid) == 1
    assert result.exit_code == 1


def test_batch_mode_against_a_gateway_without_batch_api_is_a_usage_error(tmp_path: Path) -> None:
    source = write_rows(tmp_path / "rows.jsonl", 1)
    opts = options(tmp_path, source, base_url=[], provider="starmagic")
    with pytest.raises(UsageError, match="no Batch API"):
        execute(opts)
    assert not (tmp_path / "out").exists()


def test_chunks_split_by_model_and_limits(tmp_path: Path) -> None:
    closed: list[ClosedChunk] = []
    writer = ChunkWriter(tmp_path, "run", closed.append, ChunkLimits(max_lines=3, max_bytes=400))

    def job(i: int, model: str) -> Job:
        return Job(f"id{i}", {"model": model, "messages": []}, "h", "f", i)

    for i in range(7):
        writer.add(job(i, "a"))
    writer.add(job(99, "b"))
    writer.close()
    by_model = [(c.model, c.rows) for c in closed]
    assert sorted(by_model) == [("a", 1), ("a", 3), ("a", 3), ("b", 1)]
    for c in closed:
        data = (tmp_path / f"{c.chunk}.jsonl").read_bytes()
        assert len(data) <= 400 and len(data.splitlines()) <= 3
        assert {json.loads(x)["body"]["model"] for x in data.splitlines()} == {c.model}
    assert len(request_line(job(1, "a"))) < 400
    flex = Job("x", {"model": "a", "service_tier": "flex", "stream": True}, "h", "f", 1)
    body = json.loads(request_line(flex))["body"]
    assert "service_tier" not in body and "stream" not in body  # billed at batch prices


def test_batches_lists_and_cancels_then_the_next_run_collects_what_finished(
    tmp_path: Path,
) -> None:
    from pipeline.batch.listing import batch_options, list_batches

    fake = FakeBatches()
    fake.finish = False
    source = write_rows(tmp_path / "rows.jsonl", 40)
    execute(options(tmp_path, source, wait=False), transport=fake.transport())
    out = tmp_path / "out"
    opts = batch_options(out)
    assert opts.base_url == [BASE] and opts.mode == "batch"  # from the last batch run
    text, _ = list_batches(opts, transport=fake.transport(), now=time.time() + 3700)
    (batch_id,) = fake.batches
    assert batch_id in text and "validating" in text and "1h" in text
    assert "1 not yet collected, holding 40 rows" in text

    text, notes = list_batches(opts, cancel=True, transport=fake.transport())
    assert fake.batches[batch_id]["status"] == "cancelled"
    assert notes == [f"cancelling {batch_id}"]

    # The next run collects the 20 answered lines; 20 go back to pending and, with
    # --finish-sync, are sent synchronously in the same run instead of a new batch.
    result = execute(
        options(tmp_path, source, finish_sync=True, wait=False), transport=fake.transport()
    )
    rows = results(out)
    by_tier = {r["id"]: r["service_tier"] for r in rows if r["status"] == "ok"}
    assert len(by_tier) == 40
    assert sum(1 for t in by_tier.values() if t == "batch") == 20
    assert len(fake.sync_prompts) == 20 and fake.creates == 1
    assert result.exit_code == 0
    manifest = json.loads((out / "runs" / f"{result.run_id}.json").read_text())
    assert manifest["engine"]["back_to_pending"] == {"batch_cancelled": 20}
    text, _ = list_batches(batch_options(out), transport=fake.transport())
    assert "collected (cancelled)" in text and "0 not yet collected" in text


def test_sync_run_collects_first_and_skips_held_rows(tmp_path: Path) -> None:
    fake = FakeBatches()
    fake.finish = False
    first = write_rows(tmp_path / "rows.jsonl", 30)
    execute(options(tmp_path, first, wait=False), transport=fake.transport())
    # Same rows plus ten new ones, synchronously, while the batch is open.
    more = write_rows(tmp_path / "more.jsonl", 40)
    sync = execute(options(tmp_path, more, mode="sync"), transport=fake.transport())
    assert sync.exit_code == 0 and sync.tally.status["ok"] == 10
    assert sorted(fake.sync_prompts) == sorted(f"question {i}" for i in range(30, 40))
    fake.finish = True
    again = execute(options(tmp_path, more, mode="sync"), transport=fake.transport())
    assert again.tally.status["ok"] == 0  # nothing left to send: the batch was collected
    ok = collections.Counter(r["id"] for r in results(tmp_path / "out") if r["status"] == "ok")
    assert ok == {f"r{i}": 1 for i in range(40)}
    manifest = json.loads((tmp_path / "out" / "runs" / f"{again.run_id}.json").read_text())
    assert manifest["engine"]["batches"]["rows_collected"] == 30


def test_the_nightly_job_submits_in_the_evening_and_finishes_in_the_morning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dataclasses

    from pipeline.config import load_job_file

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-nightly")
    job = Path(__file__).resolve().parent.parent / "jobs" / "nightly_batch_openai.toml"
    opts = dataclasses.replace(load_job_file(job), out=tmp_path / "out")
    assert opts.mode == "batch" and opts.wait is False
    fake = FakeBatches()
    fake.finish = False
    evening = execute(opts, transport=fake.transport())
    assert evening.exit_code == 0 and fake.creates == 1 and not fake.sync_prompts
    (batch_id,) = fake.batches
    fake.expire = {"r-never"}  # nothing expires; the batch simply finished overnight
    fake.finish = True
    morning = execute(dataclasses.replace(opts, finish_sync=True), transport=fake.transport())
    assert morning.exit_code == 0
    rows = results(tmp_path / "out")
    assert len(rows) == 40 and {r["batch_id"] for r in rows} == {batch_id}
    assert {r["label"] for r in rows} == {"positive"}  # the labels checked as in a sync run
    assert not fake.sync_prompts and fake.creates == 1


def test_ctrl_c_while_waiting_leaves_the_batches_open_and_says_how_to_collect(
    tmp_path: Path,
) -> None:
    import io

    fake = FakeBatches()
    fake.finish = False
    source = write_rows(tmp_path / "rows.jsonl", 10)

    async def interrupted(_: float) -> None:
        raise KeyboardInterrupt

    stream = io.StringIO()
    result = execute(
        options(tmp_path, source), transport=fake.transport(), sleep=interrupted,
        progress_stream=stream,
    )  # fmt: skip
    assert result.exit_code == 130
    assert "run the same command again to collect" in stream.getvalue()
    assert fake.batches[next(iter(fake.batches))]["status"] == "validating"  # not cancelled
    (chunk,) = Ledger(tmp_path / "out").chunks().values()
    assert chunk.state == "open"
    fake.finish = True
    again = execute(options(tmp_path, source), transport=fake.transport(), sleep=no_sleep)
    assert again.tally.status["ok"] == 10 and fake.creates == 1


def test_cli_batch_mode_on_a_seed_gateway_exits_2(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from pipeline.cli import cli

    source = write_rows(tmp_path / "rows.jsonl", 1)
    for gateway in ("starmagic", "evolink", "modelstream"):
        result = CliRunner().invoke(
            cli, ["run", str(source), "--provider", gateway, "--mode", "batch",
                  "--out", str(tmp_path / "out")],
        )  # fmt: skip
        assert result.exit_code == 2, result.output
        assert "no Batch API" in result.output and gateway in result.output
    listing = CliRunner().invoke(cli, ["batches", str(tmp_path / "out")])
    assert listing.exit_code == 0 and "no batches recorded" in listing.output


def test_reconcile_leaves_a_live_shards_chunks_alone(tmp_path: Path) -> None:
    import fcntl

    import anyio

    from pipeline.batch.api import BatchApi
    from pipeline.batch.collect import Collector, RowWriter
    from pipeline.outcome import RunContext
    from pipeline.progress import Progress, Tally

    out = tmp_path / "out"
    ledger = Ledger(out)
    assert ledger.token() == ledger.token()  # made once, kept
    for run in ("live-run", "dead-run"):
        ledger.append("chunk", f"{run}-0001", run=run, rows=1, model="m")
        ledger.append("create", f"{run}-0001", file_id="f")
    (out / "runs").mkdir()
    alive = open(out / "runs" / ".live-run.alive", "a+")  # noqa: SIM115 - held below
    fcntl.flock(alive.fileno(), fcntl.LOCK_EX)
    try:
        api = BatchApi(BASE, None, transport=FakeBatches().transport())
        writer = RowWriter(out, "x", Tally(), 100)
        collector = Collector(
            ledger, api, RunContext("r", "p"), writer, Progress(Tally(), quiet=True)
        )
        anyio.run(collector.reconcile)
    finally:
        alive.close()
    states = {name: c.state for name, c in ledger.chunks().items()}
    assert states == {"live-run-0001": "creating", "dead-run-0001": "abandoned"}


def test_identical_requests_are_sent_once_and_shared_as_in_a_sync_run(tmp_path: Path) -> None:
    fake = FakeBatches()
    source = tmp_path / "rows.jsonl"
    source.write_text(
        "".join(json.dumps({"id": f"d{i}", "prompt": "the same"}) + "\n" for i in range(3))
        + json.dumps({"id": "other", "prompt": "different"})
        + "\n"
    )
    result = execute(options(tmp_path, source), transport=fake.transport(), sleep=no_sleep)
    assert result.exit_code == 0
    assert set(fake.billed) == {"d0", "other"}  # one line for the three twins
    rows = {r["id"]: r for r in results(tmp_path / "out")}
    assert set(rows) == {"d0", "d1", "d2", "other"}
    assert {rows["d1"]["shared_from"], rows["d2"]["shared_from"]} == {"d0"}
    assert rows["d1"]["prompt_tokens"] == 0 and rows["d0"]["prompt_tokens"] == 10
    assert rows["d2"]["content"] == rows["d0"]["content"]
    assert rows["d2"]["batch_id"] == rows["d0"]["batch_id"]

    fresh = FakeBatches()
    execute(
        options(tmp_path, source, out=tmp_path / "out2", dedupe=False),
        transport=fresh.transport(), sleep=no_sleep,
    )  # fmt: skip
    assert set(fresh.billed) == {"d0", "d1", "d2", "other"}


def test_ray_refuses_an_out_with_batches_not_yet_collected(tmp_path: Path) -> None:
    from pipeline.config import validate

    fake = FakeBatches()
    fake.finish = False
    source = write_rows(tmp_path / "rows.jsonl", 3)
    execute(options(tmp_path, source, wait=False), transport=fake.transport())
    ray = options(tmp_path, source, mode="sync", engine="ray")
    with pytest.raises(UsageError, match="not yet collected"):
        validate(ray)
    fake.finish = True
    execute(options(tmp_path, source, mode="sync"), transport=fake.transport())  # collects
    validate(ray)


def test_max_cost_submits_only_the_rows_whose_worst_case_fits(tmp_path: Path) -> None:
    prices = tmp_path / "prices.csv"
    prices.write_text(
        "model,provider,service_tier,input_per_mtok,cached_input_per_mtok,output_per_mtok,"
        "valid_from,source\n"
        "gpt-5.5,,,9000000,0,0,2020-01-01,test: nine dollars a token in\n"
        "gpt-5.5,,batch,1000000,0,0,2020-01-01,test: one dollar a token in\n"
    )
    fake = FakeBatches()
    source = write_rows(tmp_path / "rows.jsonl", 40)
    opts = options(tmp_path, source, max_cost=30.0, pricing=prices)
    result = execute(opts, transport=fake.transport(), sleep=no_sleep)
    assert result.exit_code == Exit.FATAL and "max-cost" in (result.fatal or "")
    submitted = len(fake.billed)
    assert 0 < submitted < 40  # each row holds its prompt's dollars; some fit, not all
    assert len(results(tmp_path / "out")) == submitted
    bad = options(tmp_path, source, max_cost=1.0, pricing=tmp_path / "missing.csv")
    with pytest.raises(UsageError):
        execute(bad, transport=fake.transport())


def test_rows_collected_by_another_process_are_never_neither_done_nor_held(
    tmp_path: Path,
) -> None:
    """A shard's ``--wait`` loop collects every batch of the OUT, a sibling shard's too,
    and keeps polling for hours. Once a batch is marked collected its rows are no longer
    held, so they must already be in a Parquet part: rows only in the collecting
    process's open journal are invisible to the sibling, whose next run (or its own
    ``--finish-sync``) would send and bill them again."""
    import anyio

    from pipeline.batch.api import BatchApi
    from pipeline.batch.collect import Collector, RowWriter, held_ids
    from pipeline.outcome import RunContext
    from pipeline.progress import Progress, Tally
    from pipeline.resume import load_outcomes

    fake = FakeBatches()
    fake.finish = False
    source = write_rows(tmp_path / "rows.jsonl", 30)
    assert execute(options(tmp_path, source, wait=False), transport=fake.transport()).exit_code == 0
    out = tmp_path / "out"
    ledger = Ledger(out)
    fake.finish = True
    api = BatchApi(BASE, None, transport=fake.transport())
    writer = RowWriter(out, "other-shard-batch", Tally(), 100_000)  # still open afterwards
    collector = Collector(ledger, api, RunContext("r", "p"), writer, Progress(Tally(), quiet=True))

    async def go() -> None:
        try:
            await collector.collect()
        finally:
            await api.aclose()

    anyio.run(go)
    assert collector.report.rows == 30
    done, held = load_outcomes(out), held_ids(ledger)
    lost = [f"r{i}" for i in range(30) if f"r{i}" not in done.ok and f"r{i}" not in held]
    writer.close()
    assert lost == []


def test_held_ids_are_read_before_the_results_when_selecting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reading the results first, then the held ids, leaves a window: a sibling shard
    that closes a batch in between makes its rows neither done nor held, and this run
    sends them again. Held first closes it (a batch's rows reach a part before it is
    marked collected)."""
    import pipeline.batch.engine as engine

    order: list[str] = []
    real_held, real_load = engine.held_ids, engine.load_outcomes

    def held(*a: Any, **k: Any) -> Any:
        order.append("held")
        return real_held(*a, **k)

    def load(*a: Any, **k: Any) -> Any:
        order.append("results")
        return real_load(*a, **k)

    monkeypatch.setattr(engine, "held_ids", held)
    monkeypatch.setattr(engine, "load_outcomes", load)
    fake = FakeBatches()
    fake.finish = False
    source = write_rows(tmp_path / "rows.jsonl", 5)
    run = execute(options(tmp_path, source, wait=False), transport=fake.transport())
    assert run.exit_code == 0
    opts = options(tmp_path, source, wait=False, finish_sync=True)
    assert execute(opts, transport=fake.transport()).exit_code == 0
    assert order and order[0] == "held"
    assert all(order[i] == "held" for i in range(0, len(order), 2)), order


def test_a_lost_create_is_found_even_when_the_gateway_lists_oldest_first(
    tmp_path: Path,
) -> None:
    """A gateway that lists batches oldest first (OpenAI lists newest first; proxies
    need not) once made reconcile stop at the first old batch, abandon a chunk whose
    batch exists, and so submit (bill) its rows a second time."""
    import anyio

    from pipeline.batch.api import BatchApi
    from pipeline.batch.collect import Collector, RowWriter
    from pipeline.outcome import RunContext
    from pipeline.progress import Progress, Tally

    out = tmp_path / "out"
    ledger = Ledger(out)
    token = ledger.token()
    ledger.append("chunk", "dead-0001", run="dead", rows=1, model="m")
    ledger.append("create", "dead-0001", file_id="file-1")
    ours = {
        "id": "batch-ours",
        "status": "in_progress",
        "created_at": int(time.time()),
        "metadata": {"pipeline_out": token, "pipeline_chunk": "dead-0001"},
    }
    old = {"id": "batch-old", "status": "completed", "created_at": 1, "metadata": {}}

    def handle(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/batches"
        return httpx.Response(200, json={"data": [old, ours], "has_more": False})

    api = BatchApi(BASE, None, transport=httpx.MockTransport(handle))
    writer = RowWriter(out, "x", Tally(), 100)
    collector = Collector(ledger, api, RunContext("r", "p"), writer, Progress(Tally(), quiet=True))
    anyio.run(collector.reconcile)
    (chunk,) = ledger.chunks().values()
    assert chunk.state == "open" and chunk.batch_id == "batch-ours"


def test_a_later_billed_answer_for_a_row_wins_over_an_earlier_retryable_line(
    tmp_path: Path,
) -> None:
    """A provider (or a proxy) that writes a 5xx line and then the row's answer: the
    billed answer is kept, not thrown away and bought again by a resubmission."""
    fake = FakeBatches()
    fake.retried_line = True
    source = write_rows(tmp_path / "rows.jsonl", 3)
    result = execute(options(tmp_path, source), transport=fake.transport(), sleep=no_sleep)
    rows = results(tmp_path / "out")
    assert result.exit_code == 0
    assert sorted(r["id"] for r in rows if r["status"] == "ok") == sorted(fake.billed)
    assert len(rows) == 3 and fake.creates == 1
    assert set(fake.billed.values()) == {1}, "a row billed twice"


def test_a_batch_the_provider_lost_holds_its_rows_until_forgotten_then_they_go(
    tmp_path: Path,
) -> None:
    """Without --forget, every later run found the batch open, could not retrieve it
    (404), skipped its rows and exited 0: those rows were never done, for good."""
    from pipeline.batch.listing import batch_options, forget_batches, list_batches

    fake, source, out, batch_id = one_open_batch(tmp_path, 10)
    fake.batches.clear()  # the provider lost it (its request file is still there)

    told = io.StringIO()
    execute(
        options(tmp_path, source, mode="sync"), transport=fake.transport(), progress_stream=told
    )
    assert results(out) == [] and fake.sync_prompts == []  # held, still
    assert f"pipeline batches {out} --forget {batch_id}` sends its 10 rows again" in (
        told.getvalue()
    )

    forget = functools.partial(forget_batches, transport=fake.transport(), pause=0)
    notes = forget(batch_options(out), [batch_id])
    assert notes == [f"forgot {batch_id}: its 10 rows are pending again (the next run sends them)"]
    text, _ = list_batches(batch_options(out), transport=fake.transport())
    assert "0 not yet collected" in text

    result = execute(options(tmp_path, source, mode="sync"), transport=fake.transport())
    assert result.exit_code == 0
    assert sorted(r["id"] for r in results(out) if r["status"] == "ok") == sorted(
        f"r{i}" for i in range(10)
    )


@pytest.mark.parametrize(
    "case",
    [
        "still_there",
        "unknown_id",
        "unreachable",
        "html_404",
        "other_account",
        "collecting",
        "listed",
    ],
)
def test_forget_refuses_a_batch_not_shown_to_be_lost_and_changes_nothing(
    tmp_path: Path, case: str
) -> None:
    """Forgetting a batch that is not lost bills its rows twice: a 404 from a proxy's
    page, from another key's account (neither the request file nor any batch of this
    OUT visible), or a batch whose answers may be on disk is never forgotten."""
    from pipeline.batch.ledger import Ledger
    from pipeline.batch.listing import batch_options, forget_batches
    from pipeline.errors import UsageError

    fake, _, out, batch_id = one_open_batch(tmp_path, 4)
    ledger = Ledger(out)
    transport = fake.transport()
    if case == "unreachable":
        transport = httpx.MockTransport(lambda request: httpx.Response(503, text="down"))
    if case == "html_404":
        transport = httpx.MockTransport(
            lambda r: httpx.Response(404, text="<html>Not Found</html>")
        )
    if case == "other_account":
        fake.batches.clear()
        fake.files.clear()
    if case == "listed":  # retrieve says 404, the listing still has it

        def listed_but_404(request: httpx.Request) -> httpx.Response:
            if request.url.path == f"/v1/batches/{batch_id}":
                return httpx.Response(404, json={"error": {"message": "not found"}})
            return fake.handle(request)

        transport = httpx.MockTransport(listed_but_404)
    if case == "collecting":
        (chunk,) = ledger.chunks().values()
        ledger.append("collecting", chunk.chunk)
    before = ledger.path.read_bytes()
    wanted = "batch-99999" if case == "unknown_id" else batch_id
    with pytest.raises(UsageError) as refused:
        forget_batches(batch_options(out), [wanted], transport=transport, pause=0)
    expected = {
        "still_there": "the provider still has it",
        "unknown_id": "no open batch",
        "unreachable": "cannot be asked about",
        "html_404": "cannot be asked about",
        "other_account": "may have been made with another key or base URL",
        "listed": "the provider still lists it",
        "collecting": "being collected",
    }[case]
    assert expected in str(refused.value)
    assert ledger.path.read_bytes() == before
    if case == "other_account":  # the user, sure it is lost, says so
        notes = forget_batches(
            batch_options(out), [batch_id], transport=transport, pause=0, force=True
        )
        assert notes and "pending again" in notes[0]


def test_estimate_leaves_out_the_rows_inside_open_batches_as_a_run_does(tmp_path: Path) -> None:
    """Rows a --no-wait batch holds are answered (and billed) there: an estimate that
    priced them again overstated the cost of the next run by their whole price."""
    from pipeline.estimate import estimate
    from pipeline.estimate_format import format_estimate

    fake = FakeBatches()
    fake.finish = False
    held = write_rows(tmp_path / "rows.jsonl", 10)
    execute(options(tmp_path, held, wait=False), transport=fake.transport())
    both = tmp_path / "both.jsonl"
    new_rows = [json.dumps({"id": f"new{i}", "prompt": f"new {i}"}) + "\n" for i in range(3)]
    both.write_text(held.read_text() + "".join(new_rows))
    est = estimate(options(tmp_path, both, mode="sync"))
    assert est.in_batches == 10 and est.rows == 3
    assert json.loads(format_estimate(est, "json"))["rows"]["in_batches"] == 10
    assert "10 row(s) are inside open provider batches" in format_estimate(est)


def test_estimate_prices_the_rows_of_a_chunk_a_dead_run_never_submitted(tmp_path: Path) -> None:
    """A request file written (or uploaded) by a run that died before creating its
    batch holds nothing: the next run abandons it and sends its rows, so they are
    priced; only submitted batches' rows are left out."""
    from pipeline.batch.ledger import Ledger
    from pipeline.estimate import estimate

    source = write_rows(tmp_path / "rows.jsonl", 4)
    ledger = Ledger(tmp_path / "out")
    ledger.ensure()
    ledger.append("chunk", "dead-chunk", run="dead", model="gpt-5.5", rows=2, bytes=100)
    ledger.rows_file("dead-chunk").write_text('{"id": "r0"}\n{"id": "r1"}\n')
    est = estimate(options(tmp_path, source, mode="sync"))
    assert est.in_batches == 0 and est.rows == 4

    # The same chunk while the run that wrote it is alive: that run submits it.
    from pipeline.manifest import run_alive

    ledger.append("chunk", "live-chunk", run="live", model="gpt-5.5", rows=2, bytes=100)
    ledger.rows_file("live-chunk").write_text('{"id": "r2"}\n{"id": "r3"}\n')
    with run_alive(tmp_path / "out", "live"):
        est = estimate(options(tmp_path, source, mode="sync"))
    assert est.in_batches == 2 and est.rows == 2


def test_forget_takes_no_proof_from_a_batch_another_run_made_with_another_key(
    tmp_path: Path,
) -> None:
    """Run 1 made batch A with key A; run 2 made batch B with key B (another project).
    Asked with key B, A answers 404 and B is listed: that proves key B sees run 2's
    account, not run 1's, so A (maybe alive, and billed) is not forgotten."""
    from pipeline.batch.listing import batch_options, forget_batches
    from pipeline.errors import UsageError

    fake = FakeBatches()
    fake.finish = False
    first = write_rows(tmp_path / "rows.jsonl", 3)
    execute(options(tmp_path, first, wait=False), transport=fake.transport())
    (batch_a,) = fake.batches
    file_a = fake.batches[batch_a]["input_file_id"]
    more = tmp_path / "more.jsonl"
    more.write_text(
        "".join(json.dumps({"id": f"m{i}", "prompt": f"m {i}"}) + "\n" for i in range(3))
    )
    execute(options(tmp_path, more, wait=False), transport=fake.transport())
    assert len(fake.batches) == 2
    del fake.batches[batch_a], fake.files[file_a]  # key B sees neither
    with pytest.raises(UsageError, match="another key or base URL"):
        forget_batches(
            batch_options(tmp_path / "out"), [batch_a], transport=fake.transport(), pause=0
        )


def test_an_answer_line_past_the_bound_is_an_error_row_not_sent_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batch billed it; sent back to pending, the row would be billed twice. It
    ends as response_too_large (tokens unknown, NULL), the other rows as usual, and
    the next run sends nothing."""
    import pipeline.batch.collect as collect

    monkeypatch.setattr(collect, "MAX_LINE_BYTES", 100_000)
    fake = FakeBatches()
    source = tmp_path / "rows.jsonl"
    rows = [{"id": f"r{i}", "prompt": f"q {i}"} for i in range(3)]
    rows.append({"id": "big", "prompt": "q big", "user": "huge"})
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = execute(options(tmp_path, source), transport=fake.transport())
    by_id = {r["id"]: r for r in results(tmp_path / "out")}
    assert by_id["big"]["status"] == "error" and by_id["big"]["error_type"] == "response_too_large"
    assert by_id["big"]["prompt_tokens"] is None and by_id["big"]["batch_id"]
    assert all(by_id[f"r{i}"]["status"] == "ok" for i in range(3))
    assert result.exit_code == 1  # a row failed
    fake.creates = 0
    again = execute(options(tmp_path, source), transport=fake.transport())
    assert fake.creates == 0 and fake.sync_prompts == [] and again.exit_code == 0


def test_custom_id_is_found_at_the_start_of_a_line_too_long_to_read() -> None:
    from pipeline.batch.lines import custom_id_in_prefix

    assert (
        custom_id_in_prefix(b'{"id": "batch_req_1", "custom_id": "r\\"7", "response": {') == 'r"7'
    )
    assert custom_id_in_prefix(b'{"response": {"body": "' + b"x" * 100) is None


def test_a_readable_line_wins_over_a_too_long_one_and_an_unbilled_one_goes_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A too-long output line followed by a readable one for the same row: the
    readable answer (and its tokens) is kept. A too-long error-file line was not
    billed: its row goes back to pending, as before."""
    import pipeline.batch.collect as collect

    monkeypatch.setattr(collect, "MAX_LINE_BYTES", 100_000)
    fake = FakeBatches()
    source = tmp_path / "rows.jsonl"
    rows = [
        {"id": "twice", "prompt": "q twice", "user": "huge_then_ok"},
        {"id": "unbilled", "prompt": "q unbilled", "user": "huge_error"},
    ]
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    execute(options(tmp_path, source, wait=False), transport=fake.transport())
    execute(options(tmp_path, source, wait=False), transport=fake.transport())
    by_id = {r["id"]: r for r in results(tmp_path / "out")}
    assert by_id["twice"]["status"] == "ok" and by_id["twice"]["prompt_tokens"] is not None
    assert "unbilled" not in by_id  # back to pending (submitted again), not an error row
    assert fake.creates == 2


def test_forget_with_force_goes_on_when_the_gateway_has_no_batch_list(tmp_path: Path) -> None:
    """A gateway without a list endpoint (404 there): refused without --force (nothing
    shows the batch was let go), forgotten with it."""
    from pipeline.batch.listing import batch_options, forget_batches
    from pipeline.errors import UsageError

    fake = FakeBatches()
    fake.finish = False
    source = write_rows(tmp_path / "rows.jsonl", 2)
    execute(options(tmp_path, source, wait=False), transport=fake.transport())
    (batch_id,) = fake.batches
    fake.batches.clear()

    def no_list(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/batches":
            return httpx.Response(404, json={"error": {"message": "no such route"}})
        return fake.handle(request)

    transport = httpx.MockTransport(no_list)
    opts = batch_options(tmp_path / "out")
    with pytest.raises(UsageError, match="batch list cannot be read"):
        forget_batches(opts, [batch_id], transport=transport, pause=0)
    notes = forget_batches(opts, [batch_id], transport=transport, pause=0, force=True)
    assert "pending again" in notes[0]
