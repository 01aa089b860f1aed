"""Every error body people meet, from servers other than the gateways this was built on.

vLLM, FastAPI apps, llama.cpp's server, llama-cpp-python, Ollama, LiteLLM, plain text,
HTML pages from nginx and Cloudflare, empty bodies: each is classified by its status
(429 and 5xx retried, 400/404/413/422 end the row, 401/402/403 stop the run) and keeps
a short readable message, never a whole page and never a crash. The bodies are written
the way those servers send them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.config import RunOptions
from pipeline.errors import ApiError, Kind, TransportError
from pipeline.execute import execute
from pipeline.redact import Redactor
from pipeline.wire import MAX_ERROR_MESSAGE, StreamAssembler, parse_completion, parse_error
from tests.conftest import FakeClock, read_results, write_jsonl

HTML = {"content-type": "text/html"}
TEXT = {"content-type": "text/plain; charset=utf-8"}

NGINX_502 = (
    "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    "<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx/1.24.0</center>\r\n"
    "</body>\r\n</html>\r\n"
)
NGINX_504 = NGINX_502.replace("502 Bad Gateway", "504 Gateway Time-out")
NGINX_413 = NGINX_502.replace("502 Bad Gateway", "413 Request Entity Too Large")


def cloudflare(code: int, what: str) -> str:
    """A Cloudflare error page: ~40 KB of styles and markup around one title."""
    style = "".join(f".cf-{i}{{margin:{i}px;padding:{i}px}}" for i in range(2000))
    return (
        '<!DOCTYPE html>\n<!--[if lt IE 7]> <html class="no-js ie6 oldie" lang="en-US"> '
        "<![endif]-->\n<head>\n<title>example.com | "
        f'{code}: {what}</title>\n<meta charset="UTF-8" />\n<style>{style}</style>\n'
        "<script>(function(){window._cf_chl_opt={cvId: '3'};})();</script>\n</head>\n"
        f'<body><div id="cf-wrapper"><h1><span class="inline-block">{what}</span>'
        f'<span class="code-label">Error code {code}</span></h1>'
        + "<p>The origin web server timed out responding to this request.</p>" * 50
        + "</div></body></html>"
    )


LLAMA_CPP_PYTHON_JSON_SCHEMA = {
    "error": {
        "message": "1 validation error:\n  {'type': 'literal_error', 'loc': ('body', "
        "'response_format', 'type'), 'msg': \"Input should be 'text' or 'json_object'\", "
        "'input': 'json_schema', 'ctx': {'expected': \"'text' or 'json_object'\"}}\n",
        "type": "internal_server_error",
        "param": None,
        "code": None,
    }
}

# (name, status, body, headers, kind, error_type, message that must be kept)
CASES: list[tuple[str, int, bytes | dict[str, Any] | str, dict[str, str], Kind, str, str]] = [
    (
        "vllm-context",
        400,
        {
            "object": "error",
            "message": "This model's maximum context length is 4096 tokens. However, you "
            "requested 5000 tokens (4000 in the messages, 1000 in the completion). Please "
            "reduce the length of the messages or completion.",
            "type": "BadRequestError",
            "param": None,
            "code": 400,
        },
        {},
        Kind.PERMANENT,
        "BadRequestError",
        "maximum context length is 4096 tokens",
    ),
    (
        "vllm-model",
        404,
        {
            "object": "error",
            "message": "The model `llama-3-70b` does not exist.",
            "type": "NotFoundError",
            "param": None,
            "code": 404,
        },
        {},
        Kind.PERMANENT,
        "NotFoundError",
        "The model `llama-3-70b` does not exist.",
    ),
    (
        "fastapi-validation",
        422,
        {
            "detail": [
                {
                    "type": "missing",
                    "loc": ["body", "messages"],
                    "msg": "Field required",
                    "input": {"model": "m"},
                },
                {
                    "type": "float_parsing",
                    "loc": ["body", "temperature"],
                    "msg": "Input should be a valid number",
                    "input": "hot",
                },
            ]
        },
        {},
        Kind.PERMANENT,
        "invalid_request_error",
        "body.messages: Field required; body.temperature: Input should be a valid number",
    ),
    ("fastapi-auth", 401, {"detail": "Invalid API Key"}, {}, Kind.FATAL, "authentication_error",
     "Invalid API Key"),
    ("fastapi-404", 404, {"detail": "Not Found"}, {}, Kind.PERMANENT, "not_found_error",
     "Not Found"),
    (
        "llama-cpp-context",
        400,
        {
            "error": {
                "code": 400,
                "message": "the request exceeds the available context size, try increasing it",
                "type": "exceed_context_size_error",
                "n_prompt_tokens": 5012,
                "n_ctx": 4096,
            }
        },
        {},
        Kind.PERMANENT,
        "exceed_context_size_error",
        "the request exceeds the available context size, try increasing it "
        "(n_prompt_tokens 5012, n_ctx 4096)",
    ),
    (
        "llama-cpp-loading",
        503,
        {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}},
        {},
        Kind.RETRY,
        "unavailable_error",
        "Loading model",
    ),
    (
        "llama-cpp-python-json-schema",
        500,
        LLAMA_CPP_PYTHON_JSON_SCHEMA,
        {},
        Kind.RETRY,
        "internal_server_error",
        "'loc': ('body', 'response_format', 'type')",
    ),
    (
        "ollama-openai",
        404,
        {
            "error": {
                "message": 'model "llama3" not found, try pulling it first',
                "type": "api_error",
                "param": None,
                "code": None,
            }
        },
        {},
        Kind.PERMANENT,
        "api_error",
        'model "llama3" not found, try pulling it first',
    ),
    ("ollama-native", 404, {"error": "model 'llama3' not found"}, {}, Kind.PERMANENT,
     "not_found_error", "model 'llama3' not found"),
    (
        "litellm-auth",
        401,
        {
            "error": {
                "message": "Authentication Error, Invalid proxy server token passed.",
                "type": "auth_error",
                "param": "None",
                "code": "401",
            }
        },
        {},
        Kind.FATAL,
        "auth_error",
        "Invalid proxy server token passed.",
    ),
    ("api-gateway", 500, {"message": "Internal server error"}, {}, Kind.RETRY,
     "internal_server_error", "Internal server error"),
    ("text-500", 500, "Internal Server Error", TEXT, Kind.RETRY, "internal_server_error",
     "Internal Server Error"),
    ("text-429", 429, "Too Many Requests\n", TEXT, Kind.RETRY, "rate_limit_error",
     "Too Many Requests"),
    ("text-400", 400, "Bad Request: messages must not be empty", TEXT, Kind.PERMANENT,
     "invalid_request_error", "Bad Request: messages must not be empty"),
    ("nginx-502", 502, NGINX_502, HTML, Kind.RETRY, "upstream_error", "502 Bad Gateway"),
    ("nginx-504", 504, NGINX_504, HTML, Kind.RETRY, "gateway_timeout", "504 Gateway Time-out"),
    ("nginx-413", 413, NGINX_413, HTML, Kind.PERMANENT, "request_too_large_error",
     "413 Request Entity Too Large"),
    ("cloudflare-520", 520, cloudflare(520, "Web server is returning an unknown error"), HTML,
     Kind.RETRY, "origin_error", "example.com | 520: Web server is returning an unknown error"),
    ("cloudflare-521", 521, cloudflare(521, "Web server is down"), HTML, Kind.RETRY,
     "origin_down", "example.com | 521: Web server is down"),
    ("cloudflare-522", 522, cloudflare(522, "Connection timed out"), HTML, Kind.RETRY,
     "origin_connect_timeout", "example.com | 522: Connection timed out"),
    ("cloudflare-523", 523, cloudflare(523, "Origin is unreachable"), HTML, Kind.RETRY,
     "origin_unreachable", "example.com | 523: Origin is unreachable"),
    ("cloudflare-524", 524, cloudflare(524, "A timeout occurred"), HTML, Kind.RETRY,
     "origin_timeout", "example.com | 524: A timeout occurred"),
    ("html-no-type-header", 502, NGINX_502, {}, Kind.RETRY, "upstream_error", "502 Bad Gateway"),
    ("html-heading-only", 503, "<html><body><h1>Service <b>Unavailable</b></h1></body></html>",
     HTML, Kind.RETRY, "service_unavailable_error", "Service Unavailable"),
    ("empty-502", 502, b"", {}, Kind.RETRY, "upstream_error", "empty response body"),
    ("empty-401", 401, b"", {}, Kind.FATAL, "authentication_error", "empty response body"),
    ("whitespace-503", 503, b"\r\n  \r\n", {}, Kind.RETRY, "service_unavailable_error",
     "empty response body"),
]  # fmt: skip


def encode(body: bytes | dict[str, Any] | str) -> bytes:
    if isinstance(body, bytes):
        return body
    if isinstance(body, str):
        return body.encode()
    return json.dumps(body).encode()


@pytest.mark.parametrize(
    ("status", "body", "headers", "kind", "error_type", "kept"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_each_error_shape_is_classified_by_status_with_a_short_message(
    status: int,
    body: bytes | dict[str, Any] | str,
    headers: dict[str, str],
    kind: Kind,
    error_type: str,
    kept: str,
) -> None:
    error = parse_error(status, encode(body), headers)

    assert error.http_status == status
    assert error.kind is kind
    assert error.error_type == error_type
    assert kept in error.message
    assert len(error.message) <= MAX_ERROR_MESSAGE
    assert "<" not in error.message or not encode(body).lstrip().startswith(b"<")


@pytest.mark.parametrize(
    ("body", "title"),
    [(NGINX_502, "502 Bad Gateway"), (cloudflare(524, "A timeout occurred"),
                                      "example.com | 524: A timeout occurred")],
)  # fmt: skip
def test_an_html_page_becomes_its_title_never_the_page(body: str, title: str) -> None:
    error = parse_error(502, body.encode(), HTML)

    assert error.message == f"{title} (an HTML page, not an API answer)"
    assert len(str(error)) < 400  # the row's error_message: one readable line


def test_an_html_page_with_no_title_is_named_by_its_size() -> None:
    page = "<html><body>" + "<div>x</div>" * 1000 + "</body></html>"

    error = parse_error(502, page.encode(), HTML)

    assert error.message == f"an HTML page of {len(page):,} bytes, not an API answer"


def test_a_long_json_message_and_terminal_escapes_are_cut_and_cleaned() -> None:
    body = {"error": {"message": "\x1b[31mred\x1b[0m " + "x" * 50_000, "type": "t" * 5000}}

    error = parse_error(400, json.dumps(body).encode(), {})

    assert "\x1b" not in error.message
    assert error.message.startswith("[31mred")
    assert len(error.message) <= MAX_ERROR_MESSAGE and error.message.endswith("...")
    assert len(error.error_type) <= 200


def test_an_error_code_that_is_not_text_or_a_number_is_dropped() -> None:
    body = {"error": {"message": "m", "code": {"nested": [1, 2, 3]}}}

    error = parse_error(400, json.dumps(body).encode(), {})

    assert error.code is None
    assert error.error_type == "invalid_request_error"


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=20,
)
_KEYS = st.sampled_from(["error", "detail", "message", "object", "type", "code", "loc", "msg"])
_SHAPED = st.recursive(
    _JSON,
    lambda inner: st.dictionaries(_KEYS, inner, max_size=4) | st.lists(inner, max_size=4),
    max_leaves=20,
)


def _bounded(error: Any) -> None:
    assert error.kind in Kind
    assert len(error.message) <= MAX_ERROR_MESSAGE
    assert len(str(error)) <= 2 * MAX_ERROR_MESSAGE
    assert not any(ch in error.message for ch in "\x00\x1b\x07\r")


@settings(max_examples=300, deadline=None)
@given(status=st.integers(min_value=0, max_value=1000), body=st.binary(max_size=4096))
def test_any_bytes_with_any_status_never_crash_and_give_a_bounded_message(
    status: int, body: bytes
) -> None:
    _bounded(parse_error(status, body, {}))


@settings(max_examples=300, deadline=None)
@given(
    status=st.integers(min_value=400, max_value=599),
    body=_SHAPED,
    html=st.booleans(),
)
def test_any_json_error_body_never_crashes_and_gives_a_bounded_message(
    status: int, body: Any, html: bool
) -> None:
    _bounded(parse_error(status, json.dumps(body).encode(), HTML if html else {}))


@settings(max_examples=100, deadline=None)
@given(
    junk=st.text(max_size=2000),
    title=st.text(max_size=2000),
    tags=st.lists(st.sampled_from(["<title", "</title", "<h1", ">", "<", "<!doctype html"])),
)
def test_any_html_like_text_never_crashes_and_gives_a_bounded_message(
    junk: str, title: str, tags: list[str]
) -> None:
    page = junk + "".join(tags) + "<title>" + title + "</title>" + junk
    _bounded(parse_error(502, page.encode("utf-8", "surrogatepass"), HTML))


# -- through a run: each shape ends the row (or the run) the way its status says ---------


class Shapes(httpx.AsyncBaseTransport):
    """Answers each row (by its prompt, a case name) with that case's error body."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.cases = {case[0]: case for case in CASES}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        name = json.loads(request.content)["messages"][-1]["content"]
        self.calls[name] = self.calls.get(name, 0) + 1
        _, status, body, headers, *_ = self.cases[name]
        return httpx.Response(status, content=encode(body), headers=headers)


@pytest.mark.parametrize(
    "names",
    [
        ["vllm-context", "fastapi-validation", "llama-cpp-context", "nginx-413", "cloudflare-524",
         "nginx-502", "empty-502", "text-500"],
    ],
)  # fmt: skip
def test_a_run_stores_each_shape_as_the_rows_outcome(tmp_path: Path, names: list[str]) -> None:
    src = write_jsonl(tmp_path / "rows.jsonl", [{"id": n, "prompt": n} for n in names])
    opts = RunOptions(
        sources=[str(src)], out=tmp_path / "out", base_url=["http://gw.invalid/v1"],
        model="m", quiet=True, max_attempts=3, concurrency=2,
    )  # fmt: skip
    transport = Shapes()
    clock = FakeClock()

    result = execute(opts, transport=transport, sleep=clock.sleep, clock=clock)

    assert result.exit_code == 1
    rows = {row["id"]: row for row in read_results(tmp_path / "out")}
    assert set(rows) == set(names)
    for name in names:
        _, status, _, _, kind, error_type, kept = transport.cases[name]
        row = rows[name]
        assert row["status"] == "error"
        assert row["http_status"] == status
        assert row["error_type"] == error_type
        assert kept in row["error_message"]
        assert len(row["error_message"]) < 1200
        expected_calls = 3 if kind is Kind.RETRY else 1
        assert transport.calls[name] == expected_calls, name
        assert row["attempts"] == expected_calls


# -- errors inside a 200 -------------------------------------------------------------------


def test_an_html_page_sent_as_a_200_is_a_malformed_answer_named_by_its_title() -> None:
    with pytest.raises(TransportError) as caught:
        parse_completion(NGINX_502.replace("502 Bad Gateway", "Sign in - Corporate Proxy"))

    assert caught.value.error_type == "malformed_response"
    assert str(caught.value) == (
        "response body is not JSON: Sign in - Corporate Proxy (an HTML page, not an API answer)"
    )


@pytest.mark.parametrize(("code", "status", "kind"), [(400, 400, Kind.PERMANENT),
                                                      (None, 500, Kind.RETRY),
                                                      ("oops", 500, Kind.RETRY),
                                                      (700, 500, Kind.RETRY)])  # fmt: skip
def test_an_error_event_in_a_stream_takes_the_status_it_names(
    code: Any, status: int, kind: Kind
) -> None:
    event = {"error": {"code": code, "message": "context exceeded", "type": "server_error"}}
    assembler = StreamAssembler()

    with pytest.raises(ApiError) as caught:
        assembler.feed_text(f"data: {json.dumps(event)}\n\n")

    assert caught.value.http_status == status
    assert caught.value.kind is kind


def test_a_key_rebuilt_by_json_escapes_is_redacted_before_the_message_is_cut() -> None:
    key = "sk-test-0123456789abcdef0123456789"
    escaped = "".join(f"\\u{ord(c):04x}" for c in key)  # raw bytes do not show the key
    body = '{"error": {"message": "' + "x" * 990 + escaped + '"}}'

    error = parse_error(401, body.encode(), {}, Redactor(key).text)

    assert "sk-test" not in error.message
    assert len(error.message) <= MAX_ERROR_MESSAGE


# A key a decoder rebuilds (JSON \u escapes, HTML character references) near the point
# where a message is cut: the scrubber must see it whole, before any cut.
_KEY = "sk-test-0123456789abcdef0123456789"
_JSON_KEY = "".join(f"\\u{ord(c):04x}" for c in _KEY)
_HTML_KEY = "".join(f"&#{ord(c)};" for c in _KEY)


@pytest.mark.parametrize(
    "body",
    [
        # FastAPI's list of validation errors: each msg is cut at MAX_ERROR_MESSAGE
        '{"detail": [{"msg": "' + "y" * 985 + _JSON_KEY + '"}]}',
        # an item with no msg is shown as compact JSON, cut too
        '{"detail": [{"input": "' + "y" * 980 + _JSON_KEY + '"}]}',
        # a FastAPI detail object with no message
        '{"detail": {"input": "' + "y" * 970 + _JSON_KEY + '"}}',
        # an HTML page's title is cut at MAX_PAGE_MESSAGE
        "<html><head><title>" + "x" * 270 + " " + _HTML_KEY + "</title></head></html>",
    ],
    ids=["detail_list_msg", "detail_list_item", "detail_object", "html_title"],
)
def test_a_key_rebuilt_by_decoding_is_redacted_before_any_part_of_the_message_is_cut(
    body: str,
) -> None:
    error = parse_error(422, body.encode(), {}, Redactor(_KEY).text)

    assert "sk-test" not in str(error) and "0123456789" not in str(error)
    assert len(error.message) <= MAX_ERROR_MESSAGE


def test_a_key_rebuilt_in_a_stream_error_event_is_redacted_before_it_is_cut() -> None:
    redactor = Redactor(_KEY)
    assembler = StreamAssembler(redact=redactor.data, redact_text=redactor.text)
    event = '{"error": {"code": 400, "message": "' + "z" * 985 + _JSON_KEY + '"}}'

    with pytest.raises(ApiError) as caught:
        assembler.feed_bytes(f"data: {event}\n\n".encode())

    assert "sk-test" not in str(caught.value) and "0123456789" not in str(caught.value)
    assert caught.value.http_status == 400


@pytest.mark.parametrize(
    "body",
    [
        "<html><head><title>" + "x" * 270 + " " + _HTML_KEY + "</title></head></html>",
        '{"error": {"message": "' + "z" * 985 + _JSON_KEY + '"}}',
    ],
    ids=["html_page", "error_object"],
)
def test_a_key_rebuilt_in_an_error_inside_a_200_is_redacted_before_it_is_cut(body: str) -> None:
    with pytest.raises((ApiError, TransportError)) as caught:
        parse_completion(body.encode(), Redactor(_KEY).text)

    assert "sk-test" not in str(caught.value) and "0123456789" not in str(caught.value)
