"""The wire format, checked against the gateways' own example bodies (shared/seeds).

Every body below marked "verbatim" is copied from the seed docs, so a change in how we
read usage, answers or errors shows up here before it shows up as a wrong cost report.
"""

from __future__ import annotations

import contextlib
import email.utils
import json
from collections.abc import Callable, Iterable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.errors import ApiError, Kind, TransportError
from pipeline.wire import (
    Answer,
    StreamAssembler,
    Usage,
    error_from_body,
    parse_completion,
    parse_error,
    parse_usage,
    retry_after_seconds,
)

# ------------------------------------------------------------------ seed bodies

# StarMagic GPT-5.5, the per-field response examples of the reference page, verbatim
# (including the doubly escaped "\\n" the page shows).
STARMAGIC_GPT55_RESPONSE = r"""
{
  "id": "chatcmpl-20251010015944503180122WJNB8Eid",
  "model": "gpt-5.5",
  "object": "chat.completion",
  "created": 1760032810,
  "choices": [
    {
      "index": 0,
      "message": {
        "role": "assistant",
        "content": "Hello! I'm GPT-5.5, with enhanced reasoning and understanding capabilities. I excel at handling complex problems, multi-step reasoning, and code generation.\\n\\nKey features include:\\n- Stronger logical reasoning\\n- Better context understanding\\n- More accurate code generation"
      },
      "finish_reason": "stop"
    }
  ],
  "usage": {
    "prompt_tokens": 13,
    "completion_tokens": 1891,
    "total_tokens": 1904,
    "prompt_tokens_details": {
      "cached_tokens": 0,
      "text_tokens": 13,
      "audio_tokens": 0,
      "image_tokens": 0
    },
    "completion_tokens_details": {
      "text_tokens": 0,
      "audio_tokens": 0,
      "reasoning_tokens": 1480
    },
    "input_tokens": 0,
    "output_tokens": 0,
    "input_tokens_details": null
  }
}
"""  # noqa: E501

# StarMagic GPT-5.5, the "Response: 成功" example under the curl call, verbatim.
STARMAGIC_GPT55_NULL_MESSAGE = """
{
  "id": "chatcmpl-20251010015944503180122WJNB8Eid",
  "model": "gpt-5.5",
  "object": "chat.completion",
  "created": 1760032810,
  "choices": [
    {
      "index": 0,
      "message": {
        "role": null,
        "content": null
      },
      "finish_reason": "stop"
    }
  ],
  "usage": {
    "prompt_tokens": 13,
    "completion_tokens": 1891,
    "total_tokens": 1904,
    "prompt_tokens_details": {
      "cached_tokens": 0,
      "text_tokens": 13,
      "audio_tokens": 0,
      "image_tokens": 0
    },
    "completion_tokens_details": {
      "text_tokens": 0,
      "audio_tokens": 0,
      "reasoning_tokens": 1480
    },
    "input_tokens": 0,
    "output_tokens": 0,
    "input_tokens_details": null
  }
}
"""

# StarMagic GPT-5.1 (gpt-5.1-thinking returns reasoning_content), per-field examples verbatim.
STARMAGIC_GPT51_RESPONSE = """
{
  "id": "chatcmpl-abc123",
  "model": "gpt-5.1",
  "object": "chat.completion",
  "created": 1698999496,
  "choices": [
    {
      "index": 0,
      "message": {
        "role": "assistant",
        "content": "Hi there! How can I help you?",
        "reasoning_content": "Let me think about this step by step..."
      },
      "finish_reason": "stop"
    }
  ],
  "usage": {
    "prompt_tokens": 8,
    "completion_tokens": 292,
    "total_tokens": 300
  }
}
"""

# ModelStream "Create Chat Completion" response example, verbatim.
MODELSTREAM_RESPONSE = """
{
  "id": "string",
  "object": "chat.completion",
  "created": 0,
  "model": "string",
  "choices": [
    {
      "index": 0,
      "message": {
        "role": "system",
        "content": null,
        "name": "string",
        "tool_calls": [
          {
            "id": "string",
            "type": "function",
            "function": {
              "name": "string",
              "arguments": "string"
            }
          }
        ],
        "tool_call_id": "string",
        "reasoning_content": "string"
      },
      "finish_reason": "stop"
    }
  ],
  "usage": {
    "prompt_tokens": 0,
    "completion_tokens": 0,
    "total_tokens": 0,
    "prompt_tokens_details": {
      "cached_tokens": 0,
      "text_tokens": 0,
      "audio_tokens": 0,
      "image_tokens": 0
    },
    "completion_tokens_details": {
      "text_tokens": 0,
      "audio_tokens": 0,
      "reasoning_tokens": 0
    }
  },
  "system_fingerprint": "string"
}
"""

# A Responses-API style usage block: only input/output names, with their own details.
RESPONSES_USAGE: dict[str, Any] = {
    "input_tokens": 36,
    "input_tokens_details": {"cached_tokens": 12},
    "output_tokens": 87,
    "output_tokens_details": {"reasoning_tokens": 40},
    "total_tokens": 123,
}


def seed_error(
    code: int,
    message: str,
    error_type: str,
    param: str | None = None,
    fallback_suggestion: str | None = None,
) -> dict[str, Any]:
    """An EvoLink error body as its OpenAPI examples spell it (keys only when present)."""
    error: dict[str, Any] = {"code": code, "message": message, "type": error_type}
    if param is not None:
        error["param"] = param
    if fallback_suggestion is not None:
        error["fallback_suggestion"] = fallback_suggestion
    return {"error": error}


# (status, message, error_type, param, fallback_suggestion, kind), as in seeds/002 (EvoLink)
SEED_ERRORS = [
    (400, "Invalid request parameters", "invalid_request_error", None, None, Kind.PERMANENT),
    (401, "Invalid or expired token", "authentication_error", None, None, Kind.FATAL),
    (
        402,
        "Insufficient quota",
        "insufficient_quota_error",
        None,
        "https://evolink.ai/dashboard/billing",
        Kind.FATAL,
    ),
    (403, "Access denied for this model", "permission_error", "model", None, Kind.FATAL),
    (404, "Specified model not found", "not_found_error", "model", "gpt-5.5", Kind.PERMANENT),
    (
        413,
        "Image file too large",
        "request_too_large_error",
        "content",
        "compress image to under 10MB",
        Kind.PERMANENT,
    ),
    (429, "Rate limit exceeded", "rate_limit_error", None, "retry after 60 seconds", Kind.RETRY),
    (500, "Internal server error", "internal_server_error", None, "try again later", Kind.RETRY),
    (
        502,
        "Upstream AI service unavailable",
        "upstream_error",
        None,
        "try different model",
        Kind.RETRY,
    ),
    (
        503,
        "Service temporarily unavailable",
        "service_unavailable_error",
        None,
        "retry after 30 seconds",
        Kind.RETRY,
    ),
]

ErrorParser = Callable[[int, dict[str, Any], dict[str, str]], ApiError]


def via_bytes(status: int, body: dict[str, Any], headers: dict[str, str]) -> ApiError:
    return parse_error(status, json.dumps(body).encode(), headers)


def via_dict(status: int, body: dict[str, Any], headers: dict[str, str]) -> ApiError:
    return error_from_body(status, body, headers)


# ------------------------------------------------------------------ usage


def test_usage_full_block_prefers_standard_fields_over_zero_compat_fields() -> None:
    usage = parse_usage(json.loads(STARMAGIC_GPT55_RESPONSE)["usage"])

    # input_tokens/output_tokens are 0 in this body; they must not win.
    assert usage == Usage(
        prompt_tokens=13,
        completion_tokens=1891,
        total_tokens=1904,
        cached_tokens=0,
        reasoning_tokens=1480,
        image_tokens=0,
        audio_tokens=0,
    )


def test_usage_short_block_leaves_details_unknown_not_zero() -> None:
    usage = parse_usage(json.loads(STARMAGIC_GPT51_RESPONSE)["usage"])

    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (8, 292, 300)
    assert usage.cached_tokens is None
    assert usage.reasoning_tokens is None
    assert usage.image_tokens is None
    assert usage.audio_tokens is None


def test_usage_responses_style_reads_input_output_names_and_their_details() -> None:
    usage = parse_usage(RESPONSES_USAGE)

    assert usage.prompt_tokens == 36
    assert usage.completion_tokens == 87
    assert usage.total_tokens == 123
    assert usage.cached_tokens == 12
    assert usage.reasoning_tokens == 40


def test_usage_total_is_derived_when_the_server_omits_it() -> None:
    usage = parse_usage({"input_tokens": 10, "output_tokens": 5})

    assert usage.total_tokens == 15


@pytest.mark.parametrize("block", [None, "12 tokens", [], 0])
def test_usage_that_is_not_an_object_is_all_unknown(block: Any) -> None:
    assert parse_usage(block) == Usage()


def test_usage_ignores_non_integer_counts() -> None:
    usage = parse_usage({"prompt_tokens": "13", "completion_tokens": True, "total_tokens": 4.0})

    assert usage.prompt_tokens is None
    assert usage.completion_tokens is None
    assert usage.total_tokens == 4


# ------------------------------------------------------------------ non-streamed answers


def test_completion_starmagic_gpt55() -> None:
    answer = parse_completion(STARMAGIC_GPT55_RESPONSE)

    assert answer.response_id == "chatcmpl-20251010015944503180122WJNB8Eid"
    assert answer.response_model == "gpt-5.5"
    assert answer.finish_reason == "stop"
    assert answer.content is not None
    assert answer.content.startswith("Hello! I'm GPT-5.5, with enhanced reasoning")
    assert answer.content.endswith("More accurate code generation")
    assert answer.reasoning_content is None
    assert answer.tool_calls is None
    assert answer.usage.reasoning_tokens == 1480
    assert answer.usage.prompt_tokens == 13


def test_completion_with_null_message_fields_is_still_an_answer() -> None:
    answer = parse_completion(STARMAGIC_GPT55_NULL_MESSAGE.encode())

    assert answer.content is None
    assert answer.reasoning_content is None
    assert answer.finish_reason == "stop"
    assert answer.usage.completion_tokens == 1891


def test_completion_starmagic_gpt51_keeps_reasoning_content() -> None:
    answer = parse_completion(STARMAGIC_GPT51_RESPONSE)

    assert answer.content == "Hi there! How can I help you?"
    assert answer.reasoning_content == "Let me think about this step by step..."
    assert answer.usage == Usage(prompt_tokens=8, completion_tokens=292, total_tokens=300)


def test_completion_modelstream_keeps_tool_calls_and_reasoning() -> None:
    answer = parse_completion(MODELSTREAM_RESPONSE)

    assert answer.content is None
    assert answer.reasoning_content == "string"
    assert answer.tool_calls == [
        {"id": "string", "type": "function", "function": {"name": "string", "arguments": "string"}}
    ]
    assert answer.usage.prompt_tokens == 0
    assert answer.usage.cached_tokens == 0
    assert answer.usage.reasoning_tokens == 0


@pytest.mark.parametrize(
    "body",
    [
        '{"id": "chatcmpl-1", "choices": [{"index": 0, "message": {"content": "cut',
        "<html>502 Bad Gateway</html>",
        "[1, 2]",
        '{"id": "chatcmpl-1", "choices": []}',
        '{"id": "chatcmpl-1"}',
    ],
    ids=["truncated", "html", "not-object", "empty-choices", "no-choices"],
)
def test_completion_cut_or_malformed_body_is_a_retryable_transport_error(body: str) -> None:
    with pytest.raises(TransportError) as caught:
        parse_completion(body)

    assert caught.value.error_type == "malformed_response"
    assert caught.value.kind is Kind.RETRY


def test_completion_200_with_an_error_body_raises_the_servers_error() -> None:
    body = json.dumps(seed_error(402, "Insufficient quota", "insufficient_quota_error"))

    with pytest.raises(ApiError) as caught:
        parse_completion(body)

    assert caught.value.error_type == "insufficient_quota_error"
    assert caught.value.kind is Kind.FATAL


# ------------------------------------------------------------------ error bodies


@pytest.mark.parametrize("parse", [via_bytes, via_dict], ids=["parse_error", "error_from_body"])
@pytest.mark.parametrize(
    ("status", "message", "error_type", "param", "fallback", "kind"),
    SEED_ERRORS,
    ids=[str(case[0]) for case in SEED_ERRORS],
)
def test_seed_error_bodies(
    parse: ErrorParser,
    status: int,
    message: str,
    error_type: str,
    param: str | None,
    fallback: str | None,
    kind: Kind,
) -> None:
    error = parse(status, seed_error(status, message, error_type, param, fallback), {})

    assert error.http_status == status
    assert error.error_type == error_type
    assert error.message == message
    assert error.param == param
    assert error.fallback_suggestion == fallback
    assert error.code == status
    assert error.kind is kind


def test_404_names_the_param_and_the_fallback_model_in_its_text() -> None:
    body = seed_error(404, "Specified model not found", "not_found_error", "model", "gpt-5.5")

    error = via_bytes(404, body, {})

    assert str(error) == "HTTP 404 not_found_error: Specified model not found (param: model)"
    assert error.fallback_suggestion == "gpt-5.5"


def test_429_is_a_rate_limit_and_carries_the_servers_wait() -> None:
    body = seed_error(429, "Rate limit exceeded", "rate_limit_error")

    error = via_bytes(429, body, {"Retry-After": "60"})

    assert error.is_rate_limit
    assert error.retry_after == 60.0


@pytest.mark.parametrize(
    "error",
    [
        {"code": "insufficient_quota", "message": "You exceeded your current quota"},
        {"type": "insufficient_quota", "message": "You exceeded your current quota"},
        {"type": "rate_limit_error", "code": "insufficient_quota", "message": "Out of quota"},
    ],
    ids=["code-only", "type", "code-beats-type"],
)
def test_429_that_says_insufficient_quota_is_fatal_not_a_rate_limit(error: dict[str, Any]) -> None:
    parsed = via_bytes(429, {"error": error}, {"Retry-After": "1"})

    assert parsed.kind is Kind.FATAL
    assert not parsed.is_rate_limit


def test_non_json_502_keeps_a_short_message_and_stays_retryable() -> None:
    html = (
        "<html><head><title>502 Bad Gateway</title></head><body>"
        + "<p>upstream went away</p>" * 500
        + "</body></html>"
    )

    error = parse_error(502, html.encode(), {})

    assert error.kind is Kind.RETRY
    assert error.error_type == "upstream_error"
    assert error.message == "502 Bad Gateway (an HTML page, not an API answer)"
    assert error.param is None
    assert error.fallback_suggestion is None


def test_non_utf8_body_does_not_break_error_parsing() -> None:
    error = parse_error(500, b"\xff\xfe oops", {})

    assert error.kind is Kind.RETRY
    assert "oops" in error.message


@pytest.mark.parametrize(
    ("status", "error_type", "kind"),
    [
        (400, "invalid_request_error", Kind.PERMANENT),
        (401, "authentication_error", Kind.FATAL),
        (402, "insufficient_quota_error", Kind.FATAL),
        (403, "permission_error", Kind.FATAL),
        (404, "not_found_error", Kind.PERMANENT),
        (413, "request_too_large_error", Kind.PERMANENT),
        (422, "invalid_request_error", Kind.PERMANENT),
        (429, "rate_limit_error", Kind.RETRY),
        (500, "internal_server_error", Kind.RETRY),
        (502, "upstream_error", Kind.RETRY),
        (503, "service_unavailable_error", Kind.RETRY),
        (504, "gateway_timeout", Kind.RETRY),
    ],
)
def test_empty_error_body_falls_back_to_the_status(
    status: int, error_type: str, kind: Kind
) -> None:
    error = parse_error(status, b"", {})

    assert error.error_type == error_type
    assert error.message == "empty response body"
    assert error.kind is kind


# ------------------------------------------------------------------ Retry-After

NOW = 1_760_000_000.0


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after-ms": "1500"}, 1.5),
        ({"Retry-After-Ms": "250", "Retry-After": "30"}, 0.25),  # ms wins, any case
        ({"Retry-After": "7"}, 7.0),
        ({"retry-after": "2.5"}, 2.5),
        ({"Retry-After": "-3"}, 0.0),
        ({"retry-after-ms": "soon", "Retry-After": "4"}, 4.0),  # bad ms falls through
        ({"Retry-After": email.utils.formatdate(NOW + 42, usegmt=True)}, 42.0),
        ({"Retry-After": email.utils.formatdate(NOW - 42, usegmt=True)}, 0.0),
    ],
    ids=["ms", "ms-wins", "seconds", "fraction", "negative", "bad-ms", "date", "past-date"],
)
def test_retry_after(headers: dict[str, str], expected: float) -> None:
    assert retry_after_seconds(headers, now=NOW) == pytest.approx(expected)


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Retry-After": "soon"},
        {"Retry-After": ""},
        {"Retry-After": "Mon, 99 Foo 20xx"},
        {"retry-after-ms": "later"},
        # Not a wait anyone can honour: infinity would pause the whole run forever.
        {"Retry-After": "inf"},
        {"retry-after-ms": "1e999"},
        {"Retry-After": "nan"},
    ],
    ids=["none", "word", "empty", "bad-date", "bad-ms-only", "inf", "ms-overflow", "nan"],
)
def test_retry_after_garbage_is_none(headers: dict[str, str]) -> None:
    assert retry_after_seconds(headers, now=NOW) is None


# ------------------------------------------------------------------ streaming


def sse(*events: dict[str, Any] | str, done: bool = True) -> str:
    """An SSE body as gateways send it: one ``data:`` line per chunk, blank-line separated.
    A string is sent as a raw line (an SSE comment such as ``: keep-alive``)."""
    lines = [f"{e}\n" if isinstance(e, str) else f"data: {json.dumps(e)}\n\n" for e in events]
    if done:
        lines.append("data: [DONE]\n\n")
    return "".join(lines)


def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-s1",
        "object": "chat.completion.chunk",
        "model": "gpt-5.1-thinking",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }


def pieces(text: str, size: int) -> Iterable[str]:
    return (text[i : i + size] for i in range(0, len(text), size))


def assemble(parts: Iterable[str]) -> Answer:
    assembler = StreamAssembler()
    for part in parts:
        assembler.feed_text(part)
    return assembler.finish()


STREAM_USAGE = {
    "prompt_tokens": 20,
    "completion_tokens": 9,
    "total_tokens": 29,
    "prompt_tokens_details": {"cached_tokens": 5},
    "completion_tokens_details": {"reasoning_tokens": 7},
}

TEXT_STREAM = sse(
    ": keep-alive",
    chunk({"role": "assistant", "content": ""}),
    chunk({"reasoning_content": "Think "}),
    chunk({"reasoning_content": "first."}),
    chunk({"content": "Hel"}),
    chunk({"content": "lo, wörld"}),
    chunk({}, finish_reason="stop"),
    {"id": "chatcmpl-s1", "object": "chat.completion.chunk", "choices": [], "usage": STREAM_USAGE},
)


@pytest.mark.parametrize("size", [1, 2, 5, 17, 64, len(TEXT_STREAM)])
def test_stream_assembles_content_reasoning_and_usage_whatever_the_splits(size: int) -> None:
    answer = assemble(pieces(TEXT_STREAM, size))

    assert answer.content == "Hello, wörld"
    assert answer.reasoning_content == "Think first."
    assert answer.finish_reason == "stop"
    assert answer.response_id == "chatcmpl-s1"
    assert answer.response_model == "gpt-5.1-thinking"
    assert answer.tool_calls is None
    assert answer.usage == parse_usage(STREAM_USAGE)
    assert answer.usage.cached_tokens == 5


def test_stream_with_crlf_line_endings() -> None:
    answer = assemble([TEXT_STREAM.replace("\n", "\r\n")])

    assert answer.content == "Hello, wörld"
    assert answer.usage.total_tokens == 29


def test_stream_last_line_without_newline_still_counts() -> None:
    answer = assemble([TEXT_STREAM.rstrip("\n")])

    assert answer.content == "Hello, wörld"


def test_stream_tool_call_deltas_are_joined_per_index() -> None:
    text = sse(
        chunk({"role": "assistant", "content": None}),
        chunk(
            {
                "tool_calls": [
                    {
                        "index": 0,
                        "id": "call_a",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": ""},
                    }
                ]
            }
        ),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]}),
        chunk(
            {
                "tool_calls": [
                    {
                        "index": 1,
                        "id": "call_b",
                        "function": {"name": "get_time", "arguments": "{}"},
                    }
                ]
            }
        ),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}),
        chunk({}, finish_reason="tool_calls"),
    )

    answer = assemble(pieces(text, 7))

    assert answer.finish_reason == "tool_calls"
    assert answer.content is None
    assert answer.tool_calls == [
        {
            "id": "call_a",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
        },
        {"id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
    ]
    assert json.loads(answer.tool_calls[0]["function"]["arguments"]) == {"city": "Paris"}


def test_stream_without_done_is_cut_not_a_partial_answer() -> None:
    assembler = StreamAssembler()
    assembler.feed_text(sse(chunk({"content": "half an ans"}), done=False))

    with pytest.raises(TransportError) as caught:
        assembler.finish()

    assert caught.value.error_type == "stream_cut"
    assert caught.value.kind is Kind.RETRY


def test_stream_malformed_chunk_is_a_retryable_transport_error() -> None:
    assembler = StreamAssembler()
    assembler.feed_text(sse(chunk({"content": "ok"}), done=False))

    with pytest.raises(TransportError) as caught:
        assembler.feed_text('data: {"id": "chatcmpl-s1", "choices": [{"delta": \n')

    assert caught.value.error_type == "malformed_response"
    assert caught.value.kind is Kind.RETRY


def test_stream_error_event_raises_the_servers_error() -> None:
    assembler = StreamAssembler()
    quota = {"error": {"type": "insufficient_quota", "message": "You exceeded your quota"}}

    with pytest.raises(ApiError) as caught:
        assembler.feed_text(sse(chunk({"content": "a"}), quota, done=False))

    assert caught.value.message == "You exceeded your quota"
    assert caught.value.kind is Kind.FATAL


# ------------------------------------------------------------------ hostile bytes


NESTED = "[" * 100_000


def test_a_nested_json_bomb_is_a_malformed_body_not_a_recursion_error() -> None:
    with pytest.raises(TransportError) as caught:
        parse_completion(NESTED)
    assert caught.value.error_type == "malformed_response"
    assert caught.value.kind is Kind.RETRY


def test_a_nested_json_bomb_in_an_error_body_keeps_the_status() -> None:
    error = parse_error(502, NESTED.encode(), {})
    assert error.http_status == 502 and error.kind is Kind.RETRY


def test_a_nested_json_bomb_in_a_stream_is_a_malformed_chunk() -> None:
    assembler = StreamAssembler()
    with pytest.raises(TransportError) as caught:
        assembler.feed_bytes(b"data: " + NESTED.encode() + b"\n\n")
    assert caught.value.error_type == "malformed_response"


def _assemble_bytes(data: bytes, cuts: list[int], **options: Any) -> Answer:
    assembler = StreamAssembler(**options)
    edges = [0, *sorted(c % (len(data) + 1) for c in cuts), len(data)]
    for start, end in zip(edges, edges[1:], strict=False):
        assembler.feed_bytes(data[start:end])
    return assembler.finish()


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(min_value=0), max_size=12))
def test_stream_bytes_assemble_the_same_whatever_the_splits(cuts: list[int]) -> None:
    """Cut anywhere, even inside a multi-byte character: the same answer."""
    answer = _assemble_bytes(TEXT_STREAM.encode(), cuts)
    assert answer.content == "Hello, wörld" and answer.reasoning_content == "Think first."
    assert answer.usage == parse_usage(STREAM_USAGE)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(min_value=0), max_size=12))
def test_a_key_cut_across_chunks_is_still_redacted(cuts: list[int]) -> None:
    key = "sk-secret-0123456789"
    data = sse(chunk({"content": f"you sent Bearer {key}!"}), chunk({}, finish_reason="stop"))
    answer = _assemble_bytes(
        data.encode(), cuts, redact=lambda raw: raw.replace(key.encode(), b"[REDACTED]")
    )
    assert answer.content == "you sent Bearer [REDACTED]!"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=20))
def test_any_bytes_in_a_stream_end_as_an_answer_or_a_request_error(chunks: list[bytes]) -> None:
    """Untrusted bytes: nothing but a RequestError (or an answer) may come out."""
    assembler = StreamAssembler(max_line_bytes=256)
    try:
        for data in chunks:
            assembler.feed_bytes(data)
        assembler.finish()
    except (TransportError, ApiError):
        pass


@settings(max_examples=100, deadline=None)
@given(st.integers(min_value=1, max_value=40), st.integers(min_value=1, max_value=50))
def test_a_line_longer_than_the_cap_fails_however_it_arrives(piece: int, cap: int) -> None:
    line = b"data: " + b"x" * (cap + 1)
    assembler = StreamAssembler(max_line_bytes=cap)
    with pytest.raises(TransportError) as caught:
        for start in range(0, len(line), piece):
            assembler.feed_bytes(line[start : start + piece])
        assembler.finish()
    assert caught.value.error_type == "response_too_large"


def test_a_line_within_the_cap_is_fine() -> None:
    data = sse(chunk({"content": "ok"}), chunk({}, finish_reason="stop")).encode()
    longest = max(len(line) for line in data.split(b"\n"))
    assert _assemble_bytes(data, [3, 50], max_line_bytes=longest).content == "ok"


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=12,
)
_FIELDS = ["choices", "delta", "tool_calls", "function", "name", "arguments", "index", "usage"]


@settings(max_examples=300, deadline=None)
@given(
    st.recursive(
        _JSON,
        lambda inner: (
            st.dictionaries(st.sampled_from(_FIELDS), inner, max_size=4)
            | st.lists(inner, max_size=3)
        ),
        max_leaves=20,
    )
)
def test_any_json_chunk_is_an_answer_or_a_request_error(value: Any) -> None:
    """Fields of the wrong type (``"choices": 5``, a numeric tool name) never raise
    TypeError out of the assembler: that would escape the client's error handling."""
    data = f"data: {json.dumps(value)}\n\ndata: [DONE]\n\n".encode()
    with contextlib.suppress(TransportError, ApiError):
        _assemble_bytes(data, [])
