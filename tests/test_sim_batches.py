"""The simulator's Files and Batches APIs behave like OpenAI's: the pipeline's batch mode,
its crash tests and the benchmarks all trust them, offline, with a fake clock."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.sim import SimConfig, SimRequest, Simulator, read_ledger, request_key, sim_transport
from pipeline.sim.batches import expires
from pipeline.sim.parse import parse_body
from pipeline.sim.protocol import Reject
from pipeline.sim.state import StateDir
from tests.realproc import Processes, start_server

URL = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "Label this row"}]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Clock:
    """Epoch seconds that move only when a test says so."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def line(custom_id: str, text: str = "", model: str = "gpt-5.5", **body: Any) -> dict[str, Any]:
    messages = [{"role": "user", "content": text or f"Label row {custom_id}"}]
    request_body = {"model": model, "messages": messages, **body}
    return {"custom_id": custom_id, "method": "POST", "url": URL, "body": request_body}


def jsonl(rows: list[Any]) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows)


def parse_lines(data: bytes) -> list[dict[str, Any]]:
    return [json.loads(raw) for raw in data.splitlines() if raw.strip()]


class Api:
    """The Files/Batches API of one simulator through httpx and the in-process transport."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client

    async def upload(self, data: bytes, purpose: str = "batch") -> httpx.Response:
        files = {"file": ("requests.jsonl", data, "application/jsonl")}
        return await self.client.post("/files", files=files, data={"purpose": purpose})

    async def create(self, file_id: str, **extra: Any) -> httpx.Response:
        body = {"input_file_id": file_id, "endpoint": URL, "completion_window": "24h", **extra}
        return await self.client.post("/batches", json=body)

    async def submit(self, rows: list[Any], **extra: Any) -> dict[str, Any]:
        uploaded = await self.upload(jsonl(rows))
        assert uploaded.status_code == 200, uploaded.text
        created = await self.create(uploaded.json()["id"], **extra)
        assert created.status_code == 200, created.text
        batch: dict[str, Any] = created.json()
        return batch

    async def get(self, batch_id: str) -> dict[str, Any]:
        response = await self.client.get(f"/batches/{batch_id}")
        assert response.status_code == 200, response.text
        batch: dict[str, Any] = response.json()
        return batch

    async def content(self, file_id: str | None) -> list[dict[str, Any]]:
        if file_id is None:
            return []
        response = await self.client.get(f"/files/{file_id}/content")
        assert response.status_code == 200, response.text
        return parse_lines(response.content)


@pytest.fixture
async def api_for() -> AsyncIterator[Any]:
    clients: list[httpx.AsyncClient] = []

    def build(sim: Simulator) -> Api:
        client = httpx.AsyncClient(transport=sim_transport(sim), base_url="http://sim/v1")
        clients.append(client)
        return Api(client)

    yield build
    for client in clients:
        await client.aclose()


def batch_ledger(sim: Simulator) -> list[Any]:
    return [b for b in sim.ledger if b.batch_id is not None]


# --- the lifecycle ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_batch_walks_validating_in_progress_finalizing_completed_by_the_clock(
    api_for: Any,
) -> None:
    clock = Clock()
    sim = Simulator(SimConfig(batch_seconds=10), clock=clock)
    api = api_for(sim)
    rows = [line(f"row-{i}") for i in range(4)]
    batch = await api.submit(rows, metadata={"run": "r1", "chunk": "0"})
    start = clock.now
    assert batch["status"] == "validating" and batch["object"] == "batch"
    assert batch["request_counts"] == {"total": 0, "completed": 0, "failed": 0}
    assert batch["metadata"] == {"run": "r1", "chunk": "0"}
    assert batch["expires_at"] == int(start) + 24 * 3600 and batch["created_at"] == int(start)
    seen = []
    for offset in (0.5, 1.0, 3.0, 5.0, 9.0, 9.9, 10.0):
        clock.now = start + offset
        got = await api.get(batch["id"])
        seen.append((offset, got["status"], got["request_counts"]["completed"]))
    assert seen == [
        (0.5, "validating", 0),
        (1.0, "in_progress", 0),
        (3.0, "in_progress", 1),
        (5.0, "in_progress", 2),
        (9.0, "finalizing", 4),
        (9.9, "finalizing", 4),
        (10.0, "completed", 4),
    ]
    assert batch_ledger(sim) != []  # billed once it ended, not before
    done = await api.get(batch["id"])
    assert done["request_counts"] == {"total": 4, "completed": 4, "failed": 0}
    assert done["in_progress_at"] == int(start + 1) and done["finalizing_at"] == int(start + 9)
    assert done["completed_at"] == int(start + 10) and done["error_file_id"] is None
    assert done["failed_at"] is None and done["cancelled_at"] is None and done["errors"] is None
    output = await api.content(done["output_file_id"])
    assert [o["custom_id"] for o in output] == [f"row-{i}" for i in range(4)]
    # Each answer is the one a synchronous call gets for the same body, usage and all.
    sync = Simulator(SimConfig())
    for out, row in zip(output, rows, strict=True):
        assert out["id"].startswith("batch_req_") and out["error"] is None
        response = out["response"]
        assert response["status_code"] == 200 and response["request_id"].startswith("req_")
        body = response["body"]
        assert body["object"] == "chat.completion" and body["service_tier"] == "default"
        plain = await sync.handle(SimRequest("POST", URL, {}, json.dumps(row["body"]).encode()))
        assert plain.body is not None
        expected = json.loads(plain.body)
        assert body["usage"] == expected["usage"] and body["choices"] == expected["choices"]
    # Billed once per line, at the batch tier, however often it is read afterwards.
    for _ in range(3):
        await api.get(batch["id"])
    billed = batch_ledger(sim)
    assert sorted(b.custom_id for b in billed) == [f"row-{i}" for i in range(4)]
    assert {b.batch_id for b in billed} == {batch["id"]} and {b.service_tier for b in billed} == {
        "batch"
    }
    assert [b.response_id for b in billed] == [o["response"]["body"]["id"] for o in output]
    assert [b.usage for b in billed] == [o["response"]["body"]["usage"] for o in output]
    assert billed[0].request_key == request_key("gpt-5.5", rows[0]["body"]["messages"])
    stats = json.loads(sim.stats_json())
    assert stats["billed_by_batch"] == {batch["id"]: 4} and stats["most_billed_per_custom_id"] == 1
    assert sim.stats["batches_completed"] == 1 and sim.stats["batch_lines_billed"] == 4


@pytest.mark.anyio
async def test_batch_seconds_zero_ends_at_the_first_retrieve(api_for: Any) -> None:
    sim = Simulator(SimConfig(batch_seconds=0), clock=Clock())
    api = api_for(sim)
    batch = await api.submit([line("a"), line("b")])
    assert batch["status"] == "validating" and batch_ledger(sim) == []
    done = await api.get(batch["id"])
    assert done["status"] == "completed" and len(batch_ledger(sim)) == 2


@pytest.mark.anyio
async def test_a_line_a_chat_call_would_refuse_gets_that_error_in_the_error_file(
    api_for: Any,
) -> None:
    sim = Simulator(SimConfig(batch_seconds=0), clock=Clock())
    api = api_for(sim)
    bad = line("bad")
    bad["body"]["messages"] = "not a list"
    done = await api.get((await api.submit([line("ok"), bad]))["id"])
    assert done["status"] == "completed"
    assert done["request_counts"] == {"total": 2, "completed": 1, "failed": 1}
    [error] = await api.content(done["error_file_id"])
    assert error["custom_id"] == "bad" and error["error"] is None
    assert error["response"]["status_code"] == 400
    assert error["response"]["body"]["error"]["param"] == "messages"
    assert [b.custom_id for b in batch_ledger(sim)] == ["ok"]


# --- validation ------------------------------------------------------------------------------


def _shapes() -> list[tuple[str, list[Any], str, int | None]]:
    get = line("x")
    get["method"] = "GET"
    elsewhere = line("x")
    elsewhere["url"] = "/v1/embeddings"
    no_id = line("x")
    del no_id["custom_id"]
    no_model = line("x")
    del no_model["body"]["model"]
    return [
        ("not json", [line("a"), b"{not json", line("c")], "invalid_json_line", 2),
        ("not utf-8", [line("a"), b"\xff\xfe"], "invalid_json_line", 2),
        ("an array", [b"[1, 2]"], "invalid_request", 1),
        ("method", [get], "invalid_request", 1),
        ("url", [line("a"), elsewhere], "invalid_url", 2),
        ("custom_id", [no_id], "missing_required_parameter", 1),
        ("model", [no_model], "invalid_request", 1),
        ("duplicate", [line("a"), line("b"), line("a")], "duplicate_custom_id", 3),
        ("two models", [line("a"), line("b", model="gpt-5.1")], "mismatched_model", 2),
        ("empty", [], "empty_file", None),
        ("too many", [line(f"r{i}") for i in range(4)], "too_many_requests", 4),
        ("unknown model", [line("a", model="gpt-x")], "model_not_found", 1),
    ]


@pytest.mark.anyio
@pytest.mark.parametrize(("case", "rows", "code", "number"), _shapes(), ids=lambda v: str(v))
async def test_a_file_that_breaks_the_rules_fails_validation_naming_the_line(
    api_for: Any, case: str, rows: list[Any], code: str, number: int | None
) -> None:
    clock = Clock()
    config = SimConfig(batch_seconds=10, batch_max_lines=3, models=("gpt-5.5", "gpt-5.1"))
    sim = Simulator(config, clock=clock)
    api = api_for(sim)
    batch = await api.submit(rows)
    assert batch["status"] == "validating"
    clock.now += 0.9
    assert (await api.get(batch["id"]))["status"] == "validating"
    clock.now += 0.2
    failed = await api.get(batch["id"])
    assert failed["status"] == "failed", case
    assert failed["failed_at"] == int(clock.now - 0.1) and failed["in_progress_at"] is None
    assert failed["errors"]["object"] == "list"
    first = failed["errors"]["data"][0]
    assert (first["code"], first["line"]) == (code, number)
    assert isinstance(first["message"], str) and first["message"]
    assert failed["request_counts"] == {"total": 0, "completed": 0, "failed": 0}
    assert failed["output_file_id"] is None and failed["error_file_id"] is None
    assert sim.ledger == []


@pytest.mark.anyio
async def test_create_refuses_bad_requests_synchronously(api_for: Any) -> None:
    sim = Simulator(SimConfig(), clock=Clock())
    api = api_for(sim)
    file_id = (await api.upload(jsonl([line("a")]))).json()["id"]
    other = (await api.upload(jsonl([line("a")]), purpose="user_data")).json()["id"]
    cases = [
        ({"input_file_id": "file-nope"}, 404, "id"),
        ({"input_file_id": other}, 400, "input_file_id"),
        ({"input_file_id": file_id, "completion_window": "1h"}, 400, "completion_window"),
        ({"input_file_id": file_id, "endpoint": "/v1/embeddings"}, 400, "endpoint"),
        (
            {"input_file_id": file_id, "metadata": {f"k{i}": "v" for i in range(17)}},
            400,
            "metadata",
        ),
        ({"input_file_id": file_id, "metadata": {"k": 1}}, 400, "metadata"),
        ({"input_file_id": file_id, "metadata": {"k" * 65: "v"}}, 400, "metadata"),
        ({"input_file_id": file_id, "metadata": ["k"]}, 400, "metadata"),
    ]
    for extra, status, param in cases:
        body = {"endpoint": URL, "completion_window": "24h", **extra}
        response = await api.client.post("/batches", json=body)
        assert response.status_code == status, extra
        error = response.json()["error"]
        assert error["param"] == param and error["type"] == "invalid_request_error"
    assert (await api.client.post("/batches", content=b"[")).status_code == 400
    sixteen = {f"key{i}": "x" * 512 for i in range(16)}
    kept = (await api.create(file_id, metadata=sixteen)).json()
    assert kept["metadata"] == sixteen
    assert (await api.get(kept["id"]))["metadata"] == sixteen


# --- expiry, the token limit, cancel ---------------------------------------------------------


@pytest.mark.anyio
async def test_expired_lines_are_drawn_from_seed_and_custom_id(api_for: Any) -> None:
    async def run(seed: int) -> tuple[dict[str, Any], set[str], set[str], Simulator]:
        clock = Clock()
        config = SimConfig(batch_seconds=10, batch_expire_share=0.3, seed=seed)
        sim = Simulator(config, clock=clock)
        api = api_for(sim)
        batch = await api.submit([line(f"row-{i}") for i in range(40)])
        clock.now += 9.5
        assert (await api.get(batch["id"]))["status"] == "in_progress"  # never finalizing
        clock.now += 0.5
        done = await api.get(batch["id"])
        ok = {o["custom_id"] for o in await api.content(done["output_file_id"])}
        errors = await api.content(done["error_file_id"])
        assert all(e["response"] is None for e in errors)
        assert {e["error"]["code"] for e in errors} == {"batch_expired"}
        return done, ok, {e["custom_id"] for e in errors}, sim

    done, ok, lost, sim = await run(7)
    assert done["status"] == "expired" and done["expired_at"] == done["created_at"] + 10
    assert done["completed_at"] is None
    assert lost == {f"row-{i}" for i in range(40) if expires(7, f"row-{i}", 0.3)}
    assert 4 <= len(lost) <= 20 and ok | lost == {f"row-{i}" for i in range(40)} and not ok & lost
    assert done["request_counts"] == {"total": 40, "completed": len(ok), "failed": len(lost)}
    assert {b.custom_id for b in batch_ledger(sim)} == ok and len(batch_ledger(sim)) == len(ok)
    again = await run(7)
    assert again[2] == lost
    assert (await run(8))[2] != lost


@pytest.mark.anyio
async def test_a_resubmitted_expired_line_finishes_even_in_a_later_process(
    api_for: Any, tmp_path: Path
) -> None:
    clock = Clock()
    config = SimConfig(batch_seconds=10, batch_expire_share=0.3, seed=7, state_dir=str(tmp_path))
    api = api_for(Simulator(config, clock=clock))
    batch = await api.submit([line(f"row-{i}") for i in range(40)])
    clock.now += 10
    done = await api.get(batch["id"])
    lost = [e["custom_id"] for e in await api.content(done["error_file_id"])]
    assert done["status"] == "expired" and lost
    later = api_for(Simulator(config, clock=clock))  # the next run, a new process
    again = await later.submit([line(cid) for cid in lost])
    clock.now += 10
    finished = await later.get(again["id"])
    assert finished["status"] == "completed" and finished["error_file_id"] is None
    assert finished["request_counts"]["completed"] == len(lost)
    billed = read_ledger(tmp_path)
    assert sorted(b.custom_id for b in billed) == sorted(f"row-{i}" for i in range(40))


@pytest.mark.anyio
async def test_the_enqueued_token_limit_fails_a_create_that_would_pass_it(api_for: Any) -> None:
    clock = Clock()
    rows = [line(f"row-{i}", "word " * 40) for i in range(5)]
    tokens = sum(parse_body(r["body"]).prompt_tokens for r in rows)
    sim = Simulator(SimConfig(batch_seconds=10, batch_enqueued_token_limit=tokens * 2), clock=clock)
    api = api_for(sim)
    first = await api.submit(rows)
    second = await api.submit([line(f"b-{i}", "word " * 40) for i in range(5)])
    third = await api.submit([line("c-0")])  # passes the limit with the two open ones
    clock.now += 1
    assert (await api.get(first["id"]))["status"] == "in_progress"
    assert (await api.get(second["id"]))["status"] == "in_progress"
    refused = await api.get(third["id"])
    assert refused["status"] == "failed"
    [error] = refused["errors"]["data"]
    assert error["code"] == "token_limit_exceeded" and error["line"] is None
    assert "Enqueued token limit" in error["message"]
    clock.now += 9  # the open batches end: their tokens are no longer enqueued
    assert (await api.get(first["id"]))["status"] == "completed"
    fourth = await api.submit([line("d-0")])
    clock.now += 1
    assert (await api.get(fourth["id"]))["status"] == "in_progress"
    assert not any(b.batch_id == third["id"] for b in sim.ledger)


@pytest.mark.anyio
async def test_cancel_mid_way_keeps_the_finished_lines(api_for: Any) -> None:
    clock = Clock()
    sim = Simulator(SimConfig(batch_seconds=10), clock=clock)
    api = api_for(sim)
    batch = await api.submit([line(f"row-{i}") for i in range(10)])
    start = clock.now
    clock.now = start + 5  # in progress from 1 to 9: half the lines have finished
    cancelled = (await api.client.post(f"/batches/{batch['id']}/cancel")).json()
    assert cancelled["status"] == "cancelling" and cancelled["cancelling_at"] == int(start + 5)
    assert cancelled["request_counts"]["completed"] == 5
    clock.now = start + 5.9
    assert (await api.get(batch["id"]))["status"] == "cancelling"
    clock.now = start + 6
    done = await api.get(batch["id"])
    assert done["status"] == "cancelled" and done["cancelled_at"] == int(start + 6)
    assert done["request_counts"] == {"total": 10, "completed": 5, "failed": 5}
    ok = [o["custom_id"] for o in await api.content(done["output_file_id"])]
    assert ok == [f"row-{i}" for i in range(5)]
    errors = await api.content(done["error_file_id"])
    assert [e["custom_id"] for e in errors] == [f"row-{i}" for i in range(5, 10)]
    assert {e["error"]["code"] for e in errors} == {"batch_cancelled"}
    assert sorted(b.custom_id for b in batch_ledger(sim)) == sorted(ok)
    again = await api.client.post(f"/batches/{batch['id']}/cancel")
    assert again.status_code == 200 and again.json()["status"] == "cancelled"
    # A batch that already ended cannot be cancelled.
    finished = await api.submit([line("z")])
    clock.now += 10
    assert (await api.get(finished["id"]))["status"] == "completed"
    refused = await api.client.post(f"/batches/{finished['id']}/cancel")
    assert refused.status_code == 400 and "completed" in refused.json()["error"]["message"]
    assert (await api.client.post("/batches/batch_nope/cancel")).status_code == 404


@pytest.mark.anyio
async def test_cancel_while_validating_runs_no_line(api_for: Any) -> None:
    clock = Clock()
    sim = Simulator(SimConfig(batch_seconds=10), clock=clock)
    api = api_for(sim)
    batch = await api.submit([line("a"), line("b")])
    await api.client.post(f"/batches/{batch['id']}/cancel")
    clock.now += 1
    done = await api.get(batch["id"])
    assert done["status"] == "cancelled" and done["in_progress_at"] is None
    assert done["output_file_id"] is None
    assert [e["custom_id"] for e in await api.content(done["error_file_id"])] == ["a", "b"]
    assert sim.ledger == []


# --- listing ---------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_list_is_newest_first_and_pages_with_after_and_limit(api_for: Any) -> None:
    clock = Clock()
    sim = Simulator(SimConfig(batch_seconds=10), clock=clock)
    api = api_for(sim)
    ids = []
    for i in range(5):
        ids.append((await api.submit([line(f"r{i}")]))["id"])
        if i != 2:  # two created in the same second still list newest first
            clock.now += 1
    newest = ids[::-1]
    pages: list[list[str]] = []
    after = None
    while True:
        query = "/batches?limit=2" + (f"&after={after}" if after else "")
        page = (await api.client.get(query)).json()
        assert page["object"] == "list"
        pages.append([b["id"] for b in page["data"]])
        assert page["first_id"] == pages[-1][0] and page["last_id"] == pages[-1][-1]
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert pages == [newest[:2], newest[2:4], newest[4:]]
    whole = (await api.client.get("/batches")).json()
    assert [b["id"] for b in whole["data"]] == newest and whole["has_more"] is False
    assert whole["data"][-1]["status"] == "in_progress"  # listing moves batches on too
    for bad in ("limit=0", "limit=101", "limit=x", "after=batch_unknown"):
        response = await api.client.get(f"/batches?{bad}")
        assert response.status_code == 400 and response.json()["error"]["param"] in bad


# --- files -----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_files_upload_read_download_and_delete(api_for: Any) -> None:
    clock = Clock()
    sim = Simulator(SimConfig(batch_max_file_bytes=1000), clock=clock)
    api = api_for(sim)
    data = jsonl([line("a")])
    uploaded = await api.upload(data)
    meta = uploaded.json()
    assert (
        meta["object"] == "file" and meta["purpose"] == "batch" and meta["id"].startswith("file-")
    )
    assert meta["bytes"] == len(data) and meta["filename"] == "requests.jsonl"
    assert (await api.client.get(f"/files/{meta['id']}")).json() == meta
    assert (await api.client.get(f"/files/{meta['id']}/content")).content == data
    listed = (await api.client.get("/files?purpose=batch")).json()
    assert [f["id"] for f in listed["data"]] == [meta["id"]]
    deleted = await api.client.delete(f"/files/{meta['id']}")
    assert deleted.json() == {"id": meta["id"], "object": "file", "deleted": True}
    for path in (f"/files/{meta['id']}", f"/files/{meta['id']}/content"):
        gone = await api.client.get(path)
        assert gone.status_code == 404 and gone.json()["error"]["param"] == "id"
    # Over the size limit: a 413 in OpenAI's shape, and nothing stored.
    too_big = await api.upload(b"x" * 1001)
    assert too_big.status_code == 413
    assert too_big.json()["error"]["code"] == "file_too_large"
    huge = await api.client.post(
        "/files",
        content=b"x" * (1000 + 70 * 1024),
        headers={"content-type": "multipart/form-data; boundary=b"},
    )
    assert huge.status_code == 413
    assert (await api.upload(data, purpose="nonsense")).status_code == 400
    assert (await api.client.post("/files", json={"file": "x"})).status_code == 400
    assert (await api.client.get("/files/..%2F..%2Fstate.json/content")).status_code == 404
    assert (
        sim.stats["files_uploaded"] == 1 and (await api.client.get("/files")).json()["data"] == []
    )


@pytest.mark.anyio
async def test_deleting_the_input_of_an_open_batch_does_not_stop_it(api_for: Any) -> None:
    clock = Clock()
    sim = Simulator(SimConfig(batch_seconds=10), clock=clock)
    api = api_for(sim)
    batch = await api.submit([line("a"), line("b")])
    file_id = batch["input_file_id"]
    clock.now += 5
    second = (await api.create(file_id)).json()  # two batches read one file
    assert (await api.client.delete(f"/files/{file_id}")).status_code == 200
    clock.now += 5
    done = await api.get(batch["id"])
    assert done["status"] == "completed" and done["request_counts"]["completed"] == 2
    clock.now += 5
    done = await api.get(second["id"])
    assert done["status"] == "completed" and done["request_counts"]["completed"] == 2
    with pytest.raises(Reject):  # no open batch reads it any more: its bytes are gone
        sim.files.read(file_id)


# --- the state directory ---------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_state_dir_carries_files_batches_and_ledger_to_a_new_simulator(
    api_for: Any, tmp_path: Path
) -> None:
    clock = Clock()
    config = SimConfig(batch_seconds=10, state_dir=str(tmp_path))
    first = Simulator(config, clock=clock)
    batch = await api_for(first).submit([line(f"row-{i}") for i in range(6)], metadata={"k": "v"})
    clock.now += 5
    cancelled_too = await api_for(first).submit([line("c")])
    await api_for(first).client.post(f"/batches/{cancelled_too['id']}/cancel")
    # A new process: it knows the files and batches, and the clock carries on.
    clock.now += 5
    second = Simulator(config, clock=clock)
    api = api_for(second)
    done = await api.get(batch["id"])
    assert done["status"] == "completed" and done["metadata"] == {"k": "v"}
    assert (await api.get(cancelled_too["id"]))["status"] == "cancelled"
    listed = (await api.client.get("/batches")).json()
    assert [b["id"] for b in listed["data"]] == [cancelled_too["id"], batch["id"]]
    billed = read_ledger(tmp_path)
    assert sorted(b.custom_id for b in billed) == [f"row-{i}" for i in range(6)]
    assert {b.batch_id for b in billed} == {batch["id"]}
    assert all(b.service_tier == "batch" for b in billed)
    # A third process sees the ended batch and bills nothing again.
    third = Simulator(config, clock=clock)
    api3 = api_for(third)
    again = await api3.get(batch["id"])
    assert again == done
    out = await api3.content(again["output_file_id"])
    assert [o["response"]["body"]["usage"] for o in out] == [b.usage for b in billed]
    assert len(read_ledger(tmp_path)) == 6
    assert [b.response_id for b in batch_ledger(third)] == [b.response_id for b in billed]
    assert not list(tmp_path.rglob("*.tmp"))


@pytest.mark.anyio
async def test_a_crash_between_the_ledger_and_the_state_bills_each_line_once(
    api_for: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock()
    config = SimConfig(batch_seconds=10, state_dir=str(tmp_path))
    first = Simulator(config, clock=clock)
    batch = await api_for(first).submit([line(f"row-{i}") for i in range(3)])
    clock.now += 10
    saved = StateDir.save

    def die(self: StateDir, *args: Any) -> None:
        raise KeyboardInterrupt  # killed right after the ledger file was written

    monkeypatch.setattr(StateDir, "save", die)
    with pytest.raises(KeyboardInterrupt):
        await first.handle(SimRequest("GET", f"/v1/batches/{batch['id']}", {}, b""))
    assert list((tmp_path / "ledger").glob("*.json"))  # written, but no state marks it ended
    assert read_ledger(tmp_path) == []
    monkeypatch.setattr(StateDir, "save", saved)
    second = Simulator(config, clock=clock)
    assert (await api_for(second).get(batch["id"]))["status"] == "completed"
    assert sorted(b.custom_id for b in read_ledger(tmp_path)) == ["row-0", "row-1", "row-2"]


def test_a_damaged_state_dir_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "state.json").write_text("{not json")
    with pytest.raises(ValueError, match="simulator state"):
        Simulator(SimConfig(state_dir=str(tmp_path)))
    (tmp_path / "state.json").write_text(json.dumps({"version": 99}))
    with pytest.raises(ValueError, match="version"):
        Simulator(SimConfig(state_dir=str(tmp_path)))


def test_config_rejects_impossible_batch_knobs() -> None:
    for bad in (
        {"batch_seconds": -1},
        {"batch_expire_share": 1.5},
        {"batch_enqueued_token_limit": 0},
        {"batch_max_lines": 0},
        {"batch_max_file_bytes": 0},
    ):
        with pytest.raises(ValueError):
            SimConfig(**bad)


# --- hostile bytes ---------------------------------------------------------------------------


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.one_of(
        st.binary(max_size=2000),
        st.lists(
            st.one_of(
                st.binary(max_size=200),
                st.builds(
                    lambda cid, body: json.dumps(
                        {"custom_id": cid, "method": "POST", "url": URL, "body": body}
                    ).encode(),
                    st.text(max_size=8),
                    st.dictionaries(
                        st.sampled_from(
                            ["model", "messages", "max_tokens", "tools", "stream", "tool_choice"]
                            + ["response_format", "reasoning_effort", "prompt", "image_urls"]
                        ),
                        st.recursive(
                            st.none() | st.booleans() | st.integers() | st.text(max_size=10),
                            lambda inner: (
                                st.lists(inner, max_size=3)
                                | st.dictionaries(st.text(max_size=6), inner, max_size=3)
                            ),
                            max_leaves=8,
                        ),
                        max_size=4,
                    ),
                ),
                st.builds(
                    lambda cid, extra: json.dumps(
                        {"custom_id": cid, "method": "POST", "url": URL}
                        | {"body": {"model": "gpt-5.5", "messages": MESSAGES, **extra}}
                    ).encode(),
                    st.text(max_size=8),
                    st.dictionaries(
                        st.sampled_from(
                            ["max_tokens", "tools", "tool_choice", "response_format"]
                            + ["reasoning_effort", "stream", "n", "service_tier"]
                        ),
                        st.recursive(
                            st.none() | st.booleans() | st.integers() | st.text(max_size=10),
                            lambda inner: (
                                st.lists(inner, max_size=3)
                                | st.dictionaries(
                                    st.sampled_from(["type", "function", "name", "json_schema"])
                                    | st.text(max_size=6),
                                    inner,
                                    max_size=3,
                                )
                            ),
                            max_leaves=10,
                        ),
                        max_size=3,
                    ),
                ),
            ),
            max_size=8,
        ).map(lambda rows: b"\n".join(rows)),
    )
)
def test_any_uploaded_bytes_never_crash_the_simulator(data: bytes) -> None:
    """Whatever the file holds, the batch fails validation or ends; no 500, no exception."""
    import anyio

    async def go() -> None:
        sim = Simulator(SimConfig(batch_seconds=0), clock=Clock())
        boundary = "sim-boundary-7f3a"
        form = (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
                f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
                'filename="f.jsonl"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n"
            ).encode()
            + data
            + f"\r\n--{boundary}--\r\n".encode()
        )
        headers = {"content-type": f"multipart/form-data; boundary={boundary}"}
        uploaded = await sim.handle(SimRequest("POST", "/v1/files", headers, form))
        assert uploaded.status == 200 and uploaded.body is not None
        file_id = json.loads(uploaded.body)["id"]
        create = {"input_file_id": file_id, "endpoint": URL, "completion_window": "24h"}
        created = await sim.handle(
            SimRequest("POST", "/v1/batches", {}, json.dumps(create).encode())
        )
        assert created.status == 200 and created.body is not None
        batch_id = json.loads(created.body)["id"]
        got = await sim.handle(SimRequest("GET", f"/v1/batches/{batch_id}", {}, b""))
        assert got.status == 200 and got.body is not None
        batch = json.loads(got.body)
        assert batch["status"] in ("failed", "completed")
        counts = batch["request_counts"]
        assert counts["completed"] + counts["failed"] == counts["total"]
        assert len(batch_ledger(sim)) == counts["completed"]

    anyio.run(go)


@settings(max_examples=150, deadline=None)
@given(body=st.binary(max_size=600), content_type=st.text(max_size=80))
def test_any_upload_form_is_answered_never_crashes(body: bytes, content_type: str) -> None:
    import anyio

    async def go() -> None:
        sim = Simulator(SimConfig(), clock=Clock())
        headers = {"content-type": content_type}
        response = await sim.handle(SimRequest("POST", "/v1/files", headers, body))
        assert response.status in (200, 400, 413)

    anyio.run(go)


# --- over HTTP -------------------------------------------------------------------------------


def test_pipeline_sim_serves_an_upload_create_complete_download_round_trip(
    procs: Processes, tmp_path: Path
) -> None:
    server = start_server(
        procs, "--set", "batch_seconds=0", "--set", f"state_dir={tmp_path}", "--set", "seed=3"
    )
    rows = [line(f"row-{i}") for i in range(3)]
    with httpx.Client(base_url=server.url, timeout=10) as client:
        files = {"file": ("in.jsonl", jsonl(rows), "application/jsonl")}
        uploaded = client.post("/files", files=files, data={"purpose": "batch"})
        assert uploaded.status_code == 200, uploaded.text
        body = {"input_file_id": uploaded.json()["id"], "endpoint": URL, "completion_window": "24h"}
        batch = client.post("/batches", json=body, params={}).json()
        assert batch["status"] == "validating"
        done = client.get(f"/batches/{batch['id']}").json()
        assert done["status"] == "completed"
        page = client.get("/batches", params={"limit": 1}).json()
        assert [b["id"] for b in page["data"]] == [batch["id"]] and page["has_more"] is False
        output = parse_lines(client.get(f"/files/{done['output_file_id']}/content").content)
    assert [o["custom_id"] for o in output] == ["row-0", "row-1", "row-2"]
    stats = server.stats()
    assert stats["billed_by_batch"] == {batch["id"]: 3} and stats["most_billed_per_custom_id"] == 1
    assert sorted(b.custom_id for b in read_ledger(tmp_path)) == ["row-0", "row-1", "row-2"]
    assert [b.usage for b in read_ledger(tmp_path)] == [
        o["response"]["body"]["usage"] for o in output
    ]


@pytest.mark.anyio
async def test_the_http_server_refuses_a_body_over_its_cap_without_reading_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import pipeline.sim.server as server_module
    from pipeline.sim import start_server

    monkeypatch.setattr(server_module, "MAX_BODY_BYTES", 1000)
    sim = Simulator(SimConfig(batch_max_file_bytes=100))
    runner, url = await start_server(sim, "127.0.0.1", 0)
    try:
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            huge = await client.post(
                "/files",
                content=b"x" * (2 * 1024 * 1024),
                headers={"content-type": "multipart/form-data; boundary=b"},
            )
            assert huge.status_code == 413
            assert huge.json()["error"]["code"] == "request_too_large"
            files = {"file": ("in.jsonl", b"y" * 101, "application/jsonl")}
            over = await client.post("/files", files=files, data={"purpose": "batch"})
            assert over.status_code == 413 and over.json()["error"]["code"] == "file_too_large"
            small = {"file": ("in.jsonl", jsonl([line("a")])[:100], "application/jsonl")}
            fits = await client.post("/files", files=small, data={"purpose": "batch"})
            assert fits.status_code == 200
    finally:
        await runner.cleanup()
    assert sim.stats["files_uploaded"] == 1
