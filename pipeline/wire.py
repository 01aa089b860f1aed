"""The wire format: turn gateway answers (JSON bodies, SSE streams, error bodies) into values.

Shapes are the ones OpenAI-compatible gateways send: the usage block with
``prompt_tokens_details`` / ``completion_tokens_details``, the ``input_tokens`` /
``output_tokens`` compatibility fields, ``reasoning_content``, ``tool_calls``, and
the error body ``{"error": {"code", "message", "type", "param", "fallback_suggestion"}}``.
Nothing here does I/O, so every shape is testable from example bodies alone.
"""

from __future__ import annotations

import email.utils
import html
import json
import json.scanner
import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import orjson

from pipeline.errors import ApiError, TransportError

# The longest SSE line (one event) a stream may send. Real events are a few hundred
# bytes; a whole long answer (or an audio clip) in one event stays well under this.
MAX_SSE_LINE_BYTES = 16 * 2**20


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts exactly as the server reported them (never estimates)."""

    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    cached_tokens: int | None = None
    reasoning_tokens: int | None = None
    image_tokens: int | None = None
    audio_tokens: int | None = None


_MAX_TOKENS = 2**62  # a count past this is no count a server could have billed


def _int(value: Any) -> int | None:
    """A token count as the server sent it, or None (unknown, flagged) when it is not
    a count: negative, fractional, absurdly large, or not a number at all."""
    if type(value) is int:  # what a decoder gives for a count: the common case first
        return value if 0 <= value < _MAX_TOKENS else None
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, float) and value.is_integer() and abs(value) < _MAX_TOKENS:
        value = int(value)
    if isinstance(value, int) and 0 <= value < _MAX_TOKENS:
        return value
    return None


_NO_DETAILS: Mapping[str, Any] = MappingProxyType({})


def _details(block: Mapping[str, Any], first: str, second: str) -> Mapping[str, Any]:
    """The first of two detail blocks that is an object (an empty one when neither is)."""
    value = block.get(first)
    if type(value) is dict or isinstance(value, Mapping):  # exact dict: no ABC check
        return value
    value = block.get(second)
    if type(value) is dict or isinstance(value, Mapping):
        return value
    return _NO_DETAILS


def parse_usage(block: Any) -> Usage:
    """Read a usage block, falling back to the compatibility fields gateways also send.

    StarMagic and EvoLink send ``input_tokens``/``output_tokens`` as 0 next to the real
    ``prompt_tokens``/``completion_tokens``, while Responses-style servers send only the
    former; so the standard field wins whenever it is present.
    """
    if type(block) is not dict and not isinstance(block, Mapping):
        return Usage()
    get = block.get
    prompt = _int(get("prompt_tokens"))
    if prompt is None:
        prompt = _int(get("input_tokens"))
    completion = _int(get("completion_tokens"))
    if completion is None:
        completion = _int(get("output_tokens"))
    total = _int(get("total_tokens"))
    if total is None and prompt is not None and completion is not None:
        total = prompt + completion
    p_details = _details(block, "prompt_tokens_details", "input_tokens_details")
    c_details = _details(block, "completion_tokens_details", "output_tokens_details")
    audio_in = _int(p_details.get("audio_tokens"))
    audio_out = _int(c_details.get("audio_tokens"))
    audio = None if audio_in is None and audio_out is None else (audio_in or 0) + (audio_out or 0)
    return Usage(
        prompt,
        completion,
        total,
        _int(p_details.get("cached_tokens")),
        _int(c_details.get("reasoning_tokens")),
        _int(p_details.get("image_tokens")),
        audio,
    )


@dataclass(slots=True)
class Answer:
    """One successful completion, reduced to what the results table keeps."""

    response_id: str | None
    response_model: str | None
    finish_reason: str | None
    content: str | None
    reasoning_content: str | None
    tool_calls: list[Any] | None
    usage: Usage = field(default_factory=Usage)
    service_tier: str | None = None  # the tier the server says it used; None: it said none


_DECODER = json.JSONDecoder()  # what json.loads uses when given no options
# The scanner that decoder reads with (typeshed types make_scanner as the class itself).
_SCAN: Callable[[str, int], tuple[Any, int]] = json.scanner.make_scanner(_DECODER)  # type: ignore[arg-type]
# First bytes for which json.loads would not read bytes as UTF-8: a NUL (UTF-16/32
# without a BOM) or the first byte of a UTF-8, UTF-16 or UTF-32 byte order mark.
_NOT_UTF8_START = frozenset((0x00, 0xEF, 0xFE, 0xFF))
# Every ASCII digit as 1, every other byte as 0: a run of 19 ones marks a number
# (or any digits) that orjson might not read as json does.
_DIGIT_MAP = bytes(1 if 0x30 <= b <= 0x39 else 0 for b in range(256))
_LONG_DIGITS = b"\x01" * 19
# orjson reads nesting up to 1,024 deep, json until the interpreter's stack runs out
# (about 1,000 levels less the caller's own frames): a body with fewer brackets than
# this cannot nest deep enough to tell them apart.
_ORJSON_MAX_BRACKETS = 256


def _orjson_reads_as_json(text: bytes) -> bool:
    """True when orjson either reads ``text`` as ``json`` would or raises (see ``_loads``)."""
    brackets = text.count(b"[") + text.count(b"{")
    return brackets < _ORJSON_MAX_BRACKETS and _LONG_DIGITS not in text.translate(_DIGIT_MAP)


def _loads(text: bytes | str) -> Any:
    """``json.loads`` for untrusted text: anything it cannot read raises ValueError.

    A body nested deeper than the interpreter's stack (``[[[[...``) makes the
    decoder raise RecursionError; it is a malformed body like any other.

    Every answer is decoded here, so it is written for speed, with ``json.loads``'s
    values and errors exactly:

    - bytes whose first two bytes are neither NUL nor the start of a byte order mark
      are the case where ``json.loads``' encoding guess (Python code that cost about
      as much as decoding a short answer) always says UTF-8;
    - such a body is first given to orjson (several times faster). Where orjson and
      ``json`` differ, orjson raises (NaN and Infinity, lone surrogates, a byte order
      mark, nesting past 1,024, anything malformed) and ``json`` then decodes the body
      as it always did; the one silent difference, an integer past 64 bits that
      orjson reads as a float, needs 19 digits in a row, so a body with such a run
      anywhere (even in a string) skips orjson (one C pass over the bytes); so does
      one with 256 brackets or more, which could nest deeper than ``json`` can
      follow (it raises RecursionError where orjson would read on);
    - otherwise the body is decoded as UTF-8 (``surrogatepass``, as ``json.loads``
      does) and read by the same decoder, whose scanner reads an object with nothing
      after it directly. Everything else goes through ``json.loads`` itself.
    """
    try:
        if type(text) is bytes and len(text) > 1 and text[1] and text[0] not in _NOT_UTF8_START:
            if _orjson_reads_as_json(text):
                try:
                    return orjson.loads(text)
                except ValueError:  # orjson.JSONDecodeError: json decides below
                    pass
            decoded = text.decode("utf-8", "surrogatepass")
            if decoded[0] == "{":
                try:
                    value, end = _SCAN(decoded, 0)
                except (StopIteration, ValueError):
                    pass  # the decoder below raises its own error for it
                else:
                    if end == len(decoded):
                        return value
            return _DECODER.decode(decoded)
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def parse_completion(body: bytes | str, redact: Callable[[str], str] | None = None) -> Answer:
    """Parse a non-streamed chat.completion body. A cut or malformed body is retryable.

    ``redact`` (the client's key scrubber) runs on the texts of an error inside the 200
    (an HTML page, an ``error`` object) before its message is cut short."""
    try:
        data = _loads(body)
    except ValueError as exc:  # UnicodeDecodeError is a ValueError
        raw = body.encode("utf-8", "replace") if isinstance(body, str) else body
        if raw.lstrip()[:1] == b"<":  # a proxy's page (a login or an error) sent as a 200
            reason = _body_text(raw, {}, redact)
            raise TransportError(
                "malformed_response", f"response body is not JSON: {reason}"
            ) from None
        raise TransportError("malformed_response", f"response body is not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise TransportError("malformed_response", "response body is not a JSON object")
    error = data.get("error")
    if error is not None and isinstance(error, Mapping):
        raise error_from_body(200, data if redact is None else scrub_strings(data, redact), {})
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not _is_mapping(choices[0]):
        raise TransportError("malformed_response", "response has no choices")
    choice = choices[0]
    raw_message = choice.get("message")
    message: Mapping[str, Any] = raw_message if _is_mapping(raw_message) else _NO_DETAILS
    tool_calls = message.get("tool_calls")
    return Answer(
        response_id=_str(data.get("id")),
        response_model=_str(data.get("model")),
        finish_reason=_str(choice.get("finish_reason")),
        content=_str(message.get("content")),
        reasoning_content=_str(message.get("reasoning_content") or message.get("reasoning")),
        tool_calls=tool_calls if isinstance(tool_calls, list) and tool_calls else None,
        usage=parse_usage(data.get("usage")),
        service_tier=service_tier(data.get("service_tier")),
    )


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _is_mapping(value: Any) -> bool:
    """``isinstance(value, Mapping)``, without the ABC machinery for a plain dict."""
    return type(value) is dict or isinstance(value, Mapping)


# A tier is a short name (default, flex, priority, scale, ...): anything else a server
# puts there is not stored as given, but as this marker, which no price row names.
_TIER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
UNRECOGNIZED_TIER = "unrecognized"
_COMMON_TIERS = frozenset({"default", "auto", "flex", "priority", "scale", "standard"})


def service_tier(value: Any) -> str | None:
    """The tier an answer names, as the results store it. Absent, null or not text:
    None (the server reported none).

    A short name is kept as sent, even one we do not know: the cost view prices only
    the tiers the price table names, so an unknown one is reported unpriced rather
    than silently priced at the default tier. Longer or stranger text becomes
    ``unrecognized`` (unpriced too): a server's free text never lands in this column.
    """
    if not isinstance(value, str):
        return None
    if value in _COMMON_TIERS:  # names the pattern accepts, checked without it
        return value
    return value if _TIER_RE.fullmatch(value) else UNRECOGNIZED_TIER


def retry_after_seconds(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """The wait the server asked for: ``retry-after-ms``, then ``Retry-After`` in seconds
    or as an HTTP date (the order the openai SDK uses). None when it said nothing usable."""
    lowered = {k.lower(): v for k, v in headers.items()}
    ms = _finite(lowered.get("retry-after-ms"))
    if ms is not None:
        return max(0.0, ms / 1000.0)
    value = lowered.get("retry-after")
    if value is None:
        return None
    seconds = _finite(value)
    if seconds is not None:
        return max(0.0, seconds)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _finite(value: str | None) -> float | None:
    """A header's number, or None for text, ``inf`` and ``nan`` (which would stall the run)."""
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def error_from_body(status: int, data: Any, headers: Mapping[str, str]) -> ApiError:
    """Build the ApiError for an error answer from its parsed JSON body, whichever of
    the shapes OpenAI-compatible servers use it has (``_error_fields``)."""
    fields = _error_fields(data)
    return _api_error(status, fields or _ErrorFields(), headers)


def parse_error(
    status: int,
    body: bytes,
    headers: Mapping[str, str],
    redact: Callable[[str], str] | None = None,
) -> ApiError:
    """Turn a non-2xx answer into an ApiError, whatever its body: a JSON error in any of
    the known shapes, plain text, an HTML page from a proxy, or nothing at all.

    The status decides what happens (retry, give up on the row, stop the run); the body
    only gives a short readable message, so no body, however hostile, can raise here
    or put more than ``MAX_ERROR_MESSAGE`` characters into the results. ``redact``
    (the client's key scrubber) runs on every decoded text before any of it is cut
    short, so a key rebuilt by a JSON escape or an HTML character reference is never
    left half in a message.
    """
    fields: _ErrorFields | None = None
    if not body.strip():
        fields = _ErrorFields(message="empty response body")
    else:
        try:
            data = _loads(body)
        except ValueError:
            pass
        else:
            fields = _error_fields(data if redact is None else scrub_strings(data, redact))
        if fields is None:
            fields = _ErrorFields(message=_body_text(body, headers, redact))
    if redact is not None:
        for name in ("message", "type", "param", "fallback", "code"):
            value = getattr(fields, name)
            if isinstance(value, str):
                setattr(fields, name, redact(value))
    return _api_error(status, fields, headers)


# Bounds on what an error body may put into a result row or a log line.
MAX_ERROR_MESSAGE = 1000  # characters of a server's error message (JSON bodies)
MAX_PAGE_MESSAGE = 300  # characters kept of a text body or an HTML page's title
_MAX_FIELD = 200  # characters of an error's type, param, code
_HTML_SCAN = 64 * 1024  # characters of an HTML page searched for its title


@dataclass(slots=True)
class _ErrorFields:
    message: str | None = None
    type: str | None = None
    code: Any = None
    param: str | None = None
    fallback: str | None = None


def _api_error(status: int, fields: _ErrorFields, headers: Mapping[str, str]) -> ApiError:
    code = fields.code
    if isinstance(code, str):
        code = _clean(code, _MAX_FIELD) or None
    elif isinstance(code, bool) or not isinstance(code, int):
        code = None  # a list, an object, a float: nothing a rule could read
    error_type = _clean(fields.type, _MAX_FIELD) or (code if isinstance(code, str) else None)
    status = status if status >= 400 else 500  # an error inside a 200 (body or stream)
    return ApiError(
        status,
        error_type or _default_type(status),
        _clean(fields.message, MAX_ERROR_MESSAGE) or f"HTTP {status}",
        param=_clean(fields.param, _MAX_FIELD) or None,
        code=code,
        fallback_suggestion=_clean(fields.fallback, MAX_ERROR_MESSAGE) or None,
        retry_after=retry_after_seconds(headers),
        headers={k: v for k, v in headers.items() if k.lower().startswith("x-ratelimit-")},
    )


def _error_fields(data: Any) -> _ErrorFields | None:
    """The error in a parsed JSON body, in the shapes servers send; None if it is none.

    - ``{"error": {"code", "message", "type", "param", "fallback_suggestion"}}``: OpenAI,
      the gateways, LiteLLM, llama.cpp's server (which adds ``n_prompt_tokens`` and
      ``n_ctx`` to a context overflow: kept in the message);
    - ``{"error": "text"}``: Ollama's native API, older llama.cpp;
    - ``{"object": "error", "message", "type", "param", "code"}``: vLLM, and any body
      with a top-level ``message``;
    - ``{"detail": "text"}`` and ``{"detail": [{"loc", "msg", "type"}]}``: FastAPI;
    - a bare JSON string.
    """
    if isinstance(data, str):
        return _ErrorFields(message=data)
    if not isinstance(data, Mapping):
        return None
    err = data.get("error")
    if isinstance(err, Mapping):
        message = _str(err.get("message"))
        extra = _context_numbers(err)
        if extra:
            message = f"{message or 'context exceeded'} ({extra})"
        return _ErrorFields(
            message=message,
            type=_str(err.get("type")),
            code=err.get("code"),
            param=_str(err.get("param")),
            fallback=_str(err.get("fallback_suggestion")),
        )
    if isinstance(err, str):
        return _ErrorFields(message=err, type=_str(data.get("type")), code=data.get("code"))
    if data.get("object") == "error" or isinstance(data.get("message"), str):
        return _ErrorFields(
            message=_str(data.get("message")),
            type=_str(data.get("type")),
            code=data.get("code"),
            param=_str(data.get("param")),
        )
    detail = data.get("detail")
    if isinstance(detail, str):
        return _ErrorFields(message=detail)
    if isinstance(detail, list):
        return _ErrorFields(message=_validation_errors(detail))
    if isinstance(detail, Mapping):
        text = _str(detail.get("message")) or _str(detail.get("msg"))
        return _ErrorFields(message=text or _compact(detail))
    return None


def _context_numbers(err: Mapping[str, Any]) -> str:
    """llama.cpp's ``n_prompt_tokens`` / ``n_ctx``, the numbers a user needs to fix a
    context overflow, as text ("" when the body has none)."""
    shown = [
        f"{name} {err[name]}"
        for name in ("n_prompt_tokens", "n_ctx")
        if _int(err.get(name)) is not None
    ]
    return ", ".join(shown)


def _validation_errors(items: list[Any]) -> str:
    """FastAPI's (pydantic's) list of validation errors as ``where: what; ...``."""
    parts: list[str] = []
    for item in items[:5]:
        if not isinstance(item, Mapping):
            parts.append(_compact(item))
            continue
        loc = item.get("loc")
        where = ".".join(_loc_part(p) for p in loc[:10]) if isinstance(loc, list) else ""
        msg = (_str(item.get("msg")) or _compact(item))[:MAX_ERROR_MESSAGE]
        parts.append(f"{where}: {msg}" if where else msg)
    if len(items) > 5:
        parts.append(f"and {len(items) - 5} more")
    return "; ".join(parts)


def _loc_part(part: Any) -> str:
    if isinstance(part, str):
        return part[:100]
    if isinstance(part, int) and not isinstance(part, bool):
        return str(part)
    return "?"


def _compact(value: Any) -> str:
    """A JSON value as short text (only the start of it is ever kept)."""
    try:
        text = json.dumps(value, ensure_ascii=False, default=str)
    except (ValueError, TypeError, RecursionError):
        text = type(value).__name__
    return text[: MAX_ERROR_MESSAGE + 1]


def scrub_strings(data: Any, redact: Callable[[str], str]) -> Any:
    """Parsed JSON with ``redact`` applied to every string in it, keys included.

    Decoding can rebuild a key the raw bytes did not show (a ``\\u`` escape), and the
    messages built from an error are cut short; scrubbing every decoded string first
    means no cut can leave part of a key behind. The containers are fresh from the
    decoder, so they are changed in place; iterative, so nesting costs no stack.
    """
    if isinstance(data, str):
        return redact(data)
    stack: list[Any] = [data]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            for i, value in enumerate(node):
                if isinstance(value, str):
                    node[i] = redact(value)
                elif isinstance(value, (list, dict)):
                    stack.append(value)
        elif isinstance(node, dict):
            items = list(node.items())
            node.clear()
            for key, value in items:
                if isinstance(value, str):
                    value = redact(value)
                elif isinstance(value, (list, dict)):
                    stack.append(value)
                node[redact(key) if isinstance(key, str) else key] = value
    return data


def _body_text(
    body: bytes, headers: Mapping[str, str], redact: Callable[[str], str] | None = None
) -> str:
    """A non-JSON body as a short message: an HTML page by its title (or first heading),
    anything else by its first characters, whitespace collapsed. ``redact`` runs on
    the decoded text (HTML character references unescaped) before it is cut."""
    text = body[: _HTML_SCAN * 4].decode("utf-8", "replace")
    content_type = next((v for k, v in headers.items() if k.lower() == "content-type"), "")
    head = text[:_HTML_SCAN].translate(_ASCII_LOWER)  # same length: indexes into text
    if "html" in content_type.lower() or any(
        tag in head for tag in ("<html", "<!doctype html", "<title", "<body", "<h1")
    ):
        title = _html_title(text[:_HTML_SCAN], head, redact)
        if title:
            return f"{title} (an HTML page, not an API answer)"
        return f"an HTML page of {len(body):,} bytes, not an API answer"
    shown = " ".join(text[: MAX_PAGE_MESSAGE * 4].split())
    return _clean(shown if redact is None else redact(shown), MAX_PAGE_MESSAGE)


def _html_title(text: str, lowered: str, redact: Callable[[str], str] | None = None) -> str:
    """The text of the page's ``<title>``, else its first ``<h1>``/``<h2>``: found with
    plain string searches, so a hostile page costs linear time."""
    for tag in ("title", "h1", "h2"):
        start = lowered.find(f"<{tag}")
        if start == -1:
            continue
        open_end = lowered.find(">", start)
        if open_end == -1:
            continue
        close = lowered.find(f"</{tag}", open_end)
        inner = text[open_end + 1 : close if close != -1 else open_end + 1 + MAX_PAGE_MESSAGE * 4]
        words = " ".join(html.unescape(_strip_tags(inner[: MAX_PAGE_MESSAGE * 4])).split())
        title = _clean(words if redact is None else redact(words), MAX_PAGE_MESSAGE)
        if title:
            return title
    return ""


def _strip_tags(text: str) -> str:
    out: list[str] = []
    depth = 0
    for ch in text:
        if ch == "<":
            depth = 1
        elif ch == ">" and depth:
            depth = 0
            out.append(" ")
        elif not depth:
            out.append(ch)
    return "".join(out)


_ASCII_LOWER = {c: c + 32 for c in range(ord("A"), ord("Z") + 1)}
# Control characters (terminal escapes among them) never reach a log line or a column.
_CONTROLS = dict.fromkeys([*range(0, 9), *range(11, 32), *range(127, 160)], " ")


def _clean(value: Any, limit: int) -> str:
    """Text from a server, made safe to print and store: a string, no control
    characters but newlines and tabs, at most ``limit`` characters ("" for non-text)."""
    if not isinstance(value, str):
        return ""
    text = value[: limit * 2].translate(_CONTROLS).strip()
    if len(text) > limit:
        text = text[: limit - 3].rstrip() + "..."
    return text


_DEFAULT_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "insufficient_quota_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout",
    413: "request_too_large_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_server_error",
    502: "upstream_error",
    503: "service_unavailable_error",
    504: "gateway_timeout",
    # Cloudflare's own answers when the server behind it fails (HTML pages)
    520: "origin_error",
    521: "origin_down",
    522: "origin_connect_timeout",
    523: "origin_unreachable",
    524: "origin_timeout",
}


def _default_type(status: int) -> str:
    return _DEFAULT_TYPES.get(status, f"http_{status}")


class StreamAssembler:
    """Assemble SSE ``chat.completion.chunk`` events into one Answer.

    Gateways cut long streams; a stream that never reached ``data: [DONE]`` is an
    error to retry, never a partial answer marked ok.

    ``feed_bytes`` takes the socket's bytes: each complete line goes through
    ``redact`` (the client's key scrubber) before it is decoded or parsed, and a line
    that grows past ``max_line_bytes`` without ending fails the stream as
    ``response_too_large`` rather than growing the process without bound. An error
    event's decoded texts go through ``redact_text`` before its message is cut.
    """

    def __init__(
        self,
        *,
        redact: Callable[[bytes], bytes] | None = None,
        redact_text: Callable[[str], str] | None = None,
        max_line_bytes: int = MAX_SSE_LINE_BYTES,
    ) -> None:
        self._redact = redact
        self._redact_text = redact_text
        self._max_line = max_line_bytes
        self._pending = bytearray()  # the start of a line whose end has not come yet
        self._content: list[str] = []
        self._reasoning: list[str] = []
        self._tools: dict[int, dict[str, Any]] = {}
        self.response_id: str | None = None
        self.response_model: str | None = None
        self.finish_reason: str | None = None
        self.service_tier: str | None = None
        self.usage = Usage()
        self.done = False
        self._buffer = ""

    def feed_text(self, text: str) -> None:
        """Feed raw text from the socket; complete lines are parsed as they arrive."""
        self._buffer += text
        *lines, self._buffer = self._buffer.split("\n")
        for line in lines:
            self.feed_line(line)

    def feed_bytes(self, data: bytes) -> None:
        """Feed raw bytes from the socket; complete lines are parsed as they arrive.

        The bytes of an unfinished line are appended, never re-joined per chunk, so a
        long line that trickles in costs linear time.
        """
        end = data.find(b"\n")
        if end == -1:
            self._pending += data
            self._check_pending()
            return
        if self._pending:
            self._pending += data[:end]
            first = bytes(self._pending)
            self._pending.clear()
        else:
            first = data[:end]
        self._raw_line(first)
        start = end + 1
        while (end := data.find(b"\n", start)) != -1:
            self._raw_line(data[start:end])
            start = end + 1
        self._pending += data[start:]
        self._check_pending()

    def _check_pending(self) -> None:
        if len(self._pending) > self._max_line:
            self._pending.clear()
            raise TransportError(
                "response_too_large",
                f"the stream sent a line longer than {self._max_line} bytes",
            )

    def _raw_line(self, raw: bytes) -> None:
        if len(raw) > self._max_line:
            raise TransportError(
                "response_too_large",
                f"the stream sent a line longer than {self._max_line} bytes",
            )
        if self._redact is not None:
            raw = self._redact(raw)
        self.feed_line(raw.decode("utf-8", "replace"))

    def feed_line(self, line: str) -> None:
        line = line.strip()
        if not line.startswith("data:"):
            return  # comments (": ping"), event names, blank separators
        payload = line[5:].strip()
        if payload == "[DONE]":
            self.done = True
            return
        try:
            chunk = _loads(payload)
        except ValueError:
            raise TransportError(
                "malformed_response", "stream sent a chunk that is not JSON"
            ) from None
        if isinstance(chunk, Mapping) and isinstance(chunk.get("error"), Mapping):
            # The stream is already a 200: the status is the one the error names
            # (llama.cpp's server sends {"error": {"code": 400, ...}}), else a 500.
            code = chunk["error"].get("code")
            status = code if isinstance(code, int) and 400 <= code <= 599 else 500
            if self._redact_text is not None:
                chunk = scrub_strings(chunk, self._redact_text)
            raise error_from_body(status, chunk, {})
        self._chunk(chunk)

    def _chunk(self, chunk: Any) -> None:
        if not isinstance(chunk, Mapping):
            return
        self.response_id = self.response_id or _str(chunk.get("id"))
        self.response_model = self.response_model or _str(chunk.get("model"))
        self.service_tier = self.service_tier or service_tier(chunk.get("service_tier"))
        if isinstance(chunk.get("usage"), Mapping):
            self.usage = parse_usage(chunk["usage"])
        choices = chunk.get("choices")
        for choice in choices if isinstance(choices, list) else ():
            if not isinstance(choice, Mapping):
                continue
            if choice.get("finish_reason"):
                self.finish_reason = _str(choice["finish_reason"])
            delta = choice.get("delta")
            if isinstance(delta, Mapping):
                self._delta(delta)

    def _delta(self, delta: Mapping[str, Any]) -> None:
        if isinstance(delta.get("content"), str):
            self._content.append(delta["content"])
        reasoning = delta.get("reasoning_content") or delta.get("reasoning")
        if isinstance(reasoning, str):
            self._reasoning.append(reasoning)
        calls = delta.get("tool_calls")
        for call in calls if isinstance(calls, list) else ():
            if not isinstance(call, Mapping):
                continue
            slot = self._tools.setdefault(
                _int(call.get("index")) or 0,
                {"id": None, "type": "function", "function": {"name": "", "arguments": ""}},
            )
            if call.get("id"):
                slot["id"] = call["id"]
            if call.get("type"):
                slot["type"] = call["type"]
            fn = call.get("function")
            if isinstance(fn, Mapping):
                slot["function"]["name"] += _str(fn.get("name")) or ""
                slot["function"]["arguments"] += _str(fn.get("arguments")) or ""

    def finish(self) -> Answer:
        if self._pending:
            raw, self._pending = bytes(self._pending), bytearray()
            self._raw_line(raw)
        if self._buffer.strip():
            self.feed_line(self._buffer)
            self._buffer = ""
        if not self.done:
            raise TransportError("stream_cut", "the stream ended before [DONE]")
        if self.finish_reason is None:
            # llama-cpp-python ends a running stream this way when another request
            # waits: a [DONE] after part of the answer, with no finish_reason.
            raise TransportError(
                "stream_cut", "the stream sent [DONE] without a finish_reason: the answer was cut"
            )
        return Answer(
            response_id=self.response_id,
            response_model=self.response_model,
            finish_reason=self.finish_reason,
            content="".join(self._content) if self._content or not self._tools else None,
            reasoning_content="".join(self._reasoning) or None,
            tool_calls=[self._tools[i] for i in sorted(self._tools)] or None,
            usage=self.usage,
            service_tier=self.service_tier,
        )
