"""Whatever a server sends, a run stays bounded, keeps the key, and names the cause.

Everything here talks to ``tests.hostile_gateway`` over loopback, first through the
real ChatClient (both transports), then through ``pipeline run`` end to end.
"""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path
from typing import Any

import anyio
import pyarrow.parquet as pq
import pytest

from pipeline.client import ChatClient, Connection
from pipeline.errors import ApiError, ConfigurationError, Kind, RequestError, TransportError
from tests.conftest import invoke, write_jsonl
from tests.hostile_gateway import HostileGateway, hostile_gateway

__all__ = ["hostile_gateway"]  # the fixture, imported for pytest to find

KEY = "sk-hostile-4f9c1e77d2b84a0c"
BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
TRANSPORTS = ["aiohttp", "httpx"]


async def _fail(gateway: HostileGateway, mode: str, **options: Any) -> RequestError:
    """Send one request in ``mode``; it must fail with a RequestError, within seconds."""
    gateway.mode = mode
    options.setdefault("deadline", 0.5)
    options.setdefault("timeout", 5.0)
    options.setdefault("max_response_bytes", 2**20)
    url = options.pop("url", gateway.base_url)
    client = ChatClient([url], KEY, Connection(**options))
    try:
        with anyio.fail_after(10):
            with pytest.raises(RequestError) as caught:
                await client.complete(BODY)
    finally:
        await client.aclose()
    return caught.value


# -- bounded per request ----------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("stream", [False, True])
async def test_a_trickling_server_is_cut_at_the_deadline(
    hostile_gateway: HostileGateway, transport: str, stream: bool
) -> None:
    """One byte every 50 ms never trips the 5 s read timeout; the deadline ends it."""
    started = anyio.current_time()
    error = await _fail(hostile_gateway, "trickle", http_transport=transport, stream=stream)
    assert isinstance(error, TransportError) and error.kind is Kind.RETRY
    assert error.error_type == "timeout" and "deadline" in str(error)
    assert anyio.current_time() - started < 3


@pytest.mark.anyio
@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize(
    ("mode", "stream"),
    [("huge_body", False), ("huge_body", True), ("endless_sse", True), ("long_sse_line", True)],
)
async def test_an_answer_past_the_size_cap_fails_the_attempt(
    hostile_gateway: HostileGateway, transport: str, mode: str, stream: bool
) -> None:
    error = await _fail(
        hostile_gateway, mode, http_transport=transport, stream=stream, deadline=30.0
    )
    assert isinstance(error, TransportError) and error.kind is Kind.RETRY
    assert error.error_type == "response_too_large"


@pytest.mark.anyio
async def test_an_over_long_sse_line_fails_below_the_answer_cap(
    hostile_gateway: HostileGateway,
) -> None:
    """The line cap holds on its own: a line never ends, the answer cap is far away."""
    from pipeline import client as client_module

    error = await _fail(
        hostile_gateway,
        "long_sse_line",
        stream=True,
        deadline=30.0,
        max_response_bytes=client_module.MAX_SSE_LINE_BYTES * 4,
    )
    assert error.error_type == "response_too_large" and "line" in str(error)


# -- nothing in an answer crashes a run ---------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("mode", ["bad_status_line", "long_header"])
async def test_an_answer_that_is_not_http_is_a_protocol_error(
    hostile_gateway: HostileGateway, mode: str, stream: bool
) -> None:
    """aiohttp raises ClientResponseError here, which httpx-aiohttp does not map."""
    error = await _fail(hostile_gateway, mode, stream=stream)
    assert isinstance(error, TransportError) and error.kind is Kind.RETRY
    assert error.error_type == "protocol_error"


@pytest.mark.anyio
async def test_a_bad_status_line_is_a_protocol_error_on_httpx_too(
    hostile_gateway: HostileGateway,
) -> None:
    error = await _fail(hostile_gateway, "bad_status_line", http_transport="httpx")
    assert error.error_type == "protocol_error" and error.kind is Kind.RETRY


@pytest.mark.anyio
@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("stream", [False, True])
async def test_a_nested_json_bomb_is_a_malformed_answer(
    hostile_gateway: HostileGateway, transport: str, stream: bool
) -> None:
    error = await _fail(hostile_gateway, "nested_json", http_transport=transport, stream=stream)
    assert isinstance(error, TransportError) and error.kind is Kind.RETRY
    assert error.error_type == "malformed_response"


@pytest.mark.anyio
@pytest.mark.parametrize("stream", [False, True])
async def test_an_ok_answer_without_usage_is_kept_with_unknown_tokens(
    hostile_gateway: HostileGateway, stream: bool
) -> None:
    hostile_gateway.mode = "no_usage"
    client = ChatClient([hostile_gateway.base_url], KEY, Connection(stream=stream))
    try:
        reply = await client.complete(BODY)
    finally:
        await client.aclose()
    assert reply.answer.content == "fine"
    assert reply.answer.usage.prompt_tokens is None and reply.answer.usage.total_tokens is None


# -- diagnostics that tell the truth ------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("stream", [False, True])
async def test_a_redirect_stops_the_run_naming_the_target(
    hostile_gateway: HostileGateway, transport: str, stream: bool
) -> None:
    error = await _fail(hostile_gateway, "redirect", http_transport=transport, stream=stream)
    assert isinstance(error, ConfigurationError) and error.kind is Kind.FATAL
    assert error.error_type == "redirect" and error.http_status == 307
    assert f"https://127.0.0.1:{hostile_gateway.port}/v1/chat/completions" in str(error)
    assert hostile_gateway.requests == 1  # not followed


@pytest.mark.anyio
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_certificate_that_fails_verification_is_named(
    hostile_gateway: HostileGateway, transport: str
) -> None:
    error = await _fail(
        hostile_gateway, "ok", url=hostile_gateway.tls_base_url, http_transport=transport
    )
    assert isinstance(error, ConfigurationError) and error.kind is Kind.FATAL
    assert error.error_type == "tls"
    assert "certificate verification failed" in str(error) and "self-signed" in str(error)
    assert "timed out" not in str(error)


@pytest.mark.anyio
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_refused_connection_is_not_called_a_timeout(transport: str) -> None:
    with socket.socket() as sock:  # a port nothing listens on once it is closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = ChatClient([f"http://127.0.0.1:{port}"], KEY, Connection(http_transport=transport))
    try:
        with pytest.raises(TransportError) as caught:
            await client.complete(BODY)
    finally:
        await client.aclose()
    assert caught.value.error_type == "connection_error"
    assert "timed out" not in str(caught.value)


# -- the key never leaves the process -----------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("mode", ["echo_401", "echo_400", "echo_header"])
async def test_a_key_echoed_in_an_error_is_redacted(
    hostile_gateway: HostileGateway, transport: str, mode: str
) -> None:
    error = await _fail(hostile_gateway, mode, http_transport=transport)
    assert isinstance(error, ApiError)
    texts = [str(error), error.message, error.error_type, *error.headers.values()]
    assert all(KEY not in text for text in texts)
    assert "[REDACTED]" in str(error)


@pytest.mark.anyio
@pytest.mark.parametrize(("mode", "stream"), [("echo_content", False), ("echo_content", True)])
async def test_a_key_echoed_in_the_answer_is_redacted(
    hostile_gateway: HostileGateway, mode: str, stream: bool
) -> None:
    hostile_gateway.mode = mode
    client = ChatClient([hostile_gateway.base_url], KEY, Connection(stream=stream))
    try:
        reply = await client.complete(BODY)
    finally:
        await client.aclose()
    assert reply.answer.content == "you sent Bearer [REDACTED]"


@pytest.mark.anyio
async def test_a_key_rebuilt_by_json_escapes_is_redacted(hostile_gateway: HostileGateway) -> None:
    """The raw bytes hold ``\\u0073\\u006b...``; only the parsed text holds the key."""
    hostile_gateway.mode = "echo_escaped"
    client = ChatClient([hostile_gateway.base_url], KEY)
    try:
        reply = await client.complete(BODY)
    finally:
        await client.aclose()
    assert reply.answer.content == "you sent Bearer [REDACTED]"


# -- end to end: pipeline run -------------------------------------------------------------


def _run(out: Path, src: Path, base_url: str, *extra: str) -> tuple[int, str, str]:
    return invoke(
        "run", str(src), "--out", str(out), "--base-url", base_url,
        "--api-key-env", "HOSTILE_KEY", "--model", "m", "--concurrency", "1", *extra,
    )  # fmt: skip


def _rows(out: Path) -> dict[str, dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    for part in sorted((out / "results").rglob("*.parquet")):
        for row in pq.read_table(part).to_pylist():
            rows[row["id"]] = row
    return rows


def _manifests(out: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]


def test_run_keeps_the_key_out_of_every_file_and_output(
    hostile_gateway: HostileGateway, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every place server text lands: Parquet, journal, manifest, stderr (text and
    JSON logs), ``sql``, ``runs --format json``, ``export``: none holds the key."""
    monkeypatch.setenv("HOSTILE_KEY", KEY)
    hostile_gateway.mode = "by_prompt"
    modes = ["echo_400", "echo_content", "echo_escaped", "echo_header", "echo_401"]
    src = write_jsonl(tmp_path / "rows.jsonl", [{"id": m, "prompt": m} for m in modes])
    out = tmp_path / "out"
    outputs: list[str] = []

    code, stdout, stderr = _run(out, src, hostile_gateway.base_url, "--max-attempts", "2")
    outputs += [stdout, stderr]
    assert code == 3, stderr  # the echoed 401 stops the run
    assert "Token Bearer [REDACTED] is invalid" in stderr
    rows = _rows(out)
    assert rows["echo_400"]["status"] == "error"
    assert rows["echo_400"]["error_message"].endswith("bad request from Bearer [REDACTED]")
    assert rows["echo_content"]["content"] == "you sent Bearer [REDACTED]"
    assert rows["echo_escaped"]["content"] == "you sent Bearer [REDACTED]"
    assert rows["echo_header"]["error_message"].endswith("upstream refused Bearer [REDACTED]")
    assert "[REDACTED]" in (_manifests(out)[0]["fatal"] or "")

    # Again, with JSON logs and progress on: the 401 row is sent again and stops it again.
    code, stdout, stderr = _run(out, src, hostile_gateway.base_url, "--log-format", "json")
    outputs += [stdout, stderr]
    assert code == 3 and "[REDACTED]" in stderr
    for args in (
        ("sql", str(out), "SELECT * FROM results", "--format", "json"),
        ("sql", str(out), "SELECT * FROM latest"),
        ("runs", str(out), "--format", "json"),
        ("export", str(out), "--format", "jsonl"),
        ("export", str(out), "--format", "csv"),
    ):
        code, stdout, stderr = invoke(*args)
        assert code == 0, stderr
        outputs += [stdout, stderr]
    assert "[REDACTED]" in "".join(outputs[-10:])  # the commands did show the server's text

    leaks = [str(p) for p in out.rglob("*") if p.is_file() and KEY.encode() in p.read_bytes()]
    for part in (out / "results").rglob("*.parquet"):  # compressed pages: read them too
        if KEY in json.dumps(pq.read_table(part).to_pylist(), default=str):
            leaks.append(str(part))
    leaks += [f"output {i}" for i, text in enumerate(outputs) if KEY in text]
    assert leaks == []


def test_run_keeps_an_encoded_echo_of_the_key_out_of_every_file_and_output(
    hostile_gateway: HostileGateway, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A key with ``+ / =`` (as base64-style keys have) echoed percent-encoded and as
    base64, in an error, a header and an answer: no form of it is stored or shown."""
    import base64
    from urllib.parse import quote, quote_plus

    key = "az+Kq/9xZr7Lm+/Wn0pQ=="
    monkeypatch.setenv("HOSTILE_KEY", key)
    hostile_gateway.mode = "by_prompt"
    modes = ["echo_encoded", "echo_encoded_content"]
    src = write_jsonl(tmp_path / "rows.jsonl", [{"id": m, "prompt": m} for m in modes])
    out = tmp_path / "out"
    code, stdout, stderr = _run(out, src, hostile_gateway.base_url, "--max-attempts", "1")
    assert code == 1, stderr  # the 400 row failed; the run finished
    rows = _rows(out)
    assert rows["echo_encoded"]["error_type"] == "invalid_request_error"
    # Around a base64 echo, what is left is the neighbours' bytes ("Bearer ") and at
    # most one character that mixes a few of the key's bits with them, and padding.
    message = rows["echo_encoded"]["error_message"]
    assert "bad key [REDACTED] (forwarded as QmVhcmVyIG[REDACTED]" in message
    assert re.fullmatch(
        r"key=\[REDACTED\]; b64=\[REDACTED\].?=*", rows["echo_encoded_content"]["content"]
    )
    forms = {
        key,
        quote(key, safe=""),
        quote_plus(key),
        base64.b64encode(key.encode()).decode().rstrip("="),
        base64.b64encode(f"Bearer {key}".encode()).decode().rstrip("="),
    }
    outputs = [stdout, stderr]
    for args in (("sql", str(out), "SELECT * FROM results", "--format", "json"),):
        code, text, err = invoke(*args)
        assert code == 0, err
        outputs += [text, err]
    stored = [p.read_bytes() for p in out.rglob("*") if p.is_file()]
    stored += [json.dumps(pq.read_table(p).to_pylist(), default=str).encode()
               for p in (out / "results").rglob("*.parquet")]  # fmt: skip
    leaks = [f for f in forms for blob in stored if f.encode() in blob]
    leaks += [f for f in forms for text in outputs if f in text]
    assert leaks == []


def test_a_gateway_flooding_cookies_costs_no_row_and_is_told_once(
    hostile_gateway: HostileGateway, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOSTILE_KEY", KEY)
    hostile_gateway.mode = "cookie_flood"
    src = write_jsonl(tmp_path / "rows.jsonl", [{"id": i, "prompt": f"hi {i}"} for i in range(30)])
    code, _, stderr = _run(tmp_path / "out", src, hostile_gateway.base_url)
    assert code == 0, stderr
    assert len(_rows(tmp_path / "out")) == 30
    assert stderr.count("sets more cookies than are kept") == 1


def test_run_bounds_every_attempt_and_retries_it(
    hostile_gateway: HostileGateway, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOSTILE_KEY", KEY)
    hostile_gateway.mode = "by_prompt"
    modes = ["trickle", "huge_body", "bad_status_line", "nested_json", "ok", "no_usage"]
    src = write_jsonl(tmp_path / "rows.jsonl", [{"id": m, "prompt": m} for m in modes])
    out = tmp_path / "out"
    code, _, stderr = _run(
        out, src, hostile_gateway.base_url,
        "--deadline", "0.5", "--max-response-mb", "1", "--max-attempts", "2", "--quiet",
    )  # fmt: skip
    assert code == 1, stderr  # some rows failed; the run finished
    rows = _rows(out)
    expected = {
        "trickle": "timeout",
        "huge_body": "response_too_large",
        "bad_status_line": "protocol_error",
        "nested_json": "malformed_response",
    }
    for mode, error_type in expected.items():
        assert rows[mode]["status"] == "error" and rows[mode]["error_type"] == error_type
        assert rows[mode]["attempts"] == 2  # retried under the usual policy
        assert hostile_gateway.modes_seen.count(mode) == 2
    assert rows["ok"]["status"] == "ok" and rows["ok"]["total_tokens"] == 7
    assert rows["no_usage"]["status"] == "ok" and rows["no_usage"]["total_tokens"] is None


def test_run_stops_on_a_redirect_naming_the_target(
    hostile_gateway: HostileGateway, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOSTILE_KEY", KEY)
    hostile_gateway.mode = "redirect"
    src = write_jsonl(tmp_path / "rows.jsonl", [{"id": f"r{i}", "prompt": "x"} for i in range(5)])
    out = tmp_path / "out"
    code, _, stderr = _run(out, src, hostile_gateway.base_url, "--quiet")
    assert code == 3, stderr
    assert f"https://127.0.0.1:{hostile_gateway.port}/v1/chat/completions" in stderr
    assert "--base-url" in stderr
    assert hostile_gateway.requests == 1  # not retried, not followed
    assert "redirect" in (_manifests(out)[0]["fatal"] or "")


def test_run_stops_on_a_certificate_that_fails_verification(
    hostile_gateway: HostileGateway, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOSTILE_KEY", KEY)
    src = write_jsonl(tmp_path / "rows.jsonl", [{"id": f"r{i}", "prompt": "x"} for i in range(5)])
    code, _, stderr = _run(tmp_path / "out", src, hostile_gateway.tls_base_url, "--quiet")
    assert code == 3, stderr
    assert "TLS certificate verification failed" in stderr and "SSL_CERT_FILE" in stderr
    assert "timed out" not in stderr


@pytest.mark.parametrize(
    "url",
    [
        "http://user:hunter2-pass@127.0.0.1:9/v1",
        "https://hunter2-pass@gw.example/v1",
        "https://gw.example/v1?api_key=hunter2-pass",
        "https://gw.example/v1#hunter2-pass",
    ],
)
def test_a_base_url_with_credentials_is_refused_before_anything_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    monkeypatch.setenv("HOSTILE_KEY", KEY)
    src = write_jsonl(tmp_path / "rows.jsonl", [{"id": "a", "prompt": "x"}])
    out = tmp_path / "out"
    code, stdout, stderr = _run(out, src, url)
    assert code == 2
    assert "credentials" in stderr or "query" in stderr
    assert "hunter2" not in stdout + stderr
    assert not out.exists()


def test_a_base_url_with_credentials_in_a_job_file_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOSTILE_KEY", KEY)
    write_jsonl(tmp_path / "rows.jsonl", [{"id": "a", "prompt": "x"}])
    job = tmp_path / "job.toml"
    job.write_text(
        'source = "rows.jsonl"\nout = "out"\napi_key_env = "HOSTILE_KEY"\nmodel = "m"\n'
        'base_url = "https://me:hunter2-pass@gw.example/v1"\n'
    )
    code, stdout, stderr = invoke("run", str(job))
    assert code == 2 and "hunter2" not in stdout + stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("url", "warned"),
    [
        ("http://10.1.2.3:8080/v1", True),
        ("http://gw.example/v1", True),
        ("http://127.0.0.1:8080/v1", False),
        ("http://localhost:8080/v1", False),
        ("http://[::1]:8080/v1", False),
        ("https://gw.example/v1", False),
    ],
)
def test_plain_http_to_another_host_warns_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, url: str, warned: bool
) -> None:
    """An input with no valid row sends nothing, so no server is needed."""
    monkeypatch.setenv("HOSTILE_KEY", KEY)
    src = write_jsonl(tmp_path / "rows.jsonl", ["{not json"])
    code, _, stderr = _run(tmp_path / "out", src, url, "--quiet")
    assert code == 1, stderr
    assert stderr.count("plain http://") == (1 if warned else 0)


def test_run_help_says_how_deadline_and_timeout_relate() -> None:
    code, stdout, _ = invoke("run", "--help")
    assert code == 0
    text = " ".join(stdout.split())
    assert "--deadline" in text and "--max-response-mb" in text
    assert "--timeout bounds each wait" in text


@pytest.mark.parametrize("option", ["--deadline", "--max-response-mb"])
def test_a_bound_that_is_not_positive_is_a_usage_error(tmp_path: Path, option: str) -> None:
    src = write_jsonl(tmp_path / "rows.jsonl", [{"id": "a", "prompt": "x"}])
    code, _, stderr = _run(tmp_path / "out", src, "http://127.0.0.1:9/v1", option, "0")
    assert code == 2 and option in stderr
    assert not (tmp_path / "out").exists()
