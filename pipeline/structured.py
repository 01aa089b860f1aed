"""Structured output that degrades instead of failing, decided once per endpoint.

Asking for JSON is done three ways, best first:

- ``json_schema``: ``response_format: {"type": "json_schema", ...}`` as the row asks
  (OpenAI, vLLM, llama.cpp's C++ server, Ollama);
- ``json_object``: ``{"type": "json_object", "schema": {...}}`` (how llama-cpp-python's
  server takes a schema; others ignore the extra key) with the schema also stated in
  the system message;
- ``prompt``: no ``response_format`` at all, the schema stated in the system message.

A server that refuses a mode (a 400/422/500 whose message names ``response_format``
or the mode) would refuse it for every row, so the refusal moves that endpoint (base
URL) to the next mode for the rest of the run and the refused request is sent again
at once: it is not a failed attempt of the row. Requests already in flight that get
the same refusal just re-send. The answer is checked against the row's own schema
whatever the mode, so a weaker mode can cost a re-ask, never a wrong label.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any, Protocol, TypeVar

from pipeline.errors import ApiError, RequestError
from pipeline.failover import Endpoints
from pipeline.jsoncheck import schema_of

_Reply = TypeVar("_Reply", covariant=True)
_R = TypeVar("_R")


class Sender(Protocol[_Reply]):
    """What this needs of the client (``pipeline.client.ChatClient``), so the mode state
    depends on no HTTP code."""

    endpoints: Endpoints

    async def complete(
        self,
        body: dict[str, Any],
        *,
        shape: Callable[[str, dict[str, Any]], dict[str, Any]] | None = None,
    ) -> _Reply: ...


MODES = ("json_schema", "json_object", "prompt")  # best first
_REFUSAL_STATUSES = frozenset({400, 422, 500})
_REFUSAL_WORDS = (
    "response_format",
    "response format",
    "json_schema",
    "json_object",
    # llama.cpp turns a schema into a grammar for its sampler; a schema or a tokenizer it
    # cannot build one for is a 400 naming neither field: "Failed to initialize samplers"
    # or a grammar parse error.
    "sampler",
    "grammar",
)


# OpenAI (and servers that copy it) name a row's malformed schema this way: the mode is
# fine, so one bad row must not move every later row to a weaker mode.
_ROW_SCHEMA_WORDS = ("invalid schema", "schema is invalid", "invalid json schema")


def check_mode(mode: str, where: str) -> str:
    """``mode`` if it is one of MODES; ValueError naming ``where`` otherwise."""
    if mode not in MODES:
        raise ValueError(f"{where}: structured_output must be one of {', '.join(MODES)}")
    return mode


def refuses_structured(error: RequestError) -> bool:
    """True when the server said it cannot take the ``response_format`` it was sent.

    llama-cpp-python answers ``json_schema`` with a 500 whose message is FastAPI's
    validation error for ``response_format.type``; others use 400 or 422; llama.cpp's
    server says it could not build the sampler or grammar the schema asks for. Any other
    error (a context overflow, an outage) is not a refusal and is handled as usual.
    """
    if not isinstance(error, ApiError) or error.http_status not in _REFUSAL_STATUSES:
        return False
    text = f"{error.message} {error.param or ''} {error.error_type}".lower()
    if any(word in text for word in _ROW_SCHEMA_WORDS):
        return False  # the server takes the mode; this row's own schema is what it refused
    return any(word in text for word in _REFUSAL_WORDS)


def _kind(body: Mapping[str, Any]) -> str | None:
    fmt = body.get("response_format")
    kind = fmt.get("type") if isinstance(fmt, Mapping) else None
    return kind if kind in ("json_schema", "json_object") else None


def wants_structured(body: Mapping[str, Any]) -> bool:
    """Whether ``StructuredOutput.complete`` has anything to do for ``body`` (it asks
    for JSON); without, the client is called directly."""
    return _kind(body) is not None


def instruction(schema: Mapping[str, Any] | None) -> str:
    """What the system message says when the server does not enforce the schema."""
    text = "Answer with one JSON object and nothing else: no prose, no code fence."
    if schema is not None:
        text += " It must match this JSON Schema:\n" + json.dumps(
            schema, ensure_ascii=False, sort_keys=True
        )
    return text


def _with_instruction(messages: Any, text: str) -> list[Any]:
    """The messages with ``text`` added to the leading system message, or in a new one
    at the start (some chat templates refuse a second system message)."""
    out = list(messages) if isinstance(messages, list) else []
    first = out[0] if out and isinstance(out[0], Mapping) else None
    if first is not None and first.get("role") in ("system", "developer"):
        content = first.get("content")
        if isinstance(content, str):
            out[0] = {**first, "content": f"{content}\n\n{text}" if content else text}
            return out
        if isinstance(content, list):
            out[0] = {**first, "content": [*content, {"type": "text", "text": text}]}
            return out
    return [{"role": "system", "content": text}, *out]


def _later(a: str, b: str) -> str:
    return a if MODES.index(a) >= MODES.index(b) else b


def shape(body: dict[str, Any], mode: str) -> dict[str, Any]:
    """``body`` as sent in ``mode``: unchanged when the mode can carry what it asks for."""
    kind = _kind(body)
    if kind is None or MODES.index(mode) <= MODES.index(kind):
        return body
    schema = schema_of(body.get("response_format"))
    out = dict(body)
    if mode == "json_object":
        fmt: dict[str, Any] = {"type": "json_object"}
        if schema is not None:
            fmt["schema"] = dict(schema)
        out["response_format"] = fmt
    else:
        del out["response_format"]
    out["messages"] = _with_instruction(body.get("messages"), instruction(schema))
    return out


class StructuredOutput:
    """The mode each endpoint (base URL) takes for each kind of JSON request, starting
    from the profile's (``initial``); moved on by refusals, never back."""

    __slots__ = ("_initial", "_moved", "_refused")

    def __init__(self, initial: str = "json_schema") -> None:
        self._initial = check_mode(initial, "provider profile")
        # (base URL, kind asked for) -> the mode refusals moved it to; a key exists once
        # the endpoint was asked for that kind.
        self._moved: dict[tuple[str, str], str | None] = {}
        self._refused: dict[str, dict[str, int]] = {}  # base URL -> mode -> refusals

    def mode(self, base_url: str, kind: str) -> str:
        """The mode a request asking for ``kind`` is sent in to ``base_url``."""
        mode = _later(self._initial, kind)
        moved = self._moved.get((base_url, kind))
        return mode if moved is None else _later(mode, moved)

    def enforced(self, base_url: str, response_format: Any) -> bool:
        """True when answers from ``base_url`` come in the mode the format asks for (the
        server enforces it); False when a weaker mode carried it, so the answer may
        come wrapped in a code fence."""
        kind = _kind({"response_format": response_format})
        return kind is None or self.mode(base_url, kind) == kind

    def refused(self, base_url: str, kind: str, mode: str) -> None:
        """``base_url`` refused ``mode``: move it on (once, whoever saw it first)."""
        counts = self._refused.setdefault(base_url, {})
        counts[mode] = counts.get(mode, 0) + 1
        if self.mode(base_url, kind) == mode and mode != MODES[-1]:
            self._moved[(base_url, kind)] = MODES[MODES.index(mode) + 1]

    async def complete(self, client: Sender[_R], body: dict[str, Any]) -> _R:
        """Send ``body`` through ``client`` in the mode of the endpoint it picks; on a
        refusal, move that endpoint on and send again. Bounded: each refusal moves an
        endpoint's mode forward, and a refusal of the last mode is the row's error."""
        kind = _kind(body)
        if kind is None:
            return await client.complete(body)
        sent: list[tuple[str, str]] = []  # (base URL, mode) of the last request

        def in_mode(base_url: str, request: dict[str, Any]) -> dict[str, Any]:
            mode = self.mode(base_url, kind)
            self._moved.setdefault((base_url, kind), None)
            sent[:] = [(base_url, mode)]
            return shape(request, mode)

        while True:
            sent.clear()
            try:
                return await client.complete(body, shape=in_mode)
            except RequestError as exc:
                if not sent or sent[0][1] == MODES[-1] or not refuses_structured(exc):
                    raise
                base_url, mode = sent[0]
                client.endpoints.succeeded(base_url)  # it answered: not a failing endpoint
                self.refused(base_url, kind, mode)

    def report(self) -> dict[str, dict[str, Any]]:
        """Per endpoint asked for JSON: the mode each kind of request was sent in at the
        end, and how often each mode was refused (for the manifest and the notes)."""
        out: dict[str, dict[str, Any]] = {}
        for base_url, kind in sorted(self._moved):
            entry = out.setdefault(base_url, {"refused": dict(self._refused.get(base_url, {}))})
            entry[kind] = self.mode(base_url, kind)
        return out


def merge_reports(
    into: dict[str, dict[str, Any]], report: Mapping[str, Mapping[str, Any]]
) -> dict[str, dict[str, Any]]:
    """Add one ``StructuredOutput.report`` to ``into`` (runners that each learned on
    their own, e.g. one per Ray split): refusals add up, and each kind's mode is the
    furthest any of them was moved to. Returns ``into``."""
    for base_url, entry in report.items():
        if not isinstance(entry, Mapping):
            continue
        merged = into.setdefault(base_url, {"refused": {}})
        counts = merged["refused"]
        for mode, count in (entry.get("refused") or {}).items():
            counts[mode] = counts.get(mode, 0) + int(count)
        for kind in ("json_schema", "json_object"):
            mode = entry.get(kind)
            if mode in MODES:
                merged[kind] = mode if kind not in merged else _later(merged[kind], mode)
    return into
