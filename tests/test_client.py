"""ChatClient's use of httpx: what it trims for speed must not change what is sent."""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.client import ChatClient, Connection, normalize_base_url
from pipeline.errors import (
    ApiError,
    ConfigurationError,
    Kind,
    TransportError,
    UsageError,
    fatal_advice,
)
from pipeline.redact import Redactor, plain_http_warnings

pytestmark = pytest.mark.anyio

BODY = {"model": "gpt-5.5", "messages": [{"role": "user", "content": "hi"}]}
ANSWER = {
    "id": "c1",
    "model": "gpt-5.5",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
}


def _client(seen: list[httpx.Request] | None, headers: dict[str, str] | None = None) -> ChatClient:
    def handler(request: httpx.Request) -> httpx.Response:
        if seen is not None:
            seen.append(request)
        return httpx.Response(200, json=ANSWER, headers=headers)

    return ChatClient(["http://gw.test"], "sk-test", transport=httpx.MockTransport(handler))


async def test_requests_go_to_chat_completions_with_the_body_as_json() -> None:
    seen: list[httpx.Request] = []
    client = _client(seen)
    reply = await client.complete(BODY)
    await client.aclose()
    assert reply.answer.content == "ok" and reply.http_status == 200
    assert str(seen[0].url) == "http://gw.test/v1/chat/completions"
    assert json.loads(seen[0].content) == BODY
    assert seen[0].headers["authorization"] == "Bearer sk-test"


async def test_a_cookie_the_server_sets_is_sent_back_as_before() -> None:
    seen: list[httpx.Request] = []
    client = _client(seen, headers={"set-cookie": "affinity=node7; Path=/"})
    await client.complete(BODY)
    await client.complete(BODY)
    await client.aclose()
    assert "cookie" not in seen[0].headers
    assert seen[1].headers["cookie"] == "affinity=node7"


async def test_answers_without_cookies_skip_the_cookie_jar(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[Any] = []
    monkeypatch.setattr(
        httpx.Cookies, "extract_cookies", lambda self, response: calls.append(response)
    )
    client = _client(None)
    await client.complete(BODY)
    await client.aclose()
    assert calls == []  # httpx still keeps the client's jar where the client reads it


async def test_an_answered_request_leaves_no_cyclic_garbage() -> None:
    """httpx ties each response to its stream in a cycle; the client cuts it, so all of
    a request's objects go by reference counting, not by the cyclic collector."""
    client = _client(None)
    await client.complete(BODY)  # warm up: first-use caches are not garbage
    gc.collect()
    gc.disable()
    try:
        for _ in range(5):
            await client.complete(BODY)
        left = [o for o in gc.get_objects() if isinstance(o, httpx.Response | httpx.Request)]
    finally:
        gc.enable()
        await client.aclose()
    assert left == []


# ------------------------------------------------------------------ hostile answers

KEY = "sk-test"


def _answering(*responses: httpx.Response, **options: Any) -> ChatClient:
    queue = list(responses)

    def handler(request: httpx.Request) -> httpx.Response:
        return queue.pop(0)

    return ChatClient(
        ["http://gw.test"], KEY, Connection(**options), transport=httpx.MockTransport(handler)
    )


_KEYS = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=8, max_size=40)


@settings(max_examples=300, deadline=None)
@given(
    key=_KEYS,
    before=st.binary(max_size=7),
    after=st.binary(max_size=7),
    url_safe=st.booleans(),
    padded=st.booleans(),
)
def test_a_key_inside_any_base64_blob_is_taken_out(
    key: str, before: bytes, after: bytes, url_safe: bool, padded: bool
) -> None:
    """Base64 of anything that holds the key (a JSON object, ``user:key`` for Basic
    auth, the Bearer value), wherever it sits in the blob, in either alphabet."""
    import base64

    blob = before + key.encode("utf-8") + after
    encode = base64.urlsafe_b64encode if url_safe else base64.b64encode
    echo = encode(blob).decode("ascii")
    echo = echo if padded else echo.rstrip("=")
    redactor = Redactor(key)
    shown = redactor.text(f"credentials: {echo}")
    assert "[REDACTED]" in shown
    # What is left is the neighbours' bytes, plus at most one character each side
    # that mixes their bits with the key's (8 bits of it at most: no key is learnt).
    left = shown.replace("credentials: ", "").split("[REDACTED]")
    neighbours = -(-8 * len(before) // 6) + -(-8 * len(after) // 6)
    assert sum(len(part.rstrip("=")) for part in left) <= neighbours + 2
    assert b"[REDACTED]" in redactor.data(echo.encode("ascii"))


@settings(max_examples=300, deadline=None)
@given(key=_KEYS, data=st.data())
def test_a_key_percent_encoded_in_any_mix_is_taken_out(key: str, data: st.DataObject) -> None:
    """Each character plain or as its %XX bytes, hex in either case, a space as +:
    what quote, quote_plus, Go's PathEscape or a hand-made URL write."""
    from urllib.parse import quote

    spelled = []
    for ch in key:
        how = data.draw(st.sampled_from(["plain", "quote", "every byte"]))
        if ch == " " and data.draw(st.booleans()):
            spelled.append("+")
        elif how == "quote" or how == "every byte" and ch.isascii() and ch.isalnum():
            hexed = quote(ch, safe="")  # (a character a URL never encodes stays as is)
            lower = hexed.startswith("%") and data.draw(st.booleans())
            spelled.append(hexed.lower() if lower else hexed)
        elif how == "every byte":  # as encoders that also encode ~ - . _ write it
            spelled.append("".join(f"%{b:02X}" for b in ch.encode("utf-8")))
        else:
            spelled.append(ch)
    echo = "".join(spelled)
    redactor = Redactor(key)
    assert redactor.text(f"bad key {echo}!") == "bad key [REDACTED]!"
    assert redactor.data(f"<{echo}>".encode()) == b"<[REDACTED]>"


def test_a_key_ending_in_a_percent_sign_is_taken_out_whole() -> None:
    redactor = Redactor("0000000%")
    assert redactor.text("bad key 0000000%25!") == "bad key [REDACTED]!"
    assert redactor.text("key=a+b+c+d+e") == "key=a+b+c+d+e"
    assert Redactor("a b c d e").text("key=a+b+c+d+e") == "key=[REDACTED]"


def test_percent_signs_in_ordinary_text_are_left_alone() -> None:
    redactor = Redactor("az+Kq/9xZr7Lm+/Wn0pQ==")
    text = "50% of answers, 100%2B more; az%2B is not the key"
    assert redactor.text(text) == text


def test_a_short_placeholder_key_is_hidden_only_as_sent() -> None:
    """The base64 of a two-letter key is two letters: hiding it would eat ordinary text."""
    redactor = Redactor("ab")
    assert redactor.text("YWI YWI= ab") == "YWI YWI= [REDACTED]"


def test_the_redactor_takes_every_copy_of_every_secret_out() -> None:
    redactor = Redactor("sk-abc", "sk-abcdef", None, "")
    assert redactor.text("a sk-abcdef b sk-abc") == "a [REDACTED] b [REDACTED]"
    assert redactor.data(b"Bearer sk-abc, sk-abc") == b"Bearer [REDACTED], [REDACTED]"
    assert redactor.text("nothing here") == "nothing here"
    assert not Redactor(None) and Redactor(None).data(b"x") == b"x"


async def test_a_key_in_a_json_escaped_error_message_is_redacted() -> None:
    escaped = "".join(f"\\u{ord(c):04x}" for c in KEY)
    body = ('{"error": {"message": "bad key ' + escaped + '", "type": "' + escaped + '"}}').encode()
    client = _answering(httpx.Response(401, content=body))
    with pytest.raises(ApiError) as caught:
        await client.complete(BODY)
    await client.aclose()
    assert KEY not in str(caught.value) and KEY not in caught.value.error_type
    assert caught.value.message == "bad key [REDACTED]"


async def test_a_key_in_tool_call_arguments_is_redacted() -> None:
    call = {"id": "t", "type": "function", "function": {"name": "f", "arguments": f'"{KEY}"'}}
    answer = {**ANSWER, "choices": [{"index": 0, "message": {"tool_calls": [call]}}]}
    escaped = json.dumps(answer).replace(KEY, "".join(f"\\u{ord(c):04x}" for c in KEY))
    client = _answering(httpx.Response(200, content=escaped.encode()))
    reply = await client.complete(BODY)
    await client.aclose()
    assert reply.answer.tool_calls is not None
    assert KEY not in json.dumps(reply.answer.tool_calls)


async def test_a_declared_length_past_the_cap_is_refused_before_reading() -> None:
    client = _answering(
        httpx.Response(200, content=b"{}", headers={"content-length": "999999999"}),
        max_response_bytes=1000,
    )
    with pytest.raises(TransportError) as caught:
        await client.complete(BODY)
    await client.aclose()
    assert caught.value.error_type == "response_too_large" and caught.value.kind is Kind.RETRY


async def test_an_error_body_is_capped_too() -> None:
    client = _answering(httpx.Response(500, content=b"x" * 5000), max_response_bytes=1000)
    with pytest.raises(TransportError) as caught:
        await client.complete(BODY)
    await client.aclose()
    assert caught.value.error_type == "response_too_large"


@pytest.mark.parametrize("stream", [False, True])
async def test_a_redirect_is_a_fatal_configuration_error_naming_the_target(stream: bool) -> None:
    client = _answering(
        httpx.Response(301, headers={"location": f"https://gw.test/v1/chat/completions?k={KEY}"}),
        stream=stream,
    )
    with pytest.raises(ConfigurationError) as caught:
        await client.complete(BODY)
    await client.aclose()
    error = caught.value
    assert error.kind is Kind.FATAL and error.error_type == "redirect"
    assert "https://gw.test/v1/chat/completions?k=[REDACTED]" in str(error)
    assert "--base-url" in fatal_advice(error)


async def test_an_unexpected_exception_from_the_transport_becomes_a_request_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise RuntimeError(f"proxy said: Authorization: Bearer {KEY}")

    client = ChatClient(["http://gw.test"], KEY, transport=httpx.MockTransport(handler))
    with pytest.raises(TransportError) as caught:
        await client.complete(BODY)
    await client.aclose()
    assert caught.value.kind is Kind.RETRY and KEY not in str(caught.value)


@pytest.mark.parametrize(
    "url",
    ["http://u:p4ss@gw.test/v1", "http://p4ss@gw.test", "http://gw.test/v1?key=p4ss"],
)
def test_a_base_url_with_credentials_is_refused_without_echoing_them(url: str) -> None:
    with pytest.raises(UsageError) as caught:
        normalize_base_url(url)
    assert "p4ss" not in str(caught.value)


def test_a_base_url_that_is_not_http_is_bad_usage_not_a_bug(tmp_path: Path) -> None:
    from tests.conftest import invoke, write_jsonl

    rows = write_jsonl(tmp_path / "rows.jsonl", [{"id": "a", "prompt": "x"}])
    code, _, err = invoke("run", str(rows), "--base-url", "ftp://gw.test", "--out", str(tmp_path))
    assert code == 2 and "http(s)://" in err and "internal error" not in err


def test_plain_http_warnings_name_only_non_loopback_hosts() -> None:
    urls = ["http://10.0.0.5:8080/v1", "http://127.0.0.2/v1", "https://gw.test/v1"]
    warnings = plain_http_warnings(urls, "sk-x")
    assert len(warnings) == 1 and "10.0.0.5" in warnings[0]
    assert plain_http_warnings(urls, None) == []
