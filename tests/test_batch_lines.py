"""Hostile bytes in the Batch-API path: output lines, the ledger, a server that echoes
the key or refuses it."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.batch.ledger import Ledger
from pipeline.batch.lines import custom_id_of, read_line
from pipeline.errors import Exit
from pipeline.execute import execute
from pipeline.outcome import RunContext
from pipeline.redact import Redactor
from pipeline.request import Job
from tests.test_batch import FakeBatches, options, results, write_rows

JOB = Job("r1", {"model": "m"}, "h", "f.jsonl", 1)
CTX = RunContext("run", "prov")
WHEN = datetime(2026, 1, 1, tzinfo=UTC)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=20,
)


def lines() -> st.SearchStrategy[dict[str, Any]]:
    """Output/error lines: the real shapes with any value anywhere."""
    body = st.fixed_dictionaries(
        {},
        optional={
            "choices": json_values | st.just([{"message": {"content": "x"}}]),
            "usage": json_values | st.just({"prompt_tokens": 3, "completion_tokens": 2**70}),
            "error": json_values,
        },
    )
    response = st.fixed_dictionaries(
        {}, optional={"status_code": json_values | st.integers(0, 999), "body": body | json_values}
    )
    return st.fixed_dictionaries(
        {"custom_id": st.just("r1")},
        optional={"response": response | json_values, "error": json_values},
    )


@settings(max_examples=150, deadline=None)
@given(lines())
def test_any_line_is_a_row_or_pending_never_a_crash(line: dict[str, Any]) -> None:
    outcome = read_line(
        line,
        JOB,
        CTX,
        batch_id="b1",
        base_url="http://x/v1",
        started_at=WHEN,
        redactor=Redactor("sk-secret"),
    )
    assert (outcome.row is None) != (outcome.pending is None)
    if outcome.row is not None:
        assert outcome.row["status"] in ("ok", "error")
        assert outcome.row["service_tier"] == "batch" and outcome.row["batch_id"] == "b1"
    else:
        assert outcome.pending and len(outcome.pending) <= 100


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()))
def test_custom_id_of_any_bytes(raw: bytes) -> None:
    custom_id, data = custom_id_of(raw)
    assert (custom_id is None) == (data is None)
    assert custom_id is None or isinstance(custom_id, str)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.binary(max_size=80), max_size=10))
def test_a_damaged_ledger_is_read_not_fatal(tmp_path_factory: Any, garbage: list[bytes]) -> None:
    ledger = Ledger(tmp_path_factory.mktemp("out"))
    ledger.append("chunk", "c1", rows=3, model="m")
    with open(ledger.path, "ab") as fh:
        fh.write(b"\n".join(garbage))
    chunks = ledger.chunks()
    assert chunks["c1"].rows == 3


def test_a_lone_surrogate_in_an_answer_is_stored_not_fatal(tmp_path: Path) -> None:
    """``\\ud800`` in an output line's body parses to a str UTF-8 cannot encode: it once
    crashed the collection (exit 5) on every run, so the OUT's rows stayed held forever."""
    body = {
        "id": "\\udc00id",
        "object": "chat.completion",
        "model": "m",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "X"}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
    }
    raw = json.dumps({"custom_id": "r1", "response": {"status_code": 200, "body": body}})
    raw = raw.replace('"X"', '"bad \\ud800 text"').replace('"\\\\udc00id"', '"\\udc00id"')
    custom_id, data = custom_id_of(raw.encode())
    assert custom_id == "r1"
    outcome = read_line(
        data, JOB, CTX, batch_id="b1", base_url="u", started_at=WHEN, redactor=Redactor("k")
    )
    assert outcome.row is not None and outcome.row["status"] == "ok"
    assert outcome.row["prompt_tokens"] == 3 and outcome.row["completion_tokens"] == 2
    from pipeline.schema import storable

    stored = storable(outcome.row)
    assert str(stored["content"]).encode("utf-8").startswith(b"bad ")


def test_a_line_with_4xx_is_an_error_row_with_the_servers_message() -> None:
    line = {
        "custom_id": "r1",
        "response": {
            "status_code": 400,
            "body": {"error": {"message": "bad sk-secret", "type": "invalid_request_error"}},
        },
    }
    outcome = read_line(
        line,
        JOB,
        CTX,
        batch_id="b",
        base_url="u",
        started_at=WHEN,
        redactor=Redactor("sk-secret"),
    )
    assert outcome.row is not None and outcome.row["error_type"] == "invalid_request_error"
    assert "sk-secret" not in outcome.row["error_message"]
    expired = {"custom_id": "r1", "response": None, "error": {"code": "batch_expired"}}
    assert read_line(
        expired, JOB, CTX, batch_id="b", base_url="u", started_at=WHEN, redactor=Redactor()
    ).pending == ("batch_expired")
    throttled = {"custom_id": "r1", "response": {"status_code": 429, "body": {}}}
    assert read_line(
        throttled, JOB, CTX, batch_id="b", base_url="u", started_at=WHEN, redactor=Redactor()
    ).pending == ("HTTP 429 rate_limit_error")


class EchoingKey(FakeBatches):
    """Puts the key it was sent into every answer and every error."""

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.key = request.headers.get("authorization", "").removeprefix("Bearer ")
        return super().handle(request)

    @staticmethod
    def _answer(cid: str, model: str, content: str | None = None) -> dict[str, Any]:
        answer = FakeBatches._answer(cid, model, content)
        answer["choices"][0]["message"]["content"] = "your key is KEY"
        return answer

    def _run(self, batch: dict[str, Any], status: str, answer_share: float = 1.0) -> None:
        super()._run(batch, status, answer_share)
        for kind in ("output_file_id", "error_file_id"):
            if batch.get(kind):
                data = self.files[batch[kind]]
                self.files[batch[kind]] = data.replace(b"KEY", self.key.encode())


def test_a_server_echoing_the_key_never_gets_it_on_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = "sk-live-0123456789abcdef"
    monkeypatch.setenv("BATCH_TEST_KEY", key)
    fake = EchoingKey()
    source = write_rows(tmp_path / "rows.jsonl", 5)
    opts = options(tmp_path, source, api_key_env="BATCH_TEST_KEY")
    result = execute(opts, transport=fake.transport())
    assert result.exit_code == 0
    rows = results(tmp_path / "out")
    assert len(rows) == 5 and all("[REDACTED]" in r["content"] for r in rows)
    for path in (tmp_path / "out").rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert key.encode() not in data, path
    for part in (tmp_path / "out" / "results").rglob("*.parquet"):
        assert key not in json.dumps(pq.read_table(part).to_pylist(), default=str)


class Refusing(FakeBatches):
    def handle(self, request: httpx.Request) -> httpx.Response:
        return httpx.Response(401, json={"error": {"message": "bad key", "type": "invalid_key"}})


def test_a_refused_key_stops_the_run_exit_3(tmp_path: Path) -> None:
    source = write_rows(tmp_path / "rows.jsonl", 5)
    result = execute(options(tmp_path, source), transport=Refusing().transport())
    assert result.exit_code == Exit.FATAL
    assert result.fatal is not None and "401" in result.fatal
    (chunk,) = Ledger(tmp_path / "out").chunks().values()
    assert chunk.state == "abandoned"  # never created: its rows are pending again


def test_ids_from_the_provider_or_the_ledger_never_become_paths() -> None:
    from pipeline.batch.api import _batch
    from pipeline.batch.ledger import safe_id
    from pipeline.errors import TransportError

    assert safe_id("batch_abc-1.2") == "batch_abc-1.2"
    for bad in ("../x", "a/b", "", "x" * 300, "a..b", None, 7, "batch\n1", ".hidden"):
        assert safe_id(bad) is None
    with pytest.raises(TransportError):
        _batch({"id": "../../etc/passwd", "status": "completed"})
    with pytest.raises(TransportError):
        _batch({"id": "batch_sk-secret"}, Redactor("sk-secret"))
    odd = _batch({"id": "b1", "status": "<script>", "output_file_id": "../../x"})
    assert odd["status"] == "unknown" and odd["output_file_id"] is None


def test_a_batch_object_of_any_shape_is_checked_not_fatal() -> None:
    """A status that is an object (unhashable) or counts of the wrong type once stopped
    every run on the OUT with an internal error (exit 5), and ``pipeline batches`` too."""
    from pipeline.batch.api import _batch
    from pipeline.batch.listing import _row, _table

    odd = _batch(
        {
            "id": "b1",
            "status": {"x": 1},
            "request_counts": {"total": True, "completed": -4, "failed": "lots"},
        }
    )
    assert odd["status"] == "unknown" and odd["request_counts"] == {}
    for status in ([1], 7, None):
        assert _batch({"id": "b1", "status": status})["status"] == "unknown"
    assert _batch({"id": "b1", "request_counts": [1, 2]})["request_counts"] == {}
    counts = {"total": 3, "completed": 2, "failed": 1, "x": 9}
    assert _batch({"id": "b1", "request_counts": counts})["request_counts"] == {
        "total": 3, "completed": 2, "failed": 1
    }  # fmt: skip
    from pipeline.batch.ledger import OPEN, Chunk

    chunk = Chunk("c1", rows=3, state=OPEN, batch_id="b1")
    live = _batch({"id": "b1", "status": "in_progress", "request_counts": {"completed": "lots"}})
    from pipeline.batch.listing import Listed

    assert "in_progress" in _table([_row(Listed(chunk, live), 0.0, {})])


def test_a_key_rebuilt_by_json_escapes_in_a_batch_object_is_scrubbed(tmp_path: Path) -> None:
    """The raw bytes show no key (``\\u0073k-...``), parsing rebuilds it: the batch's
    error code went to stderr, the ledger and the manifest as the reason rows went
    back to pending."""
    import anyio

    from pipeline.batch.api import BatchApi

    key = "sk-secret-123456"
    escaped = "\\u0073" + key[1:]
    raw = (
        '{"id": "b1", "status": "failed", "errors": {"data": [{"code": "bad ESC",'
        ' "message": "ESC"}]}, "metadata": {"ESC": "ESC"}}'
    ).replace("ESC", escaped)

    def handle(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=raw.encode())

    api = BatchApi("http://h/v1", key, transport=httpx.MockTransport(handle))

    async def go() -> dict[str, Any]:
        try:
            return await api.retrieve("b1")
        finally:
            await api.aclose()

    assert key not in raw
    batch = anyio.run(go)
    assert key not in json.dumps(batch)
    assert batch["errors"]["data"][0]["code"] == "bad [REDACTED]"
    from pipeline.batch.collect import _batch_error

    assert key not in str(_batch_error(batch))


def test_a_ledger_naming_paths_is_not_followed(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "out")
    victim = tmp_path / "victim.jsonl"
    victim.write_text("keep me")
    ledger.append("chunk", "../../victim", rows=1)
    ledger.append("created", "../../victim", batch_id="b1")
    assert ledger.chunks() == {}
    for chunk in ledger.chunks():
        ledger.remove_files(chunk)
    assert victim.read_text() == "keep me"


def test_a_download_past_the_cap_is_refused_and_leaves_no_file(tmp_path: Path) -> None:
    import anyio

    from pipeline.batch.api import BatchApi
    from pipeline.errors import TransportError

    def endless(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b"x" * 10_000 + b"\n" + b"y" * 10_000)

    async def no_wait(_: float) -> None:
        return None

    api = BatchApi(
        "http://h/v1", None, transport=httpx.MockTransport(endless),
        max_download_bytes=5_000, max_attempts=2, sleep=no_wait,
    )  # fmt: skip
    target = tmp_path / "out.jsonl"

    async def go() -> None:
        try:
            await api.download("file-1", target)
        finally:
            await api.aclose()

    with pytest.raises(TransportError, match="passed 5,000 bytes"):
        anyio.run(go)
    assert list(tmp_path.iterdir()) == []


def test_a_key_rebuilt_by_json_escapes_in_an_output_line_never_reaches_the_row() -> None:
    """Output files are scrubbed as bytes; a ``\\u`` escape rebuilds the key on parsing.
    The row keeps no part of it: not in tool calls, not in an error message cut short."""
    key = "sk-live-0123456789abcdef"
    escaped = "".join(f"\\u{ord(c):04x}" for c in key)
    redactor = Redactor(key)

    def line(status: int, body_text: str) -> dict[str, Any]:
        body = json.loads(body_text)  # the decoder rebuilds the key from its escapes
        return {"custom_id": "r1", "response": {"status_code": status, "body": body}}

    call = (
        '{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "'
        + escaped
        + '"}}'
    )
    answer = (
        '{"choices": [{"message": {"content": "x", "tool_calls": ['
        + call
        + ']}, "finish_reason": "tool_calls"}], "usage": {"prompt_tokens": 1, '
        + '"completion_tokens": 1}}'
    )
    padded = (
        '{"error": {"message": "'
        + "y" * 985
        + " "
        + escaped
        + '", "type": "invalid_request_error"}}'
    )
    for status, text in ((200, answer), (400, padded)):
        outcome = read_line(
            line(status, text),
            JOB,
            CTX,
            batch_id="b",
            base_url="u",
            started_at=WHEN,
            redactor=redactor,
        )
        assert outcome.row is not None
        stored = json.dumps(outcome.row, default=str)
        assert key not in stored and key[:12] not in stored, (status, stored[-300:])


@settings(max_examples=300, deadline=None)
@given(
    custom_id=st.text(min_size=1, max_size=2000),
    before=st.dictionaries(st.sampled_from(["id", "x"]), st.text(max_size=20), max_size=2),
    ascii_only=st.booleans(),
)
def test_the_custom_id_of_a_line_is_read_from_its_start_whatever_it_holds(
    custom_id: str, before: dict[str, str], ascii_only: bool
) -> None:
    """What names the row of a line too long to read: escapes, quotes, non-ASCII and
    lone surrogates come back as the id itself."""
    from pipeline.batch.lines import custom_id_in_prefix

    head = json.dumps({**before, "custom_id": custom_id}, ensure_ascii=ascii_only)
    try:
        line = (head[:-1] + ', "response": {"body": "' + "x" * 50).encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate written raw: not UTF-8 at all
        return
    assert custom_id_in_prefix(line) == custom_id


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000))
def test_the_start_of_any_line_names_a_row_or_none_and_never_raises(raw: bytes) -> None:
    from pipeline.batch.lines import custom_id_in_prefix

    found = custom_id_in_prefix(raw)
    assert found is None or (isinstance(found, str) and found)


def test_only_the_lines_own_custom_id_counts_not_one_nested_in_the_answer() -> None:
    from pipeline.batch.lines import custom_id_in_prefix

    nested = b'{"id": "r", "response": {"body": {"metadata": {"custom_id": "other"}}}, '
    assert custom_id_in_prefix(nested + b'"custom_id": "mine", "x": "' + b"y" * 100) == "mine"
    assert custom_id_in_prefix(b'{"response": {"body": "' + b"y" * 100) is None  # runs past
    assert custom_id_in_prefix(b'{"id": 1} "custom_id": "late"') is None  # object ended
    assert custom_id_in_prefix(b'["custom_id", "x"]') is None
